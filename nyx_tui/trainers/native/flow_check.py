"""Pre-flight for Flux and SD3 models given as separate files, and the file facts the loader shares. Torch-free.

Users rarely have a Flux or SD3 model as a diffusers folder. They have what ComfyUI lays out: a transformer
`.safetensors` (BFL layout `double_blocks.…` for Flux, SGM `joint_blocks.…` for SD3, often prefixed
`model.diffusion_model.`), beside it CLIP-L, CLIP-G and T5-XXL text encoders and the autoencoder as files of
their own — or a checkpoint that carries some of them inside (`text_encoders.clip_l.transformer.…`,
`first_stage_model.…`/`vae.…`). Which pieces a run still needs can be told from the file headers alone, so
this module says it before anything loads: "this Flux file has no text encoders: set model.t5xxl and
model.clip_l", a T5 given as model.clip_l, the configs and tokenizers (never inside such files) not in the
local Hugging Face cache. A six-hour run should not die at minute three over a missing piece.

Headers are read with safetensors' numpy reader (key names and shapes; no tensor is read), so the TUI and
`nyx check` call this without torch. `flow_files` (the loader) uses the same facts: which layout, which
variant (Flux dev or schnell; SD3 medium, 3.5 medium or 3.5 large), which pieces are inside.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from nyx_tui.config.errors import Problem
from nyx_tui.config.fields import FLOW_FAMILIES, Family
from nyx_tui.config.io import looks_like_repo_id
from nyx_tui.config.model import ModelSection, TrainingConfig

# the diffusers repos whose configs and tokenizers describe single files of each variant (only their JSON,
# text and sentencepiece files are read); the first of a family's list is tried first for its own variant
REFERENCE_REPOS: dict[str, str] = {
    "dev": "black-forest-labs/FLUX.1-dev",
    "schnell": "black-forest-labs/FLUX.1-schnell",
    "medium": "stabilityai/stable-diffusion-3-medium-diffusers",
    "3.5-medium": "stabilityai/stable-diffusion-3.5-medium",
    "3.5-large": "stabilityai/stable-diffusion-3.5-large",
}
FAMILY_VARIANTS: dict[Family, tuple[str, ...]] = {
    Family.FLUX: ("dev", "schnell"),
    Family.SD3: ("3.5-medium", "3.5-large", "medium"),
}
GATED = frozenset({"black-forest-labs/FLUX.1-dev", "stabilityai/stable-diffusion-3-medium-diffusers",
                   "stabilityai/stable-diffusion-3.5-medium", "stabilityai/stable-diffusion-3.5-large"})  # fmt: skip
CONFIG_PATTERNS = ["*.json", "*.txt", "*.model"]  # configs, tokenizer vocab/merges/spiece: no weights

TRANSFORMER_PREFIX = "model.diffusion_model."
ENCODER_PREFIXES: dict[str, str] = {  # how ComfyUI / SAI checkpoints carry their text encoders
    "clip_l": "text_encoders.clip_l.transformer.",
    "clip_g": "text_encoders.clip_g.transformer.",
    "t5xxl": "text_encoders.t5xxl.transformer.",
}
VAE_PREFIXES = ("first_stage_model.", "vae.")  # SD3 (SAI) and ComfyUI's Flux checkpoints
ENCODER_NAMES = {"clip_l": "CLIP-L", "clip_g": "CLIP-G", "t5xxl": "T5-XXL"}
ENCODER_FILES = {"clip_l": "clip_l.safetensors", "clip_g": "clip_g.safetensors", "t5xxl": "t5xxl_fp16.safetensors"}
FAMILY_ENCODERS: dict[Family, tuple[str, ...]] = {  # in the order the message names them
    Family.FLUX: ("t5xxl", "clip_l"),
    Family.SD3: ("t5xxl", "clip_l", "clip_g"),
}
FAMILY_NAMES = {Family.FLUX: "Flux", Family.SD3: "SD3"}
VAE_HINTS = {
    Family.FLUX: "the Flux autoencoder file (ae.safetensors from black-forest-labs/FLUX.1-dev or -schnell)",
    Family.SD3: "the SD3 VAE (a 16-channel AutoencoderKL: the vae/ folder of the same SD3 repo, or its file)",
}
SCHNELL_T5_TOKENS = 256  # what FLUX.1 schnell was trained with

# pipeline subfolders a config source must hold for each family (weights are not needed)
CONFIG_PARTS: dict[Family, tuple[str, ...]] = {
    Family.FLUX: ("scheduler", "tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2", "vae"),
    Family.SD3: ("scheduler", "tokenizer", "tokenizer_2", "tokenizer_3", "text_encoder", "text_encoder_2",
                 "text_encoder_3", "vae"),
}  # fmt: skip

_FLUX_KEY = re.compile(r"^(model\.diffusion_model\.)?(double_blocks|single_blocks)\.\d+\.")
_FLUX_DIFFUSERS_KEY = re.compile(r"^single_transformer_blocks\.\d+\.")
_SD3_KEY = re.compile(r"^(model\.diffusion_model\.)?joint_blocks\.\d+\.")
_SD3_DIFFUSERS_KEY = re.compile(r"^pos_embed\.proj\.weight$")
_T5_KEY = re.compile(r"^(encoder\.block\.\d+\.|shared\.weight$|encoder\.final_layer_norm\.)")
_CLIP_KEY = re.compile(r"^(text_model\.)?(embeddings\.token_embedding\.|encoder\.layers\.\d+\.self_attn\.)")
_CLIP_WIDTH_KEYS = ("text_model.final_layer_norm.weight", "final_layer_norm.weight")
_VAE_KEY = re.compile(r"^(encoder|decoder|quant_conv|post_quant_conv)\.")
CLIP_WIDTHS = {768: "clip_l", 1280: "clip_g"}


# ------------------------------------------------------------------------------------------ file facts


@dataclass
class Header:
    """A `.safetensors` file's key names and tensor shapes (read from its header; no tensor is read)."""

    path: Path
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str] = field(default_factory=dict)

    @property
    def keys(self) -> list[str]:
        return list(self.shapes)

    def shape(self, key: str) -> tuple[int, ...] | None:
        return self.shapes.get(key)


def read_header(path: str | Path) -> Header:
    """The header of a `.safetensors` file; raises (OSError, SafetensorError) when it cannot be read."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    dtypes: dict[str, str] = {}
    with safe_open(str(path), framework="numpy") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open is no dict)
            s = f.get_slice(key)
            shapes[key] = tuple(int(d) for d in s.get_shape())
            dtypes[key] = str(s.get_dtype())
    return Header(Path(path), shapes, dtypes)


@dataclass(frozen=True)
class FlowFile:
    """What a Flux/SD3 transformer file is and carries.

    `layout`: "bfl" (Flux's original names), "sgm" (SD3's `joint_blocks`) or "diffusers" (a transformer saved
    by diffusers); `prefix`: the transformer keys' prefix (`model.diffusion_model.` or ""); `encoders`: the
    text encoders inside (clip_l, clip_g, t5xxl); `vae_prefix`: where a VAE inside is, None without one."""

    family: Family
    layout: str
    prefix: str
    variant: str
    encoders: frozenset[str] = frozenset()
    vae_prefix: str | None = None


def flux_variant_of(keys: Iterable[str]) -> str:
    """Flux "dev" (guidance-distilled: the transformer embeds a guidance value) or "schnell", from key names."""
    guidance = ("guidance_in.in_layer.weight", "time_text_embed.guidance_embedder.linear_1.weight")
    return "dev" if any(k.endswith(guidance) for k in keys) else "schnell"


def sd3_variant_of(dual_attention: bool, qk_norm: bool, hidden: int | None) -> str:
    """SD3 "3.5-medium" (MMDiT-X: dual attention in its first blocks), "3.5-large" (qk norms, 2432 wide) or
    "medium" (SD3 medium: neither). Toy widths are told by the structure alone."""
    if dual_attention:
        return "3.5-medium"
    if qk_norm or hidden == 2432:
        return "3.5-large"
    return "medium"


def describe_flow_file(header: Header) -> FlowFile | None:
    """The Flux/SD3 facts of a transformer file, or None when it holds no Flux or SD3 transformer."""
    keys = header.keys
    bfl = [k for k in keys if _FLUX_KEY.search(k)]
    sgm = [k for k in keys if _SD3_KEY.search(k)]
    if bfl:
        family, layout, sample = Family.FLUX, "bfl", bfl[0]
    elif sgm:
        family, layout, sample = Family.SD3, "sgm", sgm[0]
    elif any(_FLUX_DIFFUSERS_KEY.search(k) for k in keys):
        family, layout, sample = Family.FLUX, "diffusers", ""
    elif any(_SD3_DIFFUSERS_KEY.search(k) for k in keys):
        family, layout, sample = Family.SD3, "diffusers", ""
    else:
        return None
    prefix = TRANSFORMER_PREFIX if sample.startswith(TRANSFORMER_PREFIX) else ""
    own = [k[len(prefix) :] for k in keys if k.startswith(prefix)]
    if family == Family.FLUX:
        variant = flux_variant_of(own)
    else:
        dual = any(".attn2." in k for k in own)
        qk = any(".ln_q." in k or ".norm_q." in k for k in own)
        width_key = "x_embedder.proj.weight" if layout == "sgm" else "pos_embed.proj.weight"
        dims = header.shape(prefix + width_key)
        variant = sd3_variant_of(dual, qk, dims[0] if dims else None)
    encoders = frozenset(n for n, p in ENCODER_PREFIXES.items() if any(k.startswith(p) for k in keys))
    vae = next((p for p in VAE_PREFIXES if any(k.startswith(p + "decoder.") for k in keys)), None)
    return FlowFile(family, layout, prefix, variant, encoders, vae)


def encoder_kind(header: Header) -> str | None:
    """What text encoder a file holds: "t5xxl", "clip_l" (768 wide), "clip_g" (1280), "clip" (a CLIP of another
    width: a toy model, or one that cannot be told) or None (not a text encoder). Keys may carry the
    `text_encoders.NAME.transformer.` prefix of a checkpoint's own encoder."""
    keys = header.keys
    prefix = next((p for p in ENCODER_PREFIXES.values() if keys and all(k.startswith(p) for k in keys)), "")
    own = [k[len(prefix) :] for k in keys]
    if any(_T5_KEY.search(k) for k in own):
        return "t5xxl"
    if any(_CLIP_KEY.search(k) for k in own):
        width = next((d[0] for k in _CLIP_WIDTH_KEYS if (d := header.shape(prefix + k))), None)
        return CLIP_WIDTHS.get(width, "clip") if width else "clip"
    return None


def what_is(header: Header) -> str:
    """A file in words, for messages: "a T5 text encoder", "a Flux transformer", "a VAE"."""
    kind = encoder_kind(header)
    if kind is not None:
        return {"t5xxl": "a T5 text encoder", "clip_l": "a CLIP-L text encoder", "clip_g": "a CLIP-G text encoder"}.get(
            kind, "a CLIP text encoder"
        )
    flow = describe_flow_file(header)
    if flow is not None:
        return f"a {FAMILY_NAMES[flow.family]} transformer"
    if header.keys and all(_VAE_KEY.search(k) for k in header.keys):
        return "a VAE"
    return "not a text encoder Nyx knows"


def download_command(repo: str) -> str:
    """The command that fetches a reference repo's configs and tokenizers (no weights)."""
    include = " ".join(repr(p) for p in CONFIG_PATTERNS)
    return f"hf download {repo} --include {include}"


def cached_snapshot(repo: str) -> Path | None:
    """The local snapshot folder of `repo` in the Hugging Face cache (by its model_index.json), or None."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo, "model_index.json")
    except Exception:
        return None
    return Path(found).parent if isinstance(found, str) else None


def missing_config_parts(root: Path, family: Family) -> list[str]:
    """The pipeline subfolders `root` lacks to describe a `family` model (configs and tokenizers)."""
    missing = []
    for part in CONFIG_PARTS[family]:
        folder = root / part
        if part.startswith("tokenizer"):
            ok = folder.is_dir() and any(folder.iterdir())
        elif part == "scheduler":
            ok = (folder / "scheduler_config.json").is_file()
        else:
            ok = (folder / "config.json").is_file()
        if not ok:
            missing.append(part + "/")
    return missing


def reference_candidates(family: Family, variant: str) -> list[str]:
    """The reference repos whose configs fit a `family` file of `variant`, its own first (the others differ
    only in what the loader takes from the weights: guidance embedding, block counts, the scheduler)."""
    own = [REFERENCE_REPOS[variant]] if variant in REFERENCE_REPOS else []
    return own + [REFERENCE_REPOS[v] for v in FAMILY_VARIANTS[family] if REFERENCE_REPOS[v] not in own]


def variant_name(family: Family, variant: str) -> str:
    """ "Flux dev", "SD3 3.5-large"."""
    return f"{FAMILY_NAMES[family]} {variant}".strip()


# ------------------------------------------------------------------------------------------ pre-flight


def _is_file(value: str | None) -> bool:
    try:
        return bool(value) and Path(str(value)).expanduser().is_file()
    except (OSError, ValueError):
        return False


def _header(value: str) -> Header | None:
    try:
        return read_header(Path(value).expanduser())
    except Exception:  # not safetensors, truncated: the model-source check says so
        return None


def _encoder_field_problems(cfg: TrainingConfig) -> list[Problem]:
    """Each text-encoder field that is set points at a file holding that encoder (a T5 is not a CLIP-L)."""
    out: list[Problem] = []
    wanted = FAMILY_ENCODERS[cfg.model.family]
    for name in ("clip_l", "clip_g", "t5xxl"):
        value = getattr(cfg.model, name)
        key = f"model.{name}"
        if not value or name not in wanted:
            continue
        where = f"ComfyUI keeps it as models/clip/{ENCODER_FILES[name]}"
        path = Path(value).expanduser()
        if not path.exists():
            out.append(Problem(key, f"not found: {value}", f"point it at the {ENCODER_NAMES[name]} file ({where})"))
            continue
        if path.is_dir() or path.suffix.lower() != ".safetensors":
            out.append(
                Problem(key, f"{value} is not a .safetensors file", f"give the {ENCODER_NAMES[name]} .safetensors file")
            )
            continue
        header = _header(value)
        if header is None:
            out.append(
                Problem(key, f"{value} is not a readable .safetensors file", "check the file (a partial download?)")
            )
            continue
        kind = encoder_kind(header)
        if kind == name or (kind == "clip" and name in ("clip_l", "clip_g")):
            continue
        swap = f"model.{kind}" if kind in ENCODER_NAMES and kind in wanted else None
        if swap:
            fix = f"put it in {swap} instead, and point {key} at the {ENCODER_NAMES[name]} file ({where})"
        else:
            fix = f"point {key} at the {ENCODER_NAMES[name]} file ({where})"
        out.append(Problem(key, f"{value} is {what_is(header)}, not {ENCODER_NAMES[name]}", fix))
    return out


def missing_pieces(model: ModelSection, flow: FlowFile) -> list[Problem]:
    """The text encoders and the VAE neither inside the file nor set in their own fields (the loader raises
    with the same words)."""
    out: list[Problem] = []
    family = model.family
    name = FAMILY_NAMES[family]
    needed = FAMILY_ENCODERS[family]
    missing = [e for e in needed if e not in flow.encoders and not getattr(model, e)]
    if missing:
        fields = [f"model.{e}" for e in missing]
        setting = fields[0] if len(fields) == 1 else ", ".join(fields[:-1]) + " and " + fields[-1]
        if not flow.encoders:
            what = "no text encoders"
        else:
            names = [ENCODER_NAMES[e] for e in missing]
            what = f"no {' or '.join(names)} text encoder" + ("s" if len(names) > 1 else "")
        files = ", ".join(ENCODER_FILES[e] for e in missing)
        out.append(
            Problem(
                fields[0],
                f"this {name} file has {what}: set {setting}",
                f"point {setting} at the encoder files (ComfyUI keeps them in models/clip/: {files})",
            )
        )
    if flow.vae_prefix is None and not model.vae:
        out.append(
            Problem(
                "model.vae",
                f"this {name} file has no VAE (autoencoder): set model.vae",
                f"point model.vae at {VAE_HINTS[family]}",
            )
        )
    return out


def config_problems(cfg: TrainingConfig, variant: str) -> list[Problem]:
    """The configs and tokenizers a single file needs (never inside it): model.flow_config, else the variant's
    reference repo in the local Hugging Face cache."""
    family = cfg.model.family
    value = cfg.model.flow_config
    if value:
        path = Path(value).expanduser()
        if path.is_dir():
            missing = missing_config_parts(path, family)
            if not missing:
                return []
            return [
                Problem(
                    "model.flow_config",
                    f"{value} is not a diffusers {FAMILY_NAMES[family]} folder: it lacks {', '.join(missing)}",
                    f"point it at a diffusers {FAMILY_NAMES[family]} model folder or cached repo id (only its "
                    f"configs and tokenizers are read), e.g. {REFERENCE_REPOS[FAMILY_VARIANTS[family][0]]}",
                )
            ]
        if path.exists() or not looks_like_repo_id(value):
            return [
                Problem(
                    "model.flow_config",
                    f"not a folder or Hugging Face repo id: {value}",
                    f"give a diffusers {FAMILY_NAMES[family]} folder, or a repo id such as "
                    f"{REFERENCE_REPOS[FAMILY_VARIANTS[family][0]]}",
                )
            ]
        if cached_snapshot(value) is not None:
            return []
        return [_download_problem("model.flow_config", f"{value} is not in the local Hugging Face cache", value)]
    candidates = reference_candidates(family, variant)
    if any(cached_snapshot(repo) is not None for repo in candidates):
        return []
    return [
        _download_problem(
            "model.flow_config",
            f"this {variant_name(family, variant)} file holds weights only; its configs and tokenizers come from "
            f"{candidates[0]}, which is not in the local Hugging Face cache (training never downloads)",
            candidates[0],
        )
    ]


def _download_problem(key: str, message: str, repo: str) -> Problem:
    gated = " (a gated repo: accept its licence on huggingface.co and set HF_TOKEN)" if repo in GATED else ""
    return Problem(
        key,
        message,
        f"fetch them once (a few MB, no weights): `{download_command(repo)}`{gated}; or set model.flow_config to "
        "a local diffusers folder of the same model",
    )


def folder_variant(root: Path) -> str | None:
    """A diffusers folder's Flux variant ("dev"/"schnell") from its transformer config, when it has one."""
    import json

    for config in (root / "transformer" / "config.json", root / "config.json"):
        try:
            data = json.loads(config.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and data.get("_class_name") == "FluxTransformer2DModel":
            return "dev" if data.get("guidance_embeds") else "schnell"
    return None


def _t5_problems(cfg: TrainingConfig, variant: str | None) -> list[Problem]:
    tokens = cfg.flow.t5_max_token_length
    if variant == "schnell" and tokens is not None and tokens > SCHNELL_T5_TOKENS:
        return [
            Problem(
                "flow.t5_max_token_length",
                f"is {tokens}, but FLUX.1 schnell was trained with {SCHNELL_T5_TOKENS} T5 tokens",
                f"set flow.t5_max_token_length = {SCHNELL_T5_TOKENS}, or leave it empty (the detected model's default)",
                severity="warning",
            )
        ]
    return []


def flow_problems(cfg: TrainingConfig) -> list[Problem]:
    """Everything a Flux/SD3 run from separate files would miss, found from the file headers (see the module
    docstring). A model.pretrained that is no transformer file, or one of the other family, is left to the
    family check (`config.check`), which already names it."""
    family = cfg.model.family
    if family not in FLOW_FAMILIES:
        return []
    out = _encoder_field_problems(cfg)
    variant: str | None = None
    pretrained = cfg.model.pretrained
    if _is_file(pretrained) and Path(pretrained).suffix.lower() != ".safetensors":
        out.append(
            Problem(
                "model.pretrained",
                f"{pretrained} is not a .safetensors file: Flux and SD3 files are read as safetensors only",
                "use the .safetensors release of the model (pickled .ckpt/.pt files can run code when loaded), "
                "or a diffusers folder",
            )
        )
    elif _is_file(pretrained):
        header = _header(pretrained)
        flow = describe_flow_file(header) if header is not None else None
        if flow is not None and flow.family == family:
            variant = flow.variant
            out += missing_pieces(cfg.model, flow)
            out += config_problems(cfg, flow.variant)
    elif pretrained:
        try:
            root = Path(pretrained).expanduser()
            variant = folder_variant(root) if root.is_dir() else None
        except (OSError, ValueError):
            variant = None
    return out + _t5_problems(cfg, variant)
