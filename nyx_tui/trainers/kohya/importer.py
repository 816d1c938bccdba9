"""sd-scripts config (+ dataset TOML, or a `train_data_dir` layout) → `TrainingConfig`.

People arrive with sd-scripts configs they trust; importing them must neither drop a setting silently nor
invent one. So every key is either mapped to a Nyx field, or named in `ImportResult.unrepresented` with
why — except keys whose value is sd-scripts' own default (they change nothing). A key sd-scripts' config
leaves out means *sd-scripts'* default, not Nyx's (its learning rate is 2e-6, its alpha 1, its caption
extension `.caption`), so those defaults (read from shared/reference/sd-scripts-args.json) are applied.

The mapping is read from the `kohya=` names declared on the fields (`iter_params`), plus the few keys whose
meaning differs (network_module + algo, optimizer_type, resolution, warmup as a ratio, fp8_base…). The
value tables of the export side (`translate.py`) are reused where they exist, so both directions agree.
Torch-free: it runs in the CLI and the TUI process.
"""

from __future__ import annotations

import ast
import json
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from nyx_tui.config.errors import ConfigError, Problem
from nyx_tui.config.fields import Family, Param, iter_params
from nyx_tui.config.io import validate_data
from nyx_tui.config.model import (
    FLUX_TYPE_DIMS,
    NetworkKind,
    OptimizerKind,
    SchedulerKind,
    TrainingConfig,
)
from nyx_tui.trainers.kohya import translate as tr

SCRIPTS: dict[Family, str] = {
    Family.SD15: "train_network",
    Family.SD2: "train_network",
    Family.SDXL: "sdxl_train_network",
    Family.FLUX: "flux_train_network",
    Family.SD3: "sd3_train_network",
}

# sd-scripts' defaults (@ 48d368fa, from shared/reference/sd-scripts-args.json) where they differ from Nyx's:
# a key an sd-scripts config leaves out means these, not Nyx's defaults.
SD_DEFAULTS: dict[str, Any] = {
    "caption_extension": ".caption",
    "network_alpha": 1.0,
    "learning_rate": 2e-6,
    "max_train_steps": 1600,
    "save_state": False,
    "save_model_as": "safetensors",  # what Nyx writes anyway
}
SD_DEFAULTS_BY_FAMILY: dict[Family, dict[str, Any]] = {Family.FLUX: {"guidance_scale": 3.5}}

# arguments only one script has (from the reference): they tell the family of a config without a script name
FLUX_ONLY = frozenset(
    [
        "ae",
        "controlnet_model_name_or_path",
        "discrete_flow_shift",
        "guidance_scale",
        "model_prediction_type",
        "model_type",
        "sigmoid_scale",
        "split_mode",
        "timestep_sampling",
    ]
)
SD3_ONLY = frozenset(
    [
        "apply_lg_attn_mask",
        "clip_g",
        "clip_g_dropout_rate",
        "clip_l_dropout_rate",
        "enable_scaled_pos_embed",
        "pos_emb_random_crop_rate",
        "save_clip",
        "save_t5xxl",
        "t5_dropout_rate",
        "t5xxl_device",
        "t5xxl_dtype",
        "training_shift",
    ]
)

# sd-scripts' optimizer_type (matched case-insensitively, as sd-scripts does) → Nyx: the export's tables
# inverted, plus the spellings other setups use for the same class
_OPTIMIZERS: dict[str, OptimizerKind] = {
    **{v.lower(): k for k, v in tr.OPTIMIZERS.items()},
    **{v.lower(): k for k, v in tr.CUSTOM_OPTIMIZERS.items()},
    "came_pytorch.came": OptimizerKind.CAME,
    "came": OptimizerKind.CAME,
}
# the weight decay an optimizer uses when optimizer_args give none (torch, bitsandbytes, prodigy, … defaults)
_DEFAULT_WD: dict[OptimizerKind, float] = {
    OptimizerKind.ADAMW: 0.01,
    OptimizerKind.ADAMW8BIT: 0.01,
}
_SCHEDULERS: dict[str, SchedulerKind] = {v: k for k, v in tr.SCHEDULERS.items()}
_SCHEDULERS[tr.COSINE_WITH_MIN_LR] = SchedulerKind.COSINE
_CUSTOM_SCHEDULERS: dict[str, SchedulerKind] = {v: k for k, v in tr.CUSTOM_SCHEDULERS.items()}

# network_module → kind for sd-scripts' own modules (LyCORIS's algo decides for lycoris.kohya)
_MODULES: dict[str, NetworkKind] = {m: NetworkKind.LORA for m in tr.NETWORK_MODULES.values()}
_LYCORIS = tr.LYCORIS_MODULE
_ALGOS: dict[str, NetworkKind] = {v: k for k, v in tr.LYCORIS_ALGOS.items() if k is not NetworkKind.DORA}
_ALGOS["lora"] = NetworkKind.LOCON  # LyCORIS's "lora" algo is LoCon (with conv_dim: convolutions too)
_MODULE_FAMILY = {"networks.lora_flux": Family.FLUX, "networks.lora_sd3": Family.SD3}

# keys handled by hand below (not through the plain kohya-name table)
_SPECIAL = {
    "network_module",
    "network_args",
    "optimizer_type",
    "optimizer_args",
    "lr_scheduler",
    "lr_scheduler_type",
    "lr_scheduler_args",
    "lr_warmup_steps",
    "resolution",
    "fp8_base",
    "fp8_base_unet",
    "t5xxl_device",
    "save_last_n_epochs",
    "save_last_n_steps",
    "sample_prompts",
    "network_train_unet_only",
    "network_train_text_encoder_only",
    "max_train_steps",
    "max_train_epochs",
    "v2",
    "v_parameterization",
    "sdxl",
    "ae",
    "dataset_config",
    "config_file",
    "save_precision",
    "train_data_dir",
    "reg_data_dir",
    "seed",
    "max_token_length",
    "t5xxl_max_token_length",
    "alpha_mask",
    "output_config",
    "text_encoder_lr",
    "unet_lr",
    "learning_rate",
    "save_last_n_epochs_state",
    "save_last_n_steps_state",
    "validation_seed",
}
# keys that change how sd-scripts runs but not what it trains; named as such, never silently dropped
_RUNTIME = {
    "xformers": "Nyx picks the attention kernel itself",
    "sdpa": "Nyx picks the attention kernel itself",
    "mem_eff_attn": "Nyx picks the attention kernel itself",
    "highvram": "Nyx manages memory itself",
    "lowram": "Nyx manages memory itself",
    "persistent_data_loader_workers": "Nyx keeps its data loader workers alive",
    "logging_dir": "Nyx writes its own event log in the job folder",
    "log_with": "Nyx writes its own event log in the job folder",
    "log_prefix": "Nyx writes its own event log in the job folder",
    "save_model_as": "Nyx always saves .safetensors",
}
# dataset TOML subset keys that are per-subset in Nyx too
_SUBSET_KEYS = {"image_dir", "num_repeats", "is_reg", "class_tokens", "caption_extension"}


@dataclass
class ImportResult:
    """The config built (None when nothing valid could be), what Nyx cannot represent (one line per key:
    `key = value: why`), and the validation problems of the values that were mapped."""

    config: TrainingConfig | None
    unrepresented: list[str] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)


# ------------------------------------------------------------------------------------------- public


def read_kohya_files(config_path: Path, dataset_path: Path | None = None, *, script: str | None = None) -> ImportResult:
    """Read an sd-scripts config TOML (and its dataset TOML) from disk; relative paths in them are relative
    to the config file's folder, as they are for a Nyx config. The dataset TOML named by the config's
    `dataset_config` is read when no `dataset_path` is given and it exists."""
    config_path = Path(config_path)
    try:
        config = tomllib.loads(config_path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        return ImportResult(None, [], [Problem(str(config_path), f"cannot be read: {e}", "pass a readable TOML file")])
    base_dir = config_path.expanduser().absolute().parent
    if dataset_path is None:
        named = _flatten(config).get("dataset_config")
        if isinstance(named, str) and named and _resolve(named, base_dir).is_file():
            dataset_path = _resolve(named, base_dir)
    dataset: dict[str, Any] | None = None
    if dataset_path is not None:
        try:
            dataset = tomllib.loads(Path(dataset_path).read_text(encoding="utf-8-sig"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
            return ImportResult(
                None, [], [Problem(str(dataset_path), f"cannot be read: {e}", "pass a readable dataset TOML")]
            )
    return from_kohya(config, dataset, base_dir=base_dir, script=script)


def from_kohya(
    config: dict[str, Any],
    dataset: dict[str, Any] | None = None,
    *,
    base_dir: Path | None = None,
    script: str | None = None,
) -> ImportResult:
    """A `TrainingConfig` from an sd-scripts config (sections allowed, as sd-scripts flattens them) and its
    dataset TOML. `script` (e.g. `sdxl_train_network.py`) decides the family; without it the keys do."""
    try:
        return _Importer(_flatten(config), dataset, base_dir, script).run()
    except Exception as e:  # a shape no rule foresaw: said as a problem, never a traceback
        return ImportResult(
            None, [], [Problem("sd-scripts config", f"cannot be imported: {type(e).__name__}: {e}", _SHAPE_FIX)]
        )


_SHAPE_FIX = "check that it is an sd-scripts config TOML (and dataset TOML) that sd-scripts itself accepts"


def family_of(flat: dict[str, Any], script: str | None = None) -> Family:
    """The family an sd-scripts config trains: by script name, else by script-only keys, else by the
    network module, else SD1.5 (train_network.py's default)."""
    if script:
        name = Path(script).name.removesuffix(".py")
        for fam, scr in (
            (Family.FLUX, "flux_train_network"),
            (Family.SD3, "sd3_train_network"),
            (Family.SDXL, "sdxl_train_network"),
        ):
            if name == scr or name.startswith(scr.split("_")[0] + "_"):
                return fam
        if name.startswith("train_network"):
            return Family.SD2 if flat.get("v2") else Family.SD15
    if flat.get("sdxl") is True:
        return Family.SDXL
    if any(k in flat for k in SD3_ONLY):
        return Family.SD3
    if any(k in flat for k in FLUX_ONLY):
        return Family.FLUX
    if "ae" in flat or ("t5xxl" in flat and "clip_g" not in flat):
        return Family.FLUX
    module = str(flat.get("network_module", ""))
    if module in _MODULE_FAMILY:
        return _MODULE_FAMILY[module]
    if flat.get("v2") or flat.get("v_parameterization"):
        return Family.SD2
    if re.search(r"(sd_?xl|stable-diffusion-xl|[-_]xl[-_.])", str(flat.get("pretrained_model_name_or_path", "")), re.I):
        return Family.SDXL
    return Family.SD15


# ------------------------------------------------------------------------------------------ helpers


def _flatten(config: dict[str, Any]) -> dict[str, Any]:
    """sd-scripts' own flattening: one level of sections, their names ignored."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    return flat


def _resolve(value: str, base_dir: Path) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else base_dir / path


def _literal(value: Any) -> Any:
    """A `k=v` value as sd-scripts' optimizer/scheduler args read it: a Python literal, else the string."""
    if not isinstance(value, str):
        return value
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return value


def _parse_kv(values: Any, key: str, unrep: list[str]) -> dict[str, Any]:
    """sd-scripts' `["k=v", …]` lists (a single string is split on spaces, as its argparse nargs would)."""
    if values is None:
        return {}
    if isinstance(values, str):
        values = values.split()
    out: dict[str, Any] = {}
    for item in values if isinstance(values, list) else [values]:
        if not isinstance(item, str) or "=" not in item:
            unrep.append(f"{key} item {item!r}: not a key=value string")
            continue
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def _as_bool(value: Any) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
        return value.strip().lower() in ("true", "1")
    if isinstance(value, int):
        return bool(value)
    return None


def _as_list(value: Any) -> list[Any] | None:
    """`"1,2,3"` / `(1, 2, 3)` / `[1, 2, 3]` → list; None when it is not a list of numbers."""
    v = _literal(value)
    if isinstance(v, int | float) and not isinstance(v, bool):
        return [v]
    if isinstance(v, tuple | list) and all(isinstance(x, int | float) and not isinstance(x, bool) for x in v):
        return list(v)
    return None


def _indices(value: Any) -> list[int] | str | None:
    """sd-scripts' block selection (`all`, `0,1,5`, `0-3,7`) → indices; None for all; a string why not."""
    text = str(value).strip().lower()
    if text in ("all", ""):
        return None
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)\s*-\s*(\d+)", part)
        if m:
            out.extend(range(int(m[1]), int(m[2]) + 1))
        elif part.isdigit():
            out.append(int(part))
        else:
            return f"{value!r} is not a list of block indices"
    return out


def _base_type(annotation: Any) -> Any:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return args[0] if typing.get_origin(annotation) in (typing.Union, types.UnionType) and args else annotation


def _fmt(value: Any) -> str:
    return json.dumps(value) if isinstance(value, str | list | bool) else repr(value)


# ------------------------------------------------------------------------------------------ the import


class _Importer:
    """One import: the flat sd-scripts keys in, a nested Nyx TOML dict out (validated at the end)."""

    def __init__(
        self, flat: dict[str, Any], dataset: dict[str, Any] | None, base_dir: Path | None, script: str | None
    ) -> None:
        self.flat = flat
        self.dataset = dataset
        self.base_dir = base_dir
        self.family = family_of(flat, script)
        self.script = SCRIPTS[self.family]
        self.defaults = {**SD_DEFAULTS, **SD_DEFAULTS_BY_FAMILY.get(self.family, {})}
        self.data: dict[str, dict[str, Any]] = {"model": {"family": self.family.value}}
        self.unrep: list[str] = []
        self.used: set[str] = set()
        self.params: dict[str, Param] = {}
        for p in iter_params(TrainingConfig):
            k = p.meta.kohya
            plain = k and "." not in k and "/" not in k and "[]" not in p.path and k not in _SPECIAL
            if plain and k and p.path not in ("optimizer.class_path", "dataset.subsets"):
                self.params[k] = p

    # -------------------------------------------------------------------- small tools

    def set(self, path: str, value: Any) -> None:
        section, name = path.split(".", 1)
        self.data.setdefault(section, {})[name] = value.value if isinstance(value, Enum) else value

    def get(self, path: str, default: Any = None) -> Any:
        section, name = path.split(".", 1)
        return self.data.get(section, {}).get(name, default)

    def note(self, key: str, value: Any, why: str) -> None:
        self.unrep.append(f"{key} = {_fmt(value)}: {why}")

    def is_default(self, key: str, value: Any) -> bool:
        """True for values that ask for nothing (off, empty): leaving the key out would be the same."""
        return value is None or value is False or value == "" or value == [] or self.defaults.get(key) == value

    def value(self, key: str) -> Any:
        """The config's value, or sd-scripts' default where it differs from Nyx's (None when neither)."""
        if key in self.flat:
            self.used.add(key)
            return self.flat[key]
        return self.defaults.get(key)

    # -------------------------------------------------------------------- run

    def run(self) -> ImportResult:
        self.plain()
        self.model()
        self.length()
        self.network()
        self.optimizer()
        self.scheduler()
        self.misc()
        self.data_source()
        self.leftovers()
        problems: list[Problem] = []
        try:
            cfg: TrainingConfig | None = validate_data(self.data, base_dir=self.base_dir, source="sd-scripts config")
        except ConfigError as e:
            problems = list(e.problems)
            cfg = None
        return ImportResult(cfg, self.unrep, problems)

    def plain(self) -> None:
        """Keys that mean the same in both: the field's kohya name; a key left out takes sd-scripts' default."""
        for key, p in self.params.items():
            explicit = key in self.flat
            value = self.value(key)
            if value is None:
                continue
            if self.family not in p.meta.families:
                if explicit and not self.is_default(key, value):
                    fams = ", ".join(f.value for f in p.meta.families)
                    self.note(key, value, f"Nyx applies {p.path} only to {fams}, not {self.family.value}")
                continue
            base = _base_type(p.annotation)
            if base is bool:
                b = _as_bool(value)
                if b is None:
                    self.note(key, value, f"{p.path} is true or false")
                    continue
                value = b
            elif base is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            self.set(p.path, value)

    def model(self) -> None:
        fam = self.family
        if "ae" in self.flat:
            self.used.add("ae")
            self.set("model.vae", self.flat["ae"])
        v2 = self.flat.get("v2")
        vpred = self.flat.get("v_parameterization")
        self.used.update(k for k in ("v2", "v_parameterization", "sdxl") if k in self.flat)
        if v2 and fam is not Family.SD2:
            self.note("v2", v2, f"an SD2 flag, but the config trains {fam.value}")
        if vpred and fam is not Family.SD2:
            self.note("v_parameterization", vpred, "Nyx reads the prediction type from the model's own config")
        if fam is Family.SD2 and v2 and not vpred:
            self.unrep.append(
                "v2 = true without v_parameterization: an SD2 epsilon (512 px) model; for a single-file checkpoint "
                'set model.single_file_config = "stabilityai/stable-diffusion-2-1-base"'
            )
        for key in ("max_token_length", "t5xxl_max_token_length"):
            if key in self.flat:
                self.used.add(key)
                v = self.flat[key]
                if v is not None:
                    self.set("dataset.max_token_length" if key == "max_token_length" else "flow.t5_max_token_length", v)
        fp8 = self.value("fp8_base")
        fp8_unet = self.value("fp8_base_unet")
        if fp8 or fp8_unet:
            if fam in (Family.FLUX, Family.SD3):
                self.set("training.base_quantization", "fp8")
            else:
                self.note("fp8_base" if fp8 else "fp8_base_unet", True, "Nyx stores the base in fp8 only for flux/sd3")
        if "t5xxl_device" in self.flat:
            self.used.add("t5xxl_device")
            dev = str(self.flat["t5xxl_device"]).lower()
            if dev == "cpu" and fam in (Family.FLUX, Family.SD3):
                self.set("flow.t5_on_cpu", True)
            elif not dev.startswith("cuda"):
                self.note(
                    "t5xxl_device", self.flat["t5xxl_device"], "Nyx runs T5 on the GPU or (flow.t5_on_cpu) the CPU"
                )
        if "seed" in self.flat:
            self.used.add("seed")
            if self.flat["seed"] is not None:
                self.set("training.seed", self.flat["seed"])
        else:
            self.unrep.append("seed (not set): sd-scripts picks a random seed; Nyx uses training.seed = 42")
        prec = self.value("save_precision")
        self.set("saving.precision", prec if prec is not None else "float")

    def length(self) -> None:
        steps = self.value("max_train_steps")
        epochs = self.flat.get("max_train_epochs")
        self.used.add("max_train_epochs") if "max_train_epochs" in self.flat else None
        if epochs:  # sd-scripts: epochs, when given, override steps
            self.set("training.max_epochs", epochs)
            self.set("training.max_steps", 0)
        else:
            self.set("training.max_steps", steps if steps is not None else 1600)
            self.set("training.max_epochs", 0)
        # sd-scripts keeps the saves of the last N epochs, or of the last N *steps*; Nyx the last N files
        keep_e, keep_s = self.flat.get("save_last_n_epochs"), self.flat.get("save_last_n_steps")
        every_s = self.flat.get("save_every_n_steps") or 0
        keep = keep_e
        if keep_s:
            if every_s and keep_s % every_s == 0 and (not keep_e or keep_e == keep_s // every_s):
                keep = keep_s // every_s
            else:
                self.note(
                    "save_last_n_steps",
                    keep_s,
                    "Nyx keeps the last N saved files (saving.keep_last_n), "
                    "not the saves of the last N steps; set saving.keep_last_n",
                )
        if keep:
            self.set("saving.keep_last_n", keep)
        warm = self.flat.get("lr_warmup_steps")
        if warm is not None:
            self.used.add("lr_warmup_steps")
            if isinstance(warm, float) and warm < 1:  # sd-scripts: a float below 1 is a ratio of the steps
                total = self.get("training.max_steps")
                if total:
                    self.set("scheduler.warmup_steps", int(warm * total))
                else:
                    self.note(
                        "lr_warmup_steps",
                        warm,
                        "a warmup ratio needs a step count (Nyx: scheduler.warmup_steps "
                        "is in steps, and this config trains by epochs)",
                    )
            else:
                self.set("scheduler.warmup_steps", int(warm))

    # -------------------------------------------------------------------- network

    def network(self) -> None:
        module = self.value("network_module")
        args = _parse_kv(self.value("network_args"), "network_args", self.unrep)
        kind = NetworkKind.LORA
        if module == _LYCORIS:
            algo = str(args.pop("algo", "lora")).lower()
            dora = _as_bool(args.pop("dora_wd", False))
            if algo not in _ALGOS:
                self.note("network_args.algo", algo, "a LyCORIS algorithm Nyx does not train (lora/locon, loha, lokr)")
            kind = _ALGOS.get(algo, NetworkKind.LOCON)
            if dora:
                if algo in ("lora", "locon"):
                    kind = NetworkKind.DORA
                else:
                    self.note("network_args.dora_wd", True, f"Nyx has DoRA only for lora/locon, not {algo}")
        elif module is not None and module not in _MODULES:
            self.note("network_module", module, "not a network Nyx trains (networks.lora* or lycoris.kohya)")
        self.set("network.kind", kind)
        unet_only = _as_bool(self.value("network_train_unet_only"))
        te_only = _as_bool(self.value("network_train_text_encoder_only"))
        self.set("network.train_text_encoder", not unet_only)
        self.set("network.train_unet", not te_only)
        # sd-scripts: unet_lr and text_encoder_lr override learning_rate for their part; Nyx: learning_rate is
        # the adapter's, text_encoder_lr (empty: the same) the text encoders'
        lr = self.value("learning_rate")
        unet_lr = self.value("unet_lr")
        te_lr = self.value("text_encoder_lr")
        if isinstance(te_lr, list):
            if len(set(te_lr)) > 1:
                self.note(
                    "text_encoder_lr", te_lr, "Nyx has one learning rate for all text encoders; the first is used"
                )
            te_lr = te_lr[0] if te_lr else None
        main = unet_lr if unet_lr is not None else lr
        if main is not None:
            self.set("optimizer.learning_rate", float(main))
        te = te_lr if te_lr is not None else lr
        if te is not None and te != main:
            self.set("network.text_encoder_lr", float(te))
        self.network_args(args)

    def network_args(self, args: dict[str, Any]) -> None:
        fam = self.family
        unet = fam in (Family.SD15, Family.SD2, Family.SDXL)
        simple = {
            "conv_dim": ("network.conv_dim", int),
            "conv_alpha": ("network.conv_alpha", float),
            "rank_dropout": ("network.rank_dropout", float),
            "module_dropout": ("network.module_dropout", float),
            "factor": ("network.lokr_factor", int),
        }
        lists = {
            "block_dims": ("network.block_dims", int),
            "block_alphas": ("network.block_alphas", float),
            "conv_block_dims": ("network.conv_block_dims", int),
            "conv_block_alphas": ("network.conv_block_alphas", float),
        }
        lr_weights: dict[str, list[Any]] = {}
        type_dims: dict[str, int] = {}
        no_conv = False
        lycoris = self.flat.get("network_module") == _LYCORIS
        for key, raw in args.items():
            name = f"network_args.{key}"
            value = _literal(raw)
            if lycoris and key in tr.LORA_MODULE_ONLY_ARGS:
                self.note(name, raw, "lycoris.kohya does not read it (only sd-scripts' own LoRA modules do)")
            elif key in simple:
                path, typ = simple[key]
                if key.startswith("conv") and not unet:
                    self.note(name, raw, f"convolution adapters are for the UNet families, not {fam.value}")
                    continue
                if key == "factor" and value == -1:
                    continue  # LyCORIS: -1 = as square as possible, Nyx's empty
                if isinstance(value, int | float) and not isinstance(value, bool):
                    self.set(path, typ(value))
                else:
                    self.note(name, raw, f"{path} is a number")
            elif key in lists and unet:
                parsed = _as_list(raw)
                if parsed is None:
                    self.note(name, raw, "not a comma-separated list of numbers")
                else:
                    self.set(lists[key][0], [lists[key][1](x) for x in parsed])
            elif key in ("down_lr_weight", "mid_lr_weight", "up_lr_weight") and unet:
                parsed = _as_list(raw)
                if parsed is None:
                    self.note(name, raw, "a named lr-weight shape (sine, cosine…) is not a Nyx option; give numbers")
                else:
                    lr_weights[key] = parsed
            elif key == "train_blocks" and fam is Family.FLUX:
                if str(value) in ("all", "double", "single"):
                    self.set("flow.train_blocks", str(value))
                else:
                    self.note(name, raw, "Flux train_blocks is all, double or single")
            elif (fam is Family.FLUX and key in ("train_double_block_indices", "train_single_block_indices")) or (
                fam is Family.SD3 and key == tr.DOUBLE_BLOCK_INDEX_ARGS[Family.SD3]
            ):
                got = _indices(raw)
                if isinstance(got, str):
                    self.note(name, raw, got)
                elif got is not None:
                    self.set("flow.single_block_indices" if "single" in key else "flow.double_block_indices", got)
            elif key.endswith("_dim") and key[:-4] in FLUX_TYPE_DIMS and fam is Family.FLUX:
                if isinstance(value, int) and not isinstance(value, bool):
                    type_dims[key[:-4]] = value
                else:
                    self.note(name, raw, "a type rank is a whole number")
            elif key == "split_qkv" and fam in (Family.FLUX, Family.SD3):
                self.set("flow.split_qkv", bool(_as_bool(raw)))
            elif key in ("preset",) and str(value).lower() in ("full", "default"):
                continue  # LyCORIS's default target set
            elif key == "preset" and str(value).lower() == tr.LYCORIS_NO_CONV_PRESET:
                no_conv = True  # LyCORIS' default set without the 3x3 convolutions
            elif (
                key
                in (
                    "use_tucker",
                    "use_scalar",
                    "train_norm",
                    "bypass_mode",
                    "rank_dropout_scale",
                    "use_cp",
                    "decompose_both",
                    "full_matrix",
                )
                and _as_bool(raw) is False
            ):
                continue
            elif key == "loraplus_lr_ratio" or key.startswith("loraplus"):
                self.note(name, raw, "LoRA+ (separate learning rate for the up weights) is not a Nyx option")
            else:
                self.note(name, raw, f"no Nyx network option for {fam.value} matches it")
        if lr_weights:
            if set(lr_weights) == {"down_lr_weight", "mid_lr_weight", "up_lr_weight"}:
                self.set(
                    "network.block_lr_weights",
                    [float(x) for k in ("down_lr_weight", "mid_lr_weight", "up_lr_weight") for x in lr_weights[k]],
                )
            else:
                for k, v in lr_weights.items():
                    self.note(f"network_args.{k}", v, "Nyx takes block lr weights as down + mid + up together")
        if type_dims:
            self.set("flow.block_type_dims", type_dims)
        # the same convolution rank written out or left empty: Nyx's empty is dim/alpha for the LyCORIS kinds (as
        # LyCORIS defaults them) and conv_alpha's empty is alpha, so the explicit equal values are folded away
        net = self.data.get("network", {})
        kind = str(getattr(net.get("kind"), "value", net.get("kind")))
        if unet and kind in ("locon", "loha", "lokr", "dora"):
            # lycoris.kohya: conv_dim absent (or 0) means convolutions at rank dim, unless the preset has none
            if no_conv:
                if net.get("conv_dim"):
                    self.note(
                        "network_args.conv_dim", net["conv_dim"], f"ignored by LyCORIS' {tr.LYCORIS_NO_CONV_PRESET}"
                    )
                net.pop("conv_alpha", None)
                if kind == "dora":
                    net.pop("conv_dim", None)  # Nyx's DoRA: no convolutions when empty
                else:
                    net["conv_dim"] = 0
            elif kind == "dora" and not net.get("conv_dim"):
                net["conv_dim"] = int(self.value("network_dim") or net.get("dim") or 4)  # LyCORIS: dim
        if net.get("conv_alpha") is not None and net.get("conv_alpha") == net.get("alpha"):
            del net["conv_alpha"]
        if (
            net.get("kind") in ("locon", "loha", "lokr")
            and net.get("conv_dim") == net.get("dim")
            and "conv_alpha" not in net
        ):
            net.pop("conv_dim", None)

    # -------------------------------------------------------------------- optimizer & schedule

    def optimizer(self) -> None:
        name = self.value("optimizer_type") or "AdamW"  # sd-scripts: empty = AdamW (or the use_* flags)
        if self.flat.get("use_8bit_adam"):
            name = "AdamW8bit"
        if self.flat.get("use_lion_optimizer"):
            name = "Lion"
        self.used.update(k for k in ("use_8bit_adam", "use_lion_optimizer") if k in self.flat)
        kind = _OPTIMIZERS.get(str(name).lower())
        if kind is None and "." in str(name):
            kind = OptimizerKind.CUSTOM
            self.set("optimizer.class_path", str(name))
        if kind is None:
            self.note(
                "optimizer_type",
                name,
                "an sd-scripts optimizer Nyx does not offer (adamw, adamw8bit, lion, lion8bit, prodigy, came, "
                "adafactor, adamw_schedulefree, or a dotted class path)",
            )
            kind = OptimizerKind.ADAMW
        self.set("optimizer.type", kind)
        raw = _parse_kv(self.value("optimizer_args"), "optimizer_args", self.unrep)
        args = {k: _literal(v) for k, v in raw.items()}
        for k, v in tr.OPTIMIZER_ARG_DEFAULTS.get(kind, {}).items():
            if k not in args:
                self.note(f"optimizer_args.{k}", "(not set)", f"Nyx's {kind.value} always runs with {k}={v}")
            elif args[k] == v:
                del args[k]
            # else: the different value stays in optimizer.args, which overrides Nyx's own
        section = tr.OPTIMIZER_SECTION_KEYS.get(kind, ())
        if "weight_decay" in section:
            wd = args.pop("weight_decay", _DEFAULT_WD.get(kind, 0.0))
            if isinstance(wd, int | float) and not isinstance(wd, bool):
                self.set("optimizer.weight_decay", float(wd))
            else:
                args["weight_decay"] = wd
        b = args.get("betas")
        if (
            "betas" in section
            and isinstance(b, tuple | list)
            and len(b) == 2
            and all(isinstance(x, int | float) and not isinstance(x, bool) for x in b)
        ):
            self.set("optimizer.betas", [float(x) for x in b])
            del args["betas"]
        eps = args.get("eps")
        if "eps" in section and isinstance(eps, int | float) and not isinstance(eps, bool):
            self.set("optimizer.eps", float(eps))
            del args["eps"]
        clean: dict[str, Any] = {}
        for k, v in args.items():
            if isinstance(v, bool | int | float | str):
                clean[k] = v
            elif isinstance(v, tuple | list) and all(isinstance(x, int | float) for x in v):
                clean[k] = raw[k]  # Nyx keeps a tuple as the literal text sd-scripts reads (documented)
            else:
                self.note(f"optimizer_args.{k}", raw[k], "optimizer.args holds numbers, booleans and strings")
        if clean:
            self.set("optimizer.args", clean)

    def scheduler(self) -> None:
        custom = self.flat.get("lr_scheduler_type")
        parsed = _parse_kv(self.value("lr_scheduler_args"), "lr_scheduler_args", self.unrep)
        sargs = {k: _literal(v) for k, v in parsed.items()}
        if custom:
            self.used.add("lr_scheduler_type")
            kind = _CUSTOM_SCHEDULERS.get(str(custom))
            if kind is None:
                self.note("lr_scheduler_type", custom, "a custom scheduler class is not a Nyx option")
            else:
                # the export passes the step counts in lr_scheduler_args (sd-scripts gives a custom class none)
                self.set("scheduler.type", kind)
                total = sargs.pop("total_steps", None)
                if total is not None and total != self.get("training.max_steps"):
                    self.note("lr_scheduler_args.total_steps", total, "Nyx's schedule spans training.max_steps")
                if isinstance(sargs.get("warmup_steps"), int):
                    self.set("scheduler.warmup_steps", sargs.pop("warmup_steps"))
        if self.get("scheduler.type") is None:
            name = self.value("lr_scheduler") or "constant"
            sk = _SCHEDULERS.get(str(name))
            if sk is None:
                choices = ", ".join(k.value for k in SchedulerKind)
                self.note("lr_scheduler", name, f"an sd-scripts schedule Nyx does not offer ({choices})")
            else:
                self.set("scheduler.type", sk)
        for k, val in sargs.items():
            if k == "min_lr_ratio" and isinstance(val, int | float) and not isinstance(val, bool):
                self.set("scheduler.min_lr_ratio", float(val))
            else:
                self.note(f"lr_scheduler_args.{k}", parsed[k], "Nyx's schedules take no such argument")

    def misc(self) -> None:
        prompts = self.flat.get("sample_prompts")
        if prompts:
            self.used.add("sample_prompts")
            path = _resolve(str(prompts), self.base_dir or Path.cwd())
            if path.suffix == ".txt" and path.is_file():
                lines = path.read_text(encoding="utf-8").splitlines()
                self.set("sampling.prompts", [x.strip() for x in lines if x.strip() and not x.lstrip().startswith("#")])
            else:
                self.note(
                    "sample_prompts",
                    prompts,
                    "Nyx reads a .txt prompt file that exists (one prompt a line); put the prompts in sampling.prompts",
                )
        if self.flat.get("alpha_mask"):
            self.used.add("alpha_mask")
            self.set("training.masked_loss", True)

    # -------------------------------------------------------------------- dataset

    def resolution(self, key: str, value: Any) -> int | None:
        """`"W,H"`, `"W"`, W or [W, H] → W when square; a note otherwise."""
        if isinstance(value, str):
            parts = [p.strip() for p in value.split(",") if p.strip()]
        elif isinstance(value, list | tuple):
            parts = list(value)
        else:
            parts = [value]
        try:
            sides = [int(p) for p in parts]
        except (TypeError, ValueError):
            self.note(key, value, "not a resolution (W or W,H)")
            return None
        if (len(sides) == 2 and sides[0] != sides[1]) or len(sides) not in (1, 2):
            self.note(
                key,
                value,
                "a non-square training size: Nyx trains at a square dataset.resolution (with "
                "enable_bucket, buckets of that area); set it to the side you want",
            )
            return None
        return sides[0]

    def data_source(self) -> None:
        if "resolution" in self.flat:
            self.used.add("resolution")
            r = self.resolution("resolution", self.flat["resolution"])
            if r is not None:
                self.set("dataset.resolution", r)
        self.used.add("dataset_config") if "dataset_config" in self.flat else None
        if self.dataset is not None:
            self.dataset_toml(self.dataset)
            for key in ("train_data_dir", "reg_data_dir"):
                if self.flat.get(key):
                    self.used.add(key)
                    self.note(key, self.flat[key], "sd-scripts ignores it when a dataset config is given")
            return
        for key in ("train_data_dir", "reg_data_dir"):
            if self.flat.get(key):
                self.used.add(key)
                self.set(f"dataset.{key}", str(self.flat[key]))
        if self.flat.get("dataset_config"):
            self.note("dataset_config", self.flat["dataset_config"], "not read: pass the dataset TOML too (--dataset)")
        elif not self.flat.get("train_data_dir"):
            self.unrep.append("(no dataset): neither a dataset TOML nor train_data_dir; add dataset.subsets")

    def dataset_toml(self, toml: dict[str, Any]) -> None:
        general = toml.get("general") or {}
        datasets = toml.get("datasets") or []
        if (
            not isinstance(general, dict)
            or not isinstance(datasets, list)
            or not all(
                isinstance(d, dict)
                and isinstance(d.get("subsets", []), list)
                and all(isinstance(x, dict) for x in d.get("subsets", []))
                for d in datasets
            )
        ):
            raise ValueError("the dataset TOML needs [general], [[datasets]] and [[datasets.subsets]] tables")
        for key in set(toml) - {"general", "datasets"}:
            self.note(f"dataset TOML {key}", toml[key], "not a section of sd-scripts' dataset config")
        subsets: list[dict[str, Any]] = []
        level_ext: set[Any] = set()  # general/dataset-level caption extensions
        wide: dict[str, list[Any]] = {}  # dataset-wide Nyx fields as each subset sees them
        for di, ds in enumerate(datasets):
            ds_level = {k: v for k, v in ds.items() if k != "subsets"}
            for si, sub in enumerate(ds.get("subsets", []) or []):
                merged = {**general, **ds_level, **sub}
                where = f"datasets[{di}].subsets[{si}]"
                if "image_dir" not in sub:
                    self.note(
                        where,
                        {k: v for k, v in sub.items()},
                        "a fine-tuning subset (metadata_file, no image_dir) "
                        "is not a Nyx dataset; Nyx trains folders of images with caption files",
                    )
                    continue
                s: dict[str, Any] = {
                    "image_dir": str(sub["image_dir"]),
                    "num_repeats": merged.get("num_repeats", 1),  # validated as Nyx's num_repeats
                }
                if merged.get("is_reg"):
                    s["is_reg"] = True
                if merged.get("class_tokens"):
                    s["class_tokens"] = str(merged["class_tokens"])
                if "caption_extension" in sub:
                    s["caption_extension"] = sub["caption_extension"]
                elif "caption_extension" in merged:
                    s["caption_extension"] = merged["caption_extension"]  # folded below when all agree
                    level_ext.add(merged["caption_extension"])
                subsets.append(s)
                for k, v in merged.items():
                    if k in _SUBSET_KEYS:
                        continue
                    wide.setdefault(k, []).append((where, v))
        if not subsets:
            self.unrep.append("(dataset TOML): no [[datasets.subsets]] with an image_dir")
        self.set("dataset.subsets", subsets)
        for key, seen in wide.items():
            values = [v for _, v in seen]
            first = values[0]
            if any(v != first for v in values):
                self.note(f"dataset TOML {key}", values, "differs between subsets; Nyx has one value for the dataset")
                continue
            self.dataset_key(key, first)
        # the dataset TOML's own caption extension (general/dataset) is the dataset-wide one; subsets that say
        # the same are folded into it
        if len(level_ext) == 1:
            self.set("dataset.caption_extension", next(iter(level_ext)))
        ext = self.get("dataset.caption_extension")
        for s in subsets:
            if s.get("caption_extension") == ext:
                del s["caption_extension"]

    def dataset_key(self, key: str, value: Any) -> None:
        name = f"dataset TOML {key}"
        if key == "resolution":
            r = self.resolution(name, value)
            if r is not None:
                self.set("dataset.resolution", r)
        elif key == "batch_size":
            self.set("training.batch_size", value)
        elif key == "alpha_mask":
            if value:
                self.set("training.masked_loss", True)
        elif key in self.params and self.params[key].path.startswith("dataset."):
            p = self.params[key]
            if _base_type(p.annotation) is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            self.set(p.path, value)
        elif key == "validation_seed" and value == self.get("training.seed", 42):
            return  # Nyx holds images out with training.seed
        elif value in (None, False, "", 0) or (key == "network_multiplier" and value == 1.0):
            return
        else:
            self.note(name, value, "no Nyx dataset option matches it")

    # -------------------------------------------------------------------- the rest

    def leftovers(self) -> None:
        for key, value in self.flat.items():
            if key in self.used or key in self.params or key in _SPECIAL:
                continue
            if self.is_default(key, value):
                continue
            why = _RUNTIME.get(key)
            self.note(key, value, f"not needed: {why}" if why else "no Nyx option matches it")
