"""The model families of the native engine on tiny random-weight models built offline: SDXL trained end to end
(a LoRA with sd-scripts' SGM names that diffusers loads back to the trained model's outputs), its text
encoding (two encoders, pooled output, 75/150/225 tokens) and size conditioning; SD2 v-prediction; where a
model comes from (diffusers folder, cached repo id, single-file checkpoint, pickles read weights-only, a
separate VAE); and the kohya names for each family.

Tolerances: the engine saves in fp16 (its default, `saving.precision`), so the reloaded LoRA reproduces the
trained outputs to 2e-3 (outputs of magnitude ~1; the fp16 rounding of the LoRA weights, as in
test_networks); each comparison also checks that the training moved the outputs by far more, so a file that
loads nothing fails. Everything else is compared to 1e-5 or exactly.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from nyx_tui.config.fields import Family
from nyx_tui.config.io import dumps_config
from nyx_tui.config.model import ModelSection, TrainingConfig
from nyx_tui.jobs.events import read_events
from nyx_tui.jobs.jobdir import create_job

torch = pytest.importorskip("torch")

DIM, ALPHA = 4, 2.0  # alpha != dim: a file with the wrong alpha changes the outputs
FP16_TOL = 2e-3
CPU = torch.device("cpu")


# ----------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny SDXL and SD1.5 models and a small shapes dataset, built once for the module."""
    from nyx_tui.demo_assets import build_tiny_sd15, build_tiny_sdxl, make_shapes_dataset

    root = tmp_path_factory.mktemp("families")
    return {
        "sdxl": build_tiny_sdxl(root / "sdxl"),
        "sd15": build_tiny_sd15(root / "sd15"),
        "dataset": make_shapes_dataset(root / "dataset", n=8),
        "root": root,
    }


@pytest.fixture(scope="module")
def sdxl(tiny: dict[str, Path]) -> Any:
    from nyx_tui.trainers.native import models

    model = models.load_model(ModelSection(family="sdxl", pretrained=str(tiny["sdxl"])))
    models.freeze(model)
    return model


@pytest.fixture
def empty_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


# ----------------------------------------------------------------------------------- SDXL end to end


def _trained_model(cfg: TrainingConfig, state: Path) -> Any:
    """The model as the engine left it: the base with the network attached and the training state's adapter
    weights loaded (UNet adapters from accelerate's model file, text-encoder adapters from their checkpoint
    object) — independent of the kohya file under test."""
    import safetensors.torch

    from nyx_tui.trainers.native import models, networks

    model = models.load_model(cfg.model)
    models.freeze(model)
    network = networks.attach(model, cfg)
    unet_state = safetensors.torch.load_file(state / "model.safetensors")
    result = model.unet.load_state_dict(unet_state, strict=False)
    assert not result.unexpected_keys and len(unet_state) == sum(
        len(a.named) for a in network.adapted if a.root == "unet"
    )
    (te_weights,) = network.checkpoint_objects()
    for pkl in sorted(state.glob("custom_checkpoint_*.pkl")):
        try:
            saved = torch.load(pkl, weights_only=True)
        except Exception:
            continue  # the scheduler's or the generators' state
        if isinstance(saved, dict) and all(str(k).startswith("lora_te") for k in saved):
            te_weights.load_state_dict(saved)
            break
    else:
        raise AssertionError(f"no text-encoder adapter weights in {state}")
    network.eval()
    return model


@pytest.mark.slow
def test_sdxl_lora_trained_by_the_engine_loads_in_diffusers(tiny: dict[str, Path], tmp_path: Path) -> None:
    from diffusers import StableDiffusionXLPipeline
    from safetensors import safe_open

    from nyx_tui.trainers.native import models

    cfg = TrainingConfig.model_validate(
        {
            "model": {"family": "sdxl", "pretrained": str(tiny["sdxl"])},
            "dataset": {"resolution": 64, "subsets": [{"image_dir": str(tiny["dataset"])}], "max_token_length": 150},
            "network": {"dim": DIM, "alpha": ALPHA, "train_text_encoder": True},
            "optimizer": {"learning_rate": 2e-2},
            "scheduler": {"type": "constant", "warmup_steps": 0},
            "training": {"max_steps": 4, "batch_size": 2, "seed": 3},
            "saving": {"output_name": "xl"},
        }
    )
    job = create_job("train", "xl", ["native"], config_toml=dumps_config(cfg), root=tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "nyx_tui.trainers.native", str(job.path)], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    events = read_events(job.events_path)
    (artifact,) = [e for e in events if e["kind"] == "artifact" and e["what"] == "lora"]
    assert any(e["kind"] == "log" and e["message"].startswith("sdxl model from") for e in events)
    lora = Path(artifact["path"])

    # sd-scripts' SDXL names: SGM UNet modules, two text encoders, the real alpha
    with safe_open(str(lora), framework="pt") as f:
        keys = list(f.keys())
        alphas = {float(f.get_tensor(k)) for k in keys if k.endswith(".alpha")}
        meta = f.metadata()
    unet_keys = [k for k in keys if k.startswith("lora_unet_")]
    assert unet_keys and all(re.match(r"lora_unet_(input_blocks|output_blocks|middle_block)_\d", k) for k in unet_keys)
    for part in ("input_blocks_", "output_blocks_", "middle_block_"):
        assert any(k.startswith("lora_unet_" + part) for k in unet_keys), part
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    assert any(k.startswith("lora_te1_text_model_") for k in keys) and any(
        k.startswith("lora_te2_text_model_") for k in keys
    )
    assert not any(k.startswith(("lora_te_", "lora_unet_down_blocks", "lora_unet_up_blocks")) for k in keys)
    assert alphas == {ALPHA}
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["modelspec.resolution"] == "64x64" and meta["ss_max_token_length"] == "150"

    # the trained model (from the training state) against diffusers with the file loaded
    trained = _trained_model(cfg, lora.with_name("xl-state"))
    pipe: Any = StableDiffusionXLPipeline.from_pretrained(tiny["sdxl"])
    gen = torch.Generator().manual_seed(11)
    x, hidden, pooled = (
        torch.randn(1, 4, 8, 8, generator=gen),
        torch.randn(1, 77, 64, generator=gen),
        torch.randn(1, 32),
    )
    t = torch.tensor([400])
    batch = {"original_sizes": [(64, 64)], "crop_top_lefts": [(0, 0)], "target_sizes": [(64, 64)]}
    added = {"text_embeds": pooled, "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
    captions = ["nyxshape, red circle, white background"]
    with torch.no_grad():
        base_unet = pipe.unet(x, t, hidden, added_cond_kwargs=added).sample
        base_hidden, _, base_pooled, _ = pipe.encode_prompt(captions[0], device=CPU, do_classifier_free_guidance=False)
        pipe.load_lora_weights(str(lora))
        loaded_unet = pipe.unet(x, t, hidden, added_cond_kwargs=added).sample
        loaded_hidden, _, loaded_pooled, _ = pipe.encode_prompt(
            captions[0], device=CPU, do_classifier_free_guidance=False
        )
        trained_unet = models.predict(trained, trained.unet, x, t, models.Conditioning(hidden, pooled), batch)
        trained.max_token_length = 75  # the pipeline encodes 77 tokens
        cond = models.encode_text(trained, captions, CPU)
    for ours, theirs, base in (
        (trained_unet, loaded_unet, base_unet),
        (cond.hidden, loaded_hidden, base_hidden),
        (cond.pooled, loaded_pooled, base_pooled),
    ):
        assert (ours - theirs).abs().max() < FP16_TOL
        assert (ours - base).abs().max() > 10 * FP16_TOL  # the LoRA changed something, and the file carries it


# ----------------------------------------------------------------------------------- kohya names


def test_kohya_names_per_family() -> None:
    from nyx_tui.trainers.native.lora_io import to_kohya_keys

    w = torch.zeros(1)
    # SD1.5: diffusers module paths and lora_te_, as they come from the network or from peft
    sd15 = to_kohya_keys(
        Family.SD15,
        {
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": w,
            "unet.up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.lora_B.weight": w,
            "text_encoder.encoder.layers.0.self_attn.q_proj.lora_A.weight": w,
        },
    )
    assert set(sd15) == {
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight",
        "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight",
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight",
    }
    # SDXL: SGM names (two samples straight from sd-scripts' own SDXL LoRA), lora_te1_/lora_te2_
    sdxl = to_kohya_keys(
        Family.SDXL,
        {
            "lora_unet_down_blocks_0_resnets_0_time_emb_proj.alpha": w,
            "lora_unet_up_blocks_2_resnets_2_conv_shortcut.lora_up.weight": w,
            "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight": w,
            "unet.mid_block.attentions.0.proj_in.lora_A.weight": w,
            "unet.mid_block.resnets.1.conv2.lora_A.weight": w,
            "lora_unet_down_blocks_1_downsamplers_0_conv.hada_w1_a": w,
            "lora_unet_up_blocks_0_upsamplers_0_conv.lokr_w1": w,
            "lora_unet_up_blocks_1_resnets_2_conv1.dora_scale": w,
            "lora_unet_conv_in.alpha": w,
            "lora_unet_add_embedding_linear_2.alpha": w,
            "text_encoder.encoder.layers.1.mlp.fc1.lora_B.weight": w,
            "text_encoder_2.text_model.encoder.layers.0.self_attn.out_proj.lora_A.weight": w,
            "lora_te2_text_model_encoder_layers_0_mlp_fc2.alpha": w,
        },
    )
    assert list(sdxl) == [
        "lora_unet_input_blocks_1_0_emb_layers_1.alpha",
        "lora_unet_output_blocks_8_0_skip_connection.lora_up.weight",
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight",
        "lora_unet_middle_block_1_proj_in.lora_down.weight",
        "lora_unet_middle_block_2_out_layers_3.lora_down.weight",
        "lora_unet_input_blocks_6_0_op.hada_w1_a",
        "lora_unet_output_blocks_2_2_conv.lokr_w1",
        "lora_unet_output_blocks_5_0_in_layers_2.dora_scale",
        "lora_unet_input_blocks_0_0.alpha",
        "lora_unet_label_emb_0_2.alpha",
        "lora_te1_text_model_encoder_layers_1_mlp_fc1.lora_up.weight",
        "lora_te2_text_model_encoder_layers_0_self_attn_out_proj.lora_down.weight",
        "lora_te2_text_model_encoder_layers_0_mlp_fc2.alpha",
    ]
    assert all(v is w for v in sdxl.values())
    with pytest.raises(ValueError, match="neither a kohya key"):
        to_kohya_keys(Family.SDXL, {"something.else": w})


def test_kohya_state_dict_of_a_peft_unet(tiny: dict[str, Path]) -> None:
    """lora_io.kohya_state_dict (a bare peft adapter on a UNet) names SDXL modules the SGM way, real alpha."""
    from diffusers import UNet2DConditionModel

    from nyx_tui.config.model import NetworkSection
    from nyx_tui.trainers.native import lora_io, models

    unet: Any = UNet2DConditionModel.from_pretrained(tiny["sdxl"], subfolder="unet")
    models.add_unet_lora(unet, NetworkSection(dim=DIM, alpha=ALPHA))
    sd = lora_io.kohya_state_dict(unet, ALPHA, torch.float16, Family.SDXL)
    modules = {k.partition(".")[0] for k in sd}
    assert "lora_unet_middle_block_1_transformer_blocks_0_attn2_to_k" in modules
    assert all(
        m.startswith(("lora_unet_input_blocks_", "lora_unet_output_blocks_", "lora_unet_middle_block_"))
        for m in modules
    )
    assert all({f"{m}.lora_down.weight", f"{m}.lora_up.weight", f"{m}.alpha"} <= set(sd) for m in modules)
    assert {float(v) for k, v in sd.items() if k.endswith(".alpha")} == {ALPHA}
    assert all(v.dtype == torch.float16 for v in sd.values())


def test_sgm_names_cover_every_unet_parameter_as_diffusers_reads_them(tiny: dict[str, Path]) -> None:
    """Every parameter of the tiny SDXL UNet (real SDXL layout) and SD1.5 UNet spelled the SGM way is read back
    to the same parameter by diffusers' own LDM-checkpoint converter: the mapping is right module by module."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    from nyx_tui.trainers.native.kohya_names import UNetLayout, sgm_path

    for name in ("sdxl", "sd15"):
        unet: Any = UNet2DConditionModel.from_pretrained(tiny[name], subfolder="unet")
        state = unet.state_dict()
        layout = UNetLayout.from_config(unet.config)
        ldm = {"model.diffusion_model." + sgm_path(k, layout): v for k, v in state.items()}
        back = convert_ldm_unet_checkpoint(ldm, unet.config)
        assert set(back) == set(state), name
        assert all(back[k] is state[k] for k in state), name


# ----------------------------------------------------------------------------------- text and size


def test_sdxl_text_encoding_matches_the_pipeline(tiny: dict[str, Path], sdxl: Any) -> None:
    from diffusers import StableDiffusionXLPipeline

    from nyx_tui.trainers.native import models

    pipe: Any = StableDiffusionXLPipeline.from_pretrained(tiny["sdxl"])
    caption = "nyxshape, blue square, black background"
    with torch.no_grad():
        hidden, _, pooled, _ = pipe.encode_prompt(caption, device=CPU, do_classifier_free_guidance=False)
        cond = models.encode_text(sdxl, [caption], CPU)
    assert cond.hidden.shape == (1, 77, 64) and cond.pooled is not None and cond.pooled.shape == (1, 32)
    assert torch.allclose(cond.hidden, hidden, atol=1e-6) and torch.allclose(cond.pooled, pooled, atol=1e-6)


@pytest.mark.parametrize("family", ["sdxl", "sd15"])
def test_long_captions_in_75_token_windows(tiny: dict[str, Path], family: str) -> None:
    """sd-scripts' max_token_length: 150 gives 2 + 2·75 = 152 positions (BOS, two windows' insides, the last
    state), 225 gives 227; the first window's states are the 75-token encoding's; text past 75 tokens counts."""
    from nyx_tui.trainers.native import models

    model = models.load_model(ModelSection(family=family, pretrained=str(tiny[family])))
    models.freeze(model)
    width = 64 if family == "sdxl" else 32
    captions = ["a " * 100 + "red", "a " * 100 + "blue", "short"]
    with torch.no_grad():
        short = models.encode_text(model, captions, CPU)
        model.max_token_length = 150
        long = models.encode_text(model, captions, CPU)
        model.max_token_length = 225
        longest = models.encode_text(model, captions, CPU)
    assert short.hidden.shape == (3, 77, width)
    assert long.hidden.shape == (3, 152, width) and longest.hidden.shape == (3, 227, width)
    assert torch.allclose(long.hidden[:, :76], short.hidden[:, :76], atol=1e-5)
    assert torch.equal(short.hidden[0], short.hidden[1])  # cut at 75 tokens: "red" and "blue" are gone
    assert not torch.allclose(long.hidden[0], long.hidden[1])  # within 150 they are seen
    if family == "sdxl":
        assert long.pooled is not None and short.pooled is not None
        assert torch.allclose(long.pooled, short.pooled, atol=1e-5)  # pooled from the first window
    with pytest.raises(ValueError, match="75, 150 or 225"):
        TrainingConfig.model_validate({"dataset": {"max_token_length": 100}})


def test_tokenizer_windows_follow_sd_scripts(sdxl: Any) -> None:
    """Each window is BOS + 75 tokens + a last token; with a tokenizer that pads with something else than EOS
    (SDXL's second), a window cut inside the text ends in EOS and an empty one starts with EOS."""
    from nyx_tui.trainers.native import models

    tok = sdxl.tokenizer_2
    ids = models.tokenize(tok, ["a " * 100, "short"], 150)
    assert ids.shape == (2, 2, 77)
    assert (ids[:, :, 0] == tok.bos_token_id).all()
    assert ids[0, 0, -1] == tok.eos_token_id and ids[0, 0, -2] not in (tok.eos_token_id, tok.pad_token_id)
    assert ids[1, 1, 1] == tok.eos_token_id and ids[1, 1, 2] == tok.pad_token_id


def test_gradients_flow_through_encode_text(sdxl: Any) -> None:
    """encode_text does not switch gradients off: a trainable text encoder gets them (the engine decides)."""
    from nyx_tui.trainers.native import models

    weight = sdxl.text_encoder_2.text_model.encoder.layers[0].mlp.fc1.weight
    weight.requires_grad_(True)
    try:
        cond = models.encode_text(sdxl, ["a red circle"], CPU)
        assert cond.pooled is not None
        (cond.hidden.sum() + cond.pooled.sum()).backward()
        assert weight.grad is not None and weight.grad.abs().sum() > 0
    finally:
        weight.requires_grad_(False)
        weight.grad = None


def test_sdxl_size_conditioning_comes_from_the_batch(sdxl: Any) -> None:
    from nyx_tui.trainers.native import models

    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    assert models.time_ids(sdxl, {}, x).tolist() == [[64, 64, 0, 0, 64, 64]] * 2  # default: the latents' size
    batch = {"original_sizes": [(96, 80), (64, 64)], "crop_top_lefts": [(8, 0), (0, 0)], "target_sizes": [(64, 64)] * 2}
    assert models.time_ids(sdxl, batch, x).tolist() == [[96, 80, 8, 0, 64, 64], [64, 64, 0, 0, 64, 64]]
    with torch.no_grad():
        cond = models.encode_text(sdxl, ["a", "b"], CPU)
        t = torch.tensor([300, 300])
        default = models.predict(sdxl, sdxl.unet, x, t, cond, {})
        same = models.predict(
            sdxl, sdxl.unet, x, t, cond, {**batch, "original_sizes": [(64, 64)] * 2, "crop_top_lefts": [(0, 0)] * 2}
        )
        sized = models.predict(sdxl, sdxl.unet, x, t, cond, batch)
    assert torch.allclose(default, same, atol=1e-6)
    assert not torch.allclose(sized[0], default[0], atol=1e-4) and torch.allclose(sized[1], default[1], atol=1e-6)


def test_sdxl_vae_stays_fp32_under_fp16(tiny: dict[str, Path]) -> None:
    """`place` puts the parts in the weight dtype, except SDXL's VAE under fp16 (it overflows there)."""
    from nyx_tui.trainers.native import models

    for family, vae_dtype in (("sdxl", torch.float32), ("sd15", torch.float16)):
        model = models.load_model(ModelSection(family=family, pretrained=str(tiny[family])))
        models.place(model, CPU, torch.float16)
        assert next(model.vae.parameters()).dtype == vae_dtype, family
        assert all(next(p.parameters()).dtype == torch.float16 for p in (model.unet, *model.text_encoders))
    models.place(model, CPU, torch.bfloat16)
    assert next(model.vae.parameters()).dtype == torch.bfloat16


# ----------------------------------------------------------------------------------- SD2


def test_sd2_v_prediction_from_the_scheduler_config(
    tiny: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model whose scheduler says v_prediction trains towards the velocity, and its LoRA says SD2-v."""
    import json

    from nyx_tui.config.model import TrainingSection
    from nyx_tui.trainers.native import lora_io, losses, models

    folder = tmp_path / "sd2"
    shutil.copytree(tiny["sd15"], folder)
    sched = folder / "scheduler" / "scheduler_config.json"
    sched.write_text(json.dumps({**json.loads(sched.read_text()), "prediction_type": "v_prediction"}))
    model = models.load_model(ModelSection(family="sd2", pretrained=str(folder)))
    assert model.family == Family.SD2 and model.prediction_type == "v_prediction"

    seen: dict[str, torch.Tensor] = {}

    def zero_prediction(
        model: Any, unet: Any, noisy: torch.Tensor, t: torch.Tensor, cond: Any, batch: Any
    ) -> torch.Tensor:
        seen.update(noisy=noisy, t=t)
        return torch.zeros_like(noisy)

    monkeypatch.setattr(models, "predict", zero_prediction)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = models.Conditioning(torch.zeros(2, 77, 32))
    loss = losses.training_loss(
        model, None, latents, cond, {}, torch.Generator().manual_seed(1), TrainingSection(), CPU, torch.float32
    )
    # the noise back from the noisy latents, then v = √ᾱ·noise − √(1−ᾱ)·x0: the loss of predicting 0 is mean(v²)
    abar = model.noise_scheduler.alphas_cumprod[seen["t"]].reshape(-1, 1, 1, 1)
    noise = (seen["noisy"] - abar.sqrt() * latents) / (1 - abar).sqrt()
    velocity = abar.sqrt() * noise - (1 - abar).sqrt() * latents
    assert float(loss) == pytest.approx(float((velocity**2).mean()), rel=1e-4)
    assert float(loss) != pytest.approx(float((noise**2).mean()), rel=1e-2)

    cfg = TrainingConfig.model_validate({"model": {"family": "sd2", "pretrained": str(folder)}})
    meta = lora_io.build_metadata(
        cfg, step=1, num_train_images=1, tag_frequency={}, started_at=0.0, mixed_precision="no",
        prediction_type=model.prediction_type, epoch=1, num_epochs=1,
    )  # fmt: skip
    assert meta["ss_v2"] == "True" and meta["ss_v_parameterization"] == "True"
    assert meta["ss_base_model_version"] == "sd_v2_v"
    assert (
        meta["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora" and meta["modelspec.prediction_type"] == "v"
    )
    assert meta["modelspec.resolution"] == "768x768"


# ----------------------------------------------------------------------------------- where models come from


def test_a_repo_id_loads_from_the_hub_cache_only(tiny: dict[str, Path], empty_hub_cache: Path) -> None:
    from nyx_tui.trainers.native import models

    with pytest.raises(models.ModelLoadError) as info:
        models.load_model(ModelSection(family="sd15", pretrained="nyx-test/not-cached"))
    message = str(info.value)
    assert "nyx-test/not-cached is no local path, and as a repo id it is not in the Hugging Face cache" in message
    assert "`hf download nyx-test/not-cached`" in message and "never downloads" in message

    # the same repo, once in the cache (the hub's layout: refs/main names the snapshot)
    repo = empty_hub_cache / "models--nyx-test--tiny"
    commit = "0" * 40
    shutil.copytree(tiny["sd15"], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    model = models.load_model(ModelSection(family="sd15", pretrained="nyx-test/tiny"))
    assert Path(model.source["model"]) == repo / "snapshots" / commit and model.unet is not None


def _ldm_vae_key(key: str, up_blocks: int) -> str:
    """A diffusers AutoencoderKL key in the original (LDM) spelling — for writing a test checkpoint only."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    if key in DIFFUSERS_TO_LDM_MAPPING["vae"]:
        return str(DIFFUSERS_TO_LDM_MAPPING["vae"][key])
    key = key.replace("conv_shortcut", "nin_shortcut")
    key = re.sub(r"down_blocks\.(\d+)\.resnets\.", r"down.\1.block.", key)
    key = re.sub(r"down_blocks\.(\d+)\.downsamplers\.0\.", r"down.\1.downsample.", key)
    key = re.sub(r"up_blocks\.(\d+)\.resnets\.", lambda m: f"up.{up_blocks - 1 - int(m[1])}.block.", key)
    key = re.sub(r"up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"up.{up_blocks - 1 - int(m[1])}.upsample.", key)
    key = re.sub(r"mid_block\.resnets\.(\d+)\.", lambda m: f"mid.block_{int(m[1]) + 1}.", key)
    for new, old in (("mid_block.attentions.0.", "mid.attn_1."), ("group_norm.", "norm."), ("to_out.0.", "proj_out.")):
        key = key.replace(new, old)
    return re.sub(r"\.to_([qkv])\.", r".\1.", key)


def _write_ldm_checkpoint(model: Any, path: Path) -> dict[str, Any]:
    """The tiny SD1.5 model as an original single-file checkpoint: the UNet by our SGM names (which the
    test above checks against diffusers), the text encoder and VAE under their LDM prefixes."""
    import safetensors.torch

    from nyx_tui.trainers.native.kohya_names import UNetLayout, sgm_path

    layout = UNetLayout.from_config(model.unet.config)
    up = len(model.vae.config.up_block_types)
    ckpt = {"model.diffusion_model." + sgm_path(k, layout): v for k, v in model.unet.state_dict().items()}
    ckpt |= {"first_stage_model." + _ldm_vae_key(k, up): v for k, v in model.vae.state_dict().items()}
    ckpt |= {"cond_stage_model.transformer.text_model." + k: v for k, v in model.text_encoder.state_dict().items()}
    ckpt = {k: v.contiguous() for k, v in ckpt.items()}
    if path.suffix == ".safetensors":
        safetensors.torch.save_file(ckpt, str(path))
    else:
        torch.save({"state_dict": ckpt}, path)
    return ckpt


def _same_weights(a: Any, b: Any) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_single_file_checkpoints(tiny: dict[str, Path], tmp_path: Path, empty_hub_cache: Path) -> None:
    """A .safetensors checkpoint loads with the configs of a diffusers folder of its family (never the hub);
    without them the error names the download; a .ckpt is read weights-only, and one that needs more is refused."""
    from nyx_tui.trainers.native import models

    folder_model = models.load_model(ModelSection(family="sd15", pretrained=str(tiny["sd15"])))
    single = tmp_path / "tiny-sd15.safetensors"
    _write_ldm_checkpoint(folder_model, single)
    cfg = ModelSection(family="sd15", pretrained=str(single), single_file_config=str(tiny["sd15"]))
    loaded = models.load_model(cfg)
    for part in ("unet", "vae", "text_encoder"):
        assert _same_weights(getattr(loaded, part), getattr(folder_model, part)), part
    assert loaded.prediction_type == "epsilon" and loaded.tokenizer("a red circle").input_ids[0] == 517

    with pytest.raises(models.ModelLoadError) as info:  # no single_file_config, nothing in the cache
        models.load_model(ModelSection(family="sd15", pretrained=str(single)))
    message = str(info.value)
    assert "stable-diffusion-v1-5/stable-diffusion-v1-5" in message and "model.single_file_config" in message
    assert "hf download stable-diffusion-v1-5/stable-diffusion-v1-5 --include '*.json' '*.txt'" in message

    pickled = tmp_path / "tiny-sd15.ckpt"
    _write_ldm_checkpoint(folder_model, pickled)
    from_pickle = models.load_model(cfg.model_copy(update={"pretrained": str(pickled)}))
    assert _same_weights(from_pickle.unet, folder_model.unet)

    unsafe = tmp_path / "unsafe.ckpt"
    torch.save({"state_dict": {}, "trainer": Path("/")}, unsafe)  # an object weights-only loading refuses
    with pytest.raises(models.ModelLoadError, match=r"weights_only=True"):
        models.load_model(cfg.model_copy(update={"pretrained": str(unsafe)}))


def test_a_separate_vae(tiny: dict[str, Path], sdxl: Any) -> None:
    """model.vae replaces the model's VAE: a VAE folder, a model folder (its vae/), or a single file, which
    takes its config (scaling factor) from the base model's VAE."""
    from nyx_tui.trainers.native import models

    sd15 = ModelSection(family="sd15", pretrained=str(tiny["sd15"]))
    own = models.load_model(sd15).vae
    for value in (tiny["sdxl"] / "vae", tiny["sdxl"]):
        model = models.load_model(sd15.model_copy(update={"vae": str(value)}))
        assert model.vae.config.scaling_factor == pytest.approx(0.13025), value  # the SDXL VAE's own config
        assert _same_weights(model.vae, sdxl.vae) and not _same_weights(model.vae, own), value
    vae_file = next((tiny["sd15"] / "vae").glob("*.safetensors"))
    xl = models.load_model(ModelSection(family="sdxl", pretrained=str(tiny["sdxl"]), vae=str(vae_file)))
    assert _same_weights(xl.vae, own) and xl.vae.config.scaling_factor == pytest.approx(0.13025)
    with pytest.raises(models.ModelLoadError, match=r"model\.vae"):
        models.load_model(sd15.model_copy(update={"vae": str(tiny["root"] / "missing-vae")}))


def test_a_family_that_does_not_fit_the_folder(tiny: dict[str, Path]) -> None:
    from nyx_tui.trainers.native import models

    with pytest.raises(models.ModelLoadError, match=r"model\.family is sd15 but .* has a second text encoder"):
        models.load_model(ModelSection(family="sd15", pretrained=str(tiny["sdxl"])))
    with pytest.raises(models.ModelLoadError, match=r"model\.family is sdxl but .* has no text_encoder_2"):
        models.load_model(ModelSection(family="sdxl", pretrained=str(tiny["sd15"])))


def test_the_native_backend_takes_sd2_and_sdxl_and_a_vae() -> None:
    from nyx_tui.trainers.base import NativeTrainer

    def fields(**model: Any) -> set[str]:
        cfg = TrainingConfig.model_validate({"model": {"pretrained": "x", **model}})
        return {p.field for p in NativeTrainer().problems(cfg) if p.is_error}

    assert "model.family" not in fields(family="sdxl", vae="y") | fields(family="sd2")
    assert "model.vae" not in fields(family="sdxl", vae="y")
    for family in ("flux", "sd3"):  # the flow families train natively too (issue 8)
        cfg = TrainingConfig.model_validate({"model": {"family": family, "pretrained": "x"}})
        assert not [p for p in NativeTrainer().problems(cfg) if p.field == "model.family"]
