"""The ground floor, imported by every other room: the typed config schema and where configs live
(`schema`, `trainer`, `store`, `runs`), the value checks that need nothing but the config
(`values`), the errors users see (`errors`), secret masking (`secrets`) and safe file writes
(`files`). It imports nothing else of finetune."""
