"""Saving the trained UNet LoRA as a kohya-format file that A1111, ComfyUI, Forge and diffusers load.

Keys are sd-scripts' (`lora_unet_<module path with _>.lora_down.weight` / `.lora_up.weight` / `.alpha`),
made by diffusers' `convert_state_dict_to_kohya` from the peft state dict. That function writes
alpha = rank; the real network alpha is written instead, or the loaded LoRA would be scaled by dim/alpha
wrongly (NOTES: "LoRA files the ecosystem loads"). The metadata is what sd-scripts writes (`ss_*`,
`modelspec.*`, `sshs_*` hashes) so LoRA browsers and the webui's extra-networks panel show the run.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from diffusers.utils import convert_state_dict_to_kohya
from peft.utils import get_peft_model_state_dict

from nyx_tui.config.model import TrainingConfig

SAVE_DTYPES: dict[str, torch.dtype] = {"float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def kohya_state_dict(unet: torch.nn.Module, alpha: float, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The UNet adapter's weights under kohya names, in `dtype`, with every `.alpha` = the real alpha."""
    peft_sd = get_peft_model_state_dict(unet)
    prefixed = {f"unet.{k}": v for k, v in peft_sd.items()}
    kohya = convert_state_dict_to_kohya(prefixed)
    out: dict[str, torch.Tensor] = {}
    for key, value in kohya.items():
        if key.endswith(".alpha"):
            out[key] = torch.tensor(alpha, dtype=dtype)  # the trap: the converter wrote the rank here
        else:
            out[key] = value.detach().to("cpu", dtype).contiguous()
    return out


def _hash_after_header(data: bytes) -> str:
    n = int.from_bytes(data[:8], "little")
    return hashlib.sha256(data[8 + n :]).hexdigest()


def _legacy_hash(data: bytes) -> str:
    return hashlib.sha256(data[0x100000 : 0x100000 + 0x10000]).hexdigest()[:8]


def safetensors_hashes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> tuple[str, str]:
    """(sshs_model_hash, sshs_legacy_hash) as sd-webui-additional-networks computes them, and as sd-scripts
    precalculates them: the file is serialized in memory with only the `ss_*` metadata (the training facts,
    which never change; user-editable fields would change the hash). The model hash is the sha256 of the
    bytes after the header (the tensor data); the legacy hash the first 8 hex digits of the sha256 of the
    64 KiB at offset 1 MiB (empty for a small file, as there).
    """
    ss_only = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    data = safetensors.torch.save(dict(tensors), ss_only)
    return _hash_after_header(data), _legacy_hash(data)


def _optimizer_name(cfg: TrainingConfig) -> str:
    """sd-scripts' form: the class path and its non-default arguments."""
    opt = cfg.optimizer
    args = {"weight_decay": opt.weight_decay, "betas": tuple(opt.betas), "eps": opt.eps, **opt.args}
    return "torch.optim.adamw.AdamW(" + ",".join(f"{k}={v}" for k, v in args.items()) + ")"


def build_metadata(
    cfg: TrainingConfig,
    *,
    step: int,
    num_train_images: int,
    tag_frequency: dict[str, dict[str, int]],
    started_at: float,
    mixed_precision: str,
    prediction_type: str,
    epoch: int,
    num_epochs: int,
) -> dict[str, str]:
    """sd-scripts' LoRA metadata for an SD1.5 UNet LoRA: every value a string (safetensors requires it)."""
    now = dt.datetime.now().timestamp()
    res = cfg.dataset.resolution
    meta: dict[str, Any] = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": cfg.network.dim,
        "ss_network_alpha": cfg.network.alpha,
        "ss_network_dropout": cfg.network.dropout,
        "ss_network_train_unet_only": True,
        "ss_network_train_text_encoder_only": False,
        "ss_base_model_version": "sd_v1",
        "ss_v2": False,
        "ss_output_name": cfg.saving.output_name,
        "ss_training_started_at": started_at,
        "ss_training_finished_at": now,
        "ss_steps": step,
        "ss_epoch": epoch,
        "ss_num_epochs": num_epochs,
        "ss_max_train_steps": cfg.training.max_steps,
        "ss_learning_rate": cfg.optimizer.learning_rate,
        "ss_unet_lr": cfg.optimizer.learning_rate,
        "ss_lr_scheduler": cfg.scheduler.type.value,
        "ss_lr_warmup_steps": cfg.scheduler.warmup_steps,
        "ss_optimizer": _optimizer_name(cfg),
        "ss_max_grad_norm": cfg.optimizer.max_grad_norm,
        "ss_resolution": f"({res}, {res})",
        "ss_batch_size_per_device": cfg.training.batch_size,
        "ss_gradient_accumulation_steps": cfg.training.gradient_accumulation_steps,
        "ss_gradient_checkpointing": cfg.training.gradient_checkpointing,
        "ss_seed": cfg.training.seed,
        "ss_num_train_images": num_train_images,
        "ss_mixed_precision": mixed_precision,
        "ss_noise_offset": cfg.training.noise_offset,
        "ss_caption_extension": cfg.dataset.caption_extension,
        "ss_shuffle_caption": cfg.dataset.shuffle_caption,
        "ss_keep_tokens": cfg.dataset.keep_tokens,
        "ss_flip_aug": cfg.dataset.flip_aug,
        "ss_random_crop": cfg.dataset.random_crop,
        "ss_tag_frequency": json.dumps(tag_frequency),
        "ss_sd_model_name": Path(cfg.model.pretrained).name,
        "ss_training_comment": cfg.saving.description,
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": "stable-diffusion-v1/lora",
        "modelspec.implementation": "diffusers",
        "modelspec.title": cfg.saving.title or cfg.saving.output_name,
        "modelspec.author": cfg.saving.author,
        "modelspec.description": cfg.saving.description,
        "modelspec.resolution": f"{res}x{res}",
        "modelspec.date": dt.datetime.fromtimestamp(now).isoformat(timespec="seconds"),
        "modelspec.prediction_type": "v" if prediction_type == "v_prediction" else "epsilon",
    }
    return {k: str(v) for k, v in meta.items() if v is not None}


def save_lora(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """Write tensors + metadata (+ sshs hashes) atomically: a temp file in the same folder, then rename,
    so a reader (or a crash) never sees half a LoRA under the final name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model_hash, legacy_hash = safetensors_hashes(tensors, metadata)
    metadata = {**metadata, "sshs_model_hash": model_hash, "sshs_legacy_hash": legacy_hash}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    data = safetensors.torch.save(tensors, metadata)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def read_metadata(path: Path) -> dict[str, str]:
    """A LoRA file's metadata without loading its tensors."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.load(io.BytesIO(f.read(n)))
    return dict(header.get("__metadata__", {}))
