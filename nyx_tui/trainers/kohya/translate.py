"""`TrainingConfig` → kohya sd-scripts' `--config_file` TOML and `--dataset_config` TOML (export).

sd-scripts reads its config TOML without mercy: sections are flattened, unknown keys are silently ignored and
values are not converted, so a key in the wrong place or of the wrong type changes nothing and says nothing.
This module therefore emits a key only when it is an argument of the chosen script in the reference
(`../shared/reference/sd-scripts-args.json`, copied into `ARGS` below as the set of names per script, and
checked by the tests against the full reference), with the JSON type sd-scripts expects. Network options go
only inside `network_args`; whatever sd-scripts has no option for is refused as a `Problem` naming the field
and the fix — never dropped.

The mapping is driven by the `param(..., kohya=...)` metadata of `TrainingConfig` (`iter_params`), so one
declaration per parameter stays true; the tables here only convert values (Nyx's enums → sd-scripts'
strings). They are module-level dicts so the import direction (`importer.py`) can invert them.

Torch-free: the CLI and the TUI import this to export or preview a config.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from nyx_tui.config.errors import Problem
from nyx_tui.config.fields import Family, Param, iter_params
from nyx_tui.config.io import looks_like_repo_id
from nyx_tui.config.model import (
    UNET_BLOCK_COUNTS,
    BackendKind,
    BaseQuantization,
    LoraFormat,
    NetworkKind,
    OptimizerKind,
    SchedulerKind,
    TrainingConfig,
)

# ------------------------------------------------------------------------------------------- value tables

SCRIPTS: dict[Family, str] = {
    Family.SD15: "train_network.py",
    Family.SD2: "train_network.py",
    Family.SDXL: "sdxl_train_network.py",
    Family.FLUX: "flux_train_network.py",
    Family.SD3: "sd3_train_network.py",
}
"""The training script per family (sd-scripts has one LoRA script per model architecture)."""

NETWORK_MODULES: dict[Family, str] = {
    Family.SD15: "networks.lora",
    Family.SD2: "networks.lora",
    Family.SDXL: "networks.lora",  # sd-scripts' lora.py handles SDXL's UNet and both text encoders
    Family.FLUX: "networks.lora_flux",
    Family.SD3: "networks.lora_sd3",
}
"""`network_module` for `network.kind = "lora"`: sd-scripts' own LoRA module of the family."""

LYCORIS_MODULE = "lycoris.kohya"
"""`network_module` of every LyCORIS kind; the kind itself is its `algo` network arg."""

LYCORIS_ALGOS: dict[NetworkKind, str] = {
    NetworkKind.LOCON: "locon",
    NetworkKind.LOHA: "loha",
    NetworkKind.LOKR: "lokr",
    NetworkKind.DORA: "lora",  # DoRA is LyCORIS' lora algo with weight decomposition (dora_wd=True)
}
"""`algo=` network arg per LyCORIS kind (`lycoris.kohya`)."""

DORA_ARGS: tuple[str, ...] = ("dora_wd=True",)
"""Extra network args that make LyCORIS' `lora` algo a DoRA."""

LYCORIS_NO_CONV_PRESET = "full-lin"
"""LyCORIS' `preset` for its default modules without the 3x3 convolutions. `lycoris.kohya` reads
`conv_dim = int(kwargs.get("conv_dim", dim) or dim)`: an absent or 0 conv_dim means convolutions at rank `dim`
(its "full" preset enables them), so "no convolutions" (Nyx's conv_dim = 0, and DoRA's empty) is this preset."""

OPTIMIZERS: dict[OptimizerKind, str] = {
    OptimizerKind.ADAMW: "AdamW",
    OptimizerKind.ADAMW8BIT: "AdamW8bit",
    OptimizerKind.LION: "Lion",
    OptimizerKind.LION8BIT: "Lion8bit",
    OptimizerKind.PRODIGY: "Prodigy",
    OptimizerKind.ADAFACTOR: "Adafactor",
    OptimizerKind.ADAMW_SCHEDULEFREE: "AdamWScheduleFree",
}
"""`optimizer_type` names official sd-scripts knows itself."""

CUSTOM_OPTIMIZERS: dict[OptimizerKind, str] = {
    OptimizerKind.CAME: "pytorch_optimizer.CAME",
}
"""Optimizers only the custom backend (Derrian's setup: `pytorch_optimizer` installed) has, as dotted paths."""

OPTIMIZER_ARG_DEFAULTS: dict[OptimizerKind, dict[str, Any]] = {
    # Nyx's Adafactor is the "fixed learning rate" one kohya users configure by hand
    OptimizerKind.ADAFACTOR: {"relative_step": False, "scale_parameter": False, "warmup_init": False},
}
"""`optimizer_args` Nyx always passes for a kind (its native engine does the same), before `optimizer.args`."""

OPTIMIZER_SECTION_KEYS: dict[OptimizerKind, tuple[str, ...]] = {
    OptimizerKind.ADAMW: ("weight_decay", "betas", "eps"),
    OptimizerKind.ADAMW8BIT: ("weight_decay", "betas", "eps"),
    OptimizerKind.PRODIGY: ("weight_decay", "betas", "eps"),
    OptimizerKind.ADAMW_SCHEDULEFREE: ("weight_decay", "betas", "eps"),
    OptimizerKind.LION: ("weight_decay", "betas"),  # betas only when changed (Lion's own are 0.9, 0.99)
    OptimizerKind.LION8BIT: ("weight_decay", "betas"),
    OptimizerKind.CAME: ("weight_decay",),
    OptimizerKind.ADAFACTOR: ("weight_decay",),
}
"""`optimizer.*` fields that become `optimizer_args` per kind, as Nyx's native engine passes them."""

SCHEDULERS: dict[SchedulerKind, str] = {
    SchedulerKind.CONSTANT: "constant",
    SchedulerKind.CONSTANT_WITH_WARMUP: "constant_with_warmup",
    SchedulerKind.LINEAR: "linear",
    SchedulerKind.COSINE: "cosine",
    SchedulerKind.COSINE_WITH_RESTARTS: "cosine_with_restarts",
    SchedulerKind.POLYNOMIAL: "polynomial",
}
"""`lr_scheduler` names (transformers' schedules, which sd-scripts uses)."""

COSINE_WITH_MIN_LR = "cosine_with_min_lr"
"""sd-scripts' cosine that ends at `lr_scheduler_min_lr_ratio` × lr: Nyx's cosine with a min_lr_ratio."""

CUSTOM_SCHEDULERS: dict[SchedulerKind, str] = {
    SchedulerKind.REX: "nyx_tui.trainers.kohya.schedulers.RexLR",
}
"""Schedules only the custom backend has, as `lr_scheduler_type` dotted paths. sd-scripts builds such a class
with the optimizer and `lr_scheduler_args` only (no step counts, and it refuses `lr_warmup_steps` beside it),
so the export passes `total_steps`, `warmup_steps` and `min_lr_ratio` in `lr_scheduler_args`."""

FP8_BASE: dict[BaseQuantization, bool] = {BaseQuantization.NONE: False, BaseQuantization.FP8: True}
"""`training.base_quantization` → `fp8_base`; int8 and nf4 have no sd-scripts equivalent."""

T5XXL_DEVICE: dict[bool, str | None] = {True: "cpu", False: None}
"""`flow.t5_on_cpu` → `t5xxl_device` (SD3's script only)."""

FLUX_TYPE_DIM_ARGS: dict[str, str] = {
    name: f"{name}_dim"
    for name in ("img_attn", "txt_attn", "img_mlp", "txt_mlp", "img_mod", "txt_mod", "single", "single_mod")
}
"""`flow.block_type_dims` keys → lora_flux's `<type>_dim` network args."""

DOUBLE_BLOCK_INDEX_ARGS: dict[Family, str] = {
    Family.FLUX: "train_double_block_indices",
    Family.SD3: "train_block_indices",  # lora_sd3 has one kind of block: the joint ones
}
"""`flow.double_block_indices` → the network arg of the family's LoRA module."""

LORA_MODULE_ONLY_ARGS: frozenset[str] = frozenset(
    {
        "train_blocks",
        "split_qkv",
        "train_double_block_indices",
        "train_single_block_indices",
        "train_block_indices",
        *FLUX_TYPE_DIM_ARGS.values(),
    }
)
"""Network args only `networks.lora_flux` / `networks.lora_sd3` read (LyCORIS ignores them without a word)."""

MAX_TOKEN_LENGTH: dict[int, int | None] = {75: None, 150: 150, 225: 225}
"""`dataset.max_token_length` → sd-scripts' `max_token_length` (its choices: None = 75, 150, 225)."""

PROMPTS_FILE = "prompts.txt"
"""Name of the sample prompts file; `config["sample_prompts"]` holds it until `write_export` makes it a path."""

# The destination names of each script's arguments in sd-scripts @ 48d368fa (from the reference JSON);
# the shared part plus each script's extras. The test compares these with the reference file.
_COMMON_ARGS = frozenset(
    [
        "adaptive_noise_scale",
        "bucket_no_upscale",
        "bucket_reso_steps",
        "cache_latents",
        "cache_latents_to_disk",
        "caption_dropout_every_n_epochs",
        "caption_dropout_rate",
        "caption_extension",
        "caption_tag_dropout_rate",
        "color_aug",
        "cpu_offload_checkpointing",
        "debiased_estimation_loss",
        "enable_bucket",
        "flip_aug",
        "fp8_base",
        "full_bf16",
        "gradient_accumulation_steps",
        "gradient_checkpointing",
        "huber_c",
        "huber_scale",
        "huber_schedule",
        "ip_noise_gamma",
        "ip_noise_gamma_random_strength",
        "keep_tokens",
        "learning_rate",
        "loss_type",
        "lr_scheduler",
        "lr_scheduler_args",
        "lr_scheduler_min_lr_ratio",
        "lr_scheduler_num_cycles",
        "lr_scheduler_power",
        "lr_scheduler_type",
        "lr_warmup_steps",
        "masked_loss",
        "max_bucket_reso",
        "max_data_loader_n_workers",
        "max_grad_norm",
        "max_timestep",
        "max_token_length",
        "max_train_epochs",
        "max_train_steps",
        "metadata_author",
        "metadata_description",
        "metadata_title",
        "min_bucket_reso",
        "min_snr_gamma",
        "min_timestep",
        "mixed_precision",
        "multires_noise_discount",
        "multires_noise_iterations",
        "network_alpha",
        "network_args",
        "network_dim",
        "network_dropout",
        "network_module",
        "network_train_text_encoder_only",
        "network_train_unet_only",
        "network_weights",
        "noise_offset",
        "noise_offset_random_strength",
        "optimizer_args",
        "optimizer_type",
        "output_dir",
        "output_name",
        "pretrained_model_name_or_path",
        "prior_loss_weight",
        "random_crop",
        "reg_data_dir",
        "resolution",
        "resume",
        "sample_at_first",
        "sample_every_n_epochs",
        "sample_every_n_steps",
        "sample_prompts",
        "sample_sampler",
        "save_every_n_epochs",
        "save_every_n_steps",
        "save_last_n_epochs",
        "save_last_n_epochs_state",
        "save_last_n_steps",
        "save_last_n_steps_state",
        "save_precision",
        "save_state",
        "sdpa",
        "v2",
        "v_parameterization",
        "scale_v_pred_loss_like_noise_pred",
        "seed",
        "shuffle_caption",
        "text_encoder_lr",
        "train_batch_size",
        "train_data_dir",
        "v_pred_like_loss",
        "vae",
        "vae_batch_size",
        "validate_every_n_steps",
        "validation_seed",
        "validation_split",
        "zero_terminal_snr",
    ]
)


# ------------------------------------------------------------------------------------------------ export


@dataclass
class KohyaExport:
    """What sd-scripts needs to train a config: the script, both TOMLs, the sample prompts, and what could not
    be translated. `config` is flat (sd-scripts flattens sections anyway)."""

    script: str
    config: dict[str, Any]
    dataset: dict[str, Any]
    problems: list[Problem] = field(default_factory=list)
    prompts_text: str | None = None
    mixed_precision: str = "no"
    num_processes: int = 1

    @property
    def ok(self) -> bool:
        return not any(p.is_error for p in self.problems)

    def launch_argv(
        self,
        sd_scripts_dir: str | Path,
        python: str | Path,
        num_processes: int | None,
        config_path: str | Path,
        dataset_path: str | Path,
    ) -> list[str]:
        """The command that trains it: `accelerate launch` as a module of the backend's own Python (so the
        backend's environment is used whatever is on PATH), one process per GPU, no dynamo."""
        n = self.num_processes if num_processes is None else num_processes
        return [
            str(python),
            "-m",
            "accelerate.commands.launch",
            "--num_processes",
            str(n),
            "--num_machines",
            "1",
            "--mixed_precision",
            self.mixed_precision,
            "--dynamo_backend",
            "no",
            str(Path(sd_scripts_dir) / self.script),
            "--config_file",
            str(config_path),
            "--dataset_config",
            str(dataset_path),
        ]


def _fix_native(what: str) -> str:
    return f'set {what} to its default, or train with backend.name = "native"'


class _Builder:
    """One export in progress: the config being filled, and the problems found."""

    def __init__(self, cfg: TrainingConfig, custom: bool, output_dir: str | None) -> None:
        self.cfg = cfg
        self.custom = custom
        self.family = cfg.model.family
        self.script = SCRIPTS[self.family]
        self.args = script_args(self.script)
        self.config: dict[str, Any] = {}
        self.network_args: list[str] = []
        self.problems: list[Problem] = []
        self.default_output_dir = output_dir

    def error(self, field_: str, message: str, fix: str) -> None:
        self.problems.append(Problem(field_, message, fix))

    def warn(self, field_: str, message: str, fix: str) -> None:
        self.problems.append(Problem(field_, message, fix, "warning"))

    def put(self, key: str, value: Any, field_: str) -> None:
        """Set a top-level key; one the script lacks is refused (never written where sd-scripts ignores it)."""
        if key not in self.args:
            self.error(field_, f"{self.script} has no option {key}", _fix_native(field_))
            return
        self.config[key] = value

    def net(self, key: str, value: Any, field_: str | None = None) -> None:
        """Add a network arg. The block and type options of sd-scripts' Flux/SD3 LoRA modules are refused with
        a LyCORIS kind: `lycoris.kohya` does not read them, so they would change nothing and say nothing."""
        kind = self.cfg.network.kind
        if key in LORA_MODULE_ONLY_ARGS and kind is not NetworkKind.LORA:
            where = field_ or f"network_args.{key}"
            self.error(
                where,
                f"LyCORIS ({kind.value}) has no {key}: only sd-scripts' {NETWORK_MODULES[self.family]} reads it",
                f'remove {where}, or use network.kind = "lora"',
            )
            return
        self.network_args.append(f"{key}={_arg_str(value)}")


def script_args(script: str) -> frozenset[str]:
    """The argument names of an sd-scripts training script (`train_network.py` …) that Nyx may emit."""
    extra: dict[str, frozenset[str]] = {
        "train_network.py": frozenset(),
        "sdxl_train_network.py": frozenset({"cache_text_encoder_outputs", "cache_text_encoder_outputs_to_disk"}),
        "flux_train_network.py": frozenset(
            [
                "cache_text_encoder_outputs",
                "cache_text_encoder_outputs_to_disk",
                "clip_l",
                "t5xxl",
                "ae",
                "timestep_sampling",
                "sigmoid_scale",
                "discrete_flow_shift",
                "model_prediction_type",
                "weighting_scheme",
                "logit_mean",
                "logit_std",
                "mode_scale",
                "guidance_scale",
                "t5xxl_max_token_length",
                "apply_t5_attn_mask",
                "blocks_to_swap",
            ]
        ),
        "sd3_train_network.py": frozenset(
            [
                "cache_text_encoder_outputs",
                "cache_text_encoder_outputs_to_disk",
                "clip_l",
                "clip_g",
                "t5xxl",
                "weighting_scheme",
                "logit_mean",
                "logit_std",
                "mode_scale",
                "t5xxl_max_token_length",
                "apply_t5_attn_mask",
                "apply_lg_attn_mask",
                "training_shift",
                "clip_l_dropout_rate",
                "clip_g_dropout_rate",
                "t5_dropout_rate",
                "blocks_to_swap",
                "t5xxl_device",
            ]
        ),
    }
    return _COMMON_ARGS | extra[script]


def _arg_str(value: Any) -> str:
    """A value as sd-scripts' `key=value` network/optimizer/scheduler args want it (read back with
    `ast.literal_eval` or int()/float(); lists as comma-separated numbers)."""
    if isinstance(value, Enum):
        return str(value.value)
    if isinstance(value, bool):
        return "True" if value else "False"
    if isinstance(value, (list, tuple)):
        return ",".join(_arg_str(v) for v in value)
    return str(value)


def _get(cfg: TrainingConfig, path: str) -> Any:
    obj: Any = cfg
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _plain(value: Any) -> Any:
    """TOML-ready scalars: enums as their value, tuples as lists."""
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, tuple):
        return list(value)
    return value


# Parameters the generic loop leaves alone: the dataset goes into the dataset TOML, and these need a value
# conversion, a choice of key, or are Nyx-only and handled explicitly below.
_HANDLED = frozenset(
    {
        "model.family",
        "model.vae",
        "model.single_file_config",
        "model.flow_config",
        "dataset.resolution",
        "dataset.max_token_length",
        "dataset.num_workers",
        "network.kind",
        "network.target_modules",
        "network.train_unet",
        "network.train_text_encoder",
        "network.text_encoder_lr",
        "network.conv_dim",
        "network.conv_alpha",
        "network.block_lr_weights",
        "optimizer.type",
        "optimizer.class_path",
        "optimizer.weight_decay",
        "optimizer.betas",
        "optimizer.eps",
        "optimizer.args",
        "scheduler.type",
        "scheduler.warmup_steps",
        "scheduler.num_cycles",
        "scheduler.power",
        "scheduler.min_lr_ratio",
        "training.max_steps",
        "training.max_epochs",
        "training.base_quantization",
        "training.num_processes",
        "training.masked_loss",
        "flow.double_block_indices",
        "flow.block_type_dims",
        "flow.t5_on_cpu",
        "saving.output_dir",
        "saving.keep_last_n",
        "saving.lora_format",
        "sampling.prompts",
        "sampling.every_n_steps",
        "sampling.every_n_epochs",
        "sampling.sample_at_first",
        "sampling.sampler",
        "logging.loss_avg_window",
        "backend.name",
        "backend.path",
    }
)


def _coerce(key: str, value: Any) -> Any:
    """Give a value the JSON type sd-scripts' argument has (TOML keeps what it is given: 1 is not 1.0)."""
    value = _plain(value)
    if isinstance(value, bool) or value is None or isinstance(value, (str, list)):
        return value
    if key in _FLOAT_ARGS:
        return float(value)
    return value


# arguments whose type is float: an int value would reach sd-scripts as an int (no argparse conversion)
_FLOAT_ARGS = frozenset(
    [
        "adaptive_noise_scale",
        "caption_dropout_rate",
        "caption_tag_dropout_rate",
        "clip_g_dropout_rate",
        "clip_l_dropout_rate",
        "discrete_flow_shift",
        "guidance_scale",
        "huber_c",
        "huber_scale",
        "ip_noise_gamma",
        "learning_rate",
        "logit_mean",
        "logit_std",
        "lr_scheduler_min_lr_ratio",
        "lr_scheduler_power",
        "max_grad_norm",
        "min_snr_gamma",
        "mode_scale",
        "multires_noise_discount",
        "network_alpha",
        "network_dropout",
        "noise_offset",
        "prior_loss_weight",
        "sigmoid_scale",
        "t5_dropout_rate",
        "training_shift",
        "unet_lr",
        "v_pred_like_loss",
        "validation_split",
    ]
)


# arguments where 0 is a real value that differs from sd-scripts' default (1.0, 3.5, a random seed …)
_ZERO_MEANINGFUL = frozenset({"max_grad_norm", "guidance_scale", "seed", "prior_loss_weight", "mode_scale"})


def _generic(b: _Builder, p: Param) -> None:
    """A parameter whose `kohya=` name is an sd-scripts argument or a network arg, converted by type only."""
    value = _get(b.cfg, p.path)
    default = p.default
    kohya = p.meta.kohya
    if b.family not in p.meta.families:
        return  # Nyx ignores it for this family too
    if kohya is None:
        if value != default:
            b.error(p.path, f"sd-scripts has no option for {p.path}", _fix_native(p.path))
        return
    if kohya.startswith("network_args."):
        if value is None or value == default:
            return
        b.net(kohya.removeprefix("network_args."), value, p.path)
        return
    if value is None or (not value and kohya not in _ZERO_MEANINGFUL):
        return  # off in both (0/false means "never"/"off"; sd-scripts' `% 0` would even crash on some)
    if kohya not in b.args:
        if value != default:
            b.error(p.path, f"{b.script} has no option {kohya}", _fix_native(p.path))
        return
    b.config[kohya] = _coerce(kohya, value)


def _network(b: _Builder) -> None:
    net = b.cfg.network
    kind = net.kind
    unet = b.family in UNET_BLOCK_COUNTS
    if kind is NetworkKind.LORA:
        b.config["network_module"] = NETWORK_MODULES[b.family]
    else:
        b.config["network_module"] = LYCORIS_MODULE
        b.net("algo", LYCORIS_ALGOS[kind])
        if kind is NetworkKind.DORA:
            b.network_args.extend(DORA_ARGS)
        for name in ("block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas", "block_lr_weights"):
            if getattr(net, name) is not None:
                b.error(
                    f"network.{name}",
                    f"LyCORIS ({kind.value}) under sd-scripts has no block-wise {name}",
                    f'remove network.{name}, or use network.kind = "lora"',
                )
    if unet:
        # LyCORIS' kinds default their convolutions to dim/alpha like Nyx; said explicitly all the same
        conv_dim = net.conv_dim
        if conv_dim is None and kind in (NetworkKind.LOCON, NetworkKind.LOHA, NetworkKind.LOKR):
            conv_dim = net.dim
        if conv_dim:
            b.net("conv_dim", conv_dim)
            b.net("conv_alpha", net.conv_alpha if net.conv_alpha is not None else net.alpha)
        elif kind is not NetworkKind.LORA:
            b.net("preset", LYCORIS_NO_CONV_PRESET)  # LyCORIS would train convolutions at rank dim otherwise
        if net.block_lr_weights is not None and kind is NetworkKind.LORA:
            if b.family is Family.SDXL:
                b.error(
                    "network.block_lr_weights",
                    "sd-scripts numbers SDXL's blocks for learning-rate weights differently from block_dims; "
                    "Nyx does not translate them",
                    _fix_native("network.block_lr_weights"),
                )
            else:
                w = net.block_lr_weights
                b.net("down_lr_weight", w[:12])
                b.net("mid_lr_weight", w[12])
                b.net("up_lr_weight", w[13:])
    if net.target_modules != _default("network.target_modules") and unet:
        b.error(
            "network.target_modules",
            "sd-scripts chooses the modules itself (its network module's targets)",
            _fix_native("network.target_modules"),
        )
    if net.train_unet and not net.train_text_encoder:
        b.config["network_train_unet_only"] = True
    elif net.train_text_encoder and not net.train_unet:
        b.config["network_train_text_encoder_only"] = True
    if net.text_encoder_lr is not None:
        b.config["text_encoder_lr"] = [float(net.text_encoder_lr)]
    flow = b.cfg.flow
    if flow.double_block_indices is not None and b.family in DOUBLE_BLOCK_INDEX_ARGS:
        b.net(DOUBLE_BLOCK_INDEX_ARGS[b.family], flow.double_block_indices, "flow.double_block_indices")
    if flow.block_type_dims and b.family is Family.FLUX:
        for name, dim in flow.block_type_dims.items():
            b.net(FLUX_TYPE_DIM_ARGS[name], dim, f"flow.block_type_dims.{name}")


def _optimizer(b: _Builder) -> None:
    opt = b.cfg.optimizer
    if opt.type is OptimizerKind.CUSTOM:
        if not opt.class_path:
            b.error(
                "optimizer.class_path",
                "optimizer.type = custom needs a class path",
                'set it, e.g. "pytorch_optimizer.CAME"',
            )
            return
        b.config["optimizer_type"] = opt.class_path
    elif opt.type in OPTIMIZERS:
        b.config["optimizer_type"] = OPTIMIZERS[opt.type]
    elif b.custom:
        b.config["optimizer_type"] = CUSTOM_OPTIMIZERS[opt.type]
    else:
        b.error(
            "optimizer.type",
            f"official sd-scripts has no {opt.type.value} optimizer",
            'use backend.name = "kohya-custom" (it installs pytorch_optimizer), or optimizer.type = "custom" with '
            "optimizer.class_path naming a class installed in sd-scripts' environment",
        )
        return
    args: dict[str, Any] = dict(OPTIMIZER_ARG_DEFAULTS.get(opt.type, {}))
    defaults = {k: _default(f"optimizer.{k}") for k in ("weight_decay", "betas", "eps")}
    for key in OPTIMIZER_SECTION_KEYS.get(opt.type, ()):
        value = getattr(opt, key)
        if key == "weight_decay" or value != defaults[key]:
            args[key] = tuple(value) if key == "betas" else value
    for key in ("betas", "eps"):
        if (
            key not in OPTIMIZER_SECTION_KEYS.get(opt.type, ())
            and getattr(opt, key) != defaults[key]
            and opt.type is not OptimizerKind.CUSTOM
            and key not in opt.args
        ):
            b.warn(
                f"optimizer.{key}",
                f"{opt.type.value} does not take optimizer.{key} (Nyx ignores it too)",
                f"remove optimizer.{key}, or pass it through optimizer.args",
            )
    args.update(opt.args)
    if args:
        b.config["optimizer_args"] = [f"{k}={_opt_arg(v)}" for k, v in args.items()]


def _opt_arg(value: Any) -> str:
    """optimizer_args values are read with `ast.literal_eval`: tuples as Python tuples, strings as written
    (Nyx documents optimizer.args strings as Python literals too)."""
    if isinstance(value, tuple):
        return "(" + ",".join(_opt_arg(v) for v in value) + ("," if len(value) == 1 else "") + ")"
    if isinstance(value, bool):
        return "True" if value else "False"
    return str(value)


def _scheduler(b: _Builder) -> None:
    sch, tr = b.cfg.scheduler, b.cfg.training
    kind = sch.type
    if kind in CUSTOM_SCHEDULERS:
        if not b.custom:
            b.error(
                "scheduler.type",
                f"official sd-scripts has no {kind.value} schedule",
                'use backend.name = "kohya-custom", or scheduler.type = "linear"',
            )
            return
        if not tr.max_steps:
            b.error(
                "training.max_epochs",
                f"{kind.value} under sd-scripts needs the step count up front (sd-scripts gives a custom "
                "schedule none)",
                "set training.max_steps instead of training.max_epochs",
            )
            return
        b.config["lr_scheduler_type"] = CUSTOM_SCHEDULERS[kind]
        b.config["lr_scheduler_args"] = [
            f"total_steps={tr.max_steps}",
            f"warmup_steps={sch.warmup_steps}",
            f"min_lr_ratio={float(sch.min_lr_ratio)}",
        ]
        return
    name = SCHEDULERS[kind]
    if kind is SchedulerKind.CONSTANT and sch.warmup_steps:
        name = SCHEDULERS[SchedulerKind.CONSTANT_WITH_WARMUP]  # sd-scripts' constant refuses a warmup
    if sch.min_lr_ratio:
        if kind is SchedulerKind.COSINE:
            name = COSINE_WITH_MIN_LR
            b.config["lr_scheduler_min_lr_ratio"] = float(sch.min_lr_ratio)
        elif kind not in (SchedulerKind.CONSTANT, SchedulerKind.CONSTANT_WITH_WARMUP):
            b.error(
                "scheduler.min_lr_ratio",
                f"sd-scripts' {name} schedule always decays to 0 (only cosine has a floor there)",
                'set scheduler.min_lr_ratio = 0, or use scheduler.type = "cosine"',
            )
    b.config["lr_scheduler"] = name
    if sch.warmup_steps:
        b.config["lr_warmup_steps"] = int(sch.warmup_steps)  # an int is a step count (a float < 1 a ratio)
    if kind is SchedulerKind.COSINE_WITH_RESTARTS:
        b.config["lr_scheduler_num_cycles"] = int(sch.num_cycles)
    if kind is SchedulerKind.POLYNOMIAL:
        b.config["lr_scheduler_power"] = float(sch.power)


def _training(b: _Builder) -> None:
    tr, flow, model = b.cfg.training, b.cfg.flow, b.cfg.model
    if tr.max_steps:
        b.config["max_train_steps"] = int(tr.max_steps)
    else:
        b.config["max_train_epochs"] = int(tr.max_epochs)
    if b.family in (Family.FLUX, Family.SD3):
        q = tr.base_quantization
        if q in FP8_BASE:
            if FP8_BASE[q]:
                b.config["fp8_base"] = True
        else:
            b.error(
                "training.base_quantization",
                f"sd-scripts has no {q.value} base (only fp8: fp8_base)",
                'set training.base_quantization = "fp8" (or "none"), or use backend.name = "native"',
            )
        if flow.t5_on_cpu:
            if "t5xxl_device" in b.args:
                b.config["t5xxl_device"] = T5XXL_DEVICE[True]
            else:
                b.error("flow.t5_on_cpu", f"{b.script} has no t5xxl_device option", _fix_native("flow.t5_on_cpu"))
    # Nyx: the _to_disk caches imply the in-memory ones; said outright rather than left to sd-scripts' fix-ups
    for key in ("cache_latents", "cache_text_encoder_outputs"):
        if b.config.get(f"{key}_to_disk"):
            b.config[key] = True
    if b.family in UNET_BLOCK_COUNTS:
        b.config["sdpa"] = True  # Nyx's UNet attention is torch's SDPA; sd-scripts' default is the slow, big one
    if b.family is Family.SD2:
        _sd2(b)
    if tr.masked_loss:
        b.config["masked_loss"] = True  # with alpha_mask on every subset: the mask is the alpha channel
    if model.vae:
        b.config["ae" if b.family is Family.FLUX else "vae"] = model.vae
    if b.family in (Family.FLUX, Family.SD3) and looks_like_repo_id(model.pretrained):
        b.error(
            "model.pretrained",
            f"sd-scripts loads {b.family.value} from a .safetensors file, not a Hugging Face repo id",
            "download the model and set model.pretrained to its .safetensors file",
        )
    if b.family is Family.FLUX:
        for name, key, what in (("clip_l", "clip_l", "CLIP-L"), ("t5xxl", "t5xxl", "T5-XXL"), ("vae", "ae", "AE")):
            if not getattr(model, name):
                b.error(
                    f"model.{name}",
                    f"flux_train_network.py needs the {what} file ({key})",
                    f"set model.{name} to its .safetensors file",
                )
    if b.cfg.dataset.max_token_length != 75:
        b.config["max_token_length"] = MAX_TOKEN_LENGTH[b.cfg.dataset.max_token_length]
    if b.cfg.dataset.num_workers:
        b.config["max_data_loader_n_workers"] = int(b.cfg.dataset.num_workers)
    r = b.cfg.dataset.resolution
    b.config["resolution"] = f"{r},{r}"


def _sd2(b: _Builder) -> None:
    """sd-scripts cannot tell SD2 from SD1 or v from epsilon by itself: it needs `v2` and `v_parameterization`.
    Nyx reads the prediction type from the model when it loads it; an export cannot, so it goes by the
    name of the model (or of model.single_file_config): "-base" or "_512" means SD2-base (epsilon, 512 px)."""
    model = b.cfg.model
    name = Path(str(model.single_file_config or model.pretrained)).name.lower()
    v_pred = not re.search(r"[-_]base\b|[-_]base[-_.]|[-_]512", name)  # 2-1-base, v2-1_512-ema-pruned
    b.config["v2"] = True
    if v_pred:
        b.config["v_parameterization"] = True
    b.warn(
        "model.family",
        f"sd2 exported as {'a v-prediction (768-v)' if v_pred else 'an epsilon (SD2-base)'} model "
        f"(v_parameterization = {'true' if v_pred else 'false'}), judged by the model's name",
        'for SD2-base set model.single_file_config = "stabilityai/stable-diffusion-2-1-base"; for a 768-v model '
        'one without "-base" in its name',
    )


def _saving(b: _Builder) -> None:
    sv = b.cfg.saving
    out = sv.output_dir or b.default_output_dir
    if out is None:
        out = "output"
        b.warn(
            "saving.output_dir",
            'not set: sd-scripts will write into "output" under the folder it is started from',
            "set saving.output_dir (the job's folder is chosen by Nyx's runner, not by an export)",
        )
    b.config["output_dir"] = out
    if sv.lora_format is not LoraFormat.KOHYA and b.family in (Family.FLUX, Family.SD3):
        b.error(
            "saving.lora_format", "sd-scripts writes only its own (kohya) layout", 'set saving.lora_format = "kohya"'
        )
    if sv.keep_last_n:
        if sv.every_n_epochs:
            b.config["save_last_n_epochs"] = int(sv.keep_last_n)
            if sv.save_state:
                b.config["save_last_n_epochs_state"] = int(sv.keep_last_n)
        if sv.every_n_steps:
            # sd-scripts keeps the saves of the last N *steps*: keep_last_n files × the interval
            b.config["save_last_n_steps"] = int(sv.keep_last_n * sv.every_n_steps)
            if sv.save_state:
                b.config["save_last_n_steps_state"] = int(sv.keep_last_n * sv.every_n_steps)


_SIZE = re.compile(r"(^|\s)--(w|h)\s")
_SEED = re.compile(r"(^|\s)--d\s")


def _sampling(b: _Builder) -> str | None:
    """The prompts file's text (None without prompts). Nyx's defaults differ from sd-scripts' (512 px, random
    seed), so each prompt gets the training resolution and seed + index unless it sets them itself."""
    sm, tr = b.cfg.sampling, b.cfg.training
    if not sm.prompts:
        if sm.every_n_steps or sm.every_n_epochs or sm.sample_at_first:
            b.warn("sampling.prompts", "no prompts: sd-scripts renders no samples", "add sampling.prompts")
        return None
    r = b.cfg.dataset.resolution
    lines = []
    for i, prompt in enumerate(sm.prompts):
        line = " ".join(prompt.split())  # one prompt per line
        if not _SIZE.search(line):
            line += f" --w {r} --h {r}"
        if not _SEED.search(line):
            line += f" --d {tr.seed + i}"
        lines.append(line)
    b.config["sample_prompts"] = PROMPTS_FILE
    b.config["sample_sampler"] = sm.sampler.value
    if sm.every_n_epochs:
        b.config["sample_every_n_epochs"] = int(sm.every_n_epochs)
    elif sm.every_n_steps:
        b.config["sample_every_n_steps"] = int(sm.every_n_steps)
    if sm.sample_at_first:
        b.config["sample_at_first"] = True
    return "\n".join(lines) + "\n"


def _ignored(b: _Builder) -> None:
    """Nyx-only settings with no effect on what sd-scripts trains: said, not refused."""
    model = b.cfg.model
    for name in ("single_file_config", "flow_config"):
        if getattr(model, name) and b.family in _families(f"model.{name}"):
            b.warn(
                f"model.{name}",
                "not used by sd-scripts, which reads single files with its own configs",
                f"nothing to do; model.{name} only matters to the native backend",
            )
    quality = b.cfg.quality
    changed = [
        f"quality.{name}"
        for name, field in type(quality).model_fields.items()
        if getattr(quality, name) != field.get_default(call_default_factory=True)
    ]
    if changed:
        b.warn(
            changed[0],
            f"the native engine's quality checks ({', '.join(changed)}) do not run under sd-scripts",
            "nothing to do; watch the loss on the dashboard, or train with backend.name = \"native\"",
        )


def _families(path: str) -> tuple[Family, ...]:
    return _PARAMS[path].meta.families


def _default(path: str) -> Any:
    return _PARAMS[path].default


_PARAMS: dict[str, Param] = {p.path: p for p in iter_params(TrainingConfig)}


# ------------------------------------------------------------------------------------------------ dataset

_SUBSET_FROM_DATASET = (
    "shuffle_caption",
    "keep_tokens",
    "flip_aug",
    "color_aug",
    "random_crop",
    "caption_dropout_rate",
    "caption_tag_dropout_rate",
    "caption_dropout_every_n_epochs",
    "caption_extension",
)
_DATASET_LEVEL = ("enable_bucket", "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps", "bucket_no_upscale")
_DATASET_FLOATS = frozenset({"caption_dropout_rate", "caption_tag_dropout_rate", "validation_split"})


def _dataset(b: _Builder) -> dict[str, Any]:
    """The `--dataset_config` TOML: caption options in [general], sizes and buckets in the one [[datasets]],
    one [[datasets.subsets]] per folder (train_data_dir's `N_name` folders listed now: sd-scripts ignores
    train_data_dir when a dataset config is given). Types exact: the schema checks them with isinstance."""
    ds, tr = b.cfg.dataset, b.cfg.training
    general: dict[str, Any] = {}
    for key in _SUBSET_FROM_DATASET:
        value = _plain(getattr(ds, key))
        general[key] = float(value) if key in _DATASET_FLOATS else value
    dataset: dict[str, Any] = {"resolution": int(ds.resolution), "batch_size": int(tr.batch_size)}
    for key in _DATASET_LEVEL:
        dataset[key] = getattr(ds, key)
    if ds.validation_split:
        dataset["validation_split"] = float(ds.validation_split)
        dataset["validation_seed"] = int(tr.seed)
    subsets: list[dict[str, Any]] = []
    for sub in ds.subsets:
        entry: dict[str, Any] = {"image_dir": sub.image_dir}
        repeats = sub.num_repeats
        if repeats is None:
            parsed = _parse_repeat(Path(sub.image_dir).name)
            repeats = parsed[0] if parsed and parsed[0] >= 1 else 1
        entry["num_repeats"] = int(repeats)
        if sub.caption_extension is not None:
            entry["caption_extension"] = sub.caption_extension
        if sub.is_reg:
            entry["is_reg"] = True
        if sub.class_tokens is not None:
            entry["class_tokens"] = sub.class_tokens
        subsets.append(entry)
    for field_, folder, is_reg in (
        ("dataset.train_data_dir", ds.train_data_dir, False),
        ("dataset.reg_data_dir", ds.reg_data_dir, True),
    ):
        if folder is None:
            continue
        from nyx_tui.trainers.native.subsets import repeat_folders  # torch-free; shared N_name rules

        try:
            found, _ignored_dirs = repeat_folders(Path(folder))
        except OSError as e:
            b.error(
                field_,
                f"cannot list {folder} ({e.strerror or e}): the export lists its N_name folders as subsets",
                f"create the folder, or fix {field_}",
            )
            continue
        if not found:
            b.error(field_, f"{folder} has no N_name folders (e.g. 10_mychar)", f"add them, or fix {field_}")
        for path, repeats, name in found:
            entry = {"image_dir": str(path), "num_repeats": int(repeats), "class_tokens": name}
            if is_reg:
                entry["is_reg"] = True
            subsets.append(entry)
    if not subsets:
        b.error("dataset.subsets", "no image folders", 'add a [[dataset.subsets]] with image_dir = "./images"')
    if tr.masked_loss:
        for entry in subsets:
            entry["alpha_mask"] = True
    dataset["subsets"] = subsets
    return {"general": general, "datasets": [dataset]}


def _parse_repeat(name: str) -> tuple[int, str] | None:
    from nyx_tui.trainers.native.subsets import parse_repeat_folder

    return parse_repeat_folder(name)


# ------------------------------------------------------------------------------------------------ entry


def to_kohya(cfg: TrainingConfig, *, custom: bool = False, output_dir: str | None = None) -> KohyaExport:
    """Translate a config for sd-scripts. `custom`: the custom-optimizer backend (also when the config says
    backend.name = "kohya-custom"). `output_dir` is used when saving.output_dir is empty (the job's folder).
    Never raises for an untranslatable option: it is a `Problem` in the result."""
    custom = custom or cfg.backend.name is BackendKind.KOHYA_CUSTOM
    b = _Builder(cfg, custom, output_dir)
    for p in iter_params(TrainingConfig):
        if p.path in _HANDLED or p.path.startswith(("dataset.", "quality.")):
            continue
        _generic(b, p)
    _network(b)
    _optimizer(b)
    _scheduler(b)
    _training(b)
    _saving(b)
    prompts = _sampling(b)
    _ignored(b)
    dataset = _dataset(b)
    if b.network_args:
        b.config["network_args"] = list(b.network_args)
    # a last guard: nothing the script lacks leaves here, whoever added it
    for key in sorted(set(b.config) - b.args):
        del b.config[key]
        b.error(key, f"{b.script} has no option {key}", _fix_native(key))
    for key in list(b.config):
        b.config[key] = _coerce(key, b.config[key])
    return KohyaExport(
        script=b.script,
        config=dict(sorted(b.config.items())),
        dataset=dataset,
        problems=b.problems,
        prompts_text=prompts,
        mixed_precision=cfg.training.mixed_precision.value,
        num_processes=cfg.training.num_processes,
    )


def write_export(
    export: KohyaExport,
    out_dir: str | Path,
    *,
    sd_scripts_dir: str | Path = "sd-scripts",
    python: str | Path = "python",
) -> dict[str, Path]:
    """Write `config.toml`, `dataset.toml`, `prompts.txt` (with prompts) and `launch.sh` into `out_dir`;
    returns their paths by name (`config`, `dataset`, `prompts`, `launch`). The config's `sample_prompts`
    becomes the absolute path of the prompts file, so the command works from any folder."""
    import tomli_w

    out = Path(out_dir).expanduser().absolute()
    out.mkdir(parents=True, exist_ok=True)
    paths = {"config": out / "config.toml", "dataset": out / "dataset.toml"}
    config = dict(export.config)
    if export.prompts_text is not None:
        paths["prompts"] = out / PROMPTS_FILE
        paths["prompts"].write_text(export.prompts_text, encoding="utf-8")
        config["sample_prompts"] = str(paths["prompts"])
    header = f"# sd-scripts {export.script} --config_file, exported by Nyx (nyx config export --to kohya)\n"
    paths["config"].write_text(header + tomli_w.dumps(config), encoding="utf-8")
    paths["dataset"].write_text(
        "# sd-scripts --dataset_config, exported by Nyx\n" + tomli_w.dumps(export.dataset), encoding="utf-8"
    )
    argv = export.launch_argv(sd_scripts_dir, python, None, paths["config"], paths["dataset"])
    paths["launch"] = out / "launch.sh"
    paths["launch"].write_text(
        "#!/bin/sh\n"
        "# Train with sd-scripts: edit the Python (sd-scripts' own environment) and the sd-scripts folder if needed.\n"
        "# Secrets (HF_TOKEN) come from the environment, never from the config.\n"
        "export PYTHONUNBUFFERED=1\n"
        f"exec {shlex.join(argv)}\n",
        encoding="utf-8",
    )
    paths["launch"].chmod(0o755)
    return paths
