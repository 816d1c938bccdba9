"""Noise, timesteps and the loss of one batch, given its latents and conditioning.

All randomness comes from the run's seeded noise generator, in a fixed order (noise, then timesteps), so
a seeded run is reproducible and a resumed one continues the same stream.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from nyx_tui.config.model import TrainingSection
from nyx_tui.trainers.native import models


def training_loss(
    model: models.SDModel,
    unet: Any,
    latents: torch.Tensor,
    cond: models.Conditioning,
    batch: dict[str, Any],
    gen: torch.Generator,
    tr: TrainingSection,
    device: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The denoising loss: noise at uniform timesteps, predict, MSE to the target of the prediction type."""
    noise = torch.randn(latents.shape, generator=gen)
    if tr.noise_offset:
        noise += tr.noise_offset * torch.randn((*latents.shape[:2], 1, 1), generator=gen)
    noise = noise.to(device, dtype)
    sched = model.noise_scheduler
    t = torch.randint(0, sched.config.num_train_timesteps, (latents.shape[0],), generator=gen).to(device)
    noisy = sched.add_noise(latents, noise, t)
    if model.prediction_type == "epsilon":
        target = noise
    elif model.prediction_type == "v_prediction":
        target = sched.get_velocity(latents, noise, t)
    else:
        raise ValueError(f"unsupported prediction_type {model.prediction_type!r} in the model's scheduler config")
    pred = models.predict(model, unet, noisy, t, cond, batch)
    return F.mse_loss(pred.float(), target.float())
