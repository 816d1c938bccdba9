"""`network.weights` (sd-scripts' `--network_weights`: the adapter starts from a LoRA file), checked before
anything loads. Torch-free: the config check and the TUI's form run it. The file's safetensors header is
parsed here (JSON after an 8-byte length) and only the `.alpha` scalars are read from its data.

In order (a problem in 1 or 2 stops the checks after it; 3 and 4 are the UNet families' and run together):
1. the file exists, is a `.safetensors` file, and `families.detect` says it is a LoRA (not a base model, a
   VAE, a text encoder) for `model.family` ("this LoRA is for SDXL, the model is SD1.5");
2. it is in kohya names (`lora_unet_…`, `lora_te…`, what Nyx and sd-scripts write), and its tensors are
   one layout Nyx trains: lora_down/lora_up (lora, locon), + dora_scale (dora), hada_w… (loha), lokr_w…
   (lokr); Tucker (`lora_mid`, `hada_t1`, `lokr_t2`), DoRA on LoHa/LoKr and other LyCORIS algorithms are
   refused. The layout must fit `network.kind`.
3. the network would adapt the file's modules: text-encoder modules need `train_text_encoder`, UNet ones
   `train_unet`, 3x3 convolutions (told by their names) need convolutions on, the others a
   `target_modules` name (SDXL's SGM names are read back to diffusers' for that);
4. ranks (from the tensor shapes) and alphas equal the network's: `dim`/`alpha` for linear layers and the
   text encoders, `conv_dim`/`conv_alpha` for convolutions. Block-wise lists (`block_dims` & co.) vary
   them per block, which needs the model's layout: then the engine checks them, when it loads the file
   (`init_weights`), with the exact shapes.
Each mismatch is named with the setting that fixes it (`set network.dim = 4`).
Flux/SD3 files get steps 1 and 2 here (their network kinds: `network_check` refuses LoHa/LoKr there); their
fused q/k/v modules are split for the network and checked module by module when the engine loads the file
(`init_weights.split_flow_state`), where the model's block layout is known.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nyx_tui.config.errors import Problem
from nyx_tui.config.fields import UNET_FAMILIES
from nyx_tui.config.io import toml_value
from nyx_tui.config.model import NetworkKind, NetworkSection, TrainingConfig
from nyx_tui.families import Kind, called, defaults, describe, detect
from nyx_tui.trainers.native.kohya_names import RESNET, TOP

KEY = "network.weights"
PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit

# the tensors (besides `.alpha`) of each layout Nyx builds; lokr keeps a side whole or as two factors
LAYOUTS: dict[str, frozenset[str]] = {
    "lora": frozenset({"lora_down.weight", "lora_up.weight"}),
    "dora": frozenset({"lora_down.weight", "lora_up.weight", "dora_scale"}),
    "loha": frozenset({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}),
    "lokr": frozenset({"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b"}),
}
# which network.kind trains each layout (LoRA and LoCon files are the same tensors: peft or lycoris builds them)
LAYOUT_KINDS: dict[str, tuple[NetworkKind, ...]] = {
    "lora": (NetworkKind.LORA, NetworkKind.LOCON),
    "dora": (NetworkKind.DORA,),
    "loha": (NetworkKind.LOHA,),
    "lokr": (NetworkKind.LOKR,),
}
LAYOUT_NAMES = {
    "lora": "a LoRA/LoCon (lora_down/lora_up weights)",
    "dora": "a DoRA (lora_down/lora_up with dora_scale)",
    "loha": "a LoHa (hada_w1/hada_w2 weights)",
    "lokr": "a LoKr (lokr_w1/lokr_w2 weights)",
}
_KNOWN_EXTRAS = {
    "lora_mid.weight": "LyCORIS' Tucker decomposition (use_tucker)",
    "hada_t1": "LyCORIS' Tucker decomposition (use_tucker)",
    "lokr_t2": "LyCORIS' Tucker decomposition (use_tucker)",
    "dora_scale": "DoRA on LoHa/LoKr",
}

# 3x3 convolutions by their kohya names (the module name without `lora_unet_`), diffusers and SGM spellings:
# those of ResNet and up/down-sampling blocks (adapted whenever convolutions are on) and conv_in/conv_out
# (adapted only when target_modules names them)
_BLOCK_CONV = re.compile(
    r"(^|_)(resnets_\d+_conv[12]|(up|down)samplers_0_conv|in_layers_2|out_layers_3|\d+_0_op)$"
    r"|^output_blocks_\d+_[12]_conv$"
)
_TOP_CONV = {"conv_in", "conv_out", "input_blocks_0_0", "out_2"}
# SGM spellings → diffusers', for target_modules (which holds diffusers names)
_SGM_TOP = {sgm.replace(".", "_"): name.replace(".", "_") for name, sgm in TOP.items()}
_SGM_RESNET = {sgm.replace(".", "_"): name.replace(".", "_") for name, sgm in RESNET.items()} | {"op": "conv"}
# diffusers names worth suggesting for target_modules, most specific first
_SUGGESTED_TARGETS = (
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
    "time_emb_proj", "conv_shortcut", "conv_in", "conv_out",
)  # fmt: skip


# ------------------------------------------------------------------------------------------- the file


@dataclass
class FileModule:
    """One module of a kohya LoRA file: its tensors' shapes by key suffix (`.alpha` apart) and its alpha."""

    name: str
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    alpha: float | None = None

    @property
    def layout(self) -> str | None:
        """lora, dora, loha or lokr; None when its tensors are none of them."""
        keys = set(self.shapes)
        for layout, allowed in LAYOUTS.items():
            if layout == "lora" and "dora_scale" in keys:
                continue
            required = {"lokr_w1", "lokr_w1_a"} if layout == "lokr" else allowed
            if keys & required and keys <= allowed | set(_KNOWN_EXTRAS):
                return layout
        return None

    @property
    def extras(self) -> list[str]:
        """Tensors its layout does not have in Nyx's networks (Tucker, DoRA on LoHa/LoKr…)."""
        layout = self.layout
        return sorted(set(self.shapes) - LAYOUTS[layout]) if layout else []

    @property
    def rank(self) -> int | None:
        """The rank its shapes tell (None for a LoKr module kept as whole matrices)."""
        for key in ("lora_down.weight", "hada_w1_b", "lokr_w2_b", "lokr_w1_b"):
            if self.shapes.get(key):
                return self.shapes[key][0]
        return None

    @property
    def alpha_is_rank(self) -> bool:
        """LyCORIS' LoKr writes alpha = rank (a scale of 1) for a module it keeps as two whole matrices."""
        return "lokr_w1" in self.shapes and "lokr_w2" in self.shapes

    @property
    def text_encoder(self) -> bool:
        return self.name.startswith("lora_te")

    @property
    def unet_path(self) -> str:
        """The name without `lora_unet_`, in diffusers' spelling where it was SGM's (for target_modules)."""
        rest = self.name.removeprefix("lora_unet_")
        if rest in _SGM_TOP:
            return _SGM_TOP[rest]
        if rest.startswith(("input_blocks_", "middle_block_", "output_blocks_")):
            for sgm, name in _SGM_RESNET.items():
                if rest.endswith("_" + sgm):
                    return rest[: -len(sgm)] + name
        return rest

    @property
    def conv(self) -> bool:
        """A 3x3 convolution (by its name)."""
        rest = self.name.removeprefix("lora_unet_")
        return not self.text_encoder and (bool(_BLOCK_CONV.search(rest)) or rest in _TOP_CONV)

    @property
    def block_conv(self) -> bool:
        """A ResNet or sampling convolution: adapted whenever convolutions are on."""
        return not self.text_encoder and bool(_BLOCK_CONV.search(self.name.removeprefix("lora_unet_")))


@dataclass
class LoraFile:
    """A kohya LoRA file as its header tells it: modules, other keys, metadata."""

    path: Path
    modules: dict[str, FileModule]
    other_keys: list[str]  # keys outside kohya's lora_unet_/lora_te… names
    metadata: dict[str, str]


def _scalar(data: bytes, dtype: str) -> float | None:
    """A one-element tensor's value from its bytes (float dtypes only)."""
    if dtype == "BF16" and len(data) == 2:
        return float(struct.unpack("<f", b"\x00\x00" + data)[0])
    fmt = {"F16": "<e", "F32": "<f", "F64": "<d"}.get(dtype)
    if fmt is None or len(data) != struct.calcsize(fmt):
        return None
    return float(struct.unpack(fmt, data)[0])


def read_lora(path: Path) -> LoraFile:
    """The file's modules (shapes by suffix, alphas) from its header; raises ValueError/OSError when it is
    not a readable safetensors file."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if not 0 < n <= MAX_HEADER:
            raise ValueError("not a safetensors file (its header length is wrong)")
        header: dict[str, Any] = json.loads(f.read(n))
        start = 8 + n
        metadata = {str(k): str(v) for k, v in (header.pop("__metadata__", None) or {}).items()}
        modules: dict[str, FileModule] = {}
        other: list[str] = []
        for key, info in header.items():
            if not key.startswith(PREFIXES) or "." not in key:
                other.append(key)
                continue
            name, _, suffix = key.partition(".")
            module = modules.setdefault(name, FileModule(name))
            if suffix == "alpha":
                begin, end = info["data_offsets"]
                if end - begin <= 8:
                    f.seek(start + begin)
                    module.alpha = _scalar(f.read(end - begin), str(info["dtype"]))
            else:
                module.shapes[suffix] = tuple(int(d) for d in info["shape"])
    return LoraFile(path, modules, other, metadata)


# ------------------------------------------------------------------------------------------- the checks


def convs_on(net: NetworkSection) -> bool:
    """`networks.convs_on` (that module imports torch): whether ResNet/sampling convolutions are adapted."""
    if net.conv_dim == 0 and net.conv_block_dims is None:
        return False
    lycoris = (NetworkKind.LOCON, NetworkKind.LOHA, NetworkKind.LOKR)
    return net.conv_dim is not None or net.conv_block_dims is not None or net.kind in lycoris


def conv_rank(net: NetworkSection) -> int:
    """`networks.conv_rank`: the rank of convolution adapters outside block lists."""
    return net.dim if net.conv_dim is None else net.conv_dim


def _targeted(path: str, targets: list[str]) -> bool:
    """`networks._matches` on a kohya name: a target appears as whole `_`-separated segments."""
    padded = f"_{path}_"
    return any(f"_{t.replace('.', '_')}_" in padded for t in targets)


def _convs_take(net: NetworkSection, m: FileModule) -> bool:
    """Whether the network's convolution settings let it adapt this 3x3 convolution module."""
    if net.conv_dim == 0 and net.conv_block_dims is None:
        return False
    return convs_on(net) or not m.block_conv


def _adapts(net: NetworkSection, m: FileModule) -> bool:
    """Whether the network adapts this UNet module of the file (told by its name)."""
    if m.conv and not _convs_take(net, m):
        return False
    return m.block_conv or _targeted(m.unet_path, net.target_modules)


def _file_problems(cfg: TrainingConfig, value: str) -> tuple[list[Problem], LoraFile | None]:
    """Step 1: the file is a readable LoRA of the model's family."""
    path = Path(value).expanduser()
    if not path.exists():
        fix = (
            "give the .safetensors LoRA to continue from (relative paths start at the config's folder), "
            "or remove network.weights"
        )
        return [Problem(KEY, f"not found: {value}", fix)], None
    if path.is_dir():
        return [Problem(KEY, f"{value} is a folder, not a LoRA file", "point it at the LoRA's .safetensors file")], None
    if path.suffix.lower() != ".safetensors":
        return [
            Problem(
                KEY,
                f"{path.name} is not a .safetensors file (Nyx does not unpickle .ckpt/.pt files)",
                "use the LoRA's .safetensors file, or remove network.weights",
            )
        ], None
    family = cfg.model.family
    found = detect(path)
    if found.kind is not Kind.LORA:
        what = (
            f"is not a LoRA ({found.reason})" if found.kind is Kind.UNKNOWN else f"is a {found.kind} ({found.reason})"
        )
        where = {
            Kind.CHECKPOINT: "; a base model goes in model.pretrained",
            Kind.DIFFUSERS: "; a base model goes in model.pretrained",
            Kind.VAE: "; a VAE goes in model.vae",
        }.get(found.kind, "")
        return [
            Problem(KEY, f"{what}, not a LoRA to continue from", f"point network.weights at a LoRA file{where}")
        ], None
    if not found.fits(family):
        model = defaults(family)
        return [
            Problem(
                KEY,
                f"this LoRA is for {describe(found.families)} ({found.reason}), the model is {model.name}",
                f"use {model.called} LoRA, or train {called(found.families)} model (model.family, model.pretrained)",
            )
        ], None
    try:
        lora = read_lora(path)
    except (OSError, ValueError, KeyError, TypeError) as e:
        return [Problem(KEY, f"{path.name} cannot be read ({e})", "use another LoRA file")], None
    if not lora.modules:
        example = lora.other_keys[0] if lora.other_keys else "none"
        return [
            Problem(
                KEY,
                f"{path.name} is not in kohya names (e.g. {example}); Nyx continues from kohya-format LoRAs "
                "(lora_unet_…, lora_te…: what Nyx and sd-scripts save)",
                "use the kohya-format file, or remove network.weights",
            )
        ], None
    return [], lora


def _layout_problems(cfg: TrainingConfig, lora: LoraFile) -> list[Problem]:
    """Step 2: one layout Nyx trains, the one network.kind builds."""
    name = lora.path.name
    out: list[Problem] = []
    if lora.other_keys:
        out.append(
            Problem(
                KEY,
                f"{name} has {len(lora.other_keys)} keys outside kohya's names (e.g. {lora.other_keys[0]}): they "
                "would be left out",
                "use a LoRA in kohya names only, or remove network.weights",
            )
        )
    unknown = [m.name for m in lora.modules.values() if m.layout is None]
    if unknown:
        example = lora.modules[unknown[0]]
        out.append(
            Problem(
                KEY,
                f"{len(unknown)} modules of {name} are no adapter Nyx trains (e.g. {example.name} with "
                f"{', '.join(sorted(example.shapes)) or 'only an alpha'})",
                "use a LoRA, LoCon, LoHa, LoKr or DoRA file, or remove network.weights",
            )
        )
        return out
    extras = {e: m.name for m in lora.modules.values() for e in m.extras}
    for extra, module in extras.items():
        what = _KNOWN_EXTRAS.get(extra, "a tensor Nyx's networks do not have")
        out.append(
            Problem(
                KEY,
                f"{name} has {extra} tensors (e.g. {module}.{extra}): {what}, which Nyx does not train",
                "use a file trained without it, or remove network.weights",
            )
        )
    layouts = Counter(m.layout for m in lora.modules.values())
    if len(layouts) > 1:
        kinds = ", ".join(f"{n} {layout}" for layout, n in layouts.items())
        out.append(Problem(KEY, f"{name} mixes adapter kinds ({kinds} modules)", "use a file of one kind"))
        return out
    (layout,) = layouts
    assert layout is not None
    kind = cfg.network.kind
    if kind not in LAYOUT_KINDS[layout]:
        choices = " or ".join(toml_value(k.value) for k in LAYOUT_KINDS[layout])
        out.append(
            Problem(
                "network.kind",
                f"is {kind.value!r} but the LoRA in network.weights ({name}) is {LAYOUT_NAMES[layout]}",
                f"set network.kind = {choices}",
            )
        )
    return out


def _module_problems(cfg: TrainingConfig, lora: LoraFile) -> list[Problem]:
    """Step 3: every module of the file is one the network adapts."""
    net = cfg.network
    out: list[Problem] = []
    where = f"the LoRA in network.weights ({lora.path.name})"
    te = [m.name for m in lora.modules.values() if m.text_encoder]
    unet = [m for m in lora.modules.values() if not m.text_encoder]
    if te and not net.train_text_encoder:
        out.append(
            Problem(
                "network.train_text_encoder",
                f"is false but {where} has {len(te)} text-encoder modules: they would be left out of the result",
                "set network.train_text_encoder = true, or use a LoRA without text-encoder modules",
            )
        )
    if unet and not net.train_unet:
        out.append(
            Problem(
                "network.train_unet",
                f"is false but {where} has {len(unet)} UNet modules: they would be left out of the result",
                "set network.train_unet = true, or use a text-encoder-only LoRA",
            )
        )
    if not unet or not net.train_unet:
        return out
    no_convs = net.conv_dim == 0 and net.conv_block_dims is None
    convs = [m for m in unet if m.conv and not _convs_take(net, m)]
    if convs:
        ranks = Counter(m.rank for m in convs if m.rank is not None)
        alphas = Counter(m.alpha for m in convs if m.alpha is not None and not m.alpha_is_rank)
        rank = ranks.most_common(1)[0][0] if ranks else net.dim
        fix = f"set network.conv_dim = {rank}"
        if alphas and alphas.most_common(1)[0][0] != net.alpha:
            fix += f" and network.conv_alpha = {alphas.most_common(1)[0][0]:g}"
        why = "network.conv_dim = 0 turns them off" if no_convs else f"{net.kind.value} adapts them only with conv_dim"
        out.append(
            Problem(
                "network.conv_dim",
                f"{where} adapts {len(convs)} 3x3 convolutions (e.g. {convs[0].name}); {why}",
                fix,
            )
        )
    untargeted = [m for m in unet if not m.block_conv and not _targeted(m.unet_path, net.target_modules)]
    # (a named 3x3 convolution outside the blocks needs both: it may be in both problems)
    if untargeted:
        found = [t for t in _SUGGESTED_TARGETS if any(_targeted(m.unet_path, [t]) for m in untargeted)]
        wanted = list(net.target_modules) + [t for t in found if t not in net.target_modules]
        fix = (
            f"set network.target_modules = {toml_value(wanted)}"
            if found
            else "add the diffusers names of those modules to network.target_modules"
        )
        out.append(
            Problem(
                "network.target_modules",
                f"leaves out {len(untargeted)} modules of {where} (e.g. {untargeted[0].name})",
                fix,
            )
        )
    return out


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-3, abs_tol=1e-6)  # alphas saved in fp16/bf16 are rounded


def _number_problems(cfg: TrainingConfig, lora: LoraFile) -> list[Problem]:
    """Step 4: ranks and alphas (where no block-wise list makes them vary per block)."""
    net = cfg.network
    where = "the LoRA in network.weights"
    conv_alpha = net.alpha if net.conv_alpha is None else net.conv_alpha
    # (setting, its value, which modules it governs)
    rank_rules: list[tuple[str, float, list[FileModule]]] = [
        ("network.dim", net.dim, [m for m in lora.modules.values() if m.text_encoder]),
        ("network.conv_dim", conv_rank(net), []),
    ]
    alpha_rules: list[tuple[str, float, list[FileModule]]] = [
        ("network.alpha", net.alpha, [m for m in lora.modules.values() if m.text_encoder]),
        ("network.conv_alpha", conv_alpha, []),
    ]
    for m in lora.modules.values():
        if m.text_encoder or not _adapts(net, m):  # what is not adapted is a problem of its own (above)
            continue
        if not m.conv:
            if net.block_dims is None:
                rank_rules[0][2].append(m)
            if net.block_alphas is None:
                alpha_rules[0][2].append(m)
        else:
            if net.conv_block_dims is None:
                rank_rules[1][2].append(m)
            if net.conv_block_alphas is None:
                alpha_rules[1][2].append(m)
    out: list[Problem] = []
    for setting, want, modules in rank_rules:
        ranks = Counter(m.rank for m in modules if m.rank is not None)
        if not ranks or set(ranks) == {want}:
            continue
        what = "convolution modules" if setting == "network.conv_dim" else "modules"
        if len(ranks) == 1:
            (rank,) = ranks
            out.append(Problem(setting, f"is {want} but {where} has {what} of rank {rank}", f"set {setting} = {rank}"))
        else:
            listed = ", ".join(str(r) for r in sorted(ranks))
            out.append(
                Problem(
                    setting,
                    f"is {want} but the ranks of {where}'s {what} differ ({listed}): it was trained with block-wise "
                    "ranks",
                    "set network.block_dims / conv_block_dims as the file was trained (its metadata: ss_network_args)",
                )
            )
    for setting, want, modules in alpha_rules:
        # no alpha: loaders take alpha = rank (a scale of 1)
        alphas = Counter(float(m.alpha if m.alpha is not None else m.rank or 0) for m in modules if not m.alpha_is_rank)
        wrong = sorted(a for a in alphas if not _close(a, want))
        if not wrong:
            continue
        if len(alphas) == 1:
            out.append(
                Problem(setting, f"is {want:g} but {where} has alpha {wrong[0]:g}", f"set {setting} = {wrong[0]:g}")
            )
        else:
            listed = ", ".join(f"{a:g}" for a in sorted(alphas))
            out.append(
                Problem(
                    setting,
                    f"is {want:g} but the alphas of {where} differ per module ({listed})",
                    "set network.block_alphas / conv_block_alphas as the file was trained (its metadata: "
                    "ss_network_args)",
                )
            )
    return out


def weights_problems(cfg: TrainingConfig) -> list[Problem]:
    """Why `network.weights` cannot start this network: errors (and a warning with training.resume)."""
    value = cfg.network.weights
    if not value:
        return []
    out, lora = _file_problems(cfg, value)
    if lora is None:
        return out
    out += _layout_problems(cfg, lora)
    if out:
        return out
    if cfg.model.family in UNET_FAMILIES:  # the names and settings below are the UNet families' (as the engine's)
        out += _module_problems(cfg, lora)
        out += _number_problems(cfg, lora)
    if cfg.training.resume:
        out.append(
            Problem(
                KEY,
                "does nothing with training.resume: the state's own weights are loaded over it",
                "remove network.weights (resuming continues the state's run), or training.resume (to start "
                "anew from the LoRA)",
                severity="warning",
            )
        )
    return out
