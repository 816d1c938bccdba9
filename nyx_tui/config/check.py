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
from nyx_tui.config.fields import FLOW_FAMILIES, Family
from nyx_tui.config.io import load_config, looks_like_repo_id, toml_value
from nyx_tui.config.model import TrainingConfig
from nyx_tui.families import Kind, called, defaults, describe, detect, vae_families

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp"})
# what the native loader opens (pickles only through torch.load(weights_only=True))
CHECKPOINT_EXTENSIONS: frozenset[str] = frozenset({".safetensors", ".ckpt", ".pt", ".pth", ".bin"})

_SUBSET_TOML = '[[dataset.subsets]]\nimage_dir = "./images"   # a folder of images with .txt captions beside them'
_MODEL_EXAMPLE = '"stable-diffusion-v1-5/stable-diffusion-v1-5"'


def _repo_problems(key: str, repo: str) -> list[Problem]:
    """A Hugging Face repo id is read from the local cache only (training never downloads): say so before
    the job starts when it is not there. A warning, since a file-less check cannot see every cache layout."""
    from nyx_tui.families import REPO_NOT_CHECKED

    if detect(repo).reason != REPO_NOT_CHECKED:
        return []
    return [
        Problem(
            key,
            f"{repo} is not in the local Hugging Face cache, and training does not download",
            f"download it first: hf download {repo} (HF_TOKEN for a gated model), or give a local folder or file",
            severity="warning",
        )
    ]


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
    if not cfg.dataset.subsets and not cfg.dataset.train_data_dir:
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
        if missing and not subset.class_tokens:  # with class_tokens an uncaptioned image is captioned by them
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
            return _repo_problems(key, value)
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


def _piece_hint(kind: Kind, family: Family) -> str:
    """Where a VAE or text encoder given as model.pretrained belongs instead (Flux/SD3 take them as files)."""
    if kind is Kind.VAE:
        return "; a VAE goes in model.vae"
    if kind is Kind.TEXT_ENCODER and family in FLOW_FAMILIES:
        fields = "model.t5xxl or model.clip_l" if family is Family.FLUX else "model.t5xxl, model.clip_l or model.clip_g"
        return f"; a text encoder file goes in {fields}, with the transformer file in model.pretrained"
    return ""


def _check_families(cfg: TrainingConfig, *, pretrained: bool, vae: bool) -> list[Problem]:
    """The base model, and the VAE when one is set, are of `model.family`, as far as their files tell (read
    by `families.detect`: configs and headers only). A repo id not in the local cache, a pickle checkpoint or
    a file that tells nothing passes without a word: the loader checks those."""
    out: list[Problem] = []
    family = cfg.model.family
    model = detect(cfg.model.pretrained) if pretrained else None
    if model is not None and model.kind in (Kind.LORA, Kind.VAE, Kind.TEXT_ENCODER):
        out.append(
            Problem(
                "model.pretrained",
                f"is a {model.kind} ({model.reason}), not a whole base model",
                "point model.pretrained at the base model (a diffusers folder, a .safetensors checkpoint or a "
                "Hugging Face repo id)" + _piece_hint(model.kind, family),
            )
        )
        model = None
    elif model is not None and not model.fits(family):
        out.append(
            Problem(
                "model.family",
                f"model.pretrained is {called(model.families)} model ({model.reason}) but model.family is "
                f"{family.value}",
                f"set model.family = {' or '.join(toml_value(f) for f in model.families)}, or point "
                f"model.pretrained at {defaults(family).called} model",
            )
        )
    # the VAE must fit the model: the family its files told when they did, else the configured one
    target = model.family if model is not None and model.family is not None else family
    found = detect(cfg.model.vae) if vae and cfg.model.vae else None
    if found is not None and found.kind in (Kind.LORA, Kind.TEXT_ENCODER):
        out.append(
            Problem(
                "model.vae",
                f"is a {found.kind} ({found.reason}), not a VAE",
                "point model.vae at a VAE (a folder or a .safetensors file), or remove it to use the model's own",
            )
        )
    elif found is not None and found.known:
        # a whole model given as the VAE brings its family's VAE, which some families share (SD1.5 and SD2)
        fits = found.families if found.kind is Kind.VAE else {v for f in found.families for v in vae_families(f)}
        if target not in fits:
            what = "this VAE" if found.kind is Kind.VAE else f"the VAE of this {found.kind}"
            out.append(
                Problem(
                    "model.vae",
                    f"{what} is for {describe(found.families)} ({found.reason}), the model is {defaults(target).name}",
                    f"use {defaults(target).called} VAE, or remove model.vae to use the model's own",
                )
            )
    return out


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
    model = _check_model_source("model.pretrained", cfg.model.pretrained, required=True)
    vae = _check_model_source("model.vae", cfg.model.vae or "", required=False)
    problems += model + vae
    problems += _check_families(cfg, pretrained=not model, vae=not vae)
    problems += _check_subsets(cfg)
    from nyx_tui.trainers.native.data_check import data_problems  # torch-free; here to keep config's imports light

    problems += data_problems(cfg)
    from nyx_tui.trainers.native.loss_check import loss_problems  # torch-free, like data_check

    problems += loss_problems(cfg)
    from nyx_tui.trainers.native.init_check import weights_problems  # torch-free: network.weights' file

    problems += weights_problems(cfg)
    from nyx_tui.trainers.native.flow_check import flow_problems  # torch-free: Flux/SD3 files' missing pieces

    problems += flow_problems(cfg)
    problems += _check_output(cfg)
    from nyx_tui.config.prompts import prompt_problems

    problems += prompt_problems(cfg)
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
    from nyx_tui.trainers.native.optim import optimizer_problems  # torch-free; here to keep config's imports light

    return problems + optimizer_problems(cfg) + _backend_problems(cfg)


def check_file(path: Path) -> CheckResult:
    """Parse, validate and pre-flight a config file. Never raises: every failure is a problem in the result."""
    try:
        cfg = load_config(Path(path))
    except ConfigError as e:
        return CheckResult(None, list(e.problems))
    except Exception as e:  # last resort: say what happened instead of a traceback
        return CheckResult(None, [Problem(str(path), f"could not be read ({type(e).__name__}: {e})", "check the file")])
    return CheckResult(cfg, check_config(cfg))
