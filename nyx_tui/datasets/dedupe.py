"""Duplicate images: exact copies (same bytes) and near copies (same picture resized, recompressed, lightly
cropped or mirrored), grouped, each group with a keeper; and the quarantine the extras are moved to.

Near copies are found with a 64-bit perceptual hash (imagehash's pHash: DCT of a 32x32 grayscale). Measured
(NOTES.md): recompression, a 50% resize, blur and brightness leave the hash as it is (distance 0); a 5% crop
moves it 2-6 bits; a mirror image lands ~32 bits away like an unrelated picture, so each image is also
hashed mirrored and a pair's distance is the smaller of the straight and the mirrored comparison. Decoding is
the cost, so a JPEG is decoded at reduced size (`Image.draft`, grayscale straight from the DCT) — the hash only
looks at 32x32 pixels — and every hash is cached (`hashcache`) by path, size and mtime: a second run reads
no image it has already hashed. All pairs are compared at once with numpy (XOR of packed uint64 hashes,
`np.bitwise_count`), in row chunks so memory stays bounded; 10k images take ~0.1 s. Pairs within the
threshold are joined with union-find, so a group is a connected set: a member may be further than the
threshold from the keeper (its distance to the keeper is reported).

The keeper is the one to train on: the most pixels, then the most bytes (less compressed), then the first
path. Extras are never deleted: `quarantine` moves them (and their caption/sidecar files) into
`<folder>/.nyx/quarantine/<batch>/`, keeping their relative paths, with a manifest that `restore` reads
to put them back. A hidden folder inside the dataset: same filesystem (a rename, no copy), found beside
the data, and skipped by every dataset walk (`iter_images` skips hidden folders).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nyx_tui.datasets.hashcache import Entry, HashCache, Stat
from nyx_tui.datasets.images import is_image, iter_images

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image as PILImage

Progress = Callable[[int, int], None]

DEFAULT_THRESHOLD = 6  # bits of 64: covers recompression, resizes and 3-5% crops; unrelated images are ~32 apart
DRAFT_SIDE = 128  # JPEGs decode at 1/2..1/8 scale, never below this: plenty for a 32x32 hash, ~3x faster
FLUSH_EVERY = 256  # cache writes per transaction
QUARANTINE = Path(".nyx") / "quarantine"
MANIFEST = "manifest.json"


def default_workers() -> int:
    """Decoding releases the GIL: threads use every core, but more than 8 only thrash a shared disk."""
    return max(1, min(8, os.cpu_count() or 1))


def rel_of(path: Path, root: Path) -> str:
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        return str(path)


# ------------------------------------------------------------------------------------------------- hashing


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def open_small_gray(path: Path, side: int) -> tuple[PILImage.Image, tuple[int, int]]:
    """The image as grayscale, decoded at reduced size where the format allows it (JPEG: at least `side`
    pixels a side), EXIF orientation applied; and its full size as displayed (width, height)."""
    from PIL import Image, ImageOps

    with Image.open(path) as img:
        width, height = img.size
        if img.format == "JPEG":
            img.draft("L", (side, side))
        img.load()
        oriented = ImageOps.exif_transpose(img)
        if oriented is None:  # pragma: no cover - only with in_place=True
            oriented = img
        if img.size != oriented.size and img.size == oriented.size[::-1]:
            width, height = height, width
        gray = oriented.convert("L") if oriented.mode != "L" else oriented.copy()
    return gray, (width, height)


@functools.cache
def _dct_rows() -> np.ndarray:
    """The first 8 rows of the 32-point DCT-II matrix as scipy.fftpack.dct computes it (unnormalised:
    2·cos(π·k·(2n+1)/64)). pHash needs only the 8x8 lowest frequencies: two small matmuls, not two full DCTs."""
    import numpy as np

    k = np.arange(8)[:, None]
    n = np.arange(32)[None, :]
    return 2.0 * np.cos(np.pi * k * (2 * n + 1) / 64)


def _phash_bits(pixels: np.ndarray) -> str:
    """imagehash.phash (hash_size 8, highfreq_factor 4) of a 32x32 grayscale array, as its 16 hex digits."""
    import numpy as np

    c = _dct_rows()
    low = c @ pixels @ c.T  # == scipy.fftpack.dct(dct(pixels, axis=0), axis=1)[:8, :8]
    bits = np.packbits((low > np.median(low)).ravel())
    return bits.tobytes().hex()


def phash_pair(path: Path) -> tuple[str, str, int, int]:
    """pHash (16 hex digits, the same bits as `imagehash.phash`) of the image and of its mirror image, and
    the image's size. One decode: the 32x32 grayscale the hash is computed from is mirrored, not the image;
    the DCT is done here (see `_phash_bits`) because imagehash's per-call overhead was 2x the decode."""
    import numpy as np
    from PIL import Image

    gray, (width, height) = open_small_gray(path, DRAFT_SIDE)
    small = np.asarray(gray.resize((32, 32), Image.Resampling.LANCZOS), dtype=np.float64)
    return _phash_bits(small), _phash_bits(small[:, ::-1]), width, height


# ------------------------------------------------------------------------------------------------- results


@dataclass
class ImageInfo:
    """One image as dedupe saw it. `error` says why it could not be hashed (then it is in no group)."""

    path: Path
    rel: str
    bytes: int
    sha256: str | None = None
    phash: int | None = None
    phash_flip: int | None = None
    width: int | None = None
    height: int | None = None
    error: str | None = None

    @property
    def pixels(self) -> int:
        return (self.width or 0) * (self.height or 0)

    def to_json(self) -> dict[str, Any]:
        return {"path": self.rel, "width": self.width, "height": self.height, "bytes": self.bytes}


@dataclass
class Member:
    """An extra of a group: its bit distance to the keeper (0..64; 0 for exact copies), whether its bytes
    are identical to the keeper's, and whether it matched the keeper mirrored."""

    image: ImageInfo
    distance: int
    exact: bool
    flipped: bool

    def to_json(self) -> dict[str, Any]:
        return {**self.image.to_json(), "distance": self.distance, "exact": self.exact, "flipped": self.flipped}


@dataclass
class Group:
    keeper: ImageInfo
    members: list[Member]

    def to_json(self) -> dict[str, Any]:
        return {"keeper": self.keeper.to_json(), "members": [m.to_json() for m in self.members]}


@dataclass
class DedupeResult:
    """Groups sorted by the keeper's path. `hashed` images were read this run, `cached` came from the cache
    (a warm run has hashed == 0)."""

    root: Path
    threshold: int
    exact_only: bool
    images: list[ImageInfo]
    groups: list[Group]
    hashed: int
    cached: int
    seconds: float
    cache_path: Path | None = None

    @property
    def unreadable(self) -> list[ImageInfo]:
        return [i for i in self.images if i.error]

    def extras(self) -> list[Path]:
        """Every image that is not a keeper: what quarantine moves."""
        return [m.image.path for g in self.groups for m in g.members]

    def to_json(self) -> dict[str, Any]:
        return {
            "folder": str(self.root),
            "threshold": self.threshold,
            "exact_only": self.exact_only,
            "images": len(self.images),
            "hashed": self.hashed,
            "cached": self.cached,
            "seconds": round(self.seconds, 3),
            "duplicates": sum(len(g.members) for g in self.groups),
            "groups": [g.to_json() for g in self.groups],
            "unreadable": [{"path": i.rel, "error": i.error} for i in self.unreadable],
        }


# ------------------------------------------------------------------------------------------------ grouping


class UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, x: int) -> int:
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


def near_pairs(hashes: np.ndarray, flipped: np.ndarray, threshold: int, chunk_cells: int = 1 << 22) -> np.ndarray:
    """All (i, j), i < j, whose distance (the smaller of straight and mirrored) is at most `threshold`, as an
    (n, 2) array. `hashes`/`flipped` are uint64. Rows are compared in chunks of about `chunk_cells` cells."""
    import numpy as np

    n = len(hashes)
    out: list[np.ndarray] = []
    rows = max(1, chunk_cells // max(1, n))
    for start in range(0, n, rows):
        block = hashes[start : start + rows, None]
        d = np.minimum(np.bitwise_count(block ^ hashes[None, :]), np.bitwise_count(block ^ flipped[None, :]))
        i, j = np.nonzero(d <= threshold)
        i = i + start
        keep = j > i
        out.append(np.stack([i[keep], j[keep]], axis=1))
    return np.concatenate(out) if out else np.zeros((0, 2), dtype=np.intp)


def _keeper_key(info: ImageInfo) -> tuple[int, int, str]:
    return (-info.pixels, -info.bytes, info.rel)


def group_images(images: list[ImageInfo], threshold: int, exact_only: bool) -> list[Group]:
    """Join exact copies (same sha256) and, unless `exact_only`, images within `threshold` bits; each group
    of two or more gets its keeper and the extras' distances to it."""
    import numpy as np

    ok = [i for i in images if i.error is None and i.sha256 is not None]
    uf = UnionFind(len(ok))
    by_sha: dict[str, int] = {}
    for idx, info in enumerate(ok):
        assert info.sha256 is not None
        first = by_sha.setdefault(info.sha256, idx)
        if first != idx:
            uf.union(first, idx)
    if not exact_only:
        hashed = [idx for idx, info in enumerate(ok) if info.phash is not None and info.phash_flip is not None]
        h = np.array([ok[i].phash for i in hashed], dtype=np.uint64)
        f = np.array([ok[i].phash_flip for i in hashed], dtype=np.uint64)
        for a, b in near_pairs(h, f, threshold).tolist():
            uf.union(hashed[a], hashed[b])
    members: dict[int, list[ImageInfo]] = defaultdict(list)
    for idx, info in enumerate(ok):
        members[uf.find(idx)].append(info)
    groups: list[Group] = []
    for infos in members.values():
        if len(infos) < 2:
            continue
        infos.sort(key=_keeper_key)
        keeper, extras = infos[0], infos[1:]
        out: list[Member] = []
        for m in extras:
            exact = m.sha256 == keeper.sha256
            if exact or keeper.phash is None or m.phash is None or m.phash_flip is None:
                out.append(Member(m, 0 if exact else -1, exact, False))
                continue
            straight, mirrored = hamming(keeper.phash, m.phash), hamming(keeper.phash, m.phash_flip)
            out.append(Member(m, min(straight, mirrored), False, mirrored < straight))
        out.sort(key=lambda mm: (mm.distance, mm.image.rel))
        groups.append(Group(keeper, out))
    groups.sort(key=lambda g: g.keeper.rel)
    return groups


# -------------------------------------------------------------------------------------------------- dedupe


def _hash_one(path: Path, stat: Stat, cached: Entry | None, need_phash: bool) -> Entry:
    entry = cached or Entry()
    new = Entry()
    if entry.sha256 is None:
        new = Entry(sha256=file_sha256(path))
    if need_phash and (entry.phash is None or entry.phash_flip is None or entry.width is None):
        straight, mirrored, width, height = phash_pair(path)
        new = Entry(sha256=new.sha256, phash=straight, phash_flip=mirrored, width=width, height=height)
    return entry.merged(new)


def find_duplicates(
    root: Path,
    *,
    threshold: int = DEFAULT_THRESHOLD,
    exact_only: bool = False,
    recursive: bool = True,
    cache: HashCache | None = None,
    cache_path: Path | None = None,
    workers: int | None = None,
    progress: Progress | None = None,
) -> DedupeResult:
    """Hash every image under `root` (reading only the ones the cache does not know in their current version)
    and group the duplicates. `cache` (an open one) or `cache_path` picks the cache file; the default is the
    user cache folder. `progress(done, total)` is called from this thread.

    Raises FileNotFoundError / NotADirectoryError for a bad `root`, ValueError for a threshold outside 0..64."""
    if not 0 <= threshold <= 64:
        raise ValueError(f"threshold {threshold} is outside 0..64 bits: use e.g. {DEFAULT_THRESHOLD}")
    started = time.monotonic()
    root = Path(root).expanduser().absolute()
    if not root.exists():
        raise FileNotFoundError(f"{root} does not exist")
    if not root.is_dir():
        raise NotADirectoryError(f"{root} is not a folder")
    own = cache is None
    db = cache if cache is not None else HashCache(cache_path)
    try:
        paths = list(iter_images(root, recursive=recursive))
        known = db.load_under(root)
        infos: list[ImageInfo] = []
        todo: list[tuple[ImageInfo, Stat, Entry | None]] = []
        cached = 0
        for p in paths:
            try:
                stat = Stat.of(p)
            except OSError as e:
                infos.append(ImageInfo(p, rel_of(p, root), 0, error=f"cannot stat: {e}"))
                continue
            info = ImageInfo(p, rel_of(p, root), stat.size)
            infos.append(info)
            entry = known.get(stat)
            complete = entry is not None and entry.sha256 is not None
            if complete and not exact_only:
                assert entry is not None
                complete = entry.phash is not None and entry.phash_flip is not None and entry.width is not None
            if complete:
                assert entry is not None
                _fill(info, entry)
                cached += 1
            else:
                todo.append((info, stat, entry))
        total = len(todo)
        if progress:
            progress(0, total)
        with ThreadPoolExecutor(max_workers=workers or default_workers()) as pool:
            futures = [
                (info, stat, pool.submit(_hash_one, info.path, stat, entry, not exact_only))
                for info, stat, entry in todo
            ]
            pending: list[tuple[Stat, Entry]] = []
            for done, (info, stat, fut) in enumerate(futures, 1):
                try:
                    entry = fut.result()
                except Exception as e:  # an unreadable image is reported, never fatal
                    info.error = f"{type(e).__name__}: {e}"
                else:
                    pending.append((stat, entry))
                    _fill(info, entry)
                if len(pending) >= FLUSH_EVERY:  # an interrupted run keeps what it hashed
                    db.put_many(pending)
                    pending = []
                if progress:
                    progress(done, total)
            db.put_many(pending)
        if recursive:
            db.prune(root, (str(p.absolute()) for p in paths))
        groups = group_images(infos, threshold, exact_only)
        return DedupeResult(
            root, threshold, exact_only, infos, groups, total, cached, time.monotonic() - started, db.path
        )
    finally:
        if own:
            db.close()


def _fill(info: ImageInfo, entry: Entry) -> None:
    info.sha256 = entry.sha256
    info.phash = int(entry.phash, 16) if entry.phash else None
    info.phash_flip = int(entry.phash_flip, 16) if entry.phash_flip else None
    info.width, info.height = entry.width, entry.height


# ---------------------------------------------------------------------------------------------- quarantine


def sidecars(image: Path) -> tuple[list[Path], list[Path]]:
    """The files that belong to `image`: same folder, same stem, not an image (`a.txt`, `a.caption`,
    `a.npz`, …). Returns (movable, shared): a sidecar is shared, and must stay, when another image in the
    folder has the same stem (`a.png` and `a.jpg` both read `a.txt`)."""
    image = Path(image)
    found: list[Path] = []
    other_image = False
    try:
        siblings = sorted(image.parent.iterdir())
    except OSError:
        return [], []
    for p in siblings:
        if p == image or p.stem != image.stem or not p.is_file():
            continue
        if is_image(p):
            other_image = True
        else:
            found.append(p)
    return ([], found) if other_image else (found, [])


@dataclass
class Moved:
    """One file moved into (or back out of) the quarantine; paths relative to the dataset root / batch."""

    source: str
    target: str
    reason: str
    sidecar_of: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"from": self.source, "to": self.target, "reason": self.reason, "sidecar_of": self.sidecar_of}


@dataclass
class QuarantineReport:
    batch: Path | None
    moved: list[Moved] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, why)

    def to_json(self) -> dict[str, Any]:
        return {
            "batch": str(self.batch) if self.batch else None,
            "moved": [m.to_json() for m in self.moved],
            "skipped": [{"path": p, "why": w} for p, w in self.skipped],
        }


def quarantine_root(root: Path) -> Path:
    return Path(root).absolute() / QUARANTINE


def _new_batch(root: Path, label: str) -> Path:
    base = quarantine_root(root)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in range(1000):
        batch = base / (f"{stamp}-{label}" + (f"-{n}" if n else ""))
        try:
            batch.mkdir(parents=True)
            return batch
        except FileExistsError:
            continue
    raise FileExistsError(f"cannot make a new quarantine batch under {base}")


def quarantine(root: Path, reasons: dict[Path, str], label: str = "dedupe") -> QuarantineReport:
    """Move each image of `reasons` (image → why) and its sidecar files into a new batch folder
    `<root>/.nyx/quarantine/<time>-<label>/`, keeping paths relative to `root`. Nothing is deleted; the
    manifest (written before any move) lets `restore` undo it. An image outside `root` is skipped."""
    root = Path(root).absolute()
    report = QuarantineReport(None)
    plan: list[Moved] = []
    for image, reason in reasons.items():
        image = Path(image).absolute()
        rel = rel_of(image, root)
        if rel == str(image) or rel.startswith(QUARANTINE.as_posix()):
            report.skipped.append((str(image), "not inside the dataset folder"))
            continue
        if not image.exists():
            report.skipped.append((rel, "no longer exists"))
            continue
        plan.append(Moved(rel, rel, reason))
        movable, shared = sidecars(image)
        for s in movable:
            srel = rel_of(s, root)
            plan.append(Moved(srel, srel, reason, sidecar_of=rel))
        for s in shared:
            report.skipped.append((rel_of(s, root), f"kept: another image shares its name (sidecar of {rel})"))
    if not plan:
        return report
    batch = _new_batch(root, label)
    report.batch = batch
    (batch / MANIFEST).write_text(
        json.dumps({"root": str(root), "created": time.time(), "moves": [m.to_json() for m in plan]}, indent=1)
    )
    for m in plan:
        target = batch / m.target
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(root / m.source, target)
        except OSError as e:
            report.skipped.append((m.source, f"not moved: {e}"))
            continue
        report.moved.append(m)
    return report


def list_quarantine(root: Path) -> list[tuple[Path, list[Moved]]]:
    """Each batch (oldest first) with the moves of its manifest whose file is still in the quarantine."""
    base = quarantine_root(root)
    out: list[tuple[Path, list[Moved]]] = []
    if not base.is_dir():
        return out
    for batch in sorted(p for p in base.iterdir() if (p / MANIFEST).is_file()):
        data = json.loads((batch / MANIFEST).read_text())
        moves = [
            Moved(m["from"], m["to"], m.get("reason", ""), m.get("sidecar_of"))
            for m in data.get("moves", [])
            if (batch / m["to"]).exists()
        ]
        out.append((batch, moves))
    return out


def restore(root: Path, batches: Iterable[str] | None = None) -> QuarantineReport:
    """Move quarantined files back to where they were (all batches, or those named). A file whose place is
    taken again is left in the quarantine and reported. Empty batch folders (and their manifests) go."""
    root = Path(root).absolute()
    wanted = set(batches) if batches is not None else None
    report = QuarantineReport(quarantine_root(root))
    for batch, moves in list_quarantine(root):
        if wanted is not None and batch.name not in wanted:
            continue
        for m in moves:
            dest = root / m.source
            if dest.exists():
                report.skipped.append((m.source, f"kept in {batch.name}: a file is at its place again"))
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.rename(batch / m.target, dest)
            report.moved.append(Moved(f"{batch.name}/{m.target}", m.source, m.reason, m.sidecar_of))
        _remove_if_empty(batch)
    return report


def _remove_if_empty(batch: Path) -> None:
    """Drop the batch's empty folders, and the batch with its manifest once no file is left in it."""
    for dirpath, _dirs, _files in sorted(os.walk(batch, topdown=False), key=lambda t: -len(t[0])):
        if Path(dirpath) != batch and not os.listdir(dirpath):
            os.rmdir(dirpath)
    if [p.name for p in batch.iterdir()] == [MANIFEST]:
        (batch / MANIFEST).unlink()
        batch.rmdir()


__all__ = [
    "DEFAULT_THRESHOLD",
    "DedupeResult",
    "Group",
    "ImageInfo",
    "Member",
    "Moved",
    "QuarantineReport",
    "find_duplicates",
    "group_images",
    "list_quarantine",
    "near_pairs",
    "phash_pair",
    "quarantine",
    "quarantine_root",
    "restore",
    "sidecars",
]
