"""Loading an SD1.5-family model from a diffusers folder and putting a LoRA on its UNet.

Components are loaded one by one (not through a pipeline) so nothing the training does not need (safety
checker, feature extractor) is touched, and the noise scheduler is always a `DDPMScheduler` built from the
folder's scheduler config, whatever sampler class the folder names: training adds noise with the DDPM
formulation and only its betas and prediction type matter.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diffusers
import torch
import transformers
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from peft import LoraConfig
from transformers import CLIPTextModel, CLIPTokenizer

from nyx_tui.config.model import ModelSection, NetworkSection


@dataclass
class SDModel:
    """The parts of a loaded model. Typed `Any`: diffusers' lazy-import modules hide their classes'
    methods from type checkers (they would all read as errors)."""

    tokenizer: Any
    text_encoder: Any
    vae: Any
    unet: Any
    noise_scheduler: Any

    @property
    def prediction_type(self) -> str:
        return str(self.noise_scheduler.config.get("prediction_type", "epsilon"))


@dataclass
class Conditioning:
    """What the denoiser is conditioned on for one batch: the text encoders' hidden states, and for
    families that use them (SDXL) the pooled text embedding."""

    hidden: torch.Tensor
    pooled: torch.Tensor | None = None


def load_model(cfg: ModelSection) -> SDModel:
    """The base model of `cfg`, whatever its family and form (folder, file, repo id)."""
    return load_sd15(cfg.pretrained)


def encode_text(model: SDModel, captions: list[str], device: torch.device) -> Conditioning:
    ids = model.tokenizer(
        captions,
        padding="max_length",
        max_length=model.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    return Conditioning(hidden=model.text_encoder(ids.to(device))[0])


def predict(
    model: SDModel, unet: Any, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning, batch: dict[str, Any]
) -> torch.Tensor:
    """The denoiser's prediction for `noisy` at `timesteps`. `unet` is the (possibly DDP-wrapped) UNet;
    `batch` carries per-image facts some families condition on (SDXL: original size and crop)."""
    return unet(noisy, timesteps, cond.hidden).sample


def load_sd15(pretrained: str | Path) -> SDModel:
    """Load tokenizer, text encoder, VAE, UNet and a DDPM noise scheduler from a diffusers folder."""
    root = Path(pretrained)
    transformers.utils.logging.disable_progress_bar()  # output.log is for the run, not loading bars
    diffusers.utils.logging.disable_progress_bar()
    if not (root / "model_index.json").is_file():
        raise FileNotFoundError(
            f"{root} is not a diffusers model folder (no model_index.json); the native engine loads SD1.5 "
            "models in diffusers format for now (model.pretrained)"
        )
    tokenizer = CLIPTokenizer.from_pretrained(root, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(root, subfolder="text_encoder")
    vae = AutoencoderKL.from_pretrained(root, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(root, subfolder="unet")
    scheduler_config = DDPMScheduler.load_config(root, subfolder="scheduler")
    noise_scheduler = DDPMScheduler.from_config(scheduler_config)
    return SDModel(tokenizer, text_encoder, vae, unet, noise_scheduler)


def freeze(model: SDModel) -> None:
    """Nothing of the base model trains; frozen parts go to eval mode (dropout off, deterministic)."""
    for part in (model.text_encoder, model.vae, model.unet):
        part.requires_grad_(False)
    model.text_encoder.eval()
    model.vae.eval()


def add_unet_lora(unet: Any, network: NetworkSection) -> list[torch.nn.Parameter]:
    """Put a LoRA adapter on the UNet's target modules; returns its trainable parameters.

    Gaussian init of the down matrix (up starts at zero, so the adapter starts as a no-op), as in
    diffusers' own LoRA training scripts.
    """
    config = LoraConfig(
        r=network.dim,
        lora_alpha=network.alpha,  # type: ignore[arg-type]  # peft annotates int; a float alpha works
        lora_dropout=network.dropout,
        target_modules=list(network.target_modules),
        init_lora_weights="gaussian",
    )
    unet.add_adapter(config)
    params = [p for p in unet.parameters() if p.requires_grad]
    if not params:
        raise ValueError(
            f"network.target_modules {network.target_modules} matched no UNet module; "
            'use diffusers names such as ["to_q", "to_k", "to_v", "to_out.0"]'
        )
    return params
