"""`nyx lora convert` / `convert_file`: kohya ↔ diffusers on Nyx's real files for the tiny SD1.5, SDXL, Flux and
SD3 models. Round trips give the same tensors back; converted files load in diffusers and give the outputs the
kohya file gives (SD1.5, SDXL) or Nyx's own model gives (Flux, SD3); Flux/SD3 fused q/k/v modules keep every
ΔW = alpha/rank · up · down in both encodings. LyCORIS files saved with the wrong prefix are repaired and load.

Tolerances: fp32 files: 1e-5 on outputs of magnitude ~1 (float summation order), ΔW to 1e-6 relative."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from lora_files import attached, config, lycoris_file, save_nyx_lora, write_numpy

from nyx_tui.lora.convert import convert_file, diffusers_path, dotted, repair_prefix
from nyx_tui.lora.header import LoraFileError, read_header
from nyx_tui.lora.inspect import inspect_lora

torch = pytest.importorskip("torch")
TOL = 1e-5


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from nyx_tui.demo_assets import build_tiny_flux, build_tiny_sd3, build_tiny_sd15, build_tiny_sdxl

    root = tmp_path_factory.mktemp("convert")
    return {
        "sd15": build_tiny_sd15(root / "sd15"),
        "sdxl": build_tiny_sdxl(root / "sdxl"),
        "flux": build_tiny_flux(root / "flux", double_blocks=1, single_blocks=1),
        "sd3": build_tiny_sd3(root / "sd3", layers=2),
    }


def load_np(path: Path) -> dict[str, np.ndarray]:
    import safetensors.numpy

    return safetensors.numpy.load_file(str(path))


def pipe_of(model_dir: Path) -> Any:
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def unet_out(pipe: Any) -> Any:
    """UNet output with the text encoders' states on fixed inputs (SDXL: both encoders, pooled, time ids)."""
    unet = pipe.unet
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(1, 4, 8, 8, generator=gen)
    ids = pipe.tokenizer(["a green star"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        if getattr(pipe, "text_encoder_2", None) is None:
            return unet(x, torch.tensor([500]), pipe.text_encoder(ids).last_hidden_state).sample
        one = pipe.text_encoder(ids, output_hidden_states=True)
        two = pipe.text_encoder_2(ids, output_hidden_states=True)
        h = torch.cat([one.hidden_states[-2], two.hidden_states[-2]], dim=-1)
        extra = {"text_embeds": two.text_embeds, "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
        return unet(x, torch.tensor([500]), h, added_cond_kwargs=extra).sample


def transformer_out(t: Any, family: str) -> Any:
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        if family == "flux":
            seq, txt = 16, 6
            ids = torch.zeros(seq, 3)
            ids[:, 1], ids[:, 2] = torch.arange(seq) // 4, torch.arange(seq) % 4
            kw: dict[str, Any] = {
                "hidden_states": torch.randn(1, seq, t.config.in_channels, generator=gen),
                "encoder_hidden_states": torch.randn(1, txt, t.config.joint_attention_dim, generator=gen),
                "pooled_projections": torch.randn(1, t.config.pooled_projection_dim, generator=gen),
                "timestep": torch.tensor([0.5]),
                "img_ids": ids,
                "txt_ids": torch.zeros(txt, 3),
            }
            if t.config.guidance_embeds:
                kw["guidance"] = torch.tensor([3.5])
        else:
            kw = {
                "hidden_states": torch.randn(1, t.config.in_channels, 8, 8, generator=gen),
                "encoder_hidden_states": torch.randn(1, 6, t.config.joint_attention_dim, generator=gen),
                "pooled_projections": torch.randn(1, t.config.pooled_projection_dim, generator=gen),
                "timestep": torch.tensor([500.0]),
            }
        return t(**kw).sample


def delta_ws(path: Path) -> dict[str, np.ndarray]:
    """Every module's ΔW = alpha/rank · up · down (kohya or diffusers file; diffusers alphas from its metadata
    as `inspect_lora` reads them), keyed by module, flattened to 2-D."""
    info = {m.name: m for m in inspect_lora(path).modules}
    t = load_np(path)
    out = {}
    for name, m in info.items():
        down = t.get(f"{name}.lora_down.weight", t.get(f"{name}.lora_A.weight"))
        up = t.get(f"{name}.lora_up.weight", t.get(f"{name}.lora_B.weight"))
        assert down is not None and up is not None
        scale = (m.alpha if m.alpha is not None else down.shape[0]) / down.shape[0]
        out[name] = scale * up.reshape(up.shape[0], -1).astype(np.float64) @ down.reshape(down.shape[0], -1)
    return out


def assert_close(a: np.ndarray, b: np.ndarray, what: str) -> None:
    assert a.shape == b.shape, what
    assert np.abs(a - b).max() <= 1e-6 * max(1.0, float(np.abs(a).max())), what


# ------------------------------------------------------------------------------------------ SD1.5, SDXL


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_sd15_round_trip_and_diffusers_load(models: dict[str, Path], tmp_path: Path, dtype: str) -> None:
    _, network = attached(config(models["sd15"], train_text_encoder=True, conv_dim=4, conv_alpha=1.0))
    kohya = save_nyx_lora(network, tmp_path / "k.safetensors", dtype=dtype)
    diff = convert_file(kohya, tmp_path / "d.safetensors", "diffusers")
    back = convert_file(diff, tmp_path / "k2.safetensors", "kohya")
    a, d, b = load_np(kohya), load_np(diff), load_np(back)
    assert a.keys() == b.keys()
    assert all(np.array_equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)  # exact: a rename, alphas kept
    assert any(k.startswith("unet.") and k.endswith(".lora_A.weight") for k in d)
    assert any(k.startswith("text_encoder.text_model.") for k in d)
    assert not any(k.endswith(".alpha") for k in d)
    assert read_header(diff).metadata["ss_network_dim"] == "4"  # metadata kept
    meta = json.loads(read_header(diff).metadata["lora_adapter_metadata"])
    assert meta["unet.lora_alpha"] == 2.0 and 1.0 in meta["unet.alpha_pattern"].values()  # conv alpha kept
    pipe = pipe_of(models["sd15"])
    base = unet_out(pipe)
    pipe.load_lora_weights(str(kohya))
    via_kohya = unet_out(pipe)
    pipe.unload_lora_weights()
    assert torch.equal(unet_out(pipe), base)
    pipe.load_lora_weights(str(diff))
    via_diffusers = unet_out(pipe)
    assert (via_kohya - base).abs().max() > 0.05
    assert (via_diffusers - via_kohya).abs().max() <= TOL


def test_sdxl_sgm_names_to_diffusers(models: dict[str, Path], tmp_path: Path) -> None:
    """Nyx's SDXL file (SGM names, lora_te1_/lora_te2_) → diffusers: loads in the SDXL pipeline with the same
    effect, and back to the same kohya file."""
    _, network = attached(config(models["sdxl"], "sdxl", train_text_encoder=True))
    kohya = save_nyx_lora(network, tmp_path / "k.safetensors", "sdxl")
    assert any(k.startswith("lora_unet_input_blocks_") for k in load_np(kohya))
    diff = convert_file(kohya, tmp_path / "d.safetensors", "diffusers")
    d = load_np(diff)
    assert any(k.startswith("unet.down_blocks.1.attentions.0.") for k in d)
    assert any(k.startswith("text_encoder_2.") for k in d)
    back = load_np(convert_file(diff, tmp_path / "k2.safetensors", "kohya"))
    a = load_np(kohya)
    assert a.keys() == back.keys() and all(np.array_equal(a[k], back[k]) for k in a)
    pipe = pipe_of(models["sdxl"])
    base = unet_out(pipe)
    pipe.load_lora_weights(str(kohya))
    via_kohya = unet_out(pipe)
    pipe.unload_lora_weights()
    pipe.load_lora_weights(str(diff))
    assert (via_kohya - base).abs().max() > 0.05
    assert (unet_out(pipe) - via_kohya).abs().max() <= TOL
    # the SGM inverse holds for every module of this UNet, and for sd-scripts' own SDXL names
    from nyx_tui.trainers.native.kohya_names import UNetLayout, sgm_path

    layout = UNetLayout.from_config(pipe.unet.config)
    paths = [n for n, m in pipe.unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    assert len(paths) > 50 and all(diffusers_path(sgm_path(p, layout), layout) == p for p in paths)
    assert diffusers_path("input_blocks.1.0.emb_layers.1") == "down_blocks.0.resnets.0.time_emb_proj"
    assert diffusers_path("output_blocks.8.0.skip_connection") == "up_blocks.2.resnets.2.conv_shortcut"
    assert diffusers_path("output_blocks.5.2.conv") == "up_blocks.1.upsamplers.0.conv"
    assert (
        dotted("input_blocks_4_1_transformer_blocks_0_attn1_to_out_0")
        == "input_blocks.4.1.transformer_blocks.0.attn1.to_out.0"
    )


# ------------------------------------------------------------------------------------------ Flux, SD3


def _flow_case(models: dict[str, Path], family: str, split: bool, tmp_path: Path) -> tuple[Any, Any, Path]:
    cfg = config(models[family], family, {"split_qkv": split}, train_text_encoder=True)
    model, network = attached(cfg)
    return model, network, save_nyx_lora(network, tmp_path / "k.safetensors", family)


@pytest.mark.parametrize(("family", "split"), [("flux", False), ("flux", True), ("sd3", False), ("sd3", True)])
def test_flow_fused_qkv(models: dict[str, Path], tmp_path: Path, family: str, split: bool) -> None:
    """Fused q/k/v (shared down; Nyx's split_qkv block-diagonal) → diffusers' separate modules: every ΔW
    equals Nyx's own diffusers export's, the file loads in diffusers and gives Nyx's model's output, and it
    converts back to the same kohya file."""
    import safetensors.torch

    model, network, kohya = _flow_case(models, family, split, tmp_path)
    diff = convert_file(kohya, tmp_path / "d.safetensors", "diffusers")
    ours = delta_ws(diff)
    ref_path = tmp_path / "nyx_diffusers.safetensors"
    ref_state = network.diffusers_state_dict(torch.float32)
    safetensors.torch.save_file({k: v.clone().contiguous() for k, v in ref_state.items()}, str(ref_path))
    ref = delta_ws(ref_path)

    def canon(name: str) -> str:
        return name.replace(".text_model.", ".")

    assert {canon(k) for k in ours} == {canon(k) for k in ref}
    ref_c = {canon(k): v for k, v in ref.items()}
    for name, dw in ours.items():
        assert_close(dw, ref_c[canon(name)], name)
    fused = [k for k in load_np(kohya) if k.endswith("_qkv.lora_up.weight")]
    assert fused and any(k.endswith("attn.to_k") for k in ours)
    # back to kohya: the same file
    a, b = load_np(kohya), load_np(convert_file(diff, tmp_path / "k2.safetensors", "kohya"))
    assert a.keys() == b.keys()
    for k in a:
        assert np.allclose(a[k], b[k], rtol=0, atol=1e-7), k
    # diffusers' own loader on the converted file = Nyx's model with the network
    pipe = pipe_of(models[family])
    base = transformer_out(pipe.transformer, family)
    pipe.load_lora_weights(str(diff))
    loaded = transformer_out(pipe.transformer, family)
    want = transformer_out(model.transformer, family)
    assert (want - base).abs().max() > 0.01
    assert (loaded - want).abs().max() <= 1e-4


def test_flux_diffusers_pieces_to_kohya(models: dict[str, Path], tmp_path: Path) -> None:
    """A diffusers Flux LoRA with separate q/k/v (Nyx's diffusers export: alpha folded, own downs) → kohya's
    stacked block-diagonal form with alpha × n; a single block without proj_mlp gets zero rows for it."""
    import safetensors.torch

    _, network, kohya = _flow_case(models, "flux", False, tmp_path)
    state = network.diffusers_state_dict(torch.float32)
    state = {k: v.clone().contiguous() for k, v in state.items() if ".proj_mlp." not in k}
    src = tmp_path / "pieces.safetensors"
    safetensors.torch.save_file(state, str(src))
    out = convert_file(src, tmp_path / "k.safetensors", "kohya", family="flux")
    t = load_np(out)
    name = "lora_unet_single_blocks_0_linear1"
    down, up, alpha = t[f"{name}.lora_down.weight"], t[f"{name}.lora_up.weight"], float(t[f"{name}.alpha"])
    width = down.shape[1]
    assert down.shape[0] == 3 * 4 and alpha == pytest.approx(3 * 4)  # three pieces of rank 4, scale 1
    assert not up[3 * width :].any()  # no proj_mlp LoRA: zero rows
    for j in range(3):  # block-diagonal
        rows = up[j * width : (j + 1) * width]
        assert not np.delete(rows, range(4 * j, 4 * j + 4), axis=1).any()
    theirs, ours = delta_ws(kohya), delta_ws(out)
    for mod, dw in ours.items():
        if mod == name:  # the original has proj_mlp's LoRA too
            assert_close(dw[: 3 * width], theirs[mod][: 3 * width], mod)
        else:
            assert_close(dw, theirs[mod], mod)


def test_flow_tables_match_the_trainer() -> None:
    """convert reads the trainer's Flux/SD3 tables (one torch-free module), not a copy that could drift."""
    from nyx_tui.lora import convert
    from nyx_tui.trainers.native import flow_names

    for table in ("FLUX_DOUBLE", "FLUX_SINGLE", "SD3_JOINT"):
        assert getattr(convert, table) is getattr(flow_names, table)


# ------------------------------------------------------------------------------------------ LyCORIS prefixes


def test_repair_lycoris_prefix_loads(models: dict[str, Path], tmp_path: Path) -> None:
    """A LoCon LyCORIS saved under its default `lycoris_` prefix loads nowhere; repaired, diffusers loads it and
    gives what LyCORIS itself computes; the bytes of every tensor are kept."""
    lyco_pipe, bad = lycoris_file(models["sd15"], tmp_path / "bad.safetensors", "locon")
    want = unet_out(lyco_pipe)
    pipe = pipe_of(models["sd15"])
    base = unet_out(pipe)
    assert (want - base).abs().max() > 0.01
    try:
        pipe.load_lora_weights(str(bad))
        unchanged = torch.equal(unet_out(pipe), base)
    except Exception:  # diffusers refuses the names outright
        unchanged = True
    assert unchanged, "the unrepaired file should not load"
    pipe = pipe_of(models["sd15"])
    fixed = repair_prefix(bad, tmp_path / "fixed.safetensors")
    assert inspect_lora(fixed).key_format == "kohya"
    a, b = load_np(bad), load_np(fixed)
    assert {re.sub(r"^lycoris_", "lora_unet_", k) for k in a} == set(b)
    assert all(np.array_equal(v, b[re.sub(r"^lycoris_", "lora_unet_", k)]) for k, v in a.items())
    pipe.load_lora_weights(str(fixed))
    assert (unet_out(pipe) - want).abs().max() <= 1e-4
    # the same through convert --fix-prefix; without it, a clear refusal
    via_convert = convert_file(bad, tmp_path / "c.safetensors", "kohya", fix_prefix=True)
    assert load_np(via_convert).keys() == b.keys()
    with pytest.raises(LoraFileError, match="--fix-prefix"):
        convert_file(bad, tmp_path / "x.safetensors", "kohya")


def test_repair_loha_prefix_loads_in_lycoris(models: dict[str, Path], tmp_path: Path) -> None:
    """A LoHa under `lycoris_`: repaired, LyCORIS' kohya-prefix loader rebuilds the same network."""
    from lycoris import LycorisNetwork, create_lycoris_from_weights

    lyco_pipe, bad = lycoris_file(models["sd15"], tmp_path / "bad.safetensors", "loha")
    want = unet_out(lyco_pipe)
    fixed = repair_prefix(bad, tmp_path / "fixed.safetensors")
    pipe = pipe_of(models["sd15"])
    base = unet_out(pipe)
    LycorisNetwork.apply_preset({"lora_prefix": "lora_unet"})
    try:
        net, _ = create_lycoris_from_weights(1.0, str(fixed), pipe.unet)
        net.apply_to()
        net.load_state_dict(load_torch(fixed), strict=False)
    finally:
        LycorisNetwork.apply_preset({"lora_prefix": "lycoris"})
    got = unet_out(pipe)
    assert (got - base).abs().max() > 0.01 and (got - want).abs().max() <= 1e-4
    with pytest.raises(LoraFileError, match="no diffusers LoRA form"):
        convert_file(bad, tmp_path / "d.safetensors", "diffusers", fix_prefix=True)


def load_torch(path: Path) -> dict[str, Any]:
    import safetensors.torch

    return safetensors.torch.load_file(str(path))


# ------------------------------------------------------------------------------------------ refusals, CLI


def test_refusals(tmp_path: Path) -> None:
    src = write_numpy(
        tmp_path / "a.safetensors",
        {"something.weight": np.ones((2, 2), np.float32), "other.bias": np.ones(2, np.float32)},
    )
    with pytest.raises(LoraFileError, match="family"):
        convert_file(src, tmp_path / "b.safetensors", "diffusers")
    with pytest.raises(LoraFileError, match="target layout"):
        convert_file(src, tmp_path / "b.safetensors", "comfy")
    with pytest.raises(LoraFileError, match="is the input file"):
        convert_file(src, src, "kohya")
    flux = write_numpy(
        tmp_path / "f.safetensors",
        {
            "lora_unet_double_blocks_0_img_attn_nope.lora_down.weight": np.ones((2, 8), np.float32),
            "lora_unet_double_blocks_0_img_attn_nope.lora_up.weight": np.ones((8, 2), np.float32),
        },
    )
    with pytest.raises(LoraFileError, match="img_attn_nope"):
        convert_file(flux, tmp_path / "g.safetensors", "diffusers")
    assert not (tmp_path / "g.safetensors").exists() and not (tmp_path / "b.safetensors").exists()


def test_cli_convert(models: dict[str, Path], tmp_path: Path) -> None:
    import subprocess
    import sys

    _, network = attached(config(models["sd15"]))
    kohya = save_nyx_lora(network, tmp_path / "k.safetensors")
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "nyx_tui",
            "lora",
            "convert",
            str(kohya),
            "-o",
            str(tmp_path / "d.safetensors"),
            "--to",
            "diffusers",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert "diffusers" in run.stdout and inspect_lora(tmp_path / "d.safetensors").key_format == "peft"
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "nyx_tui",
            "lora",
            "convert",
            str(tmp_path / "none.safetensors"),
            "-o",
            str(tmp_path / "x.safetensors"),
            "--to",
            "kohya",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 1 and "no such file" in bad.stderr and "fix" in bad.stderr


def test_raw_peft_state_dict_to_kohya(models: dict[str, Path], tmp_path: Path) -> None:
    """peft's own state dict of a UNet (no `unet.` part, no alphas) → kohya: the UNet's modules under
    sd-scripts' names with the same tensors, alpha = rank (what a file without alphas means to every loader)."""
    import safetensors.torch
    from peft.utils import get_peft_model_state_dict

    model, network = attached(config(models["sd15"]))
    kohya = load_np(save_nyx_lora(network, tmp_path / "k.safetensors"))
    raw = {k: v.clone().contiguous() for k, v in get_peft_model_state_dict(model.unet).items()}
    assert not any(k.startswith("unet.") for k in raw)
    src = tmp_path / "peft.safetensors"
    safetensors.torch.save_file(raw, str(src))
    out = load_np(convert_file(src, tmp_path / "out.safetensors", "kohya", family="sd15"))
    assert out.keys() == kohya.keys()
    for k, v in kohya.items():
        if k.endswith(".alpha"):
            assert float(out[k]) == 4.0  # the rank: peft's file carries no alpha
        else:
            assert np.array_equal(out[k], v), k


def test_flux_final_layer_halves_swap(tmp_path: Path) -> None:
    """BFL's final adaLN is (shift, scale), diffusers' norm_out (scale, shift): the up rows swap both ways."""
    rng = np.random.default_rng(0)
    down, up = rng.standard_normal((2, 8)).astype(np.float32), rng.standard_normal((16, 2)).astype(np.float32)
    name = "lora_unet_final_layer_adaLN_modulation_1"
    src = write_numpy(
        tmp_path / "k.safetensors",
        {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": np.array(1.0, np.float32)},
        {"ss_base_model_version": "flux1"},
    )
    d = load_np(convert_file(src, tmp_path / "d.safetensors", "diffusers"))
    assert np.array_equal(d["transformer.norm_out.linear.lora_B.weight"], np.concatenate([up[8:], up[:8]]))
    back = load_np(convert_file(tmp_path / "d.safetensors", tmp_path / "k2.safetensors", "kohya"))
    assert np.array_equal(back[f"{name}.lora_up.weight"], up) and float(back[f"{name}.alpha"]) == 1.0
