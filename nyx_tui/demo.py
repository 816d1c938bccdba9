"""The embedded default, for the views: the demo workspace (tiny model, synthetic dataset, config).

The model and images are made by `python -m nyx_tui.demo_assets` in a child process, so neither the CLI
nor the TUI process ever imports torch. Both views call `prepare_workspace` then `write_config`, and start
the config like any other.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import tomli_w

from nyx_tui import paths
from nyx_tui.config.presets import preset_data
from nyx_tui.jobs.jobdir import atomic_write

PRESET = "demo-tiny-cpu"


class DemoError(RuntimeError):
    """The demo workspace could not be built; the message carries the worker's output."""


def workspace(path: Path | str | None = None) -> Path:
    return Path(path).expanduser().resolve() if path else paths.demo_workspace()


def is_ready(ws: Path) -> bool:
    return (ws / "model" / "model_index.json").is_file() and any((ws / "dataset").glob("*.png"))


def prepare_workspace(ws: Path) -> None:
    """Make `ws/model` and `ws/dataset` if they are not complete yet (idempotent; ~5 s the first time)."""
    ws.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [sys.executable, "-m", "nyx_tui.demo_assets", str(ws)], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise DemoError(f"could not build the demo workspace in {ws}:\n{proc.stdout[-2000:]}{proc.stderr[-4000:]}")


def write_config(ws: Path, steps: int | None = None) -> Path:
    """`ws/demo.toml` from the demo preset; its relative paths (`model`, `dataset`) resolve inside `ws`."""
    data = preset_data(PRESET)
    if steps:
        data.setdefault("training", {})["max_steps"] = steps
        sched = data.setdefault("scheduler", {})
        sched["warmup_steps"] = min(int(sched.get("warmup_steps", 0)), steps // 10)  # a shorter run, a shorter warmup
    path = ws / "demo.toml"
    atomic_write(path, f"# written by `nyx demo` from preset {PRESET}\n" + tomli_w.dumps(data))
    return path
