"""Preprocess a dataset into a new folder: EXIF orientation applied, alpha flattened, resized to a maximum
side, cropped to a training bucket, converted to one format, optionally colour-corrected; captions copied.

Originals are never modified: the output folder must be outside the input, every file is written to a
temporary name and renamed into place, and the input's relative paths (kohya `N_name` folders included)
are kept so the output trains the same way.

Order of operations, and why:
1. `ImageOps.exif_transpose` — a phone photo stored sideways trains sideways otherwise (trainers read the
   pixels, not the EXIF tag), and the tag is dropped from the output so nothing rotates it twice.
2. Flatten alpha onto a colour (white by default, as the WD14 taggers and most trainers assume): a
   transparent background otherwise becomes whatever RGB the transparent pixels hold, often black.
3. Resize so the longer side is at most `max_side` (Lanczos). Never upscaled: enlarging adds no detail.
4. Crop to a bucket: the bucket list is the trainer's own (`trainers.native.buckets`, sd-scripts semantics,
   pass the same resolution / step / min / max as the training config); the image is scaled to cover the
   bucket closest to its aspect and centre-cropped, so the trainer later crops nothing. An image too small
   for its bucket is not enlarged: it is centre-cropped to that bucket's aspect ratio at the largest size
   that fits, sides rounded down to the step (the trainer then scales it up with no further crop).
5. Auto-contrast (1% clipped at each end, per channel) and gray-world white balance (each channel's
   mean scaled to the mean of the three, gains clamped to 0.5..2), both off by default: they change the
   colours the LoRA learns, which is only wanted for badly exposed or tinted sources.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nyx_tui.datasets.dedupe import default_workers, rel_of
from nyx_tui.datasets.images import iter_images

if TYPE_CHECKING:
    from PIL import Image as PILImage

Progress = Callable[[int, int], None]

FORMATS = {"png": ".png", "jpg": ".jpg", "webp": ".webp"}
_KEEP_EXTS = {".png": "png", ".jpg": "jpg", ".jpeg": "jpg", ".jfif": "jpg", ".webp": "webp"}
CAPTION_EXTS = (".txt", ".caption")


@dataclass(frozen=True)
class PrepOptions:
    """What to do to every image. `fmt` None keeps PNG/JPEG/WebP as they are and writes other formats as
    PNG. `bucket_resolution` None skips the bucket crop. `flatten` is a Pillow colour name or `#rrggbb`."""

    max_side: int | None = None
    bucket_resolution: int | None = None
    bucket_step: int = 64
    bucket_min: int | None = None  # None: the trainer's default 256, lowered to the resolution if above it
    bucket_max: int | None = None  # None: the trainer's default 1024, raised to the resolution if below it
    flatten: str = "white"
    fmt: str | None = None
    quality: int = 95
    autocontrast: bool = False
    white_balance: bool = False
    caption_exts: tuple[str, ...] = CAPTION_EXTS

    @property
    def bucket_bounds(self) -> tuple[int, int]:
        """(smallest, largest) bucket side, as the training config would have them."""
        res = self.bucket_resolution or 1024
        low = self.bucket_min if self.bucket_min is not None else min(256, res)
        high = self.bucket_max if self.bucket_max is not None else max(1024, res)
        return low, high

    def validate(self) -> None:
        """Raise ValueError naming the option and the fix."""
        from PIL import ImageColor

        if self.max_side is not None and self.max_side < 8:
            raise ValueError(f"--max-side {self.max_side} is too small: use e.g. 1024")
        if self.bucket_resolution is not None:
            if self.bucket_step < 8:
                raise ValueError(f"--bucket-step {self.bucket_step} is too small: use 64 (or 32)")
            if self.bucket_resolution < self.bucket_step:
                raise ValueError(f"--bucket-resolution {self.bucket_resolution} is below the step: use e.g. 1024")
            low, high = self.bucket_bounds
            if not low <= self.bucket_resolution <= high:
                raise ValueError(
                    f"--bucket-resolution {self.bucket_resolution} must lie between --bucket-min {low} and "
                    f"--bucket-max {high}: pass the min/max bucket sides of your training config"
                )
        if self.fmt is not None and self.fmt not in FORMATS:
            raise ValueError(f"--format {self.fmt!r} is not one of {', '.join(FORMATS)}")
        if not 1 <= self.quality <= 100:
            raise ValueError(f"--quality {self.quality} must be 1..100 (95 is near lossless)")
        try:
            ImageColor.getrgb(self.flatten)
        except ValueError:
            raise ValueError(f"--flatten-alpha {self.flatten!r} is not a colour: use white, black or #rrggbb") from None


@dataclass
class PrepItem:
    source: str  # relative to the input
    output: str | None = None  # relative to the output folder
    original: tuple[int, int] | None = None
    size: tuple[int, int] | None = None
    captions: list[str] = field(default_factory=list)
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "output": self.output,
            "original": list(self.original) if self.original else None,
            "size": list(self.size) if self.size else None,
            "captions": self.captions,
            "error": self.error,
        }


@dataclass
class PrepResult:
    root: Path
    out: Path
    items: list[PrepItem]
    seconds: float

    @property
    def failed(self) -> list[PrepItem]:
        return [i for i in self.items if i.error]

    def to_json(self) -> dict[str, Any]:
        return {
            "folder": str(self.root),
            "out": str(self.out),
            "images": len(self.items),
            "written": len(self.items) - len(self.failed),
            "failed": len(self.failed),
            "seconds": round(self.seconds, 3),
            "items": [i.to_json() for i in self.items],
        }


# ------------------------------------------------------------------------------------------ the operations


def flatten_alpha(img: PILImage.Image, color: str = "white") -> PILImage.Image:
    """RGB: an image with transparency (an alpha channel, or a palette/colour key marked transparent)
    composited over `color`; any other image converted to RGB."""
    from PIL import Image, ImageColor

    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
    if not has_alpha:
        return img.convert("RGB")
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, ImageColor.getrgb(color))
    return Image.alpha_composite(background, rgba).convert("RGB")


def limit_side(img: PILImage.Image, max_side: int) -> PILImage.Image:
    """Scaled down (Lanczos) so the longer side is at most `max_side`; never scaled up."""
    from PIL import Image

    w, h = img.size
    if max(w, h) <= max_side:
        return img
    scale = max_side / max(w, h)
    return img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.LANCZOS)


def bucket_box(size: tuple[int, int], opts: PrepOptions) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
    """(resize to, crop box in the resized image) that turns an image of `size` into its bucket without
    upscaling. The crop size's sides are multiples of the step."""
    from nyx_tui.trainers.native.buckets import Bucketer

    assert opts.bucket_resolution is not None
    low, high = opts.bucket_bounds
    bucketer = Bucketer(opts.bucket_resolution, enable=True, min_reso=low, max_reso=high, steps=opts.bucket_step)
    geo = bucketer.geometry(size)
    w, h = size
    if geo.resized[0] <= w and geo.resized[1] <= h:
        resized, target = geo.resized, geo.target
    else:  # too small for its bucket: crop at the bucket's aspect, largest multiple of the step that fits
        step = opts.bucket_step
        tw, th = geo.target
        scale = min(w / tw, h / th)
        cw = max(step, int(tw * scale) // step * step)
        ch = max(step, int(th * scale) // step * step)
        resized, target = size, (min(cw, w), min(ch, h))
        if target[0] % step or target[1] % step:  # smaller than one step: nothing divisible fits
            raise ValueError(f"{w}x{h} is smaller than one bucket step ({step} px)")
    left, top = (resized[0] - target[0]) // 2, (resized[1] - target[1]) // 2
    return resized, (left, top, left + target[0], top + target[1])


def to_bucket(img: PILImage.Image, opts: PrepOptions) -> PILImage.Image:
    from PIL import Image

    resized, box = bucket_box(img.size, opts)
    if resized != img.size:
        img = img.resize(resized, Image.Resampling.LANCZOS)
    return img.crop(box)


def gray_world(img: PILImage.Image) -> PILImage.Image:
    """Gray-world white balance: each channel scaled so its mean equals the mean of the three."""
    import numpy as np
    from PIL import Image

    a = np.asarray(img.convert("RGB"), dtype=np.float32)
    means = a.reshape(-1, 3).mean(axis=0)
    gains = np.clip(means.mean() / np.maximum(means, 1e-3), 0.5, 2.0)
    return Image.fromarray(np.clip(a * gains + 0.5, 0, 255).astype(np.uint8), "RGB")


def process_image(src: Path, opts: PrepOptions) -> tuple[PILImage.Image, tuple[int, int]]:
    """The processed image (RGB) and the original's displayed size."""
    from PIL import Image, ImageOps

    with Image.open(src) as raw:
        raw.load()
        img = ImageOps.exif_transpose(raw) or raw
        original = img.size
        img = flatten_alpha(img, opts.flatten)
    if opts.max_side is not None:
        img = limit_side(img, opts.max_side)
    if opts.bucket_resolution is not None:
        img = to_bucket(img, opts)
    if opts.autocontrast:
        img = ImageOps.autocontrast(img, cutoff=1)
    if opts.white_balance:
        img = gray_world(img)
    return img, original


def output_format(src: Path, opts: PrepOptions) -> str:
    return opts.fmt or _KEEP_EXTS.get(src.suffix.lower(), "png")


def save_atomic(img: PILImage.Image, dest: Path, fmt: str, quality: int) -> None:
    """Write to a temporary file beside `dest`, then rename: a crash never leaves half an image."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    try:
        if fmt == "jpg":
            img.save(tmp, "JPEG", quality=quality, subsampling=0 if quality >= 90 else 2, optimize=True)
        elif fmt == "webp":
            img.save(tmp, "WEBP", quality=quality, method=4)
        else:
            img.save(tmp, "PNG", compress_level=6)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.relative_to(folder)
        return True
    except ValueError:
        return False


def prepare(
    root: Path,
    out: Path,
    opts: PrepOptions,
    *,
    recursive: bool = True,
    workers: int | None = None,
    progress: Progress | None = None,
) -> PrepResult:
    """Process every image under `root` into `out` (same relative paths, the format's extension) and copy
    caption files along. Existing outputs are replaced. Raises ValueError for bad options or an output
    folder that is the input or inside it, FileNotFoundError / NotADirectoryError for a bad `root`."""
    opts.validate()
    started = time.monotonic()
    root = Path(root).expanduser().resolve()
    out = Path(out).expanduser().resolve()
    if not root.exists():
        raise FileNotFoundError(f"{root} does not exist")
    if not root.is_dir():
        raise NotADirectoryError(f"{root} is not a folder")
    if _inside(out, root):
        raise ValueError(f"--out {out} is inside the input folder: choose a folder outside {root}")
    if _inside(root, out):
        raise ValueError(f"--out {out} contains the input folder: choose a new, separate folder")
    paths = list(iter_images(root, recursive=recursive))
    items = [PrepItem(rel_of(p, root)) for p in paths]
    # two inputs that would write one output (`a.png` and `a.jpg` → `a.png`): the second is not written
    claimed: dict[str, str] = {}
    for p, item in zip(paths, items, strict=True):
        target = Path(item.source).with_suffix(FORMATS[output_format(p, opts)]).as_posix()
        if target.lower() in claimed:
            item.error = f"skipped: {claimed[target.lower()]} is written to {target} too (rename one)"
        else:
            claimed[target.lower()] = item.source
            item.output = target

    def one(pair: tuple[Path, PrepItem]) -> None:
        src, item = pair
        if item.error or item.output is None:
            return
        try:
            img, item.original = process_image(src, opts)
            item.size = img.size
            save_atomic(img, out / item.output, output_format(src, opts), opts.quality)
            for ext in opts.caption_exts:
                cap = src.with_suffix(ext)
                if cap.is_file():
                    dest = out / Path(item.output).with_suffix(ext)
                    shutil.copy2(cap, dest)
                    item.captions.append(Path(item.output).with_suffix(ext).as_posix())
        except Exception as e:  # one broken image does not stop the rest
            item.error = f"{type(e).__name__}: {e}"
            item.size = None

    out.mkdir(parents=True, exist_ok=True)
    if progress:
        progress(0, len(items))
    with ThreadPoolExecutor(max_workers=workers or default_workers()) as pool:
        for done, _ in enumerate(pool.map(one, zip(paths, items, strict=True)), 1):
            if progress:
                progress(done, len(items))
    return PrepResult(root, out, items, time.monotonic() - started)


__all__ = [
    "FORMATS",
    "PrepItem",
    "PrepOptions",
    "PrepResult",
    "bucket_box",
    "flatten_alpha",
    "gray_world",
    "limit_side",
    "prepare",
    "process_image",
]
