"""Flux and SD3 from the files users have: the loader (`flow_files`) and the pre-flight (`flow_check`).

The loader tests write tiny diffusers models as ComfyUI-style separate files (BFL/SGM transformer names, LDM
autoencoder, transformers-keyed encoders; `flow_files_fixtures`) and check the model read back from them is
the model read from the folder: same transformer output, same text encodings, same latents. The pre-flight
tests use header-only numpy files (no torch) and check each message.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import save_file as save_numpy

from nyx_tui.config.check import preflight
from nyx_tui.config.errors import Problem
from nyx_tui.config.model import ModelSection, TrainingConfig
from nyx_tui.trainers.native import flow_check
from nyx_tui.trainers.native.flow_check import flow_problems

ROOT = Path(__file__).resolve().parents[1]
DEV_REPO_FETCH = "hf download black-forest-labs/FLUX.1-dev --include '*.json' '*.txt' '*.model'"


@pytest.fixture
def empty_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A Hugging Face cache with nothing in it (the reference repos are absent)."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def fake_cached_repo(cache: Path, repo: str, source: Path) -> Path:
    """Put the configs and tokenizers (no weights) of `source` into `cache` as the snapshot of `repo`."""
    commit = "0" * 40
    base = cache / f"models--{repo.replace('/', '--')}"
    snapshot = base / "snapshots" / commit
    for file in source.rglob("*"):
        if file.is_file() and file.suffix in (".json", ".txt", ".model"):
            target = snapshot / file.relative_to(source)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(file, target)
    (base / "refs").mkdir(parents=True, exist_ok=True)
    (base / "refs" / "main").write_text(commit)
    return snapshot


# ------------------------------------------------------------------------------------------ loading (torch)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from nyx_tui.demo_assets import build_tiny_flux, build_tiny_sd3

    root = tmp_path_factory.mktemp("flow-models")
    return {
        "dev": build_tiny_flux(root / "flux-dev"),
        "schnell": build_tiny_flux(root / "flux-schnell", schnell=True),
        "sd3": build_tiny_sd3(root / "sd3"),
    }


def _load(**fields: Any) -> Any:
    from nyx_tui.trainers.native.flow_files import load_flow_model

    return load_flow_model(ModelSection(**{k: str(v) if isinstance(v, Path) else v for k, v in fields.items()}))


def _flux_out(model: Any, seed: int = 0) -> Any:
    import torch

    g = torch.Generator().manual_seed(seed)
    tokens, text = 16, 8
    hidden = torch.randn(1, tokens, 64, generator=g)
    enc = torch.randn(1, text, 32, generator=g)
    pooled = torch.randn(1, 32, generator=g)
    img_ids = torch.zeros(tokens, 3)
    img_ids[:, 1] = torch.arange(tokens) // 4
    img_ids[:, 2] = torch.arange(tokens) % 4
    kwargs: dict[str, Any] = {"guidance": torch.full((1,), 3.5)} if model.guidance_embeds else {}
    with torch.no_grad():
        return model.transformer(
            hidden_states=hidden,
            encoder_hidden_states=enc,
            pooled_projections=pooled,
            timestep=torch.full((1,), 0.5),
            img_ids=img_ids,
            txt_ids=torch.zeros(text, 3),
            **kwargs,
        ).sample


def _sd3_out(transformer: Any, seed: int = 0) -> Any:
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return transformer(
            hidden_states=torch.randn(1, 16, 8, 8, generator=g),
            encoder_hidden_states=torch.randn(1, 6, 64, generator=g),
            pooled_projections=torch.randn(1, 64, generator=g),
            timestep=torch.full((1,), 500.0),
        ).sample


def _encodings(model: Any) -> list[Any]:
    """Every text encoder's output for one caption, and the VAE's latent mean for one image."""
    import torch

    caption = ["a red circle"]
    out = []
    with torch.no_grad():
        for tokenizer, encoder in (
            (model.tokenizer, model.text_encoder),
            (model.tokenizer_2, model.text_encoder_2),
            (model.tokenizer_3, model.text_encoder_3),
        ):
            if encoder is None:
                continue
            ids = tokenizer(caption, padding="max_length", max_length=16, truncation=True, return_tensors="pt")
            result = encoder(ids.input_ids, output_hidden_states=True)
            out.append(result.hidden_states[-1])
            out += [getattr(result, name) for name in ("pooler_output", "text_embeds") if hasattr(result, name)]
        image = torch.linspace(-1, 1, 3 * 64 * 64).reshape(1, 3, 64, 64)
        out.append(model.vae.encode(image).latent_dist.mean)
    return out


def _same(a: list[Any], b: list[Any]) -> None:
    import torch

    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y)  # float32 rounding: split q/k/v are views at other offsets


def _all_eval(model: Any) -> bool:
    return all(not m.training for part in model.parts for m in part.modules())


@pytest.mark.parametrize(
    ("variant", "prefix", "ldm_vae"), [("dev", "model.diffusion_model.", True), ("schnell", "", False)]
)
def test_flux_from_separate_files_is_the_folder_model(
    tiny: dict[str, Path], tmp_path: Path, variant: str, prefix: str, ldm_vae: bool
) -> None:
    """A BFL transformer file (prefixed or not) + clip_l + t5xxl + ae files load as the diffusers folder does;
    dev or schnell is told from the weights (the config folder is the other variant's, on purpose)."""
    from flow_files_fixtures import write_flux_files

    folder = tiny[variant]
    other = tiny["schnell" if variant == "dev" else "dev"]
    reference = _load(family="flux", pretrained=folder)
    files = write_flux_files(reference, tmp_path, prefix=prefix, ldm_vae=ldm_vae)
    model = _load(family="flux", flow_config=other, **files)
    assert model.variant == reference.variant == variant
    assert model.guidance_embeds is (variant == "dev")
    assert model.t5_max_token_length == (512 if variant == "dev" else 256)
    assert bool(model.noise_scheduler.config.use_dynamic_shifting) is (variant == "dev")
    assert _all_eval(model)
    _same([_flux_out(model)], [_flux_out(reference)])
    _same(_encodings(model), _encodings(reference))
    assert model.source["clip_l"] == str(files["clip_l"]) and model.source["config"] == str(other)


@pytest.mark.parametrize("inside", [True, False], ids=["one-checkpoint", "separate-files"])
def test_sd3_from_files_is_the_folder_model(tiny: dict[str, Path], tmp_path: Path, inside: bool) -> None:
    """An SGM checkpoint with its encoders and VAE inside, or a bare transformer with clip_l/clip_g/t5xxl/vae
    files, loads as the diffusers folder does."""
    from flow_files_fixtures import write_sd3_files

    reference = _load(family="sd3", pretrained=tiny["sd3"])
    files = write_sd3_files(reference, tmp_path, inside=inside)
    model = _load(family="sd3", flow_config=tiny["sd3"], **files)
    assert model.variant == reference.variant == "medium"
    assert model.t5_max_token_length == 256
    assert _all_eval(model)
    _same([_sd3_out(model.transformer)], [_sd3_out(reference.transformer)])
    _same(_encodings(model), _encodings(reference))
    assert model.source["t5xxl"].endswith("(inside)") is inside


def test_fp8_flux_file_loads_upcast(tiny: dict[str, Path], tmp_path: Path) -> None:
    """A transformer stored in float8_e4m3fn loads as float32 holding exactly the fp8 values; its output stays
    close to the full-precision model's."""
    import torch
    from flow_files_fixtures import write_flux_files

    reference = _load(family="flux", pretrained=tiny["dev"])
    files = write_flux_files(reference, tmp_path, fp8=True)
    model = _load(family="flux", flow_config=tiny["dev"], **files)
    weight = model.transformer.transformer_blocks[0].attn.to_q.weight
    expected = reference.transformer.transformer_blocks[0].attn.to_q.weight.to(torch.float8_e4m3fn).float()
    assert weight.dtype == torch.float32 and torch.equal(weight, expected)
    assert {p.dtype for p in model.transformer.parameters()} == {torch.float32}
    ours, theirs = _flux_out(model), _flux_out(reference)
    assert not torch.equal(ours, theirs)  # it really was stored in fp8
    assert (ours - theirs).norm() / theirs.norm() < 0.1


def test_missing_reference_repo_names_the_download(tiny: dict[str, Path], tmp_path: Path, empty_hub: Path) -> None:
    """Without model.flow_config the configs come from the variant's reference repo; absent, the error says how
    to fetch exactly its configs and tokenizers. Put in the cache, the same files load."""
    from flow_files_fixtures import write_flux_files

    from nyx_tui.trainers.native.models import ModelLoadError

    reference = _load(family="flux", pretrained=tiny["dev"])
    files = write_flux_files(reference, tmp_path)
    with pytest.raises(ModelLoadError) as err:
        _load(family="flux", **files)
    assert DEV_REPO_FETCH in str(err.value) and "model.flow_config" in str(err.value)
    fake_cached_repo(empty_hub, "black-forest-labs/FLUX.1-schnell", tiny["schnell"])  # the other variant's will do
    model = _load(family="flux", **files)
    assert model.variant == "dev" and "FLUX.1-schnell" in model.source["config"]
    _same([_flux_out(model)], [_flux_out(reference)])


def test_loader_names_missing_pieces_and_wrong_files(tiny: dict[str, Path], tmp_path: Path) -> None:
    from flow_files_fixtures import write_flux_files

    from nyx_tui.trainers.native.models import ModelLoadError

    reference = _load(family="flux", pretrained=tiny["dev"])
    files = write_flux_files(reference, tmp_path)
    with pytest.raises(
        ModelLoadError, match=re.escape("this Flux file has no text encoders: set model.t5xxl and model.clip_l")
    ):
        _load(family="flux", pretrained=files["pretrained"], vae=files["vae"], flow_config=tiny["dev"])
    swapped = {**files, "clip_l": files["t5xxl"]}
    with pytest.raises(ModelLoadError, match="is a T5 text encoder, not CLIP-L"):
        _load(family="flux", flow_config=tiny["dev"], **swapped)
    with pytest.raises(ModelLoadError, match=re.escape("is a Flux transformer but model.family is sd3")):
        _load(family="sd3", flow_config=tiny["sd3"], **files)
    with pytest.raises(ModelLoadError, match="is a T5 text encoder, not a Flux transformer"):
        _load(family="flux", flow_config=tiny["dev"], **{**files, "pretrained": files["t5xxl"]})


# ------------------------------------------------------------------------------------------ pre-flight (no torch)


def _np_file(path: Path, shapes: dict[str, tuple[int, ...]]) -> Path:
    """A safetensors file with these keys and shapes (zeros): enough for header checks."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_numpy({k: np.zeros(s, dtype=np.float16) for k, s in shapes.items()}, str(path))
    return path


def _flux_keys(prefix: str = "", dev: bool = True) -> dict[str, tuple[int, ...]]:
    keys = {
        "img_in.weight": (8, 4),
        "double_blocks.0.img_attn.qkv.weight": (24, 8),
        "single_blocks.0.linear1.weight": (56, 8),
        "final_layer.linear.weight": (4, 8),
    }
    if dev:
        keys["guidance_in.in_layer.weight"] = (8, 4)
    return {prefix + k: v for k, v in keys.items()}


def _sd3_keys(width: int = 8, dual: bool = False, qk: bool = False) -> dict[str, tuple[int, ...]]:
    p = "model.diffusion_model."
    keys = {p + "x_embedder.proj.weight": (width, 16, 2, 2), p + "joint_blocks.0.x_block.attn.qkv.weight": (24, 8)}
    if dual:
        keys[p + "joint_blocks.0.x_block.attn2.qkv.weight"] = (24, 8)
    if qk:
        keys[p + "joint_blocks.0.x_block.attn.ln_q.weight"] = (4,)
    return keys


CLIP_L = {"text_model.embeddings.token_embedding.weight": (4, 768), "text_model.final_layer_norm.weight": (768,)}
CLIP_G = {"text_model.embeddings.token_embedding.weight": (4, 1280), "text_model.final_layer_norm.weight": (1280,)}
T5 = {"shared.weight": (4, 8), "encoder.block.0.layer.0.SelfAttention.q.weight": (8, 8)}
VAE = {"decoder.conv_in.weight": (4, 16, 1, 1), "encoder.conv_in.weight": (4, 3, 1, 1)}


def _config(family: str, pretrained: Path, flow: dict[str, Any] | None = None, **model: Any) -> TrainingConfig:
    fields = {"family": family, "pretrained": str(pretrained), **{k: str(v) for k, v in model.items()}}
    return TrainingConfig.model_validate({"model": fields, "flow": flow or {}})


def _by(problems: list[Problem], field: str) -> list[Problem]:
    return [p for p in problems if p.field == field]


@pytest.fixture
def config_folder(tmp_path: Path) -> Path:
    """A diffusers Flux folder's configs and tokenizers (file-less stand-ins: the pre-flight only looks)."""
    root = tmp_path / "flux-configs"
    for part in flow_check.CONFIG_PARTS[flow_check.Family.SD3]:
        (root / part).mkdir(parents=True)
        name = "scheduler_config.json" if part == "scheduler" else "config.json"
        (root / part / ("vocab.json" if part.startswith("tokenizer") else name)).write_text("{}")
    return root


def test_flux_file_without_encoders_or_vae(tmp_path: Path, config_folder: Path) -> None:
    flux = _np_file(tmp_path / "flux1-dev.safetensors", _flux_keys("model.diffusion_model."))
    problems = flow_problems(_config("flux", flux, flow_config=config_folder))
    assert [p.message for p in problems] == [
        "this Flux file has no text encoders: set model.t5xxl and model.clip_l",
        "this Flux file has no VAE (autoencoder): set model.vae",
    ]
    assert problems[0].field == "model.t5xxl" and "ae.safetensors" in problems[1].fix
    clip = _np_file(tmp_path / "clip_l.safetensors", CLIP_L)
    only_t5 = flow_problems(_config("flux", flux, flow_config=config_folder, clip_l=clip))
    assert only_t5[0].message == "this Flux file has no text encoders: set model.t5xxl"  # names only what is missing
    complete = _config(
        "flux",
        flux,
        flow_config=config_folder,
        clip_l=clip,
        t5xxl=_np_file(tmp_path / "t5xxl_fp16.safetensors", T5),
        vae=_np_file(tmp_path / "ae.safetensors", VAE),
    )
    assert flow_problems(complete) == []
    assert [p for p in preflight(complete) if p.field.startswith(("model.", "flow."))] == []


def test_sd3_checkpoint_with_clips_inside_needs_only_t5(tmp_path: Path, config_folder: Path) -> None:
    keys = _sd3_keys()
    keys.update({f"text_encoders.clip_l.transformer.{k}": v for k, v in CLIP_L.items()})
    keys.update({f"text_encoders.clip_g.transformer.{k}": v for k, v in CLIP_G.items()})
    keys.update({f"first_stage_model.{k}": v for k, v in VAE.items()})
    sd3 = _np_file(tmp_path / "sd3_medium_incl_clips.safetensors", keys)
    problems = flow_problems(_config("sd3", sd3, flow_config=config_folder))
    assert [(p.field, p.message) for p in problems] == [
        ("model.t5xxl", "this SD3 file has no T5-XXL text encoder: set model.t5xxl")
    ]
    bare = _np_file(tmp_path / "sd3.safetensors", _sd3_keys())
    msg = flow_problems(_config("sd3", bare, flow_config=config_folder))[0].message
    assert msg == "this SD3 file has no text encoders: set model.t5xxl, model.clip_l and model.clip_g"


def test_encoder_files_in_the_wrong_field(tmp_path: Path, config_folder: Path) -> None:
    flux = _np_file(tmp_path / "flux.safetensors", _flux_keys())
    t5 = _np_file(tmp_path / "t5xxl_fp16.safetensors", T5)
    clip_l = _np_file(tmp_path / "clip_l.safetensors", CLIP_L)
    clip_g = _np_file(tmp_path / "clip_g.safetensors", CLIP_G)
    vae = _np_file(tmp_path / "ae.safetensors", VAE)
    swapped = flow_problems(_config("flux", flux, flow_config=config_folder, clip_l=t5, t5xxl=clip_l, vae=vae))
    assert [(p.field, p.message.split(" is ", 1)[1]) for p in swapped] == [
        ("model.clip_l", "a T5 text encoder, not CLIP-L"),
        ("model.t5xxl", "a CLIP-L text encoder, not T5-XXL"),
    ]
    assert "put it in model.t5xxl instead" in swapped[0].fix
    sd3 = _np_file(tmp_path / "sd3.safetensors", _sd3_keys())
    crossed = flow_problems(
        _config("sd3", sd3, flow_config=config_folder, clip_l=clip_g, clip_g=clip_l, t5xxl=t5, vae=vae)
    )
    assert [(p.field, p.message.split(" is ", 1)[1]) for p in crossed] == [
        ("model.clip_l", "a CLIP-G text encoder, not CLIP-L"),
        ("model.clip_g", "a CLIP-L text encoder, not CLIP-G"),
    ]
    given_vae = flow_problems(_config("flux", flux, flow_config=config_folder, clip_l=vae, t5xxl=t5, vae=vae))
    assert given_vae[0].field == "model.clip_l" and "is a VAE, not CLIP-L" in given_vae[0].message
    missing = flow_problems(_config("flux", flux, flow_config=config_folder, clip_l=tmp_path / "nope.safetensors"))
    assert missing[0].field == "model.clip_l" and missing[0].message.startswith("not found")


def test_pretrained_that_is_an_encoder_or_the_other_family(tmp_path: Path) -> None:
    """A T5 as model.pretrained, or a Flux file under family sd3: the family check names it (once)."""
    t5 = _np_file(tmp_path / "t5xxl_fp16.safetensors", T5)
    problems = [p for p in preflight(_config("flux", t5)) if p.field.startswith("model.")]
    assert len(problems) == 1 and problems[0].field == "model.pretrained"
    assert "is a text encoder" in problems[0].message and "model.t5xxl or model.clip_l" in problems[0].fix
    vae = _np_file(tmp_path / "ae.safetensors", VAE)
    as_vae = [p for p in preflight(_config("flux", vae)) if p.field.startswith("model.")]
    assert len(as_vae) == 1 and "a VAE goes in model.vae" in as_vae[0].fix
    flux = _np_file(tmp_path / "flux1-dev.safetensors", _flux_keys("model.diffusion_model."))
    wrong = [p for p in preflight(_config("sd3", flux)) if p.field.startswith("model.")]
    assert len(wrong) == 1 and wrong[0].field == "model.family"
    assert "is a Flux model" in wrong[0].message and "model.family is sd3" in wrong[0].message
    assert 'model.family = "flux"' in wrong[0].fix


def test_configs_not_available(tmp_path: Path, empty_hub: Path) -> None:
    full = {**_flux_keys(), **{f"text_encoders.clip_l.transformer.{k}": v for k, v in CLIP_L.items()}}
    full.update({f"text_encoders.t5xxl.transformer.{k}": v for k, v in T5.items()})
    full.update({f"vae.{k}": v for k, v in VAE.items()})
    dev = _np_file(tmp_path / "flux-dev-full.safetensors", full)
    (problem,) = flow_problems(_config("flux", dev))
    assert problem.field == "model.flow_config" and DEV_REPO_FETCH in problem.fix and "HF_TOKEN" in problem.fix
    schnell = _np_file(tmp_path / "flux-schnell.safetensors", {k: v for k, v in full.items() if "guidance" not in k})
    (problem,) = flow_problems(_config("flux", schnell))
    assert "hf download black-forest-labs/FLUX.1-schnell --include" in problem.fix
    half = tmp_path / "half"
    (half / "tokenizer").mkdir(parents=True)
    (half / "tokenizer" / "vocab.json").write_text("{}")
    (problem,) = flow_problems(_config("flux", dev, flow_config=half))
    assert "lacks scheduler/, tokenizer_2/" in problem.message
    (problem,) = flow_problems(_config("flux", dev, flow_config="owner/not-cached"))
    assert "hf download owner/not-cached --include" in problem.fix
    fake_cached_repo(empty_hub, "owner/cached", _tiny_config_tree(tmp_path / "src"))
    assert flow_problems(_config("flux", dev, flow_config="owner/cached")) == []
    assert flow_problems(_config("flux", dev)) != []  # the reference repo itself is still absent
    fake_cached_repo(empty_hub, "black-forest-labs/FLUX.1-schnell", _tiny_config_tree(tmp_path / "src"))
    assert flow_problems(_config("flux", dev)) == []  # the other variant's configs describe it too


def _tiny_config_tree(root: Path) -> Path:
    (root / "model_index.json").parent.mkdir(parents=True, exist_ok=True)
    (root / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    for part in flow_check.CONFIG_PARTS[flow_check.Family.FLUX]:
        (root / part).mkdir(exist_ok=True)
        name = "scheduler_config.json" if part == "scheduler" else "config.json"
        (root / part / ("vocab.json" if part.startswith("tokenizer") else name)).write_text("{}")
    return root


def test_schnell_t5_length_warning(tmp_path: Path, config_folder: Path) -> None:
    pieces = {"clip_l": _np_file(tmp_path / "c.safetensors", CLIP_L), "t5xxl": _np_file(tmp_path / "t.safetensors", T5)}
    pieces["vae"] = _np_file(tmp_path / "ae.safetensors", VAE)
    schnell = _np_file(tmp_path / "schnell.safetensors", _flux_keys(dev=False))
    dev = _np_file(tmp_path / "dev.safetensors", _flux_keys(dev=True))
    long = {"t5_max_token_length": 512}
    (warning,) = flow_problems(_config("flux", schnell, long, flow_config=config_folder, **pieces))
    assert warning.severity == "warning" and warning.field == "flow.t5_max_token_length" and "256" in warning.message
    assert flow_problems(_config("flux", dev, long, flow_config=config_folder, **pieces)) == []
    assert (
        flow_problems(_config("flux", schnell, {"t5_max_token_length": 256}, flow_config=config_folder, **pieces)) == []
    )
    folder = tmp_path / "schnell-folder"
    (folder / "transformer").mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    (folder / "transformer" / "config.json").write_text(
        json.dumps({"_class_name": "FluxTransformer2DModel", "guidance_embeds": False})
    )
    (warning,) = flow_problems(_config("flux", folder, long))
    assert warning.severity == "warning"


def test_variants_from_headers(tmp_path: Path) -> None:
    def variant(keys: dict[str, tuple[int, ...]]) -> str:
        flow = flow_check.describe_flow_file(flow_check.read_header(_np_file(tmp_path / "f.safetensors", keys)))
        assert flow is not None
        return flow.variant

    assert variant(_flux_keys()) == "dev" and variant(_flux_keys(dev=False)) == "schnell"
    assert variant(_sd3_keys(1536)) == "medium"
    assert variant(_sd3_keys(1536, dual=True, qk=True)) == "3.5-medium"
    assert variant(_sd3_keys(2432, qk=True)) == "3.5-large"


def test_default_t5_tokens() -> None:
    from nyx_tui.config.fields import Family
    from nyx_tui.trainers.native.flow_files import default_t5_tokens

    assert default_t5_tokens(Family.FLUX, "dev") == 512
    assert default_t5_tokens(Family.FLUX, "schnell") == 256
    assert default_t5_tokens(Family.SD3, "3.5-large") == 256


def test_flow_check_imports_no_torch() -> None:
    code = (
        "import sys, nyx_tui.trainers.native.flow_check, nyx_tui.config.check; "
        "bad = [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules]; "
        "assert not bad, bad"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(("dual", "variant"), [((0,), "3.5-medium"), ((), "3.5-large")])
def test_sd35_transformers_from_sgm_files(
    tiny: dict[str, Path], tmp_path: Path, dual: tuple[int, ...], variant: str
) -> None:
    """SD3.5's extras survive the SGM layout: qk norms (`ln_q`), medium's dual attention (`attn2`); the variant
    is told from them."""
    import torch
    from diffusers import SD3Transformer2DModel
    from flow_files_fixtures import save, sd3_to_sgm, state

    from nyx_tui.trainers.native import flow_files

    torch.manual_seed(1)
    original = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
        num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=64,
        pos_embed_max_size=16, dual_attention_layers=dual, qk_norm="rms_norm",
    ).eval()  # fmt: skip
    path = save(
        tmp_path / "sd35.safetensors", {f"model.diffusion_model.{k}": v for k, v in sd3_to_sgm(state(original)).items()}
    )
    flow = flow_check.describe_flow_file(flow_check.read_header(path))
    assert flow is not None and flow.variant == variant
    loaded = flow_files.load_transformer(path, flow, tiny["sd3"])
    assert loaded.config.dual_attention_layers == dual and loaded.config.qk_norm == "rms_norm"
    _same([_sd3_out(loaded)], [_sd3_out(original)])


def test_diffusers_keyed_flux_transformer_file(tiny: dict[str, Path], tmp_path: Path) -> None:
    """A transformer saved by diffusers (its own names) as model.pretrained loads too."""
    from flow_files_fixtures import save, state, write_flux_files

    reference = _load(family="flux", pretrained=tiny["schnell"])
    files = write_flux_files(reference, tmp_path)
    files["pretrained"] = save(tmp_path / "diffusion_pytorch_model.safetensors", state(reference.transformer))
    model = _load(family="flux", flow_config=tiny["schnell"], **files)
    assert model.variant == "schnell"
    _same([_flux_out(model)], [_flux_out(reference)])


def test_flux_checkpoint_with_everything_inside(tiny: dict[str, Path], tmp_path: Path) -> None:
    """A ComfyUI-style Flux checkpoint (`model.diffusion_model.`, `text_encoders.*.transformer.`, `vae.`) needs
    no other file; a field that is set still wins over the piece inside."""
    from flow_files_fixtures import write_flux_files

    reference = _load(family="flux", pretrained=tiny["dev"])
    full = write_flux_files(reference, tmp_path / "full", prefix="model.diffusion_model.", inside=True)
    model = _load(family="flux", flow_config=tiny["dev"], **full)
    assert model.source["vae"].endswith("(inside)") and model.source["t5xxl"].endswith("(inside)")
    _same([_flux_out(model)], [_flux_out(reference)])
    _same(_encodings(model), _encodings(reference))
    separate = write_flux_files(reference, tmp_path / "separate")
    mixed = _load(family="flux", flow_config=tiny["dev"], pretrained=full["pretrained"], t5xxl=separate["t5xxl"])
    assert mixed.source["t5xxl"] == str(separate["t5xxl"]) and mixed.source["clip_l"].endswith("(inside)")


def test_scaled_fp8_weights_are_multiplied_out(tmp_path: Path) -> None:
    """ComfyUI's scaled fp8: weight × scale_weight; the markers (scaled_fp8, scale_input) are dropped."""
    import torch
    from safetensors.torch import save_file

    from nyx_tui.trainers.native.flow_files import read_tensors

    weight = torch.tensor([[0.5, -1.0], [2.0, 0.25]])
    save_file(
        {
            "scaled_fp8": torch.zeros(0, dtype=torch.float8_e4m3fn),
            "a.weight": weight.to(torch.float8_e4m3fn),
            "a.scale_weight": torch.tensor(3.0),
            "a.scale_input": torch.tensor(1.0),
            "a.bias": torch.ones(2, dtype=torch.bfloat16),
        },
        str(tmp_path / "scaled.safetensors"),
    )
    tensors = read_tensors(tmp_path / "scaled.safetensors")
    assert set(tensors) == {"a.weight", "a.bias"}
    assert torch.equal(tensors["a.weight"], weight * 3) and tensors["a.bias"].dtype == torch.float32


def test_fp8_widened_to_the_files_dtype(tmp_path: Path) -> None:
    """fp8 beside bf16 becomes bf16 (it holds every fp8 value exactly); an all-fp8 file loads as bf16 too."""
    import torch
    from safetensors.torch import save_file

    from nyx_tui.trainers.native.flow_files import read_tensors

    weight = torch.tensor([[0.5, -448.0], [2.0**-9, 0.25]])
    fp8 = weight.to(torch.float8_e4m3fn)
    save_file({"w": fp8, "b": torch.ones(2, dtype=torch.bfloat16)}, str(tmp_path / "mixed.safetensors"))
    save_file({"w": fp8}, str(tmp_path / "fp8.safetensors"))
    for name in ("mixed", "fp8"):
        tensors = read_tensors(tmp_path / f"{name}.safetensors")
        assert tensors["w"].dtype == torch.bfloat16 and torch.equal(tensors["w"].float(), weight)


def test_folder_parts_replaced_by_files(tiny: dict[str, Path], tmp_path: Path) -> None:
    """model.t5xxl / model.vae set beside a diffusers folder replace its own parts."""
    import torch
    from flow_files_fixtures import save, state, text_encoder_state, vae_to_ldm

    dev, schnell = _load(family="flux", pretrained=tiny["dev"]), _load(family="flux", pretrained=tiny["schnell"])
    t5 = save(tmp_path / "t5.safetensors", text_encoder_state(schnell.text_encoder_2))
    vae = save(tmp_path / "ae.safetensors", vae_to_ldm(state(schnell.vae), 4))
    model = _load(family="flux", pretrained=tiny["dev"], t5xxl=t5, vae=vae)
    assert model.source["t5xxl"] == str(t5) and model.variant == "dev"
    assert _all_eval(model)

    def same(x: Any, y: Any) -> bool:
        a, b = x.state_dict(), y.state_dict()
        return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    assert same(model.text_encoder_2, schnell.text_encoder_2) and not same(dev.text_encoder_2, schnell.text_encoder_2)
    assert same(model.vae, schnell.vae) and same(model.text_encoder, dev.text_encoder)


def test_pickled_flow_checkpoint_is_refused_before_loading(tmp_path: Path) -> None:
    ckpt = tmp_path / "flux1-dev.ckpt"
    ckpt.write_bytes(b"not read")
    (problem,) = _by(flow_problems(_config("flux", ckpt)), "model.pretrained")
    assert "not a .safetensors file" in problem.message
