"""Saving the trained UNet LoRA as a kohya-format file that A1111, ComfyUI, Forge and diffusers load.

Keys are sd-scripts' (`lora_unet_<module path with _>.lora_down.weight` / `.lora_up.weight` / `.alpha`):
`to_kohya_keys` names them per family — diffusers module paths and `lora_te_` for SD1.5/SD2, SGM paths
(`lora_unet_input_blocks_4_1_…`, see `kohya_names`) and `lora_te1_`/`lora_te2_` for SDXL. Every `.alpha` is
the real network alpha (diffusers' `convert_state_dict_to_kohya` writes the rank there, which would scale the
loaded LoRA wrongly: NOTES, "LoRA files the ecosystem loads"). The metadata is what sd-scripts writes
(`ss_*`, `modelspec.*`, `sshs_*` hashes) so LoRA browsers and the webui's extra-networks panel show the run.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from nyx_tui.config.fields import FLOW_FAMILIES, Family
from nyx_tui.config.model import TrainingConfig
from nyx_tui.families import base_model_version, modelspec_architecture
from nyx_tui.trainers.native.kohya_names import SDXL_LAYOUT, UNetLayout, sgm_path
from nyx_tui.trainers.native.loss_check import loss_metadata

SAVE_DTYPES: dict[str, torch.dtype] = {"float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SGM_IMPLEMENTATION = "https://github.com/Stability-AI/generative-models"  # sd-scripts' for SDXL and SD3 LoRAs
FLUX_IMPLEMENTATION = "https://github.com/black-forest-labs/flux"  # sd-scripts' for Flux LoRAs
# sd-scripts' network module of a LoRA per flow family (its lora_flux.py / lora_sd3.py)
FLOW_NETWORK_MODULES = {Family.FLUX: "networks.lora_flux", Family.SD3: "networks.lora_sd3"}


# peft's key parts → kohya's suffixes
_PEFT_SUFFIXES = {"lora_A": "lora_down.weight", "lora_B": "lora_up.weight", "lora_magnitude_vector": "dora_scale"}
_PEFT_KEY = re.compile(
    r"^(?:base_model\.model\.)?(unet|text_encoder_2|text_encoder)\.(.+?)"
    r"\.(lora_A|lora_B|lora_magnitude_vector|alpha)(?:\.[^.]+)*$"
)


def _kohya_name(key: str, family: Family) -> tuple[str, str]:
    """(kohya module name, suffix) of a key in kohya form (passed through) or in peft/diffusers form with a
    `unet.` / `text_encoder.` / `text_encoder_2.` prefix (`unet.down_blocks.0….to_q.lora_A.weight`)."""
    if key.startswith("lora_"):
        name, _, suffix = key.partition(".")
        return name, suffix
    m = _PEFT_KEY.match(key)
    if m is None:
        raise ValueError(f"{key!r} is neither a kohya key (lora_unet_…, lora_te…) nor a prefixed peft key (unet.…)")
    root, path, part = m.groups()
    suffix = _PEFT_SUFFIXES.get(part, part)
    if root == "unet":
        return "lora_unet_" + path.replace(".", "_"), suffix
    if not path.startswith("text_model."):  # transformers 5 dropped this level; the files keep it
        path = f"text_model.{path}"
    prefix = "lora_te2" if root == "text_encoder_2" else ("lora_te1" if family == Family.SDXL else "lora_te")
    return f"{prefix}_{path.replace('.', '_')}", suffix


def to_kohya_keys(
    family: Family | str, state_dict: Mapping[str, torch.Tensor], unet_config: Mapping[str, Any] | None = None
) -> dict[str, torch.Tensor]:
    """A LoRA state dict under the names sd-scripts writes for `family`. Keys may come in kohya form with
    diffusers module paths (`lora_unet_down_blocks_…`, `lora_te1_…`) or in peft form with the model part as
    prefix (`unet.…lora_A.weight`, `text_encoder.…`, `text_encoder_2.…`; alphas are not in peft's dict, add
    them). SD1.5/SD2 keep diffusers' module paths and `lora_te_`; SDXL's UNet modules get SGM names
    (`lora_unet_input_blocks_4_1_…`, `kohya_names`) and its encoders `lora_te1_`/`lora_te2_`. The SGM
    numbering follows `unet_config` (the UNet's config; default: SDXL's layout). Values are neither copied
    nor reshaped (peft's DoRA magnitude needs kohya's layout from the caller)."""
    family = Family(family)
    layout = UNetLayout.from_config(unet_config) if unet_config is not None else SDXL_LAYOUT
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        name, suffix = _kohya_name(key, family)
        if family == Family.SDXL and name.startswith("lora_unet_"):
            name = "lora_unet_" + sgm_path(name.removeprefix("lora_unet_"), layout, sep="_")
        out[f"{name}.{suffix}"] = value
    return out


def kohya_state_dict(
    unet: torch.nn.Module, alpha: float, dtype: torch.dtype, family: Family | str = Family.SD15
) -> dict[str, torch.Tensor]:
    """A peft UNet adapter's weights under kohya names (`to_kohya_keys`), in `dtype`, with every module's
    `.alpha` = the real alpha (diffusers' own converter writes the rank there: the trap in NOTES)."""
    from peft.utils import get_peft_model_state_dict  # here: peft pulls in bitsandbytes, which hashing never needs

    peft_sd = get_peft_model_state_dict(unet)
    config = getattr(unet, "config", None)
    kohya = to_kohya_keys(family, {f"unet.{k}": v for k, v in peft_sd.items()}, config)
    out = {key: value.detach().to("cpu", dtype).contiguous() for key, value in kohya.items()}
    for module in {key.partition(".")[0] for key in kohya}:
        out[f"{module}.alpha"] = torch.tensor(alpha, dtype=dtype)
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
    """sd-scripts' form: the class path and its arguments (torch-free, from the optimizer module's table)."""
    from nyx_tui.trainers.native.optim import metadata_name

    return metadata_name(cfg.optimizer)


def _numbers(values: list[int] | list[float]) -> str:
    return ",".join(f"{v:g}" for v in values)


def network_module_args(cfg: TrainingConfig) -> tuple[str, dict[str, str]]:
    """sd-scripts' `network_module` and `network_args` (strings, as its command line takes them) that describe
    the trained network: `networks.lora` for LoRA (with conv_dim for LoRA on convolutions, block-wise lists),
    `lycoris.kohya` with its `algo` for LoCon/LoHa/LoKr, and for DoRA (LyCORIS' `algo=lora` + `dora_wd`, the
    form whose `dora_scale` layout the file has)."""
    net = cfg.network
    kind = net.kind.value
    args: dict[str, str] = {}
    lycoris = kind != "lora"
    family = cfg.model.family
    if family in FLOW_FAMILIES:
        args.update(flow_network_args(cfg))
        if not lycoris:
            return FLOW_NETWORK_MODULES[family], args
    if lycoris:
        args["algo"] = "lora" if kind == "dora" else kind
        if kind == "dora":
            args["dora_wd"] = "True"
            args["wd_on_output"] = "True"
    conv_dim = net.conv_dim if net.conv_dim is not None else (net.dim if kind in ("locon", "loha", "lokr") else 0)
    if family in FLOW_FAMILIES:  # the transformers have no convolutions to adapt
        conv_dim = 0
    if conv_dim or (net.conv_block_dims is not None and family not in FLOW_FAMILIES):
        args["conv_dim"] = str(conv_dim)
        args["conv_alpha"] = f"{net.conv_alpha if net.conv_alpha is not None else net.alpha:g}"
    if lycoris:
        args["dropout"] = f"{net.dropout:g}"
    for name in ("rank_dropout", "module_dropout"):
        if getattr(net, name):
            args[name] = f"{getattr(net, name):g}"
    if kind == "lokr" and net.lokr_factor is not None:
        args["factor"] = str(net.lokr_factor)
    for name in ("block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas"):
        if getattr(net, name) is not None:
            args[name] = _numbers(getattr(net, name))
    weights = net.block_lr_weights
    if weights is not None:  # sd-scripts' three lists (sdxl: its first and last blocks stay at 1)
        n, mid = (12, 1) if len(weights) == 25 else (9, 3)
        start = 0 if len(weights) == 25 else 1
        args["down_lr_weight"] = _numbers(weights[start : start + n])
        args["mid_lr_weight"] = _numbers(weights[start + n : start + n + mid])
        args["up_lr_weight"] = _numbers(weights[start + n + mid : start + 2 * n + mid])
    return ("lycoris.kohya" if lycoris else "networks.lora"), args


def flow_network_args(cfg: TrainingConfig) -> dict[str, str]:
    """sd-scripts' network_args for the Flux/SD3 block settings, in its spelling: Flux `train_blocks`,
    `split_qkv`, `<type>_dim` per `flow.block_type_dims` entry, `train_double_block_indices` /
    `train_single_block_indices`; SD3 `split_qkv` and `train_block_indices` (its joint blocks)."""
    flow = cfg.flow
    args: dict[str, str] = {}
    if cfg.model.family == Family.FLUX:
        args["train_blocks"] = flow.train_blocks.value
        for key, dim in (flow.block_type_dims or {}).items():
            args[f"{key}_dim"] = str(dim)
        if flow.double_block_indices is not None:
            args["train_double_block_indices"] = ",".join(map(str, flow.double_block_indices)) or "none"
        if flow.single_block_indices is not None:
            args["train_single_block_indices"] = ",".join(map(str, flow.single_block_indices)) or "none"
    elif flow.double_block_indices is not None:
        args["train_block_indices"] = ",".join(map(str, flow.double_block_indices)) or "none"
    args["split_qkv"] = str(flow.split_qkv)
    return args


def flow_metadata(cfg: TrainingConfig, model_type: str | None) -> dict[str, Any]:
    """What sd-scripts' Flux and SD3 trainers write on top of the common metadata (their `update_metadata`,
    `get_sai_model_spec`): the base model version (`flux1`; SD3's model type `medium`, `5-large`,
    `5-medium`), the architecture (`flux-1-dev/lora`, `flux-1-schnell/lora`, `stable-diffusion-3-medium/lora`,
    …), the implementation, and the flow-matching settings. Flux files carry no prediction type (sd-scripts
    leaves it out); SD3 ones say `epsilon`, as sd-scripts writes them."""
    flow, family = cfg.flow, cfg.model.family
    meta: dict[str, Any] = {
        "ss_weighting_scheme": flow.weighting_scheme.value,
        "ss_logit_mean": flow.logit_mean,
        "ss_logit_std": flow.logit_std,
        "ss_mode_scale": flow.mode_scale,
        "ss_apply_t5_attn_mask": flow.apply_t5_attn_mask,
        "ss_timestep_sampling": flow.timestep_sampling.value,
        "ss_sigmoid_scale": flow.sigmoid_scale,
        "ss_discrete_flow_shift": flow.discrete_flow_shift,
        "ss_v2": None,
        "ss_v_parameterization": None,
    }
    if family == Family.FLUX:
        variant = model_type if model_type in ("dev", "schnell") else None
        meta |= {
            "ss_base_model_version": "flux1",
            "ss_model_type": "flux",
            "ss_model_prediction_type": flow.model_prediction_type.value,
            "ss_guidance_scale": flow.guidance_scale,
            "modelspec.architecture": f"flux-1-{variant}/lora" if variant else "flux-1/lora",
            "modelspec.implementation": FLUX_IMPLEMENTATION,
            "modelspec.prediction_type": None,
        }
    else:
        sd3_type = model_type or "medium"
        meta |= {
            "ss_base_model_version": sd3_type,
            "ss_apply_lg_attn_mask": flow.apply_lg_attn_mask,
            "modelspec.architecture": f"stable-diffusion-3-{sd3_type}/lora",
            "modelspec.implementation": SGM_IMPLEMENTATION,
            "modelspec.prediction_type": "epsilon",
        }
    return meta


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
    max_train_steps: int | None = None,
    model_type: str | None = None,
) -> dict[str, str]:
    """sd-scripts' LoRA metadata for the family's LoRA: every value a string (safetensors requires it). SD2 sets
    `ss_v2` and, with v-prediction, `ss_v_parameterization` (which sd-scripts takes as an argument but does
    not write: some readers look for it; the base model version `sd_v2_v` says it too); SDXL LoRAs name
    Stability's generative-models as their implementation, as sd-scripts' do. Flux/SD3 add `flow_metadata`,
    for which `model_type` names the loaded model (`flow_names.model_type`: dev, schnell; medium, 5-large,
    5-medium)."""
    now = dt.datetime.now().timestamp()
    res = cfg.dataset.resolution
    module, network_args = network_module_args(cfg)
    meta: dict[str, Any] = {
        "ss_network_module": module,
        "ss_network_args": json.dumps(network_args) if network_args else None,
        "ss_network_dim": cfg.network.dim,
        "ss_network_alpha": cfg.network.alpha,
        "ss_network_dropout": cfg.network.dropout,
        "ss_network_train_unet_only": not cfg.network.train_text_encoder,
        "ss_network_train_text_encoder_only": not cfg.network.train_unet,
        "ss_text_encoder_lr": (cfg.network.text_encoder_lr or cfg.optimizer.learning_rate)
        if cfg.network.train_text_encoder
        else None,
        "ss_base_model_version": base_model_version(cfg.model.family, prediction_type),
        "ss_v2": cfg.model.family == Family.SD2,
        "ss_v_parameterization": prediction_type == "v_prediction",
        "ss_max_token_length": cfg.dataset.max_token_length if cfg.dataset.max_token_length != 75 else None,
        "ss_output_name": cfg.saving.output_name,
        "ss_training_started_at": started_at,
        "ss_training_finished_at": now,
        "ss_steps": step,
        "ss_epoch": epoch,
        "ss_num_epochs": num_epochs,
        "ss_max_train_steps": max_train_steps or cfg.training.max_steps,  # the run's steps (epochs decide too)
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
        **loss_metadata(cfg.training),  # the other noise and loss options, under sd-scripts' keys
        "ss_caption_extension": cfg.dataset.caption_extension,
        "ss_shuffle_caption": cfg.dataset.shuffle_caption,
        "ss_keep_tokens": cfg.dataset.keep_tokens,
        "ss_flip_aug": cfg.dataset.flip_aug,
        "ss_random_crop": cfg.dataset.random_crop,
        "ss_tag_frequency": json.dumps(tag_frequency),
        "ss_sd_model_name": Path(cfg.model.pretrained).name,
        "ss_training_comment": cfg.saving.description,
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": modelspec_architecture(cfg.model.family, prediction_type),
        "modelspec.implementation": SGM_IMPLEMENTATION if cfg.model.family == Family.SDXL else "diffusers",
        "modelspec.title": cfg.saving.title or cfg.saving.output_name,
        "modelspec.author": cfg.saving.author,
        "modelspec.description": cfg.saving.description,
        "modelspec.resolution": f"{res}x{res}",
        "modelspec.date": dt.datetime.fromtimestamp(now).isoformat(timespec="seconds"),
        "modelspec.prediction_type": "v" if prediction_type == "v_prediction" else "epsilon",
    }
    if cfg.model.family in FLOW_FAMILIES:
        meta |= flow_metadata(cfg, model_type)
    return {k: str(v) for k, v in meta.items() if v is not None}


def save_lora(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """Write tensors + metadata (+ sshs hashes) atomically: a temp file in the same folder, then rename,
    so a reader (or a crash) never sees half a LoRA under the final name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = _unshared(tensors)
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


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each tensor with memory of its own. Keys may share one parameter (a Flux q/k/v's shared down matrix
    under its three diffusers names; fp32 saves where `.to` returns the parameter itself), and safetensors
    refuses shared storage rather than write it twice."""
    seen: set[int] = set()
    out: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        ptr = value.untyped_storage().data_ptr()
        out[key] = value.clone() if ptr in seen else value
        seen.add(ptr)
    return out


def read_metadata(path: Path) -> dict[str, str]:
    """A LoRA file's metadata without loading its tensors."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.load(io.BytesIO(f.read(n)))
    return dict(header.get("__metadata__", {}))
