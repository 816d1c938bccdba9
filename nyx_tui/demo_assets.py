"""The embedded default: a tiny SD1.5-shaped model and a learnable synthetic dataset, made offline.

`nyx demo` and the tests need a model and images without a hub. The model has the real SD1.5
architecture (UNet with cross-attention blocks, CLIP text encoder, an 8x-downsampling VAE, the SD1.5 noise
schedule) at toy width, with seeded random weights, saved as a diffusers `StableDiffusionPipeline` folder
so the native engine loads it exactly like a real one and the LoRA it trains loads back into diffusers.
The dataset is a few coloured shapes on plain backgrounds with captions that name them, which even a
random-weight model can learn to denoise better within a minute.

    python -m nyx_tui.demo_assets WORKSPACE   # writes WORKSPACE/model and WORKSPACE/dataset, prints JSON
    python -m nyx_tui.demo_assets WORKSPACE --family flux   # WORKSPACE/model-flux (sd3: model-sd3) instead

Heavy imports (torch, diffusers, transformers) happen inside the functions, so importing this module
from the CLI costs nothing.
"""

from __future__ import annotations

import json
import random
import shutil
import sys
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

MODEL_SEED = 0
DATASET_SEED = 0
TOKEN_MAX_LENGTH = 77

# files a complete diffusers SD folder has (checked for idempotence)
_MODEL_FILES = (
    "model_index.json",
    "scheduler/scheduler_config.json",
    "tokenizer/tokenizer_config.json",
    "text_encoder/config.json",
    "unet/config.json",
    "vae/config.json",
)
_WEIGHT_DIRS = ("text_encoder", "unet", "vae")

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (30, 60, 220),
    "yellow": (240, 210, 30),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
SHAPES = ("circle", "square", "triangle")


# ------------------------------------------------------------------------------------------ tokenizer


def _byte_chars() -> list[str]:
    """GPT-2/CLIP's reversible byte-to-character map: printable bytes stand for themselves, the rest are
    shifted above 255 so that no byte becomes whitespace or a control character."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def _byte_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A byte-level BPE vocabulary in CLIP's shape, built offline (NOTES: "CLIP tokenizer offline").

    The 256 byte characters, the same with the `</w>` end-of-word marker, a few merges of the letters the
    demo captions use most, and the two special tokens. Every merge piece is in the vocab.
    """
    chars = _byte_chars()
    tokens = chars + [c + "</w>" for c in chars]
    merges: list[tuple[str, str]] = [("a", "n"), ("o", "n"), ("r", "e"), ("e", "d</w>"), ("i", "n")]
    for a, b in merges:
        tokens.append(a + b)
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    return vocab, merges


def _tokenizer() -> Any:
    from transformers import CLIPTokenizer

    vocab, merges = _byte_vocab()
    # merges in memory must be tuples (NOTES), whatever the annotation says
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=TOKEN_MAX_LENGTH)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------ the model


def _model_complete(model_dir: Path) -> bool:
    if not all((model_dir / f).is_file() for f in _MODEL_FILES):
        return False
    return all(any((model_dir / d).glob("*.safetensors")) for d in _WEIGHT_DIRS)


def build_tiny_sd15(model_dir: Path | str, *, seed: int = MODEL_SEED) -> Path:
    """Write a tiny random-weight SD1.5-architecture pipeline in diffusers format to `model_dir`.

    Deterministic for a seed (weights are drawn right after `torch.manual_seed`). Written to a temp
    folder beside the target and renamed into place, so a crash never leaves a half model behind.
    Returns the folder.
    """
    import torch
    import transformers
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    transformers.utils.logging.disable_progress_bar()  # no "Writing model shards" bar in the demo's log
    model_dir = Path(model_dir)
    tokenizer = _tokenizer()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=TOKEN_MAX_LENGTH,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            projection_dim=32,
        )
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=64,
    )
    scheduler = DDPMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        num_train_timesteps=1000,
        clip_sample=False,
        steps_offset=1,
    )
    parts: list[Any] = [unet, text_encoder, vae]  # Any: diffusers' lazy modules hide methods from mypy
    for module in parts:
        module.eval()  # built from a config: train mode (NOTES); saved weights are the same either way
    pipe: Any = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return _save_pipeline(pipe, model_dir)


def _save_pipeline(pipe: Any, model_dir: Path) -> Path:
    """Save a pipeline to a temp folder beside `model_dir`, then rename it into place (never half a model)."""
    tmp = model_dir.with_name(f".{model_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    shutil.rmtree(model_dir, ignore_errors=True)
    tmp.rename(model_dir)
    return model_dir


def _tiny_clip_config(tokenizer: Any, hidden_act: str) -> Any:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=TOKEN_MAX_LENGTH,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        projection_dim=32,
        hidden_act=hidden_act,
    )


def build_tiny_sdxl(model_dir: Path | str, *, seed: int = MODEL_SEED) -> Path:
    """Write a tiny random-weight SDXL-architecture pipeline in diffusers format to `model_dir`.

    The real SDXL layout at toy width: three UNet levels (DownBlock2D, then two cross-attention levels;
    mirrored on the way up, the last without an upsampler), two layers a level, a deeper transformer at the
    lowest level, linear projections, size/crop conditioning (`addition_embed_type = "text_time"`: six time
    ids of 8 features each plus the 32-wide pooled text embedding), and two text encoders — a CLIP-L-shaped
    one (quick_gelu) and an OpenCLIP-shaped one with a projection (gelu), whose penultimate hidden states
    are concatenated into the 64-wide cross-attention input. The second tokenizer pads with "!" as SDXL's
    does. The layout matters beyond realism: sd-scripts' SGM names of the LoRA modules
    (`input_blocks_4_1_…`) count layers per level, so a file written for this model names its modules as
    one for the real SDXL does. Deterministic for a seed; written like `build_tiny_sd15`. Returns the folder.
    """
    import torch
    import transformers
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    transformers.utils.logging.disable_progress_bar()
    model_dir = Path(model_dir)
    tokenizer = _tokenizer()
    vocab, merges = _byte_vocab()
    tokenizer_2 = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=TOKEN_MAX_LENGTH, pad_token="!")  # type: ignore[arg-type]
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(32, 32, 64),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2),
        attention_head_dim=(2, 4, 8),
        use_linear_projection=True,
        cross_attention_dim=64,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32,
        norm_num_groups=32,
    )
    text_encoder = CLIPTextModel(_tiny_clip_config(tokenizer, "quick_gelu"))
    text_encoder_2 = CLIPTextModelWithProjection(_tiny_clip_config(tokenizer_2, "gelu"))
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=0.13025,  # SDXL's VAE
    )
    # SDXL ships an Euler scheduler with the DDPM betas; training reads only its betas and prediction type
    scheduler = EulerDiscreteScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        num_train_timesteps=1000,
        steps_offset=1,
        timestep_spacing="leading",
    )
    parts: list[Any] = [unet, text_encoder, text_encoder_2, vae]
    for module in parts:
        module.eval()
    pipe: Any = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
    )
    return _save_pipeline(pipe, model_dir)


# ------------------------------------------------------------------------------ flow-matching families

# words the demo captions use, as whole T5 pieces (the rest falls back to single characters)
_T5_WORDS = ("a", "red", "green", "blue", "yellow", "purple", "white", "black", "circle", "square", "triangle")


def _t5_tokenizer() -> Any:
    """A T5-shaped (Unigram, sentencepiece-style) tokenizer built offline: pad 0, eos 1, unk 2, the printable
    characters and a few whole words. Real T5 has 32k pieces; the model only needs ids in range."""
    import transformers

    t: Any = transformers  # the lazy module hides T5TokenizerFast from mypy
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(chr(c), -3.0) for c in range(33, 127)]
    pieces += [("\u2581" + w, -1.0) for w in _T5_WORDS]
    return t.T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=512)


def _tiny_t5(tokenizer: Any, width: int) -> Any:
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer),
            d_model=width,
            d_kv=8,
            d_ff=2 * width,
            num_layers=2,
            num_heads=4,
            feed_forward_proj="gated-gelu",  # T5 v1.1, as Flux's and SD3's T5-XXL
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,  # type: ignore[call-arg]  # a T5Config kwarg passed through
        )
    )


def _tiny_vae16(scaling_factor: float, shift_factor: float) -> Any:
    """A 16-channel VAE like Flux's and SD3's (8x downsampling, their scaling and shift factors)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        latent_channels=16,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def build_tiny_flux(
    model_dir: Path | str,
    *,
    schnell: bool = False,
    seed: int = MODEL_SEED,
    double_blocks: int = 2,
    single_blocks: int = 2,
) -> Path:
    """Write a tiny random-weight Flux.1-architecture pipeline (diffusers `FluxPipeline` folder) to `model_dir`.

    The real layout at toy width: double-stream (`transformer_blocks`) and single-stream blocks, 2x2-packed
    16-channel latents (`in_channels` 64), RoPE over (4, 4, 8) axes, a CLIP-L-shaped encoder for the pooled
    vector and a T5-shaped encoder for the sequence. dev-style (`schnell=False`) has the guidance embedding
    and the dev scheduler (dynamic shifting); schnell-style has neither, as the real ones. Returns the folder.
    """
    import torch
    import transformers
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    transformers.utils.logging.disable_progress_bar()
    model_dir = Path(model_dir)
    tokenizer = _tokenizer()
    tokenizer_2 = _t5_tokenizer()
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=double_blocks,
        num_single_layers=single_blocks,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=not schnell,
        axes_dims_rope=(4, 4, 8),
    )
    text_encoder = CLIPTextModel(_tiny_clip_config(tokenizer, "quick_gelu"))
    text_encoder_2 = _tiny_t5(tokenizer_2, 32)
    vae = _tiny_vae16(0.3611, 0.1159)
    if schnell:
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)
    else:
        scheduler = FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=1000,
            shift=3.0,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
        )
    parts: list[Any] = [transformer, text_encoder, text_encoder_2, vae]
    for module in parts:
        module.eval()
    pipe: Any = FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    return _save_pipeline(pipe, model_dir)


def build_tiny_sd3(model_dir: Path | str, *, seed: int = MODEL_SEED, layers: int = 2) -> Path:
    """Write a tiny random-weight SD3-architecture pipeline (diffusers `StableDiffusion3Pipeline` folder).

    The MMDiT layout at toy width: joint blocks (the last one context-pre-only, as in SD3), 2x2 patches of a
    16-channel latent, positional embeddings up to 16 patches a side, CLIP-L and CLIP-G-shaped encoders (with
    projections: their pooled outputs are concatenated, 64 wide) and a T5-shaped encoder whose width (64)
    matches the concatenated CLIP states, as 4096 does for the real one. Returns the folder.
    """
    import torch
    import transformers
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    transformers.utils.logging.disable_progress_bar()
    model_dir = Path(model_dir)
    tokenizer = _tokenizer()
    vocab, merges = _byte_vocab()
    tokenizer_2 = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=TOKEN_MAX_LENGTH, pad_token="!")  # type: ignore[arg-type]
    tokenizer_3 = _t5_tokenizer()
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=layers,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=64,
        caption_projection_dim=32,
        pooled_projection_dim=64,
        pos_embed_max_size=16,
    )
    text_encoder = CLIPTextModelWithProjection(_tiny_clip_config(tokenizer, "quick_gelu"))
    text_encoder_2 = CLIPTextModelWithProjection(_tiny_clip_config(tokenizer_2, "gelu"))
    text_encoder_3 = _tiny_t5(tokenizer_3, 64)
    vae = _tiny_vae16(1.5305, 0.0609)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    parts: list[Any] = [transformer, text_encoder, text_encoder_2, text_encoder_3, vae]
    for module in parts:
        module.eval()
    pipe: Any = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )
    return _save_pipeline(pipe, model_dir)


# ------------------------------------------------------------------------------------------ the dataset


def _draw(
    shape: str, colour: tuple[int, int, int], bg: tuple[int, int, int], size: int, rng: random.Random
) -> Image.Image:
    img = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(img)
    r = rng.randint(size // 5, size // 3)
    cx = rng.randint(r + 2, size - r - 2)
    cy = rng.randint(r + 2, size - r - 2)
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
    elif shape == "square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=colour)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    return img


def _dataset_complete(dataset_dir: Path) -> bool:
    pngs = list(dataset_dir.glob("*.png")) if dataset_dir.is_dir() else []
    return bool(pngs) and all(p.with_suffix(".txt").is_file() for p in pngs) and (dataset_dir / ".complete").is_file()


def make_shapes_dataset(dataset_dir: Path | str, n: int = 24, *, size: int = 64, seed: int = DATASET_SEED) -> Path:
    """Write `n` images of coloured shapes on plain backgrounds with captions naming them (png + txt).

    Captions are comma-separated tags with a trigger word first ("nyxshape, red circle, white
    background"), so shuffle_caption/keep_tokens have something to work on. Deterministic for a seed.
    A `.complete` marker is written last so a half-written folder is never mistaken for a finished one.
    """
    dataset_dir = Path(dataset_dir)
    dataset_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    colours, bgs = list(COLOURS), list(BACKGROUNDS)
    for i in range(n):
        shape = SHAPES[i % len(SHAPES)]
        colour = colours[(i // len(SHAPES)) % len(colours)]
        bg = bgs[(i // (len(SHAPES) * len(colours))) % len(bgs)]
        stem = f"{i:03d}_{colour}_{shape}"
        _draw(shape, COLOURS[colour], BACKGROUNDS[bg], size, rng).save(dataset_dir / f"{stem}.png")
        (dataset_dir / f"{stem}.txt").write_text(f"nyxshape, {colour} {shape}, {bg} background\n")
    (dataset_dir / ".complete").write_text(f"{n}\n")
    return dataset_dir


# ------------------------------------------------------------------------------------------ entry point


# the demo's families: model folder in the workspace, and what a complete one holds (checked for idempotence)
FAMILY_MODELS: dict[str, str] = {"sd15": "model", "flux": "model-flux", "sd3": "model-sd3"}
_FLOW_WEIGHT_DIRS: dict[str, tuple[str, ...]] = {
    "flux": ("transformer", "vae", "text_encoder", "text_encoder_2"),
    "sd3": ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"),
}


def _flow_model_complete(model_dir: Path, family: str) -> bool:
    """A finished tiny Flux/SD3 folder: its index and every weighted part (saved whole or not at all, since
    `_save_pipeline` renames a finished temp folder into place; checked anyway, as for SD1.5)."""
    if not (model_dir / "model_index.json").is_file():
        return False
    return all(any((model_dir / d).glob("*.safetensors")) for d in _FLOW_WEIGHT_DIRS[family])


def ensure_demo_assets(workspace: Path | str, family: str = "sd15") -> dict[str, str]:
    """Make the family's demo model (`<workspace>/model` for sd15, `model-flux`, `model-sd3`) and the shared
    `<workspace>/dataset` unless they are already complete. One dataset serves every family: the demo shows
    that a box can train the family, on images it already has."""
    if family not in FAMILY_MODELS:
        raise ValueError(f"unknown demo family {family!r}; one of {', '.join(FAMILY_MODELS)}")
    workspace = Path(workspace)
    workspace.mkdir(parents=True, exist_ok=True)
    model_dir, dataset_dir = workspace / FAMILY_MODELS[family], workspace / "dataset"
    if family == "sd15":
        if not _model_complete(model_dir):
            build_tiny_sd15(model_dir)
    elif not _flow_model_complete(model_dir, family):
        if family == "flux":
            build_tiny_flux(model_dir)  # dev-style: guidance embedding, dynamic shifting, as most users train
        else:
            build_tiny_sd3(model_dir)
    if not _dataset_complete(dataset_dir):
        make_shapes_dataset(dataset_dir)
    return {"model": str(model_dir), "dataset": str(dataset_dir)}


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    usage = (
        "usage: python -m nyx_tui.demo_assets WORKSPACE [--family sd15|flux|sd3]  "
        "(builds the tiny demo model and images there)"
    )
    if len(args) == 1 and args[0] in ("-h", "--help"):
        print(usage)
        return 0
    family = "sd15"
    if len(args) == 3 and args[1] == "--family" and args[2] in FAMILY_MODELS:
        family = args[2]
        args = args[:1]
    if len(args) != 1 or args[0].startswith("-"):
        print(usage, file=sys.stderr)
        return 2
    print(json.dumps(ensure_demo_assets(args[0], family)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
