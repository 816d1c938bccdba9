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

import torch
import torch.nn.functional as F

from nyx_tui.config.fields import Family
from nyx_tui.config.model import FlowSection


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


# ------------------------------------------------------------------------------------------ conditioning


@dataclass
class FlowConditioning:
    """What the transformer is conditioned on for one batch.

    `hidden`: the token sequence (Flux: T5's last hidden state; SD3: the CLIP-L/G penultimate states padded to
    T5's width, then T5's states). `pooled`: the pooled vector (Flux: CLIP-L's; SD3: CLIP-L's and CLIP-G's
    projected outputs side by side). `mask`: Flux with `flow.apply_t5_attn_mask`, T5's attention mask (1 for a
    token, 0 for padding) that `predict` turns into the transformer's attention mask, as sd-scripts does; else
    None. The field names and the per-caption rows are what the text-encoder output cache stores.
    """

    hidden: torch.Tensor
    pooled: torch.Tensor
    mask: torch.Tensor | None = None


CLIP_TOKENS = 77  # CLIP's positions, BOS and EOS included (the pipelines' `tokenizer_max_length`)


def _tokens(tokenizer: Any, captions: list[str], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask [B, length], padded and truncated as diffusers' pipelines do."""
    out = tokenizer(
        captions, padding="max_length", max_length=length, truncation=True, add_special_tokens=True, return_tensors="pt"
    )
    return out.input_ids, out.attention_mask


def _device_of(module: Any) -> torch.device:
    return next(module.parameters()).device


def _t5_states(
    model: FlowModel, tokenizer: Any, encoder: Any, captions: list[str], device: torch.device, masked: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """T5's last hidden state [B, t5_max_token_length, d] on `device`, and its attention mask.

    T5 runs where its weights are (`flow.t5_on_cpu` keeps it on the CPU: only its outputs move). With `masked`
    the mask goes into T5 (sd-scripts' apply_t5_attn_mask) and the states at padding are zeroed, so what the
    transformer sees from padding is nothing whether or not it can mask attention itself.
    """
    ids, mask = _tokens(tokenizer, captions, model.t5_max_token_length)
    where = _device_of(encoder)
    states = encoder(ids.to(where), attention_mask=mask.to(where) if masked else None)[0]
    states = states.to(device)
    mask = mask.to(device)
    if masked:
        states = states * mask.unsqueeze(-1).to(states.dtype)
    return states, mask


def _clip_states(
    tokenizer: Any, encoder: Any, captions: list[str], device: torch.device, masked: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """SD3: a CLIP encoder's penultimate hidden states [B, 77, d] and its projected pooled output [B, p]
    (StableDiffusion3Pipeline._get_clip_prompt_embeds without clip_skip). With `masked` (apply_lg_attn_mask)
    the padding mask goes into the encoder and the states at padding are zeroed."""
    ids, mask = _tokens(tokenizer, captions, CLIP_TOKENS)
    where = _device_of(encoder)
    out = encoder(ids.to(where), attention_mask=mask.to(where) if masked else None, output_hidden_states=True)
    states, pooled = out.hidden_states[-2].to(device), out.text_embeds.to(device)
    if masked:
        states = states * mask.to(device).unsqueeze(-1).to(states.dtype)
    return states, pooled


def encode_text(
    model: FlowModel,
    captions: list[str],
    device: torch.device,
    flow_cfg: FlowSection,
    gen: torch.Generator | None = None,
) -> FlowConditioning:
    """The conditioning of `captions`, as diffusers' FluxPipeline / StableDiffusion3Pipeline encode prompts.

    Flux: CLIP-L's pooled output (77 tokens) and T5's last hidden state at `model.t5_max_token_length` tokens,
    with T5's mask kept (and its padding states zeroed) when `flow.apply_t5_attn_mask` is on. SD3: CLIP-L and
    CLIP-G penultimate states concatenated on features, zero-padded to T5's width, followed by T5's states on
    the sequence axis; pooled = both CLIP projections concatenated. With `gen`, SD3's per-encoder dropout
    (`drop_encoders`) follows, drawn from it; the cache stores outputs without it and drops afterwards, so a
    cached run draws and drops exactly what an uncached one does. No `torch.no_grad()`: the caller decides.
    """
    if model.family == Family.FLUX:
        ids, _ = _tokens(model.tokenizer, captions, CLIP_TOKENS)
        pooled = model.text_encoder(ids.to(_device_of(model.text_encoder))).pooler_output.to(device)
        masked = flow_cfg.apply_t5_attn_mask
        hidden, mask = _t5_states(model, model.tokenizer_2, model.text_encoder_2, captions, device, masked)
        return FlowConditioning(hidden=hidden, pooled=pooled, mask=mask if masked else None)
    lg = flow_cfg.apply_lg_attn_mask
    l_states, l_pooled = _clip_states(model.tokenizer, model.text_encoder, captions, device, lg)
    g_states, g_pooled = _clip_states(model.tokenizer_2, model.text_encoder_2, captions, device, lg)
    t5, _ = _t5_states(model, model.tokenizer_3, model.text_encoder_3, captions, device, flow_cfg.apply_t5_attn_mask)
    clip = torch.cat([l_states, g_states], dim=-1)
    clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
    cond = FlowConditioning(hidden=torch.cat([clip, t5], dim=-2), pooled=torch.cat([l_pooled, g_pooled], dim=-1))
    return drop_encoders(model, cond, flow_cfg, gen) if gen is not None else cond


def drop_encoders(
    model: FlowModel, cond: FlowConditioning, flow_cfg: FlowSection, gen: torch.Generator
) -> FlowConditioning:
    """SD3's per-encoder caption dropout (clip_l/clip_g/t5_dropout_rate): per caption and encoder, with that
    probability, its part of the conditioning becomes zeros — CLIP-L's (or CLIP-G's) feature columns of the
    first 77 positions and of the pooled vector, or T5's positions — as sd-scripts'
    `drop_cached_text_encoder_outputs` does. One uniform draw per caption from `gen` for each encoder whose
    rate is above zero (none when all are zero: a run without dropout draws what it drew before). Flux has no
    such options; a new conditioning is returned, the cached rows are never changed in place."""
    rates = (flow_cfg.clip_l_dropout_rate, flow_cfg.clip_g_dropout_rate, flow_cfg.t5_dropout_rate)
    if model.family != Family.SD3 or not any(rates):
        return cond
    n = cond.hidden.shape[0]
    dl = int(model.text_encoder.config.hidden_size)
    dg = int(model.text_encoder_2.config.hidden_size)
    pl = int(model.text_encoder.config.projection_dim)
    hidden, pooled = cond.hidden.clone(), cond.pooled.clone()
    for which, rate in enumerate(rates):
        if not rate:
            continue
        drop = (torch.rand(n, generator=gen) < rate).tolist()
        for i in [i for i, d in enumerate(drop) if d]:
            if which == 0:
                hidden[i, :CLIP_TOKENS, :dl] = 0
                pooled[i, :pl] = 0
            elif which == 1:
                hidden[i, :CLIP_TOKENS, dl : dl + dg] = 0
                pooled[i, pl:] = 0
            else:
                hidden[i, CLIP_TOKENS:] = 0
    return FlowConditioning(hidden=hidden, pooled=pooled, mask=cond.mask)


# ------------------------------------------------------------------------------------------ the denoiser


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] → [B, H/2·W/2, 4C]: Flux's 2×2 patches (FluxPipeline._pack_latents)."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(packed: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of `pack_latents` for a latent of height `h` and width `w` (FluxPipeline._unpack_latents)."""
    b, _, c4 = packed.shape
    x = packed.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c4 // 4, h, w)


def image_ids(h: int, w: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Flux's positions of the packed latent's patches [h/2·w/2, 3]: (0, row, column)
    (FluxPipeline._prepare_latent_image_ids on the packed size)."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = ids[..., 1] + torch.arange(h // 2)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


def attention_mask(text_mask: torch.Tensor, image_tokens: int) -> torch.Tensor:
    """Flux's joint attention mask [B, 1, 1, text+image] (True = attend) from T5's token mask: the text comes
    first in diffusers' joint sequence, every image token is attended. It broadcasts over heads and queries in
    `scaled_dot_product_attention`, which diffusers' Flux attention processor calls with it."""
    image = torch.ones(text_mask.shape[0], image_tokens, dtype=torch.bool, device=text_mask.device)
    return torch.cat([text_mask.bool(), image], dim=1)[:, None, None, :]


def predict(
    model: FlowModel,
    transformer: Any,
    noisy: torch.Tensor,
    timesteps: torch.Tensor,
    cond: FlowConditioning,
    flow_cfg: FlowSection,
    batch: dict[str, Any] | None = None,
) -> torch.Tensor:
    """The transformer's output for `noisy` [B, C, H, W] at `timesteps` (sigma·1000, the scheduler's scale),
    in the latent's layout. `transformer` may be the DDP-wrapped one; `batch` is unused (no size conditioning).

    Flux: packed 2×2 with image ids, text ids zeros, timestep t/1000 (FluxPipeline passes `timestep / 1000`;
    the transformer scales it back itself), the guidance value `flow.guidance_scale` only for a guidance-
    distilled model (dev; schnell has no guidance embedding), T5's attention mask as the joint attention mask
    when kept. SD3: the latent as is, timestep = sigma·1000 (StableDiffusion3Pipeline passes the scheduler's t).
    """
    n = noisy.shape[0]
    dtype = noisy.dtype
    if model.family == Family.SD3:
        return transformer(
            hidden_states=noisy,
            timestep=timesteps.to(dtype),
            encoder_hidden_states=cond.hidden.to(dtype),
            pooled_projections=cond.pooled.to(dtype),
            return_dict=False,
        )[0]
    h, w = noisy.shape[-2:]
    packed = pack_latents(noisy)
    guidance = (
        torch.full((n,), float(flow_cfg.guidance_scale), device=noisy.device, dtype=dtype)
        if model.guidance_embeds
        else None
    )
    kwargs: dict[str, Any] = {}
    if cond.mask is not None:
        kwargs["joint_attention_kwargs"] = {"attention_mask": attention_mask(cond.mask, packed.shape[1])}
    out = transformer(
        hidden_states=packed,
        timestep=(timesteps / 1000).to(dtype),
        guidance=guidance,
        pooled_projections=cond.pooled.to(dtype),
        encoder_hidden_states=cond.hidden.to(dtype),
        txt_ids=torch.zeros(cond.hidden.shape[1], 3, device=noisy.device, dtype=dtype),
        img_ids=image_ids(h, w, noisy.device, dtype),
        return_dict=False,
        **kwargs,
    )[0]
    return unpack_latents(out, h, w)


# ------------------------------------------------------------------------------------------ placing


def describe(model: FlowModel) -> str:
    """One log line: the family and variant, where it came from, the T5 length."""
    kind = f"flux {model.variant}" if model.family == Family.FLUX else f"sd3 ({model.variant})"
    extra = " (guidance-distilled)" if model.guidance_embeds else ""
    return (
        f"{kind} model{extra} from {model.source.get('model', '?')}; predicts flow (noise − image); "
        f"T5 captions up to {model.t5_max_token_length} tokens"
    )


def t5_encoder(model: FlowModel) -> Any:
    """The T5 encoder: Flux's text_encoder_2, SD3's text_encoder_3."""
    return model.text_encoder_2 if model.family == Family.FLUX else model.text_encoder_3


def freeze(model: FlowModel) -> None:
    """Nothing of the base model trains; the frozen parts go to eval mode (T5's dropout off)."""
    for part in model.parts:
        part.requires_grad_(False)
    for part in (*model.text_encoders, model.vae):
        part.eval()


def place(
    model: FlowModel, device: torch.device, dtype: torch.dtype, t5_on_cpu: bool = False, transformer: bool = True
) -> None:
    """Every part to `device` in the training's weight dtype, except T5 with `flow.t5_on_cpu` (it stays on the
    CPU in fp32 there; its outputs move) and, with `transformer` False, the transformer (cast, left on the CPU
    for the memory modes to place: quantized layers or swapped blocks must not reach the device whole). The
    16-channel VAEs of Flux and SD3 are fine in bf16; in fp16 they stay fp32 (the pipelines upcast them too)."""
    t5 = t5_encoder(model)
    for part in model.parts:
        if part is t5 and t5_on_cpu:
            target_device, target = torch.device("cpu"), torch.float32
        elif part is model.transformer and not transformer:
            target_device, target = torch.device("cpu"), dtype
        else:
            target_device = device
            target = torch.float32 if part is model.vae and dtype == torch.float16 else dtype
        part.to(target_device) if part.dtype == target else part.to(target_device, target)
