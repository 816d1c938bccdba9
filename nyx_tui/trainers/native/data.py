"""Training images and captions: folder scan, buckets, augmentation, caption handling, a reproducible order.

Every random choice about an item (crop position, flip, colour jitter, caption dropout and shuffle) comes
from a `random.Random` seeded by the sampler with a number drawn from the run's seeded generator, not from
global state. So the same seed gives the same batches whatever `num_workers` is, and a worker process
needs no seeding of its own.

The folders and their repeats come from `subsets` (kohya `N_name` folders, regularization balancing),
the size each image trains at from `buckets` (sd-scripts' aspect-ratio bucketing). A batch holds images of
one bucket only (`EpochBatches`), so its tensors stack.

What a batch holds (`collate`): `pixels` [B,3,H,W] in [-1, 1] (absent when the latents are cached),
`captions`, `loss_weights` [B] (training.prior_loss_weight for regularization images, else 1),
`masks` [B,1,H/8,W/8] in [0, 1] with training.masked_loss (the alpha channel at latent resolution), the
SDXL size conditioning as lists of (h, w) / (top, left): `original_sizes`, `crop_top_lefts`,
`target_sizes`, and for the latent cache `images` (paths) and `flipped`.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Hashable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from nyx_tui.config.model import DatasetSection
from nyx_tui.trainers.native import subsets
from nyx_tui.trainers.native.buckets import Bucketer, Geometry

IMAGE_EXTENSIONS = subsets.IMAGE_EXTENSIONS
LATENT_FACTOR = 8  # the VAE's downsampling: masks are made at this fraction of the image size

# colour jitter (dataset.color_aug): sd-scripts shifts the hue by up to 8 of OpenCV's 180 steps (±16°)
HUE_SHIFT = 8 / 180
SATURATION_SCALE = 0.1


@dataclass(frozen=True)
class Item:
    image: Path
    caption: str
    subset: str  # the folder's name, as sd-scripts keys ss_tag_frequency
    is_reg: bool = False
    geometry: Geometry | None = None  # set by `scan`; None: a centre square at the dataset's resolution


def read_caption(image: Path, extension: str) -> str:
    """The sidecar caption `<stem><extension>`, stripped; a missing file is an empty caption."""
    path = image.with_name(image.stem + extension)
    try:
        return path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return ""


def split_tags(caption: str) -> list[str]:
    return [t.strip() for t in caption.split(",") if t.strip()]


ORIENTATION = 0x0112  # the EXIF tag; 5–8 turn the picture by 90°, so width and height swap


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) as the picture is seen (EXIF orientation applied), from the header, without decoding
    the pixels. A phone photo is stored sideways with orientation 6: it trains upright."""
    with Image.open(path) as im:
        w, h = im.size
        return (h, w) if im.getexif().get(ORIENTATION, 1) in (5, 6, 7, 8) else (w, h)


@contextmanager
def open_image(path: Path) -> Iterator[Image.Image]:
    """The decoded image, turned as its EXIF orientation says (a copy only when it needs turning)."""
    with Image.open(path) as im:
        im.load()
        if im.getexif().get(ORIENTATION, 1) in (1, None):
            yield im
        else:
            yield ImageOps.exif_transpose(im)


def scan(cfg: DatasetSection) -> list[Item]:
    """All images of all subsets, each repeated `num_repeats` times (an epoch sees every entry once).

    Regularization images are balanced to the training images' count as sd-scripts does
    (`subsets.balance_reg_repeats`). Sorted by path inside a folder so that the item list, and therefore a
    seeded run, is the same on every machine whatever order the filesystem lists files in.
    """
    bucketer = Bucketer.from_config(cfg)
    train: list[Item] = []
    reg: list[tuple[Item, int]] = []
    for subset in subsets.resolve(cfg):
        folder = subset.image_dir
        if not folder.is_dir():
            raise FileNotFoundError(f"dataset folder {folder} does not exist ({subset.field})")
        images = subsets.list_images(folder)
        if not images:
            raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) in {folder} ({subset.field})")
        for image in images:
            caption = read_caption(image, subset.caption_extension) or (subset.class_tokens or "")
            item = Item(image, caption, folder.name, subset.is_reg, bucketer.geometry(image_size(image)))
            if subset.is_reg:
                reg.append((item, subset.num_repeats))
            else:
                train.extend([item] * subset.num_repeats)
    if reg and not train:
        raise FileNotFoundError("the dataset has only regularization images (is_reg); add the training images")
    repeats = subsets.balance_reg_repeats(len(train), [r for _, r in reg])
    return train + [item for (item, _), n in zip(reg, repeats, strict=True) for _ in range(n)]


def tag_frequency(items: list[Item]) -> dict[str, dict[str, int]]:
    """{folder: {tag: count}} over the distinct images (repeats not counted), like sd-scripts' metadata."""
    freq: dict[str, Counter[str]] = {}
    for item in dict.fromkeys(items):
        freq.setdefault(item.subset, Counter()).update(split_tags(item.caption))
    return {folder: dict(counts) for folder, counts in freq.items()}


def describe(items: list[Item]) -> str:
    """A log line: images, regularization images, and the bucket sizes in use (with repeats)."""
    distinct = list(dict.fromkeys(items))
    n_reg = sum(1 for i in distinct if i.is_reg)
    reg_note = f", {n_reg} of them regularization ({sum(1 for i in items if i.is_reg)} with repeats)" if n_reg else ""
    counts = Counter(i.geometry.target for i in items if i.geometry is not None)
    sizes = ", ".join(f"{w}x{h}: {n}" for (w, h), n in sorted(counts.items()))
    return f"{len(distinct)} images, {len(items)} with repeats{reg_note}; sizes {sizes}"


# ------------------------------------------------------------------------------------------ captions


def shuffle_caption(caption: str, keep_tokens: int, rng: random.Random) -> str:
    """Shuffle comma-separated tags, the first `keep_tokens` staying in place (the trigger word)."""
    tags = split_tags(caption)
    head, tail = tags[:keep_tokens], tags[keep_tokens:]
    rng.shuffle(tail)
    return ", ".join(head + tail)


def process_caption(caption: str, cfg: DatasetSection, rng: random.Random, epoch: int | None) -> str:
    """The caption an item trains with this time, in sd-scripts' order: whole-caption dropout (by chance,
    or every N-th epoch), then tag dropout and shuffling of the tags after the first `keep_tokens`.
    `epoch` is 1-based; None (validation) never drops by epoch."""
    if cfg.caption_dropout_rate > 0 and rng.random() < cfg.caption_dropout_rate:
        return ""
    every = cfg.caption_dropout_every_n_epochs
    if every > 0 and epoch is not None and epoch % every == 0:
        return ""
    if not (cfg.shuffle_caption or cfg.caption_tag_dropout_rate > 0):
        return caption
    tags = split_tags(caption)
    head, tail = tags[: cfg.keep_tokens], tags[cfg.keep_tokens :]
    if cfg.caption_tag_dropout_rate > 0:
        tail = [t for t in tail if rng.random() >= cfg.caption_tag_dropout_rate]
    if cfg.shuffle_caption:
        rng.shuffle(tail)
    return ", ".join(head + tail)


# -------------------------------------------------------------------------------------------- images


def square_geometry(size: tuple[int, int], resolution: int) -> Geometry:
    return Bucketer(resolution).geometry(size)


def fit(img: Image.Image, geo: Geometry, crop: tuple[int, int], flip: bool) -> Image.Image:
    """Resize to cover the target, crop it at `crop` (left, top), mirror if `flip`."""
    if img.size != geo.resized:
        img = img.resize(geo.resized, Image.Resampling.BICUBIC)
    left, top = crop
    img = img.crop((left, top, left + geo.target[0], top + geo.target[1]))
    return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else img


def square_crop(img: Image.Image, size: int, rng: random.Random, random_crop: bool) -> Image.Image:
    """Resize the shorter side to `size`, then crop a `size` square (centred, or at a random place)."""
    geo = square_geometry(img.size, size)
    return fit(img, geo, geo.crop(rng if random_crop else None), False)


def color_jitter(img: Image.Image, rng: random.Random) -> Image.Image:
    """A small hue rotation and saturation change (dataset.color_aug), drawn from `rng`."""
    hue = round(rng.uniform(-HUE_SHIFT, HUE_SHIFT) * 256)
    saturation = rng.uniform(1 - SATURATION_SCALE, 1 + SATURATION_SCALE)
    hsv = np.asarray(img.convert("HSV"), dtype=np.float32).copy()
    hsv[..., 0] = (hsv[..., 0] + hue) % 256
    hsv[..., 1] = np.clip(hsv[..., 1] * saturation, 0, 255)
    return Image.fromarray(hsv.round().astype(np.uint8), "HSV").convert("RGB")


def to_pixels(img: Image.Image) -> torch.Tensor:
    """[3, H, W] float in [-1, 1]."""
    return torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32).copy()).permute(2, 0, 1) / 127.5 - 1.0


def has_alpha(img: Image.Image) -> bool:
    return img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (img.mode == "P" and "transparency" in img.info)


def alpha_mask(img: Image.Image, geo: Geometry, crop: tuple[int, int], flip: bool) -> torch.Tensor:
    """The alpha channel fitted like the pixels and averaged down to latent resolution: [1, h/8, w/8] in
    [0, 1]. An image without alpha gives ones (it counts fully)."""
    w, h = geo.target
    if not has_alpha(img):
        return torch.ones(1, h // LATENT_FACTOR, w // LATENT_FACTOR)
    alpha = fit(img.convert("RGBA").getchannel("A"), geo, crop, flip)
    mask = torch.from_numpy(np.asarray(alpha, dtype=np.float32).copy())[None, None] / 255.0
    return F.avg_pool2d(mask, LATENT_FACTOR)[0]


def load_pixels(item: Item, crop: tuple[int, int], flip: bool, resolution: int) -> torch.Tensor:
    """The item's image as the training input (no colour jitter): the latent cache encodes these."""
    geo = item.geometry or square_geometry(image_size(item.image), resolution)
    with open_image(item.image) as im:
        return to_pixels(fit(im.convert("RGB"), geo, crop, flip))


class ImageCaptionDataset(torch.utils.data.Dataset[dict[str, Any]]):
    """Items are looked up by `(index, item_seed)` or `(index, item_seed, epoch)` keys from a batch sampler.

    `pixels=False` (the latents are cached) skips decoding the image unless a mask is needed.
    """

    def __init__(
        self,
        items: list[Item],
        cfg: DatasetSection,
        *,
        prior_loss_weight: float = 1.0,
        masks: bool = False,
        pixels: bool = True,
    ) -> None:
        self.items = items
        self.cfg = cfg
        self.prior_loss_weight = prior_loss_weight
        self.masks, self.pixels = masks, pixels

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: tuple[int, ...]) -> dict[str, Any]:
        index, item_seed = key[0], key[1]
        epoch = key[2] if len(key) > 2 else None
        item = self.items[index]
        cfg = self.cfg
        rng = random.Random(item_seed)
        geo = item.geometry or square_geometry(image_size(item.image), cfg.resolution)
        crop = geo.crop(rng if cfg.random_crop else None)
        flip = cfg.flip_aug and rng.random() < 0.5
        out: dict[str, Any] = {}
        if self.pixels or self.masks:
            with open_image(item.image) as im:
                if self.pixels:
                    img = fit(im.convert("RGB"), geo, crop, flip)
                    if cfg.color_aug:
                        img = color_jitter(img, rng)
                    out["pixels"] = to_pixels(img)
                if self.masks:
                    out["mask"] = alpha_mask(im, geo, crop, flip)
        left, top = crop
        if flip:  # the crop as seen in the mirrored image
            left = geo.resized[0] - geo.target[0] - left
        out.update(
            caption=process_caption(item.caption, cfg, rng, epoch),
            loss_weight=self.prior_loss_weight if item.is_reg else 1.0,
            original_size=(geo.original[1], geo.original[0]),
            crop_top_left=(top, left),
            target_size=(geo.target[1], geo.target[0]),
            image=str(item.image),
            flipped=flip,
        )
        return out


def collate(batch: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "captions": [b["caption"] for b in batch],
        "loss_weights": torch.tensor([b["loss_weight"] for b in batch], dtype=torch.float32),
        "original_sizes": [b["original_size"] for b in batch],
        "crop_top_lefts": [b["crop_top_left"] for b in batch],
        "target_sizes": [b["target_size"] for b in batch],
        "images": [b["image"] for b in batch],
        "flipped": [b["flipped"] for b in batch],
    }
    if "pixels" in batch[0]:
        out["pixels"] = torch.stack([b["pixels"] for b in batch])
    if "mask" in batch[0]:
        out["masks"] = torch.stack([b["mask"] for b in batch])
    return out


# --------------------------------------------------------------------------------------------- order


def bucket_keys(items: list[Item]) -> list[Hashable]:
    """Each item's bucket (its target size): what `EpochBatches` groups by."""
    return [i.geometry.target if i.geometry is not None else None for i in items]


class EpochBatches:
    """Batches of `(index, item_seed, epoch)` for one pass over the data, shuffled by a seeded generator.

    `groups` is the number of items (one bucket) or each item's bucket key (`bucket_keys`). Per pass, as
    sd-scripts does: each bucket's items are shuffled and cut into batches (a bucket's last batch may be
    short), then the batches of all buckets are shuffled together. All random draws of a pass happen
    when it starts (a resumed run replays them by restoring the generator and skipping batches). With
    several processes each rank takes every `world`-th batch; all ranks get the same number of batches
    (the remainder of a pass is dropped, a different one each pass). `epoch` is the number of the pass
    last begun (the first is `first_epoch`); the dataset uses it for caption_dropout_every_n_epochs.
    """

    def __init__(
        self,
        groups: int | Sequence[Hashable],
        batch_size: int,
        generator: torch.Generator,
        rank: int = 0,
        world: int = 1,
        first_epoch: int = 1,
    ) -> None:
        keys: Sequence[Hashable] = [None] * groups if isinstance(groups, int) else groups
        self.buckets: dict[Hashable, list[int]] = {}
        for index, key in enumerate(keys):
            self.buckets.setdefault(key, []).append(index)
        self.n, self.batch_size, self.generator = len(keys), batch_size, generator
        self.rank, self.world = rank, world
        self.epoch = first_epoch - 1

    def total_batches(self) -> int:
        return sum(math.ceil(len(m) / self.batch_size) for m in self.buckets.values())

    def batches_per_epoch(self) -> int:
        return max(1, self.total_batches() // self.world)

    def steps_per_epoch(self, accumulation: int) -> int:
        return math.ceil(self.batches_per_epoch() / accumulation)

    def __len__(self) -> int:
        return self.batches_per_epoch()

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        self.epoch += 1
        epoch, size = self.epoch, self.batch_size
        batches: list[list[int]] = []
        for members in self.buckets.values():
            order = torch.randperm(len(members), generator=self.generator).tolist()
            shuffled = [members[i] for i in order]
            batches += [shuffled[i : i + size] for i in range(0, len(shuffled), size)]
        order = torch.randperm(len(batches), generator=self.generator).tolist()
        seeds = torch.randint(0, 2**31 - 1, (self.n,), generator=self.generator).tolist()
        for k in range(self.batches_per_epoch()):
            batch = batches[order[(k * self.world + self.rank) % len(batches)]]
            yield [(i, seeds[i], epoch) for i in batch]


def steps_per_epoch(n_items: int, batch_size: int, accumulation: int, world: int = 1) -> int:
    """Optimizer steps a pass over `n_items` in one bucket takes (see `EpochBatches.steps_per_epoch`)."""
    batches = max(1, math.ceil(n_items / batch_size) // world)
    return max(1, math.ceil(batches / accumulation))
