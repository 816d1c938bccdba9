"""Images to latents (the VAE encode of a batch), the latent cache, and the text-encoder output cache.

The latent cache (`training.cache_latents`, `training.cache_latents_to_disk`) keeps, per image, the VAE
posterior's mean and standard deviation, not one sample of it (sd-scripts keeps a sample): every step
still draws its own sample from the run's noise generator, exactly as without the cache, so turning the
cache on changes speed, not the training (equal up to float rounding of batched encodes).

On disk: one safetensors file per image under Nyx's cache folder (`<cache>/latents/`, NYX_HOME moves it),
not `<image>.npz` beside the image as sd-scripts does, because a dataset folder may be read-only, synced,
or shared by runs with different settings, and a cache there would be mixed into it. The file's name is
a hash of everything that changes the latents: the image's content (sha256 of the file, so an edited
image gets a new entry and its old one is never used again), its resized size, bucket and crop, and the
VAE's identity (a hash of its config and weights) and dtype. So an entry is valid exactly when its file
exists and loads; a second run, or another job on the same images, reuses it. With `flip_aug` each entry
holds the mirrored image's latents too (sd-scripts does the same); a random crop or colour jitter would
freeze one variant, so the pre-flight check refuses caching with those.

The text-encoder output cache (`training.cache_text_encoder_outputs`) keeps `models.encode_text`'s
`Conditioning` (Flux/SD3: `flow_models.encode_text`'s `FlowConditioning`) per caption in memory; the check
refuses it with caption shuffling and dropout, and a caption it has not seen is encoded when it comes (and
kept). With `training.cache_text_encoder_outputs_to_disk` the rows are also files under
`<cache>/text/`, named by a hash of the caption, the encoders' weights and the encoding settings.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import load_file, save_file

from nyx_tui import paths
from nyx_tui.config.model import TrainingConfig
from nyx_tui.trainers.native import data, models
from nyx_tui.trainers.native.buckets import Geometry
from nyx_tui.trainers.native.data_check import caching_problems
from nyx_tui.trainers.native.flow_models import FlowModel

AnyModel = models.SDModel | FlowModel  # what the VAE and text helpers here take

CACHE_VERSION = 1  # part of every key: bump when what an entry holds changes
PROGRESS_EVERY_S = 0.5


class Reporter(Protocol):
    def emit(self, kind: str, **fields: Any) -> None: ...

    def log(self, message: str, level: str = "info", **fields: Any) -> None: ...


# ------------------------------------------------------------------------------------ batch latents


class LatentCache:
    """Per image path: `mean`, `std` (and `mean_flipped`, `std_flipped` with flip_aug), on the CPU."""

    def __init__(self) -> None:
        self.entries: dict[str, dict[str, torch.Tensor]] = {}
        self.reused = 0
        self.encoded = 0

    def covers(self, batch: dict[str, Any]) -> bool:
        return all(
            path in self.entries and (not flip or "mean_flipped" in self.entries[path])
            for path, flip in zip(batch["images"], batch["flipped"], strict=True)
        )

    def posterior(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        suffixes = ["_flipped" if flip else "" for flip in batch["flipped"]]
        rows = [self.entries[p] for p in batch["images"]]
        mean = torch.stack([r["mean" + s] for r, s in zip(rows, suffixes, strict=True)])
        std = torch.stack([r["std" + s] for r, s in zip(rows, suffixes, strict=True)])
        return mean, std


@torch.no_grad()
def batch_latents(
    model: AnyModel,
    batch: dict[str, Any],
    gen: torch.Generator,
    device: torch.device,
    dtype: torch.dtype,
    cache: LatentCache | None = None,
) -> torch.Tensor:
    """Latents of the batch's images: a sample of the VAE posterior (seeded), shifted (flow models) and scaled. The
    cache holds the posterior, not the shifted latents, so one entry serves both. The posterior comes
    from the cache when it holds every image of the batch, else from encoding `batch["pixels"]`."""
    if cache is not None and "images" in batch and cache.covers(batch):
        mean, std = (t.to(device, dtype) for t in cache.posterior(batch))
    else:
        posterior = model.vae.encode(batch["pixels"].to(device, vae_dtype(model))).latent_dist
        mean, std = posterior.mean.to(dtype), posterior.std.to(dtype)
    eps = torch.randn(mean.shape, generator=gen).to(device, dtype)
    shift = model.vae.config.get("shift_factor")
    if shift:  # Flux's and SD3's VAEs: (sample − shift)·scale, as their pipelines encode; SD VAEs have none
        return (mean + std * eps - shift) * model.vae.config.scaling_factor
    return (mean + std * eps) * model.vae.config.scaling_factor


def vae_dtype(model: AnyModel) -> torch.dtype:
    """The dtype the VAE computes in (its weights'), whatever the training's weight dtype is."""
    return next(model.vae.parameters()).dtype


# -------------------------------------------------------------------------------------- cache keys


def default_root() -> Path:
    return paths.cache_dir() / "latents"


def file_digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def vae_fingerprint(vae: Any) -> str:
    """A hash of the VAE's class, config and every weight (bytes, shape, dtype): two VAEs share cache
    entries only if they compute the same thing."""
    h = hashlib.sha256(type(vae).__name__.encode())
    h.update(json.dumps(dict(vae.config), sort_keys=True, default=str).encode())
    for name, tensor in sorted(vae.state_dict().items()):
        h.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        h.update(tensor.detach().reshape(-1).contiguous().cpu().view(torch.uint8).numpy().data)
    return h.hexdigest()


def entry_key(image_digest: str, item: data.Item, crop: tuple[int, int], vae_id: str, dtype: torch.dtype) -> str:
    geo = item.geometry
    assert geo is not None, "items from data.scan carry their geometry"
    fields = {
        "v": CACHE_VERSION,
        "image": image_digest,
        "resized": list(geo.resized),
        "target": list(geo.target),
        "crop": list(crop),
        "vae": vae_id,
        "dtype": str(dtype),
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def entry_path(root: Path, key: str) -> Path:
    return root / key[:2] / f"{key}.safetensors"


def _read_entry(path: Path, size: tuple[int, int], flip: bool) -> dict[str, torch.Tensor] | None:
    """The entry at `path` if it loads and holds what is needed at latent size `size` (h, w); else None."""
    try:
        tensors = load_file(path)
    except Exception:  # missing, truncated, or not a safetensors file: encode again
        return None
    names = ["mean", "std"] + (["mean_flipped", "std_flipped"] if flip else [])
    if any(n not in tensors or tuple(tensors[n].shape[-2:]) != size for n in names):
        return None
    return {n: tensors[n] for n in names}


def _write_entry(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Atomically (a temp file renamed into place), so a crash or a second job never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------ building it


@torch.no_grad()
def _encode(model: AnyModel, pixels: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    dist = model.vae.encode(pixels.to(device, vae_dtype(model))).latent_dist
    return dist.mean.cpu(), dist.std.cpu()


def _centre_pixels(item: data.Item, resolution: int) -> torch.Tensor:
    """The unaugmented training input of an item: centre crop, not mirrored."""
    item, geo = _with_geometry(item, resolution)
    return data.load_pixels(item, geo.crop(None), False, resolution)


def _with_geometry(item: data.Item, resolution: int) -> tuple[data.Item, Geometry]:
    if item.geometry is None:
        item = dataclasses.replace(item, geometry=data.square_geometry(data.image_size(item.image), resolution))
    assert item.geometry is not None
    return item, item.geometry


def build_latent_cache(
    model: AnyModel,
    items: Iterable[data.Item],
    *,
    resolution: int,
    flip: bool,
    device: torch.device,
    vae_batch_size: int = 1,
    root: Path | None = None,
    report: Reporter | None = None,
) -> LatentCache:
    """Encode every distinct image of `items` once (centre crop; mirrored too with `flip`). With `root`,
    valid entries there are reused and new ones written. Emits `progress` events (unit "latents") and a
    `log` line saying how many entries were reused and how many encoded (fields `reused`, `encoded`)."""
    cache = LatentCache()
    distinct = {str(i.image): i for i in items}
    total = len(distinct)
    vae_id = vae_fingerprint(model.vae) if root is not None else ""
    pending: dict[tuple[int, int], list[tuple[str, data.Item, Path | None]]] = {}  # by size: encodes stack
    last = 0.0

    def progress(force: bool = False) -> None:
        nonlocal last
        now = time.monotonic()
        if report is not None and (force or now - last >= PROGRESS_EVERY_S):
            done = cache.reused + cache.encoded
            report.emit("progress", done=done, total=total, unit="latents", message="caching latents")
            last = now

    progress(force=True)
    for path, original in distinct.items():
        item, geo = _with_geometry(original, resolution)
        file: Path | None = None
        if root is not None:
            key = entry_key(file_digest(item.image), item, geo.crop(None), vae_id, vae_dtype(model))
            file = entry_path(root, key)
            size = (geo.target[1] // data.LATENT_FACTOR, geo.target[0] // data.LATENT_FACTOR)
            found = _read_entry(file, size, flip)
            if found is not None:
                cache.entries[path] = found
                cache.reused += 1
                progress()
                continue
        pending.setdefault(geo.target, []).append((path, item, file))

    for group in pending.values():
        for start in range(0, len(group), vae_batch_size):
            chunk = group[start : start + vae_batch_size]
            pixels = torch.stack([_centre_pixels(it, resolution) for _, it, _ in chunk])
            mean, std = _encode(model, pixels, device)
            if flip:  # the mirrored crop is the crop's pixels mirrored
                mean_f, std_f = _encode(model, torch.flip(pixels, [-1]), device)
            for row, (path, _, file) in enumerate(chunk):
                entry = {"mean": mean[row].clone(), "std": std[row].clone()}
                if flip:
                    entry.update(mean_flipped=mean_f[row].clone(), std_flipped=std_f[row].clone())
                cache.entries[path] = entry
                cache.encoded += 1
                if file is not None:
                    _write_entry(file, entry)
            progress()
    progress(force=True)
    if report is not None:
        where = f" (on disk in {root})" if root is not None else " (in memory)"
        report.log(
            f"latent cache: {cache.reused} of {total} reused, {cache.encoded} encoded{where}",
            reused=cache.reused,
            encoded=cache.encoded,
        )
    return cache


def prepare_latent_cache(
    model: AnyModel,
    items: list[data.Item],
    cfg: TrainingConfig,
    *,
    device: torch.device,
    report: Reporter | None,
    is_main: bool = True,
    wait_for_everyone: Callable[[], None] = lambda: None,
    root: Path | None = None,
) -> LatentCache | None:
    """The run's latent cache, or None when caching is off. With several processes and a disk cache the
    main process encodes and writes first; the others then read its entries (every process must call)."""
    tr = cfg.training
    if not (tr.cache_latents or tr.cache_latents_to_disk):
        return None
    _refuse_conflicts(cfg, "training.cache_latents")
    to_disk = tr.cache_latents_to_disk
    if to_disk and not is_main:
        wait_for_everyone()
    cache = build_latent_cache(
        model,
        items,
        resolution=cfg.dataset.resolution,
        flip=cfg.dataset.flip_aug,
        device=device,
        vae_batch_size=tr.vae_batch_size,
        root=(root or default_root()) if to_disk else None,
        report=report,
    )
    if to_disk and is_main:
        wait_for_everyone()
    return cache


def _refuse_conflicts(cfg: TrainingConfig, field: str) -> None:
    """The pre-flight check's caching conflicts, raised: a config that skipped the check must not train on
    a frozen crop or caption without a word."""
    found = [p for p in caching_problems(cfg) if p.field.startswith(field)]
    if found:
        raise ValueError("; ".join(f"{p.field} {p.message} (fix: {p.fix})" for p in found))


# --------------------------------------------------------------------------- text-encoder outputs


class TextCache:
    """Text-encoder outputs per caption, on the CPU; `conditioning` stacks a batch's rows.

    `encode` turns a list of captions into a conditioning dataclass (`models.Conditioning` for the UNet
    families, `flow_models.FlowConditioning` for Flux/SD3; `kind` is that class); by default
    `models.encode_text`. With `root` every caption's row is also a safetensors file there, named by a hash
    of the caption and `fingerprint` (the encoders' weights and the encoding settings): a later run with the
    same captions and encoders reads them instead of encoding (`reused`). A field that is None (a Flux
    conditioning without a T5 mask) is not written and reads back as None.
    """

    def __init__(
        self,
        model: AnyModel,
        device: torch.device,
        encode: Callable[[list[str]], Any] | None = None,
        kind: type | None = None,
        root: Path | None = None,
        fingerprint: str = "",
    ) -> None:
        self.model, self.device = model, device
        self.encode: Callable[[list[str]], Any] = encode or (
            lambda captions: models.encode_text(model, captions, device)  # type: ignore[arg-type]
        )
        self.rows: dict[str, dict[str, Any]] = {}
        self.kind: type = kind or models.Conditioning  # the class `encode` returns
        self.root, self.fingerprint = root, fingerprint
        self.encoded = 0
        self.reused = 0

    def _file(self, caption: str) -> Path:
        assert self.root is not None
        key = hashlib.sha256(
            json.dumps({"v": CACHE_VERSION, "caption": caption, "encoders": self.fingerprint}).encode()
        ).hexdigest()
        return entry_path(self.root, key)

    def _read(self, caption: str) -> dict[str, Any] | None:
        try:
            tensors = load_file(self._file(caption))
        except Exception:  # missing or unreadable: encode again
            return None
        names = [f.name for f in dataclasses.fields(self.kind)]
        if not set(tensors) <= set(names):
            return None
        return {name: tensors.get(name) for name in names}

    @torch.no_grad()
    def fill(self, captions: Iterable[str], batch_size: int = 16) -> None:
        todo = [c for c in dict.fromkeys(captions) if c not in self.rows]
        if self.root is not None:
            found = {c: row for c in todo if (row := self._read(c)) is not None}
            self.rows.update(found)
            self.reused += len(found)
            todo = [c for c in todo if c not in found]
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            cond = self.encode(chunk)
            self.kind = type(cond)
            for i, caption in enumerate(chunk):
                row = {f.name: _row(getattr(cond, f.name), i) for f in dataclasses.fields(cond)}
                self.rows[caption] = row
                if self.root is not None:
                    _write_entry(self._file(caption), {k: v for k, v in row.items() if isinstance(v, torch.Tensor)})
            self.encoded += len(chunk)

    def conditioning(self, captions: list[str], device: torch.device) -> Any:
        self.fill(captions)
        rows = [self.rows[c] for c in captions]
        values = {name: _stack([r[name] for r in rows], device) for name in rows[0]}
        return self.kind(**values)


def _row(value: Any, i: int) -> Any:
    return value[i].detach().cpu() if isinstance(value, torch.Tensor) else value


def _stack(values: list[Any], device: torch.device) -> Any:
    if isinstance(values[0], torch.Tensor):
        return torch.stack(values).to(device)
    return values[0]


def module_fingerprint(module: Any) -> str:
    """A hash of a network's class, config (diffusers' dict or transformers' `to_dict`) and every weight."""
    config = module.config.to_dict() if hasattr(module.config, "to_dict") else dict(module.config)
    h = hashlib.sha256(type(module).__name__.encode())
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(module.state_dict().items()):
        h.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        h.update(tensor.detach().reshape(-1).contiguous().cpu().view(torch.uint8).numpy().data)
    return h.hexdigest()


def text_fingerprint(model: AnyModel, settings: dict[str, Any]) -> str:
    """What decides a caption's text-encoder outputs: every encoder (weights, dtype, config), every tokenizer's
    vocabulary and the encoding settings (token lengths, masks). Hashing the weights reads them all once
    (seconds for T5-XXL), and only when the cache goes to disk."""
    h = hashlib.sha256(json.dumps({"family": model.family.value, **settings}, sort_keys=True, default=str).encode())
    for encoder in model.text_encoders:
        h.update(module_fingerprint(encoder).encode())
    for name in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        tokenizer = getattr(model, name, None)
        if tokenizer is not None:
            h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    return h.hexdigest()


def default_text_root() -> Path:
    return paths.cache_dir() / "text"


def prepare_text_cache(
    model: AnyModel,
    captions: Iterable[str],
    cfg: TrainingConfig,
    device: torch.device,
    report: Reporter | None,
    root: Path | None = None,
) -> TextCache | None:
    """Every caption's text-encoder outputs, when `training.cache_text_encoder_outputs` (or `_to_disk`, which
    implies it) is on. Flow models encode with `flow_models.encode_text` (without SD3's encoder dropout,
    which the loop applies to the cached rows, drawn from the seeded generator as without the cache)."""
    tr = cfg.training
    if not (tr.cache_text_encoder_outputs or tr.cache_text_encoder_outputs_to_disk):
        return None
    _refuse_conflicts(cfg, "training.cache_text_encoder_outputs")
    encode: Callable[[list[str]], Any] | None = None
    kind: type | None = None
    settings: dict[str, Any] = {"max_token_length": cfg.dataset.max_token_length}
    if isinstance(model, FlowModel):
        from nyx_tui.trainers.native import flow_models

        flow_model, flow_cfg = model, cfg.flow
        encode = lambda chunk: flow_models.encode_text(flow_model, chunk, device, flow_cfg)  # noqa: E731
        kind = flow_models.FlowConditioning
        settings = {
            "t5_max_token_length": model.t5_max_token_length,
            "apply_t5_attn_mask": flow_cfg.apply_t5_attn_mask,
            "apply_lg_attn_mask": flow_cfg.apply_lg_attn_mask if model.family.value == "sd3" else False,
        }
    disk = (root or default_text_root()) if tr.cache_text_encoder_outputs_to_disk else None
    fingerprint = text_fingerprint(model, settings) if disk is not None else ""
    cache = TextCache(model, device, encode=encode, kind=kind, root=disk, fingerprint=fingerprint)
    cache.fill(captions, batch_size=max(1, tr.batch_size))
    if report is not None:
        where = f" ({cache.reused} reused, {cache.encoded} encoded, on disk in {disk})" if disk is not None else ""
        report.log(
            f"text-encoder outputs cached for {len(cache.rows)} captions{where}",
            reused=cache.reused,
            encoded=cache.encoded,
        )
    return cache
