"""What several processes (`accelerate launch --multi_gpu`, `training.num_processes`) must agree on.

Only the main process reads `control.jsonl`; its decision is broadcast to every rank at every step as a
tiny tensor of flags, so all ranks save, stop or cancel at the same step (a rank that saved alone would
wait forever for the others in a collective). With one process nothing is sent.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast, gather_object

from nyx_tui.jobs.control import ControlReader

# the order every rank handles the commands of one step in
COMMAND_ORDER: tuple[str, ...] = ("cancel", "save_now", "sample_now", "stop")


class CommandChannel:
    def __init__(self, accelerator: Accelerator, control: ControlReader) -> None:
        self.accelerator, self.control = accelerator, control

    def poll(self) -> list[dict[str, Any]]:
        """This step's commands, one per kind, in COMMAND_ORDER, the same on every rank. The main process
        gets the messages as written (for its acknowledgements); the others get `{"command": name}`."""
        acc = self.accelerator
        got: dict[str, dict[str, Any]] = {}
        if acc.is_main_process:
            for msg in self.control.poll():
                got.setdefault(str(msg.get("command")), msg)
        if acc.num_processes > 1:
            flags = torch.tensor([name in got for name in COMMAND_ORDER], dtype=torch.int32, device=acc.device)
            flags = broadcast(flags, from_process=0)
            names = [name for name, flag in zip(COMMAND_ORDER, flags.tolist(), strict=True) if flag]
        else:
            names = [name for name in COMMAND_ORDER if name in got]
        return [got.get(name, {"command": name}) for name in names]


def shard_summary(accelerator: Accelerator, captions: list[str]) -> list[str] | None:
    """Every process's first captions, gathered on the main process (None elsewhere): a log line shows
    that the ranks trained on different shards of the data."""
    gathered = gather_object([captions])
    return [", ".join(c) for c in gathered] if accelerator.is_main_process else None


def weights_digest(params: list[torch.nn.Parameter]) -> str:
    h = hashlib.sha256()
    for p in params:
        h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def digests(accelerator: Accelerator, params: list[torch.nn.Parameter]) -> list[str]:
    """Every process's digest of the trained weights (DDP keeps them equal; a log line shows it)."""
    return list(gather_object([weights_digest(params)]))
