"""Training-state folders on disk: what `nyx_state.json` says, whether a folder can be resumed with a
config, and which intermediate saves `saving.keep_last_n` deletes.

Torch-free on purpose: the pre-flight check (`nyx config check`, the TUI form) reads a state folder
without loading a model or importing torch. The engine writes the folder (`engine.save_training_state`):
accelerate's files first, `nyx_state.json` last, so a folder without it is incomplete (a save that was
interrupted) and is refused.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nyx_tui.config.errors import Problem
from nyx_tui.config.model import TrainingConfig

STATE_INFO = "nyx_state.json"
STATE_WEIGHTS = "model.safetensors"  # accelerate's name for the (LoRA-only) weights of the first model


def network_signature(cfg: TrainingConfig) -> dict[str, Any]:
    """What a state's weights must agree on with the config that resumes it: the family and the adapter's
    shape. (The learning rate, the schedule, the data may change on resume; the tensors may not.)"""
    net = cfg.network
    return {
        "family": cfg.model.family.value,
        "kind": net.kind.value,
        "dim": net.dim,
        "alpha": net.alpha,
        "target_modules": list(net.target_modules),
        "conv_dim": net.conv_dim,
        "conv_alpha": net.conv_alpha,
        "lokr_factor": net.lokr_factor,
        "block_dims": net.block_dims,
        "block_alphas": net.block_alphas,
        "conv_block_dims": net.conv_block_dims,
        "conv_block_alphas": net.conv_block_alphas,
        "train_unet": net.train_unet,
        "train_text_encoder": net.train_text_encoder,
    }


@dataclass
class StateInfo:
    """`nyx_state.json`: where the run was when the state was saved.

    `epoch` and `batches_done` (micro-batches of that epoch already trained on, per process) place the
    data stream; `steps_per_epoch`, `num_processes` and `total_steps` say what the run looked like, so a
    resumed run can say what changed.
    """

    step: int
    epoch: int
    batches_done: int = 0
    total_steps: int = 0
    steps_per_epoch: int = 0
    num_processes: int = 1
    lora: str = ""
    saved: float = 0.0
    ema: bool = False
    network: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        data = {k: getattr(self, k) for k in self.__dataclass_fields__}
        data["max_steps"] = self.total_steps  # the name the first version of this file used
        return json.dumps(data, indent=1) + "\n"

    @classmethod
    def read(cls, folder: Path) -> StateInfo:
        """Raises FileNotFoundError (no such file: an incomplete state) or ValueError (not ours)."""
        raw = json.loads((Path(folder) / STATE_INFO).read_text(encoding="utf-8"))
        if not isinstance(raw, dict) or not isinstance(raw.get("step"), int) or not isinstance(raw.get("epoch"), int):
            raise ValueError(f"{STATE_INFO} has no integer step and epoch")
        known = {k: raw[k] for k in cls.__dataclass_fields__ if k in raw}
        known.setdefault("total_steps", int(raw.get("max_steps", 0)))
        return cls(**known)


def latest_state(folder: Path) -> Path | None:
    """The most recently saved complete state inside `folder` (an output folder, or a job folder's output/)."""
    found = [*folder.glob(f"*-state/{STATE_INFO}"), *folder.glob(f"output/*-state/{STATE_INFO}")]
    return max(found, key=lambda p: p.stat().st_mtime).parent if found else None


def resume_problems(cfg: TrainingConfig) -> list[Problem]:
    """Why `training.resume` cannot continue with this config: missing or incomplete folder, or weights of
    another shape. Read before any model loads."""
    if not cfg.training.resume:
        return []
    key = "training.resume"
    folder = Path(cfg.training.resume)
    if not folder.is_dir():
        what = "is a file, not a folder" if folder.exists() else "not found"
        return [
            Problem(
                key,
                f"{what}: {folder}",
                "point it at a `<name>-state` folder that a run saved next to its LoRA (relative paths start at "
                "the config's folder)",
            )
        ]
    try:
        info = StateInfo.read(folder)
    except FileNotFoundError:
        inside = latest_state(folder)
        fix = (
            f'it holds training states: resume = "{inside}" is the latest'
            if inside
            else "resume from another state folder, e.g. an earlier `<name>-stepNNNNNN-state`"
        )
        return [
            Problem(
                key,
                f"{folder} is not a complete training state (no {STATE_INFO}: not a state folder, or its save was "
                "interrupted)",
                fix,
            )
        ]
    except (OSError, ValueError) as e:
        return [Problem(key, f"{folder / STATE_INFO} cannot be read ({e})", "resume from another state folder")]
    out: list[Problem] = []
    if not (folder / STATE_WEIGHTS).is_file():
        out.append(
            Problem(key, f"{folder} has no {STATE_WEIGHTS} (the LoRA weights)", "resume from another state folder")
        )
    if not info.network:
        out.append(
            Problem(
                key,
                "this state does not record its network, so it cannot be checked against the config before loading",
                "make sure network.kind, dim and target_modules are the ones it was trained with",
                severity="warning",
            )
        )
        return out
    want = network_signature(cfg)
    for name, value in want.items():
        if name not in info.network or info.network[name] == value:  # older states record fewer fields
            continue
        saved = info.network[name]
        field_name = "model.family" if name == "family" else f"network.{name}"
        setting = f"remove {field_name}" if saved is None else f"set {field_name} = {json.dumps(saved)}"
        out.append(
            Problem(
                field_name,
                f"is {value!r} but the state in {folder} was trained with {saved!r}",
                f"{setting} to resume it, or start a new run without training.resume",
                severity="warning" if name == "alpha" else "error",
            )
        )
    return out


@dataclass
class Retention:
    """`saving.keep_last_n`: the intermediate saves of this run, oldest first; older ones beyond the last
    `keep` are deleted (the LoRA file and its state folder). Only files this run wrote are ever touched."""

    keep: int
    saved: list[tuple[Path, Path | None]] = field(default_factory=list)

    def add(self, lora: Path, state: Path | None) -> list[Path]:
        """Record a save; delete and return what falls out of the window."""
        if not self.keep:
            return []
        self.saved.append((lora, state))
        removed: list[Path] = []
        while len(self.saved) > self.keep:
            old_lora, old_state = self.saved.pop(0)
            old_lora.unlink(missing_ok=True)
            removed.append(old_lora)
            if old_state is not None and old_state.is_dir():
                shutil.rmtree(old_state, ignore_errors=True)
                removed.append(old_state)
        return removed
