"""Aspect-ratio bucketing with sd-scripts' semantics: which size each image trains at, and how it gets there.

Without bucketing every image is resized so its shorter side is `resolution` and cropped to a square.
With `enable_bucket` the sizes ("buckets") are the (w, h) pairs from `min_bucket_reso` to `max_bucket_reso`
in `bucket_reso_steps` whose area is at most `resolution`² (sd-scripts' `make_bucket_resolutions`), and an
image goes to the bucket whose aspect ratio is closest to its own; it is resized to cover the bucket and
the overhang is cropped (centred, or at a random place with `random_crop`). With `bucket_no_upscale` no
bucket list is made: an image larger than `resolution`² is scaled down to about that area, a smaller one
keeps its size, and the bucket is that size rounded down to `bucket_reso_steps`.

Pure Python (no torch, no numpy): sizes come from image headers, and the pre-flight check can use it.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from nyx_tui.config.model import DatasetSection

Size = tuple[int, int]  # (width, height), as PIL says sizes


@dataclass(frozen=True)
class Geometry:
    """How one image becomes a training input: its file's size, the size it is resized to (covering the
    target), and the target (bucket) size. All (width, height)."""

    original: Size
    resized: Size
    target: Size

    def slack(self) -> Size:
        """How many pixels of the resized image are cropped away, horizontally and vertically."""
        return self.resized[0] - self.target[0], self.resized[1] - self.target[1]

    def crop(self, rng: random.Random | None) -> Size:
        """The crop's (left, top) in the resized image: centred, or drawn from `rng` (random crop)."""
        dx, dy = self.slack()
        if rng is None:
            return dx // 2, dy // 2
        return rng.randint(0, dx), rng.randint(0, dy)


def bucket_resolutions(resolution: int, min_reso: int, max_reso: int, steps: int) -> list[Size]:
    """The bucket sizes for a `resolution`² area: the square, and every width from `min_reso` to `max_reso`
    in `steps` with the tallest height (a multiple of `steps`, within the same bounds) that keeps the area
    — both orientations. Sorted."""
    max_area = resolution * resolution
    side = int(math.sqrt(max_area) // steps) * steps
    resos = {(side, side)}
    width = min_reso
    while width <= max_reso:
        height = min(max_reso, int((max_area // width) // steps) * steps)
        if height >= min_reso:
            resos.add((width, height))
            resos.add((height, width))
        width += steps
    return sorted(resos)


def _cover(size: Size, target: Size) -> Size:
    """The size of `size` scaled (up or down) so that it covers `target`, rounded like sd-scripts, and never
    a pixel short of the target."""
    w, h = size
    tw, th = target
    scale = th / h if w / h > tw / th else tw / w
    return max(tw, int(w * scale + 0.5)), max(th, int(h * scale + 0.5))


class Bucketer:
    """Assigns each image size its `Geometry` under one dataset's bucketing settings."""

    def __init__(
        self,
        resolution: int,
        *,
        enable: bool = False,
        min_reso: int = 256,
        max_reso: int = 1024,
        steps: int = 64,
        no_upscale: bool = False,
    ) -> None:
        self.resolution, self.enable, self.steps = resolution, enable, steps
        self.no_upscale = enable and no_upscale
        if not enable:
            self.resos = [(resolution, resolution)]
        elif not self.no_upscale:
            self.resos = bucket_resolutions(resolution, min_reso, max_reso, steps)
        else:
            self.resos = []
        self._resos_set = set(self.resos)

    @classmethod
    def from_config(cls, cfg: DatasetSection) -> Bucketer:
        return cls(
            cfg.resolution,
            enable=cfg.enable_bucket,
            min_reso=cfg.min_bucket_reso,
            max_reso=cfg.max_bucket_reso,
            steps=cfg.bucket_reso_steps,
            no_upscale=cfg.bucket_no_upscale,
        )

    def geometry(self, size: Size) -> Geometry:
        w, h = size
        if w < 1 or h < 1:
            raise ValueError(f"an image of {w}x{h} pixels cannot be trained on")
        if self.no_upscale:
            return self._no_upscale(size)
        if size in self._resos_set:
            target = size
        else:
            ratio = w / h
            target = min(self.resos, key=lambda r: abs(r[0] / r[1] - ratio))
        return Geometry(size, _cover(size, target), target)

    def _round(self, x: float) -> int:
        n = int(x + 0.5)
        return n - n % self.steps

    def _no_upscale(self, size: Size) -> Geometry:
        """sd-scripts' `bucket_no_upscale`: shrink to the area if larger, round the bucket down to steps."""
        w, h = size
        ratio = w / h
        max_area = self.resolution * self.resolution
        resized = size
        if w * h > max_area:
            rw = math.sqrt(max_area * ratio)
            rh = max_area / rw
            # round one side to the steps, whichever keeps the aspect ratio better
            bw = self._round(rw) or self.steps
            bh = self._round(rh) or self.steps
            error_w = abs(bw / (self._round(bw / ratio) or self.steps) - ratio)
            error_h = abs(self._round(bh * ratio) / bh - ratio)
            resized = (bw, int(bw / ratio + 0.5)) if error_w < error_h else (int(bh * ratio + 0.5), bh)
        tw, th = (max(self.steps, s - s % self.steps) for s in resized)
        if resized[0] < tw or resized[1] < th:  # smaller than one step: scaled up (sd-scripts would fail)
            resized = _cover(resized, (tw, th))
        return Geometry(size, resized, (tw, th))


def describe(targets: list[Size]) -> str:
    """`448x576: 3, 512x512: 10` — how many items (with repeats) train at each size."""
    counts: dict[Size, int] = {}
    for t in targets:
        counts[t] = counts.get(t, 0) + 1
    return ", ".join(f"{w}x{h}: {n}" for (w, h), n in sorted(counts.items()))
