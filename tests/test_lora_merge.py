"""`nyx lora merge`: LoRA + LoRA (concat exact, svd the best rank-k cut of the weighted sum), and LoRAs baked into
a base: tiny SD1.5 and Flux diffusers folders checked against the base with the LoRA loaded (diffusers' loader
for SD1.5, Nyx's `load_flow_lora` for Flux), single-file checkpoints (BFL Flux, LDM SD1.5, SGM SDXL) checked
key by key against W + Σ w·ΔW; bad input named."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch

from nyx_tui.lora.merge import Source, bake, merge_loras, parse_source
from nyx_tui.lora.resize import LoraFileError
from nyx_tui.trainers.native import lora_io


def lora_delta(tensors: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """up·down·alpha/rank of a module (alpha absent: = rank), float64, in the layer's weight shape."""
    up, down = tensors[f"{name}.lora_up.weight"].double(), tensors[f"{name}.lora_down.weight"].double()
    r = down.shape[0]
    alpha = float(tensors[f"{name}.alpha"]) if f"{name}.alpha" in tensors else float(r)
    return ((up.reshape(up.shape[0], r) @ down.reshape(r, -1)) * alpha / r).reshape(up.shape[0], *down.shape[1:])


def module(
    gen: torch.Generator, out: int, shape: tuple[int, ...], rank: int, alpha: float | None, name: str
) -> dict[str, torch.Tensor]:
    down = torch.randn(rank, *shape, generator=gen)
    up = torch.randn(out, rank, *([1, 1] if len(shape) == 3 else []), generator=gen)
    tensors = {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up}
    if alpha is not None:
        tensors[f"{name}.alpha"] = torch.tensor(alpha)
    return tensors


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    a = module(gen, 6, (5,), 2, 1.0, "lora_unet_m1") | module(gen, 4, (3, 3, 3), 3, 3.0, "lora_unet_m2")
    b = module(gen, 6, (5,), 4, 8.0, "lora_unet_m1") | module(gen, 7, (6,), 2, None, "lora_unet_m3")
    pa, pb = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    safetensors.torch.save_file(a, str(pa), metadata={"ss_base_model_version": "sd_v1", "ss_network_dim": "2"})
    safetensors.torch.save_file(b, str(pb), metadata={"ss_base_model_version": "sd_v1"})
    return pa, pb, a, b


def test_parse_source() -> None:
    assert parse_source("a.safetensors:0.5") == Source(Path("a.safetensors"), 0.5)
    assert parse_source("a.safetensors:-1") == Source(Path("a.safetensors"), -1.0)
    assert parse_source("dir:x/a.safetensors") == Source(Path("dir:x/a.safetensors"), 1.0)
    assert parse_source("a.safetensors") == Source(Path("a.safetensors"), 1.0)


def test_concat_is_the_exact_weighted_sum(pair: Any, tmp_path: Path) -> None:
    pa, pb, a, b = pair
    out = tmp_path / "concat.safetensors"
    report = merge_loras([Source(pa, 0.7), Source(pb, -0.4)], out, precision="fp32")
    merged = safetensors.torch.load_file(str(out))
    want = {
        "lora_unet_m1": 0.7 * lora_delta(a, "lora_unet_m1") - 0.4 * lora_delta(b, "lora_unet_m1"),
        "lora_unet_m2": 0.7 * lora_delta(a, "lora_unet_m2"),  # in one file only: kept
        "lora_unet_m3": -0.4 * lora_delta(b, "lora_unet_m3"),
    }
    for name, delta in want.items():
        assert torch.allclose(lora_delta(merged, name), delta, atol=1e-5), name
    assert {m.name: m.rank for m in report.modules} == {"lora_unet_m1": 6, "lora_unet_m2": 3, "lora_unet_m3": 2}
    meta = lora_io.read_metadata(out)
    assert meta["ss_network_dim"] == "Dynamic" and meta["ss_base_model_version"] == "sd_v1"
    assert "a.safetensors×0.7" in meta["ss_training_comment"]
    assert (meta["sshs_model_hash"], meta["sshs_legacy_hash"]) == lora_io.safetensors_hashes(merged, meta)


def test_concat_keeps_peft_style_keys_without_alphas(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(11)
    files, deltas = [], []
    for i, rank in enumerate((2, 3)):
        down, up = torch.randn(rank, 5, generator=gen), torch.randn(4, rank, generator=gen)
        path = tmp_path / f"p{i}.safetensors"
        safetensors.torch.save_file({"unet.a.lora_A.weight": down, "unet.a.lora_B.weight": up}, str(path))
        files.append(path)
        deltas.append(up.double() @ down.double())  # no alpha: scale 1, as peft-style loaders take it
    out = tmp_path / "p.safetensors"
    merge_loras([Source(files[0], 2.0), Source(files[1], -0.5)], out, precision="fp32")
    merged = safetensors.torch.load_file(str(out))
    assert set(merged) == {"unet.a.lora_A.weight", "unet.a.lora_B.weight"}
    got = merged["unet.a.lora_B.weight"].double() @ merged["unet.a.lora_A.weight"].double()
    assert torch.allclose(got, 2.0 * deltas[0] - 0.5 * deltas[1], atol=1e-5)


def test_svd_merge_is_the_best_rank_k_cut_of_the_sum(pair: Any, tmp_path: Path) -> None:
    pa, pb, a, b = pair
    total = 0.5 * lora_delta(a, "lora_unet_m1") + 1.5 * lora_delta(b, "lora_unet_m1")
    full = tmp_path / "full.safetensors"
    merge_loras([Source(pa, 0.5), Source(pb, 1.5)], full, mode="svd", rank=16, precision="fp32")
    merged = safetensors.torch.load_file(str(full))
    assert merged["lora_unet_m1.lora_down.weight"].shape[0] == 5  # min(out 6, in 5, ranks 2 + 4)
    assert torch.allclose(lora_delta(merged, "lora_unet_m1"), total, atol=1e-4)  # no cut: exact
    assert float(merged["lora_unet_m1.alpha"]) == 5.0  # alpha = new rank, as sd-scripts
    assert merged["lora_unet_m2.lora_up.weight"].shape == (4, 3, 1, 1)
    assert torch.allclose(lora_delta(merged, "lora_unet_m2"), 0.5 * lora_delta(a, "lora_unet_m2"), atol=1e-4)

    cut = tmp_path / "cut.safetensors"
    report = merge_loras([Source(pa, 0.5), Source(pb, 1.5)], cut, mode="svd", rank=2, precision="fp32")
    merged = safetensors.torch.load_file(str(cut))
    s = torch.linalg.svdvals(total)
    error = torch.linalg.matrix_norm(lora_delta(merged, "lora_unet_m1") - total)
    assert float(error) == pytest.approx(float(s[2:].pow(2).sum().sqrt()), rel=1e-4)  # Eckart–Young
    assert report.fro_retained["lora_unet_m1"] == pytest.approx(float(s[:2].norm() / s.norm()), rel=1e-4)
    with pytest.raises(LoraFileError, match="needs --rank"):
        merge_loras([Source(pa)], tmp_path / "x.safetensors", mode="svd")


def test_merge_refuses_bad_input(pair: Any, tmp_path: Path) -> None:
    pa, _, _, _ = pair
    gen = torch.Generator().manual_seed(1)
    flux = tmp_path / "flux.safetensors"
    safetensors.torch.save_file(module(gen, 48, (16,), 2, 1.0, "lora_unet_double_blocks_0_img_attn_qkv"), str(flux))
    te = tmp_path / "sd15.safetensors"
    safetensors.torch.save_file(
        module(gen, 32, (32,), 2, 1.0, "lora_te_text_model_encoder_layers_0_self_attn_q_proj"), str(te)
    )
    with pytest.raises(LoraFileError, match="different model families"):
        merge_loras([Source(te), Source(flux)], tmp_path / "x.safetensors")
    other = tmp_path / "other.safetensors"
    safetensors.torch.save_file(module(gen, 9, (5,), 2, 1.0, "lora_unet_m1"), str(other))
    with pytest.raises(LoraFileError, match=r"lora_unet_m1 is out 6 .* out 9"):
        merge_loras([Source(pa), Source(other)], tmp_path / "x.safetensors")
    with pytest.raises(LoraFileError, match="no such file"):
        merge_loras([Source(pa), Source(tmp_path / "gone.safetensors")], tmp_path / "x.safetensors")
    loha = tmp_path / "loha.safetensors"
    safetensors.torch.save_file({"lora_unet_a.hada_w1_a": torch.ones(2, 2), "lora_unet_a.hada_w1_b": torch.ones(2, 2)},
                                str(loha))  # fmt: skip
    with pytest.raises(LoraFileError, match="LoHa"):
        merge_loras([Source(pa), Source(loha)], tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


def test_cli_merge(pair: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from nyx_tui.cli import main

    pa, pb, _, _ = pair
    out = tmp_path / "cli.safetensors"
    assert main(["lora", "merge", f"{pa}:0.5", str(pb), "-o", str(out), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["sources"] == [[str(pa), 0.5], [str(pb), 1.0]]
    assert main(["lora", "merge", str(pa), str(pb), "-o", str(out), "--mode", "svd", "--rank", "2"]) == 0
    assert "lora_unet_m1" in capsys.readouterr().out
    assert main(["lora", "merge", str(pa), "-o", str(out), "--base", str(tmp_path / "nowhere")]) == 2
    assert "no such file or folder" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------- baked into a base


@pytest.fixture(scope="module")
def sd15_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from nyx_tui.demo_assets import build_tiny_sd15

    return build_tiny_sd15(tmp_path_factory.mktemp("merge") / "sd15")


def sd15_lora(pipe: Any, seed: int) -> dict[str, torch.Tensor]:
    """A kohya LoRA/LoCon on the tiny SD1.5 model: UNet attention Linears, 1×1 proj_in/out, ResNet 3×3 conv1,
    and the text encoder's attention Linears (`lora_te_…`)."""
    from nyx_tui.trainers.native.networks import text_encoder_name

    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for root, prefix in ((pipe.unet, "lora_unet"), (pipe.text_encoder, "lora_te")):
        for path, layer in root.named_modules():
            if prefix == "lora_te":
                if not (isinstance(layer, torch.nn.Linear) and "self_attn" in path):
                    continue
                name = text_encoder_name(prefix, path)
            else:
                linear = isinstance(layer, torch.nn.Linear) and ".attentions." in path
                conv = isinstance(layer, torch.nn.Conv2d) and (path.endswith("conv1") or "proj_" in path)
                if not (linear or conv):
                    continue
                name = f"{prefix}_{path.replace('.', '_')}"
            if isinstance(layer, torch.nn.Linear):
                tensors |= module(gen, layer.out_features, (layer.in_features,), 4, 2.0, name)
            else:
                tensors |= module(gen, layer.out_channels, (layer.in_channels, *layer.kernel_size), 4, 2.0, name)
    return {k: v * 0.3 if "lora_" in k.rsplit(".", 2)[-2] else v for k, v in tensors.items()}


def sd15_outputs(pipe: Any) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    x, h = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 77, 32, generator=gen)
    ids = pipe.tokenizer(["a green star"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        return pipe.unet(x, torch.tensor([10, 500]), encoder_hidden_states=h).sample, pipe.text_encoder(ids)[0]


def test_bake_sd15_folder_equals_the_lora_loaded_by_diffusers(sd15_dir: Path, tmp_path: Path) -> None:
    from diffusers import StableDiffusionPipeline

    pipe: Any = StableDiffusionPipeline.from_pretrained(sd15_dir)
    lora = tmp_path / "sd15.safetensors"
    safetensors.torch.save_file(sd15_lora(pipe, 2), str(lora))
    base_unet, base_te = sd15_outputs(pipe)
    pipe.load_lora_weights(str(lora))
    want_unet, want_te = sd15_outputs(pipe)

    out = tmp_path / "baked"
    report = bake([Source(lora)], sd15_dir, out)
    assert set(report.baked) == {"unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"}
    baked: Any = StableDiffusionPipeline.from_pretrained(out)
    got_unet, got_te = sd15_outputs(baked)
    assert (want_unet - base_unet).abs().max() > 0.05 and (want_te - base_te).abs().max() > 0.05
    assert torch.allclose(got_unet, want_unet, atol=1e-4), (got_unet - want_unet).abs().max()
    assert torch.allclose(got_te, want_te, atol=1e-4), (got_te - want_te).abs().max()
    assert (out / "vae" / "diffusion_pytorch_model.safetensors").read_bytes() == (
        sd15_dir / "vae" / "diffusion_pytorch_model.safetensors"
    ).read_bytes()

    # a weight scales ΔW: W' = W + w·ΔW, key by key
    weighted = tmp_path / "weighted"
    bake([Source(lora, -0.6)], sd15_dir, weighted)
    tensors = safetensors.torch.load_file(str(lora))
    name, path = "lora_unet_down_blocks_0_resnets_0_conv1", "down_blocks.0.resnets.0.conv1.weight"
    before = safetensors.torch.load_file(str(sd15_dir / "unet" / "diffusion_pytorch_model.safetensors"))[path]
    after = safetensors.torch.load_file(str(weighted / "unet" / "diffusion_pytorch_model.safetensors"))[path]
    assert torch.allclose(after.double() - before.double(), -0.6 * lora_delta(tensors, name), atol=1e-5)

    with pytest.raises(LoraFileError, match="exists"):
        bake([Source(lora)], sd15_dir, out)


def test_bake_refuses_a_base_that_does_not_fit(sd15_dir: Path, tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(4)
    flux = tmp_path / "flux.safetensors"
    safetensors.torch.save_file(module(gen, 48, (16,), 2, 1.0, "lora_unet_double_blocks_0_img_attn_qkv"), str(flux))
    with pytest.raises(LoraFileError, match=r"flux.*sd15"):
        bake([Source(flux)], sd15_dir, tmp_path / "o")
    stray = tmp_path / "stray.safetensors"  # an SD1.5-looking LoRA of a bigger UNet: a block this one lacks
    safetensors.torch.save_file(
        module(gen, 8, (8,), 2, 1.0, "lora_unet_down_blocks_3_attentions_1_proj_in"), str(stray)
    )
    with pytest.raises(LoraFileError, match=r"name no module.*down_blocks_3"):
        bake([Source(stray)], sd15_dir, tmp_path / "o")
    wrong = tmp_path / "wrong.safetensors"  # the right name, the wrong width
    safetensors.torch.save_file(
        module(gen, 99, (32,), 2, 1.0, "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"),
        str(wrong),
    )
    with pytest.raises(LoraFileError, match="another model"):
        bake([Source(wrong)], sd15_dir, tmp_path / "o")
    assert not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def flow_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from nyx_tui.demo_assets import build_tiny_flux, build_tiny_sd3

    root = tmp_path_factory.mktemp("merge")
    return {
        "flux": build_tiny_flux(root / "flux", double_blocks=1, single_blocks=1),
        "sd3": build_tiny_sd3(root / "sd3", layers=2),  # its last block is context-pre-only (swapped adaLN)
    }


def flow_forward(family: str, transformer: Any) -> torch.Tensor:
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        if family == "sd3":
            return transformer(  # type: ignore[no-any-return]
                hidden_states=torch.randn(1, 16, 8, 8, generator=gen),
                encoder_hidden_states=torch.randn(1, 5, 64, generator=gen),
                pooled_projections=torch.randn(1, 64, generator=gen),
                timestep=torch.tensor([500.0]),
            ).sample
        return transformer(  # type: ignore[no-any-return]
            hidden_states=torch.randn(1, 4, 64, generator=gen),
            encoder_hidden_states=torch.randn(1, 3, 32, generator=gen),
            pooled_projections=torch.randn(1, 32, generator=gen),
            timestep=torch.tensor([0.5]),
            img_ids=torch.zeros(4, 3),
            txt_ids=torch.zeros(3, 3),
            guidance=torch.tensor([3.5]),
        ).sample


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_bake_flow_folder_equals_the_lora_on_the_model(flow_dirs: dict[str, Path], tmp_path: Path, family: str) -> None:
    """Flux/SD3 files name fused modules (q/k/v; Flux's single-block linear1): baked row by row into the
    diffusers Linears, as Nyx's own loader (`load_flow_lora`) splits them."""
    import diffusers

    from nyx_tui.config.fields import Family
    from nyx_tui.trainers.native import flow_names
    from nyx_tui.trainers.native.flow_files import load_flow_folder
    from nyx_tui.trainers.native.init_weights import load_flow_lora

    model = load_flow_folder(flow_dirs[family], Family(family))
    model.transformer.eval()
    base = flow_forward(family, model.transformer)
    gen = torch.Generator().manual_seed(6)
    tensors: dict[str, torch.Tensor] = {}
    modules = flow_names.flow_modules(Family(family), model.transformer)
    for fm in modules:
        first = model.transformer.get_submodule(fm.paths[0])
        out = sum(flow_names.out_sizes(model.transformer, fm))
        tensors |= module(gen, out, (first.in_features,), 4, 2.0, fm.name)
    assert sum(fm.fused for fm in modules) >= 2, "fused q/k/v modules are in the file"
    assert family == "flux" or any(fm.swap_halves for fm in modules), "SD3's swapped adaLN is in the file"
    tensors = {k: v * 0.6 if "lora_" in k else v for k, v in tensors.items()}
    lora = tmp_path / f"{family}.safetensors"
    safetensors.torch.save_file(tensors, str(lora))
    load_flow_lora(model, lora)
    want = flow_forward(family, model.transformer)

    out_dir = tmp_path / "baked"
    bake([Source(lora)], flow_dirs[family], out_dir)
    cls = diffusers.FluxTransformer2DModel if family == "flux" else diffusers.SD3Transformer2DModel
    baked: Any = cls.from_pretrained(out_dir / "transformer").eval()
    got = flow_forward(family, baked)
    assert (want - base).abs().max() > 0.05
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()


# ----------------------------------------------------------------------------------------- single-file bases


def test_bake_single_files_in_original_key_names(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """BFL Flux (sd-scripts' rule: lora_unet_ + the BFL path), LDM SD1.5 (diffusers names through the SGM
    numbering: down_blocks.0.attentions.0 is input_blocks.1.1), SGM SDXL with OpenCLIP's fused in_proj."""
    gen = torch.Generator().manual_seed(8)
    cases: list[tuple[dict[str, torch.Tensor], dict[str, tuple[str, tuple[int, int] | None]]]] = [
        (
            {
                "double_blocks.0.img_attn.qkv.weight": torch.randn(12, 4),
                "double_blocks.0.img_attn.qkv.bias": torch.randn(12),
                "single_blocks.0.linear2.weight": torch.randn(4, 8),
            },
            {
                "lora_unet_double_blocks_0_img_attn_qkv": ("double_blocks.0.img_attn.qkv.weight", None),
                "lora_unet_single_blocks_0_linear2": ("single_blocks.0.linear2.weight", None),
            },
        ),
        (
            {
                "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight": torch.randn(6, 6),
                "model.diffusion_model.output_blocks.2.1.conv.weight": torch.randn(5, 5, 3, 3),
                "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight": torch.randn(4, 4),
            },
            {
                "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": (
                    "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
                    None,
                ),
                "lora_unet_up_blocks_0_upsamplers_0_conv": (
                    "model.diffusion_model.output_blocks.2.1.conv.weight",
                    None,
                ),
                "lora_te_text_model_encoder_layers_0_self_attn_q_proj": (
                    "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
                    None,
                ),
            },
        ),
        (
            {
                "model.diffusion_model.input_blocks.4.1.proj_in.weight": torch.randn(6, 6),
                "conditioner.embedders.0.transformer.text_model.encoder.layers.0.mlp.fc1.weight": torch.randn(8, 4),
                "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight": torch.randn(12, 4),
            },
            {
                "lora_unet_input_blocks_4_1_proj_in": ("model.diffusion_model.input_blocks.4.1.proj_in.weight", None),
                "lora_te1_text_model_encoder_layers_0_mlp_fc1": (
                    "conditioner.embedders.0.transformer.text_model.encoder.layers.0.mlp.fc1.weight",
                    None,
                ),
                "lora_te2_text_model_encoder_layers_0_self_attn_k_proj": (
                    "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight",
                    (4, 8),
                ),
            },
        ),
    ]
    for i, (base_tensors, where) in enumerate(cases):
        base = tmp_path / f"base{i}.safetensors"
        safetensors.torch.save_file(base_tensors, str(base), metadata={"format": "pt"})
        lora_tensors: dict[str, torch.Tensor] = {}
        for name, (key, rows) in where.items():
            shape = base_tensors[key].shape
            out = shape[0] if rows is None else rows[1] - rows[0]
            lora_tensors |= module(gen, out, tuple(shape[1:]), 2, 1.0, name)
        lora = tmp_path / f"lora{i}.safetensors"
        safetensors.torch.save_file(lora_tensors, str(lora))
        out_file = tmp_path / f"baked{i}.safetensors"
        if i == 0:  # through the CLI, in fp16
            from nyx_tui.cli import main

            args = ["lora", "merge", f"{lora}:0.5", "--base", str(base), "-o", str(out_file), "--precision", "fp16"]
            assert main([*args, "--json"]) == 0
            assert json.loads(capsys.readouterr().out)["baked"] == {base.name: 2}
            assert {v.dtype for v in safetensors.torch.load_file(str(out_file)).values()} == {torch.float16}
        bake([Source(lora, 0.5)], base, out_file)  # each weight keeps its dtype (fp32 here)
        baked = safetensors.torch.load_file(str(out_file))
        assert set(baked) == set(base_tensors)
        changed = set()
        for name, (key, rows) in where.items():
            want = base_tensors[key].double().clone()
            a, b = rows if rows is not None else (0, want.shape[0])
            want[a:b] += 0.5 * lora_delta(lora_tensors, name)
            assert torch.allclose(baked[key].double(), want, atol=1e-5), (i, name)
            changed.add(key)
        for key in set(base_tensors) - changed:
            assert torch.equal(baked[key], base_tensors[key])


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from nyx_tui.demo_assets import build_tiny_sdxl

    return build_tiny_sdxl(tmp_path_factory.mktemp("merge") / "sdxl")


def sdxl_outputs(pipe: Any) -> list[torch.Tensor]:
    cfg = pipe.unet.config
    gen = torch.Generator().manual_seed(9)
    x, h = torch.randn(1, 4, 8, 8, generator=gen), torch.randn(1, 77, cfg.cross_attention_dim, generator=gen)
    pooled = torch.randn(1, cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim, generator=gen)
    cond = {"text_embeds": pooled, "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
    ids = pipe.tokenizer(["a green star"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        unet = pipe.unet(x, torch.tensor([300]), encoder_hidden_states=h, added_cond_kwargs=cond).sample
        return [unet, pipe.text_encoder(ids)[0], pipe.text_encoder_2(ids)[0]]


def test_bake_sdxl_folder_takes_sgm_names(sdxl_dir: Path, tmp_path: Path) -> None:
    """sd-scripts' SDXL files name UNet modules the SGM way (`kohya_names`): baked where diffusers loads them."""
    from diffusers import StableDiffusionXLPipeline

    from nyx_tui.trainers.native.kohya_names import UNetLayout, sgm_path
    from nyx_tui.trainers.native.networks import text_encoder_name

    pipe: Any = StableDiffusionXLPipeline.from_pretrained(sdxl_dir)
    layout = UNetLayout.from_config(pipe.unet.config)
    gen = torch.Generator().manual_seed(10)
    tensors: dict[str, torch.Tensor] = {}
    for path, layer in pipe.unet.named_modules():
        if isinstance(layer, torch.nn.Linear) and ".attentions." in path and "attn2.to_k" in path:
            tensors |= module(
                gen,
                layer.out_features,
                (layer.in_features,),
                2,
                1.0,
                "lora_unet_" + sgm_path(path, layout).replace(".", "_"),
            )
        elif isinstance(layer, torch.nn.Conv2d) and path.endswith("conv1"):
            name = "lora_unet_" + sgm_path(path, layout).replace(".", "_")
            tensors |= module(gen, layer.out_channels, (layer.in_channels, *layer.kernel_size), 2, 1.0, name)
    assert any(k.startswith("lora_unet_input_blocks_") for k in tensors)
    for prefix, encoder in (("lora_te1", pipe.text_encoder), ("lora_te2", pipe.text_encoder_2)):
        for path, layer in encoder.named_modules():
            if isinstance(layer, torch.nn.Linear) and "self_attn" in path:
                tensors |= module(
                    gen, layer.out_features, (layer.in_features,), 2, 1.0, text_encoder_name(prefix, path)
                )
    lora = tmp_path / "sdxl.safetensors"
    safetensors.torch.save_file({k: v * 0.5 if "lora_" in k else v for k, v in tensors.items()}, str(lora))
    base = sdxl_outputs(pipe)
    pipe.load_lora_weights(str(lora))
    want = sdxl_outputs(pipe)
    bake([Source(lora)], sdxl_dir, tmp_path / "baked")
    got = sdxl_outputs(StableDiffusionXLPipeline.from_pretrained(tmp_path / "baked"))
    for i, (g, w, b) in enumerate(zip(got, want, base, strict=True)):
        assert (w - b).abs().max() > 0.01, f"part {i}: the LoRA acts"
        assert torch.allclose(g, w, atol=1e-4), (i, (g - w).abs().max())
