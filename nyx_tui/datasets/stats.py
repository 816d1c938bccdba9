"""Numbers about a scanned dataset: counts, captions, the resolution and aspect-ratio histograms, the
buckets a training resolution would make (with the config's bucketing rules, `trainers.native.buckets`)
and how many images land in each, and tag frequencies."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from nyx_tui.datasets.images import Size
from nyx_tui.datasets.layout import trained_folders
from nyx_tui.datasets.scan import Dataset
from nyx_tui.datasets.tags import split_tags, tag_frequencies
from nyx_tui.trainers.native.buckets import Bucketer

# the shorter side's bins: (label, lower bound inclusive)
SHORT_SIDE_BINS: tuple[tuple[str, int], ...] = (
    ("<256", 0),
    ("256-511", 256),
    ("512-767", 512),
    ("768-1023", 768),
    ("1024-1535", 1024),
    ("1536-2047", 1536),
    (">=2048", 2048),
)
# common aspect ratios (width:height); an image counts for the nearest one (in log ratio)
ASPECT_RATIOS: tuple[tuple[str, float], ...] = (
    ("1:3", 1 / 3),
    ("1:2", 1 / 2),
    ("9:16", 9 / 16),
    ("2:3", 2 / 3),
    ("3:4", 3 / 4),
    ("4:5", 4 / 5),
    ("1:1", 1.0),
    ("5:4", 5 / 4),
    ("4:3", 4 / 3),
    ("3:2", 3 / 2),
    ("16:9", 16 / 9),
    ("2:1", 2.0),
    ("3:1", 3.0),
)


@dataclass(frozen=True)
class BucketSettings:
    """The dataset section's bucketing fields (same names and meaning as in the training config)."""

    resolution: int = 1024
    enable_bucket: bool = True
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False

    @classmethod
    def from_config(cls, section: Any) -> BucketSettings:
        """From a `config.model.DatasetSection`."""
        return cls(
            section.resolution,
            section.enable_bucket,
            section.min_bucket_reso,
            section.max_bucket_reso,
            section.bucket_reso_steps,
            section.bucket_no_upscale,
        )

    def bucketer(self) -> Bucketer:
        return Bucketer(
            self.resolution,
            enable=self.enable_bucket,
            min_reso=self.min_bucket_reso,
            max_reso=self.max_bucket_reso,
            steps=self.bucket_reso_steps,
            no_upscale=self.bucket_no_upscale,
        )

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class BucketCount:
    """A bucket (training size) and how many images train at it: distinct, and with kohya repeats."""

    size: Size
    images: int
    with_repeats: int


@dataclass(frozen=True)
class FolderStats:
    path: str  # relative to the root ("" for the root)
    repeats: int | None  # the kohya folder's repeats, None for a folder without a prefix
    images: int
    captioned: int


@dataclass
class DatasetStats:
    """The numbers `nyx dataset stats` shows."""

    images: int
    readable: int
    unreadable: int
    captioned: int
    missing_captions: int
    empty_captions: int
    orphans: int
    with_repeats: int  # readable images the trainer reads × their folder's repeats (what one epoch sees)
    folders: list[FolderStats]
    sizes: list[tuple[Size, int]]  # exact (width, height), most common first
    short_side: list[tuple[str, int]]  # SHORT_SIDE_BINS with counts (every bin, in order)
    aspect: list[tuple[str, int]]  # ASPECT_RATIOS with counts (every ratio, in order)
    smaller_than_resolution: int  # images with fewer pixels than resolution² (enlarged unless no-upscale)
    settings: BucketSettings
    buckets: list[BucketCount]  # sorted by size
    tags: list[tuple[str, int]]  # every tag with the number of captions holding it, most common first
    tags_per_caption: float  # mean over the non-empty captions
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def unique_tags(self) -> int:
        return len(self.tags)

    def to_json(self, top: int | None = None) -> dict[str, Any]:
        return {
            "images": self.images,
            "readable": self.readable,
            "unreadable": self.unreadable,
            "captioned": self.captioned,
            "missing_captions": self.missing_captions,
            "empty_captions": self.empty_captions,
            "orphans": self.orphans,
            "with_repeats": self.with_repeats,
            "folders": [f.__dict__ for f in self.folders],
            "sizes": [{"width": w, "height": h, "count": n} for (w, h), n in self.sizes[:top]],
            "short_side": dict(self.short_side),
            "aspect": dict(self.aspect),
            "smaller_than_resolution": self.smaller_than_resolution,
            "buckets": {
                "settings": self.settings.to_json(),
                "sizes": [
                    {"width": b.size[0], "height": b.size[1], "images": b.images, "with_repeats": b.with_repeats}
                    for b in self.buckets
                ],
            },
            "unique_tags": self.unique_tags,
            "tags_per_caption": round(self.tags_per_caption, 2),
            "tags": [{"tag": t, "count": n} for t, n in self.tags[:top]],
        }


def short_side_bin(size: Size) -> str:
    short = min(size)
    label = SHORT_SIDE_BINS[0][0]
    for name, low in SHORT_SIDE_BINS:
        if short >= low:
            label = name
    return label


def aspect_bin(size: Size) -> str:
    """The nearest common aspect ratio (`2:3`, `16:9`, …) of a (width, height)."""
    r = math.log(size[0] / size[1])
    return min(ASPECT_RATIOS, key=lambda a: abs(math.log(a[1]) - r))[0]


def bucket_counts(dataset: Dataset, settings: BucketSettings) -> list[BucketCount]:
    """How many readable images (and with repeats) train at each bucket size under `settings`."""
    bucketer = settings.bucketer()
    images: Counter[Size] = Counter()
    weighted: Counter[Size] = Counter()
    for e in dataset.images:
        if e.size is None or e.size[0] < 1 or e.size[1] < 1:
            continue
        target = bucketer.geometry(e.size).target
        images[target] += 1
        weighted[target] += e.repeats
    return [BucketCount(s, images[s], weighted[s]) for s in sorted(images)]


def compute_stats(dataset: Dataset, settings: BucketSettings | None = None) -> DatasetStats:
    """Every number of `DatasetStats` for a scanned dataset (scanned with sizes: `scan(read_sizes=True)`)."""
    settings = settings or BucketSettings()
    images = dataset.images
    sized = [e for e in images if e.size is not None and e.size[0] > 0 and e.size[1] > 0]
    captioned = [e for e in images if e.has_caption]
    sizes = Counter(e.size for e in sized if e.size is not None)
    short = Counter(short_side_bin(e.size) for e in sized if e.size is not None)
    aspect = Counter(aspect_bin(e.size) for e in sized if e.size is not None)
    area = settings.resolution * settings.resolution
    trained = {f.rel for f in trained_folders(dataset)}
    captioned_in = Counter(e.folder for e in captioned)
    folders = [
        FolderStats(f.rel, f.kohya.repeats if f.kohya else None, f.images, captioned_in[f.rel])
        for f in dataset.folders
        if f.images
    ]
    freq = tag_frequencies(images)
    non_empty = [e for e in captioned if e.caption]
    per_caption = sum(len(split_tags(e.caption or "")) for e in non_empty) / len(non_empty) if non_empty else 0.0
    return DatasetStats(
        images=len(images),
        readable=len(dataset.readable),
        unreadable=len(dataset.unreadable),
        captioned=len(captioned),
        missing_captions=len(images) - len(captioned),
        empty_captions=len(captioned) - len(non_empty),
        orphans=len(dataset.orphans),
        with_repeats=sum(e.repeats for e in images if e.readable and e.folder in trained),
        folders=folders,
        sizes=sorted(sizes.items(), key=lambda kv: (-kv[1], kv[0])),
        short_side=[(name, short[name]) for name, _ in SHORT_SIDE_BINS],
        aspect=[(name, aspect[name]) for name, _ in ASPECT_RATIOS],
        smaller_than_resolution=sum(1 for e in sized if e.size is not None and e.size[0] * e.size[1] < area),
        settings=settings,
        buckets=bucket_counts(dataset, settings),
        tags=sorted(freq.items(), key=lambda kv: (-kv[1], kv[0])),
        tags_per_caption=per_caption,
    )


__all__ = [
    "ASPECT_RATIOS",
    "SHORT_SIDE_BINS",
    "BucketCount",
    "BucketSettings",
    "DatasetStats",
    "FolderStats",
    "aspect_bin",
    "bucket_counts",
    "compute_stats",
    "short_side_bin",
]
