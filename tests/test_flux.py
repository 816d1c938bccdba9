"""Flux.1 in the native engine on tiny random-weight models (dev-style with the guidance embedding, schnell-style
without): `nyx train` trains and saves a LoRA; the loop is reproducible and resumes exactly; the text
encoding and the transformer call follow diffusers' FluxPipeline; the T5 mask reaches the attention; cached
text-encoder outputs (memory and disk) train the same; the memory modes (quantized base, block swap,
CPU-offloaded checkpointing) run through the engine. The flow-matching loss options themselves are tested
without a model (`test_flow_losses_*`, shared with SD3 in this file).

Most runs call `engine.train` in the test process (the imports are paid once: a subprocess costs ~12 s of
imports before its first step); one goes through the real `nyx train` command. T5 is cut to 16 tokens:
Flux dev's 512 make a tiny step 20x slower and test nothing more.
"""

from __future__ import annotations

import math
import tomllib
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import tomli_w
from conftest import run_nyx

from nyx_tui.config.io import dumps_config
from nyx_tui.config.model import FlowSection, ModelPredictionType, TimestepSampling, TrainingConfig, WeightingScheme
from nyx_tui.jobs.events import EventWriter, read_events
from nyx_tui.jobs.jobdir import JobDir, create_job

torch = pytest.importorskip("torch")

CPU = torch.device("cpu")
T5_TOKENS = 16


# ----------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny Flux dev and schnell models and a small shapes dataset, built once for the module."""
    from nyx_tui.demo_assets import build_tiny_flux, make_shapes_dataset

    root = tmp_path_factory.mktemp("flux")
    return {
        "dev": build_tiny_flux(root / "dev"),
        "schnell": build_tiny_flux(root / "schnell", schnell=True),
        "dataset": make_shapes_dataset(root / "dataset", n=6),
        "root": root,
    }


def flux_config(tiny: dict[str, Path], variant: str = "dev", **sections: dict[str, Any]) -> TrainingConfig:
    data: dict[str, Any] = {
        "model": {"family": "flux", "pretrained": str(tiny[variant])},
        "dataset": {"resolution": 64, "subsets": [{"image_dir": str(tiny["dataset"])}]},
        "network": {"dim": 4, "alpha": 2.0},
        "optimizer": {"learning_rate": 5e-3},
        "scheduler": {"type": "constant", "warmup_steps": 0},
        "training": {"max_steps": 3, "batch_size": 2, "seed": 5},
        "saving": {"output_name": "flux"},
        "flow": {"t5_max_token_length": T5_TOKENS},
    }
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return TrainingConfig.model_validate(data)


def train(cfg: TrainingConfig, root: Path) -> JobDir:
    """One run of the engine in this process (the worker's `train`, events to the job's log)."""
    from nyx_tui.trainers.native import engine

    job = create_job("train", "flux", ["native"], config_toml=dumps_config(cfg), root=root)
    with EventWriter(job.events_path) as events:
        assert engine.train(job, cfg, events) == 0
    return job


def losses(job: JobDir) -> list[float]:
    return [e["loss"] for e in read_events(job.events_path) if e["kind"] == "step"]


def logs(job: JobDir) -> str:
    return " | ".join(e["message"] for e in read_events(job.events_path) if e["kind"] == "log")


def lora_keys(path: Path) -> tuple[list[str], dict[str, str]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return list(f.keys()), dict(f.metadata() or {})


@pytest.fixture(scope="module")
def dev_run(tiny: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A dev-style run of 6 steps with a state saved at step 3 (for the resume and reproducibility tests)."""
    cfg = flux_config(tiny, training={"max_steps": 6}, saving={"every_n_steps": 3})
    return {"cfg": cfg, "job": train(cfg, tmp_path_factory.mktemp("dev-a"))}


# ------------------------------------------------------------------------------------ end to end


@pytest.mark.slow
def test_nyx_train_trains_dev_flux_and_saves_a_lora(tiny: dict[str, Path], tmp_path: Path) -> None:
    """The real command: a config file, `nyx train`, a finished job with a LoRA file in sd-scripts' Flux names."""
    home = tmp_path / "home"
    config = tmp_path / "flux.toml"
    config.write_text(tomli_w.dumps(tomllib.loads(dumps_config(flux_config(tiny, training={"max_steps": 2})))))
    proc = run_nyx("train", str(config), home=home, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (job_dir,) = list((home / "jobs").iterdir())
    job = JobDir(job_dir)
    steps = losses(job)
    assert len(steps) == 2 and all(math.isfinite(v) for v in steps)
    (artifact,) = [e for e in read_events(job.events_path) if e["kind"] == "artifact" and e.get("what") == "lora"]
    keys, meta = lora_keys(Path(artifact["path"]))
    assert keys and all(k.startswith("lora_unet_") for k in keys)
    assert "flux dev model (guidance-distilled)" in logs(job)
    assert meta.get("ss_base_model_version", "").startswith("flux")


@pytest.mark.slow
def test_schnell_trains_and_saves(tiny: dict[str, Path], tmp_path: Path) -> None:
    job = train(flux_config(tiny, "schnell", training={"max_steps": 2}), tmp_path)
    assert len(losses(job)) == 2 and all(math.isfinite(v) for v in losses(job))
    assert (job.output_dir / "flux.safetensors").is_file()
    assert "flux schnell model from" in logs(job) and "guidance-distilled" not in logs(job)


@pytest.mark.slow
def test_same_seed_same_losses(dev_run: dict[str, Any], tmp_path: Path) -> None:
    again = train(dev_run["cfg"], tmp_path)
    first = losses(dev_run["job"])
    assert len(first) == 6 and all(math.isfinite(v) for v in first)
    assert losses(again) == first
    assert len(set(first)) > 1  # the steps differ (noise, sigmas, batches)


@pytest.mark.slow
def test_resume_continues_exactly(dev_run: dict[str, Any], tiny: dict[str, Path], tmp_path: Path) -> None:
    state = dev_run["job"].output_dir / "flux-step000003-state"
    assert state.is_dir()
    cfg = flux_config(tiny, training={"max_steps": 6, "resume": str(state)}, saving={"every_n_steps": 3})
    resumed = train(cfg, tmp_path)
    assert losses(resumed) == losses(dev_run["job"])[3:]
    from safetensors.torch import load_file

    a = load_file(dev_run["job"].output_dir / "flux.safetensors")
    b = load_file(resumed.output_dir / "flux.safetensors")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("to_disk", [False, True], ids=["memory", "disk"])
def test_cached_text_encoder_outputs_train_the_same(
    dev_run: dict[str, Any], tiny: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, to_disk: bool
) -> None:
    """Cached outputs (with the T5 mask, so the cache carries it too) give the losses of encoding every step;
    a second run with the disk cache reads every caption back instead of encoding it."""
    monkeypatch.setenv("NYX_HOME", str(tmp_path / "home"))
    flow = {"apply_t5_attn_mask": True}
    plain = train(flux_config(tiny, training={"max_steps": 3}, flow=flow), tmp_path / "plain")
    cache = {"cache_text_encoder_outputs": True, "cache_text_encoder_outputs_to_disk": to_disk, "max_steps": 3}
    cached = train(flux_config(tiny, training=cache, flow=flow), tmp_path / "cached")
    assert losses(cached) == pytest.approx(losses(plain), rel=1e-5, abs=1e-6)
    assert "text encoders unloaded" in logs(cached) or "encoders are on the CPU" in logs(cached)
    if to_disk:
        files = list((tmp_path / "home").rglob("text/*/*.safetensors"))
        assert len(files) == 6  # one per caption
        again = train(flux_config(tiny, training=cache, flow=flow), tmp_path / "again")
        assert losses(again) == losses(cached)
        (note,) = [
            e
            for e in read_events(again.events_path)
            if e["kind"] == "log" and "text-encoder outputs cached for" in e["message"]
        ]
        assert note["reused"] == 6 and note["encoded"] == 0


# ------------------------------------------------------------------------------------ memory modes


@pytest.mark.slow
@pytest.mark.parametrize(
    "sections",
    [
        {"training": {"base_quantization": "fp8"}},
        {"training": {"base_quantization": "int8"}, "flow": {"t5_max_token_length": T5_TOKENS, "t5_on_cpu": True}},
        {"flow": {"t5_max_token_length": T5_TOKENS, "blocks_to_swap": 2}},
        {"training": {"gradient_checkpointing": True, "cpu_offload_checkpointing": True}},
        {
            "training": {"base_quantization": "nf4", "gradient_checkpointing": True},
            "flow": {"t5_max_token_length": T5_TOKENS, "blocks_to_swap": 2},
        },
    ],
    ids=["fp8", "int8-t5-on-cpu", "block-swap", "cpu-offload-checkpointing", "nf4-swap-checkpointing"],
)
def test_memory_modes_train(
    dev_run: dict[str, Any], tiny: dict[str, Path], tmp_path: Path, sections: dict[str, dict[str, Any]]
) -> None:
    """Each memory mode trains a few steps. Block swapping and checkpointing move or recompute the same
    numbers: their losses are the plain run's exactly; a quantized base is close to it (fp8 rounds)."""
    merged = {k: {**v} for k, v in sections.items()}
    merged.setdefault("training", {})["max_steps"] = 3
    merged["saving"] = {"every_n_steps": 3}
    job = train(flux_config(tiny, **merged), tmp_path)
    got, plain = losses(job), losses(dev_run["job"])[:3]
    assert len(got) == 3 and all(math.isfinite(v) for v in got)
    assert (job.output_dir / "flux.safetensors").is_file()
    quantized = sections.get("training", {}).get("base_quantization")
    if quantized:
        assert f"stored as {quantized}" in logs(job)
        assert got == pytest.approx(plain, rel=0.1)
    else:
        assert got == plain
    if "blocks_to_swap" in sections.get("flow", {}):
        assert "block swap: 3 of 4 transformer blocks" in logs(job)  # sd-scripts' split: 1 double + 2 single


# ------------------------------------------------------------------------------------ text and transformer


@pytest.fixture(scope="module")
def loaded(tiny: dict[str, Path]) -> dict[str, Any]:
    from nyx_tui.config.model import ModelSection
    from nyx_tui.trainers.native import flow_files, flow_models

    out = {}
    for variant in ("dev", "schnell"):
        model = flow_files.load_flow_model(ModelSection(family="flux", pretrained=str(tiny[variant])), T5_TOKENS)
        flow_models.freeze(model)
        out[variant] = model
    return out


def test_default_t5_length_follows_the_variant(tiny: dict[str, Path]) -> None:
    from nyx_tui.config.model import ModelSection
    from nyx_tui.trainers.native import flow_files

    for variant, tokens in (("dev", 512), ("schnell", 256)):
        model = flow_files.load_flow_model(ModelSection(family="flux", pretrained=str(tiny[variant])), None)
        assert model.variant == variant and model.t5_max_token_length == tokens


def test_text_encoding_matches_the_flux_pipeline(loaded: dict[str, Any], tiny: dict[str, Path]) -> None:
    from diffusers import FluxPipeline

    from nyx_tui.trainers.native import flow_models

    model = loaded["dev"]
    pipe: Any = FluxPipeline.from_pretrained(tiny["dev"])
    captions = ["a red circle", "blue square, white background"]
    with torch.no_grad():
        ours = flow_models.encode_text(model, captions, CPU, FlowSection())
        hidden, pooled, text_ids = pipe.encode_prompt(captions, None, device=CPU, max_sequence_length=T5_TOKENS)
    assert ours.hidden.shape == (2, T5_TOKENS, 32) and ours.mask is None
    assert torch.allclose(ours.hidden, hidden, atol=1e-6) and torch.allclose(ours.pooled, pooled, atol=1e-6)
    assert not text_ids.any()


def test_packing_and_ids_match_the_pipeline() -> None:
    from diffusers import FluxPipeline

    from nyx_tui.trainers.native import flow_models

    x = torch.randn(2, 16, 8, 6)
    packed = flow_models.pack_latents(x)
    assert packed.equal(FluxPipeline._pack_latents(x, 2, 16, 8, 6))
    assert flow_models.unpack_latents(packed, 8, 6).equal(x)
    ids = FluxPipeline._prepare_latent_image_ids(2, 4, 3, CPU, torch.float32)
    assert flow_models.image_ids(8, 6, CPU, torch.float32).equal(ids)


def _recorded_call(model: Any, flow: FlowSection, mask: bool = False) -> dict[str, Any]:
    from nyx_tui.trainers.native import flow_models

    seen: dict[str, Any] = {}

    def hook(module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        seen.update(kwargs)

    handle = model.transformer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            cond = flow_models.encode_text(model, ["a red circle"], CPU, FlowSection(apply_t5_attn_mask=mask))
            out = flow_models.predict(
                model, model.transformer, torch.randn(1, 16, 8, 8), torch.tensor([250.0]), cond, flow
            )
    finally:
        handle.remove()
    seen["out"] = out
    return seen


def test_guidance_reaches_dev_and_not_schnell(loaded: dict[str, Any]) -> None:
    """dev's transformer gets flow.guidance_scale for every image; schnell's gets none (it has no guidance
    embedding). The timestep goes in as sigma (t/1000), as FluxPipeline passes it."""
    flow = FlowSection(guidance_scale=2.5)
    dev = _recorded_call(loaded["dev"], flow)
    assert dev["guidance"].tolist() == [2.5]
    assert dev["timestep"].tolist() == [0.25]
    assert dev["out"].shape == (1, 16, 8, 8)
    schnell = _recorded_call(loaded["schnell"], flow)
    assert schnell["guidance"] is None and schnell["timestep"].tolist() == [0.25]
    # and the value matters: another guidance gives another output on dev
    assert not torch.equal(_recorded_call(loaded["dev"], FlowSection(guidance_scale=4.0))["out"], dev["out"])


def test_t5_attention_mask_reaches_the_transformer(loaded: dict[str, Any]) -> None:
    """With apply_t5_attn_mask the padding tokens are masked in the joint attention: what sits at a padding
    position no longer changes the output (without the mask it does)."""
    from nyx_tui.trainers.native import flow_models

    model = loaded["schnell"]
    flow = FlowSection(apply_t5_attn_mask=True)
    with torch.no_grad():
        cond = flow_models.encode_text(model, ["a red circle"], CPU, flow)
        n = int(cond.mask.sum())
        assert 0 < n < T5_TOKENS and not cond.hidden[0, n:].any()  # padding states are zeroed too
        noisy = cond.hidden.clone()
        noisy[:, n:] = torch.randn_like(noisy[:, n:])
        x, t = torch.randn(1, 16, 8, 8), torch.tensor([500.0])
        base = flow_models.predict(model, model.transformer, x, t, cond, flow)
        masked = flow_models.predict(
            model, model.transformer, x, t, flow_models.FlowConditioning(noisy, cond.pooled, cond.mask), flow
        )
        unmasked = flow_models.predict(
            model, model.transformer, x, t, flow_models.FlowConditioning(noisy, cond.pooled), flow
        )
    assert torch.allclose(base, masked, atol=1e-6)
    assert not torch.allclose(base, unmasked, atol=1e-4)
    call = _recorded_call(model, flow, mask=True)
    assert call["joint_attention_kwargs"]["attention_mask"].shape == (1, 1, 1, T5_TOKENS + 16)


# ------------------------------------------------------------------------------------ flow-matching loss


class _Zero(torch.nn.Module):
    """A stand-in transformer: output zeros in the input's layout; records its timesteps."""

    def __init__(self) -> None:
        super().__init__()
        self.config = SimpleNamespace(guidance_embeds=False)
        self.timesteps: list[Any] = []

    def forward(self, hidden_states: Any, timestep: Any, **_: Any) -> tuple[Any]:
        self.timesteps.append(timestep)
        return (torch.zeros_like(hidden_states),)


def _fake_model(family: str) -> Any:
    from nyx_tui.config.fields import Family
    from nyx_tui.trainers.native.flow_models import FlowModel

    scheduler = SimpleNamespace(config=SimpleNamespace(num_train_timesteps=1000))
    return FlowModel(Family(family), _Zero(), None, scheduler, None, None, None, None)


def _loss(family: str, flow: FlowSection, seed: int = 0, **training: Any) -> tuple[Any, Any]:
    from nyx_tui.config.model import TrainingSection
    from nyx_tui.trainers.native import flow_losses
    from nyx_tui.trainers.native.flow_models import FlowConditioning

    model = _fake_model(family)
    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn(4, 16, 8, 8, generator=torch.Generator().manual_seed(99))
    cond = FlowConditioning(torch.zeros(4, 5, 8), torch.zeros(4, 8))
    trace: list[Any] = []
    loss = flow_losses.training_loss(
        model, model.transformer, latents, cond, {}, gen, TrainingSection(**training), flow, CPU, torch.float32, trace
    )
    return loss, trace[0]


@pytest.mark.parametrize("family", ["flux", "sd3"])
@pytest.mark.parametrize("sampling", list(TimestepSampling))
def test_flow_losses_every_timestep_sampling(family: str, sampling: TimestepSampling) -> None:
    flow = FlowSection(timestep_sampling=sampling, model_prediction_type="raw")
    loss, step = _loss(family, flow)
    assert math.isfinite(float(loss))
    assert ((step.sigmas >= 0) & (step.sigmas <= 1)).all()
    assert torch.allclose(step.timesteps, step.sigmas * 1000, atol=1e-3)
    again, _ = _loss(family, flow)
    assert float(again) == float(loss)  # the seeded generator decides everything
    assert float(_loss(family, flow, seed=1)[0]) != float(loss)


def test_flow_losses_sigma_formulas() -> None:
    from nyx_tui.config.model import TrainingSection
    from nyx_tui.trainers.native import flow_losses

    tr = TrainingSection()
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    base = torch.sigmoid(torch.randn(64, generator=gen()))
    shifted, _ = flow_losses.sample_sigmas(
        flow_losses.Family.FLUX, FlowSection(timestep_sampling="shift", discrete_flow_shift=3.0), tr, 64, (8, 8), gen()
    )
    assert torch.allclose(shifted, base * 3 / (1 + 2 * base))
    small, _ = flow_losses.sample_sigmas(
        flow_losses.Family.FLUX, FlowSection(timestep_sampling="flux_shift"), tr, 64, (8, 8), gen()
    )
    large, _ = flow_losses.sample_sigmas(
        flow_losses.Family.FLUX, FlowSection(timestep_sampling="flux_shift"), tr, 64, (128, 128), gen()
    )
    assert (large > small).all()  # bigger images: more noise, as Flux's inference schedule
    mu = flow_losses.calculate_shift(16)
    assert torch.allclose(small, math.exp(mu) / (math.exp(mu) + 1 / base - 1))
    # SD3's sigma mode: training_shift bends u toward the noisy side, timesteps are whole numbers
    plain, t_plain = flow_losses.sample_sigmas(flow_losses.Family.SD3, FlowSection(), tr, 64, (8, 8), gen())
    bent, _ = flow_losses.sample_sigmas(flow_losses.Family.SD3, FlowSection(training_shift=3.0), tr, 64, (8, 8), gen())
    assert (bent >= plain).all() and t_plain.equal(t_plain.floor())
    # Flux's sigma mode: the sigmas of a scheduler shifted by discrete_flow_shift
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched: Any = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    sig, ts = flow_losses.sample_sigmas(
        flow_losses.Family.FLUX, FlowSection(discrete_flow_shift=3.0), tr, 64, (8, 8), gen()
    )
    allowed = set(sched.sigmas[:-1].tolist())
    assert all(s in allowed for s in sig.tolist()) and torch.allclose(ts, sig * 1000, atol=1e-2)


@pytest.mark.parametrize("kind", list(ModelPredictionType))
def test_flow_losses_model_prediction_types(kind: ModelPredictionType) -> None:
    """With a zero output: raw predicts 0, additive the noisy input, sigma_scaled the noisy input too (0·(−σ) + x_t),
    against the target noise − x0 (sd-scripts' definitions)."""
    loss, step = _loss("flux", FlowSection(model_prediction_type=kind, weighting_scheme="none"))
    pred = torch.zeros_like(step.target) if kind is ModelPredictionType.RAW else step.noisy
    assert float(loss) == pytest.approx(float(((pred - step.target) ** 2).mean()), rel=1e-5)
    assert (step.weighting is None) == (kind is not ModelPredictionType.SIGMA_SCALED)


@pytest.mark.parametrize("scheme", list(WeightingScheme))
@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_flow_losses_weighting_schemes(scheme: WeightingScheme, family: str) -> None:
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    flow = FlowSection(weighting_scheme=scheme, model_prediction_type="sigma_scaled")
    loss, step = _loss(family, flow)
    assert math.isfinite(float(loss))
    assert torch.allclose(step.weighting, compute_loss_weighting_for_sd3(scheme.value, step.sigmas).float())
    per_item = ((step.noisy - step.target) ** 2).mean(dim=(1, 2, 3)) * step.weighting
    assert float(loss) == pytest.approx(float(per_item.mean()), rel=1e-5)
    if family == "sd3":
        assert step.target.equal(torch.randn(4, 16, 8, 8, generator=torch.Generator().manual_seed(99)))  # x0


def test_flow_losses_loss_types_masks_and_prior_weights() -> None:
    from nyx_tui.config.model import TrainingSection
    from nyx_tui.trainers.native import flow_losses
    from nyx_tui.trainers.native.flow_models import FlowConditioning

    model = _fake_model("flux")
    cond = FlowConditioning(torch.zeros(2, 5, 8), torch.zeros(2, 8))
    latents = torch.randn(2, 16, 8, 8)
    flow = FlowSection(model_prediction_type="raw")
    for loss_type in ("l2", "l1", "huber", "smooth_l1"):
        tr = TrainingSection(loss_type=loss_type, huber_schedule="exponential")
        value = flow_losses.training_loss(
            model, model.transformer, latents, cond, {}, torch.Generator().manual_seed(0), tr, flow, CPU, torch.float32
        )
        assert math.isfinite(float(value)), loss_type
    masks = torch.zeros(2, 1, 64, 64)
    masks[0] = 1.0
    batch = {"masks": masks, "loss_weights": torch.tensor([1.0, 1.0])}
    tr = TrainingSection()
    full = flow_losses.training_loss(
        model, model.transformer, latents, cond, {}, torch.Generator().manual_seed(0), tr, flow, CPU, torch.float32
    )
    half = flow_losses.training_loss(
        model, model.transformer, latents, cond, batch, torch.Generator().manual_seed(0), tr, flow, CPU, torch.float32
    )
    assert 0 < float(half) < float(full)  # the second image's loss is masked out
    with pytest.raises(ValueError, match="snr"):
        flow_losses.check(TrainingSection(loss_type="huber", huber_schedule="snr"), flow)


# ------------------------------------------------------------------------------------ pre-flight


def test_the_native_backend_takes_flux_and_sd3_with_flow_checks(tiny: dict[str, Path]) -> None:
    from nyx_tui.trainers.base import NativeTrainer
    from nyx_tui.trainers.native.data_check import data_problems

    for family in ("flux", "sd3"):
        cfg = TrainingConfig.model_validate({"model": {"family": family, "pretrained": "x"}})
        assert "model.family" not in {p.field for p in NativeTrainer().problems(cfg) if p.is_error}
    cfg = flux_config(tiny, dataset={"resolution": 72}, training={"loss_type": "huber", "huber_schedule": "snr"})
    fields = {p.field for p in data_problems(cfg) if p.is_error}
    assert {"dataset.resolution", "training.huber_schedule"} <= fields
    cached = flux_config(tiny, dataset={"shuffle_caption": True}, training={"cache_text_encoder_outputs_to_disk": True})
    assert any(p.field == "training.cache_text_encoder_outputs" for p in data_problems(cached))


@pytest.mark.slow
def test_the_trained_files_reproduce_each_other(tiny: dict[str, Path], tmp_path: Path) -> None:
    """What a run writes is what it trained: the same seeded run saved in sd-scripts' layout (loaded back by our
    loader) and in diffusers' layout (loaded by diffusers' `load_lora_weights`) give the same transformer output,
    and one that differs from the base model's."""
    import diffusers
    from test_flow_lora import transformer_out

    from nyx_tui.config.model import ModelSection
    from nyx_tui.trainers.native.flow_files import load_flow_model
    from nyx_tui.trainers.native.init_weights import load_flow_lora

    runs = {}
    for fmt in ("kohya", "diffusers"):
        cfg = flux_config(tiny, training={"max_steps": 3}, saving={"lora_format": fmt, "precision": "float"})
        runs[fmt] = train(cfg, tmp_path / fmt).output_dir / "flux.safetensors"
    kohya_keys, meta = lora_keys(runs["kohya"])
    assert any(k.startswith("lora_unet_double_blocks_0_img_attn_qkv.") for k in kohya_keys)
    assert any(k.startswith("lora_unet_single_blocks_1_linear1.") for k in kohya_keys)
    assert meta["modelspec.architecture"] == "flux-1-dev/lora"
    assert all(k.startswith("transformer.") for k in lora_keys(runs["diffusers"])[0])

    section = ModelSection(family="flux", pretrained=str(tiny["dev"]))  # type: ignore[arg-type]
    base = load_flow_model(section, T5_TOKENS)
    before = transformer_out(base)
    assert load_flow_lora(base, runs["kohya"]) == []
    ours = transformer_out(base)
    pipe = diffusers.FluxPipeline.from_pretrained(str(tiny["dev"]))
    pipe.load_lora_weights(str(runs["diffusers"]))
    base.transformer = pipe.transformer
    theirs = transformer_out(base)
    assert not torch.allclose(ours, before, atol=1e-4)
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_the_clip_text_encoder_trains_too(tiny: dict[str, Path], tmp_path: Path) -> None:
    """`network.train_text_encoder` on Flux trains CLIP-L (sd-scripts' `lora_te1_`), never T5: its adapters
    leave their zero start and are in the file."""
    cfg = flux_config(
        tiny,
        network={"dim": 4, "alpha": 2.0, "train_text_encoder": True, "text_encoder_lr": 5e-3},
        training={"max_steps": 3},
        saving={"precision": "float"},
    )
    job = train(cfg, tmp_path)
    from safetensors.torch import load_file

    state = load_file(str(job.output_dir / "flux.safetensors"))
    te_ups = [v for k, v in state.items() if k.startswith("lora_te1_") and k.endswith("lora_up.weight")]
    assert te_ups and any(float(v.abs().max()) > 0 for v in te_ups)
    assert not [k for k in state if k.startswith(("lora_te2_", "lora_te3_"))]
