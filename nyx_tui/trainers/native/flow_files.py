"""Loading Flux and SD3 models: from a diffusers folder or a cached repo id (and, later, separate files).

Components are loaded one by one, as for the UNet families (`models.load_folder`), under the names
diffusers' pipelines use (`FlowModel`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nyx_tui.config.fields import Family
from nyx_tui.config.model import ModelSection
from nyx_tui.trainers.native import models
from nyx_tui.trainers.native.flow_models import FlowModel

# T5 tokens per caption when flow.t5_max_token_length is empty (sd-scripts' defaults)
T5_DEFAULT_TOKENS = {"dev": 512, "schnell": 256, "sd3": 256}


def flux_variant(transformer: Any) -> str:
    """ "dev" when the transformer has a guidance embedding (guidance-distilled), else "schnell"."""
    return "dev" if getattr(transformer.config, "guidance_embeds", False) else "schnell"


def default_t5_tokens(family: Family, variant: str) -> int:
    return T5_DEFAULT_TOKENS["sd3"] if family == Family.SD3 else T5_DEFAULT_TOKENS.get(variant, 512)


def load_flow_model(cfg: ModelSection, t5_max_token_length: int | None = None) -> FlowModel:
    """The Flux or SD3 model of `cfg`; `t5_max_token_length` None: the detected model's default."""
    models._quiet()
    source = models.resolve(cfg.pretrained, "model.pretrained")
    if not source.is_dir():
        raise models.ModelLoadError(
            f"model.pretrained = {cfg.pretrained}: loading {cfg.family.value} single files is not supported yet; "
            "use a diffusers folder"
        )
    model = load_flow_folder(source, cfg.family)
    model.t5_max_token_length = t5_max_token_length or default_t5_tokens(model.family, model.variant)
    return model


def load_flow_folder(root: Path, family: Family) -> FlowModel:
    """Every part of a diffusers Flux/SD3 folder (FluxPipeline / StableDiffusion3Pipeline layout)."""
    import diffusers
    import transformers

    d: Any = diffusers
    t: Any = transformers  # Any: the lazy modules hide their classes from mypy
    flux = family == Family.FLUX
    transformer_cls = d.FluxTransformer2DModel if flux else d.SD3Transformer2DModel
    te1 = t.CLIPTextModel if flux else t.CLIPTextModelWithProjection
    te2 = t.T5EncoderModel if flux else t.CLIPTextModelWithProjection
    tok2 = t.T5TokenizerFast if flux else t.CLIPTokenizer
    parts: dict[str, Any] = {
        "transformer": transformer_cls.from_pretrained(root, subfolder="transformer"),
        "vae": d.AutoencoderKL.from_pretrained(root, subfolder="vae"),
        "noise_scheduler": d.FlowMatchEulerDiscreteScheduler.from_pretrained(root, subfolder="scheduler"),
        "tokenizer": t.CLIPTokenizer.from_pretrained(root, subfolder="tokenizer"),
        "text_encoder": te1.from_pretrained(root, subfolder="text_encoder"),
        "tokenizer_2": tok2.from_pretrained(root, subfolder="tokenizer_2"),
        "text_encoder_2": te2.from_pretrained(root, subfolder="text_encoder_2"),
    }
    if not flux:
        parts["tokenizer_3"] = t.T5TokenizerFast.from_pretrained(root, subfolder="tokenizer_3")
        parts["text_encoder_3"] = t.T5EncoderModel.from_pretrained(root, subfolder="text_encoder_3")
    variant = flux_variant(parts["transformer"]) if flux else "sd3"
    return FlowModel(family=family, variant=variant, source={"model": str(root)}, **parts)
