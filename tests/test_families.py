"""Model families: detection from folders, checkpoint headers, LoRA and VAE files and repo ids; the family
defaults; the pre-flight errors when the files and model.family disagree.

The diffusers folders are written by the real classes (tiny, random weights); the single files are
synthetic safetensors with the key names (and the few shapes) the detection reads.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import save_file

from nyx_tui.config.check import check_config, check_file, preflight
from nyx_tui.config.fields import Family
from nyx_tui.config.io import dumps_config, parse_config
from nyx_tui.config.model import ModelSection, TrainingConfig
from nyx_tui.config.presets import builtin_presets, load_preset
from nyx_tui.families import (
    FAMILY_DEFAULTS,
    REPO_NOT_CHECKED,
    Detection,
    Kind,
    base_model_version,
    defaults,
    detect,
    detect_keys,
    modelspec_architecture,
)

SD15, SD2, SDXL, FLUX, SD3 = Family.SD15, Family.SD2, Family.SDXL, Family.FLUX, Family.SD3


# ----------------------------------------------------------------------------------------- builders


def _unet(**extra: Any) -> Any:
    from diffusers import UNet2DConditionModel

    args: dict[str, Any] = dict(
        sample_size=8,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
    )
    return UNet2DConditionModel(**(args | extra))


def _vae(**extra: Any) -> Any:
    from diffusers import AutoencoderKL

    args: dict[str, Any] = dict(
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
    )
    return AutoencoderKL(**(args | extra))


def _clip(tokenizer: Any, with_projection: bool = False, **extra: Any) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=32,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)


def _scheduler(**extra: Any) -> Any:
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False, steps_offset=1, **extra
    )


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny diffusers folders of every family, saved by the real pipeline/model classes."""
    from diffusers import (
        FluxTransformer2DModel,
        SD3Transformer2DModel,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
    )

    from nyx_tui.demo_assets import _tokenizer, build_tiny_sd15

    root = tmp_path_factory.mktemp("families")
    out: dict[str, Path] = {"sd15": build_tiny_sd15(root / "sd15")}
    tok = _tokenizer()
    sd2: Any = StableDiffusionPipeline(
        vae=_vae(),
        text_encoder=_clip(tok, hidden_act="gelu"),  # OpenCLIP-shaped
        tokenizer=tok,
        unet=_unet(use_linear_projection=True),
        scheduler=_scheduler(prediction_type="v_prediction"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    sd2.save_pretrained(root / "sd2")
    out["sd2"] = root / "sd2"
    sdxl: Any = StableDiffusionXLPipeline(
        vae=_vae(scaling_factor=0.13025),
        text_encoder=_clip(tok),
        text_encoder_2=_clip(tok, with_projection=True),
        tokenizer=tok,
        tokenizer_2=tok,
        unet=_unet(
            cross_attention_dim=64,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + 32,
        ),
        scheduler=_scheduler(),
    )
    sdxl.save_pretrained(root / "sdxl")
    out["sdxl"] = root / "sdxl"
    # Flux and SD3: the transformer's config from the real class, model_index.json as diffusers writes it
    flux = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=True,
        axes_dims_rope=(4, 4, 8),
    )
    sd3 = SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=64,
        caption_projection_dim=32,
        pooled_projection_dim=64,
        pos_embed_max_size=16,
    )
    for name, cls, model in (("flux", "FluxPipeline", flux), ("sd3", "StableDiffusion3Pipeline", sd3)):
        folder = root / name
        model.save_config(folder / "transformer")
        _vae(latent_channels=16, scaling_factor=defaults(name).vae_scaling_factor).save_config(folder / "vae")
        index = {"_class_name": cls, "transformer": ["diffusers", type(model).__name__]}
        (folder / "model_index.json").write_text(json.dumps(index))
        (folder / "scheduler").mkdir()
        (folder / "scheduler" / "scheduler_config.json").write_text(
            json.dumps({"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0})
        )
        out[name] = folder
    return out


def st_file(path: Path, shapes: dict[str, tuple[int, ...]], metadata: dict[str, str] | None = None) -> Path:
    """A safetensors file with these keys (zeros of these shapes) and metadata."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: np.zeros(s, np.float32) for k, s in shapes.items()}, str(path), metadata=metadata)
    return path


def keys(*names: str, shape: tuple[int, ...] = (1,)) -> dict[str, tuple[int, ...]]:
    return dict.fromkeys(names, shape)


def lora(*modules: str, **widths: int) -> dict[str, tuple[int, ...]]:
    """kohya-style keys (.lora_down/.lora_up/.alpha) for these module names; `widths` gives a module's
    input width (the down matrix is rank x width)."""
    out: dict[str, tuple[int, ...]] = {}
    for m in modules:
        out[f"{m}.lora_down.weight"] = (4, widths.get(m, 8))
        out[f"{m}.lora_up.weight"] = (8, 4)
        out[f"{m}.alpha"] = ()
    return out


# ------------------------------------------------------------------------------------ process hygiene


def test_importing_families_and_detecting_never_imports_torch(tmp_path: Path) -> None:
    path = st_file(tmp_path / "x.safetensors", lora("lora_unet_double_blocks_0_img_attn_qkv"))
    code = f"""
import json, sys
import nyx_tui.families, nyx_tui.config.check
d = nyx_tui.families.detect({str(path)!r})
loaded = [m for m in ("torch", "diffusers", "transformers") if m in sys.modules]
print(json.dumps({{"family": d.family, "loaded": loaded}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"family": "flux", "loaded": []}


# ----------------------------------------------------------------------------------------- defaults


def test_family_defaults() -> None:
    assert set(FAMILY_DEFAULTS) == set(Family)
    res = {f.value: d.resolution for f, d in FAMILY_DEFAULTS.items()}
    assert res == {"sd15": 512, "sd2": 768, "sdxl": 1024, "flux": 1024, "sd3": 1024}
    assert defaults("sd2").prediction_type == "v_prediction" and defaults(SD15).prediction_type == "epsilon"
    assert all(d.max_token_length == 75 for d in FAMILY_DEFAULTS.values())
    assert (defaults(SD15).bucket_step, defaults(SDXL).min_bucket_step, defaults(SD2).min_bucket_step) == (64, 32, 64)
    assert [d.base_model_version for d in FAMILY_DEFAULTS.values()] == [
        "sd_v1",
        "sd_v2",
        "sdxl_base_v1-0",
        "flux1",
        "sd3",
    ]
    assert defaults(SDXL).called == "an SDXL" and defaults(FLUX).called == "a Flux"


def test_metadata_strings_follow_sd_scripts() -> None:
    assert base_model_version(SD15) == "sd_v1" and base_model_version(SD2, "v_prediction") == "sd_v2_v"
    assert (
        base_model_version(SD2, "epsilon") == "sd_v2" and base_model_version(SDXL, "v_prediction") == "sdxl_base_v1-0"
    )
    assert modelspec_architecture(SD15) == "stable-diffusion-v1/lora"
    assert modelspec_architecture(SD2, "v_prediction") == "stable-diffusion-v2-768-v/lora"
    assert modelspec_architecture(SD2, "epsilon") == "stable-diffusion-v2-512/lora"
    assert modelspec_architecture(SDXL) == "stable-diffusion-xl-v1-base/lora"
    assert modelspec_architecture(FLUX) == "flux-1-dev/lora"


def test_lora_metadata_uses_the_family() -> None:
    from nyx_tui.trainers.native.lora_io import build_metadata

    cfg = TrainingConfig.model_validate({"model": {"family": "sdxl", "pretrained": "x"}})
    meta = build_metadata(
        cfg,
        step=1,
        num_train_images=1,
        tag_frequency={},
        started_at=0.0,
        mixed_precision="no",
        prediction_type="epsilon",
        epoch=1,
        num_epochs=1,
    )
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["modelspec.resolution"] == "1024x1024"  # the family's resolution, not set in the config


# ------------------------------------------------------------------------------------ diffusers folders


def test_diffusers_pipelines(folders: dict[str, Path]) -> None:
    for name in ("sd15", "sd2", "sdxl", "flux", "sd3"):
        found = detect(folders[name])
        assert found.kind is Kind.DIFFUSERS, (name, found)
        assert found.family == Family(name), (name, found)
    assert detect(folders["sd15"]).prediction_type == "epsilon"
    assert detect(folders["sd2"]).prediction_type == "v_prediction"
    assert detect(folders["flux"]).prediction_type == "flow"
    assert "StableDiffusionXLPipeline" in detect(folders["sdxl"]).reason


def test_sd2_told_by_the_text_encoder_alone(folders: dict[str, Path], tmp_path: Path) -> None:
    """Without v-prediction (an SD2-base-like folder) the OpenCLIP-shaped text encoder still says SD2."""
    import shutil

    base = shutil.copytree(folders["sd2"], tmp_path / "sd2-base")
    sched = base / "scheduler" / "scheduler_config.json"
    sched.write_text(json.dumps({**json.loads(sched.read_text()), "prediction_type": "epsilon"}))
    found = detect(base)
    assert found.family is SD2 and found.prediction_type == "epsilon" and "gelu" in found.reason


def test_real_widths_decide_before_structure(tmp_path: Path) -> None:
    for width, family in ((768, SD15), (1024, SD2)):
        folder = tmp_path / str(width)
        (folder / "unet").mkdir(parents=True)
        (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
        (folder / "unet" / "config.json").write_text(
            json.dumps({"_class_name": "UNet2DConditionModel", "cross_attention_dim": width})
        )
        found = detect(folder)
        assert found.family is family and f"cross_attention_dim is {width}" in found.reason, found


def test_component_folders(folders: dict[str, Path]) -> None:
    assert detect(folders["sdxl"] / "vae") == Detection(
        Kind.VAE, (SDXL,), "an AutoencoderKL with 4 latent channels, scaling_factor 0.13025"
    )
    assert detect(folders["sd15"] / "vae").families == (SD15, SD2)
    assert detect(folders["flux"] / "vae").families == (FLUX,)
    assert detect(folders["sd3"] / "vae").families == (SD3,)
    unet = detect(folders["sdxl"] / "unet")
    assert unet.kind is Kind.DIFFUSERS and unet.family is SDXL
    assert detect(folders["sd15"] / "unet").families == (SD15, SD2)  # a toy width alone tells neither
    assert detect(folders["flux"] / "transformer").family is FLUX
    te = detect(folders["sd15"] / "text_encoder")
    assert te.kind is Kind.TEXT_ENCODER and te.families == ()  # toy width


def test_folders_that_tell_nothing(tmp_path: Path) -> None:
    empty_index = tmp_path / "m"
    (empty_index / "unet").mkdir(parents=True)
    (empty_index / "model_index.json").write_text("{}")
    assert detect(empty_index).families == ()
    other = tmp_path / "o"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "PixArtAlphaPipeline"}))
    found = detect(other)
    assert found.families == () and "PixArtAlphaPipeline" in found.reason
    assert detect(tmp_path / "missing").kind is Kind.UNKNOWN


# -------------------------------------------------------------------------------- single-file models


CHECKPOINTS: dict[str, tuple[dict[str, tuple[int, ...]], tuple[Family, ...]]] = {
    "sd15": (
        keys("model.diffusion_model.input_blocks.0.0.weight", "cond_stage_model.transformer.text_model.x")
        | {"model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (8, 768)},
        (SD15,),
    ),
    "sd2": (keys("model.diffusion_model.input_blocks.0.0.weight", "cond_stage_model.model.ln_final.weight"), (SD2,)),
    "sdxl": (
        keys(
            "model.diffusion_model.input_blocks.0.0.weight",
            "conditioner.embedders.0.transformer.text_model.x",
            "conditioner.embedders.1.model.ln_final.weight",
        ),
        (SDXL,),
    ),
    "flux": (keys("double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight"), (FLUX,)),
    "flux-prefixed": (keys("model.diffusion_model.double_blocks.0.img_attn.qkv.weight"), (FLUX,)),
    "flux-diffusers": (
        keys("transformer_blocks.0.attn.to_q.weight", "single_transformer_blocks.0.proj_out.weight"),
        (FLUX,),
    ),
    "sd3": (keys("model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight"), (SD3,)),
    "unet-only-sdxl": (
        {"model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": (8, 2048)},
        (SDXL,),
    ),
}


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_single_file_checkpoints(name: str, tmp_path: Path) -> None:
    shapes, families = CHECKPOINTS[name]
    found = detect(st_file(tmp_path / f"{name}.safetensors", shapes))
    assert found.kind is Kind.CHECKPOINT and found.families == families, found


def test_single_file_odds(tmp_path: Path, folders: dict[str, Path]) -> None:
    vpred = detect(st_file(tmp_path / "v.safetensors", keys("conditioner.embedders.1.model.x", "v_pred")))
    assert vpred.family is SDXL and vpred.prediction_type == "v_prediction"
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"\x80\x02pickle")
    assert detect(ckpt) == Detection(Kind.CHECKPOINT, (), "pickle checkpoint; family from the config")
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"x")
    assert detect(broken).kind is Kind.UNKNOWN and "not a readable" in detect(broken).reason
    # the UNet weights of a diffusers folder, as one file: diffusers keys, a toy width
    unet = detect(next((folders["sdxl"] / "unet").glob("*.safetensors")))
    assert unet.kind is Kind.CHECKPOINT and unet.family is SDXL  # add_embedding: SDXL's time ids
    assert detect(next((folders["sd15"] / "unet").glob("*.safetensors"))).families == (SD15, SD2, SDXL)


def test_single_file_vae_and_text_encoders(tmp_path: Path, folders: dict[str, Path]) -> None:
    ldm_vae = keys("encoder.down.0.block.0.conv1.weight", "decoder.up.0.block.0.conv1.weight", "quant_conv.weight")
    four = detect(st_file(tmp_path / "vae4.safetensors", ldm_vae | {"decoder.conv_in.weight": (8, 4, 3, 3)}))
    assert four.kind is Kind.VAE and four.families == (SD15, SD2, SDXL)
    sixteen = detect(st_file(tmp_path / "ae.safetensors", ldm_vae | {"decoder.conv_in.weight": (8, 16, 3, 3)}))
    assert sixteen.kind is Kind.VAE and sixteen.families == (FLUX, SD3)
    saved = detect(next((folders["sd15"] / "vae").glob("*.safetensors")))
    assert saved.kind is Kind.VAE and saved.families == (SD15, SD2, SDXL)
    clip_l = detect(
        st_file(
            tmp_path / "clip_l.safetensors",
            keys("text_model.embeddings.token_embedding.weight") | {"text_model.final_layer_norm.weight": (768,)},
        )
    )
    assert clip_l.kind is Kind.TEXT_ENCODER and clip_l.families == (SD15, SDXL, FLUX, SD3)
    t5 = detect(
        st_file(tmp_path / "t5.safetensors", keys("encoder.block.0.layer.0.SelfAttention.q.weight", "shared.weight"))
    )
    assert t5.kind is Kind.TEXT_ENCODER and t5.families == (FLUX, SD3)
    saved_te = detect(next((folders["sd15"] / "text_encoder").glob("*.safetensors")))
    assert saved_te.kind is Kind.TEXT_ENCODER and saved_te.families == ()


# ------------------------------------------------------------------------------------------- LoRAs

TE = "lora_te_text_model_encoder_layers_0_self_attn_k_proj"
TE1 = "lora_te1_text_model_encoder_layers_0_self_attn_k_proj"
TE2 = "lora_te2_text_model_encoder_layers_0_self_attn_k_proj"
D_ATTN2 = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
SGM_ATTN2 = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k"

LORAS: dict[str, tuple[dict[str, tuple[int, ...]], dict[str, str], tuple[Family, ...]]] = {
    # sd-scripts SD1: diffusers module names, lora_te_; the widths say SD1 (768) or SD2 (1024)
    "sd1-kohya": (lora(TE, D_ATTN2, **{TE: 768, D_ATTN2: 768}), {}, (SD15,)),
    "sd2-kohya": (lora(TE, D_ATTN2, **{TE: 1024, D_ATTN2: 1024}), {}, (SD2,)),
    "sd12-tiny": (lora(TE, D_ATTN2), {}, (SD15, SD2)),
    "sd12-tiny+meta": (lora(TE, D_ATTN2), {"ss_base_model_version": "sd_v2_v"}, (SD2,)),
    "sd1-unet-only+modelspec": (lora(D_ATTN2), {"modelspec.architecture": "stable-diffusion-v1/lora"}, (SD15,)),
    # sd-scripts SDXL: SGM names and te1/te2; diffusers' converter: diffusers names and te1/te2
    "sdxl-kohya": (lora(TE1, TE2, SGM_ATTN2), {}, (SDXL,)),
    "sdxl-unet-only": (lora(SGM_ATTN2), {}, (SDXL,)),
    "sdxl-diffusers-names": (lora(TE1, D_ATTN2), {}, (SDXL,)),
    "flux-kohya": (
        lora("lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_single_blocks_37_modulation_lin", TE1),
        {"ss_base_model_version": "flux1"},
        (FLUX,),
    ),
    "sd3-kohya": (lora("lora_unet_joint_blocks_0_x_block_attn_qkv", TE1, TE2), {}, (SD3,)),
    "lycoris-sd1": (
        {f"{D_ATTN2}.hada_w1_a": (4, 4), f"{D_ATTN2}.hada_w1_b": (4, 4), f"{TE}.hada_w1_a": (4, 4)},
        {},
        (SD15, SD2),
    ),
    "unknown-keys+meta": (
        {"some_module.lora_down.weight": (4, 8)},
        {"ss_base_model_version": "sdxl_base_v1-0"},
        (SDXL,),
    ),
    "keys-beat-wrong-meta": (lora(TE1, SGM_ATTN2), {"ss_base_model_version": "sd_v1"}, (SDXL,)),
}

PEFT: dict[str, tuple[dict[str, tuple[int, ...]], tuple[Family, ...]]] = {
    "flux-peft": (
        {
            "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": (4, 64),
            "transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": (4, 64),
        },
        (FLUX,),
    ),
    "flux-bfl": ({"diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight": (4, 64)}, (FLUX,)),
    "sd3-peft-by-width": ({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": (4, 1536)}, (SD3,)),
    "flow-peft-tiny": ({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": (4, 64)}, (FLUX, SD3)),
    "sdxl-peft-by-width": (
        {"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight": (4, 2048)},
        (SDXL,),
    ),
    "unet-peft-tiny": (
        {"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": (4, 32)},
        (SD15, SD2, SDXL),
    ),
}


@pytest.mark.parametrize("name", list(LORAS))
def test_kohya_loras(name: str, tmp_path: Path) -> None:
    shapes, metadata, families = LORAS[name]
    found = detect(st_file(tmp_path / f"{name}.safetensors", shapes, metadata))
    assert found.kind is Kind.LORA and found.families == families, found


@pytest.mark.parametrize("name", list(PEFT))
def test_diffusers_and_bfl_loras(name: str, tmp_path: Path) -> None:
    shapes, families = PEFT[name]
    found = detect(st_file(tmp_path / f"{name}.safetensors", shapes))
    assert found.kind is Kind.LORA and found.families == families, found


def test_lora_prediction_type_from_metadata() -> None:
    found = detect_keys([f"{TE}.lora_down.weight"], {"modelspec.prediction_type": "v"})
    assert found.prediction_type == "v_prediction"


# --------------------------------------------------------------------------------------- repo ids


def test_repo_id_uncached_tells_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert detect("stabilityai/stable-diffusion-xl-base-1.0") == Detection(Kind.REPO_ID, (), REPO_NOT_CHECKED)


def test_repo_id_in_the_local_cache_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    repo = tmp_path / "hub" / "models--someone--tiny-sdxl"
    snapshot = repo / "snapshots" / ("a" * 40)
    (snapshot / "unet").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    (snapshot / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    found = detect("someone/tiny-sdxl")
    assert found.kind is Kind.DIFFUSERS and found.family is SDXL and "local Hugging Face cache" in found.reason
    cfg = TrainingConfig.model_validate({"model": {"pretrained": "someone/tiny-sdxl"}})
    (problem,) = [p for p in check_config(cfg) if p.field.startswith("model")]
    assert problem.field == "model.family" and "an SDXL model" in problem.message


# -------------------------------------------------------------------------------------- pre-flight


def _images(tmp_path: Path) -> Path:
    images = tmp_path / "images"
    images.mkdir(exist_ok=True)
    (images / "a.png").write_bytes(b"x")
    (images / "a.txt").write_text("a cat")
    return images


def _check(tmp_path: Path, **model: Any) -> list[Any]:
    """The model.* problems the pre-flight finds for this [model] table (the backend's own limits, such as
    the families the native engine trains so far, are not looked at here)."""
    cfg = TrainingConfig.model_validate(
        {
            "model": {k: str(v) for k, v in model.items()},
            "dataset": {"subsets": [{"image_dir": str(_images(tmp_path))}]},
        }
    )
    return [p for p in preflight(cfg) if p.field.startswith("model")]


def test_preflight_family_mismatch_names_both(folders: dict[str, Path], tmp_path: Path) -> None:
    (p,) = _check(tmp_path, family="sd15", pretrained=folders["sdxl"])
    assert p.is_error and p.field == "model.family"
    assert "model.pretrained is an SDXL model" in p.message and "model.family is sd15" in p.message
    assert 'set model.family = "sdxl"' in p.fix
    for name in ("sd15", "sd2", "sdxl", "flux", "sd3"):
        assert _check(tmp_path, family=name, pretrained=folders[name]) == [], name
    (flux,) = _check(tmp_path, family="sdxl", pretrained=folders["flux"])
    assert "a Flux model" in flux.message


def test_preflight_single_file_mismatch(tmp_path: Path) -> None:
    shapes, _ = CHECKPOINTS["flux"]
    path = st_file(tmp_path / "flux1-dev.safetensors", shapes)
    (p,) = _check(tmp_path, family="sdxl", pretrained=path)
    assert p.field == "model.family" and 'set model.family = "flux"' in p.fix
    # under flux the family fits; what is left are the missing pieces of a transformer-only file (flow_check)
    fields = {p.field for p in _check(tmp_path, family="flux", pretrained=path)}
    assert "model.family" not in fields and {"model.t5xxl", "model.vae"} <= fields


def test_preflight_vae_mismatch(folders: dict[str, Path], tmp_path: Path) -> None:
    (p,) = _check(tmp_path, family="sdxl", pretrained=folders["sdxl"], vae=folders["sd15"] / "vae")
    assert p.field == "model.vae" and p.is_error
    assert "this VAE is for SD1.5 or SD2" in p.message and "the model is SDXL" in p.message
    assert "remove model.vae" in p.fix
    assert _check(tmp_path, family="sdxl", pretrained=folders["sdxl"], vae=folders["sdxl"] / "vae") == []
    # SD1.5 and SD2 share their VAE; a single-file 4-channel VAE fits all three UNet families
    assert _check(tmp_path, family="sd2", pretrained=folders["sd2"], vae=folders["sd15"] / "vae") == []
    vae_file = next((folders["sd15"] / "vae").glob("*.safetensors"))
    assert _check(tmp_path, family="sdxl", pretrained=folders["sdxl"], vae=vae_file) == []
    (flux_vae,) = _check(tmp_path, family="sd15", pretrained=folders["sd15"], vae=folders["flux"] / "vae")
    assert flux_vae.field == "model.vae" and "for Flux" in flux_vae.message


def test_preflight_all_at_once(folders: dict[str, Path], tmp_path: Path) -> None:
    """The model is SDXL, model.family says sd15 and the VAE is SD1.5's: both errors, in one check."""
    problems = _check(tmp_path, family="sd15", pretrained=folders["sdxl"], vae=folders["sd15"] / "vae")
    assert [p.field for p in problems] == ["model.family", "model.vae"]
    assert "the model is SDXL" in problems[1].message


def test_preflight_wrong_kind_of_file(folders: dict[str, Path], tmp_path: Path) -> None:
    shapes, metadata, _ = LORAS["sdxl-kohya"]
    lora_file = st_file(tmp_path / "mychar.safetensors", shapes, metadata)
    (p,) = _check(tmp_path, family="sdxl", pretrained=lora_file)
    assert p.field == "model.pretrained" and "is a LoRA" in p.message and "not a whole base model" in p.message
    (v,) = _check(tmp_path, family="sdxl", pretrained=folders["sdxl"] / "vae")
    assert v.field == "model.pretrained" and "is a VAE" in v.message and "model.vae" in v.fix
    (q,) = _check(tmp_path, family="sdxl", pretrained=folders["sdxl"], vae=lora_file)
    assert q.field == "model.vae" and "is a LoRA" in q.message


def test_preflight_is_quiet_when_nothing_can_be_told(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"\x80\x02pickle")
    odd = st_file(tmp_path / "odd.safetensors", keys("some.weight"))
    for pretrained in (ckpt, odd):
        for family in ("sd15", "sdxl"):
            assert _check(tmp_path, family=family, pretrained=pretrained) == [], (pretrained, family)
        # a Flux single file must bring (or be given) its encoders and VAE: flow_check says which, never the family
        assert "model.family" not in {p.field for p in _check(tmp_path, family="flux", pretrained=pretrained)}
    for family in ("sd15", "sdxl", "flux"):  # a repo id not in the cache: only that it must be downloaded first
        (problem,) = _check(tmp_path, family=family, pretrained="stabilityai/stable-diffusion-xl-base-1.0")
        assert problem.severity == "warning" and "not in the local Hugging Face cache" in problem.message


def _family_errors(problems: list[Any]) -> list[Any]:
    return [p for p in problems if p.is_error and "model.pretrained is" in p.message]


def test_check_file_reports_the_mismatch(folders: dict[str, Path], tmp_path: Path) -> None:
    _images(tmp_path)
    path = tmp_path / "run.toml"
    text = "[model]\nfamily = '{}'\npretrained = '{}'\n[[dataset.subsets]]\nimage_dir = 'images'\n"
    path.write_text(text.format("sd15", folders["sdxl"]))
    result = check_file(path)
    assert not result.ok and [p.field for p in _family_errors(result.errors)] == ["model.family"]
    path.write_text(text.format("sdxl", folders["sdxl"]))
    assert _family_errors(check_file(path).problems) == []
    assert result.config is not None
    assert [p.field for p in _family_errors(check_config(result.config))] == ["model.family"]


# ------------------------------------------------------------------------- defaults that follow the family


def test_resolution_follows_the_family_when_left_out() -> None:
    assert TrainingConfig().dataset.resolution == 512
    for family, res in (("sd15", 512), ("sd2", 768), ("sdxl", 1024), ("flux", 1024), ("sd3", 1024)):
        cfg = parse_config(f"[model]\nfamily = '{family}'\n")
        assert cfg.dataset.resolution == res, family
        assert "resolution" not in cfg.dataset.model_fields_set
    explicit = parse_config("[model]\nfamily = 'sdxl'\n[dataset]\nresolution = 512\n")
    assert explicit.dataset.resolution == 512


def test_resolution_from_the_family_round_trips() -> None:
    cfg = parse_config("[model]\nfamily = 'sdxl'\n")
    text = dumps_config(cfg)
    assert "resolution = 1024" in text
    again = parse_config(text)
    assert again == cfg and again.dataset.resolution == 1024


def test_resolution_follows_a_changed_family_until_set() -> None:
    cfg = parse_config("[model]\nfamily = 'sd15'\n")
    cfg.model = ModelSection(family=Family.SDXL)
    assert cfg.dataset.resolution == 1024
    cfg.dataset.resolution = 768
    cfg.model = ModelSection(family=Family.SD15)
    assert cfg.dataset.resolution == 768  # set by hand: kept


def test_an_instance_passed_in_is_not_changed() -> None:
    from nyx_tui.config.model import DatasetSection

    dataset = DatasetSection()
    cfg = TrainingConfig(model=ModelSection(family=Family.SDXL), dataset=dataset)
    assert cfg.dataset.resolution == 1024 and dataset.resolution == 512


@pytest.mark.parametrize("name", builtin_presets())
def test_presets_keep_their_resolution(name: str) -> None:
    cfg = load_preset(name)
    assert parse_config(dumps_config(cfg)) == cfg
