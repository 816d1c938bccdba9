"""Pre-flight for the data options: the conflicts sd-scripts only asserts after loading the model, the
bucket settings, and the kohya `N_name` parent folders. Torch-free (the config check and the TUI call it).

Each conflict is an error naming both fields and the fix:
- latent caching with `dataset.random_crop` or `dataset.color_aug`: the cache holds one encode per image,
  so every epoch would train on the same crop / colours. (`flip_aug` is fine: both sides are cached.)
- text-encoder output caching (in memory or `_to_disk`) with caption shuffling, caption or tag dropout, or a
  trained text encoder: the cache holds one output per caption, computed by the frozen encoder. This holds
  for Flux and SD3 as for the UNet families. SD3's per-encoder dropout (`flow.clip_l/clip_g/t5_dropout_rate`)
  is *allowed* with the cache: it zeroes an encoder's part of a caption's conditioning, which the loop does
  to the cached rows at every step (as sd-scripts' `drop_cached_text_encoder_outputs`), drawn from the same
  seeded generator as without the cache — nothing has to be encoded twice (no "unconditioned" caching).
- flow models (`flow_problems`): Flux packs the latent in 2×2 patches and SD3 cuts it into 2×2 patches, so
  every image side must be a multiple of 16 pixels (resolution, bucket steps); the Huber `snr` schedule needs
  a DDPM noise schedule that flow matching has not.
"""

from __future__ import annotations

from pathlib import Path

from nyx_tui.config.errors import Problem
from nyx_tui.config.fields import FLOW_FAMILIES, Family
from nyx_tui.config.model import TrainingConfig
from nyx_tui.trainers.native import subsets

# sd-scripts' bucket_reso_steps rule per family (its UNets need it; diffusers' pad, so Nyx only warns)
_SCRIPT_STEPS: dict[Family, int] = {Family.SD15: 64, Family.SD2: 64, Family.SDXL: 32}


def _latent_cache_field(cfg: TrainingConfig) -> str | None:
    tr = cfg.training
    if tr.cache_latents_to_disk:
        return "training.cache_latents_to_disk"
    return "training.cache_latents" if tr.cache_latents else None


def caching_problems(cfg: TrainingConfig) -> list[Problem]:
    out: list[Problem] = []
    ds = cfg.dataset
    cache = _latent_cache_field(cfg)
    if cache:
        for name, what in (("random_crop", "one crop"), ("color_aug", "one colouring")):
            if getattr(ds, name):
                out.append(
                    Problem(
                        cache,
                        f"cannot be used with dataset.{name}: the cache holds {what} of each image, so every "
                        "epoch would train on that",
                        f"set dataset.{name} = false, or turn off training.cache_latents and "
                        "training.cache_latents_to_disk",
                    )
                )
    if cfg.training.cache_text_encoder_outputs or cfg.training.cache_text_encoder_outputs_to_disk:
        varying = [
            ("dataset.shuffle_caption", ds.shuffle_caption, "false"),
            ("dataset.caption_dropout_rate", ds.caption_dropout_rate > 0, "0"),
            ("dataset.caption_tag_dropout_rate", ds.caption_tag_dropout_rate > 0, "0"),
            ("dataset.caption_dropout_every_n_epochs", ds.caption_dropout_every_n_epochs > 0, "0"),
        ]
        for name, on, off in varying:
            if on:
                out.append(
                    Problem(
                        "training.cache_text_encoder_outputs",
                        f"cannot be used with {name}: the cache holds one text-encoder output per caption, "
                        "so the captions must not change from step to step",
                        f"set {name} = {off}, or training.cache_text_encoder_outputs = false",
                    )
                )
        if cfg.network.train_text_encoder:
            out.append(
                Problem(
                    "training.cache_text_encoder_outputs",
                    "cannot be used with network.train_text_encoder: a trained text encoder's outputs change "
                    "every step",
                    "set network.train_text_encoder = false, or training.cache_text_encoder_outputs = false",
                )
            )
    return out


def bucket_problems(cfg: TrainingConfig) -> list[Problem]:
    ds = cfg.dataset
    if not ds.enable_bucket:
        return []
    out: list[Problem] = []
    steps = ds.bucket_reso_steps
    if steps % 8:
        out.append(
            Problem(
                "dataset.bucket_reso_steps",
                f"is {steps}; bucket sides must be multiples of 8 (the VAE downsamples by 8)",
                f"set dataset.bucket_reso_steps = {max(8, steps - steps % 8)} (or 64)",
            )
        )
    else:
        need = _SCRIPT_STEPS.get(cfg.model.family)
        if need and steps % need:
            out.append(
                Problem(
                    "dataset.bucket_reso_steps",
                    f"is {steps}: sd-scripts requires a multiple of {need} for {cfg.model.family.value} "
                    "(the native engine trains it, at some cost in speed)",
                    f"set dataset.bucket_reso_steps = {need} to train the same with the kohya backends",
                    severity="warning",
                )
            )
    if ds.bucket_no_upscale:
        return out
    if ds.min_bucket_reso % 8:
        out.append(
            Problem(
                "dataset.min_bucket_reso",
                f"is {ds.min_bucket_reso}; bucket widths start there, so it must be a multiple of 8",
                f"set dataset.min_bucket_reso = {ds.min_bucket_reso - ds.min_bucket_reso % 8 or 64}",
            )
        )
    if ds.min_bucket_reso > ds.max_bucket_reso:
        out.append(
            Problem(
                "dataset.min_bucket_reso",
                f"({ds.min_bucket_reso}) is above dataset.max_bucket_reso ({ds.max_bucket_reso})",
                "lower dataset.min_bucket_reso or raise dataset.max_bucket_reso",
            )
        )
    if ds.resolution > ds.max_bucket_reso:
        out.append(
            Problem(
                "dataset.max_bucket_reso",
                f"({ds.max_bucket_reso}) is below dataset.resolution ({ds.resolution}): the square bucket would "
                "not fit",
                f"set dataset.max_bucket_reso = {max(ds.resolution, 1024)} or more",
            )
        )
    return out


def _folder_problems(key: str, parent: Path) -> list[Problem]:
    """A kohya parent folder: it exists, holds `N_name` folders, and each of those holds images."""
    try:
        if not parent.is_dir():
            return [
                Problem(
                    key, f"folder not found: {parent}", "check the path (relative paths start at the config's folder)"
                )
            ]
        used, ignored = subsets.repeat_folders(parent)
    except (OSError, ValueError) as e:
        return [
            Problem(key, f"{parent} cannot be read ({e})", f"check the folder's permissions, e.g. chmod u+rx {parent}")
        ]
    out: list[Problem] = []
    if not used:
        return [
            Problem(
                key,
                f"no kohya-style N_name folders in {parent} (e.g. 10_mychar: 10 repeats, class token mychar)",
                "put the images in such subfolders, or give the folder as a [[dataset.subsets]] image_dir",
            )
        ]
    if ignored:
        names = ", ".join(p.name for p in ignored[:3]) + (" …" if len(ignored) > 3 else "")
        out.append(
            Problem(
                key,
                f"{len(ignored)} subfolder(s) without a repeat count are ignored ({names})",
                "name them N_name (e.g. 5_style) to train on them",
                severity="warning",
            )
        )
    for folder, _, _ in used:
        try:
            images = subsets.list_images(folder)
        except OSError as e:
            out.append(Problem(key, f"{folder} cannot be read ({e})", f"check the folder's permissions: {folder}"))
            continue
        if not images:
            out.append(Problem(key, f"no images in {folder}", "put images in it, or remove the folder"))
    return out


FLOW_SIDE = 16  # pixels: 8× VAE downsampling, then 2×2 patches (Flux's packing, SD3's patch_size 2)


def flow_problems(cfg: TrainingConfig) -> list[Problem]:
    """Flux/SD3 conflicts sd-scripts only finds after loading (or as a shape error in the first step)."""
    if cfg.model.family not in FLOW_FAMILIES:
        return []
    out: list[Problem] = []
    ds, tr, fam = cfg.dataset, cfg.training, cfg.model.family.value
    if ds.resolution % FLOW_SIDE:
        out.append(
            Problem(
                "dataset.resolution",
                f"is {ds.resolution}; {fam} cuts the latent into 2×2 patches, so image sides must be multiples of "
                f"{FLOW_SIDE} pixels",
                f"set dataset.resolution = {max(FLOW_SIDE, ds.resolution - ds.resolution % FLOW_SIDE)}",
            )
        )
    if ds.enable_bucket and ds.bucket_reso_steps % FLOW_SIDE:
        out.append(
            Problem(
                "dataset.bucket_reso_steps",
                f"is {ds.bucket_reso_steps}; {fam} needs bucket sides in multiples of {FLOW_SIDE} pixels (2×2 "
                "latent patches)",
                "set dataset.bucket_reso_steps = 64 (or another multiple of 16)",
            )
        )
    if tr.loss_type.value in ("huber", "smooth_l1") and tr.huber_schedule.value == "snr":
        out.append(
            Problem(
                "training.huber_schedule",
                "'snr' needs a DDPM noise schedule; flow-matching models have none",
                "set training.huber_schedule = 'constant' or 'exponential'",
            )
        )
    return out


def data_problems(cfg: TrainingConfig) -> list[Problem]:
    """Every data-option problem of `cfg` (conflicts, buckets, flow-model sizes, parent folders). Never raises."""
    out = caching_problems(cfg) + bucket_problems(cfg) + flow_problems(cfg)
    ds = cfg.dataset
    for key, parent in (("dataset.train_data_dir", ds.train_data_dir), ("dataset.reg_data_dir", ds.reg_data_dir)):
        if parent:
            out += _folder_problems(key, Path(parent))
    has_reg = bool(ds.reg_data_dir) or any(s.is_reg for s in ds.subsets)
    has_train = bool(ds.train_data_dir) or any(not s.is_reg for s in ds.subsets)
    if has_reg and not has_train:
        out.append(
            Problem(
                "dataset.subsets",
                "every subset is regularization images (is_reg); there is nothing to train on",
                "add the training images as a subset without is_reg (or dataset.train_data_dir)",
            )
        )
    if cfg.training.prior_loss_weight != 1.0 and not has_reg:
        out.append(
            Problem(
                "training.prior_loss_weight",
                "has no effect: the dataset has no regularization images",
                "add a subset with is_reg = true (or dataset.reg_data_dir), or leave prior_loss_weight at 1",
                severity="warning",
            )
        )
    return out
