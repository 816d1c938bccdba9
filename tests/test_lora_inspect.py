"""`nyx lora inspect` / `inspect_lora`: real files (Nyx's writer on the tiny SD1.5 model, LyCORIS' own LoHa,
LoKr and DoRA networks, sd-scripts' key names for SDXL/Flux/SD3) and crafted broken ones (a huge header
length, broken JSON, bad offsets) that must give a clear error without a crash or a huge allocation."""

from __future__ import annotations

import json
import subprocess
import sys
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from lora_files import ALPHA, DIM, attached, config, crafted, lycoris_file, save_nyx_lora, write_numpy

from nyx_tui.lora.header import LoraFileError, read_header, read_tensor
from nyx_tui.lora.inspect import inspect_lora
from nyx_tui.lora.metadata import write_metadata

REFERENCE = Path("/work/shared/reference/sd-scripts-lora-keys.json")


@pytest.fixture(scope="module")
def sd15(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from nyx_tui.demo_assets import build_tiny_sd15

    return build_tiny_sd15(tmp_path_factory.mktemp("inspect") / "sd15")


@pytest.fixture(scope="module")
def nyx_file(sd15: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    """A LoCon (LoRA on attention + conv at its own alpha) with text-encoder modules, saved by Nyx."""
    _, network = attached(config(sd15, train_text_encoder=True, conv_dim=DIM, conv_alpha=1.0))
    path = save_nyx_lora(network, tmp_path_factory.mktemp("files") / "shapes.safetensors")
    return path, network


def run_cli(*args: str) -> tuple[int, str, str]:
    proc = subprocess.run(
        [sys.executable, "-m", "nyx_tui", "lora", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"},
    )
    return proc.returncode, proc.stdout, proc.stderr


# ------------------------------------------------------------------------------------------ Nyx's own files


def test_inspect_nyx_locon(nyx_file: tuple[Path, Any]) -> None:
    import safetensors.numpy

    path, network = nyx_file
    info = inspect_lora(path)
    tensors = safetensors.numpy.load_file(str(path))
    assert info.key_format == "kohya"
    assert (info.family, info.family_source) == ("sd15", "metadata")
    assert info.network == "locon"
    assert len(info.modules) == len(network.adapted) == len({k.split(".")[0] for k in tensors})
    assert info.components["text_encoder"] == sum(a.root != "unet" for a in network.adapted) > 0
    assert info.parameters == sum(v.size for k, v in tensors.items() if not k.endswith(".alpha"))
    assert info.rank.min == info.rank.max == DIM
    convs = [m for m in info.modules if m.conv]
    assert convs and all(m.kind == "locon" and m.kernel == (3, 3) and m.alpha == 1.0 for m in convs)
    linears = [m for m in info.modules if not m.conv]
    assert all(m.kind == "lora" and m.alpha == ALPHA and m.kernel is None for m in linears)
    assert (info.alpha.min, info.alpha.max, info.alpha.most_common) == (1.0, ALPHA, ALPHA)
    for m in info.modules:  # shapes from the file's own tensors
        down, up = tensors[f"{m.name}.lora_down.weight"], tensors[f"{m.name}.lora_up.weight"]
        assert (m.out_features, m.in_features, m.rank) == (up.shape[0], down.shape[1], down.shape[0])
    assert info.training["steps"] == 120 and info.training["epochs"] == 3
    assert info.training["learning_rate"] == pytest.approx(1e-4)
    assert info.training["optimizer"] == "torch.optim.adamw.AdamW"
    assert info.tag_frequency == [("red circle", 5), ("star", 3), ("blue square", 2)]
    assert info.datasets["1_extra"] == {"red circle": 1, "star": 3}
    data = info.to_json()
    assert json.loads(json.dumps(data))["tag_frequency"][0] == {"tag": "red circle", "count": 5}
    assert data["modules"][0]["name"] == info.modules[0].name


def test_family_from_keys_without_metadata(nyx_file: tuple[Path, Any], tmp_path: Path) -> None:
    path, _ = nyx_file
    bare = write_metadata(path, {"ss_base_model_version": None, "modelspec.architecture": None}, tmp_path / "b.st")
    info = inspect_lora(bare)
    assert (info.family, info.family_source) == ("sd15", "keys")


def _names_file(path: Path, names: list[str], width: int = 8) -> Path:
    tensors: dict[str, np.ndarray] = {}
    for name in names:
        tensors[f"{name}.lora_down.weight"] = np.ones((2, width), np.float16)
        tensors[f"{name}.lora_up.weight"] = np.ones((width, 2), np.float16)
        tensors[f"{name}.alpha"] = np.array(1.0, np.float16)
    return write_numpy(path, tensors)


@pytest.mark.parametrize(
    ("case", "family"),
    [("sdxl_lora", "sdxl"), ("flux_lora_default", "flux"), ("sd3_lora_default", "sd3"), ("sd1_lora", "sd15")],
)
def test_family_of_sd_scripts_names(case: str, family: str, tmp_path: Path) -> None:
    """sd-scripts' own module names (the reference list) tell the family with no metadata."""
    ref = json.loads(REFERENCE.read_text())[case]
    names = sorted({k.split(".")[0] for k in ref["sample"]} | set(ref.get("double_sample", [])))
    info = inspect_lora(_names_file(tmp_path / "x.safetensors", names))
    assert (info.family, info.family_source, info.key_format) == (family, "keys", "kohya")


def test_peft_file_and_sd2_width(tmp_path: Path) -> None:
    tensors = {
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight": np.ones((4, 1024), np.float32),
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_B.weight": np.ones((320, 4), np.float32),
    }
    info = inspect_lora(write_numpy(tmp_path / "p.safetensors", tensors))
    assert (info.key_format, info.family, info.network) == ("peft", "sd2", "lora")
    m = info.modules[0]
    assert (m.name, m.rank, m.alpha, m.in_features, m.out_features) == (
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
        4,
        None,
        1024,
        320,
    )
    assert info.alpha.values == {"4": 1}  # no alpha: loaders take the rank


# ------------------------------------------------------------------------------------------ LyCORIS kinds


@pytest.mark.parametrize(
    ("algo", "kw", "kind", "tensor"),
    [
        ("loha", {}, "loha", "hada_w1_a"),
        ("lokr", {"factor": 4}, "lokr", "lokr_w1"),
        ("lora", {"dora_wd": True}, "dora", "dora_scale"),
        ("locon", {}, "locon", "lora_down.weight"),
    ],
)
def test_lycoris_kinds(sd15: Path, tmp_path: Path, algo: str, kw: dict[str, Any], kind: str, tensor: str) -> None:
    """LyCORIS' own files: each kind told; its default `lycoris_` prefix flagged, kohya's not."""
    _, bad = lycoris_file(sd15, tmp_path / "bad.safetensors", algo, **kw)
    info = inspect_lora(bad)
    expected_kind = "locon" if kind == "locon" else kind
    assert info.network == expected_kind
    assert all(any(k.endswith(tensor) for k in m.keys) for m in info.modules if m.kind == expected_kind)
    assert info.key_format == "lycoris-prefix"
    assert any("--fix-prefix" in p for p in info.problems)
    assert all(m.out_features and m.in_features for m in info.modules)
    convs = [m for m in info.modules if m.kernel and max(m.kernel) > 1]
    if kind == "loha":  # LoHa flattens a kernel into its input width (in · kh · kw): no kernel to tell
        assert any(m.in_features == 32 * 9 for m in info.modules)
    else:
        assert convs and all(m.conv and m.kernel == (3, 3) for m in convs), "ResNet convolutions are adapted"
    if kind in ("loha", "lora", "locon"):
        assert {m.rank for m in info.modules} == {DIM}
    _, good = lycoris_file(sd15, tmp_path / "good.safetensors", algo, prefix="lora_unet", **kw)
    fixed = inspect_lora(good)
    assert (fixed.key_format, fixed.problems, fixed.network) == ("kohya", [], expected_kind)


# ------------------------------------------------------------------------------------------ broken files


def _peak(fn: Any) -> tuple[BaseException | None, int]:
    tracemalloc.start()
    err: BaseException | None = None
    try:
        fn()
    except LoraFileError as e:
        err = e
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return err, peak


@pytest.mark.parametrize(
    ("header", "length", "tail", "words"),
    [
        (b"{}", 2**62, b"", "limit"),  # a huge header length: refused before any read
        (b"{}", 50 * 1024 * 1024, b"", "only"),  # under the limit but past the end of the file
        (b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]', None, b"", "not valid JSON"),
        (b"[1, 2, 3]", None, b"", "not an object"),
        (b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 800]}}', None, b"\0" * 8, "truncated"),
        (b'{"a": {"dtype": "Q7", "shape": [2], "data_offsets": [0, 8]}}', None, b"\0" * 8, "unknown dtype"),
        (b'{"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}', None, b"\0" * 8, "bytes for shape"),
        (b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [4, 0]}}', None, b"\0" * 8, "bad data_offsets"),
        (b'{"__metadata__": {"a": 1}}', None, b"", "map of strings"),
        (b"\xff\xfe{}", None, b"", "not valid JSON"),
    ],
)
def test_broken_headers(tmp_path: Path, header: bytes, length: int | None, tail: bytes, words: str) -> None:
    path = crafted(tmp_path / "bad.safetensors", header, length, tail)
    err, peak = _peak(lambda: inspect_lora(path))
    assert isinstance(err, LoraFileError), "a clear error, not a crash"
    assert words in err.problem and str(path) in err.problem and err.fix
    assert "fix:" in str(err)
    assert peak < 1_000_000, f"{peak} bytes allocated for a {path.stat().st_size}-byte file"


def test_short_missing_and_folder(tmp_path: Path) -> None:
    (tmp_path / "short.safetensors").write_bytes(b"\x01\x02")
    for p, words in ((tmp_path / "short.safetensors", "too short"), (tmp_path / "nope", "no such file")):
        with pytest.raises(LoraFileError, match=words):
            inspect_lora(p)
    with pytest.raises(LoraFileError, match="folder"):
        inspect_lora(tmp_path)


def test_big_file_is_not_loaded(tmp_path: Path) -> None:
    """A 256 MB tensor (a sparse file): inspecting reads the header and the alpha only."""
    n = 64 * 1024 * 1024
    head = json.dumps(
        {
            "m.lora_down.weight": {"dtype": "F32", "shape": [16, n // 16], "data_offsets": [0, 4 * n]},
            "m.alpha": {"dtype": "F32", "shape": [], "data_offsets": [4 * n, 4 * n + 4]},
        }
    ).encode()
    path = tmp_path / "big.safetensors"
    with open(path, "wb") as f:
        f.write(len(head).to_bytes(8, "little") + head)
        f.seek(8 + len(head) + 4 * n)
        f.write(np.array(3.0, np.float32).tobytes())
    err, peak = _peak(lambda: inspect_lora(path))
    assert err is None and peak < 2_000_000
    info = inspect_lora(path)
    assert info.modules[0].alpha == 3.0 and info.file_size == 8 + len(head) + 4 * n + 4
    assert read_tensor(read_header(path), "m.alpha").item() == 3.0


def test_bf16_and_fp8_decoding(tmp_path: Path) -> None:
    """Tensors numpy has no dtype for come back as float32 (bf16: the upper half of a float32)."""
    values = np.array([1.5, -2.25, 0.0, 3.0e38], np.float32)
    bf16 = (values.view(np.uint32) >> 16).astype("<u2").tobytes()
    e4m3 = bytes([0x38, 0xB8, 0x00, 0x7E])  # 1.0, -1.0, 0, 448
    head = json.dumps(
        {
            "a": {"dtype": "BF16", "shape": [4], "data_offsets": [0, 8]},
            "b": {"dtype": "F8_E4M3", "shape": [4], "data_offsets": [8, 12]},
        }
    ).encode()
    path = crafted(tmp_path / "x.safetensors", head, tail=bf16 + e4m3)
    h = read_header(path)
    assert read_tensor(h, "a").tolist()[:3] == [1.5, -2.25, 0.0]
    assert read_tensor(h, "b").tolist() == [1.0, -1.0, 0.0, 448.0]


# ------------------------------------------------------------------------------------------ CLI, torch-free


def test_cli_inspect(nyx_file: tuple[Path, Any], tmp_path: Path) -> None:
    path, _ = nyx_file
    rc, out, err = run_cli("inspect", str(path))
    assert rc == 0, err
    for words in ("sd15", "locon", "red circle", "kohya", "Shapes", "steps"):
        assert words in out
    rc, out, _ = run_cli("inspect", str(path), "--json", "--modules")
    data = json.loads(out)
    assert rc == 0 and data["family"] == "sd15" and len(data["modules"]) == len(inspect_lora(path).modules)
    rc, out, err = run_cli("inspect", str(crafted(tmp_path / "b.safetensors", b"{", 2**40)))
    assert rc == 1 and "error" in err and "fix" in err and "Traceback" not in err


def test_torch_free(nyx_file: tuple[Path, Any], tmp_path: Path) -> None:
    """The TUI imports these: inspecting, editing and converting never import torch."""
    path, _ = nyx_file
    code = f"""
import sys
from pathlib import Path
from nyx_tui.lora import cli_inspect, convert, inspect, metadata
info = inspect.inspect_lora(Path({str(path)!r}))
metadata.write_metadata(Path({str(path)!r}), {{"modelspec.title": "t"}}, Path({str(tmp_path / "m.st")!r}))
convert.convert_file(Path({str(path)!r}), Path({str(tmp_path / "d.st")!r}), "diffusers")
assert "torch" not in sys.modules, "torch imported"
print(info.network)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "locon"
