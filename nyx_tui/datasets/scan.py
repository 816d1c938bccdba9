"""Scan a dataset folder into a `Dataset`: every image with its size (from the header, EXIF orientation
honoured), its sidecar caption, and the kohya `N_name` folder that trains it; the folders, the caption
files without an image, and the layout problems (`datasets.layout`), each with its fix.

Nothing is decoded: a header read per image (in a thread pool) and one small read per caption, so 10,000
images scan in seconds. An unreadable image is reported on its entry (`error`), never raised.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nyx_tui.datasets.captions import MISSING, CaptionStamp, caption_path, read_caption
from nyx_tui.datasets.images import Size, is_image, read_header
from nyx_tui.trainers.native.subsets import parse_repeat_folder

# caption extensions recognised beside the one asked for (to report a mismatch and orphans)
CAPTION_EXTS: tuple[str, ...] = (".txt", ".caption")

Progress = Callable[[int, int], None]
_CHUNK = 128  # images per thread-pool task


def normalize_ext(ext: str) -> str:
    """`txt` → `.txt`; raises ValueError for an extension no file could have (empty, a path, only a dot)."""
    ext = ext.strip()
    if not ext.startswith("."):
        ext = "." + ext
    if ext == "." or "/" in ext or "\\" in ext or any(c.isspace() for c in ext):
        raise ValueError(f"{ext!r} is not a file extension: use e.g. .txt or .caption")
    return ext


@dataclass(frozen=True)
class KohyaFolder:
    """A kohya `N_name` folder: trained `repeats` times an epoch, `name` its class token."""

    path: Path
    rel: str  # relative to the dataset root, POSIX; "" when the root itself is the `N_name` folder
    repeats: int
    name: str


@dataclass
class ImageEntry:
    """One image of the dataset. `size` is None (and `error` says why) when the file cannot be read."""

    path: Path
    rel: str  # relative to the root, POSIX separators
    folder: str  # the folder holding it, relative to the root ("" for the root)
    caption_path: Path  # where its caption is (or would be) with the dataset's caption extension
    caption: str | None = None  # the caption's text, stripped; None when there is no caption file
    stamp: CaptionStamp = MISSING  # the caption file's stamp when it was read (for conflict-safe writes)
    other_captions: tuple[Path, ...] = ()  # sidecars with another known caption extension
    kohya: KohyaFolder | None = None  # the `N_name` folder that trains it (its own folder), if any
    size: Size | None = None  # (width, height) as displayed, EXIF orientation applied
    format: str = ""
    mode: str = ""
    orientation: int = 1
    has_alpha: bool = False
    error: str | None = None  # why the image cannot be read; None when it can (or sizes were not read)

    @property
    def readable(self) -> bool:
        return self.error is None

    @property
    def has_caption(self) -> bool:
        return self.caption is not None

    @property
    def repeats(self) -> int:
        """How often an epoch sees it: its kohya folder's repeats, else 1."""
        return self.kohya.repeats if self.kohya else 1

    @property
    def tags(self) -> list[str]:
        """The caption's comma-separated tags, stripped, empty ones dropped."""
        from nyx_tui.datasets.tags import split_tags

        return split_tags(self.caption or "")


@dataclass
class FolderEntry:
    """A folder under the root (the root itself included, rel ""): its images, not its subfolders'."""

    path: Path
    rel: str
    depth: int  # 0 for the root, 1 for its subfolders, …
    images: int = 0  # images directly in it
    images_below: int = 0  # images in it and all its subfolders
    kohya: KohyaFolder | None = None  # set when its name is `N_name` with N >= 1
    repeat_prefix: tuple[int, str] | None = None  # its name parsed as `N_name` (N may be 0)


@dataclass
class Dataset:
    """A scanned dataset folder. `problems` come from `datasets.layout.find_problems`."""

    root: Path
    caption_ext: str
    images: list[ImageEntry]
    folders: list[FolderEntry]
    orphans: list[Path]  # caption files with no image of the same name beside them
    sizes_read: bool = True
    seconds: float = 0.0
    problems: list[Any] = field(default_factory=list)  # list[layout.Problem]

    def by_rel(self) -> dict[str, ImageEntry]:
        return {e.rel: e for e in self.images}

    def folder(self, rel: str) -> FolderEntry | None:
        return next((f for f in self.folders if f.rel == rel), None)

    @property
    def kohya_folders(self) -> list[KohyaFolder]:
        return [f.kohya for f in self.folders if f.kohya is not None]

    @property
    def readable(self) -> list[ImageEntry]:
        return [e for e in self.images if e.readable]

    @property
    def unreadable(self) -> list[ImageEntry]:
        return [e for e in self.images if not e.readable]

    def rel(self, path: Path) -> str:
        """`path` relative to the root, POSIX (the path itself when it is outside the root)."""
        try:
            return Path(path).relative_to(self.root).as_posix()
        except ValueError:
            return str(path)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready summary: counts, folders, unreadable images, orphans, problems."""
        captioned = [e for e in self.images if e.has_caption]
        return {
            "root": str(self.root),
            "caption_ext": self.caption_ext,
            "images": len(self.images),
            "readable": len(self.readable),
            "captioned": len(captioned),
            "missing_captions": len(self.images) - len(captioned),
            "empty_captions": sum(1 for e in captioned if not e.caption),
            "orphans": [self.rel(p) for p in self.orphans],
            "unreadable": [{"path": e.rel, "error": e.error} for e in self.unreadable],
            "folders": [
                {
                    "path": f.rel,
                    "images": f.images,
                    "images_below": f.images_below,
                    "repeats": f.kohya.repeats if f.kohya else None,
                    "name": f.kohya.name if f.kohya else None,
                }
                for f in self.folders
            ],
            "problems": [p.to_json(self.root) for p in self.problems],
            "seconds": round(self.seconds, 3),
        }


def _rel(path: Path, root: Path) -> str:
    rel = path.relative_to(root).as_posix()
    return "" if rel == "." else rel


def _walk(root: Path) -> tuple[list[FolderEntry], list[Path], list[Path]]:
    """Every non-hidden folder (sorted, depth first), the images, and the other files (for captions)."""
    folders: list[FolderEntry] = []
    images: list[Path] = []
    others: list[Path] = []
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        here = Path(dirpath)
        rel = _rel(here, root)
        entry = FolderEntry(here, rel, 0 if not rel else rel.count("/") + 1)
        folders.append(entry)
        for name in sorted(files):
            if name.startswith("."):
                continue
            path = here / name
            if is_image(path):
                images.append(path)
                entry.images += 1
            else:
                others.append(path)
    return folders, images, others


def _read_one(entry: ImageEntry, read_sizes: bool) -> None:
    if read_sizes:
        try:
            header = read_header(entry.path)
        except Exception as e:  # Pillow raises OSError, ValueError, SyntaxError…: all mean "cannot read"
            entry.error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        else:
            entry.size, entry.format, entry.mode = header.size, header.format, header.mode
            entry.orientation, entry.has_alpha = header.orientation, header.has_alpha
    try:
        text, stamp = read_caption(entry.caption_path)
    except OSError:  # a caption we cannot read (a folder named x.txt, no permission) counts as none
        text, stamp = "", MISSING
    if stamp != MISSING:
        entry.caption, entry.stamp = text, stamp


def scan(
    root: Path | str,
    caption_ext: str = ".txt",
    *,
    read_sizes: bool = True,
    workers: int | None = None,
    progress: Progress | None = None,
) -> Dataset:
    """Scan `root` recursively (hidden files and folders skipped). `caption_ext` is the caption extension
    the trainer will read (`.txt`, `.caption`, …); `read_sizes=False` skips the image headers (tag edits
    need only the captions). `progress(done, total)` is called from this thread as images are read.

    Raises FileNotFoundError / NotADirectoryError when `root` is not a folder, ValueError for a bad
    extension. Problems with the contents are reported in `Dataset.problems`, never raised."""
    from nyx_tui.datasets.layout import find_problems

    started = time.monotonic()
    root = Path(root).expanduser().absolute()
    if not root.exists():
        raise FileNotFoundError(f"{root} does not exist")
    if not root.is_dir():
        raise NotADirectoryError(f"{root} is not a folder")
    caption_ext = normalize_ext(caption_ext)
    folders, image_paths, others = _walk(root)
    by_rel = {f.rel: f for f in folders}

    root_parsed = parse_repeat_folder(root.name)
    for f in folders:
        name = root.name if f.depth == 0 else f.path.name
        parsed = root_parsed if f.depth == 0 else parse_repeat_folder(name)
        f.repeat_prefix = parsed
        if parsed is not None and parsed[0] >= 1 and f.depth <= 1:
            f.kohya = KohyaFolder(f.path, f.rel, parsed[0], parsed[1])
        # the root counts as a kohya folder only when it has no kohya folders of its own (see below)

    kohya_children = any(f.kohya is not None for f in folders if f.depth == 1)
    if kohya_children and folders[0].kohya is not None:
        folders[0].kohya = None  # a parent of N_name folders is a train_data_dir, whatever its own name

    entries: list[ImageEntry] = []
    stems: dict[tuple[Path, str], list[Path]] = {}
    for path in image_paths:
        folder_rel = _rel(path.parent, root)
        folder = by_rel[folder_rel]
        entries.append(
            ImageEntry(path, _rel(path, root), folder_rel, caption_path(path, caption_ext), kohya=folder.kohya)
        )
        stems.setdefault((path.parent, path.stem), []).append(path)

    # other caption extensions beside each image, and captions without an image
    known = {caption_ext, *CAPTION_EXTS}
    others_by_stem: dict[tuple[Path, str], list[Path]] = {}
    orphans: list[Path] = []
    for path in others:
        if path.suffix.lower() not in {e.lower() for e in known}:
            continue
        key = (path.parent, path.stem)
        if key not in stems:
            orphans.append(path)
        elif path.suffix != caption_ext:
            others_by_stem.setdefault(key, []).append(path)
    for e in entries:
        e.other_captions = tuple(others_by_stem.get((e.path.parent, e.path.stem), ()))

    total = len(entries)
    n_workers = workers or min(8, os.cpu_count() or 1)
    done = 0
    if progress:
        progress(0, total)
    if n_workers <= 1 or total < 64:
        for e in entries:
            _read_one(e, read_sizes)
            done += 1
            if progress and (done % 256 == 0 or done == total):
                progress(done, total)
    else:
        # chunks, not one task per image: a header read is ~50 µs of Python, less than a future costs;
        # the threads pay off when the reads wait on the disk (a cold cache, a network volume)
        chunks = [entries[i : i + _CHUNK] for i in range(0, total, _CHUNK)]

        def read_chunk(chunk: list[ImageEntry]) -> int:
            for e in chunk:
                _read_one(e, read_sizes)
            return len(chunk)

        with ThreadPoolExecutor(max_workers=n_workers, thread_name_prefix="nyx-scan") as pool:
            for n in pool.map(read_chunk, chunks):
                done += n
                if progress:
                    progress(done, total)

    for f in reversed(folders):  # children come after their parent in a walk: sum bottom-up
        f.images_below += f.images
        if f.depth > 0:
            parent = by_rel.get(_rel(f.path.parent, root))
            if parent is not None:
                parent.images_below += f.images_below

    dataset = Dataset(root, caption_ext, entries, folders, orphans, sizes_read=read_sizes)
    dataset.problems = find_problems(dataset)
    dataset.seconds = time.monotonic() - started
    return dataset


__all__ = [
    "CAPTION_EXTS",
    "Dataset",
    "FolderEntry",
    "ImageEntry",
    "KohyaFolder",
    "normalize_ext",
    "scan",
]
