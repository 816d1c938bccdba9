"""SD3 in the native engine on a tiny random-weight model: `nyx train` trains and saves a LoRA; the text encoding
follows diffusers' StableDiffusion3Pipeline (CLIP-L + CLIP-G penultimate states padded to T5's width, then T5;
pooled = both projections); the CLIP/T5 padding masks and the per-encoder dropout do what sd-scripts' options
do; a seeded run repeats; cached text-encoder outputs (with the dropout applied to the cached rows) train the
same as encoding every step. The flow-matching loss options are tested in test_flux.py for both families.

As in test_flux.py most runs call `engine.train` in this process and T5 is cut to 16 tokens.
"""

from __future__ import annotations

import math
import tomllib
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from conftest import run_nyx

from nyx_tui.config.io import dumps_config
from nyx_tui.config.model import FlowSection, TrainingConfig
from nyx_tui.jobs.events import EventWriter, read_events
from nyx_tui.jobs.jobdir import JobDir, create_job

torch = pytest.importorskip("torch")

CPU = torch.device("cpu")
T5_TOKENS = 16
CLIP_TOKENS = 77
DROPOUT = {"clip_l_dropout_rate": 0.4, "clip_g_dropout_rate": 0.3, "t5_dropout_rate": 0.5}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from nyx_tui.demo_assets import build_tiny_sd3, make_shapes_dataset

    root = tmp_path_factory.mktemp("sd3")
    return {"sd3": build_tiny_sd3(root / "sd3"), "dataset": make_shapes_dataset(root / "dataset", n=6), "root": root}


def sd3_config(tiny: dict[str, Path], **sections: dict[str, Any]) -> TrainingConfig:
    data: dict[str, Any] = {
        "model": {"family": "sd3", "pretrained": str(tiny["sd3"])},
        "dataset": {"resolution": 64, "subsets": [{"image_dir": str(tiny["dataset"])}]},
        "network": {"dim": 4, "alpha": 2.0},
        "optimizer": {"learning_rate": 5e-3},
        "scheduler": {"type": "constant", "warmup_steps": 0},
        "training": {"max_steps": 3, "batch_size": 2, "seed": 7},
        "saving": {"output_name": "sd3"},
        "flow": {"t5_max_token_length": T5_TOKENS},
    }
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return TrainingConfig.model_validate(data)


def train(cfg: TrainingConfig, root: Path) -> JobDir:
    from nyx_tui.trainers.native import engine

    job = create_job("train", "sd3", ["native"], config_toml=dumps_config(cfg), root=root)
    with EventWriter(job.events_path) as events:
        assert engine.train(job, cfg, events) == 0
    return job


def losses(job: JobDir) -> list[float]:
    return [e["loss"] for e in read_events(job.events_path) if e["kind"] == "step"]


@pytest.fixture(scope="module")
def model(tiny: dict[str, Path]) -> Any:
    from nyx_tui.config.model import ModelSection
    from nyx_tui.trainers.native import flow_files, flow_models

    loaded = flow_files.load_flow_model(ModelSection(family="sd3", pretrained=str(tiny["sd3"])), T5_TOKENS)
    flow_models.freeze(loaded)
    return loaded


# ------------------------------------------------------------------------------------ end to end


@pytest.mark.slow
def test_nyx_train_trains_sd3_and_saves_a_lora(tiny: dict[str, Path], tmp_path: Path) -> None:
    from safetensors import safe_open

    home = tmp_path / "home"
    config = tmp_path / "sd3.toml"
    cfg = sd3_config(tiny, training={"max_steps": 2}, flow={"t5_max_token_length": T5_TOKENS, **DROPOUT})
    config.write_text(tomli_w.dumps(tomllib.loads(dumps_config(cfg))))
    proc = run_nyx("train", str(config), home=home, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (job_dir,) = list((home / "jobs").iterdir())
    job = JobDir(job_dir)
    assert len(losses(job)) == 2 and all(math.isfinite(v) for v in losses(job))
    (artifact,) = [e for e in read_events(job.events_path) if e["kind"] == "artifact" and e.get("what") == "lora"]
    with safe_open(artifact["path"], framework="pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("lora_unet_") for k in keys)


@pytest.mark.slow
def test_same_seed_same_losses_with_encoder_dropout(tiny: dict[str, Path], tmp_path: Path) -> None:
    cfg = sd3_config(tiny, flow={"t5_max_token_length": T5_TOKENS, **DROPOUT})
    a, b = train(cfg, tmp_path / "a"), train(cfg, tmp_path / "b")
    assert len(losses(a)) == 3 and all(math.isfinite(v) for v in losses(a))
    assert losses(a) == losses(b)
    other = train(sd3_config(tiny, training={"seed": 8}), tmp_path / "c")
    assert losses(other) != losses(a)


@pytest.mark.slow
@pytest.mark.parametrize("to_disk", [False, True], ids=["memory", "disk"])
def test_cached_text_encoder_outputs_train_the_same(
    tiny: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, to_disk: bool
) -> None:
    """The per-encoder dropout is drawn from the seeded generator and applied to the cached rows, so a cached
    run (memory or disk) trains exactly like one that encodes every step; masks are part of the cached rows."""
    monkeypatch.setenv("NYX_HOME", str(tmp_path / "home"))
    flow = {"t5_max_token_length": T5_TOKENS, "apply_lg_attn_mask": True, "apply_t5_attn_mask": True, **DROPOUT}
    plain = train(sd3_config(tiny, flow=flow), tmp_path / "plain")
    cache = {"cache_text_encoder_outputs": True, "cache_text_encoder_outputs_to_disk": to_disk}
    cached = train(sd3_config(tiny, flow=flow, training=cache), tmp_path / "cached")
    assert losses(cached) == pytest.approx(losses(plain), rel=1e-5, abs=1e-6)
    if to_disk:
        assert len(list((tmp_path / "home").rglob("text/*/*.safetensors"))) == 6
        again = train(sd3_config(tiny, flow=flow, training=cache), tmp_path / "again")
        assert losses(again) == losses(cached)


@pytest.mark.slow
def test_block_swap_and_fp8_base_train_sd3(tiny: dict[str, Path], tmp_path: Path) -> None:
    plain = losses(train(sd3_config(tiny), tmp_path / "plain"))
    swapped = train(sd3_config(tiny, flow={"t5_max_token_length": T5_TOKENS, "blocks_to_swap": 1}), tmp_path / "s")
    assert losses(swapped) == plain
    fp8 = train(sd3_config(tiny, training={"base_quantization": "fp8"}), tmp_path / "q")
    assert losses(fp8) == pytest.approx(plain, rel=0.1)


# ------------------------------------------------------------------------------------ text and transformer


def test_text_encoding_matches_the_sd3_pipeline(model: Any, tiny: dict[str, Path]) -> None:
    from diffusers import StableDiffusion3Pipeline

    from nyx_tui.trainers.native import flow_models

    pipe: Any = StableDiffusion3Pipeline.from_pretrained(tiny["sd3"])
    captions = ["a red circle", "blue square, white background"]
    with torch.no_grad():
        ours = flow_models.encode_text(model, captions, CPU, FlowSection())
        hidden, _, pooled, _ = pipe.encode_prompt(
            captions, captions, captions, device=CPU, do_classifier_free_guidance=False, max_sequence_length=T5_TOKENS
        )
    assert ours.hidden.shape == (2, CLIP_TOKENS + T5_TOKENS, 64) and ours.pooled.shape == (2, 64)
    assert torch.allclose(ours.hidden, hidden, atol=1e-5) and torch.allclose(ours.pooled, pooled, atol=1e-5)


def test_masks_zero_the_padding(model: Any) -> None:
    from nyx_tui.trainers.native import flow_models

    with torch.no_grad():
        plain = flow_models.encode_text(model, ["a red circle"], CPU, FlowSection())
        masked = flow_models.encode_text(model, ["a red circle"], CPU, FlowSection(apply_lg_attn_mask=True))
        t5 = flow_models.encode_text(model, ["a red circle"], CPU, FlowSection(apply_t5_attn_mask=True))
    clip_len = int(model.tokenizer(["a red circle"], return_tensors="pt").attention_mask.sum())
    assert plain.hidden[0, clip_len:CLIP_TOKENS, :64].abs().sum() > 0
    assert not masked.hidden[0, clip_len:CLIP_TOKENS].any() and masked.hidden[0, :clip_len].any()
    t5_len = int(model.tokenizer_3(["a red circle"], return_tensors="pt").attention_mask.sum())
    assert not t5.hidden[0, CLIP_TOKENS + t5_len :].any() and t5.hidden[0, CLIP_TOKENS : CLIP_TOKENS + t5_len].any()
    assert plain.mask is None and t5.mask is None  # SD3's transformer takes no mask: the states carry it


def test_encoder_dropout_zeroes_each_encoders_part(model: Any) -> None:
    from nyx_tui.trainers.native import flow_models

    captions = ["a red circle"] * 4
    with torch.no_grad():
        cond = flow_models.encode_text(model, captions, CPU, FlowSection())
    gen = torch.Generator().manual_seed(0)
    unchanged = flow_models.drop_encoders(model, cond, FlowSection(), gen)
    assert (
        unchanged is cond
        and gen.initial_seed() == 0
        and torch.rand(1, generator=gen).item()
        == pytest.approx(torch.rand(1, generator=torch.Generator().manual_seed(0)).item())
    )  # no rate: nothing drawn
    everything = flow_models.drop_encoders(
        model, cond, FlowSection(clip_l_dropout_rate=1.0, clip_g_dropout_rate=1.0, t5_dropout_rate=1.0), gen
    )
    assert not everything.hidden.any() and not everything.pooled.any()
    only_l = flow_models.drop_encoders(model, cond, FlowSection(clip_l_dropout_rate=1.0), gen)
    assert not only_l.hidden[:, :CLIP_TOKENS, :32].any() and only_l.hidden[:, :CLIP_TOKENS, 32:].equal(
        cond.hidden[:, :CLIP_TOKENS, 32:]
    )
    assert not only_l.pooled[:, :32].any() and only_l.pooled[:, 32:].equal(cond.pooled[:, 32:])
    assert only_l.hidden[:, CLIP_TOKENS:].equal(cond.hidden[:, CLIP_TOKENS:])
    only_t5 = flow_models.drop_encoders(model, cond, FlowSection(t5_dropout_rate=1.0), gen)
    assert not only_t5.hidden[:, CLIP_TOKENS:].any() and only_t5.hidden[:, :CLIP_TOKENS].equal(
        cond.hidden[:, :CLIP_TOKENS]
    )
    assert cond.hidden.any()  # the input (a cached row) is never changed in place
    half = [
        flow_models.drop_encoders(model, cond, FlowSection(t5_dropout_rate=0.5), torch.Generator().manual_seed(s))
        for s in range(8)
    ]
    dropped = [bool(not h.hidden[i, CLIP_TOKENS:].any()) for h in half for i in range(4)]
    assert 0 < sum(dropped) < len(dropped)


def test_sd3_transformer_gets_sigma_times_1000(model: Any) -> None:
    from nyx_tui.trainers.native import flow_models

    seen: dict[str, Any] = {}
    handle = model.transformer.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    try:
        with torch.no_grad():
            cond = flow_models.encode_text(model, ["a red circle"], CPU, FlowSection())
            out = flow_models.predict(
                model, model.transformer, torch.randn(1, 16, 8, 8), torch.tensor([250.0]), cond, FlowSection()
            )
    finally:
        handle.remove()
    assert seen["timestep"].tolist() == [250.0] and out.shape == (1, 16, 8, 8)
    assert seen["pooled_projections"].shape == (1, 64)


def test_sd3_latents_are_shifted_and_scaled(model: Any) -> None:
    """`(sample − shift_factor)·scaling_factor`, as the SD3 pipeline encodes (an SD VAE has no shift)."""
    from nyx_tui.trainers.native import latents

    pixels = torch.rand(1, 3, 64, 64) * 2 - 1
    gen = torch.Generator().manual_seed(1)
    got = latents.batch_latents(model, {"pixels": pixels}, gen, CPU, torch.float32)
    with torch.no_grad():
        dist = model.vae.encode(pixels).latent_dist
    eps = torch.randn(dist.mean.shape, generator=torch.Generator().manual_seed(1))
    cfg = model.vae.config
    want = (dist.mean + dist.std * eps - cfg.shift_factor) * cfg.scaling_factor
    assert torch.allclose(got, want, atol=1e-6)
