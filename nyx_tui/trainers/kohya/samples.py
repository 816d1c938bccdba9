"""Sample configs that cover the kohya export's branches: every family × network kind × optimizer, with a few
sets of extra settings (epochs, buckets, prompts, schedules, validation, flow options).

Shared by the export tests (`tests/test_kohya_export.py`, which check the keys against reference data) and
the opt-in check against sd-scripts' real parser (`bench/kohya_parser_check.py`), so both look at the same
configs. Torch-free.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from nyx_tui.config.fields import Family
from nyx_tui.config.model import NetworkKind, OptimizerKind, TrainingConfig

KINDS: list[NetworkKind] = list(NetworkKind)
OPTIMIZERS: list[OptimizerKind] = list(OptimizerKind)

EXTRAS: list[dict[str, dict[str, Any]]] = [
    {},
    {
        "training": {"max_steps": 0, "max_epochs": 3, "cache_latents": True, "gradient_checkpointing": True},
        "network": {"dropout": 0.1, "rank_dropout": 0.1, "module_dropout": 0.05, "text_encoder_lr": 5e-5},
        "dataset": {"enable_bucket": True, "shuffle_caption": True, "keep_tokens": 1, "caption_dropout_rate": 0.05},
        "sampling": {"prompts": ["a photo of mychar", "mychar --w 768 --h 512 --d 7"], "every_n_steps": 100},
        "saving": {"every_n_epochs": 1, "keep_last_n": 3},
        "scheduler": {"type": "cosine_with_restarts", "num_cycles": 2},
    },
    {
        "training": {"mixed_precision": "bf16", "seed": 0, "masked_loss": True},
        "scheduler": {"type": "cosine", "warmup_steps": 10, "min_lr_ratio": 0.1},
        "dataset": {"max_token_length": 225, "validation_split": 0.1, "num_workers": 2},
        "saving": {"every_n_steps": 50, "keep_last_n": 2, "output_dir": "/out"},
        "optimizer": {"betas": [0.9, 0.99], "max_grad_norm": 0.0},
    },
    {
        # REX: only the custom backend has it (refused on official sd-scripts)
        "scheduler": {"type": "rex", "warmup_steps": 10, "min_lr_ratio": 0.05},
        "training": {"max_steps": 200, "gradient_accumulation_steps": 2},
        "network": {"train_text_encoder": True, "text_encoder_lr": 1e-5},
    },
]
"""Extra settings on top of the family/kind/optimizer (index 0: none). The last index of `matrix()` (one past
these) means the family's flow options (`FLOW_EXTRAS`), or an LyCORIS config without convolutions."""

FLOW_EXTRAS: dict[str, dict[str, Any]] = {
    "flux": {
        "flow": {
            "timestep_sampling": "shift",
            "discrete_flow_shift": 3.1,
            "train_blocks": "single",
            "split_qkv": True,
            "blocks_to_swap": 8,
            "double_block_indices": [0, 1],
            "block_type_dims": {"img_attn": 8, "single": 4},
            "guidance_scale": 3.5,
            "apply_t5_attn_mask": True,
            "t5_max_token_length": 256,
        },
        "training": {"base_quantization": "fp8", "cache_text_encoder_outputs_to_disk": True},
    },
    "sd3": {
        "flow": {
            "weighting_scheme": "logit_normal",
            "training_shift": 3.0,
            "t5_on_cpu": True,
            "double_block_indices": [2],
        },
        "training": {"cache_text_encoder_outputs": True, "gradient_checkpointing": True},
    },
}

EXTRA_OPTIMIZER_ARGS: dict[OptimizerKind, dict[str, Any]] = {
    OptimizerKind.PRODIGY: {"d_coef": 2, "safeguard_warmup": True},
    OptimizerKind.ADAFACTOR: {"clip_threshold": 1.0},
    OptimizerKind.ADAMW: {"amsgrad": True},
}
"""`optimizer.args` that the optimizer really takes, passed through in the third extra (index 2)."""

LORA_MODULE_ONLY_FLOW = frozenset(
    {"train_blocks", "split_qkv", "double_block_indices", "single_block_indices", "block_type_dims"}
)
"""Flow options that only sd-scripts' Flux/SD3 LoRA modules read (the export refuses them with LyCORIS)."""

UNET_EXTRA: dict[str, dict[str, Any]] = {
    "network": {"conv_dim": 0, "dim": 8, "alpha": 4},
    "scheduler": {"type": "polynomial", "power": 2.0, "warmup_steps": 5},
    "training": {"noise_offset": 0.05, "min_snr_gamma": 5},
}
"""The last extra for the UNet families: no convolutions (conv_dim = 0), a polynomial schedule."""


def make(family: str = "sd15", image_dir: str = "/data/10_mychar", **sections: dict[str, Any]) -> TrainingConfig:
    """A config of `family` on one image folder, with `sections` merged over it (Flux gets its three files)."""
    data: dict[str, Any] = {
        "model": {"family": family, "pretrained": "base.safetensors"},
        "dataset": {"subsets": [{"image_dir": image_dir}]},
    }
    if family == "flux":
        data["model"].update(clip_l="clip_l.safetensors", t5xxl="t5xxl.safetensors", vae="ae.safetensors")
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return TrainingConfig.model_validate(data)


@dataclass(frozen=True)
class Sample:
    """One generated config and what it is made of."""

    name: str
    family: str
    kind: NetworkKind
    optimizer: OptimizerKind
    extra: int
    config: TrainingConfig


def matrix_keys() -> list[tuple[str, NetworkKind, OptimizerKind, int]]:
    return list(itertools.product([f.value for f in Family], KINDS, OPTIMIZERS, range(len(EXTRAS) + 1)))


def sections_for(family: str, kind: NetworkKind, opt: OptimizerKind, extra: int) -> dict[str, dict[str, Any]]:
    sections: dict[str, dict[str, Any]] = {"network": {"kind": kind.value}, "optimizer": {"type": opt.value}}
    if opt is OptimizerKind.CUSTOM:
        sections["optimizer"]["class_path"] = "pytorch_optimizer.CAME"
    if extra < len(EXTRAS):
        for name, values in EXTRAS[extra].items():
            sections.setdefault(name, {}).update(values)
        if extra == 2 and opt in EXTRA_OPTIMIZER_ARGS:
            sections["optimizer"]["args"] = dict(EXTRA_OPTIMIZER_ARGS[opt])
    elif family in FLOW_EXTRAS:
        for name, values in FLOW_EXTRAS[family].items():
            sections.setdefault(name, {}).update(values)
        if kind is not NetworkKind.LORA:  # options of sd-scripts' own LoRA modules: refused with LyCORIS
            sections["flow"] = {k: v for k, v in sections["flow"].items() if k not in LORA_MODULE_ONLY_FLOW}
    else:
        for name, values in UNET_EXTRA.items():
            sections.setdefault(name, {}).update(values)
    if opt is OptimizerKind.ADAMW_SCHEDULEFREE:
        sections["scheduler"] = {"type": "constant"}  # schedule-free runs take no schedule
    return sections


def matrix(image_dir: str = "/data/10_mychar") -> Iterator[Sample]:
    """Every family × network kind × optimizer × extra (see `EXTRAS`)."""
    for family, kind, opt, extra in matrix_keys():
        cfg = make(family, image_dir, **sections_for(family, kind, opt, extra))
        yield Sample(f"{family}-{kind.value}-{opt.value}-x{extra}", family, kind, opt, extra, cfg)
