"""The embedded default, for the views: the demo workspace (tiny model, synthetic dataset, config).

The model and images are made by `python -m nyx_tui.demo_assets` in a child process, so neither the CLI
nor the TUI process ever imports torch. Both views call `prepare_workspace` then `write_config`, and start
the config like any other.

`family` picks the tiny model: sd15 (the default, `ws/model`, `ws/demo.toml`), or flux (dev-style) / sd3
(`ws/model-flux`, `ws/demo-flux.toml`, …), a quick check that a new box can train that family without a
download. Every family trains on the same shapes dataset, `ws/dataset`.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import tomli_w

from nyx_tui import paths
from nyx_tui.config.presets import preset_data
from nyx_tui.jobs.jobdir import atomic_write

PRESET = "demo-tiny-cpu"
FAMILIES = ("sd15", "flux", "sd3")
# the model folder in the workspace, per family (as nyx_tui.demo_assets.FAMILY_MODELS, which imports PIL)
MODEL_DIRS = {"sd15": "model", "flux": "model-flux", "sd3": "model-sd3"}
FLOW_STEPS = 60  # tiny flow models: a few dozen steps show the loss move and the samples change
FLOW_PROMPTS = [
    "nyxshape, red circle, white background --d 1 --s 8",
    "nyxshape, blue square, black background --d 2 --s 8",
]


class DemoError(RuntimeError):
    """The demo workspace could not be built; the message carries the worker's output."""


def workspace(path: Path | str | None = None) -> Path:
    return Path(path).expanduser().resolve() if path else paths.demo_workspace()


def _check(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"unknown demo family {family!r}; one of {', '.join(FAMILIES)}")


def model_dir(ws: Path, family: str = "sd15") -> Path:
    _check(family)
    return ws / MODEL_DIRS[family]


def is_ready(ws: Path, family: str = "sd15") -> bool:
    return (model_dir(ws, family) / "model_index.json").is_file() and any((ws / "dataset").glob("*.png"))


def prepare_workspace(ws: Path, family: str = "sd15") -> None:
    """Make the family's model folder and `ws/dataset` if they are not complete yet (idempotent; ~5 s the first
    time)."""
    _check(family)
    ws.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "nyx_tui.demo_assets", str(ws)]
    if family != "sd15":
        command += ["--family", family]  # the sd15 call stays what it was (older workers, the tests)
    proc = subprocess.run(command, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise DemoError(f"could not build the demo workspace in {ws}:\n{proc.stdout[-2000:]}{proc.stderr[-4000:]}")


def config_data(family: str = "sd15", steps: int | None = None) -> dict[str, Any]:
    """The demo config as TOML-ready data: the demo preset, and for flux/sd3 what their tiny models need.

    Flow models: the family's model folder; 64 px (the tiny models' positional tables reach 256 px, and the
    dataset is 64 px); a short run (FLOW_STEPS) at a learning rate a random-weight transformer takes without
    diverging; samples before the first step and at the end, so the two can be compared; one LoRA, at the end.
    """
    _check(family)
    data = preset_data(PRESET)
    if family != "sd15":
        data["model"] = {"family": family, "pretrained": MODEL_DIRS[family]}
        data.setdefault("dataset", {}).update({"resolution": 64, "enable_bucket": False})
        data.setdefault("optimizer", {})["learning_rate"] = 1e-3
        data.setdefault("scheduler", {})["warmup_steps"] = FLOW_STEPS // 10
        data.setdefault("training", {})["max_steps"] = FLOW_STEPS
        data.setdefault("saving", {})["every_n_steps"] = 0  # the final LoRA only
        data["sampling"] = {"prompts": list(FLOW_PROMPTS), "every_n_steps": FLOW_STEPS, "sample_at_first": True}
    if steps:
        data.setdefault("training", {})["max_steps"] = steps
        sched = data.setdefault("scheduler", {})
        sched["warmup_steps"] = min(int(sched.get("warmup_steps", 0)), steps // 10)  # a shorter run, a shorter warmup
        if "sampling" in data:
            data["sampling"]["every_n_steps"] = steps  # still at the end
    return data


def config_path(ws: Path, family: str = "sd15") -> Path:
    _check(family)
    return ws / ("demo.toml" if family == "sd15" else f"demo-{family}.toml")


def write_config(ws: Path, steps: int | None = None, family: str = "sd15") -> Path:
    """`ws/demo.toml` (`demo-flux.toml`, …) from the demo preset; its relative paths (the model folder,
    `dataset`) resolve inside `ws`."""
    path = config_path(ws, family)
    note = f"preset {PRESET}" if family == "sd15" else f"preset {PRESET}, adapted to the tiny {family} model"
    atomic_write(path, f"# written by `nyx demo` from {note}\n" + tomli_w.dumps(config_data(family, steps)))
    return path
