"""Image quality filters: too small, too elongated, too blurry — each image gets its scores and the reasons
it fails, so a user sees why before anything moves.

- size: the shortest side as displayed (EXIF orientation honoured), from the header only. An image smaller
  than the training resolution is upscaled by the trainer and teaches softness.
- aspect: longer side / shorter side. Past ~3 the bucket it lands in crops most of it away (or, with no
  buckets, the centre square keeps a sliver).
- blur: the variance of a 4-neighbour Laplacian over the grayscale image scaled to `BLUR_SIDE` pixels on its
  longer side (numpy only). Scaling first makes the score independent of resolution (a sharp 4000 px photo
  and a sharp 600 px one score alike) and keeps the decode cheap (JPEGs decode at reduced size). Sharp
  photos and line art score in the hundreds to thousands; a visibly soft image is well under 50. The score is
  cached with the perceptual hashes (`hashcache`), so re-running with another threshold reads nothing.

Failures can be listed or moved to the same quarantine as duplicates (`dedupe.quarantine`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nyx_tui.datasets.dedupe import default_workers, open_small_gray, rel_of
from nyx_tui.datasets.hashcache import Entry, HashCache, Stat
from nyx_tui.datasets.images import iter_images, read_header

Progress = Callable[[int, int], None]

BLUR_SIDE = 512
DEFAULT_MIN_SIDE = 512
DEFAULT_MAX_ASPECT = 3.0
DEFAULT_MIN_BLUR = 50.0


def blur_score(path: Path) -> float:
    """Variance of the Laplacian of the image's grayscale at `BLUR_SIDE` px on its longer side (no upscaling)."""
    import numpy as np
    from PIL import Image

    gray, _size = open_small_gray(path, BLUR_SIDE)
    if max(gray.size) > BLUR_SIDE:
        gray.thumbnail((BLUR_SIDE, BLUR_SIDE), Image.Resampling.BILINEAR)
    return laplacian_variance(np.asarray(gray, dtype=np.float32))


def laplacian_variance(a: Any) -> float:
    """Variance of the 4-neighbour Laplacian (interior pixels) of a 2-D float array; 0 for a tiny one."""
    if a.shape[0] < 3 or a.shape[1] < 3:
        return 0.0
    lap = a[:-2, 1:-1] + a[2:, 1:-1] + a[1:-1, :-2] + a[1:-1, 2:] - 4 * a[1:-1, 1:-1]
    return float(lap.var())


@dataclass
class QualityItem:
    """One image's scores and the reasons it fails (empty when it passes). `error`: could not be read."""

    path: Path
    rel: str
    width: int | None = None
    height: int | None = None
    blur: float | None = None
    reasons: list[str] = field(default_factory=list)
    error: str | None = None
    decoded: bool = False  # the blur score was computed this run (False: from the cache, or not asked)

    @property
    def min_side(self) -> int | None:
        return None if self.width is None or self.height is None else min(self.width, self.height)

    @property
    def aspect(self) -> float | None:
        if not self.width or not self.height:
            return None
        return max(self.width, self.height) / min(self.width, self.height)

    @property
    def failed(self) -> bool:
        return bool(self.reasons)

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.rel,
            "width": self.width,
            "height": self.height,
            "min_side": self.min_side,
            "aspect": None if self.aspect is None else round(self.aspect, 3),
            "blur": None if self.blur is None else round(self.blur, 1),
            "reasons": self.reasons,
            "error": self.error,
        }


@dataclass
class QualityResult:
    root: Path
    min_side: int | None
    max_aspect: float | None
    min_blur: float | None
    items: list[QualityItem]
    decoded: int
    cached: int
    seconds: float

    @property
    def failures(self) -> list[QualityItem]:
        return [i for i in self.items if i.failed]

    def to_json(self) -> dict[str, Any]:
        return {
            "folder": str(self.root),
            "limits": {"min_side": self.min_side, "max_aspect": self.max_aspect, "min_blur": self.min_blur},
            "images": len(self.items),
            "failed": len(self.failures),
            "decoded": self.decoded,
            "cached": self.cached,
            "seconds": round(self.seconds, 3),
            "items": [i.to_json() for i in self.failures],
        }


def judge(item: QualityItem, min_side: int | None, max_aspect: float | None, min_blur: float | None) -> None:
    """Fill `item.reasons` from its scores and the limits (a None limit is not checked)."""
    item.reasons = []
    if item.error:
        item.reasons.append(f"unreadable: {item.error}")
        return
    side, aspect = item.min_side, item.aspect
    if min_side is not None and side is not None and side < min_side:
        item.reasons.append(f"too small: shortest side {side} px < {min_side}")
    if max_aspect is not None and aspect is not None and aspect > max_aspect:
        item.reasons.append(f"extreme aspect ratio: {aspect:.2f}:1 > {max_aspect:g}:1")
    if min_blur is not None and item.blur is not None and item.blur < min_blur:
        item.reasons.append(f"blurry: sharpness {item.blur:.1f} < {min_blur:g}")


def check_quality(
    root: Path,
    *,
    min_side: int | None = DEFAULT_MIN_SIDE,
    max_aspect: float | None = DEFAULT_MAX_ASPECT,
    min_blur: float | None = DEFAULT_MIN_BLUR,
    recursive: bool = True,
    cache: HashCache | None = None,
    cache_path: Path | None = None,
    workers: int | None = None,
    progress: Progress | None = None,
) -> QualityResult:
    """Score every image under `root`. Sizes come from headers; the blur score (only when `min_blur` is set)
    decodes the image unless the cache has it. Raises FileNotFoundError / NotADirectoryError / ValueError."""
    if min_side is not None and min_side < 1:
        raise ValueError(f"--min-side {min_side} must be at least 1 px")
    if max_aspect is not None and max_aspect < 1:
        raise ValueError(f"--max-aspect {max_aspect} must be at least 1 (1 = square only)")
    if min_blur is not None and min_blur < 0:
        raise ValueError(f"--min-blur {min_blur} must be 0 or more")
    started = time.monotonic()
    root = Path(root).expanduser().absolute()
    if not root.exists():
        raise FileNotFoundError(f"{root} does not exist")
    if not root.is_dir():
        raise NotADirectoryError(f"{root} is not a folder")
    own = cache is None and min_blur is not None
    db = cache if cache is not None else (HashCache(cache_path) if min_blur is not None else None)
    paths = list(iter_images(root, recursive=recursive))
    items = [QualityItem(p, rel_of(p, root)) for p in paths]
    known = db.load_under(root) if db is not None else None
    pending: list[tuple[Stat, Entry]] = []  # cache writes, stored in batches (a commit per image is slow)
    lock = threading.Lock()

    def one(item: QualityItem) -> None:
        try:
            header = read_header(item.path)
            item.width, item.height = header.size
            if known is None:
                return
            stat = Stat.of(item.path)
            entry = known.get(stat)
            if entry is not None and entry.blur is not None:
                item.blur = entry.blur
                return
            item.blur = blur_score(item.path)
            item.decoded = True
            with lock:
                pending.append((stat, (entry or Entry()).merged(Entry(blur=item.blur))))
        except Exception as e:  # unreadable: reported on the item
            item.error = f"{type(e).__name__}: {e}"

    try:
        if progress:
            progress(0, len(items))
        with ThreadPoolExecutor(max_workers=workers or default_workers()) as pool:
            for done, _ in enumerate(pool.map(one, items), 1):
                if progress:
                    progress(done, len(items))
                if db is not None and (len(pending) >= 256 or done == len(items)):
                    with lock:
                        batch, pending[:] = list(pending), []
                    db.put_many(batch)
    finally:
        if own and db is not None:
            db.close()
    for item in items:
        judge(item, min_side, max_aspect, min_blur)
    decoded = sum(i.decoded for i in items)
    cached = sum(1 for i in items if i.blur is not None and not i.decoded)
    return QualityResult(root, min_side, max_aspect, min_blur, items, decoded, cached, time.monotonic() - started)


__all__ = [
    "DEFAULT_MAX_ASPECT",
    "DEFAULT_MIN_BLUR",
    "DEFAULT_MIN_SIDE",
    "QualityItem",
    "QualityResult",
    "blur_score",
    "check_quality",
    "judge",
    "laplacian_variance",
]
