"""Flow-matching noise, timesteps and loss for Flux and SD3, with sd-scripts' options (`flow.*`) computed as
sd-scripts computes them (`library/flux_train_utils.py`, `library/sd3_train_utils.py`,
`get_noisy_model_input_and_timesteps`, `apply_model_prediction_type`):

- the noisy input is `(1 − σ)·x0 + σ·noise`, σ in [0, 1] (σ = 1: pure noise); the transformer's timestep is
  σ·1000 (Flux's call divides it by 1000 again, as FluxPipeline does);
- σ per image (`flow.timestep_sampling`): `uniform` U(0,1); `sigmoid` sigmoid(sigmoid_scale·N(0,1));
  `shift` that, then shifted by `discrete_flow_shift` (s·k/(1 + (k−1)·s)); `flux_shift` that, shifted by the
  image's size as Flux inference does (mu = diffusers' `calculate_shift` of the packed sequence length,
  σ = e^mu/(e^mu + 1/s − 1)); `sigma`: u from diffusers' `compute_density_for_timestep_sampling`
  (`weighting_scheme` logit_normal with logit_mean/logit_std, mode with mode_scale, else uniform), then
  - Flux: the u·1000-th timestep of a FlowMatchEulerDiscreteScheduler shifted by `discrete_flow_shift` (the
    scheduler sd-scripts' Flux script builds; the model's own may differ), its sigma;
  - SD3: u shifted by `flow.training_shift`, timestep ⌊u·(max_timestep − min_timestep) + min_timestep⌋,
    σ = timestep/1000 (sd-scripts' SD3 script). The other modes are Nyx's: sd-scripts' SD3 script knows
    only this one, Flux's four work for SD3 as they are;
- prediction (`flow.model_prediction_type`, Flux): `raw` the output, `additive` output + noisy input,
  `sigma_scaled` output·(−σ) + noisy input with the loss weighted by `compute_loss_weighting_for_sd3`
  (sigma_sqrt: σ⁻², cosmap: 2/(π(1 − 2σ + 2σ²)), else 1); the target is `noise − x0` for all three, as in
  sd-scripts (so sigma_scaled compares a denoised estimate with the velocity: sd-scripts' definition, kept so
  its users' settings train the same; `raw` is the textbook flow-matching loss). SD3 always does what
  sd-scripts' SD3 script does: output·(−σ) + noisy input against the target `x0`, weighted by the scheme
  (σ²-weighted velocity matching);
- the loss: `losses.elementwise_loss` (training.loss_type l2/l1/huber/smooth_l1; the Huber threshold's
  constant and exponential schedules over the 0–1000 timesteps; `snr` needs a DDPM schedule and is refused),
  `losses.reduce_loss` for the masked loss, the prior loss weight of regularization images and the
  weighting (a per-image factor, as sd-scripts' [B,1,1,1] weight is).

Randomness: one seeded generator (the run's noise generator), in a fixed order — the noise, the σ draw(s),
then input perturbation (ip_noise_gamma: strength, then its noise) only when on — so a seeded run is
reproducible and a resumed one continues the same stream. sd-scripts' Flux/SD3 scripts draw plain Gaussian
noise: noise offset, pyramid noise and the DDPM timestep weights (min-SNR, debiased…) do not apply to flow
models and are reported as ignored (`check`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache
from typing import Any

import torch

from nyx_tui.config.fields import Family
from nyx_tui.config.model import (
    FlowSection,
    HuberSchedule,
    ModelPredictionType,
    TimestepSampling,
    TrainingSection,
    WeightingScheme,
)
from nyx_tui.trainers.native import losses
from nyx_tui.trainers.native.flow_models import FlowConditioning, FlowModel, predict

NUM_TIMESTEPS = 1000  # Flux's and SD3's schedules: σ·1000 is the transformer's timestep


def check(tr: TrainingSection, flow: FlowSection) -> list[tuple[str, str]]:
    """Once, before training: (level, message) notes about options that do not apply to flow matching; raises
    ValueError for a combination that cannot train."""
    if tr.loss_type.value in ("huber", "smooth_l1") and tr.huber_schedule is HuberSchedule.SNR:
        raise ValueError(
            "training.huber_schedule = 'snr' needs a DDPM noise schedule; flow-matching models have none: "
            "use 'constant' or 'exponential'"
        )
    ignored = [
        name
        for name, on in (
            ("noise_offset", tr.noise_offset),
            ("multires_noise_iterations", tr.multires_noise_iterations),
            ("min_snr_gamma", tr.min_snr_gamma),
            ("debiased_estimation_loss", tr.debiased_estimation_loss),
            ("v_pred_like_loss", tr.v_pred_like_loss),
            ("zero_terminal_snr", tr.zero_terminal_snr),
        )
        if on
    ]
    if ignored:
        names = ", ".join(f"training.{n}" for n in ignored)
        return [("warning", f"{names}: DDPM options, ignored for flow-matching models (as sd-scripts does)")]
    return []


# --------------------------------------------------------------------------------------------- sigmas


@cache
def _shifted_schedule(shift: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The timesteps and sigmas of a FlowMatchEulerDiscreteScheduler(1000, shift) (sd-scripts' Flux one)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched: Any = FlowMatchEulerDiscreteScheduler(num_train_timesteps=NUM_TIMESTEPS, shift=shift)
    return sched.timesteps.float().clone(), sched.sigmas[:-1].float().clone()


def calculate_shift(
    seq_len: int, base_len: int = 256, max_len: int = 4096, base: float = 0.5, top: float = 1.15
) -> float:
    """Flux's mu for a packed sequence of `seq_len` tokens (diffusers' `calculate_shift`, sd-scripts'
    `get_lin_function`: linear from 0.5 at 256 tokens to 1.15 at 4096)."""
    slope = (top - base) / (max_len - base_len)
    return seq_len * slope + base - slope * base_len


def density(flow: FlowSection, n: int, gen: torch.Generator) -> torch.Tensor:
    """u in [0, 1] per image from diffusers' `compute_density_for_timestep_sampling` (the weighting scheme's
    timestep density: logit-normal, mode, or uniform), drawn from `gen`."""
    from diffusers.training_utils import compute_density_for_timestep_sampling

    return compute_density_for_timestep_sampling(
        weighting_scheme=flow.weighting_scheme.value,
        batch_size=n,
        logit_mean=flow.logit_mean,
        logit_std=flow.logit_std,
        mode_scale=flow.mode_scale,
        generator=gen,
    ).float()


def sample_sigmas(
    family: Family,
    flow: FlowSection,
    tr: TrainingSection,
    n: int,
    latent_hw: tuple[int, int],
    gen: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(σ, timesteps) per image, float32 on the CPU: the module docstring's `flow.timestep_sampling` modes.
    `latent_hw`: the (unpacked) latent's height and width, for flux_shift."""
    mode = flow.timestep_sampling
    if mode in (
        TimestepSampling.UNIFORM,
        TimestepSampling.SIGMOID,
        TimestepSampling.SHIFT,
        TimestepSampling.FLUX_SHIFT,
    ):
        if mode is TimestepSampling.UNIFORM:
            sigmas = torch.rand(n, generator=gen)
        else:
            sigmas = torch.sigmoid(flow.sigmoid_scale * torch.randn(n, generator=gen))
        if mode is TimestepSampling.SHIFT:
            k = flow.discrete_flow_shift
            sigmas = sigmas * k / (1 + (k - 1) * sigmas)
        elif mode is TimestepSampling.FLUX_SHIFT:
            h, w = latent_hw
            mu = calculate_shift((h // 2) * (w // 2))
            sigmas = math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))
        return sigmas, sigmas * NUM_TIMESTEPS
    u = density(flow, n, gen)
    if family == Family.SD3:
        k = flow.training_shift
        u = u * k / (1 + (k - 1) * u)
        low, high = tr.min_timestep, min(tr.max_timestep, NUM_TIMESTEPS)
        timesteps = (u * (high - low) + low).long().float()
        return timesteps / NUM_TIMESTEPS, timesteps
    schedule_t, schedule_s = _shifted_schedule(float(flow.discrete_flow_shift))
    indices = (u * NUM_TIMESTEPS).long().clamp(0, NUM_TIMESTEPS - 1)  # the mode density reaches u = 1
    return schedule_s[indices], schedule_t[indices]


def loss_weighting(scheme: WeightingScheme, sigmas: torch.Tensor) -> torch.Tensor:
    """diffusers' `compute_loss_weighting_for_sd3` per image: sigma_sqrt σ⁻², cosmap 2/(π(1−2σ+2σ²)), else 1."""
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    return compute_loss_weighting_for_sd3(scheme.value, sigmas).float()


# ----------------------------------------------------------------------------------------------- loss


@dataclass
class FlowStep:
    """What one batch's loss was computed from (tests and the validation look at it)."""

    sigmas: torch.Tensor
    timesteps: torch.Tensor
    noisy: torch.Tensor
    target: torch.Tensor
    weighting: torch.Tensor | None


def noisy_input(
    latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor, extra: torch.Tensor | None
) -> torch.Tensor:
    """(1 − σ)·x0 + σ·(noise + input perturbation), in float32 (cast by the caller)."""
    s = sigmas.view(-1, *([1] * (latents.dim() - 1)))
    noised_with = noise if extra is None else noise + extra
    return (1.0 - s) * latents.float() + s * noised_with.float()


def apply_prediction_type(
    family: Family,
    flow: FlowSection,
    output: torch.Tensor,
    noisy: torch.Tensor,
    sigmas: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The prediction compared with the target, and the per-image loss weighting (None: none), as sd-scripts
    (see the module docstring)."""
    s = sigmas.view(-1, *([1] * (output.dim() - 1))).to(output.dtype)
    if family == Family.SD3 or flow.model_prediction_type is ModelPredictionType.SIGMA_SCALED:
        return output * (-s) + noisy, loss_weighting(flow.weighting_scheme, sigmas)
    if flow.model_prediction_type is ModelPredictionType.ADDITIVE:
        return output + noisy, None
    return output, None


def training_loss(
    model: FlowModel,
    transformer: Any,
    latents: torch.Tensor,
    cond: FlowConditioning,
    batch: dict[str, Any],
    gen: torch.Generator,
    tr: TrainingSection,
    flow: FlowSection,
    device: torch.device,
    dtype: torch.dtype,
    trace: list[FlowStep] | None = None,
) -> torch.Tensor:
    """The flow-matching loss of one batch: noise and σ from `gen`, predict, the configured loss to the
    target, weighted and reduced (`trace`, when given, gets what it was computed from)."""
    n = latents.shape[0]
    noise = torch.randn(latents.shape, generator=gen).to(device)
    sigmas, timesteps = sample_sigmas(model.family, flow, tr, n, (latents.shape[-2], latents.shape[-1]), gen)
    extra = losses.input_perturbation(latents.shape, gen, tr)
    sigmas, timesteps = sigmas.to(device), timesteps.to(device)
    noisy = noisy_input(latents, noise, sigmas, None if extra is None else extra.to(device)).to(dtype)
    output = predict(model, transformer, noisy, timesteps, cond, flow, batch)
    pred, weighting = apply_prediction_type(model.family, flow, output.float(), noisy.float(), sigmas)
    target = latents.float() if model.family == Family.SD3 else noise - latents.float()
    c = losses.huber_threshold(tr, timesteps, model.noise_scheduler)
    loss = losses.elementwise_loss(pred, target, tr.loss_type, c)
    if trace is not None:
        trace.append(FlowStep(sigmas, timesteps, noisy, target, weighting))
    return losses.reduce_loss(loss, batch.get("masks"), batch.get("loss_weights"), weighting)
