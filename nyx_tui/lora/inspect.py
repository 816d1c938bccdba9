"""What a LoRA file holds, from its header and a few small tensors: `inspect_lora(path) -> LoraInfo`.

Torch-free (the TUI imports it): the header is read by `header.read_header` (bounded, checked), and only the
`.alpha` scalars are read from the data section, so a 1 GB file is inspected in milliseconds.

What it tells:
- the key format: `kohya` (sd-scripts' `lora_unet_…`, `lora_te…_…`; LyCORIS files with that prefix too),
  `peft` (diffusers/peft `….lora_A.weight` / `lora_B`, with `unet.`/`transformer.`/`text_encoder.` roots),
  `lycoris-prefix` (LyCORIS saved with a prefix nothing loads: `lycoris_…`, or module names with no
  `lora_unet_`; `convert.repair_prefix` fixes them), or `unknown`;
- the family (sd15, sd2, sdxl, flux, sd3): from `ss_base_model_version` / `modelspec.architecture` when the
  file says, else from module names and widths;
- the network kind per module and overall: lora, locon (LoRA on convolutions too), loha (`hada_w1_a`…),
  lokr (`lokr_w1`…), dora (`dora_scale`/`lora_magnitude_vector`), full (`diff`), `mixed` when kinds differ;
- each module's rank, alpha, in/out shape and whether it is a convolution (LoHa stores a convolution's
  kernel flattened into its input width: in = channels · kh · kw, kernel unknown); rank/alpha summaries; the
  parameter count; the `ss_*`/`modelspec.*` metadata, the training parameters in it, and the merged tag
  frequencies of `ss_tag_frequency`.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from nyx_tui.lora.header import FLOAT_DTYPES, LoraFileError, SafetensorsHeader, read_header, read_tensor

ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY
KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", "lora_te3_")
PEFT_ROOTS = ("unet.", "transformer.", "text_encoder.", "text_encoder_2.", "text_encoder_3.", "base_model.model.")

# the tensor names after the module name (kohya: after the first "."; peft: the tail of the key)
_SUFFIX = re.compile(
    r"^(?P<module>.+?)\.(?P<suffix>"
    r"lora_down\.weight|lora_up\.weight|lora_mid\.weight|alpha|dora_scale|scale"
    r"|hada_w1_a|hada_w1_b|hada_w2_a|hada_w2_b|hada_t1|hada_t2"
    r"|lokr_w1|lokr_w1_a|lokr_w1_b|lokr_w2|lokr_w2_a|lokr_w2_b|lokr_t2"
    r"|diff|diff_b|on_input|weight|bias"
    r"|lora_A\.weight|lora_B\.weight|lora_B\.bias|lora_A\.[^.]+\.weight|lora_B\.[^.]+\.weight"
    r"|lora_magnitude_vector(?:\.[^.]+)?(?:\.weight)?|lora\.down\.weight|lora\.up\.weight"
    r")$"
)
TRAINING_KEYS: tuple[tuple[str, str], ...] = (
    ("ss_steps", "steps"),
    ("ss_epoch", "epoch"),
    ("ss_num_epochs", "epochs"),
    ("ss_max_train_steps", "max_train_steps"),
    ("ss_learning_rate", "learning_rate"),
    ("ss_unet_lr", "unet_lr"),
    ("ss_text_encoder_lr", "text_encoder_lr"),
    ("ss_lr_scheduler", "lr_scheduler"),
    ("ss_lr_warmup_steps", "lr_warmup_steps"),
    ("ss_optimizer", "optimizer"),
    ("ss_resolution", "resolution"),
    ("ss_batch_size_per_device", "batch_size"),
    ("ss_total_batch_size", "total_batch_size"),
    ("ss_gradient_accumulation_steps", "gradient_accumulation_steps"),
    ("ss_num_train_images", "train_images"),
    ("ss_num_reg_images", "reg_images"),
    ("ss_num_batches_per_epoch", "batches_per_epoch"),
    ("ss_mixed_precision", "mixed_precision"),
    ("ss_seed", "seed"),
    ("ss_noise_offset", "noise_offset"),
    ("ss_min_snr_gamma", "min_snr_gamma"),
    ("ss_clip_skip", "clip_skip"),
    ("ss_network_module", "network_module"),
    ("ss_network_dim", "network_dim"),
    ("ss_network_alpha", "network_alpha"),
    ("ss_network_args", "network_args"),
    ("ss_network_dropout", "network_dropout"),
    ("ss_sd_model_name", "base_model"),
    ("ss_output_name", "output_name"),
    ("ss_training_started_at", "started_at"),
    ("ss_training_finished_at", "finished_at"),
    ("ss_training_comment", "comment"),
    ("ss_caption_extension", "caption_extension"),
    ("ss_shuffle_caption", "shuffle_caption"),
    ("ss_keep_tokens", "keep_tokens"),
    ("ss_flip_aug", "flip_aug"),
)


@dataclass
class ModuleInfo:
    """One adapted module: its name in the file, kind, rank, alpha (None: not stored; loaders take the rank),
    the shape of the weight it changes (out, in, kernel…), whether that is a convolution, its parameters."""

    name: str
    kind: str
    rank: int | None
    alpha: float | None
    out_features: int | None
    in_features: int | None
    kernel: tuple[int, ...] | None
    conv: bool
    params: int
    dtype: str
    keys: list[str] = field(default_factory=list)

    @property
    def scale(self) -> float | None:
        """alpha / rank (what the loaders multiply up·down by)."""
        if not self.rank:
            return None
        return (self.alpha if self.alpha is not None else self.rank) / self.rank


@dataclass
class Summary:
    """min / max / most common of a per-module number."""

    min: float | None = None
    max: float | None = None
    most_common: float | None = None
    values: dict[str, int] = field(default_factory=dict)  # value (as text) → how many modules

    @classmethod
    def of(cls, values: list[float]) -> Summary:
        if not values:
            return cls()
        counts = Counter(values)
        return cls(min(values), max(values), counts.most_common(1)[0][0], {f"{v:g}": n for v, n in counts.items()})


@dataclass
class LoraInfo:
    """Everything `inspect_lora` finds (module docstring); `to_json()` gives a JSON-ready dict."""

    path: str
    file_size: int
    key_format: str
    family: str | None
    family_source: str  # "metadata", "keys" or "unknown"
    network: str
    modules: list[ModuleInfo]
    rank: Summary
    alpha: Summary
    parameters: int
    dtypes: dict[str, int]
    components: dict[str, int]  # unet / text_encoder / text_encoder_2 / … → modules
    metadata: dict[str, str]
    training: dict[str, Any]
    tag_frequency: list[tuple[str, int]]
    datasets: dict[str, dict[str, int]]
    problems: list[str] = field(default_factory=list)

    @property
    def title(self) -> str:
        return self.metadata.get("modelspec.title") or self.metadata.get("ss_output_name") or Path(self.path).stem

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["tag_frequency"] = [{"tag": t, "count": n} for t, n in self.tag_frequency]
        for m in d["modules"]:
            m["kernel"] = list(m["kernel"]) if m["kernel"] is not None else None
        return d


# ------------------------------------------------------------------------------------------ keys


def split_key(key: str) -> tuple[str, str]:
    """(module, tensor suffix) of a LoRA key: the known tensor names at its end (`lora_down.weight`, `alpha`,
    `hada_w1_a`, peft's `lora_A.weight`…) and the module name before them (kohya names have no dots; peft
    ones do: `unet.down_blocks.0….to_q` + `lora_A.weight`). ("key", "") for an unknown tail."""
    m = _SUFFIX.match(key)
    if m is None:
        return key, ""
    return m.group("module"), m.group("suffix")


def module_kind(suffixes: set[str], conv: bool) -> str:
    """The network kind of one module from its tensor names."""
    if any(s.startswith("hada_") for s in suffixes):
        return "loha"
    if any(s.startswith("lokr_") for s in suffixes):
        return "lokr"
    if "dora_scale" in suffixes or any(s.startswith("lora_magnitude_vector") for s in suffixes):
        return "dora"
    if "diff" in suffixes:
        return "full"
    if suffixes & {"lora_down.weight", "lora_A.weight", "lora.down.weight"} or any(
        s.startswith("lora_A.") for s in suffixes
    ):
        return "locon" if conv else "lora"
    if "on_input" in suffixes or suffixes == {"weight"}:
        return "ia3"
    return "unknown"


def key_format(modules: list[str]) -> str:
    """kohya, peft, lycoris-prefix, or unknown (module docstring)."""
    if not modules:
        return "unknown"
    kohya = [m.startswith(KOHYA_PREFIXES) for m in modules]
    if all(kohya):
        return "kohya"
    dotted = ["." in m for m in modules]
    if all(dotted):
        return "peft"
    if not any(dotted) and not any(kohya):
        return "lycoris-prefix"
    if not any(dotted):  # some kohya names, some not: a partly wrong prefix
        return "lycoris-prefix"
    return "mixed"


def component(module: str) -> str:
    """The model part a module adapts: unet / transformer / text_encoder / text_encoder_2 / text_encoder_3."""
    for prefix, part in (
        ("lora_unet_", "unet"),
        ("lora_te1_", "text_encoder"),
        ("lora_te2_", "text_encoder_2"),
        ("lora_te3_", "text_encoder_3"),
        ("lora_te_", "text_encoder"),
    ):
        if module.startswith(prefix):
            return part
    root = module.removeprefix("base_model.model.").split(".", 1)[0]
    if root in ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3"):
        return root
    if module.startswith(("lycoris_", "lora_")):
        return "unet"
    return "unknown"


# ------------------------------------------------------------------------------------------ family

_VERSION_FAMILY = (
    (re.compile(r"^sd_v1"), "sd15"),
    (re.compile(r"^sd_v2|^v2"), "sd2"),
    (re.compile(r"^sdxl"), "sdxl"),
    (re.compile(r"^flux"), "flux"),
    (re.compile(r"^(sd3|medium|large|5-large|5-medium|3)"), "sd3"),
)
_ARCH_FAMILY = (
    ("stable-diffusion-xl", "sdxl"),
    ("stable-diffusion-v1", "sd15"),
    ("stable-diffusion-v2", "sd2"),
    ("stable-diffusion-3", "sd3"),
    ("flux-1", "flux"),
    ("flux", "flux"),
)


def family_from_metadata(meta: dict[str, str]) -> str | None:
    """The family the file's metadata names (`ss_base_model_version`, `modelspec.architecture`, `ss_v2`)."""
    arch = meta.get("modelspec.architecture", "").lower()
    for prefix, fam in _ARCH_FAMILY:
        if arch.startswith(prefix):
            return fam
    version = meta.get("ss_base_model_version", "").lower()
    for pattern, fam in _VERSION_FAMILY:
        if version and pattern.search(version):
            return fam
    if meta.get("ss_v2", "").lower() == "true":
        return "sd2"
    return None


def family_from_keys(modules: dict[str, ModuleInfo]) -> str | None:
    """The family from module names (and a few widths): Flux's double/single blocks, SD3's joint blocks,
    SDXL's SGM names or second text encoder, else an SD1/SD2 UNet (1024-wide cross-attention or text
    encoder: SD2)."""
    names = list(modules)
    text = "\n".join(names)
    if re.search(r"double_blocks|single_blocks|single_transformer_blocks", text):
        return "flux"
    if re.search(r"joint_blocks|context_block", text):
        return "sd3"
    if re.search(r"(^|\n)transformer\.transformer_blocks", text) and "add_q_proj" in text:
        return "sd3"
    if re.search(r"input_blocks|output_blocks|middle_block|lora_te1_|lora_te2_|text_encoder_2\.", text):
        return "sdxl"
    widths = {m.in_features for n, m in modules.items() if re.search(r"attn2[._]to_k$", n)}
    te_widths = {m.in_features for n, m in modules.items() if re.search(r"self_attn[._]q_proj$", n)}
    if widths & {2048} or re.search(r"transformer_blocks[._][1-9]", text):
        return "sdxl"
    if widths & {1024} or te_widths & {1024}:
        return "sd2"
    if re.search(r"down_blocks|up_blocks|mid_block|lora_te_", text):
        return "sd15"
    return None


# ------------------------------------------------------------------------------------------ modules


def _shape_of(kind: str, shapes: dict[str, tuple[int, ...]]) -> tuple[int | None, int | None, tuple[int, ...] | None]:
    """(out, in, kernel) of the weight a module changes, from its tensors' shapes."""
    down = shapes.get("lora_down.weight") or shapes.get("lora_A.weight") or shapes.get("lora.down.weight")
    up = shapes.get("lora_up.weight") or shapes.get("lora_B.weight") or shapes.get("lora.up.weight")
    if down is not None and up is not None:
        kernel = tuple(down[2:]) if len(down) > 2 else None
        if "lora_mid.weight" in shapes:
            kernel = tuple(shapes["lora_mid.weight"][2:])
        return up[0], down[1], kernel
    if kind == "loha" and "hada_w1_a" in shapes and "hada_w1_b" in shapes:
        out, inn = shapes["hada_w1_a"][0], shapes["hada_w1_b"][1]
        if "hada_t1" in shapes:
            t = shapes["hada_t1"]
            return shapes["hada_w1_a"][0], shapes["hada_w1_b"][0], tuple(t[2:])
        return out, inn, None
    if kind == "lokr":

        def factor(n: int) -> tuple[int, int] | None:
            full = shapes.get(f"lokr_w{n}")
            if full is not None:
                return full[0], full[1]
            a, b = shapes.get(f"lokr_w{n}_a"), shapes.get(f"lokr_w{n}_b")
            if a is not None and b is not None:
                return a[0], b[1]
            return None

        w1, w2 = factor(1), factor(2)
        if w1 and w2:
            kernel = None
            w2_full = shapes.get("lokr_w2") or shapes.get("lokr_w2_b")
            if w2_full is not None and len(w2_full) > 2:
                kernel = tuple(w2_full[2:])
            if "lokr_t2" in shapes:
                kernel = tuple(shapes["lokr_t2"][2:])
            return w1[0] * w2[0], w1[1] * w2[1], kernel
    if "diff" in shapes:
        d = shapes["diff"]
        return d[0], d[1] if len(d) > 1 else None, tuple(d[2:]) if len(d) > 2 else None
    return None, None, None


def _rank_of(kind: str, shapes: dict[str, tuple[int, ...]]) -> int | None:
    for key in ("lora_down.weight", "lora_A.weight", "lora.down.weight"):
        if key in shapes:
            return shapes[key][0]
    if kind == "loha" and "hada_w1_b" in shapes:
        return shapes["hada_w1_b"][0]
    if kind == "lokr":
        for key in ("lokr_w2_b", "lokr_w1_b"):
            if key in shapes:
                return shapes[key][0]
        return None  # full-matrix LoKr factors: no rank
    return None


def read_modules(header: SafetensorsHeader) -> dict[str, ModuleInfo]:
    """The file's modules (file order), with ranks, shapes and the stored alphas (the only tensors read)."""
    groups: dict[str, dict[str, str]] = {}
    for key in header.tensors:
        module, suffix = split_key(key)
        groups.setdefault(module, {})[suffix] = key
    out: dict[str, ModuleInfo] = {}
    with open(header.path, "rb") as f:
        for module, parts in groups.items():
            shapes = {s: header.tensors[k].shape for s, k in parts.items()}
            kernel_dims = [len(v) for s, v in shapes.items() if s not in ("alpha", "scale", "dora_scale")]
            conv = any(n == 4 for n in kernel_dims)
            kind = module_kind(set(parts), conv)
            out_f, in_f, kernel = _shape_of(kind, shapes)
            conv = conv or bool(kernel and any(k > 1 for k in kernel))
            if kind == "lora" and conv:
                kind = "locon"
            alpha: float | None = None
            if "alpha" in parts:
                entry = header.tensors[parts["alpha"]]
                if entry.numel == 1 and entry.dtype in (*FLOAT_DTYPES, "I64", "I32"):
                    alpha = float(read_tensor(header, parts["alpha"], f).reshape(-1)[0])
            params = sum(header.tensors[k].numel for s, k in parts.items() if s != "alpha")
            dtypes = Counter(header.tensors[k].dtype for s, k in parts.items() if s != "alpha")
            out[module] = ModuleInfo(
                name=module,
                kind=kind,
                rank=_rank_of(kind, shapes),
                alpha=alpha,
                out_features=out_f,
                in_features=in_f,
                kernel=kernel,
                conv=conv,
                params=params,
                dtype=dtypes.most_common(1)[0][0] if dtypes else "",
                keys=sorted(parts.values()),
            )
    peft_alphas = diffusers_alphas(header.metadata, [m for m, info in out.items() if info.alpha is None])
    for module, alpha in peft_alphas.items():
        out[module].alpha = alpha
    return out


# ------------------------------------------------------------------------------------------ metadata


def _pattern_value(patterns: Mapping[str, Any], module: str) -> Any:
    """peft's pattern lookup: the value of the first pattern that matches the end of the module path."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return None


def diffusers_alphas(meta: Mapping[str, str], modules: Iterable[str]) -> dict[str, float]:
    """Each peft module's alpha from diffusers' `lora_adapter_metadata` (LoraConfig per part: lora_alpha,
    alpha_pattern), where the module has no `.alpha` tensor; modules the metadata does not cover get none
    (alpha = rank, as diffusers takes it)."""
    raw = meta.get(ADAPTER_METADATA_KEY)
    if not raw:
        return {}
    try:
        doc = json.loads(raw)
    except ValueError:
        return {}
    out: dict[str, float] = {}
    for module in modules:
        part, _, rest = module.partition(".")
        alpha = _pattern_value(doc.get(f"{part}.alpha_pattern") or {}, rest)
        if alpha is None:
            alpha = doc.get(f"{part}.lora_alpha")
        if alpha is not None:
            out[module] = float(alpha)
    return out


def _number(text: str) -> Any:
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value if isinstance(value, (int, float, bool)) or value is None else text


def training_parameters(meta: dict[str, str]) -> dict[str, Any]:
    """The training facts of `ss_*` metadata under plain names, numbers as numbers; `network_args` and
    `datasets` parsed from their JSON; dataset folders from `ss_dataset_dirs`."""
    out: dict[str, Any] = {}
    for key, name in TRAINING_KEYS:
        if key in meta and meta[key] not in ("", "None"):
            out[name] = _number(meta[key])
    if isinstance(out.get("network_args"), str):
        with contextlib.suppress(ValueError):
            out["network_args"] = json.loads(out["network_args"])
    for key, name in (("ss_dataset_dirs", "dataset_dirs"), ("ss_datasets", "datasets")):
        if key in meta:
            try:
                out[name] = json.loads(meta[key])
            except ValueError:
                out[name] = meta[key]
    return out


def tag_frequencies(meta: dict[str, str]) -> tuple[list[tuple[str, int]], dict[str, dict[str, int]]]:
    """`ss_tag_frequency` ({folder: {tag: count}}) merged over folders, most frequent first (ties by tag),
    and the per-folder table as stored. Bad JSON gives nothing (the rest of the file still inspects)."""
    raw = meta.get("ss_tag_frequency")
    if not raw:
        return [], {}
    try:
        doc = json.loads(raw)
    except ValueError:
        return [], {}
    if not isinstance(doc, dict):
        return [], {}
    merged: Counter[str] = Counter()
    per_dir: dict[str, dict[str, int]] = {}
    for folder, tags in doc.items():
        if not isinstance(tags, dict):
            continue
        clean = {str(t).strip(): int(n) for t, n in tags.items() if isinstance(n, (int, float)) and str(t).strip()}
        per_dir[str(folder)] = clean
        merged.update(clean)
    return sorted(merged.items(), key=lambda kv: (-kv[1], kv[0])), per_dir


# ------------------------------------------------------------------------------------------ inspect


def inspect_lora(path: Path | str) -> LoraInfo:
    """Inspect a LoRA file (module docstring). `LoraFileError` when it is no readable safetensors file."""
    header = read_header(path)
    if not header.tensors:
        raise LoraFileError(f"{path}: holds no tensors", "check that this is the LoRA file, not an empty save")
    modules = read_modules(header)
    meta = header.metadata
    problems: list[str] = []
    family = family_from_metadata(meta)
    source = "metadata"
    if family is None:
        family, source = family_from_keys(modules), "keys"
    if family is None:
        source = "unknown"
    fmt = key_format(list(modules))
    if fmt == "lycoris-prefix":
        problems.append(
            "module names lack the kohya prefix (lora_unet_/lora_te_): nothing loads them; "
            "fix: nyx lora convert FILE -o OUT --to kohya --fix-prefix"
        )
    kinds = Counter(m.kind for m in modules.values())
    real = {k for k in kinds if k not in ("unknown",)}
    if real == {"lora", "locon"}:
        network = "locon"
    elif len(real) == 1:
        network = real.pop()
    elif not real:
        network = "unknown"
    else:
        network = "mixed"
    ranks = [float(m.rank) for m in modules.values() if m.rank is not None]
    alphas = [float(m.alpha if m.alpha is not None else m.rank) for m in modules.values() if m.rank is not None]
    missing = [m.name for m in modules.values() if m.kind == "unknown"]
    if missing:
        problems.append(f"{len(missing)} modules of an unknown kind (first: {missing[0]})")
    tags, per_dir = tag_frequencies(meta)
    return LoraInfo(
        path=str(path),
        file_size=header.file_size,
        key_format=fmt,
        family=family,
        family_source=source,
        network=network,
        modules=list(modules.values()),
        rank=Summary.of(ranks),
        alpha=Summary.of(alphas),
        parameters=sum(m.params for m in modules.values()),
        dtypes=dict(Counter(t.dtype for t in header.tensors.values())),
        components=dict(Counter(component(m) for m in modules)),
        metadata=dict(meta),
        training=training_parameters(meta),
        tag_frequency=tags,
        datasets=per_dir,
        problems=problems,
    )


def format_size(n: int) -> str:
    """Bytes for people: 1.2 MB, 340 KB."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n = n / 1000  # type: ignore[assignment]
    return f"{n} B"
