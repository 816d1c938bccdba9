"""Dataset tools at 10,000 images: a header scan, duplicate finding cold (every image hashed) and warm (every
hash from the cache), the all-pairs comparison alone, and a blur pass — against a baseline of a naive
hasher (`imagehash.phash(Image.open(p))`: full decode, one thread) timed on a sample and scaled up.

    .venv/bin/python bench/dataset_scale.py [--images 10000] [--size 256] [--dir FOLDER] [--workers N]
                                            [--baseline-sample 500]

Images: JPEGs (quality 90) of smooth random colour fields with noise, `--size` px on the longer side and
mixed aspect ratios, written once into `--dir` (default: a folder in the temp dir, reused when it already
holds the images); one in a hundred is a resized copy of the one before, so there is something to find.
The scan row uses `nyx_tui.datasets.scan.scan` when that module exists, else a loop of PIL header reads
(said in the output). The cache is a fresh file per run, in a temporary folder. Nothing here is timed in
tests.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from PIL import Image

T = TypeVar("T")


def generate(folder: Path, n: int, size: int) -> None:
    """`n` JPEGs `img_00000.jpg`…; skipped when the folder already holds them all."""
    folder.mkdir(parents=True, exist_ok=True)
    existing = {p.name for p in folder.glob("img_*.jpg")}
    if len(existing) >= n and f"img_{n - 1:05d}.jpg" in existing:
        return
    rng = np.random.default_rng(0)
    t = time.perf_counter()
    for i in range(n):
        name = folder / f"img_{i:05d}.jpg"
        if name.name in existing:
            continue
        if i % 100 == 99:  # a resized copy of the previous picture
            with Image.open(folder / f"img_{i - 1:05d}.jpg") as prev:
                small = prev.resize((prev.width * 3 // 4, prev.height * 3 // 4), Image.Resampling.BILINEAR)
            small.save(name, quality=85)
            continue
        aspect = float(rng.choice([1.0, 0.75, 1.333, 0.5625, 1.777]))
        w, h = (size, max(8, int(size / aspect))) if aspect >= 1 else (max(8, int(size * aspect)), size)
        coarse = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
        img = Image.fromarray(coarse, "RGB").resize((w, h), Image.Resampling.BICUBIC)
        noise = rng.integers(-12, 13, (h, w, 3))
        arr = np.clip(np.asarray(img, dtype=np.int16) + noise, 0, 255).astype(np.uint8)
        Image.fromarray(arr, "RGB").save(name, quality=90)
        if i % 1000 == 999:
            print(f"  generated {i + 1}/{n} ({time.perf_counter() - t:.0f} s)", flush=True)


def timed(fn: Callable[..., T], *args: Any, **kw: Any) -> tuple[T, float]:
    """fn's answer and the seconds it took."""
    t = time.perf_counter()
    out = fn(*args, **kw)
    dt = time.perf_counter() - t
    return out, dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=10_000)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--dir", type=Path, default=None)
    ap.add_argument("--workers", type=int, default=None, help="hashing threads (default: cores, at most 8)")
    ap.add_argument("--baseline-sample", type=int, default=500)
    args = ap.parse_args()

    from nyx_tui.datasets.dedupe import default_workers, find_duplicates, group_images
    from nyx_tui.datasets.images import iter_images, read_header
    from nyx_tui.datasets.quality import check_quality

    folder = args.dir or Path(tempfile.gettempdir()) / f"nyx-bench-dataset-{args.images}-{args.size}"
    print(f"dataset: {folder} ({args.images} JPEGs, {args.size} px); {os.cpu_count()} cores, "
          f"{args.workers or default_workers()} hashing threads")  # fmt: skip
    _, gen_s = timed(generate, folder, args.images, args.size)
    print(f"generate (or reuse): {gen_s:.1f} s")
    paths = list(iter_images(folder))
    assert len(paths) >= args.images, f"{folder} holds {len(paths)} images"

    rows: list[tuple[str, float]] = []
    try:
        from nyx_tui.datasets.scan import scan  # another module's: used when present

        ds, dt = timed(scan, folder)
        rows.append((f"scan (nyx_tui.datasets.scan, {len(ds.images)} images, headers + captions)", dt))
    except ImportError:
        _, dt = timed(lambda: [read_header(p) for p in paths])
        rows.append(("header reads with PIL (datasets.scan not present)", dt))

    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "hashes.sqlite"
        cold, dt_cold = timed(find_duplicates, folder, cache_path=cache, workers=args.workers)
        rows.append((f"dedupe cold ({cold.hashed} hashed, {cold.cached} cached)", dt_cold))
        warm, dt_warm = timed(find_duplicates, folder, cache_path=cache, workers=args.workers)
        rows.append((f"dedupe warm ({warm.hashed} hashed, {warm.cached} cached)", dt_warm))
        _, dt_pairs = timed(group_images, cold.images, 6, False)
        rows.append((f"  of which all-pairs + grouping ({len(cold.images)}², numpy)", dt_pairs))
        exact, dt_exact = timed(find_duplicates, folder, exact_only=True, cache_path=Path(tmp) / "x.sqlite")
        rows.append((f"dedupe --exact-only cold ({exact.hashed} sha256)", dt_exact))
        _, dt_blur = timed(check_quality, folder, cache_path=cache, workers=args.workers)
        rows.append(("filter cold (headers + blur decode at 512 px)", dt_blur))
        _, dt_blur_warm = timed(check_quality, folder, cache_path=cache, workers=args.workers)
        rows.append(("filter warm (blur from cache)", dt_blur_warm))

    import imagehash

    sample = paths[: args.baseline_sample]
    t = time.perf_counter()
    for p in sample:
        with Image.open(p) as img:
            imagehash.phash(img)
            imagehash.phash(img.transpose(Image.Transpose.FLIP_LEFT_RIGHT))
    naive = (time.perf_counter() - t) / len(sample) * len(paths)
    rows.append((f"baseline: naive phash+mirror, full decode, 1 thread (from {len(sample)}, scaled)", naive))

    width = max(len(r[0]) for r in rows)
    print()
    for label, seconds in rows:
        print(f"{label:<{width}}  {seconds:8.2f} s  {len(paths) / seconds:9.0f} img/s")
    print()
    print(f"groups found: {len(cold.groups)} ({sum(len(g.members) for g in cold.groups)} duplicates; "
          f"{args.images // 100} planted)")  # fmt: skip
    print(f"cold dedupe vs naive baseline: {naive / dt_cold:.1f}x faster; warm vs cold: {dt_cold / dt_warm:.0f}x")


if __name__ == "__main__":
    main()
