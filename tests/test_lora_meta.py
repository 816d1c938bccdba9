"""`nyx lora meta` / `write_metadata`: an edit rewrites only the header — every tensor byte stays as it was
(the data sections compared), the file still loads in diffusers with the same effect — and bad values are
refused with the file untouched. Thumbnails become small data: URIs."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from lora_files import attached, config, save_nyx_lora

from nyx_tui.lora.header import LoraFileError, read_header
from nyx_tui.lora.metadata import EDITABLE_FIELDS, read_metadata, write_metadata

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def sd15(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from nyx_tui.demo_assets import build_tiny_sd15

    return build_tiny_sd15(tmp_path_factory.mktemp("meta") / "sd15")


@pytest.fixture(scope="module")
def lora(sd15: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    _, network = attached(config(sd15, train_text_encoder=True))
    return save_nyx_lora(network, tmp_path_factory.mktemp("files") / "shapes.safetensors", dtype="fp16")


def data_section(path: Path) -> bytes:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return raw[8 + n :]


def probe(pipe: Any) -> Any:
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(1, 4, 8, 8, generator=gen)
    ids = pipe.tokenizer(["a green star"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        return pipe.unet(x, torch.tensor([500]), pipe.text_encoder(ids).last_hidden_state).sample


def test_edit_keeps_every_tensor_byte(lora: Path, tmp_path: Path) -> None:
    import safetensors.numpy

    before_meta = read_metadata(lora)
    long_text = "ünïcode ✓ " * 300  # a header that grows by kilobytes
    out = write_metadata(
        lora,
        {"modelspec.title": "Shapes v2", "modelspec.description": long_text, "ss_steps": None},
        tmp_path / "edited.safetensors",
    )
    assert data_section(out) == data_section(lora)  # every tensor byte-identical
    old, new = read_header(lora), read_header(out)
    assert {k: (t.dtype, t.shape, t.start, t.end) for k, t in old.tensors.items()} == {
        k: (t.dtype, t.shape, t.start, t.end) for k, t in new.tensors.items()
    }
    assert new.header_len % 8 == 0  # safetensors' alignment padding
    meta = read_metadata(out)
    assert meta["modelspec.title"] == "Shapes v2" and meta["modelspec.description"] == long_text
    assert "ss_steps" not in meta and "ss_steps" in before_meta
    assert {k: v for k, v in meta.items() if k not in ("modelspec.title", "modelspec.description")} == {
        k: v for k, v in before_meta.items() if k not in ("modelspec.title", "ss_steps")
    }
    assert read_metadata(lora) == before_meta  # -o: the original is untouched
    # safetensors itself reads it, tensors equal
    a, b = safetensors.numpy.load_file(str(lora)), safetensors.numpy.load_file(str(out))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_in_place_edit_loads_in_diffusers(sd15: Path, lora: Path, tmp_path: Path) -> None:
    """Edited in place (atomic replace, no temp file left), the LoRA acts in diffusers exactly as before."""
    from diffusers import DiffusionPipeline

    path = tmp_path / "lora.safetensors"
    path.write_bytes(lora.read_bytes())
    pipe = DiffusionPipeline.from_pretrained(sd15)
    base = probe(pipe)
    pipe.load_lora_weights(str(path))
    before = probe(pipe)
    pipe.unload_lora_weights()
    write_metadata(path, {"modelspec.author": "me", "modelspec.trigger_phrase": "shp style"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora.safetensors"]
    assert read_metadata(path)["modelspec.author"] == "me"
    pipe.load_lora_weights(str(path))
    after = probe(pipe)
    assert (before - base).abs().max() > 0.05, "the LoRA changes the output"
    assert torch.equal(after, before)


def test_refuses_non_strings_and_keeps_file(lora: Path, tmp_path: Path) -> None:
    path = tmp_path / "lora.safetensors"
    path.write_bytes(lora.read_bytes())
    raw = path.read_bytes()
    for bad in ({"ss_steps": 12}, {"modelspec.tags": ["a", "b"]}, {"": "x"}):
        with pytest.raises(LoraFileError) as e:
            write_metadata(path, bad)  # type: ignore[arg-type]
        assert e.value.fix
    assert path.read_bytes() == raw
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora.safetensors"]


def test_thumbnail_from_image(lora: Path, tmp_path: Path) -> None:
    from PIL import Image

    img = tmp_path / "cover.png"
    Image.new("RGB", (600, 400), (200, 30, 30)).save(img)
    out = write_metadata(lora, {"modelspec.thumbnail": str(img)}, tmp_path / "t.safetensors")
    uri = read_metadata(out)["modelspec.thumbnail"]
    head, _, payload = uri.partition(",")
    assert head == "data:image/jpeg;base64"
    thumb = Image.open(io.BytesIO(base64.b64decode(payload)))
    pixel = thumb.convert("RGB").getpixel((10, 10))
    assert thumb.size == (256, 171) and isinstance(pixel, tuple) and pixel[0] > 150
    transparent = tmp_path / "t.png"
    Image.new("RGBA", (100, 300), (0, 0, 0, 0)).save(transparent)
    uri = read_metadata(write_metadata(out, {"modelspec.thumbnail": str(transparent)}))["modelspec.thumbnail"]
    assert uri.startswith("data:image/png;base64,")
    assert Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).size == (85, 256)
    assert data_section(out) == data_section(lora)
    with pytest.raises(LoraFileError, match="no such file"):
        write_metadata(out, {"modelspec.thumbnail": str(tmp_path / "missing.png")})


def test_editable_fields() -> None:
    keys = [k for k, _ in EDITABLE_FIELDS]
    assert len(keys) == len(set(keys))
    for key in (
        "modelspec.title",
        "modelspec.author",
        "modelspec.description",
        "modelspec.trigger_phrase",
        "modelspec.license",
        "modelspec.thumbnail",
        "modelspec.tags",
        "modelspec.usage_hint",
        "ss_output_name",
    ):
        assert key in keys
    assert all(label and label[0].isupper() for _, label in EDITABLE_FIELDS)


def nyx(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nyx_tui", "lora", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"},
    )


def test_cli_meta(lora: Path, tmp_path: Path) -> None:
    path = tmp_path / "lora.safetensors"
    path.write_bytes(lora.read_bytes())
    shown = nyx("meta", str(path))
    assert shown.returncode == 0 and "ss_network_dim" in shown.stdout and "Shapes" in shown.stdout
    edit = nyx(
        "meta",
        str(path),
        "--title",
        "New",
        "--author",
        "A. Person",
        "--trigger",
        "shp",
        "--license",
        "MIT",
        "--description",
        "d",
        "--set",
        "ss_output_name=renamed",
        "--set",
        "x.note=a=b",
        "--unset",
        "ss_steps",
    )
    assert edit.returncode == 0, edit.stderr
    assert "wrote" in edit.stdout and "ss_steps" in edit.stdout
    meta = json.loads(nyx("meta", str(path), "--json").stdout)
    assert meta["modelspec.title"] == "New" and meta["modelspec.author"] == "A. Person"
    assert meta["modelspec.trigger_phrase"] == "shp" and meta["modelspec.license"] == "MIT"
    assert meta["ss_output_name"] == "renamed" and meta["x.note"] == "a=b" and "ss_steps" not in meta
    assert data_section(path) == data_section(lora)
    bad = nyx("meta", str(path), "--set", "novalue")
    assert bad.returncode == 1 and "KEY=VALUE" in bad.stderr
    missing = nyx("meta", str(tmp_path / "nope.safetensors"), "--title", "x")
    assert missing.returncode == 1 and "no such file" in missing.stderr and "fix" in missing.stderr
