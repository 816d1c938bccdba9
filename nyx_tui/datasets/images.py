"""Which files are images: the one list of extensions every dataset tool uses, a sorted walk, and the size
of an image read from its header (EXIF orientation honoured) without decoding its pixels."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

# what Pillow reads and people train on; compared lower-case
IMAGE_EXTS: frozenset[str] = frozenset(
    {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".jfif", ".avif"}
)

Size = tuple[int, int]  # (width, height), as PIL says sizes

EXIF_ORIENTATION = 0x0112
# orientations 5-8 are rotated by 90° (or 270°): the image is shown with its width and height swapped
_SWAPPING_ORIENTATIONS = frozenset({5, 6, 7, 8})


def is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTS and not path.name.startswith(".")


def iter_images(folder: Path, recursive: bool = True) -> Iterator[Path]:
    """The images under `folder` in a stable order (sorted per folder), hidden files and folders skipped."""
    folder = Path(folder)
    if not recursive:
        yield from sorted(p for p in folder.iterdir() if p.is_file() and is_image(p))
        return
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            path = Path(root) / name
            if is_image(path):
                yield path


@dataclass(frozen=True)
class ImageHeader:
    """What an image's header says: its size as displayed (EXIF orientation applied), the stored size,
    the format (`PNG`, `JPEG`, …), the mode (`RGB`, `RGBA`, `P`, …), the EXIF orientation (1 = none) and
    whether it has transparency (an alpha channel, or a palette/colour key marked transparent)."""

    size: Size
    stored_size: Size
    format: str
    mode: str
    orientation: int
    has_alpha: bool


def read_header(path: Path) -> ImageHeader:
    """The image's header, read without decoding the pixels. Raises OSError (or a subclass, e.g. PIL's
    UnidentifiedImageError) when the file is not an image Pillow can read."""
    from PIL import Image

    with Image.open(path) as img:
        stored = img.size
        orientation = 1
        # PNG's getexif() decodes the whole image when the eXIf chunk was not in the header: only ask the
        # formats that carry EXIF in their header, or a PNG that had it there
        if img.format != "PNG" or "exif" in img.info:
            try:
                value = img.getexif().get(EXIF_ORIENTATION, 1)
                orientation = int(value) if isinstance(value, int) and 1 <= value <= 8 else 1
            except Exception:  # a broken EXIF block is not a broken image
                orientation = 1
        size = (stored[1], stored[0]) if orientation in _SWAPPING_ORIENTATIONS else stored
        alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
        return ImageHeader(size, stored, img.format or "", img.mode, orientation, alpha)


def image_size(path: Path) -> Size:
    """(width, height) as the image is displayed: EXIF orientations 5-8 swap the stored sides."""
    return read_header(path).size
