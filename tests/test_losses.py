"""Noise and loss options (`training.*`, sd-scripts' names): each weighting against hand-computed values, the
noise draws (shape, statistics, order), the timestep range, zero terminal SNR, the pre-flight rules, and one
short real run of the engine with many options on."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

import nyx_tui.config
from nyx_tui.config.io import dumps_config
from nyx_tui.config.model import TrainingConfig, TrainingSection
from nyx_tui.jobs.events import read_events, validate
from nyx_tui.jobs.jobdir import create_job
from nyx_tui.trainers.native import losses, models
from nyx_tui.trainers.native.loss_check import _prediction_problems, loss_problems

T = 1000
PRESET = Path(nyx_tui.config.__file__).parent / "presets" / "demo-tiny-cpu.toml"


def sd_scheduler(**config: Any) -> Any:
    """SD1.5's training schedule."""
    return DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, **config)


def sd_snr_by_hand(t: int) -> float:
    """SNR of SD1.5's schedule at t, in float64 from the definition: ᾱ = Π(1 − β), β = linspace(√b0, √b1)²."""
    betas = np.linspace(math.sqrt(0.00085), math.sqrt(0.012), T, dtype=np.float64) ** 2
    alpha_bar = float(np.prod(1.0 - betas[: t + 1]))
    return alpha_bar / (1.0 - alpha_bar)


def section(**values: Any) -> TrainingSection:
    return TrainingSection.model_validate(values)


# ------------------------------------------------------------------------------------------ weights


def test_snr_matches_the_schedule_by_hand() -> None:
    sched = sd_scheduler()
    t = torch.tensor([0, 250, 500, 999])
    got = losses.snr(sched, t)
    for value, step in zip(got.tolist(), t.tolist(), strict=True):
        assert value == pytest.approx(sd_snr_by_hand(step), rel=1e-3)
    assert got[0].item() == pytest.approx(0.99915 / 0.00085, rel=1e-4)  # 1175.5: t=0 has β0 of noise


def test_min_snr_weights_for_epsilon_and_v_prediction() -> None:
    sched = sd_scheduler()
    t = torch.tensor([0, 500, 999])
    snr = [sd_snr_by_hand(i) for i in (0, 500, 999)]
    gamma = 5.0
    eps = losses.min_snr_weight(losses.snr(sched, t), gamma, v_pred=False).tolist()
    v = losses.min_snr_weight(losses.snr(sched, t), gamma, v_pred=True).tolist()
    for i, s in enumerate(snr):
        assert eps[i] == pytest.approx(min(s, gamma) / s, rel=1e-3)
        assert v[i] == pytest.approx(min(s, gamma) / (s + 1), rel=1e-3)
    assert eps[0] == pytest.approx(5 / 1175.47, rel=1e-3)  # capped: the low-noise end weighs little
    assert eps[2] == 1.0  # SNR < γ: noise prediction keeps full weight
    assert v[2] == pytest.approx(snr[2] / (snr[2] + 1), rel=1e-3)
    # at a zero-SNR timestep the noise-prediction weight takes its limit (1), not 0/0
    zero = losses.min_snr_weight(torch.tensor([0.0]), gamma, v_pred=False)
    assert zero.tolist() == [1.0]
    assert losses.min_snr_weight(torch.tensor([0.0]), gamma, v_pred=True).tolist() == [0.0]


def test_debiased_and_v_pred_scale_weights() -> None:
    sched = sd_scheduler()
    t = torch.tensor([0, 500, 999])
    s = losses.snr(sched, t)
    by_hand = [sd_snr_by_hand(i) for i in (0, 500, 999)]
    eps = losses.debiased_weight(s, v_pred=False).tolist()
    v = losses.debiased_weight(s, v_pred=True).tolist()
    scale = losses.v_pred_scale(s).tolist()
    assert eps[0] == pytest.approx(1 / math.sqrt(1000), rel=1e-4)  # SNR capped at 1000, as sd-scripts
    assert v[0] == pytest.approx(1 / 1001, rel=1e-4)
    assert scale[0] == pytest.approx(1000 / 1001, rel=1e-4)
    for i in (1, 2):
        assert eps[i] == pytest.approx(1 / math.sqrt(by_hand[i]), rel=1e-3)
        assert v[i] == pytest.approx(1 / (by_hand[i] + 1), rel=1e-3)
        assert scale[i] == pytest.approx(by_hand[i] / (by_hand[i] + 1), rel=1e-3)
    assert eps[2] == pytest.approx(14.6, abs=0.1)  # the noisiest timestep weighs most


def test_timestep_weights_multiply_the_options_that_are_on() -> None:
    sched = sd_scheduler()
    t = torch.tensor([10, 900])
    s = losses.snr(sched, t)
    assert losses.timestep_weights(section(), t, sched, v_pred=False) is None
    both = losses.timestep_weights(section(min_snr_gamma=5.0, debiased_estimation_loss=True), t, sched, False)
    assert both is not None
    expected = losses.min_snr_weight(s, 5.0, False) * losses.debiased_weight(s, False)
    assert torch.allclose(both, expected)
    like = losses.timestep_weights(section(v_pred_like_loss=0.5), t, sched, v_pred=False)
    assert like is not None  # sd-scripts: loss + loss / scale · 0.5
    assert torch.allclose(like, 1 + 0.5 / losses.v_pred_scale(s))


def test_huber_and_smooth_l1_limits() -> None:
    gen = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 4, 8, 8, generator=gen)
    d = pred - target
    assert torch.allclose(losses.elementwise_loss(pred, target, losses.LossType.L2), d**2)
    assert torch.allclose(losses.elementwise_loss(pred, target, losses.LossType.L1), d.abs())
    big, tiny = torch.full((2,), 1e3), torch.full((2,), 1e-4)
    huber = losses.LossType.HUBER
    # |d| ≪ c: Huber is L2; |d| ≫ c: it is 2c·L1; smooth L1 is Huber / c
    assert torch.allclose(losses.elementwise_loss(pred, target, huber, big), d**2, rtol=1e-3, atol=1e-5)
    assert torch.allclose(losses.elementwise_loss(pred, target, huber, tiny) / (2e-4), d.abs(), atol=1e-3)
    smooth = losses.elementwise_loss(pred, target, losses.LossType.SMOOTH_L1, tiny)
    assert torch.allclose(smooth, 2 * d.abs(), atol=1e-3)
    # c per item: item 0 L2-like, item 1 L1-like
    mixed = losses.elementwise_loss(pred, target, huber, torch.tensor([1e3, 1e-4]))
    assert torch.allclose(mixed[0], d[0] ** 2, rtol=1e-3, atol=1e-5)
    assert torch.allclose(mixed[1] / 2e-4, d[1].abs(), atol=1e-3)


def test_huber_threshold_schedules() -> None:
    sched = sd_scheduler()
    t = torch.tensor([0, 500, 1000 - 1])
    assert losses.huber_threshold(section(), t, sched) is None  # l2: no threshold
    const = losses.huber_threshold(section(loss_type="huber", huber_schedule="constant", huber_scale=2.0), t, sched)
    assert const is not None and const.tolist() == pytest.approx([0.2, 0.2, 0.2])
    exp = losses.huber_threshold(section(loss_type="huber", huber_schedule="exponential", huber_c=0.1), t, sched)
    assert exp is not None
    assert exp.tolist() == pytest.approx([1.0, 0.1**0.5, 0.1 ** (999 / 1000)], rel=1e-5)
    snr_c = losses.huber_threshold(section(loss_type="smooth_l1", huber_schedule="snr", huber_c=0.1), t, sched)
    assert snr_c is not None
    for value, step in zip(snr_c.tolist(), t.tolist(), strict=True):
        sigma = 1 / math.sqrt(sd_snr_by_hand(step))
        assert value == pytest.approx(0.9 / (1 + sigma) ** 2 + 0.1, rel=1e-3)
    ztsnr = sd_scheduler(rescale_betas_zero_snr=True)
    last = losses.huber_threshold(section(loss_type="huber", huber_c=0.1), torch.tensor([999]), ztsnr)
    assert last is not None and last.tolist() == pytest.approx([0.1])  # pure noise: c, not NaN


def test_reduce_applies_masks_then_item_weights() -> None:
    loss = torch.ones(2, 1, 2, 2)
    loss[1] *= 3.0
    masks = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]], [[[1.0, 1.0], [1.0, 1.0]]]])
    weights = torch.tensor([1.0, 0.5])
    # item 0: mean(1·mask) = 0.5; item 1: 3 · 0.5 = 1.5 → batch mean 1.0
    assert losses.reduce_loss(loss, masks, weights).item() == pytest.approx(1.0)
    # a mask at another resolution is resized by area: a 4×4 mask with the left half on → 0.5 everywhere
    big = torch.zeros(2, 1, 4, 4)
    big[..., :2] = 1.0
    assert losses.reduce_loss(torch.ones(2, 1, 2, 4), big).item() == pytest.approx(0.5)
    assert losses.reduce_loss(loss, timestep_weight=torch.tensor([2.0, 0.0])).item() == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------- noise


def test_multires_noise_shape_and_statistics() -> None:
    shape = (4, 4, 32, 32)
    white = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    noise = losses.pyramid_noise(white, torch.Generator().manual_seed(2), iterations=6, discount=0.8)
    assert noise.shape == white.shape and noise.dtype == torch.float32
    assert noise.std().item() == pytest.approx(1.0, abs=1e-5)  # scaled back to unit variance
    assert abs(noise.mean().item()) < 0.3

    def neighbour_correlation(x: torch.Tensor) -> float:
        return float((x[..., 1:] * x[..., :-1]).mean() / (x * x).mean())

    # coarse levels make neighbouring pixels alike; white noise has no such correlation
    assert abs(neighbour_correlation(white)) < 0.05
    assert neighbour_correlation(noise) > 0.2
    again = losses.pyramid_noise(white, torch.Generator().manual_seed(2), iterations=6, discount=0.8)
    assert torch.equal(noise, again)  # every draw comes from the generator passed
    other = losses.pyramid_noise(white, torch.Generator().manual_seed(3), iterations=6, discount=0.8)
    assert not torch.equal(noise, other)


def test_draws_come_in_a_fixed_order_from_the_generator() -> None:
    """Options off: the base noise, then the timesteps, nothing else (runs before these options existed draw
    the same). Noise offset: its offset right after the base noise."""
    latents = torch.zeros(2, 4, 8, 8)
    sched = sd_scheduler()
    gen = torch.Generator().manual_seed(7)
    noise = losses.draw_noise(latents, gen, section())
    t = losses.draw_timesteps(2, gen, section(), sched)
    ref = torch.Generator().manual_seed(7)
    assert torch.equal(noise, torch.randn(latents.shape, generator=ref))
    assert torch.equal(t, torch.randint(0, T, (2,), generator=ref))

    gen = torch.Generator().manual_seed(7)
    offset = losses.draw_noise(latents, gen, section(noise_offset=0.1))
    ref = torch.Generator().manual_seed(7)
    base = torch.randn(latents.shape, generator=ref)
    assert torch.allclose(offset, base + 0.1 * torch.randn((2, 4, 1, 1), generator=ref))


def test_adaptive_noise_scale_grows_the_offset_with_the_channel_mean() -> None:
    latents = torch.zeros(1, 4, 8, 8)
    latents[:, 0] = 2.0  # channel 0 far from zero, the others at zero
    tr = section(noise_offset=0.1, adaptive_noise_scale=0.5)
    noise = losses.draw_noise(latents, torch.Generator().manual_seed(3), tr)
    ref = torch.Generator().manual_seed(3)
    base = torch.randn(latents.shape, generator=ref)
    per_channel = torch.randn((1, 4, 1, 1), generator=ref)
    strength = torch.tensor([0.1 + 0.5 * 2.0, 0.1, 0.1, 0.1]).view(1, 4, 1, 1)
    assert torch.allclose(noise, base + strength * per_channel)


def test_timestep_range_is_respected_over_many_draws() -> None:
    sched = sd_scheduler()
    gen = torch.Generator().manual_seed(0)
    t = losses.draw_timesteps(20_000, gen, section(min_timestep=200, max_timestep=300), sched)
    assert int(t.min()) == 200 and int(t.max()) == 299  # max exclusive, both ends reached
    full = losses.draw_timesteps(20_000, gen, section(), sched)
    assert int(full.min()) == 0 and int(full.max()) == 999


class FakeUNet:
    """Records what it was called with and predicts zeros: the L2 loss is then the mean squared target."""

    def __init__(self) -> None:
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __call__(self, noisy: torch.Tensor, t: torch.Tensor, hidden: torch.Tensor) -> Any:
        self.calls.append((noisy, t))
        return type("Out", (), {"sample": torch.zeros_like(noisy)})()


def fake_model(sched: Any) -> models.SDModel:
    return models.SDModel(tokenizer=None, text_encoder=None, vae=None, unet=None, noise_scheduler=sched)


def test_input_perturbation_noises_the_input_but_not_the_target() -> None:
    sched = sd_scheduler()
    model, unet = fake_model(sched), FakeUNet()
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    cond = models.Conditioning(hidden=torch.zeros(2, 77, 32))
    tr = section(ip_noise_gamma=0.1)
    cpu = torch.device("cpu")
    loss = losses.training_loss(
        model, unet, latents, cond, {}, torch.Generator().manual_seed(9), tr, cpu, torch.float32
    )
    ref = torch.Generator().manual_seed(9)
    noise = torch.randn(latents.shape, generator=ref)
    t = torch.randint(0, T, (2,), generator=ref)
    extra = 0.1 * torch.randn(latents.shape, generator=ref)
    noisy, seen_t = unet.calls[0]
    assert torch.equal(seen_t, t)
    assert torch.allclose(noisy, sched.add_noise(latents, noise + extra, t))
    assert loss.item() == pytest.approx((noise**2).mean().item(), rel=1e-6)  # the target is the noise alone


def test_v_prediction_target_and_min_snr_in_the_loss() -> None:
    sched = sd_scheduler(prediction_type="v_prediction")
    model, unet = fake_model(sched), FakeUNet()
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    cond = models.Conditioning(hidden=torch.zeros(2, 77, 32))
    tr = section(min_snr_gamma=5.0)
    cpu = torch.device("cpu")
    loss = losses.training_loss(
        model, unet, latents, cond, {}, torch.Generator().manual_seed(4), tr, cpu, torch.float32
    )
    ref = torch.Generator().manual_seed(4)
    noise = torch.randn(latents.shape, generator=ref)
    t = torch.randint(0, T, (2,), generator=ref)
    velocity = sched.get_velocity(latents, noise, t)
    s = losses.snr(sched, t)
    expected = ((velocity**2).mean(dim=(1, 2, 3)) * torch.clamp(s, max=5.0) / (s + 1)).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


# --------------------------------------------------------------------------------- zero terminal SNR


def test_zero_terminal_snr_rescales_the_schedule_at_load() -> None:
    model = fake_model(sd_scheduler(prediction_type="v_prediction"))
    before = model.noise_scheduler.alphas_cumprod.clone()
    assert before[-1] > 0.004  # SD's last timestep keeps signal
    notes = losses.prepare_noise_schedule(model, section(zero_terminal_snr=True))
    after = model.noise_scheduler.alphas_cumprod
    assert [level for level, _ in notes] == ["info"]
    assert after[-1].item() == 0.0
    assert after[0].item() == pytest.approx(before[0].item(), rel=1e-5)  # the first step keeps its value
    assert bool((after[1:] < after[:-1]).all())  # still decreasing
    assert model.noise_scheduler.config.rescale_betas_zero_snr  # samplers built from the config follow
    assert losses.snr(model.noise_scheduler, torch.tensor([999])).item() == 0.0


def test_prepare_checks_what_needs_the_model() -> None:
    eps = fake_model(sd_scheduler())
    notes = losses.prepare_noise_schedule(eps, section(zero_terminal_snr=True))
    warnings = [message for level, message in notes if level == "warning"]
    assert len(warnings) == 1 and "v-prediction" in warnings[0]
    with pytest.raises(ValueError, match="scale_v_pred_loss_like_noise_pred"):
        losses.prepare_noise_schedule(fake_model(sd_scheduler()), section(scale_v_pred_loss_like_noise_pred=True))
    with pytest.raises(ValueError, match="v_pred_like_loss"):
        v = fake_model(sd_scheduler(prediction_type="v_prediction"))
        losses.prepare_noise_schedule(v, section(v_pred_like_loss=0.1))
    short = fake_model(sd_scheduler(num_train_timesteps=500))
    assert "past the model's 500" in losses.prepare_noise_schedule(short, section())[0][1]
    with pytest.raises(ValueError, match="min_timestep"):
        losses.prepare_noise_schedule(fake_model(sd_scheduler(num_train_timesteps=500)), section(min_timestep=600))


# ----------------------------------------------------------------------------------------- pre-flight


def problems_of(**training: Any) -> dict[str, str]:
    cfg = TrainingConfig.model_validate({"training": training})
    return {p.field: p.severity for p in loss_problems(cfg)}


def test_preflight_rules() -> None:
    assert problems_of() == {}
    assert problems_of(min_timestep=500, max_timestep=500) == {"training.min_timestep": "error"}
    assert problems_of(min_timestep=100, max_timestep=900) == {}
    assert problems_of(adaptive_noise_scale=0.01) == {"training.adaptive_noise_scale": "error"}
    assert problems_of(adaptive_noise_scale=0.01, noise_offset=0.05) == {}
    assert problems_of(huber_c=0.2) == {"training.huber_c": "warning"}
    assert problems_of(huber_schedule="constant", loss_type="l1") == {"training.huber_schedule": "warning"}
    assert problems_of(huber_c=0.2, loss_type="huber") == {}
    assert problems_of(multires_noise_discount=0.5) == {"training.multires_noise_discount": "warning"}
    assert problems_of(ip_noise_gamma_random_strength=True) == {"training.ip_noise_gamma_random_strength": "warning"}
    assert problems_of(noise_offset_random_strength=True) == {"training.noise_offset_random_strength": "warning"}


def test_preflight_prediction_type_rules() -> None:
    def fields(prediction: str | None, **training: Any) -> dict[str, str]:
        cfg = TrainingConfig.model_validate({"training": training})
        return {p.field: p.severity for p in _prediction_problems(cfg, prediction)}

    assert fields("epsilon", zero_terminal_snr=True) == {"training.zero_terminal_snr": "warning"}  # as sd-scripts
    assert fields("v_prediction", zero_terminal_snr=True) == {}
    assert fields(None, zero_terminal_snr=True) == {}  # unknown: the engine checks after loading
    assert fields("epsilon", scale_v_pred_loss_like_noise_pred=True) == {
        "training.scale_v_pred_loss_like_noise_pred": "error"
    }
    assert fields("v_prediction", v_pred_like_loss=0.1) == {"training.v_pred_like_loss": "error"}


def test_preflight_reads_the_prediction_type_from_the_model(assets: dict[str, Path]) -> None:
    cfg = TrainingConfig.model_validate(
        {"model": {"pretrained": str(assets["model"])}, "training": {"zero_terminal_snr": True}}
    )
    assert [p.field for p in loss_problems(cfg)] == ["training.zero_terminal_snr"]  # the demo model is epsilon
    cfg = TrainingConfig.model_validate(
        {"model": {"pretrained": str(assets["vpred"])}, "training": {"zero_terminal_snr": True}}
    )
    assert loss_problems(cfg) == []


# ----------------------------------------------------------------------------------------- the engine


def make_config(model: Path, dataset: Path, **sections: dict[str, Any]) -> TrainingConfig:
    """The demo preset on the given model and dataset, with `sections` merged over it."""
    data = tomllib.loads(PRESET.read_text())
    data["model"]["pretrained"] = str(model)
    data["dataset"]["subsets"] = [{"image_dir": str(dataset)}]
    data["scheduler"] = {"type": "constant", "warmup_steps": 0}
    data["saving"].update(every_n_steps=0, precision="float")
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return TrainingConfig.model_validate(data)


@pytest.fixture(scope="module")
def assets(assets: dict[str, Path]) -> dict[str, Path]:  # conftest's, plus a v-prediction model
    """The demo assets plus a v-prediction copy of the model (its scheduler config says so; the weights are
    the same random ones)."""
    ws, model = assets["ws"], assets["model"]
    vpred = ws / "model-vpred"
    shutil.copytree(model, vpred)
    config_path = vpred / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "prediction_type": "v_prediction"}))
    return {**assets, "vpred": vpred}


@pytest.mark.slow
def test_engine_trains_with_many_noise_and_loss_options(assets: dict[str, Path], tmp_path: Path) -> None:
    """A v-prediction model with zero terminal SNR, min-SNR, v-pred scaling, debiased weights, Huber loss on
    the snr schedule, offset + adaptive + multires noise, input perturbation and a timestep range: it runs,
    logs no warning about these options, every loss is finite, and the LoRA moves."""
    training = {
        "max_steps": 12,
        "zero_terminal_snr": True,
        "min_snr_gamma": 5.0,
        "scale_v_pred_loss_like_noise_pred": True,
        "debiased_estimation_loss": True,
        "loss_type": "huber",
        "huber_schedule": "snr",
        "huber_c": 0.1,
        "noise_offset": 0.05,
        "adaptive_noise_scale": 0.01,
        "noise_offset_random_strength": True,
        "multires_noise_iterations": 4,
        "multires_noise_discount": 0.3,
        "ip_noise_gamma": 0.1,
        "ip_noise_gamma_random_strength": True,
        "min_timestep": 100,
        "max_timestep": 1000,
    }
    cfg = make_config(assets["vpred"], assets["dataset"], training=training)
    assert loss_problems(cfg) == []
    job = create_job("train", "t", ["native"], config_toml=dumps_config(cfg), root=tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "nyx_tui.trainers.native", str(job.path)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    events = read_events(job.events_path)
    for event in events:
        validate(event)
    warnings = [e["message"] for e in events if e["kind"] == "log" and e["level"] in ("warning", "error")]
    assert not [w for w in warnings if "training." in w], warnings
    logs = [e["message"] for e in events if e["kind"] == "log"]
    assert any("alpha_bar at the last step 0.0" in m for m in logs), logs  # zero terminal SNR in effect
    values = [e["loss"] for e in events if e["kind"] == "step"]
    assert len(values) == 12 and all(math.isfinite(v) and v > 0 for v in values)
    (lora,) = [e["path"] for e in events if e["kind"] == "artifact" and e["what"] == "lora"]
    from safetensors.torch import load_file

    ups = [v for k, v in load_file(lora).items() if k.endswith("lora_up.weight")]
    assert ups and any(float(u.abs().max()) > 0 for u in ups)  # up starts at zero: it trained
    from nyx_tui.trainers.native.lora_io import read_metadata

    meta = read_metadata(Path(lora))  # recorded under sd-scripts' keys
    assert {k: meta.get(k) for k in ("ss_min_snr_gamma", "ss_zero_terminal_snr", "ss_loss_type", "ss_huber_c")} == {
        "ss_min_snr_gamma": "5.0",
        "ss_zero_terminal_snr": "True",
        "ss_loss_type": "huber",
        "ss_huber_c": "0.1",
    }
