"""`nyx lora resize`: the ranks sd-scripts' rule picks, the truncated SVD it keeps, the metadata, refusals, and
a resize to the file's own rank that leaves a real (tiny SD1.5) UNet's output where it was, up to fp16.

The planted-spectrum files have up = Q₁·diag(S), down = Q₂ᵀ (Q orthonormal), so ΔW's singular values are S and
its truncated SVD is known without an SVD; the expected ranks are worked out by hand from sd-scripts' rule
(`networks/resize_lora.py`: index functions, clamp to [1, n−1], +1) and written here as numbers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch

from nyx_tui.lora.resize import LoraFileError, resize_lora
from nyx_tui.trainers.native import lora_io

# planted spectra (largest first); module shapes; the expected ranks follow in EXPECTED
SPECTRA: dict[str, tuple[list[float], tuple[int, ...]]] = {
    # linear 16 × 12, rank 6
    "lora_unet_steep": ([8.0, 4.0, 2.0, 1.0, 0.5, 0.25], (16, 12)),
    # linear 10 × 8, rank 4, nearly flat: every value counts (not exactly flat: a cut would not be unique)
    "lora_unet_flat": ([1.0, 0.99, 0.98, 0.97], (10, 8)),
    # LoCon 3×3 conv: out 6, in 3 × 3 × 3 = 27 columns, rank 5; n = min(6, 27) = 6
    "lora_unet_conv3": ([5.0, 1.0, 0.9, 0.1, 0.01], (6, 3, 3, 3)),
    # 1×1 conv: out 8, in 5, rank 3
    "lora_unet_conv1": ([3.0, 2.0, 1.0], (8, 5, 1, 1)),
}
ALPHAS = {"lora_unet_steep": 3.0, "lora_unet_flat": 4.0, "lora_unet_conv3": 1.0, "lora_unet_conv1": 6.0}

# By hand. n = min(out, in·kh·kw): steep 12, flat 8, conv3 6, conv1 5. Cap = the module's own rank (no --max-rank).
# sv_ratio 5 (keep S > S0/5):       steep: 8>1.6: {8,4,2} c=3 → 3+1 = 4;  flat: c=4 → 5 → cap 4;
#                                    conv3: 5>1: {5} c=1 → 2;  conv1: 3>0.6: c=3 → 4 → cap 3
# sv_fro 0.9 (cum S²/ΣS² < 0.81):   steep: S² 64,16,4,1,.25,.0625 Σ85.3125, cum .750,.938 → c=1 → +1 = 2 → +1 = 3
#                                    flat: S² Σ3.8814 cum .258,.510,.758,1 → c=3 → 4 → 5 → cap 4
#                                    conv3: S² 25,1,.81,.01,.0001 Σ26.8201 cum .932 → c=0 → 1 → 2
#                                    conv1: 9,4,1 Σ14 cum .643,.929 → c=1 → 2 → 3 (own rank 3)
# sv_cumulative 0.9 (cum S/ΣS < .9): steep: Σ15.75, cum .508,.762,.889,.952 → c=3 → 4 → 5
#                                    flat: Σ3.94 cum .254,.505,.754,1 → c=3 → 5 → cap 4
#                                    conv3: Σ7.01 cum .713,.856,.984 → c=2 → 3 → 4
#                                    conv1: Σ6 cum .5,.833,1 → c=2 → 3 → 4 → cap 3
# sv_cumulative 0.5: steep: cum .508 ≥ .5 → c=0 → 1 → 2;  conv1: cum .5 ≥ .5 (searchsorted left) → c=0 → 1 → 2
EXPECTED: dict[tuple[str, float], dict[str, int]] = {
    ("sv_ratio", 5.0): {"lora_unet_steep": 4, "lora_unet_flat": 4, "lora_unet_conv3": 2, "lora_unet_conv1": 3},
    ("sv_fro", 0.9): {"lora_unet_steep": 3, "lora_unet_flat": 4, "lora_unet_conv3": 2, "lora_unet_conv1": 3},
    ("sv_cumulative", 0.9): {"lora_unet_steep": 5, "lora_unet_flat": 4, "lora_unet_conv3": 4, "lora_unet_conv1": 3},
    ("sv_cumulative", 0.5): {"lora_unet_steep": 2, "lora_unet_flat": 3, "lora_unet_conv3": 2, "lora_unet_conv1": 2},
}
# flat at sv_cumulative 0.5: cum .254,.505 → c=1 → 2 → 3; conv3 at 0.5: cum .713 → c=0 → 1 → 2


def orthonormal(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64))
    return q


def planted() -> tuple[dict[str, torch.Tensor], dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """The file's tensors, and per module (U, Vᵀ) of its ΔW (ΔW = U·diag(S)·Vᵀ, without alpha/rank)."""
    gen = torch.Generator().manual_seed(3)
    tensors: dict[str, torch.Tensor] = {}
    factors = {}
    for name, (spectrum, shape) in SPECTRA.items():
        out, columns, r = shape[0], int(torch.Size(shape[1:]).numel()), len(spectrum)
        u, v = orthonormal(out, r, gen), orthonormal(columns, r, gen)
        up, down = u * torch.tensor(spectrum, dtype=torch.float64), v.T
        if len(shape) == 4:
            up, down = up.reshape(out, r, 1, 1), down.reshape(r, *shape[1:])
        tensors[f"{name}.lora_up.weight"] = up.float().contiguous()
        tensors[f"{name}.lora_down.weight"] = down.float().contiguous()
        tensors[f"{name}.alpha"] = torch.tensor(ALPHAS[name])
        factors[name] = (u, v.T)
    return tensors, factors


@pytest.fixture
def planted_file(tmp_path: Path) -> Path:
    tensors, _ = planted()
    path = tmp_path / "planted.safetensors"
    meta = {
        "ss_network_dim": "6",
        "ss_network_alpha": "3",
        "ss_training_comment": "my run",
        "ss_base_model_version": "sd_v1",
    }
    safetensors.torch.save_file(tensors, str(path), metadata=meta)
    return path


def delta(tensors: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """ΔW·alpha/rank of a module from the file's tensors, as a 2-D float64 matrix."""
    up, down = tensors[f"{name}.lora_up.weight"].double(), tensors[f"{name}.lora_down.weight"].double()
    r = down.shape[0]
    return (up.reshape(up.shape[0], r) @ down.reshape(r, -1)) * float(tensors[f"{name}.alpha"]) / r


@pytest.mark.parametrize(("method", "param"), list(EXPECTED))
def test_dynamic_ranks_are_sd_scripts_and_keep_the_truncated_svd(
    planted_file: Path, tmp_path: Path, method: str, param: float
) -> None:
    out = tmp_path / "resized.safetensors"
    report = resize_lora(planted_file, out, dynamic=method, param=param, precision="fp32")
    got = {m.name: m.new_rank for m in report.modules}
    assert got == EXPECTED[(method, param)]
    saved = safetensors.torch.load_file(str(out))
    original, factors = planted()
    for name, (spectrum, shape) in SPECTRA.items():
        k = got[name]
        assert saved[f"{name}.lora_down.weight"].shape == (k, *shape[1:])
        assert saved[f"{name}.lora_up.weight"].shape == ((shape[0], k, 1, 1) if len(shape) == 4 else (shape[0], k))
        r = len(spectrum)
        assert float(saved[f"{name}.alpha"]) == pytest.approx(ALPHAS[name] / r * k)  # alpha/rank kept
        u, vt = factors[name]
        want = (u[:, :k] * torch.tensor(spectrum[:k], dtype=torch.float64)) @ vt[:k] * ALPHAS[name] / r
        assert torch.allclose(delta(saved, name), want, atol=1e-5), name
        kept = (sum(s * s for s in spectrum[:k]) / sum(s * s for s in spectrum)) ** 0.5
        assert next(m for m in report.modules if m.name == name).fro_retained == pytest.approx(kept, rel=1e-5)
        if k == r:
            assert torch.allclose(delta(saved, name), delta(original, name), atol=1e-5)


def test_max_rank_and_conv_rank_cap_like_new_rank(planted_file: Path, tmp_path: Path) -> None:
    """sd-scripts' --new_rank / --new_conv_rank cap the dynamic rank (convolutions of any kernel take the conv one)."""
    report = resize_lora(
        planted_file, tmp_path / "o.safetensors", dynamic="sv_cumulative", param=0.9, max_rank=3, conv_rank=2
    )
    assert {m.name: m.new_rank for m in report.modules} == {
        "lora_unet_steep": 3, "lora_unet_flat": 3, "lora_unet_conv3": 2, "lora_unet_conv1": 2,
    }  # fmt: skip
    fixed = resize_lora(planted_file, tmp_path / "f.safetensors", rank=2, precision="fp32")
    assert {m.new_rank for m in fixed.modules} == {2}
    big = resize_lora(planted_file, tmp_path / "b.safetensors", rank=64, precision="fp32")
    assert {m.name: m.new_rank for m in big.modules} == {n: len(s) for n, (s, _) in SPECTRA.items()}  # own rank


def test_zero_module_gets_rank_one(tmp_path: Path) -> None:
    path = tmp_path / "zero.safetensors"
    tensors = {
        "lora_unet_z.lora_down.weight": torch.randn(4, 6),
        "lora_unet_z.lora_up.weight": torch.zeros(5, 4),  # a freshly initialised LoRA: up = 0
        "lora_unet_z.alpha": torch.tensor(2.0),
    }
    safetensors.torch.save_file(tensors, str(path))
    report = resize_lora(path, tmp_path / "o.safetensors", dynamic="sv_ratio", param=10)
    assert [(m.new_rank, m.new_alpha) for m in report.modules] == [(1, 0.5)]


def test_metadata_and_hashes(planted_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "fixed.safetensors"
    resize_lora(planted_file, out, rank=2, precision="fp16")
    meta = lora_io.read_metadata(out)
    assert meta["ss_network_dim"] == "2"
    assert meta["ss_network_alpha"] == "Dynamic"  # linear alphas 3/6 × 2 = 1 and 4/4 × 2 = 2 differ
    assert meta["ss_training_comment"] == "dimension is resized from 6 to 2; my run"
    assert meta["ss_base_model_version"] == "sd_v1"
    saved = safetensors.torch.load_file(str(out))
    assert {v.dtype for v in saved.values()} == {torch.float16}
    assert (meta["sshs_model_hash"], meta["sshs_legacy_hash"]) == lora_io.safetensors_hashes(saved, meta)

    dyn = tmp_path / "dyn.safetensors"
    resize_lora(planted_file, dyn, dynamic="sv_fro", param=0.9)
    meta = lora_io.read_metadata(dyn)
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("Dynamic", "Dynamic")
    assert meta["ss_training_comment"] == "Dynamic resize with sv_fro: 0.9 from 6; my run"
    assert safetensors.torch.load_file(str(dyn))["lora_unet_steep.alpha"].dtype == torch.float32  # input's dtype


def _write(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    safetensors.torch.save_file(tensors, str(path))
    return path


@pytest.mark.parametrize(
    ("kind", "tensors", "words"),
    [
        ("loha", {"lora_unet_a.hada_w1_a": torch.ones(4, 2), "lora_unet_a.hada_w1_b": torch.ones(2, 4)}, "Hadamard"),
        ("lokr", {"lora_unet_a.lokr_w1": torch.ones(2, 2), "lora_unet_a.lokr_w2": torch.ones(2, 2)}, "Kronecker"),
        (
            "dora",
            {
                "lora_unet_a.lora_down.weight": torch.ones(2, 4),
                "lora_unet_a.lora_up.weight": torch.ones(4, 2),
                "lora_unet_a.dora_scale": torch.ones(4, 1),
            },
            "magnitude",
        ),
    ],
)
def test_loha_lokr_dora_are_refused_with_the_reason(
    tmp_path: Path, kind: str, tensors: dict[str, torch.Tensor], words: str
) -> None:
    path = _write(tmp_path / f"{kind}.safetensors", tensors)
    with pytest.raises(LoraFileError, match=words):
        resize_lora(path, tmp_path / "o.safetensors", rank=1)
    assert not (tmp_path / "o.safetensors").exists()


def test_bad_input_is_named(planted_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(LoraFileError, match="no such file"):
        resize_lora(tmp_path / "missing.safetensors", tmp_path / "o.safetensors", rank=2)
    with pytest.raises(LoraFileError, match="needs --param"):
        resize_lora(planted_file, tmp_path / "o.safetensors", dynamic="sv_fro")
    with pytest.raises(LoraFileError, match="fraction"):
        resize_lora(planted_file, tmp_path / "o.safetensors", dynamic="sv_fro", param=90)
    with pytest.raises(LoraFileError, match="input file"):
        resize_lora(planted_file, planted_file, rank=2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the GPU is the boundary we can't rely on
    with pytest.raises(LoraFileError, match=r"--device cuda.*no CUDA GPU"):
        resize_lora(planted_file, tmp_path / "o.safetensors", rank=2, device="cuda")


def test_cli_prints_the_report_and_json(planted_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from nyx_tui.cli import main

    out = tmp_path / "cli.safetensors"
    assert main(["lora", "resize", str(planted_file), "-o", str(out), "--dynamic", "sv_ratio", "--param", "5",
                 "--json"]) == 0  # fmt: skip
    data = json.loads(capsys.readouterr().out)
    assert {m["name"]: m["new_rank"] for m in data["modules"]} == EXPECTED[("sv_ratio", 5.0)]
    assert main(["lora", "resize", str(planted_file), "-o", str(out), "--rank", "2"]) == 0
    text = capsys.readouterr().out
    assert "lora_unet_steep" in text and "6 → 2" in text and "fro kept" in text
    assert main(["lora", "resize", str(tmp_path / "nope.safetensors"), "-o", str(out), "--rank", "2"]) == 2
    assert "no such file" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: --rank and --dynamic exclude each other
        main(["lora", "resize", str(planted_file), "-o", str(out), "--rank", "2", "--dynamic", "sv_fro"])


# ------------------------------------------------------------------------------ a real UNet, loaded by diffusers


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from nyx_tui.demo_assets import build_tiny_sd15

    return build_tiny_sd15(tmp_path_factory.mktemp("resize") / "sd15")


def unet_lora(unet: Any, rank: int, seed: int) -> dict[str, torch.Tensor]:
    """A random kohya LoRA/LoCon on the tiny UNet: attention Linears, the 1×1 proj_in/out, the ResNets' 3×3 convs."""
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for path, module in unet.named_modules():
        linear = isinstance(module, torch.nn.Linear) and ".attentions." in path
        conv = isinstance(module, torch.nn.Conv2d) and (
            (".resnets." in path and path.endswith("conv1")) or "proj_" in path
        )
        if not (linear or conv):
            continue
        name = "lora_unet_" + path.replace(".", "_")
        if linear:
            down = torch.randn(rank, module.in_features, generator=gen) * 0.3
            up = torch.randn(module.out_features, rank, generator=gen) * 0.3
        else:
            kh, kw = module.kernel_size
            down = torch.randn(rank, module.in_channels, kh, kw, generator=gen) * 0.2
            up = torch.randn(module.out_channels, rank, 1, 1, generator=gen) * 0.2
        tensors |= {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(2.0)}
    return tensors


def unet_output(model_dir: Path, lora: Path | None) -> torch.Tensor:
    from diffusers import StableDiffusionPipeline

    pipe: Any = StableDiffusionPipeline.from_pretrained(model_dir)
    if lora is not None:
        pipe.load_lora_weights(str(lora))
    gen = torch.Generator().manual_seed(7)
    x, h = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 77, 32, generator=gen)
    with torch.no_grad():
        return pipe.unet(x, torch.tensor([10, 500]), encoder_hidden_states=h).sample  # type: ignore[no-any-return]


def test_resize_to_own_rank_keeps_the_unet_output_within_fp16(model_dir: Path, tmp_path: Path) -> None:
    from diffusers import UNet2DConditionModel

    unet: Any = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")
    tensors = unet_lora(unet, rank=4, seed=1)
    assert any(v.dim() == 4 and v.shape[2] == 3 for v in tensors.values()), "3×3 LoCon modules are in the file"
    original = tmp_path / "orig.safetensors"
    safetensors.torch.save_file(tensors, str(original))
    as_fp16 = tmp_path / "fp16.safetensors"
    safetensors.torch.save_file({k: v.half() for k, v in tensors.items()}, str(as_fp16))
    resized = tmp_path / "resized.safetensors"
    report = resize_lora(original, resized, rank=4, precision="fp16")
    assert {(m.old_rank, m.new_rank) for m in report.modules} == {(4, 4)}
    assert (report.metadata["ss_network_dim"], report.metadata["ss_network_alpha"]) == ("4", "2")
    assert any(m.kind == "conv3x3" for m in report.modules) and any(m.kind == "conv1x1" for m in report.modules)

    base = unet_output(model_dir, None)
    want = unet_output(model_dir, original)
    fp16_error = (unet_output(model_dir, as_fp16) - want).abs().max()
    got = unet_output(model_dir, resized)
    assert (want - base).abs().max() > 100 * fp16_error, "the LoRA changes the output well beyond fp16 rounding"
    assert (got - want).abs().max() <= 3 * fp16_error + 1e-6

    half = tmp_path / "half.safetensors"  # a real cut moves the output: the check above can fail
    resize_lora(original, half, rank=1, precision="fp16")
    assert (unet_output(model_dir, half) - want).abs().max() > 10 * fp16_error
