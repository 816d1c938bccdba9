"""Schedulers for the custom sd-scripts backend, given to sd-scripts by dotted path (`lr_scheduler_type =
"nyx_tui.trainers.kohya.schedulers.RexLR"`, its arguments in `lr_scheduler_args`).

This module is imported inside sd-scripts' own process and environment, where Nyx's other modules and
packages may be absent: it imports only torch (and math). The REX formula is the native engine's
(`trainers.native.optim.schedule_factor`), so a REX run means the same on both backends.
"""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LRScheduler


def rex_factor(step: int, num_steps: int, num_warmup_steps: int = 0) -> float:
    """REX (Chen, Wolfe & Kyrillidis, MLSys 2022): after a linear warmup, f(z) = (1 - z) / (1/2 + (1 - z)/2)
    for progress z in [0, 1] — 1 at the start, 2/3 halfway, 0 at the end."""
    if step < num_warmup_steps:
        return step / max(1, num_warmup_steps)
    t = (step - num_warmup_steps) / max(1, num_steps - num_warmup_steps)
    t = min(max(t, 0.0), 1.0)
    return (1.0 - t) / (0.5 + 0.5 * (1.0 - t))


class RexLR(LRScheduler):
    """REX from `max_lr` down to `min_lr` over `num_steps` optimizer steps, after `num_warmup_steps` of
    linear warmup. `max_lr` defaults to each group's own learning rate (sd-scripts sets it per group: unet
    and text encoders). sd-scripts builds a dotted-path scheduler from the optimizer and `lr_scheduler_args`
    only, so Nyx's export passes `total_steps`, `warmup_steps` and `min_lr_ratio` (a fraction of each
    group's lr, as the native engine's floor): those names are accepted beside the explicit ones."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        max_lr: float | None = None,
        min_lr: float = 0.0,
        num_steps: int = 0,
        num_warmup_steps: int | float = 0,
        last_epoch: int = -1,
        *,
        total_steps: int = 0,
        warmup_steps: int | float = 0,
        min_lr_ratio: float | None = None,
    ) -> None:
        num_steps = int(num_steps or total_steps)
        if num_steps <= 0:
            raise ValueError("RexLR needs num_steps (or total_steps) > 0: the run's optimizer steps")
        warm = num_warmup_steps or warmup_steps
        if isinstance(warm, float) and 0 < warm < 1:
            warm = int(warm * num_steps)  # a ratio, as sd-scripts' lr_warmup_steps
        self.max_lr = max_lr
        self.min_lr = float(min_lr)
        self.min_lr_ratio = min_lr_ratio
        self.num_steps = num_steps
        self.num_warmup_steps = int(warm)
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:  # type: ignore[override]
        step = max(0, self.last_epoch)
        f = rex_factor(step, self.num_steps, self.num_warmup_steps)
        out = []
        for base in self.base_lrs:
            top = float(self.max_lr) if self.max_lr is not None else float(base)
            low = top * self.min_lr_ratio if self.min_lr_ratio is not None else min(self.min_lr, top)
            # the warmup climbs from 0, the floor applies to the decay only (as the native engine's)
            lr = top * f if step < self.num_warmup_steps else low + (top - low) * f
            out.append(lr if math.isfinite(lr) else low)
        return out
