"""Images to latents: the VAE encode of a batch (and, later, the latent cache)."""

from __future__ import annotations

from typing import Any

import torch

from nyx_tui.trainers.native import models


@torch.no_grad()
def batch_latents(
    model: models.SDModel, batch: dict[str, Any], gen: torch.Generator, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """Latents of the batch's images: a sample of the VAE posterior (seeded), scaled."""
    pixels = batch["pixels"].to(device, dtype)
    posterior = model.vae.encode(pixels).latent_dist
    eps = torch.randn(posterior.mean.shape, generator=gen).to(device, dtype)
    return (posterior.mean + posterior.std * eps) * model.vae.config.scaling_factor
