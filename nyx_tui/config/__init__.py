"""The training configuration: one declaration per parameter (`fields`), the model (`model`), TOML I/O,
presets and the pre-flight check."""
