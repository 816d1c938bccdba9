"""The trained adapter: which modules get one, its parameters and learning rates, and its kohya file form.

`attach` puts the network described by `cfg.network` on the loaded model and returns a `Network`, the one
object the loop needs: `param_groups()` for the optimizer and `kohya_state_dict()` for saving. It keeps
references to the original modules (not the DDP-wrapped ones), whose adapter parameters are the very
tensors the optimizer updates.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from nyx_tui.config.model import TrainingConfig
from nyx_tui.trainers.native import lora_io, models


@dataclass
class Network:
    cfg: TrainingConfig
    unet: Any
    params: list[torch.nn.Parameter] = field(default_factory=list)

    def param_groups(self) -> list[dict[str, Any]]:
        return [{"params": self.params, "lr": self.cfg.optimizer.learning_rate}]

    def kohya_state_dict(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        return lora_io.kohya_state_dict(self.unet, self.cfg.network.alpha, dtype)

    def describe(self) -> str:
        net = self.cfg.network
        return (
            f"{net.kind.value} rank {net.dim}, alpha {net.alpha:g} on {net.target_modules}: "
            f"{sum(p.numel() for p in self.params):,} trainable parameters"
        )


def attach(model: models.SDModel, cfg: TrainingConfig) -> Network:
    """Add the adapter (its init is random: seed first). Trainable weights are fp32 whatever the base."""
    params = models.add_unet_lora(model.unet, cfg.network)
    for p in params:
        p.data = p.data.float()
    return Network(cfg, model.unet, params)
