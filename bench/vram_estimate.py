"""The VRAM estimator's figures for the Flux presets, and the measurements its constants come from.

    .venv/bin/python bench/vram_estimate.py               # the three Flux presets, part by part (no torch)
    .venv/bin/python bench/vram_estimate.py --published   # beside the published recipes it is compared with
    .venv/bin/python bench/vram_estimate.py --count       # parameter counts from the configs (meta device)
    .venv/bin/python bench/vram_estimate.py --calibrate   # activation units of one diffusers block

The default prints what `nyx_tui.vram.estimate` says for `flux-lora-24gb`, `-16gb` and `-12gb` (what
docs/vram.md quotes). `--published` estimates the configurations that sd-scripts, fluxgym and the Hugging
Face QLoRA post publish or measured, so the two can be read side by side. `--count` builds each full-size
model from its published config on PyTorch's meta device (no weights, no download) and counts parameters,
per block and the LoRA parameters one rank adds (Σ in+out of the blocks' linear layers): the constants in
`nyx_tui/vram.py`. `--calibrate` runs one Flux double block, one single block and SD3 joint blocks at a
reduced width (the units do not depend on it) in bf16 on the CPU with LoRA on every linear layer and sums
the bytes autograd saves for the backward pass (saved-tensor hooks; parameters and the shared rotary
embedding left out), in units of batch × tokens × hidden × 2 bytes: the `saved_units` of `nyx_tui/vram.py`.
A GPU run of bench/train_step.py at full Flux size is the check of the sum as a whole.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nyx_tui import vram
from nyx_tui.config.model import TrainingConfig
from nyx_tui.config.presets import load_preset

PRESETS = ("flux-lora-24gb", "flux-lora-16gb", "flux-lora-12gb")


def flux_config(**changes: Any) -> TrainingConfig:
    """Flux.1 dev, bf16 mixed precision, checkpointing, latents and text-encoder outputs cached, with
    `changes` as "section.field" = value."""
    data: dict[str, Any] = {
        "model": {"family": "flux", "pretrained": "black-forest-labs/FLUX.1-dev"},
        "dataset": {"resolution": 1024, "subsets": [{"image_dir": "./images"}]},
        "network": {"kind": "lora", "dim": 16},
        "optimizer": {"type": "adamw8bit"},
        "training": {
            "max_steps": 100,
            "batch_size": 1,
            "mixed_precision": "bf16",
            "gradient_checkpointing": True,
            "cache_latents_to_disk": True,
            "cache_text_encoder_outputs_to_disk": True,
        },
        "flow": {},
    }
    for key, value in changes.items():
        section, name = key.split(".")
        data[section][name] = value
    return TrainingConfig.model_validate(data)


# (what, where it is published, its figure, the configuration as Nyx fields)
PUBLISHED: list[tuple[str, str, str, dict[str, Any]]] = [
    (
        "sd-scripts 24 GB command (fp8_base, rank 4, AdamW8bit, 1024 px batch 2)",
        "kohya-ss/sd-scripts README, sd3 branch, 'FLUX.1 LoRA training'",
        "works on 24 GB",
        {"training.base_quantization": "fp8", "network.dim": 4, "training.batch_size": 2},
    ),
    (
        "sd-scripts 16 GB (same with Adafactor)",
        "kohya-ss/sd-scripts README, sd3 branch",
        "works on 16 GB",
        {"training.base_quantization": "fp8", "network.dim": 4, "optimizer.type": "adafactor"},
    ),
    (
        "sd-scripts 12 GB (fp8_base, blocks_to_swap 16, AdamW8bit)",
        "kohya-ss/sd-scripts docs/flux_train_network.md, 'Recommended Settings by GPU Memory'",
        "works on 12 GB",
        {"training.base_quantization": "fp8", "flow.blocks_to_swap": 16, "network.dim": 4},
    ),
    (
        "sd-scripts 10 GB (blocks_to_swap 22, fp8 T5 recommended)",
        "kohya-ss/sd-scripts docs/flux_train_network.md",
        "works on 10 GB",
        {"training.base_quantization": "fp8", "flow.blocks_to_swap": 22, "network.dim": 4},
    ),
    (
        "sd-scripts 8 GB (blocks_to_swap 28, fp8 T5 recommended)",
        "kohya-ss/sd-scripts docs/flux_train_network.md",
        "works on 8 GB",
        {"training.base_quantization": "fp8", "flow.blocks_to_swap": 28, "network.dim": 4},
    ),
    (
        "fluxgym 20G (fp8_base, AdamW8bit, rank 4, 512 px)",
        "cocktailpeanut/fluxgym app.py",
        "20 GB tier",
        {"training.base_quantization": "fp8", "network.dim": 4, "dataset.resolution": 512},
    ),
    (
        "Hugging Face QLoRA post: NF4 base, rank 4, 8-bit AdamW, 512 px",
        "huggingface.co/blog/flux-qlora (resolution not stated where read)",
        "≈ 9 GB peak (RTX 4090)",
        {"training.base_quantization": "nf4", "network.dim": 4, "dataset.resolution": 512},
    ),
    (
        "  the same at 1024 px (the diffusers example it builds on)",
        "diffusers examples/research_projects/flux_lora_quantization",
        "≈ 9 GB peak (RTX 4090)",
        {"training.base_quantization": "nf4", "network.dim": 4},
    ),
    (
        "Hugging Face QLoRA post: the same LoRA with a bf16 base, 512 px",
        "huggingface.co/blog/flux-qlora",
        "≈ 26 GB",
        {"network.dim": 4, "dataset.resolution": 512},
    ),
    (
        "  the same at 1024 px",
        "huggingface.co/blog/flux-qlora",
        "≈ 26 GB",
        {"network.dim": 4},
    ),
    (
        "A6000 measurement: bf16 base, rank 128, text encoders not cached",
        "bmaltais/kohya_ss#2701 (FurkanGozukara, 2024-08-19)",
        "44.18 GB",
        {
            "network.dim": 128,
            "training.cache_text_encoder_outputs_to_disk": False,
            "training.cache_text_encoder_outputs": False,
        },
    ),
    (
        "A6000 measurement: fp8 base, rank 128, text encoders not cached",
        "bmaltais/kohya_ss#2701",
        "33.53 GB",
        {
            "network.dim": 128,
            "training.base_quantization": "fp8",
            "training.cache_text_encoder_outputs_to_disk": False,
            "training.cache_text_encoder_outputs": False,
        },
    ),
]


def show_presets() -> None:
    for name in PRESETS:
        print(f"== {name}")
        print(vram.estimate(load_preset(name)).describe())
        print()


def show_published() -> None:
    print(f"{'configuration':<78} {'published':>22} {'Nyx estimate':>14}")
    for what, source, figure, changes in PUBLISHED:
        e = vram.estimate(flux_config(**changes))
        est = f"{e.total_gib:.1f} GiB"
        if e.peak_phase != "training":
            est += f" ({e.phases['training']:.1f})"
        print(f"{what:<78} {figure:>22} {est:>14}")
        print(f"    {source}")


def count() -> None:
    import torch
    from diffusers import AutoencoderKL, FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    def n(m: torch.nn.Module) -> int:
        return sum(p.numel() for p in m.parameters())

    def linears(m: torch.nn.Module) -> list[torch.nn.Linear]:
        return [x for x in m.modules() if isinstance(x, torch.nn.Linear)]

    def per_rank(m: torch.nn.Module) -> int:
        return sum(x.in_features + x.out_features for x in linears(m))

    with torch.device("meta"):
        flux = FluxTransformer2DModel(
            patch_size=1,
            in_channels=64,
            num_layers=19,
            num_single_layers=38,
            attention_head_dim=128,
            num_attention_heads=24,
            joint_attention_dim=4096,
            pooled_projection_dim=768,
            guidance_embeds=True,
            axes_dims_rope=(16, 56, 56),
        )
        d, s = flux.transformer_blocks[0], flux.single_transformer_blocks[0]
        print(f"Flux.1 dev transformer {n(flux):,}: double block {n(d):,} (LoRA/rank {per_rank(d):,}), ", end="")
        print(f"single block {n(s):,} (LoRA/rank {per_rank(s):,})")
        largest = max(x.weight.numel() for b in (d, s) for x in linears(b))
        print(f"  largest linear in a block {largest:,}")
        common = dict(
            sample_size=128,
            patch_size=2,
            in_channels=16,
            attention_head_dim=64,
            joint_attention_dim=4096,
            pooled_projection_dim=2048,
            out_channels=16,
        )
        for name, kw in {
            "SD3 medium": dict(
                num_layers=24, num_attention_heads=24, caption_projection_dim=1536, pos_embed_max_size=192
            ),
            "SD3.5 medium": dict(
                num_layers=24,
                num_attention_heads=24,
                caption_projection_dim=1536,
                pos_embed_max_size=384,
                qk_norm="rms_norm",
                dual_attention_layers=tuple(range(13)),
            ),
            "SD3.5 large": dict(
                num_layers=38,
                num_attention_heads=38,
                caption_projection_dim=2432,
                pos_embed_max_size=192,
                qk_norm="rms_norm",
            ),
        }.items():
            m = SD3Transformer2DModel(**common, **kw)
            blocks = sorted({(n(b), per_rank(b)) for b in m.transformer_blocks}, reverse=True)
            print(f"{name} transformer {n(m):,}: blocks (params, LoRA/rank) {blocks}")
        t5 = T5EncoderModel(
            T5Config(
                vocab_size=32128,
                d_model=4096,
                d_kv=64,
                d_ff=10240,
                num_layers=24,
                num_heads=64,
                feed_forward_proj="gated-gelu",
                is_encoder_decoder=False,
            )
        )
        print(f"T5-XXL encoder {n(t5):,}")
        clip = dict(vocab_size=49408, max_position_embeddings=77)
        clip_l = CLIPTextModel(
            CLIPTextConfig(
                hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, **clip
            )
        )
        print(f"CLIP-L text {n(clip_l):,}")
        clip_g = CLIPTextModelWithProjection(
            CLIPTextConfig(
                hidden_size=1280,
                intermediate_size=5120,
                num_hidden_layers=32,
                num_attention_heads=20,
                projection_dim=1280,
                hidden_act="gelu",
                **clip,
            )
        )
        print(f"CLIP-G text {n(clip_g):,}")
        blocks = ("DownEncoderBlock2D",) * 4
        ae = AutoencoderKL(
            down_block_types=blocks,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            latent_channels=16,
            use_quant_conv=False,
            use_post_quant_conv=False,
        )
        print(f"Flux AE {n(ae):,}")
        print(f"SD1.5 UNet {n(UNet2DConditionModel(cross_attention_dim=768)):,}")
        sdxl = UNet2DConditionModel(
            sample_size=128,
            block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(5, 10, 20),
            cross_attention_dim=2048,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
        )
        print(f"SDXL UNet {n(sdxl):,}")


def calibrate() -> None:
    import torch
    from diffusers.models.attention import JointTransformerBlock
    from diffusers.models.transformers.transformer_flux import (
        FluxPosEmbed,
        FluxSingleTransformerBlock,
        FluxTransformerBlock,
    )
    from peft import LoraConfig, inject_adapter_in_model

    dt, batch, image_tokens, text_tokens = torch.bfloat16, 1, 256, 64
    pos = FluxPosEmbed(theta=10000, axes_dim=[16, 56, 56])
    ids = torch.zeros(text_tokens + image_tokens, 3)
    ids[text_tokens:, 1] = torch.arange(image_tokens) // 16
    ids[text_tokens:, 2] = torch.arange(image_tokens) % 16
    rope = pos(ids)

    def saved_units(block: torch.nn.Module, width: int, **kwargs: Any) -> float:
        for name, p in block.named_parameters():
            p.requires_grad_("lora_" in name)
        shared = {t.untyped_storage().data_ptr() for t in [*block.parameters(), *rope]}
        sizes: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            storage = t.untyped_storage()
            if storage.data_ptr() not in shared:
                sizes[storage.data_ptr()] = storage.nbytes()
            return t

        h = torch.randn(batch, image_tokens, width, dtype=dt, requires_grad=True)
        e = torch.randn(batch, text_tokens, width, dtype=dt, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            block(hidden_states=h, encoder_hidden_states=e, temb=torch.randn(batch, width, dtype=dt), **kwargs)
        return sum(sizes.values()) / (batch * (image_tokens + text_tokens) * width * 2)

    def lora(block: torch.nn.Module) -> torch.nn.Module:
        """LoRA on every linear layer of the block (sd-scripts' Flux default adapts all of them)."""
        targets = [n for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)]
        inject_adapter_in_model(LoraConfig(r=16, target_modules=targets), block)
        return block

    torch.manual_seed(0)
    d = lora(FluxTransformerBlock(dim=512, num_attention_heads=4, attention_head_dim=128).to(dt))
    s = lora(FluxSingleTransformerBlock(dim=512, num_attention_heads=4, attention_head_dim=128).to(dt))
    print(f"Flux double block: {saved_units(d, 512, image_rotary_emb=rope):.1f} units")
    print(f"Flux single block: {saved_units(s, 512, image_rotary_emb=rope):.1f} units")
    for label, kw in [
        ("SD3 joint block", {}),
        ("SD3.5 joint block (qk rms norm)", {"qk_norm": "rms_norm"}),
        ("SD3.5 medium dual-attention block", {"qk_norm": "rms_norm", "use_dual_attention": True}),
    ]:
        block = JointTransformerBlock(dim=512, num_attention_heads=8, attention_head_dim=64, **kw)
        print(f"{label}: {saved_units(lora(block.to(dt)), 512):.1f} units")


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--published", action="store_true", help="estimate the published configurations")
    ap.add_argument("--count", action="store_true", help="count parameters from the configs (needs torch)")
    ap.add_argument("--calibrate", action="store_true", help="measure activation units (needs torch)")
    args = ap.parse_args()
    if args.count:
        count()
    elif args.calibrate:
        calibrate()
    elif args.published:
        show_published()
    else:
        show_presets()
    return 0


if __name__ == "__main__":
    sys.exit(main())
