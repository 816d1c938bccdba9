"""Noise, timesteps and the loss of one batch, given its latents and conditioning — with sd-scripts' noise
and loss options, under its names (`training.*`), computed as sd-scripts computes them:

- noise: offset noise (`noise_offset`, `noise_offset_random_strength`, `adaptive_noise_scale`), multi-
  resolution pyramid noise (`multires_noise_iterations`, `multires_noise_discount`), input perturbation
  (`ip_noise_gamma`, `ip_noise_gamma_random_strength`: extra noise in the model's input, not in its target);
- timesteps: uniform in [`min_timestep`, `max_timestep`) (max exclusive, as in sd-scripts);
- schedule: zero terminal SNR (`zero_terminal_snr`) rescales the betas once, after loading
  (`prepare_noise_schedule`), so the last timestep is pure noise;
- loss: L2, L1, Huber or smooth L1 (`loss_type`) with the Huber threshold per timestep (`huber_schedule`
  constant / exponential / snr, `huber_c`, `huber_scale`);
- per-timestep weights: min-SNR (`min_snr_gamma`: min(SNR, γ)/SNR for noise prediction, min(SNR, γ)/(SNR+1)
  for v-prediction, as in diffusers' and sd-scripts' scripts), `scale_v_pred_loss_like_noise_pred`
  (SNR/(SNR+1)), `v_pred_like_loss`, debiased estimation (`debiased_estimation_loss`: 1/√SNR, v: 1/(SNR+1));
- per-item weights: the batch's `masks` ([B,1,h,w], masked loss) multiply the per-element loss before its
  per-item mean — sd-scripts' plain mean of loss×mask, so a mostly-masked image contributes less, and the
  learning rates kohya users know carry over — and `loss_weights` ([B], prior_loss_weight of regularization
  images) the per-item loss. Then the batch mean.

Where sd-scripts divides by zero (min-SNR and debiased weights of noise prediction at a zero-SNR timestep,
which only zero_terminal_snr on a noise-prediction model reaches — a warned-about combination), the weights
here take their limit or a floor instead of NaN.

All randomness comes from the run's seeded noise generator, in a fixed order — base noise, noise offset
(strength, then offset), pyramid levels (size ratio, then noise, per level), timesteps, input perturbation
(strength, then noise) — each only when its option is on, so a seeded run is reproducible, a resumed one
continues the same stream, and a run with every option off draws exactly what it drew before they existed.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from nyx_tui.config.model import HuberSchedule, LossType, TrainingSection
from nyx_tui.trainers.native import models

SNR_CAP = 1000.0  # sd-scripts caps the SNR at this in the SNR/(SNR+1) and debiased weights
SNR_FLOOR = 1e-3  # below this (only at a zero-terminal-SNR timestep) 1/√SNR is taken at the floor


# ------------------------------------------------------------------------------------------ schedule


def prepare_noise_schedule(model: models.SDModel, tr: TrainingSection) -> list[tuple[str, str]]:
    """Once, after loading: rescale the betas for zero terminal SNR when asked, and check what needs the model
    (its prediction type, its number of timesteps). Returns (level, message) pairs to log; raises ValueError
    for a config this model cannot train with (the pre-flight catches these when the model's files tell)."""
    notes: list[tuple[str, str]] = []
    v_pred = model.prediction_type == "v_prediction"
    if tr.zero_terminal_snr:
        # diffusers' DDPMScheduler rescales at construction; keeping it in the config makes the samplers built
        # from this config (sampling) use the same schedule
        model.noise_scheduler = DDPMScheduler.from_config(model.noise_scheduler.config, rescale_betas_zero_snr=True)
        last = float(model.noise_scheduler.alphas_cumprod[-1])
        notes.append(("info", f"zero terminal SNR: the noise schedule is rescaled (alpha_bar at the last step {last})"))
        if not v_pred:
            notes.append(
                (
                    "warning",
                    "training.zero_terminal_snr is meant for v-prediction models and this model predicts noise "
                    f"({model.prediction_type}): the training will be unexpected",
                )
            )
    if tr.scale_v_pred_loss_like_noise_pred and not v_pred:
        raise ValueError(
            f"training.scale_v_pred_loss_like_noise_pred is for v-prediction models; this model predicts "
            f"{model.prediction_type}: set it to false"
        )
    if tr.v_pred_like_loss and v_pred:
        raise ValueError("training.v_pred_like_loss is for noise-prediction models; this model predicts v: set it to 0")
    total = int(model.noise_scheduler.config.num_train_timesteps)
    if tr.min_timestep >= min(tr.max_timestep, total):
        raise ValueError(
            f"training.min_timestep ({tr.min_timestep}) leaves no timestep: the model's schedule has {total} "
            f"(0 to {total - 1}) and max_timestep is {tr.max_timestep}; lower min_timestep"
        )
    if tr.max_timestep > total:
        notes.append(
            (
                "warning",
                f"training.max_timestep ({tr.max_timestep}) is past the model's {total} timesteps; using {total}",
            )
        )
    return notes


def timestep_range(tr: TrainingSection, scheduler: Any) -> tuple[int, int]:
    """[low, high) of the timesteps drawn."""
    return tr.min_timestep, min(tr.max_timestep, int(scheduler.config.num_train_timesteps))


def snr(scheduler: Any, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio ᾱ/(1−ᾱ) of each timestep (0 at a zero-terminal-SNR last step), float32."""
    alphas = scheduler.alphas_cumprod.to(timesteps.device, torch.float32)[timesteps]
    return alphas / (1.0 - alphas)


# --------------------------------------------------------------------------------------------- noise


def pyramid_noise(noise: torch.Tensor, gen: torch.Generator, iterations: int, discount: float) -> torch.Tensor:
    """Multi-resolution noise (sd-scripts' `pyramid_noise_like`): level i adds noise drawn at 1/rⁱ of the size
    (r uniform in [2, 4) per level), upsampled bilinearly and weighted discountⁱ, stopping at a 1-pixel side;
    then the sum is scaled back to unit standard deviation. Level 0 is full-size white noise of weight 1."""
    b, c, h, w = noise.shape
    out = noise.float().clone()
    for i in range(iterations):
        r = float(torch.rand(1, generator=gen)) * 2 + 2
        hn, wn = max(1, int(h / r**i)), max(1, int(w / r**i))
        level = torch.randn((b, c, hn, wn), generator=gen).to(noise.device)
        out += F.interpolate(level, size=(h, w), mode="bilinear", align_corners=False) * discount**i
        if hn == 1 or wn == 1:
            break
    return out / out.std()


def draw_noise(latents: torch.Tensor, gen: torch.Generator, tr: TrainingSection) -> torch.Tensor:
    """The noise added to `latents` (and the target of noise prediction), float32 on the latents' device."""
    device = latents.device
    noise = torch.randn(latents.shape, generator=gen).to(device)
    if tr.noise_offset:
        strength = tr.noise_offset
        if tr.noise_offset_random_strength:
            strength = float(torch.rand(1, generator=gen)) * tr.noise_offset
        offset: float | torch.Tensor = strength
        if tr.adaptive_noise_scale:
            # larger offsets for latents whose channels are far from zero on average (very dark/bright images)
            channel_mean = latents.float().mean(dim=(2, 3), keepdim=True).abs()
            offset = torch.clamp(strength + tr.adaptive_noise_scale * channel_mean, min=0.0)
        noise = noise + offset * torch.randn((*latents.shape[:2], 1, 1), generator=gen).to(device)
    if tr.multires_noise_iterations:
        noise = pyramid_noise(noise, gen, tr.multires_noise_iterations, tr.multires_noise_discount)
    return noise


def draw_timesteps(batch_size: int, gen: torch.Generator, tr: TrainingSection, scheduler: Any) -> torch.Tensor:
    low, high = timestep_range(tr, scheduler)
    return torch.randint(low, high, (batch_size,), generator=gen)


def input_perturbation(shape: torch.Size, gen: torch.Generator, tr: TrainingSection) -> torch.Tensor | None:
    """Input-perturbation noise (ip_noise_gamma): added to the noise that goes into the input only."""
    if not tr.ip_noise_gamma:
        return None
    strength = tr.ip_noise_gamma
    if tr.ip_noise_gamma_random_strength:
        strength = float(torch.rand(1, generator=gen)) * tr.ip_noise_gamma
    return strength * torch.randn(shape, generator=gen)


# ---------------------------------------------------------------------------------------------- loss


def huber_threshold(tr: TrainingSection, timesteps: torch.Tensor, scheduler: Any) -> torch.Tensor | None:
    """The Huber threshold c of each item (sd-scripts' schedules), or None for L1/L2.

    constant: huber_c·huber_scale. exponential: from huber_scale at t=0 down to huber_c·huber_scale at the last
    timestep, exp(t·ln(huber_c)/T). snr: (1−c)/(1+σ)² + c with σ = √((1−ᾱ)/ᾱ) — near 1 where there is little
    noise (L2-like), near c where there is much (L1-like); huber_scale does not apply (as in sd-scripts).
    """
    if tr.loss_type not in (LossType.HUBER, LossType.SMOOTH_L1):
        return None
    t = timesteps.float()
    if tr.huber_schedule is HuberSchedule.CONSTANT:
        return torch.full_like(t, tr.huber_c * tr.huber_scale)
    if tr.huber_schedule is HuberSchedule.EXPONENTIAL:
        rate = -math.log(tr.huber_c) / int(scheduler.config.num_train_timesteps)
        return torch.exp(-rate * t) * tr.huber_scale
    alphas = scheduler.alphas_cumprod.to(timesteps.device, torch.float32)[timesteps]
    sigmas = ((1.0 - alphas) / alphas) ** 0.5  # inf at a zero-SNR timestep → c
    return (1.0 - tr.huber_c) / (1.0 + sigmas) ** 2 + tr.huber_c


def elementwise_loss(
    pred: torch.Tensor, target: torch.Tensor, loss_type: LossType, c: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-element loss. Huber: 2c(√(d²+c²) − c), ≈ d² for |d| ≪ c and ≈ 2c|d| for |d| ≫ c; smooth L1:
    2(√(d²+c²) − c), the same divided by c. `c` is per item ([B]). Computed as d²/(√(d²+c²) + c), equal
    but exact in float32 where c is large (sd-scripts' form rounds to steps of ~c·1e-7 there)."""
    if loss_type is LossType.L2:
        return F.mse_loss(pred, target, reduction="none")
    if loss_type is LossType.L1:
        return F.l1_loss(pred, target, reduction="none")
    if c is None:
        raise ValueError(f"loss_type {loss_type.value} needs a Huber threshold")
    c = c.to(pred.device, pred.dtype).view(-1, *([1] * (pred.dim() - 1)))
    squared = (pred - target) ** 2
    soft = squared / (torch.sqrt(squared + c**2) + c)  # = √(d²+c²) − c, without its cancellation for |d| ≪ c
    return 2 * c * soft if loss_type is LossType.HUBER else 2 * soft


def timestep_weights(tr: TrainingSection, timesteps: torch.Tensor, scheduler: Any, v_pred: bool) -> torch.Tensor | None:
    """The product of the per-timestep loss weights that are on ([B] float32), or None when none is."""
    on = tr.min_snr_gamma or tr.scale_v_pred_loss_like_noise_pred or tr.v_pred_like_loss or tr.debiased_estimation_loss
    if not on:
        return None
    s = snr(scheduler, timesteps)
    weight = torch.ones_like(s)
    if tr.min_snr_gamma:
        weight = weight * min_snr_weight(s, tr.min_snr_gamma, v_pred)
    if tr.scale_v_pred_loss_like_noise_pred:
        weight = weight * v_pred_scale(s)
    if tr.v_pred_like_loss:
        # sd-scripts: loss + loss / scale · v_pred_like_loss
        weight = weight * (1.0 + tr.v_pred_like_loss / v_pred_scale(s).clamp(min=SNR_FLOOR / (1 + SNR_FLOOR)))
    if tr.debiased_estimation_loss:
        weight = weight * debiased_weight(s, v_pred)
    return weight


def min_snr_weight(s: torch.Tensor, gamma: float, v_pred: bool) -> torch.Tensor:
    """Min-SNR-γ (Hang et al. 2023): min(SNR, γ)/SNR for noise prediction (= min(1, γ/SNR), 1 at SNR 0),
    min(SNR, γ)/(SNR+1) for v-prediction."""
    if v_pred:
        return torch.clamp(s, max=gamma) / (s + 1.0)
    return torch.clamp(gamma / s, max=1.0)


def v_pred_scale(s: torch.Tensor) -> torch.Tensor:
    """SNR/(SNR+1) with SNR capped at 1000: a v-prediction loss times this weighs timesteps as noise prediction."""
    capped = torch.clamp(s, max=SNR_CAP)
    return capped / (capped + 1.0)


def debiased_weight(s: torch.Tensor, v_pred: bool) -> torch.Tensor:
    """Debiased estimation (Yu et al. 2024): 1/√SNR for noise prediction, 1/(SNR+1) for v-prediction, SNR
    capped at 1000 (and floored for 1/√SNR)."""
    capped = torch.clamp(s, max=SNR_CAP)
    if v_pred:
        return 1.0 / (capped + 1.0)
    return 1.0 / torch.sqrt(torch.clamp(capped, min=SNR_FLOOR))


def reduce_loss(
    loss: torch.Tensor,
    masks: torch.Tensor | None = None,
    loss_weights: torch.Tensor | None = None,
    timestep_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-element loss [B, C, h, w] → one number: times the mask (resized to the loss's size by area when it
    differs), mean per item, times the item's loss weight and timestep weight, mean over the batch."""
    if masks is not None:
        masks = masks.to(loss.device, loss.dtype)
        if masks.shape[-2:] != loss.shape[-2:]:
            masks = F.interpolate(masks, size=loss.shape[-2:], mode="area")
        loss = loss * masks
    per_item = loss.mean(dim=tuple(range(1, loss.dim())))
    if loss_weights is not None:
        per_item = per_item * loss_weights.to(per_item.device, per_item.dtype)
    if timestep_weight is not None:
        per_item = per_item * timestep_weight.to(per_item.device, per_item.dtype)
    return per_item.mean()


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
    """The denoising loss of one batch: noise and timesteps from `gen`, predict, the configured loss to the
    target of the model's prediction type, weighted and reduced."""
    sched = model.noise_scheduler
    noise = draw_noise(latents, gen, tr)
    t = draw_timesteps(latents.shape[0], gen, tr, sched).to(device)
    extra = input_perturbation(latents.shape, gen, tr)
    noise = noise.to(device, dtype)
    noised_with = noise if extra is None else noise + extra.to(device, dtype)
    noisy = sched.add_noise(latents, noised_with, t)
    if model.prediction_type == "epsilon":
        target = noise
    elif model.prediction_type == "v_prediction":
        target = sched.get_velocity(latents, noise, t)
    else:
        raise ValueError(f"unsupported prediction_type {model.prediction_type!r} in the model's scheduler config")
    pred = models.predict(model, unet, noisy, t, cond, batch)
    loss = elementwise_loss(pred.float(), target.float(), tr.loss_type, huber_threshold(tr, t, sched))
    weights = timestep_weights(tr, t, sched, model.prediction_type == "v_prediction")
    return reduce_loss(loss, batch.get("masks"), batch.get("loss_weights"), weights)
