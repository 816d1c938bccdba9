"""Model families: which family a model is, told from its files before anything loads, and what differs per family.

`detect(path)` reads only small things — a diffusers folder's JSON configs, a `.safetensors` file's header
(key names, a few tensor shapes, the metadata) — so the config check can say "this is an SDXL model but
model.family is sd15" in milliseconds, in the TUI process. Nothing here imports torch, diffusers or
transformers (a test holds it to that); safetensors is opened with `framework="numpy"`, which reads the
header and never a tensor.

`FAMILY_DEFAULTS` holds the per-family facts other parts need (native resolution, prediction type, token
length, bucket step, the `ss_base_model_version` / `modelspec.architecture` strings sd-scripts writes,
the VAE's latent channels and scaling factor), so they are written once.

How a family is told (first rule that decides wins; every rule is data in the tables below):

- **diffusers folder** (`model_index.json`): the pipeline class (`StableDiffusionXLPipeline` → sdxl,
  `FluxPipeline` → flux, `StableDiffusion3Pipeline` → sd3, `StableDiffusionPipeline` → sd15 or sd2). SD1
  and SD2 share the pipeline class; the UNet tells them apart: `cross_attention_dim` 768 → sd15, 1024 →
  sd2 (2048 or `addition_embed_type = "text_time"` → sdxl). Tiny test models have toy widths, so when the
  width is not a real one the structural signals decide: the scheduler's `prediction_type =
  "v_prediction"` or an OpenCLIP text encoder (`hidden_act = "gelu"`; CLIP ViT-L, SD1's, uses
  `quick_gelu`) → sd2, else sd15. Limits: an SD2-*base* model (epsilon) at a toy width with a quick_gelu
  encoder reads as sd15, and an SD1 v-prediction fine-tune at a toy width reads as sd2 — real models have
  real widths and are not affected. A folder without `model_index.json` is read by its `unet/` or
  `transformer/` config, or as one component (`config.json`: a UNet, a transformer, a VAE, a text encoder).
- **single-file checkpoint** (`.safetensors`): original key names. `double_blocks.`/`single_blocks.`
  (with or without `model.diffusion_model.`) → flux; `joint_blocks.` → sd3; `conditioner.embedders.1.` →
  sdxl; `cond_stage_model.model.` (OpenCLIP) → sd2; `cond_stage_model.transformer.` → sd15; a UNet alone by
  the width of its cross-attention (`attn2.to_k.weight`). Whether an SD2 file predicts v or epsilon is not
  in the weights (only a `v_pred` key, which some SDXL v-prediction models carry, says so).
  `.ckpt`/`.pt`/`.pth`/`.bin` files are pickles: they are not opened here (that needs torch, and only with
  `weights_only=True`); the family comes from the config.
- **LoRA**: kohya/sd-scripts names (`lora_unet_double_blocks_` → flux, `lora_unet_joint_blocks_` → sd3,
  SGM names `lora_unet_input_blocks_` → sdxl, `lora_te1_`/`lora_te2_` → sdxl/flux/sd3, `lora_te_` →
  sd15/sd2), diffusers/peft names (`unet.`, `transformer.`, `single_transformer_blocks`) and BFL names
  (`diffusion_model.double_blocks.`); the candidates of all keys are intersected, then narrowed by widths
  (cross-attention 768/1024/2048, text encoder 768/1024, transformer 3072 (flux) / 1536, 2432 (sd3)) and by
  the metadata (`ss_base_model_version`, `modelspec.architecture`) when it names one of them.
- **VAE**: a folder's `AutoencoderKL` config (`latent_channels` 4 with `scaling_factor` 0.18215 → sd15/sd2,
  0.13025 → sdxl; 16 with 0.3611 → flux, 1.5305 → sd3); a file with only `encoder.`/`decoder.` keys by the
  latent channels of `decoder.conv_in.weight` (4 → sd15/sd2/sdxl: the same network, the scaling factor is
  not in the file).
- **Hugging Face repo id**: not checkable offline, unless the repo is in the local hub cache, where its
  snapshot folder is read like a local one.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from nyx_tui.config.fields import Family

# -------------------------------------------------------------------------------------- per-family facts


@dataclass(frozen=True)
class FamilyDefaults:
    """What differs per family, in one place."""

    family: Family
    name: str  # how people write it: "SD1.5", "SDXL"
    article: str  # "a" or "an" before the name, as it is read out ("an SDXL model")
    resolution: int  # native training resolution (square side, px)
    prediction_type: str  # epsilon | v_prediction | flow (the family's usual model)
    max_token_length: int  # CLIP tokens per prompt without BOS/EOS (sd-scripts also allows 150 and 225)
    t5_max_token_length: int | None  # T5 tokens for the flow families (sd-scripts' defaults)
    bucket_step: int  # aspect-ratio bucket step (sd-scripts' bucket_reso_steps default)
    min_bucket_step: int  # the smallest bucket step the family takes (sd-scripts: 32 works for SDXL/Flux)
    base_model_version: str  # ss_base_model_version as sd-scripts writes it
    modelspec_architecture: str  # modelspec.architecture without the "/lora" adapter suffix
    latent_channels: int  # the VAE's latent channels
    vae_scaling_factor: float  # the VAE's latent scaling factor
    cross_attention_dim: int | None  # the full-size UNet's text-conditioning width (UNet families)

    @property
    def called(self) -> str:
        """The name with its article: "an SDXL", "a Flux"."""
        return f"{self.article} {self.name}"


FAMILY_DEFAULTS: dict[Family, FamilyDefaults] = {
    d.family: d
    for d in (
        FamilyDefaults(
            Family.SD15, "SD1.5", "an", 512, "epsilon", 75, None, 64, 64,
            "sd_v1", "stable-diffusion-v1", 4, 0.18215, 768,
        ),
        # SD2.x: the 768-v models (v-prediction) are the common ones; SD2-base is 512 px, epsilon
        FamilyDefaults(
            Family.SD2, "SD2", "an", 768, "v_prediction", 75, None, 64, 64,
            "sd_v2", "stable-diffusion-v2-768-v", 4, 0.18215, 1024,
        ),
        FamilyDefaults(
            Family.SDXL, "SDXL", "an", 1024, "epsilon", 75, None, 64, 32,
            "sdxl_base_v1-0", "stable-diffusion-xl-v1-base", 4, 0.13025, 2048,
        ),
        # Flux.1: T5 512 tokens for dev (schnell: 256)
        FamilyDefaults(
            Family.FLUX, "Flux", "a", 1024, "flow", 75, 512, 64, 32,
            "flux1", "flux-1-dev", 16, 0.3611, None,
        ),
        FamilyDefaults(
            Family.SD3, "SD3", "an", 1024, "flow", 75, 256, 64, 64,
            "sd3", "stable-diffusion-3", 16, 1.5305, None,
        ),
    )
}  # fmt: skip


def defaults(family: Family | str) -> FamilyDefaults:
    """The facts and defaults of `family` (a `Family` or its TOML value)."""
    return FAMILY_DEFAULTS[Family(family)]


def native_resolutions() -> str:
    """The resolution table in words, for descriptions: "512 px for sd15, 768 for sd2, 1024 for sdxl, flux and sd3"."""
    by_res: dict[int, list[str]] = {}
    for f, d in FAMILY_DEFAULTS.items():
        by_res.setdefault(d.resolution, []).append(f.value)
    parts: list[str] = []
    for res, fams in by_res.items():
        names = fams[0] if len(fams) == 1 else ", ".join(fams[:-1]) + " and " + fams[-1]
        parts.append(f"{res}{' px' if not parts else ''} for {names}")
    return ", ".join(parts)


def base_model_version(family: Family | str, prediction_type: str = "epsilon") -> str:
    """`ss_base_model_version` as sd-scripts writes it: SD1/SD2 get `_v` for a v-prediction model
    (`sd_v2_v`), as its `get_model_version_str_for_sd1_sd2` does."""
    d = defaults(family)
    if d.family in (Family.SD15, Family.SD2):
        return d.base_model_version + ("_v" if prediction_type == "v_prediction" else "")
    return d.base_model_version


def modelspec_architecture(family: Family | str, prediction_type: str = "epsilon", adapter: str = "lora") -> str:
    """`modelspec.architecture` (`stable-diffusion-xl-v1-base/lora`); SD2 is 768-v or 512 by prediction type."""
    d = defaults(family)
    arch = d.modelspec_architecture
    if d.family is Family.SD2 and prediction_type != "v_prediction":
        arch = "stable-diffusion-v2-512"
    return f"{arch}/{adapter}" if adapter else arch


def describe(families: Iterable[Family]) -> str:
    """The families as people write them: "SDXL", "SD1.5 or SD2", "SD1.5, SD2 or SDXL"."""
    names = [defaults(f).name for f in families]
    if len(names) <= 1:
        return "".join(names)
    return ", ".join(names[:-1]) + " or " + names[-1]


def called(families: Iterable[Family]) -> str:
    """`describe` with the article of the first: "an SD1.5 or SD2"."""
    fams = list(families)
    return f"{defaults(fams[0]).article} {describe(fams)}" if fams else "an unknown"


def vae_families(family: Family) -> tuple[Family, ...]:
    """The families whose VAE is the same as `family`'s (same latent channels and scaling factor)."""
    d = defaults(family)
    return tuple(
        f
        for f, o in FAMILY_DEFAULTS.items()
        if o.latent_channels == d.latent_channels and o.vae_scaling_factor == d.vae_scaling_factor
    )


# ---------------------------------------------------------------------------------------------- results


class Kind(StrEnum):
    """What kind of thing a path holds."""

    DIFFUSERS = "diffusers folder"
    CHECKPOINT = "single-file checkpoint"
    LORA = "LoRA"
    VAE = "VAE"
    TEXT_ENCODER = "text encoder"
    REPO_ID = "Hugging Face repo id"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class Detection:
    """What `detect` saw: the kind of thing, every family it fits (empty: could not be told), the
    prediction type when the files say it, and why, in words."""

    kind: Kind
    families: tuple[Family, ...] = ()
    reason: str = ""
    prediction_type: str | None = None

    @property
    def family(self) -> Family | None:
        """The family, when exactly one fits."""
        return self.families[0] if len(self.families) == 1 else None

    @property
    def known(self) -> bool:
        return bool(self.families)

    def fits(self, family: Family) -> bool:
        """False only when the files say it is for another family."""
        return not self.families or family in self.families


ALL = tuple(Family)
UNETS = (Family.SD15, Family.SD2, Family.SDXL)
SD12 = (Family.SD15, Family.SD2)

PICKLE_SUFFIXES = frozenset({".ckpt", ".pt", ".pth", ".bin"})
REPO_NOT_CHECKED = "a Hugging Face repo id: the family cannot be checked offline; it is checked when the model loads"

# --------------------------------------------------------------------------------------- detection data

# model_index.json `_class_name` → candidates (SD1/SD2 are then told apart by the UNet)
PIPELINE_CLASSES: tuple[tuple[str, tuple[Family, ...]], ...] = (
    (r"^StableDiffusionXL", (Family.SDXL,)),
    (r"^StableDiffusion3", (Family.SD3,)),
    (r"^Flux(?!2)", (Family.FLUX,)),  # Flux.2 (Flux2Pipeline) is another architecture
    (r"^StableDiffusion(Img2Img|Inpaint)?Pipeline$", SD12),
)

# a component's config.json `_class_name`
TRANSFORMER_CLASSES: dict[str, Family] = {
    "FluxTransformer2DModel": Family.FLUX,
    "SD3Transformer2DModel": Family.SD3,
}

# widths that name a family: the UNet's cross-attention, the text encoder's hidden size, a transformer's
UNET_WIDTHS: dict[int, tuple[Family, ...]] = {
    768: (Family.SD15,),
    1024: (Family.SD2,),
    2048: (Family.SDXL,),
    1280: (Family.SDXL,),  # the SDXL refiner
}
TEXT_ENCODER_WIDTHS: dict[int, tuple[Family, ...]] = {
    768: (Family.SD15, Family.SDXL, Family.FLUX, Family.SD3),  # CLIP ViT-L/14
    1024: (Family.SD2,),  # OpenCLIP ViT-H/14
    1280: (Family.SDXL, Family.SD3),  # OpenCLIP ViT-bigG/14
}
TRANSFORMER_WIDTHS: dict[int, tuple[Family, ...]] = {3072: (Family.FLUX,), 1536: (Family.SD3,), 2432: (Family.SD3,)}


@dataclass(frozen=True)
class KeyRule:
    """Keys matching `pattern` mean one of `families`; `label` is how the reason names them."""

    pattern: str
    families: tuple[Family, ...]
    label: str


# single-file checkpoints: every rule that matches some key narrows the candidates
CHECKPOINT_KEYS: tuple[KeyRule, ...] = (
    KeyRule(r"^(model\.diffusion_model\.)?(double_blocks|single_blocks)\.", (Family.FLUX,), "double_blocks."),
    KeyRule(r"^single_transformer_blocks\.", (Family.FLUX,), "single_transformer_blocks."),  # diffusers-keyed
    KeyRule(r"^(model\.diffusion_model\.)?joint_blocks\.", (Family.SD3,), "joint_blocks."),
    KeyRule(r"^pos_embed\.proj\.", (Family.SD3,), "pos_embed.proj."),  # a diffusers-keyed SD3 transformer
    # SDXL base: CLIP-L and OpenCLIP bigG; the refiner: bigG only
    KeyRule(r"^conditioner\.embedders\.(1\.|0\.model\.)", (Family.SDXL,), "conditioner.embedders.1."),
    KeyRule(r"^cond_stage_model\.model\.", (Family.SD2,), "cond_stage_model.model. (OpenCLIP)"),
    KeyRule(r"^cond_stage_model\.transformer\.", (Family.SD15,), "cond_stage_model.transformer. (CLIP ViT-L)"),
    KeyRule(r"^model\.diffusion_model\.input_blocks\.", UNETS, "model.diffusion_model.input_blocks."),
    KeyRule(r"^down_blocks\.\d+\.", UNETS, "down_blocks. (a diffusers UNet)"),
    KeyRule(r"^add_embedding\.linear_1\.", (Family.SDXL,), "add_embedding. (SDXL's time ids)"),
)

# LoRA keys: each key counts for its first matching rule; the candidates of all rules seen are intersected
LORA_KEYS: tuple[KeyRule, ...] = (
    KeyRule(
        r"^lora_unet_(double_blocks|single_blocks|img_in|txt_in|time_in|vector_in|guidance_in)_",
        (Family.FLUX,),
        "lora_unet_double_blocks_",
    ),
    KeyRule(r"^lora_(transformer|unet)_single_transformer_blocks_", (Family.FLUX,), "single_transformer_blocks"),
    KeyRule(r"(^|\.)(double_blocks|single_blocks)\.", (Family.FLUX,), "double_blocks."),  # BFL / ai-toolkit
    KeyRule(r"(^|\.)single_transformer_blocks\.", (Family.FLUX,), "single_transformer_blocks."),
    KeyRule(r"^lora_unet_joint_blocks_|(^|\.)joint_blocks\.", (Family.SD3,), "lora_unet_joint_blocks_"),
    # sd-scripts writes SDXL in SGM names (SD1/SD2 in diffusers names)
    KeyRule(r"^lora_unet_(input_blocks|output_blocks|middle_block)_", (Family.SDXL,), "lora_unet_input_blocks_"),
    KeyRule(r"^lora_unet_(down_blocks|up_blocks|mid_block)_", UNETS, "lora_unet_down_blocks_"),
    KeyRule(r"^lora_te[12]_", (Family.SDXL, Family.FLUX, Family.SD3), "lora_te1_/lora_te2_"),
    KeyRule(r"^lora_te3_", (Family.FLUX, Family.SD3), "lora_te3_ (T5)"),
    KeyRule(r"^lora_te_", SD12, "lora_te_"),
    KeyRule(r"^(base_model\.model\.)?unet\.", UNETS, "unet."),
    KeyRule(r"^text_encoder_2\.", (Family.SDXL, Family.SD3), "text_encoder_2."),
    KeyRule(r"^(base_model\.model\.)?transformer\.", (Family.FLUX, Family.SD3), "transformer."),
)
LORA_MARKERS = re.compile(
    r"^lora_(unet|te\d?|transformer)_"
    r"|\.(lora_down|lora_up|lora_A|lora_B)\.|_lora\.(down|up)\."
    r"|\.(hada_w1_a|hada_w1_b|lokr_w1|lokr_w1_a)$"
)

# the keys whose shapes tell a width: (pattern, which dimension, width table)
_WIDTH_KEYS: tuple[tuple[str, int, dict[int, tuple[Family, ...]]], ...] = (
    (r"attn2[._]to_k\.(lora_down|lora_A)\.weight$", 1, UNET_WIDTHS),
    (r"attn2\.to_k\.weight$", 1, UNET_WIDTHS),
    (r"^lora_te_text_model_encoder_layers_\d+_self_attn_k_proj\.lora_down\.weight$", 1, TEXT_ENCODER_WIDTHS),
    (r"^(base_model\.model\.)?transformer\.transformer_blocks\.\d+\.attn\.to_q\.lora_A\.weight$", 1,
     TRANSFORMER_WIDTHS),
)  # fmt: skip

# metadata values → family (prefix match, first wins)
BASE_MODEL_VERSIONS: tuple[tuple[str, Family], ...] = (
    ("sd_v1", Family.SD15),
    ("sd_v2", Family.SD2),
    ("sdxl", Family.SDXL),
    ("flux", Family.FLUX),
    ("sd3", Family.SD3),
    ("stable-diffusion-3", Family.SD3),
    ("medium", Family.SD3),  # sd-scripts' SD3 model types
    ("5-large", Family.SD3),
    ("5-medium", Family.SD3),
)
MODELSPEC_ARCHITECTURES: tuple[tuple[str, Family], ...] = (
    ("stable-diffusion-v1", Family.SD15),
    ("stable-diffusion-v2", Family.SD2),
    ("stable-diffusion-xl", Family.SDXL),
    ("stable-diffusion-3", Family.SD3),
    ("flux-1", Family.FLUX),
)

_VAE_KEYS = re.compile(r"^(encoder|decoder|quant_conv|post_quant_conv)\.")
_CLIP_KEYS = re.compile(r"^(text_model\.)?(embeddings\.token_embedding|encoder\.layers\.\d+\.self_attn)\.")
_CLIP_NORMS = ("text_model.final_layer_norm.weight", "final_layer_norm.weight")  # its width is the hidden size
_T5_KEYS = re.compile(r"^(encoder\.block\.|shared\.weight$)")

# -------------------------------------------------------------------------------------------- detect


def detect(path: str | os.PathLike[str]) -> Detection:
    """What `path` is and which families it fits. Reads configs and headers only; never raises."""
    value = os.fspath(path)
    try:
        p = Path(value).expanduser()
        if p.is_dir():
            return _detect_folder(p)
        if p.is_file():
            return _detect_file(p)
        if _looks_like_repo_id(value):
            return _detect_repo(value)
        return Detection(Kind.UNKNOWN, reason=f"{value} does not exist")
    except Exception as e:  # a check must never turn into a traceback
        return Detection(Kind.UNKNOWN, reason=f"could not be read ({type(e).__name__}: {e})")


def _looks_like_repo_id(value: str) -> bool:
    from nyx_tui.config.io import looks_like_repo_id  # here: config.io → config.model → this module

    return looks_like_repo_id(value)


def _detect_repo(repo: str) -> Detection:
    """A repo id: read from the local hub cache when it is there; otherwise nothing can be told offline."""
    try:
        from huggingface_hub import try_to_load_from_cache

        for name in ("model_index.json", "config.json"):
            cached = try_to_load_from_cache(repo, name)
            if isinstance(cached, str):
                found = _detect_folder(Path(cached).parent)
                return Detection(
                    found.kind,
                    found.families,
                    f"{repo} (in the local Hugging Face cache): {found.reason}",
                    found.prediction_type,
                )
    except Exception:
        pass
    return Detection(Kind.REPO_ID, reason=REPO_NOT_CHECKED)


# ---------------------------------------------------------------------------------------------- folders


def _json(path: Path) -> dict[str, Any]:
    """A JSON object from `path`, or {} when it is missing or not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _detect_folder(root: Path) -> Detection:
    index = _json(root / "model_index.json")
    if index or (root / "model_index.json").is_file():
        return _detect_pipeline(root, index)
    if (root / "unet" / "config.json").is_file():
        return _detect_pipeline(root, {})
    if (root / "transformer" / "config.json").is_file():
        return _detect_component(_json(root / "transformer" / "config.json"), "transformer/")
    if (root / "config.json").is_file():
        return _detect_component(_json(root / "config.json"), "")
    return Detection(Kind.UNKNOWN, reason=f"{root} has no model_index.json or config.json")


def _prediction_type(scheduler: Mapping[str, Any]) -> str | None:
    if str(scheduler.get("_class_name", "")).startswith("FlowMatch"):
        return "flow"
    value = scheduler.get("prediction_type")
    return str(value) if value else None


def _detect_pipeline(root: Path, index: Mapping[str, Any]) -> Detection:
    cls = str(index.get("_class_name") or "")
    scheduler = _json(root / "scheduler" / "scheduler_config.json")
    prediction = _prediction_type(scheduler)
    unet = _json(root / "unet" / "config.json")
    if cls:
        candidates = next((fams for pattern, fams in PIPELINE_CLASSES if re.search(pattern, cls)), ())
        if not candidates:
            return Detection(Kind.DIFFUSERS, reason=f"a {cls}: not a family Nyx knows", prediction_type=prediction)
        what = f"a diffusers {cls}"
    else:
        transformer = _json(root / "transformer" / "config.json")
        if transformer:
            found = _detect_component(transformer, "transformer/")
            return Detection(Kind.DIFFUSERS, found.families, found.reason, prediction)
        if not unet:
            return Detection(Kind.DIFFUSERS, reason="model_index.json names no pipeline class")
        candidates, what = UNETS, "a diffusers folder with a UNet"
    if len(candidates) > 1 and unet:
        text_encoder = _json(root / "text_encoder" / "config.json")
        has_te2 = (root / "text_encoder_2").is_dir() or "text_encoder_2" in index
        fams, why = _unet_family(unet, text_encoder, scheduler, has_te2)
        narrowed = tuple(f for f in candidates if f in fams)
        if narrowed:
            return Detection(Kind.DIFFUSERS, narrowed, f"{what}; {why}", prediction)
    return Detection(Kind.DIFFUSERS, candidates, what, prediction)


def _unet_family(
    unet: Mapping[str, Any],
    text_encoder: Mapping[str, Any] | None = None,
    scheduler: Mapping[str, Any] | None = None,
    has_te2: bool = False,
) -> tuple[tuple[Family, ...], str]:
    """SD1.5, SD2 or SDXL from the UNet config (and, for toy widths, the scheduler's and text encoder's
    configs when there are any), and the signal that decided (see the module's docstring)."""
    if unet.get("addition_embed_type") == "text_time":
        return (Family.SDXL,), 'the UNet has addition_embed_type = "text_time" (SDXL)'
    if has_te2:
        return (Family.SDXL,), "it has a second text encoder (SDXL)"
    width = unet.get("cross_attention_dim")
    if isinstance(width, int) and width in UNET_WIDTHS:
        fams = UNET_WIDTHS[width]
        return fams, f"the UNet's cross_attention_dim is {width} ({describe(fams)})"
    if scheduler and scheduler.get("prediction_type") == "v_prediction":
        return (Family.SD2,), "the scheduler predicts v (v_prediction), as SD2-768 does"
    if text_encoder and text_encoder.get("hidden_act") == "gelu":
        return (Family.SD2,), 'its text encoder is OpenCLIP-shaped (hidden_act = "gelu"), as SD2\'s is'
    if text_encoder:
        return (Family.SD15,), "its text encoder is CLIP ViT-L-shaped (quick_gelu) and it predicts epsilon, as SD1.5"
    return SD12, f"the UNet's cross_attention_dim ({width}) tells neither SD1.5 nor SD2"


def _detect_component(config: Mapping[str, Any], where: str) -> Detection:
    cls = str(config.get("_class_name") or "")
    if cls in TRANSFORMER_CLASSES:
        fam = TRANSFORMER_CLASSES[cls]
        return Detection(Kind.DIFFUSERS, (fam,), f"a diffusers {where}{cls} ({defaults(fam).name})")
    if cls == "UNet2DConditionModel":
        fams, why = _unet_family(config)
        return Detection(Kind.DIFFUSERS, fams, f"a diffusers UNet only; {why}")
    if cls.startswith("AutoencoderKL"):
        return _vae_from_config(config)
    arch = " ".join(str(a) for a in config.get("architectures") or [])
    model_type = str(config.get("model_type") or "")
    if model_type.startswith("clip") or "CLIP" in arch:
        width = config.get("hidden_size") or (config.get("text_config") or {}).get("hidden_size")
        fams = TEXT_ENCODER_WIDTHS.get(width, ()) if isinstance(width, int) else ()
        return Detection(Kind.TEXT_ENCODER, fams, f"a CLIP text encoder (hidden size {width})")
    if model_type.startswith("t5") or "T5" in arch:
        return Detection(Kind.TEXT_ENCODER, (Family.FLUX, Family.SD3), "a T5 text encoder (Flux, SD3)")
    return Detection(Kind.UNKNOWN, reason=f"a config.json of {cls or arch or 'an unknown class'}")


def _vae_from_config(config: Mapping[str, Any]) -> Detection:
    channels = config.get("latent_channels")
    scale = config.get("scaling_factor")
    by_channels = tuple(f for f, d in FAMILY_DEFAULTS.items() if d.latent_channels == channels)
    exact = tuple(
        f for f in by_channels if isinstance(scale, int | float) and abs(defaults(f).vae_scaling_factor - scale) < 1e-4
    )
    return Detection(
        Kind.VAE, exact or by_channels, f"an AutoencoderKL with {channels} latent channels, scaling_factor {scale}"
    )


# ------------------------------------------------------------------------------------------------ files


def _detect_file(path: Path) -> Detection:
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        return Detection(Kind.CHECKPOINT, reason="pickle checkpoint; family from the config")
    if suffix != ".safetensors":
        return Detection(Kind.UNKNOWN, reason=f"not a model file ({suffix or 'no extension'})")
    try:
        keys, metadata, shapes = _read_header(path)
    except Exception as e:  # SafetensorError: truncated, not safetensors at all
        return Detection(Kind.UNKNOWN, reason=f"not a readable .safetensors file ({e})")
    return detect_keys(keys, metadata, shapes.get)


def _read_header(path: Path) -> tuple[list[str], dict[str, str], dict[str, list[int]]]:
    """Key names, metadata and the shapes of the few keys that tell a width; no tensor is read."""
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        keys = list(f.keys())
        metadata = dict(f.metadata() or {})
        shapes: dict[str, list[int]] = {}
        for pattern, _, _ in _WIDTH_KEYS:
            rx = re.compile(pattern)
            key = next((k for k in keys if rx.search(k)), None)  # _narrow_by_width reads the first
            if key is not None:
                shapes[key] = list(f.get_slice(key).get_shape())
        present = set(keys)
        for key in ("decoder.conv_in.weight", *_CLIP_NORMS):
            if key in present:
                shapes[key] = list(f.get_slice(key).get_shape())
    return keys, metadata, shapes


def detect_keys(
    keys: Iterable[str],
    metadata: Mapping[str, str] | None = None,
    shape: Callable[[str], list[int] | None] | None = None,
) -> Detection:
    """What a state dict is from its key names (and, when given, its metadata and some shapes)."""
    keys = list(keys)
    metadata = dict(metadata or {})
    shape = shape or (lambda _k: None)
    if any(LORA_MARKERS.search(k) for k in keys):
        return _lora(keys, metadata, shape)
    if any(_T5_KEYS.search(k) for k in keys):
        return Detection(Kind.TEXT_ENCODER, (Family.FLUX, Family.SD3), "a T5 text encoder (Flux, SD3)")
    if any(_CLIP_KEYS.search(k) for k in keys):
        dims = next((d for d in map(shape, _CLIP_NORMS) if d), None)
        width = dims[0] if dims else None
        fams = TEXT_ENCODER_WIDTHS.get(width, ()) if width else ()
        return Detection(Kind.TEXT_ENCODER, fams, f"a CLIP text encoder (hidden size {width or 'unknown'})")
    if keys and all(_VAE_KEYS.search(k) for k in keys):
        dims = shape("decoder.conv_in.weight")
        channels = dims[1] if dims and len(dims) > 1 else None
        fams = tuple(f for f, d in FAMILY_DEFAULTS.items() if d.latent_channels == channels)
        return Detection(Kind.VAE, fams, f"a VAE ({channels if channels else 'unknown'} latent channels)")
    checkpoint = _intersect(keys, CHECKPOINT_KEYS)
    if checkpoint is not None:
        fams, seen = checkpoint
        fams = _narrow_by_width(fams, keys, shape)
        prediction = "v_prediction" if "v_pred" in keys else None
        return Detection(Kind.CHECKPOINT, fams, f"a single-file checkpoint ({seen})", prediction)
    return Detection(Kind.UNKNOWN, reason="no key names of a model, LoRA, VAE or text encoder Nyx knows")


def _intersect(
    keys: list[str], rules: tuple[KeyRule, ...], first_only: bool = False
) -> tuple[tuple[Family, ...], str] | None:
    """The families every matched rule allows (may be none: rules that disagree), and the labels of the
    rules seen; None when no rule matched. With `first_only` each key counts for its first matching rule."""
    compiled = [re.compile(r.pattern) for r in rules]
    hit: set[int] = set()
    for key in keys:
        for i, rx in enumerate(compiled):
            if rx.search(key):
                hit.add(i)
                if first_only:
                    break
    if not hit:
        return None
    fams: tuple[Family, ...] = ALL
    for i in hit:
        fams = tuple(f for f in fams if f in rules[i].families)
    return fams, ", ".join(dict.fromkeys(rules[i].label for i in sorted(hit)))


def _narrow_by_width(
    fams: tuple[Family, ...], keys: list[str], shape: Callable[[str], list[int] | None]
) -> tuple[Family, ...]:
    """Narrow `fams` by the widths some tensor shapes tell (only when that keeps at least one)."""
    if len(fams) <= 1:
        return fams
    for pattern, dim, table in _WIDTH_KEYS:
        rx = re.compile(pattern)
        for key in keys:
            if not rx.search(key):
                continue
            dims = shape(key)
            if dims and len(dims) > dim and dims[dim] in table:
                narrowed = tuple(f for f in fams if f in table[dims[dim]])
                if narrowed:
                    fams = narrowed
            break
    return fams


def metadata_family(metadata: Mapping[str, str]) -> Family | None:
    """The family a LoRA's metadata names (`ss_base_model_version`, else `modelspec.architecture`)."""
    version = str(metadata.get("ss_base_model_version") or "").lower()
    for prefix, fam in BASE_MODEL_VERSIONS:
        if version.startswith(prefix):
            return fam
    arch = str(metadata.get("modelspec.architecture") or "").lower()
    for prefix, fam in MODELSPEC_ARCHITECTURES:
        if arch.startswith(prefix):
            return fam
    return None


def _lora(keys: list[str], metadata: Mapping[str, str], shape: Callable[[str], list[int] | None]) -> Detection:
    found = _intersect(keys, LORA_KEYS, first_only=True)
    fams, seen = found if found is not None else ((), "")
    fams = _narrow_by_width(fams, keys, shape)
    named = metadata_family(metadata)
    reason = f"a LoRA ({seen})" if seen else "a LoRA"
    if named is not None and (not fams or found is None):
        fams = (named,)
        reason += f"; its metadata names {defaults(named).name}"
    elif named is not None and named in fams:
        if len(fams) > 1:
            reason += f"; its metadata names {defaults(named).name}"
        fams = (named,)
    elif named is not None:
        reason += f"; its metadata says {defaults(named).name}, its key names say {describe(fams)}"
    prediction = None
    if metadata.get("modelspec.prediction_type") in ("v", "epsilon"):
        prediction = "v_prediction" if metadata["modelspec.prediction_type"] == "v" else "epsilon"
    return Detection(Kind.LORA, fams, reason, prediction)
