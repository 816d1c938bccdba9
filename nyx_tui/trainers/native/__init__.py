"""Nyx's own training engine: `python -m nyx_tui.trainers.native JOB_DIR`.

This package's `__init__` stays import-light (the CLI and the TUI import `nyx_tui.trainers`); torch,
diffusers, transformers and peft are imported only by the worker process, in `engine`, `models`,
`data` and `lora_io`.
"""

# the loading stages reported as `progress` events (unit "stage") before the first step
LOAD_STAGES: tuple[str, ...] = (
    "importing libraries",
    "reading the dataset",
    "loading the model",
    "adding the LoRA",
    "preparing",
)
