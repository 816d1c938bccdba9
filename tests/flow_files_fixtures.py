"""Tiny Flux and SD3 models written as the separate files users have (ComfyUI's layout), for the loader's tests.

Each converter is the inverse of the one the loader (or diffusers) applies, so a model written here and read
back must be the model it came from: Flux transformers in BFL names (fused q/k/v; the single blocks' `linear1`
= q, k, v and the MLP input; the final modulation as (shift, scale)), SD3 transformers in SGM `joint_blocks`
names, VAEs in the original autoencoder layout (Flux's ae.safetensors), text encoders as transformers-keyed
files (ComfyUI's clip_l.safetensors, t5xxl_fp16.safetensors: T5 without its tied `encoder.embed_tokens`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file


def _cat(*parts: torch.Tensor) -> torch.Tensor:
    return torch.cat(parts, dim=0)


def _swap_halves(w: torch.Tensor) -> torch.Tensor:
    a, b = w.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def _blocks(sd: dict[str, Any], prefix: str) -> int:
    numbers = {int(k[len(prefix) :].split(".", 1)[0]) for k in sd if k.startswith(prefix)}
    return max(numbers) + 1 if numbers else 0


def flux_to_bfl(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers Flux transformer state dict in BFL names (the inverse of the single-file conversion)."""
    sd = dict(sd)
    out: dict[str, torch.Tensor] = {}

    def move(src: str, dst: str) -> None:
        for s in ("weight", "bias"):
            if f"{src}.{s}" in sd:
                out[f"{dst}.{s}"] = sd.pop(f"{src}.{s}")

    for dst, src in (
        ("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1"),
        ("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2"),
        ("vector_in.in_layer", "time_text_embed.text_embedder.linear_1"),
        ("vector_in.out_layer", "time_text_embed.text_embedder.linear_2"),
        ("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1"),
        ("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2"),
        ("txt_in", "context_embedder"),
        ("img_in", "x_embedder"),
        ("final_layer.linear", "proj_out"),
    ):
        move(src, dst)
    for s in ("weight", "bias"):
        out[f"final_layer.adaLN_modulation.1.{s}"] = _swap_halves(sd.pop(f"norm_out.linear.{s}"))
    for i in range(_blocks(sd, "transformer_blocks.")):
        d, b = f"double_blocks.{i}.", f"transformer_blocks.{i}."
        move(b + "norm1.linear", d + "img_mod.lin")
        move(b + "norm1_context.linear", d + "txt_mod.lin")
        for s in ("weight", "bias"):
            out[f"{d}img_attn.qkv.{s}"] = _cat(*(sd.pop(f"{b}attn.to_{x}.{s}") for x in "qkv"))
            out[f"{d}txt_attn.qkv.{s}"] = _cat(*(sd.pop(f"{b}attn.add_{x}_proj.{s}") for x in "qkv"))
        out[d + "img_attn.norm.query_norm.scale"] = sd.pop(b + "attn.norm_q.weight")
        out[d + "img_attn.norm.key_norm.scale"] = sd.pop(b + "attn.norm_k.weight")
        out[d + "txt_attn.norm.query_norm.scale"] = sd.pop(b + "attn.norm_added_q.weight")
        out[d + "txt_attn.norm.key_norm.scale"] = sd.pop(b + "attn.norm_added_k.weight")
        move(b + "ff.net.0.proj", d + "img_mlp.0")
        move(b + "ff.net.2", d + "img_mlp.2")
        move(b + "ff_context.net.0.proj", d + "txt_mlp.0")
        move(b + "ff_context.net.2", d + "txt_mlp.2")
        move(b + "attn.to_out.0", d + "img_attn.proj")
        move(b + "attn.to_add_out", d + "txt_attn.proj")
    for i in range(_blocks(sd, "single_transformer_blocks.")):
        d, b = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
        move(b + "norm.linear", d + "modulation.lin")
        for s in ("weight", "bias"):
            parts = [sd.pop(f"{b}attn.to_{x}.{s}") for x in "qkv"] + [sd.pop(f"{b}proj_mlp.{s}")]
            out[f"{d}linear1.{s}"] = _cat(*parts)
        out[d + "norm.query_norm.scale"] = sd.pop(b + "attn.norm_q.weight")
        out[d + "norm.key_norm.scale"] = sd.pop(b + "attn.norm_k.weight")
        move(b + "proj_out", d + "linear2")
    assert not sd, f"unconverted Flux keys: {sorted(sd)[:5]}"
    return out


def sd3_to_sgm(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers SD3 transformer state dict in SGM `joint_blocks` names (inverse of diffusers' converter)."""
    sd = dict(sd)
    out: dict[str, torch.Tensor] = {}

    def move(src: str, dst: str, swap: bool = False) -> None:
        for s in ("weight", "bias"):
            if f"{src}.{s}" in sd:
                t = sd.pop(f"{src}.{s}")
                out[f"{dst}.{s}"] = _swap_halves(t) if swap else t

    out["pos_embed"] = sd.pop("pos_embed.pos_embed")
    move("pos_embed.proj", "x_embedder.proj")
    move("time_text_embed.timestep_embedder.linear_1", "t_embedder.mlp.0")
    move("time_text_embed.timestep_embedder.linear_2", "t_embedder.mlp.2")
    move("context_embedder", "context_embedder")
    move("time_text_embed.text_embedder.linear_1", "y_embedder.mlp.0")
    move("time_text_embed.text_embedder.linear_2", "y_embedder.mlp.2")
    layers = _blocks(sd, "transformer_blocks.")
    for i in range(layers):
        b, x, c = f"transformer_blocks.{i}.", f"joint_blocks.{i}.x_block.", f"joint_blocks.{i}.context_block."
        last = i == layers - 1
        for s in ("weight", "bias"):
            out[f"{x}attn.qkv.{s}"] = _cat(*(sd.pop(f"{b}attn.to_{q}.{s}") for q in "qkv"))
            out[f"{c}attn.qkv.{s}"] = _cat(*(sd.pop(f"{b}attn.add_{q}_proj.{s}") for q in "qkv"))
            if f"{b}attn2.to_q.{s}" in sd:
                out[f"{x}attn2.qkv.{s}"] = _cat(*(sd.pop(f"{b}attn2.to_{q}.{s}") for q in "qkv"))
        for src, dst in (
            ("attn.norm_q", x + "attn.ln_q"),
            ("attn.norm_k", x + "attn.ln_k"),
            ("attn.norm_added_q", c + "attn.ln_q"),
            ("attn.norm_added_k", c + "attn.ln_k"),
            ("attn2.norm_q", x + "attn2.ln_q"),
            ("attn2.norm_k", x + "attn2.ln_k"),
        ):
            move(b + src, dst)
        move(b + "attn.to_out.0", x + "attn.proj")
        move(b + "attn.to_add_out", c + "attn.proj")
        move(b + "attn2.to_out.0", x + "attn2.proj")
        move(b + "norm1.linear", x + "adaLN_modulation.1")
        move(b + "norm1_context.linear", c + "adaLN_modulation.1", swap=last)
        move(b + "ff.net.0.proj", x + "mlp.fc1")
        move(b + "ff.net.2", x + "mlp.fc2")
        move(b + "ff_context.net.0.proj", c + "mlp.fc1")
        move(b + "ff_context.net.2", c + "mlp.fc2")
    move("proj_out", "final_layer.linear")
    move("norm_out.linear", "final_layer.adaLN_modulation.1", swap=True)
    assert not sd, f"unconverted SD3 keys: {sorted(sd)[:5]}"
    return out


def vae_to_ldm(sd: dict[str, torch.Tensor], blocks: int) -> dict[str, torch.Tensor]:
    """A diffusers AutoencoderKL state dict in the original autoencoder names (Flux's ae.safetensors): numbered
    `down`/`up` levels (the decoder's counted from the bottom), `block_N` mid resnets, 1x1-conv attention."""
    out: dict[str, torch.Tensor] = {}
    for key, t in sd.items():
        k = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", key)
        k = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", k)
        k = re.sub(r"^decoder\.up_blocks\.(\d+)\.resnets\.", lambda m: f"decoder.up.{blocks - 1 - int(m[1])}.block.", k)
        k = re.sub(
            r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
            lambda m: f"decoder.up.{blocks - 1 - int(m[1])}.upsample.",
            k,
        )
        k = re.sub(r"\.mid_block\.resnets\.(\d+)\.", lambda m: f".mid.block_{int(m[1]) + 1}.", k)
        k = k.replace(".conv_shortcut.", ".nin_shortcut.").replace(".conv_norm_out.", ".norm_out.")
        if ".mid_block.attentions.0." in k:
            k = k.replace(".mid_block.attentions.0.", ".mid.attn_1.")
            k = k.replace(".group_norm.", ".norm.").replace(".to_out.0.", ".proj_out.")
            k = re.sub(r"\.to_([qkv])\.", r".\1.", k)
            if t.ndim == 2:
                t = t[:, :, None, None]
        out[k] = t
    return out


def state(module: Any) -> dict[str, torch.Tensor]:
    """A module's state dict as separate contiguous tensors (safetensors refuses shared storage)."""
    return {k: v.detach().clone().contiguous() for k, v in module.state_dict().items()}


def save(path: Path, tensors: dict[str, torch.Tensor], fp8: bool = False) -> Path:
    """Write `tensors` as safetensors; `fp8`: every floating matrix stored as float8_e4m3fn (as fp8 releases
    store the transformer's linear weights; 1-d norms and biases stay in the file's other dtype)."""
    if fp8:
        tensors = {k: v.to(torch.float8_e4m3fn) if v.ndim >= 2 else v for k, v in tensors.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path


def text_encoder_state(module: Any) -> dict[str, torch.Tensor]:
    """A transformers text encoder as ComfyUI saves it: T5 without its tied `encoder.embed_tokens` copy."""
    sd = state(module)
    sd.pop("encoder.embed_tokens.weight", None)
    sd.pop("text_model.embeddings.position_ids", None)
    return sd


def write_flux_files(
    pipe: Any, out: Path, *, prefix: str = "", fp8: bool = False, ldm_vae: bool = True, inside: bool = False
) -> dict[str, Path]:
    """The parts of a loaded tiny Flux pipeline (a `FlowModel` or pipeline) as separate files, or (`inside`) as
    one checkpoint that carries them all."""
    transformer = {prefix + k: v for k, v in flux_to_bfl(state(pipe.transformer)).items()}
    vae = state(pipe.vae)
    if ldm_vae:
        vae = vae_to_ldm(vae, len(pipe.vae.config.block_out_channels))
    if inside:  # one ComfyUI-style checkpoint: the encoders and the autoencoder under their prefixes
        full = dict(transformer)
        full.update(
            {f"text_encoders.clip_l.transformer.{k}": v for k, v in text_encoder_state(pipe.text_encoder).items()}
        )
        full.update(
            {f"text_encoders.t5xxl.transformer.{k}": v for k, v in text_encoder_state(pipe.text_encoder_2).items()}
        )
        full.update({f"vae.{k}": v for k, v in vae.items()})
        return {"pretrained": save(out / "flux1-tiny-full.safetensors", full, fp8=fp8)}
    return {
        "pretrained": save(out / "flux1-tiny.safetensors", transformer, fp8=fp8),
        "clip_l": save(out / "clip_l.safetensors", text_encoder_state(pipe.text_encoder)),
        "t5xxl": save(out / "t5xxl_fp16.safetensors", text_encoder_state(pipe.text_encoder_2)),
        "vae": save(out / "ae.safetensors", vae),
    }


def write_sd3_files(pipe: Any, out: Path, *, inside: bool) -> dict[str, Path]:
    """A tiny SD3 pipeline as files: `inside` one SAI-style checkpoint (`model.diffusion_model.`,
    `text_encoders.*.transformer.`, `first_stage_model.` in the original layout), else a bare transformer plus
    the encoder and VAE files (the VAE diffusers-keyed)."""
    transformer = sd3_to_sgm(state(pipe.transformer))
    encoders = {
        "clip_l": text_encoder_state(pipe.text_encoder),
        "clip_g": text_encoder_state(pipe.text_encoder_2),
        "t5xxl": text_encoder_state(pipe.text_encoder_3),
    }
    if inside:
        full = {f"model.diffusion_model.{k}": v for k, v in transformer.items()}
        for name, sd in encoders.items():
            full.update({f"text_encoders.{name}.transformer.{k}": v for k, v in sd.items()})
        vae = vae_to_ldm(state(pipe.vae), len(pipe.vae.config.block_out_channels))
        full.update({f"first_stage_model.{k}": v for k, v in vae.items()})
        return {"pretrained": save(out / "sd3_tiny_incl_clips_t5.safetensors", full)}
    files = {"pretrained": save(out / "sd3_tiny.safetensors", transformer)}
    for name, sd in encoders.items():
        files[name] = save(out / f"{name}.safetensors", sd)
    files["vae"] = save(out / "sd3_vae.safetensors", state(pipe.vae))
    return files
