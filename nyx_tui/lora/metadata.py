"""Editing a LoRA file's metadata (title, author, trigger words, thumbnail…) without touching its tensors.

`write_metadata` rewrites only the header: the tensor entries keep their dtypes, shapes and offsets, the
`__metadata__` map changes, and the data section is streamed across unchanged, so every tensor stays
byte-identical (and sd-webui's `sshs_model_hash`, a hash of the data section, stays valid). The header is
padded with spaces to a multiple of 8 as safetensors pads it. The new file is written next to the old one
and moved over it with `os.replace`: a crash leaves the old file or the new one, never half of either.

The editable fields are the `modelspec.*` keys of Stability's model spec that LoRA browsers show (A1111's
extra-networks panel, Civitai's uploader, ComfyUI-Lora-Manager) and the `ss_*` keys people edit (the output
name, the training comment). A thumbnail given as an image path becomes `modelspec.thumbnail` as a
`data:image/…;base64,` URI of the image shrunk to at most 256 px (Pillow).
"""

from __future__ import annotations

import base64
import io
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

from nyx_tui.lora.header import LoraFileError, check_metadata, header_bytes, read_header, temp_path

EDITABLE_FIELDS: list[tuple[str, str]] = [
    ("modelspec.title", "Title"),
    ("modelspec.author", "Author"),
    ("modelspec.description", "Description"),
    ("modelspec.trigger_phrase", "Trigger words"),
    ("modelspec.usage_hint", "Usage hint"),
    ("modelspec.tags", "Tags"),
    ("modelspec.license", "License"),
    ("modelspec.thumbnail", "Thumbnail"),
    ("modelspec.date", "Date"),
    ("modelspec.resolution", "Resolution"),
    ("modelspec.preprocessor", "Preprocessor"),
    ("ss_output_name", "Output name"),
    ("ss_training_comment", "Training comment"),
]
THUMBNAIL_KEY = "modelspec.thumbnail"
THUMBNAIL_MAX_PX = 256
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")


def read_metadata(path: Path | str) -> dict[str, str]:
    """A LoRA file's `__metadata__` (every value a string), read from the checked header only."""
    return dict(read_header(path).metadata)


def thumbnail_uri(image: Path | str, max_px: int = THUMBNAIL_MAX_PX) -> str:
    """An image as a `data:` URI for `modelspec.thumbnail`: shrunk to fit max_px × max_px (aspect kept),
    PNG if it has transparency, else JPEG (quality 90)."""
    from PIL import Image, UnidentifiedImageError

    image = Path(image)
    try:
        with Image.open(image) as im:
            im.load()
            im.thumbnail((max_px, max_px))
            has_alpha = im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info)
            buf = io.BytesIO()
            if has_alpha:
                im.convert("RGBA").save(buf, "PNG", optimize=True)
                mime = "image/png"
            else:
                im.convert("RGB").save(buf, "JPEG", quality=90)
                mime = "image/jpeg"
    except FileNotFoundError:
        raise LoraFileError(f"thumbnail {image}: no such file", "check the image path") from None
    except (UnidentifiedImageError, OSError) as e:
        raise LoraFileError(f"thumbnail {image}: not an image Pillow can read ({e})", "use a PNG, JPEG or WebP") from e
    return f"data:{mime};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"


def _thumbnail_value(value: str) -> str:
    """`modelspec.thumbnail` as given: a data: URI or URL stays, an image path becomes a data: URI."""
    if value.startswith(("data:", "http://", "https://")) or not value:
        return value
    p = Path(value).expanduser()
    if p.suffix.lower() in _IMAGE_SUFFIXES or p.exists():
        return thumbnail_uri(p)
    return value


def apply_updates(metadata: Mapping[str, str], updates: Mapping[str, str | None]) -> dict[str, str]:
    """`metadata` with `updates` applied: a string sets the key, None deletes it. Non-string values are
    refused (safetensors metadata holds only strings)."""
    out = dict(metadata)
    for key, value in updates.items():
        if not isinstance(key, str) or not key:
            raise LoraFileError(f"metadata key {key!r} is not a non-empty string", "name the key (modelspec.title)")
        if value is None:
            out.pop(key, None)
            continue
        if not isinstance(value, str):
            raise LoraFileError(
                f"metadata {key} = {value!r} is a {type(value).__name__}: safetensors metadata holds only strings",
                "pass the value as text (json.dumps a list or a number)",
            )
        out[key] = _thumbnail_value(value) if key == THUMBNAIL_KEY else value
    return check_metadata(out)


def write_metadata(path: Path | str, updates: Mapping[str, str | None], output: Path | str | None = None) -> Path:
    """Apply `updates` to the metadata of `path` (None deletes a key) and write the result to `output`
    (default: `path` itself, replaced atomically). Tensor bytes are copied verbatim. Returns the written path."""
    path = Path(path)
    header = read_header(path)
    meta = apply_updates(header.metadata, updates)
    dst = Path(output) if output is not None else path
    entries = [(t.name, t.dtype, t.shape, t.start, t.end) for t in header.tensors.values()]
    new_header = header_bytes(entries, meta)
    data_end = header.data_start + max((t.end for t in header.tensors.values()), default=0)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(dst)
    try:
        with open(path, "rb") as src, open(tmp, "wb") as out:
            out.write(new_header)
            src.seek(header.data_start)
            remaining = data_end - header.data_start
            while remaining > 0:
                chunk = src.read(min(remaining, 1 << 20))
                if not chunk:
                    raise LoraFileError(f"{path}: changed while being read", "try again once nothing writes it")
                out.write(chunk)
                remaining -= len(chunk)
            out.flush()
            os.fsync(out.fileno())
        if dst.exists():
            shutil.copymode(dst, tmp)
        elif path != dst:
            shutil.copymode(path, tmp)
        os.replace(tmp, dst)
    except PermissionError:
        raise LoraFileError(f"cannot write {dst}: permission denied", "write to another file with -o OUT") from None
    finally:
        if tmp.exists():
            tmp.unlink()
    return dst
