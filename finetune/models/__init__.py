"""The pretrained model: loading it from a hub id, folder or single file (`loading`), what its
config files say without loading it (`layout`), text conditioning (`prompts`), speed settings
(`speed`), FSDP2 sharding (`sharding`) and moving models between devices (`devices`)."""
