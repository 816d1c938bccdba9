"""TOML in and out for `TrainingConfig`. (Minimal first version; error translation comes next.)"""

from __future__ import annotations

import tomllib
from pathlib import Path

import tomli_w

from nyx_tui.config.model import TrainingConfig


def load_config(path: Path) -> TrainingConfig:
    path = Path(path)
    data = tomllib.loads(path.read_text())
    return TrainingConfig.model_validate(data)


def dumps_config(config: TrainingConfig) -> str:
    return tomli_w.dumps(config.dump())
