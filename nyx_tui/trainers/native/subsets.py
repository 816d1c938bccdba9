"""Which image folders a dataset trains on, and how often: explicit subsets, kohya `N_name` folders, and
sd-scripts' balancing of regularization images.

No torch and no image decoding here: the pre-flight check (`nyx config check`, the TUI) uses the same
rules as the engine, so a folder the check accepts is a folder the engine trains on.

kohya's folder convention: a folder named `10_mychar` means "10 repeats, class token `mychar`". sd-scripts
applies it to the subfolders of `--train_data_dir` / `--reg_data_dir`; Nyx applies it there too
(`dataset.train_data_dir`, `dataset.reg_data_dir`, each subfolder a subset whose class token captions the
images that have no caption file) and also to an explicit `[[dataset.subsets]]` folder whose
`num_repeats` is not given (the repeats only: an explicit subset's class token is `class_tokens`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from nyx_tui.config.model import DatasetSection

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp"})
_REPEAT_FOLDER = re.compile(r"^(\d+)_(.+)$")


class DatasetError(ValueError):
    """A dataset folder problem, with the config key it concerns (for messages)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{message} ({field})")
        self.field = field


@dataclass(frozen=True)
class Subset:
    """One folder to train on, with everything the config and its name say about it."""

    image_dir: Path
    num_repeats: int
    caption_extension: str
    is_reg: bool
    class_tokens: str | None  # the caption of an image without a caption file
    field: str  # the config key it comes from, e.g. `dataset.subsets[0]` or `dataset.train_data_dir`


def parse_repeat_folder(name: str) -> tuple[int, str] | None:
    """`10_mychar` → (10, "mychar"); None for a name without a leading count."""
    match = _REPEAT_FOLDER.match(name)
    if match is None:
        return None
    return int(match.group(1)), match.group(2)


def repeat_folders(parent: Path) -> tuple[list[tuple[Path, int, str]], list[Path]]:
    """The `N_name` subfolders of `parent` with N >= 1 (sorted by name), and the subfolders it ignores
    (no count, or a count of 0: sd-scripts skips both). Raises OSError when `parent` cannot be listed."""
    used: list[tuple[Path, int, str]] = []
    ignored: list[Path] = []
    for child in sorted(parent.iterdir()):
        if not child.is_dir() or child.name.startswith("."):
            continue
        parsed = parse_repeat_folder(child.name)
        if parsed is None or parsed[0] < 1:
            ignored.append(child)
        else:
            used.append((child, parsed[0], parsed[1]))
    return used, ignored


def resolve(cfg: DatasetSection) -> list[Subset]:
    """Every subset of the dataset: the explicit ones, then `train_data_dir`'s and `reg_data_dir`'s folders.

    Raises DatasetError when a parent folder is missing or holds no `N_name` folder."""
    out: list[Subset] = []
    for i, s in enumerate(cfg.subsets):
        folder = Path(s.image_dir)
        repeats = s.num_repeats
        if repeats is None:
            parsed = parse_repeat_folder(folder.name)
            repeats = parsed[0] if parsed and parsed[0] >= 1 else 1
        ext = s.caption_extension or cfg.caption_extension
        out.append(Subset(folder, repeats, ext, s.is_reg, s.class_tokens, f"dataset.subsets[{i}]"))
    for key, parent, is_reg in (
        ("dataset.train_data_dir", cfg.train_data_dir, False),
        ("dataset.reg_data_dir", cfg.reg_data_dir, True),
    ):
        if not parent:
            continue
        root = Path(parent)
        try:
            used, _ = repeat_folders(root)
        except OSError as e:
            raise DatasetError(key, f"cannot list {root}: {e.strerror or e}") from e
        if not used:
            raise DatasetError(key, f"no kohya-style N_name folders (e.g. 10_mychar) in {root}")
        for folder, repeats, name in used:
            out.append(Subset(folder, repeats, cfg.caption_extension, is_reg, name, key))
    return out


def list_images(folder: Path) -> list[Path]:
    """The folder's images (not its subfolders'), sorted by name so a seeded run is the same everywhere."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def balance_reg_repeats(num_train: int, reg_repeats: list[int]) -> list[int]:
    """sd-scripts' balancing: regularization images are used as often, in total, as the training images.

    Each reg image first gets its own repeats, in order, until the total reaches `num_train` (those
    after that point get 0: unused); if one pass is not enough, one more repeat is added to each in turn
    until it is. Returns the repeats to use per reg image.
    """
    out = [0] * len(reg_repeats)
    if num_train <= 0 or not reg_repeats:
        return out
    total, first = 0, True
    while total < num_train:
        for i, repeats in enumerate(reg_repeats):
            step = repeats if first else 1
            out[i] += step
            total += step
            if total >= num_train:
                break
        first = False
    return out
