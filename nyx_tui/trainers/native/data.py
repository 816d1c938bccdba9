"""Training images and captions: folder scan, caption handling, square crops, and a reproducible order.

Every random choice about an item (crop position, flip, caption shuffle) comes from a `random.Random`
seeded by the sampler with a number drawn from the run's seeded generator, not from global state. So the
same seed gives the same batches whatever `num_workers` is, and a worker process needs no seeding of its
own.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from nyx_tui.config.model import DatasetSection

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp"})


@dataclass(frozen=True)
class Item:
    image: Path
    caption: str
    subset: str  # the folder's name, as sd-scripts keys ss_tag_frequency


def read_caption(image: Path, extension: str) -> str:
    """The sidecar caption `<stem><extension>`, stripped; a missing file is an empty caption."""
    path = image.with_name(image.stem + extension)
    try:
        return path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return ""


def split_tags(caption: str) -> list[str]:
    return [t.strip() for t in caption.split(",") if t.strip()]


def scan(cfg: DatasetSection) -> list[Item]:
    """All images of all subsets, each repeated `num_repeats` times (an epoch sees every entry once).

    Sorted by path inside a folder so that the item list, and therefore a seeded run, is the same on
    every machine whatever order the filesystem lists files in.
    """
    items: list[Item] = []
    for subset in cfg.subsets:
        folder = Path(subset.image_dir)
        if not folder.is_dir():
            raise FileNotFoundError(f"dataset folder {folder} does not exist (dataset.subsets.image_dir)")
        extension = subset.caption_extension or cfg.caption_extension
        images = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        if not images:
            raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) in {folder}")
        for image in images:
            item = Item(image, read_caption(image, extension), folder.name)
            items.extend([item] * subset.num_repeats)
    return items


def tag_frequency(items: list[Item]) -> dict[str, dict[str, int]]:
    """{folder: {tag: count}} over the distinct images (repeats not counted), like sd-scripts' metadata."""
    freq: dict[str, Counter[str]] = {}
    for item in dict.fromkeys(items):
        freq.setdefault(item.subset, Counter()).update(split_tags(item.caption))
    return {folder: dict(counts) for folder, counts in freq.items()}


def shuffle_caption(caption: str, keep_tokens: int, rng: random.Random) -> str:
    """Shuffle comma-separated tags, the first `keep_tokens` staying in place (the trigger word)."""
    tags = split_tags(caption)
    head, tail = tags[:keep_tokens], tags[keep_tokens:]
    rng.shuffle(tail)
    return ", ".join(head + tail)


def square_crop(img: Image.Image, size: int, rng: random.Random, random_crop: bool) -> Image.Image:
    """Resize the shorter side to `size`, then crop a `size` square (centred, or at a random place)."""
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), Image.Resampling.BICUBIC)
    if random_crop:
        left, top = rng.randint(0, nw - size), rng.randint(0, nh - size)
    else:
        left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


class ImageCaptionDataset(torch.utils.data.Dataset[dict[str, Any]]):
    """Items are looked up by `(index, item_seed)` pairs from `EpochBatches`."""

    def __init__(self, items: list[Item], cfg: DatasetSection) -> None:
        self.items = items
        self.cfg = cfg

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        index, item_seed = key
        item = self.items[index]
        rng = random.Random(item_seed)
        with Image.open(item.image) as im:
            img = square_crop(im.convert("RGB"), self.cfg.resolution, rng, self.cfg.random_crop)
        if self.cfg.flip_aug and rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        caption = item.caption
        if self.cfg.shuffle_caption:
            caption = shuffle_caption(caption, self.cfg.keep_tokens, rng)
        pixels = torch.from_numpy(np.asarray(img, dtype=np.float32).copy()).permute(2, 0, 1) / 127.5 - 1.0
        return {"pixels": pixels, "caption": caption}


def collate(batch: list[dict[str, Any]]) -> dict[str, Any]:
    return {"pixels": torch.stack([b["pixels"] for b in batch]), "captions": [b["caption"] for b in batch]}


class EpochBatches:
    """Batches of `(index, item_seed)` for one pass over the data, shuffled by a seeded generator.

    A short last batch is dropped (as sd-scripts' bucket batches are filled), except when the data has
    fewer items than a batch. With several processes each rank takes every `world`-th batch.
    """

    def __init__(self, n: int, batch_size: int, generator: torch.Generator, rank: int = 0, world: int = 1) -> None:
        self.n, self.batch_size, self.generator = n, batch_size, generator
        self.rank, self.world = rank, world

    def batches_per_epoch(self) -> int:
        full = self.n // self.batch_size or 1
        return max(1, full // self.world)

    def __len__(self) -> int:
        return self.batches_per_epoch()

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        order = torch.randperm(self.n, generator=self.generator).tolist()
        seeds = torch.randint(0, 2**31 - 1, (self.n,), generator=self.generator).tolist()
        total = self.batches_per_epoch() * self.world
        for b in range(total):
            if b % self.world != self.rank:
                continue
            idx = order[b * self.batch_size : (b + 1) * self.batch_size] or order[: self.batch_size]
            yield [(i, seeds[i]) for i in idx]


def steps_per_epoch(n_items: int, batch_size: int, accumulation: int, world: int = 1) -> int:
    batches = max(1, (n_items // batch_size or 1) // world)
    return max(1, math.ceil(batches / accumulation))
