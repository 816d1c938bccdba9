"""Pre-flight: the checks that need the filesystem, run before any model loads.

Pydantic validation says whether a config is well-formed; this says whether it can run here: the image
folders exist and hold images, the base model is a real model folder or file (or a hub id), the output
folder is not a file. A six-hour run should not fail at minute three because of a typo in a path, and a
user should see every such problem at once, not one per attempt.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from nyx_tui.config.errors import ConfigError, Problem, has_errors
from nyx_tui.config.io import load_config, looks_like_repo_id
from nyx_tui.config.model import TrainingConfig

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp"})
CHECKPOINT_EXTENSIONS: frozenset[str] = frozenset({".safetensors", ".ckpt"})

_SUBSET_TOML = '[[dataset.subsets]]\nimage_dir = "./images"   # a folder of images with .txt captions beside them'
_MODEL_EXAMPLE = '"stable-diffusion-v1-5/stable-diffusion-v1-5"'


@dataclass
class CheckResult:
    """A config file's verdict: the config when it parsed, and every problem found (errors and warnings)."""

    config: TrainingConfig | None
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Nothing stops the run: the config parsed and there are no errors (warnings are fine)."""
        return self.config is not None and not has_errors(self.problems)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]


# ------------------------------------------------------------------------------------------- helpers


def _safe(test: Callable[[], bool]) -> bool:
    """A filesystem test that answers False instead of raising (NUL bytes, names too long, no permission)."""
    try:
        return test()
    except (OSError, ValueError):
        return False


def _list_dir(folder: Path) -> list[Path] | str:
    """The folder's top-level files, or why they cannot be listed."""
    try:
        with os.scandir(folder) as it:
            return [Path(e.path) for e in it if not e.name.startswith(".") and _safe(e.is_file)]
    except PermissionError:
        return "cannot be read (permission denied)"
    except (OSError, ValueError) as e:
        return f"cannot be read ({e})"


# -------------------------------------------------------------------------------------------- checks


def _check_subsets(cfg: TrainingConfig) -> list[Problem]:
    out: list[Problem] = []
    if not cfg.dataset.subsets:
        return [
            Problem(
                "dataset.subsets",
                "the dataset has no image folders",
                f"add one to the config:\n{_SUBSET_TOML}",
            )
        ]
    for i, subset in enumerate(cfg.dataset.subsets):
        key = f"dataset.subsets[{i}].image_dir"
        if not subset.image_dir.strip():
            out.append(Problem(key, "is empty", 'set it to a folder of images, e.g. image_dir = "./images"'))
            continue
        folder = Path(subset.image_dir)
        if not _safe(folder.exists):
            out.append(
                Problem(
                    key, f"folder not found: {folder}", "check the path (relative paths start at the config's folder)"
                )
            )
            continue
        if not _safe(folder.is_dir):
            out.append(Problem(key, f"is a file, not a folder: {folder}", "set it to the folder that holds the images"))
            continue
        files = _list_dir(folder)
        if isinstance(files, str):
            out.append(Problem(key, f"{folder} {files}", f"check the folder's permissions, e.g. chmod u+rx {folder}"))
            continue
        images = [f for f in files if f.suffix.lower() in IMAGE_EXTENSIONS]
        if not images:
            kinds = ", ".join(sorted(e.lstrip(".") for e in IMAGE_EXTENSIONS))
            out.append(
                Problem(
                    key,
                    f"no images ({kinds}) in {folder}",
                    "put the training images directly in this folder (subfolders are not searched)",
                )
            )
            continue
        ext = subset.caption_extension or cfg.dataset.caption_extension
        names = {f.name for f in files}
        missing = [img for img in images if img.stem + ext not in names]
        if missing:
            example = missing[0].stem + ext
            out.append(
                Problem(
                    key,
                    f"{len(missing)} of {len(images)} images have no {ext} caption file (e.g. {example} is missing)",
                    f"write captions ({ext} files beside the images) or tag the folder; uncaptioned images train "
                    "with an empty caption",
                    severity="warning",
                )
            )
    return out


def _check_model_source(key: str, value: str, *, required: bool) -> list[Problem]:
    if not value.strip():
        if not required:
            return []
        return [
            Problem(
                key,
                "no base model is set",
                f"set {key} to a diffusers folder, a .safetensors file or a Hugging Face repo id, "
                f"e.g. {key} = {_MODEL_EXAMPLE}",
            )
        ]
    path = Path(value)
    if not _safe(path.exists):
        if looks_like_repo_id(value):
            return []  # a hub id; whether it exists is the download's business
        return [
            Problem(
                key,
                f"not found: {value}",
                "give an existing diffusers folder or .safetensors/.ckpt file, or a Hugging Face repo id "
                "such as owner/name",
            )
        ]
    if _safe(path.is_dir):
        if _safe((path / "model_index.json").is_file) or _safe((path / "unet").is_dir):
            return []
        if _safe((path / "transformer").is_dir) or _safe((path / "config.json").is_file):
            return []  # a transformer-only or single-component (VAE) diffusers folder
        return [
            Problem(
                key,
                f"{value} is a folder but not a diffusers model (no model_index.json or unet/ inside)",
                "point it at the diffusers folder itself, or at a .safetensors/.ckpt checkpoint file",
            )
        ]
    if path.suffix.lower() in CHECKPOINT_EXTENSIONS:
        return []
    return [
        Problem(
            key,
            f"{value} is not a model file (expected .safetensors or .ckpt)",
            "use a .safetensors/.ckpt checkpoint, a diffusers folder, or a Hugging Face repo id",
        )
    ]


def _check_output(cfg: TrainingConfig) -> list[Problem]:
    out: list[Problem] = []
    if cfg.saving.output_dir:
        path = Path(cfg.saving.output_dir)
        if _safe(path.exists) and not _safe(path.is_dir):
            out.append(
                Problem(
                    "saving.output_dir",
                    f"{path} is an existing file, not a folder",
                    "choose a folder (it is created if missing), or remove saving.output_dir to use the job's folder",
                )
            )
    if cfg.backend.path:
        path = Path(cfg.backend.path)
        if not _safe(path.is_dir):
            out.append(
                Problem(
                    "backend.path",
                    f"no sd-scripts folder at {path}",
                    "point it at an sd-scripts checkout, or remove backend.path to use the one Nyx installs",
                )
            )
    return out


def preflight(cfg: TrainingConfig) -> list[Problem]:
    """Every filesystem problem with this config, errors and warnings, in config order. Loads no model."""
    problems: list[Problem] = []
    problems += _check_model_source("model.pretrained", cfg.model.pretrained, required=True)
    problems += _check_model_source("model.vae", cfg.model.vae or "", required=False)
    problems += _check_subsets(cfg)
    problems += _check_output(cfg)
    return problems


def _backend_problems(cfg: TrainingConfig) -> list[Problem]:
    """The chosen backend's own limits, when the backend registry is there (it is optional here)."""
    try:
        from nyx_tui.trainers.base import backend_problems
    except ImportError:
        return []
    try:
        return list(backend_problems(cfg))
    except Exception as e:  # a backend bug must not turn a check into a traceback
        return [
            Problem(
                "backend.name",
                f"the backend check itself failed ({type(e).__name__}: {e})",
                "report this as a bug in Nyx; the config may still be fine",
                severity="warning",
            )
        ]


def check_config(cfg: TrainingConfig) -> list[Problem]:
    """Pre-flight and backend problems of an already parsed config (the TUI form checks with this)."""
    try:
        problems = preflight(cfg)
    except Exception as e:
        problems = [Problem("config", f"the pre-flight check failed ({type(e).__name__}: {e})", "report this as a bug")]
    return problems + _backend_problems(cfg)


def check_file(path: Path) -> CheckResult:
    """Parse, validate and pre-flight a config file. Never raises: every failure is a problem in the result."""
    try:
        cfg = load_config(Path(path))
    except ConfigError as e:
        return CheckResult(None, list(e.problems))
    except Exception as e:  # last resort: say what happened instead of a traceback
        return CheckResult(None, [Problem(str(path), f"could not be read ({type(e).__name__}: {e})", "check the file")])
    return CheckResult(cfg, check_config(cfg))
