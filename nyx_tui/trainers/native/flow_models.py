"""The flow-matching base models, Flux.1 and SD3/3.5: their parts, text encoding and the denoiser's call.

Flux and SD3 differ from the UNet families in every place the loop touches: a transformer instead of a UNet,
three (SD3) or two (Flux: CLIP-L for the pooled vector, T5 for the sequence) text encoders, a 16-channel VAE
with a shift as well as a scale, and flow matching instead of DDPM noise. `FlowModel` holds the parts under
the names diffusers' pipelines give them (FluxPipeline: text_encoder = CLIP-L, text_encoder_2 = T5;
StableDiffusion3Pipeline: CLIP-L, CLIP-G, T5), so a sampling pipeline is built from it without renaming.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from nyx_tui.config.fields import Family


@dataclass
class FlowModel:
    """The parts of a loaded Flux or SD3 model. Typed `Any` for the same reason as `models.SDModel`.

    `variant`: Flux "dev" (guidance-distilled: the transformer has a guidance embedding) or "schnell"; SD3
    "medium", "3.5-medium" or "3.5-large" (from the transformer's config). `unet` is the transformer under the
    name the engine uses for "the denoiser" (adapters, checkpointing, accelerate's prepare).
    """

    family: Family
    transformer: Any
    vae: Any
    noise_scheduler: Any  # a FlowMatchEulerDiscreteScheduler
    tokenizer: Any  # CLIP-L
    text_encoder: Any
    tokenizer_2: Any  # Flux: T5; SD3: CLIP-G
    text_encoder_2: Any
    tokenizer_3: Any = None  # SD3: T5
    text_encoder_3: Any = None
    variant: str = ""
    t5_max_token_length: int = 512
    source: dict[str, str] = field(default_factory=dict)  # where each part came from, for the log

    @property
    def unet(self) -> Any:
        return self.transformer

    @property
    def guidance_embeds(self) -> bool:
        return bool(getattr(self.transformer.config, "guidance_embeds", False))

    @property
    def text_encoders(self) -> list[Any]:
        return [e for e in (self.text_encoder, self.text_encoder_2, self.text_encoder_3) if e is not None]

    @property
    def parts(self) -> list[Any]:
        return [*self.text_encoders, self.vae, self.transformer]

    @property
    def vae_scale_factor(self) -> int:
        return int(2 ** (len(self.vae.config.block_out_channels) - 1))

    @property
    def prediction_type(self) -> str:
        return "flow"
