"""Files other tools load: LoRA in diffusers and kohya layouts (`lora`, `kohya_metadata`), whole SD
models and ControlNets in the original single-file layout (`single_file`, `controlnet_file`), and
the ControlNet export (`controlnet`)."""
