"""Layout problems of a scanned dataset, each with the fix in words.

The rules are the trainer's (`trainers.native.subsets` / sd-scripts): with kohya `N_name` folders only the
images directly inside those folders are trained on, `N` times an epoch; a folder used as a subset is read
without its subfolders; the caption is the file `<image stem><caption extension>` beside the image, and an
image without one trains with its folder's class token (kohya folders) or an empty caption.

Severities: `error` — the trainer stops or an image is lost (unreadable, no images, an empty `N_name`
folder); `warning` — something is silently not trained as the user likely meant; `info` — tidy-ups.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nyx_tui.datasets.images import IMAGE_EXTS
from nyx_tui.datasets.scan import Dataset, FolderEntry, ImageEntry
from nyx_tui.trainers.native.subsets import IMAGE_EXTENSIONS as TRAINER_EXTS

SEVERITIES = ("error", "warning", "info")
_LIST = 5  # names listed in a message before "and N more"


@dataclass(frozen=True)
class Problem:
    """One layout problem: how bad (`error`, `warning`, `info`), a stable `code`, the file or folder it is
    about, what is wrong, and what to do. `paths` lists every file concerned when it groups several."""

    severity: str
    code: str
    path: Path
    message: str
    fix: str
    paths: tuple[Path, ...] = ()

    def to_json(self, root: Path | None = None) -> dict[str, Any]:
        def show(p: Path) -> str:
            if root is not None:
                try:
                    return p.relative_to(root).as_posix() or "."
                except ValueError:
                    pass
            return str(p)

        return {
            "severity": self.severity,
            "code": self.code,
            "path": show(self.path),
            "message": self.message,
            "fix": self.fix,
            "paths": [show(p) for p in self.paths],
        }


def _name(rel: str) -> str:
    return f"`{rel}`" if rel else "the dataset folder"


def _names(paths: list[Path], root: Path) -> str:
    shown = ", ".join(f"`{p.relative_to(root).as_posix()}`" for p in paths[:_LIST])
    return shown + (f" and {len(paths) - _LIST} more" if len(paths) > _LIST else "")


def _plural(n: int, one: str, many: str | None = None) -> str:
    return f"{n} {one if n == 1 else (many or one + 's')}"


def _are(n: int) -> str:
    return "is" if n == 1 else "are"


def _have(n: int) -> str:
    return "has" if n == 1 else "have"


def _them(n: int) -> str:
    return "it" if n == 1 else "them"


def trained_folders(ds: Dataset) -> list[FolderEntry]:
    """The folders whose images the trainer reads: the `N_name` folders when the root has them (it is a
    `train_data_dir`), else the root itself (a subset folder, `N_name` or not)."""
    kohya = [f for f in ds.folders if f.depth == 1 and f.kohya is not None]
    return kohya or ds.folders[:1]


def find_problems(ds: Dataset) -> list[Problem]:
    """Every layout problem of `ds`, errors first."""
    out: list[Problem] = []
    root = ds.root
    if not ds.images:
        exts = " ".join(sorted(IMAGE_EXTS))
        out.append(
            Problem(
                "error",
                "no-images",
                root,
                f"no images in {root} (looked for {exts}, in subfolders too)",
                "point at the folder that holds the images, or at the folder holding their `N_name` folders",
            )
        )
    for e in ds.unreadable:
        out.append(
            Problem(
                "error",
                "unreadable",
                e.path,
                f"`{e.rel}` cannot be read as an image ({e.error})",
                "re-export it (e.g. as PNG) or delete it; the trainer stops on it",
            )
        )

    trained = {f.rel for f in trained_folders(ds)}
    by_rel = {f.rel: f for f in ds.folders}
    for f in ds.folders:
        out.extend(_folder_problems(f, trained, by_rel))

    out.extend(_caption_problems(ds))
    out.extend(_shared_captions(ds))
    out.extend(_format_problems(ds))
    order = {s: i for i, s in enumerate(SEVERITIES)}
    return sorted(out, key=lambda p: order.get(p.severity, len(order)))


def _folder_problems(f: FolderEntry, trained: set[str], by_rel: dict[str, FolderEntry]) -> list[Problem]:
    out: list[Problem] = []
    if f.depth > 0 and f.images_below == 0:
        parent = by_rel.get(f.rel.rpartition("/")[0])
        if parent is None or parent.images_below > 0 or parent.depth == 0:  # report the topmost empty one
            severity = "error" if f.rel in trained else "info"
            why = "; the trainer stops on an empty `N_name` folder" if f.rel in trained else ""
            out.append(
                Problem(
                    severity,
                    "empty-folder",
                    f.path,
                    f"folder {_name(f.rel)} holds no images{why}",
                    "add images to it or delete it",
                )
            )
        return out
    if f.rel in trained and f.depth > 0 and f.images == 0:
        out.append(
            Problem(
                "error",
                "empty-folder",
                f.path,
                f"folder {_name(f.rel)} holds no images of its own (only in its subfolders); the trainer stops "
                "on an empty `N_name` folder",
                f"move the images from its subfolders into {_name(f.rel)}",
            )
        )
    if f.images == 0 or f.rel in trained:
        return out
    n = _plural(f.images, "image")
    if f.depth == 0:
        out.append(
            Problem(
                "warning",
                "root-images",
                f.path,
                f"{n} directly in the dataset folder {_are(f.images)} not trained on: beside `N_name` folders, "
                "only the images inside those folders are",
                f"move {_them(f.images)} into a `N_name` folder (e.g. `10_mychar`: 10 repeats, class token "
                f"`mychar`) or delete {_them(f.images)}",
            )
        )
    elif f.depth == 1 and "" not in trained:
        name = f.path.name
        prefix = f.repeat_prefix
        if prefix is not None and prefix[0] < 1:
            out.append(
                Problem(
                    "warning",
                    "zero-repeats",
                    f.path,
                    f"folder `{name}` has a repeat count of 0: the trainer skips its {n}",
                    f"rename it to `1_{prefix[1]}` (or more repeats) or delete it",
                )
            )
        else:
            out.append(
                Problem(
                    "warning",
                    "no-repeat-prefix",
                    f.path,
                    f"folder `{name}` has no repeat prefix: the trainer skips its {n}",
                    f"rename it to `10_{name}` or set repeats in the config "
                    f'([[dataset.subsets]] image_dir = "{f.path}", num_repeats = 10)',
                )
            )
    else:
        top = f.rel.split("/")[0]
        if top in trained:
            where = f"`{top}`"
            fix = f"move them up into `{top}`, or make `{f.path.name}` its own `N_{f.path.name}` folder beside it"
        elif "" in trained:
            where = "the dataset folder"
            fix = (
                f"move them up into the dataset folder, or add the subfolder as its own subset in the config "
                f'([[dataset.subsets]] image_dir = "{f.path}")'
            )
        else:
            where = "a `N_name` folder"
            fix = (
                f"move {_them(f.images)} into a `N_name` folder directly under the dataset folder "
                f"(e.g. `10_{f.path.name}`)"
            )
        out.append(
            Problem(
                "warning",
                "nested-images",
                f.path,
                f"{n} in {_name(f.rel)} {_are(f.images)} not trained on: the trainer reads only the images directly in "
                f"{where}, not in its subfolders",
                fix,
            )
        )
    return out


def _by_folder(entries: list[ImageEntry]) -> dict[str, list[ImageEntry]]:
    groups: dict[str, list[ImageEntry]] = defaultdict(list)
    for e in entries:
        groups[e.folder].append(e)
    return groups


def _caption_problems(ds: Dataset) -> list[Problem]:
    out: list[Problem] = []
    ext = ds.caption_ext
    # a caption extension mismatch: images whose only caption has another extension
    other_only = [e for e in ds.images if not e.has_caption and e.other_captions]
    if other_only:
        exts = sorted({p.suffix for e in other_only for p in e.other_captions})
        shown = "/".join(f"`{x}`" for x in exts)
        some = exts[0]
        other_paths = tuple(p for e in other_only for p in e.other_captions)
        n = _plural(len(other_only), "image")
        if not any(e.has_caption for e in ds.images):
            have = _have(len(other_only))
            message = f"no `{ext}` captions, but {n} {have} {shown} captions: the trainer reads only `{ext}`"
            fix = (
                f"use the captions' extension: --caption-ext {some} (in the config: "
                f'dataset.caption_extension = "{some}"), or rename the files to `{ext}`'
            )
        else:
            message = (
                f"{n} {_have(len(other_only))} a {shown} caption but no `{ext}` one: the trainer reads only `{ext}` "
                "and these train without their caption"
            )
            fix = f"rename those caption files to `{ext}` (one extension for the whole dataset)"
        out.append(Problem("warning", "caption-ext-mismatch", ds.root, message, fix, other_paths))

    trained = {f.rel for f in trained_folders(ds)}
    for folder, entries in _by_folder(ds.images).items():
        fe = ds.folder(folder)
        if fe is not None and fe.rel not in trained and (fe.depth != 1 or "" in trained):
            continue  # not trained where they are (root-images / nested-images says so): captions do not matter
        kohya = fe.kohya if fe else None
        fallback = (
            f"they train with the class token `{kohya.name}` alone" if kohya else "they train with an empty caption"
        )
        missing = [e for e in entries if not e.has_caption and not e.other_captions]
        if missing:
            out.append(
                Problem(
                    "warning",
                    "missing-caption",
                    fe.path if fe else ds.root,
                    f"{len(missing)} of {_plural(len(entries), 'image')} in {_name(folder)} {_have(len(missing))} "
                    f"no caption (`{ext}`): {_names([e.path for e in missing], ds.root)}",
                    f"{fallback}; caption them (`nyx tag DIR` for WD14 tags, `nyx caption DIR --model …` for "
                    f"sentences) or write the `{ext}` files",
                    tuple(e.path for e in missing),
                )
            )
        empty = [e for e in entries if e.has_caption and not e.caption]
        if empty:
            out.append(
                Problem(
                    "warning",
                    "empty-caption",
                    fe.path if fe else ds.root,
                    f"{_plural(len(empty), 'caption')} in {_name(folder)} "
                    f"{'is' if len(empty) == 1 else 'are'} empty: "
                    f"{_names([e.caption_path for e in empty], ds.root)}",
                    f"write a caption in {'it' if len(empty) == 1 else 'them'} or delete the empty "
                    f"file{'' if len(empty) == 1 else 's'} ({fallback.replace('they train', 'the image trains')})",
                    tuple(e.caption_path for e in empty),
                )
            )

    orphans: dict[Path, list[Path]] = defaultdict(list)
    for p in ds.orphans:
        orphans[p.parent].append(p)
    for folder_path, paths in orphans.items():
        rel = ds.rel(folder_path)
        rel = "" if rel == "." else rel
        out.append(
            Problem(
                "info",
                "orphan-caption",
                folder_path,
                f"{_plural(len(paths), 'caption file')} in {_name(rel)} "
                f"{'has' if len(paths) == 1 else 'have'} no image: {_names(paths, ds.root)}",
                f"delete {_them(len(paths))}, or put {'its image' if len(paths) == 1 else 'their images'} back (same "
                "name, an image extension)",
                tuple(paths),
            )
        )
    return out


def _shared_captions(ds: Dataset) -> list[Problem]:
    out: list[Problem] = []
    groups: dict[Path, list[ImageEntry]] = defaultdict(list)
    for e in ds.images:
        groups[e.caption_path].append(e)
    for cap, entries in groups.items():
        if len(entries) < 2:
            continue
        names = " and ".join(f"`{e.rel}`" for e in entries)
        out.append(
            Problem(
                "warning",
                "shared-caption",
                cap,
                f"{names} share one caption file `{ds.rel(cap)}`",
                "rename all but one of them (each image needs its own caption), or delete the duplicates",
                tuple(e.path for e in entries),
            )
        )
    return out


def _format_problems(ds: Dataset) -> list[Problem]:
    skipped = [e for e in ds.images if e.path.suffix.lower() not in TRAINER_EXTS]
    if not skipped:
        return []
    exts = ", ".join(sorted({e.path.suffix.lower() for e in skipped}))
    return [
        Problem(
            "warning",
            "unsupported-format",
            ds.root,
            f"{_plural(len(skipped), 'image')} ({exts}) {_are(len(skipped))} not read by the trainer, which reads only "
            f"{' '.join(sorted(TRAINER_EXTS))}: {_names([e.path for e in skipped], ds.root)}",
            "convert them to PNG or JPEG",
            tuple(e.path for e in skipped),
        )
    ]


__all__ = ["SEVERITIES", "Problem", "find_problems", "trained_folders"]
