"""How much GPU memory a training configuration needs, before anything is loaded.

Out-of-memory an hour into a rented GPU is the most common way a Flux run fails, and whether a run fits is
a sum anyone could do if they had the numbers: the frozen base at its storage precision, what the text
encoders and the VAE keep on the card, the adapter with its gradients and optimizer state, the activations
that wait for the backward pass, and CUDA's own share. This module does that sum from the config alone, so
the CLI and the TUI can show it before a job starts (it imports no torch: the TUI never does).

The numbers and where they come from (docs/vram.md has the worked figures for Flux.1 dev):

- **Parameter counts** are exact: each model was built from its published diffusers/transformers config
  on PyTorch's meta device and its parameters counted (`python bench/vram_estimate.py --count` repeats it).
  Flux.1 dev's 11,901,408,320 is also the count sd-scripts logs for a Flux fine-tune.
- **Activations of the flow transformers** are measured: the bytes autograd saves for the backward pass in
  one diffusers block (a Flux double and single block, an SD3 joint block) with LoRA on every linear layer,
  counted with saved-tensor hooks and expressed in units of batch × tokens × hidden × bytes per value
  (`--calibrate` repeats it). Without checkpointing every block keeps that many units; with gradient
  checkpointing each block keeps only its input (one unit) and one block at a time holds its full set plus
  the gradients in flight (`BACKWARD_EXTRA`); with CPU-offloaded checkpointing the inputs leave the card.
  Attention is counted as the flash/memory-efficient kernels use it (linear in tokens).
- **UNet activations** (SD1.5, SDXL) are a coarser per-latent-pixel measurement, scaled by resolution.
- **Fixed costs**: the CUDA context with cuBLAS/cuDNN workspaces (`CUDA_CONTEXT_GIB`) and a share for the
  caching allocator's fragmentation of everything that changes size during a step (`ALLOCATOR_SHARE`).

The peak is the largest of the phases that have the card to themselves: encoding the captions once
(cached text-encoder outputs), encoding the images once (cached latents), and training. Estimates are
planning figures, not promises: a measurement on the card (`bench/train_step.py` where a GPU is lent)
is the reference, and the TUI states the figure as "about".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from nyx_tui.config.model import TrainingConfig

__all__ = [
    "FLUX_DEV",
    "FLUX_SCHNELL",
    "MODEL_SIZES",
    "SD3_MEDIUM",
    "SD15",
    "SD35_LARGE",
    "SD35_MEDIUM",
    "SDXL",
    "TIERS_GIB",
    "BlockKind",
    "ModelSize",
    "VramEstimate",
    "estimate",
    "model_size_for",
    "smallest_tier",
]

GIB = 1024**3
CUDA_CONTEXT_GIB = 0.6  # CUDA context + cuBLAS/cuDNN handles and workspaces on a recent driver
ALLOCATOR_SHARE = 0.10  # fragmentation of the caching allocator, on the parts that change size during a step
BACKWARD_EXTRA = 8.0  # units in flight while one block runs its backward pass (output and inner gradients)
EDGE_UNITS = 4.0  # embedders before the blocks, final norm/projection and the loss after them
TEXT_ENCODE_WORK_GIB = 0.3  # one caption batch through T5-XXL/CLIP while caching their outputs
VAE_WORK_BYTES_PER_PIXEL = 128 * 2 * 4  # encoder at full resolution: 128 channels, bf16, ~4 maps alive at once
TIERS_GIB = (8, 10, 12, 16, 20, 24, 32, 40, 48, 80)  # an "N GB" card offers about N GiB to CUDA

# bytes per stored weight of the frozen base
STORAGE_BYTES = {
    "fp32": 4.0,
    "bf16": 2.0,
    "fp8": 1.0,  # float8_e4m3fn + one fp32 scale per tensor
    "int8": 1.0,  # + one fp32 scale per output row (< 0.2% for 3072-wide rows)
    "nf4": 0.5 + 1 / 64 + 4 / (64 * 256),  # 4 bits + an 8-bit absmax per 64 weights + their fp32 absmax per 256
}

# optimizer state bytes per trainable parameter stored in fp32 (weights and gradients are counted apart)
OPTIMIZER_STATE_BYTES = {
    "adamw": 8.0,  # exp_avg + exp_avg_sq
    "adamw8bit": 2.0,  # bitsandbytes: both states in 8 bits (tensors under 4,096 elements stay 32-bit)
    "lion": 4.0,  # one momentum
    "lion8bit": 1.0,
    "prodigy": 16.0,  # exp_avg, exp_avg_sq, s and the initial weights p0
    "came": 4.5,  # exp_avg + factored second moments and residuals
    "adafactor": 0.5,  # factored second moment (row + column), no first moment by default
    "adamw_schedulefree": 8.0,  # z + exp_avg_sq (the averaged weights are the parameters)
    "custom": 8.0,  # assume Adam-like
}

# adapter parameters relative to a LoRA of the same rank on the same layers
NETWORK_PARAM_FACTOR = {"lora": 1.0, "dora": 1.0, "locon": 1.0, "loha": 2.0, "lokr": 1.0}


@dataclass(frozen=True)
class BlockKind:
    """A kind of repeated transformer block: how many, their parameters, the LoRA parameters one rank adds
    to one block (Σ in+out over its linear layers), and the activation units one block saves."""

    name: str
    count: int
    params: int
    lora_per_rank: int
    saved_units: float
    last_params: int | None = None  # a smaller last block (SD3's context-pre-only block)

    @property
    def total_params(self) -> int:
        if self.last_params is None:
            return self.count * self.params
        return (self.count - 1) * self.params + self.last_params


@dataclass(frozen=True)
class ModelSize:
    """The sizes of one model, for the estimate. Flow transformers are described block by block; UNets by
    their activation bytes per latent pixel (bf16, LoRA on the attention layers)."""

    name: str
    family: str
    denoiser_params: int
    hidden: int
    text_encoders: tuple[tuple[str, int], ...]
    vae_params: int
    blocks: tuple[BlockKind, ...] = ()
    largest_linear: int = 0
    t5: str | None = None  # the text encoder that flow.t5_on_cpu keeps on the CPU
    text_tokens: int = 77  # default text sequence length in the denoiser (Flux: T5 length)
    clip_tokens: int = 0  # SD3: CLIP tokens ahead of the T5 tokens
    latent_factor: int = 8  # pixels per latent pixel (VAE)
    patch: int = 1  # latent pixels per token side
    unet_lora_per_rank: int = 0  # UNets: Σ in+out over the attention layers' linears
    unet_saved_per_pixel: float = 0.0  # bytes per latent pixel saved without checkpointing
    unet_ckpt_per_pixel: float = 0.0  # bytes per latent pixel kept with checkpointing

    @property
    def is_transformer(self) -> bool:
        return bool(self.blocks)

    @property
    def block_params(self) -> int:
        return sum(b.total_params for b in self.blocks)


# Parameter counts: built from the published configs on the meta device (bench/vram_estimate.py --count).
# Activation units: measured on diffusers' blocks with LoRA on every linear (bench/vram_estimate.py --calibrate).
_T5XXL = ("t5xxl", 4_762_310_656)  # T5 v1.1 XXL encoder (google/t5-v1_1-xxl): 24 layers, 4096 wide
_CLIP_L = ("clip_l", 123_060_480)  # openai/clip-vit-large-patch14 text model
_CLIP_G = ("clip_g", 694_659_840)  # OpenCLIP ViT-bigG/14 text model with projection (SDXL, SD3)
_OPENCLIP_H = ("openclip_h", 340_387_840)  # SD2's text encoder (23 of ViT-H/14's 24 layers)

_FLUX_DOUBLE = BlockKind("double", 19, 339_831_296, 153_600, 24.3)
_FLUX_SINGLE = BlockKind("single", 38, 141_591_808, 64_512, 21.2)
FLUX_DEV = ModelSize(
    "Flux.1 dev",
    "flux",
    denoiser_params=11_901_408_320,  # also what sd-scripts logs as "number of trainable parameters"
    hidden=3072,
    text_encoders=(_CLIP_L, _T5XXL),
    vae_params=83_819_683,  # the 16-channel AE
    blocks=(_FLUX_DOUBLE, _FLUX_SINGLE),
    largest_linear=56_623_104,  # a double block's norm1.linear (3072 → 6 × 3072)
    t5="t5xxl",
    text_tokens=512,
    patch=2,
)
FLUX_SCHNELL = ModelSize(
    "Flux.1 schnell",
    "flux",
    denoiser_params=11_891_178_560,  # no guidance embedding
    hidden=3072,
    text_encoders=(_CLIP_L, _T5XXL),
    vae_params=83_819_683,
    blocks=(_FLUX_DOUBLE, _FLUX_SINGLE),
    largest_linear=56_623_104,
    t5="t5xxl",
    text_tokens=256,
    patch=2,
)
SD3_MEDIUM = ModelSize(
    "SD3 medium",
    "sd3",
    denoiser_params=2_028_328_000,
    hidden=1536,
    text_encoders=(_CLIP_L, _CLIP_G, _T5XXL),
    vae_params=83_819_683,
    blocks=(BlockKind("joint", 24, 84_980_736, 1_818_624 // 24, 21.3, last_params=54_294_528),),
    largest_linear=14_155_776,
    t5="t5xxl",
    text_tokens=256,
    clip_tokens=77,
    patch=2,
)
SD35_MEDIUM = ModelSize(
    "SD3.5 medium",
    "sd3",
    denoiser_params=2_243_171_520,
    hidden=1536,
    text_encoders=(_CLIP_L, _CLIP_G, _T5XXL),
    vae_params=83_819_683,
    blocks=(  # MMDiT-X: the first 13 blocks add a second attention over the image tokens
        BlockKind("joint (dual attention)", 13, 101_506_944, 93_696, 37.1),
        BlockKind("joint", 11, 84_980_992, (10 * 76_800 + 52_224) // 11, 27.3, last_params=54_294_784),
    ),
    largest_linear=21_233_664,
    t5="t5xxl",
    text_tokens=256,
    clip_tokens=77,
    patch=2,
)
SD35_LARGE = ModelSize(
    "SD3.5 large",
    "sd3",
    denoiser_params=8_056_627_520,
    hidden=2432,
    text_encoders=(_CLIP_L, _CLIP_G, _T5XXL),
    vae_params=83_819_683,
    blocks=(BlockKind("joint", 38, 212_999_680, 4_581_888 // 38, 27.3, last_params=136_085_248),),
    largest_linear=35_487_744,
    t5="t5xxl",
    text_tokens=256,
    clip_tokens=77,
    patch=2,
)
SDXL = ModelSize(
    "SDXL 1.0",
    "sdxl",
    denoiser_params=2_567_463_684,
    hidden=1280,
    text_encoders=(_CLIP_L, _CLIP_G),
    vae_params=83_653_863,
    unet_lora_per_rank=2_659_840,  # Σ in+out of q/k/v/out, proj_in/out and feed-forward in the 70 transformer blocks
    unet_saved_per_pixel=439_400.0,
    unet_ckpt_per_pixel=23_000.0,
)
SD15 = ModelSize(
    "SD 1.5",
    "sd15",
    denoiser_params=859_520_964,
    hidden=1280,
    text_encoders=(_CLIP_L,),
    vae_params=83_653_863,
    unet_lora_per_rank=423_936,
    unet_saved_per_pixel=232_000.0,
    unet_ckpt_per_pixel=15_700.0,
)
SD2 = ModelSize(
    "SD 2.x",
    "sd2",
    denoiser_params=865_910_724,
    hidden=1280,
    text_encoders=(_OPENCLIP_H,),
    vae_params=83_653_863,
    unet_lora_per_rank=432_128,
    unet_saved_per_pixel=232_000.0,
    unet_ckpt_per_pixel=15_700.0,
)
MODEL_SIZES: dict[str, ModelSize] = {
    "flux-dev": FLUX_DEV,
    "flux-schnell": FLUX_SCHNELL,
    "sd3-medium": SD3_MEDIUM,
    "sd3.5-medium": SD35_MEDIUM,
    "sd3.5-large": SD35_LARGE,
    "sdxl": SDXL,
    "sd15": SD15,
    "sd2": SD2,
}


def model_size_for(cfg: TrainingConfig) -> ModelSize:
    """The full-size model a config trains, told from the family and the base model's name (Flux: schnell if
    the name says so, else dev; SD3: 3.5 large / 3.5 medium / 3 medium by name, 3.5 large if it says
    nothing). Pass a `ModelSize` to `estimate` for anything else."""
    family = str(cfg.model.family.value)
    name = cfg.model.pretrained.lower().replace("_", "-")
    if family == "flux":
        return FLUX_SCHNELL if "schnell" in name else FLUX_DEV
    if family == "sd3":
        is_35 = any(s in name for s in ("3.5", "3-5", "35"))
        if "medium" in name:
            return SD35_MEDIUM if is_35 else SD3_MEDIUM
        return SD35_LARGE
    return {"sdxl": SDXL, "sd2": SD2}.get(family, SD15)


def smallest_tier(total_gib: float, margin: float = 0.0) -> int | None:
    """The smallest common card size (GB, ≈ GiB usable) the estimate fits with `margin` (a fraction) to spare."""
    for tier in TIERS_GIB:
        if total_gib <= tier * (1.0 - margin):
            return tier
    return None


@dataclass
class VramEstimate:
    """An estimate in GiB: `parts` of the training phase (keys: cuda_context, base_weights, swapped_block,
    dequantize_scratch, text_encoders, vae, adapter, adapter_gradients, optimizer_state, activations,
    allocator_slack), the peak of each phase (training, and the caching phases that are on), notes on the
    assumptions. `total_gib` is the largest phase."""

    model: str
    parts: dict[str, float]
    phases: dict[str, float]
    notes: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)  # how describe() names each part

    @property
    def total_gib(self) -> float:
        return max(self.phases.values())

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=lambda k: self.phases[k])

    def fits(self, card_gib: float, margin: float = 0.0) -> bool:
        return self.total_gib <= card_gib * (1.0 - margin)

    def describe(self) -> str:
        """A one-line summary, then the training phase part by part and the other phases."""
        tier = smallest_tier(self.total_gib)
        fits = f"fits a {tier} GB card" if tier else "more than any single card here"
        s = self.settings
        head = (
            f"≈ {self.total_gib:.1f} GiB peak ({self.peak_phase}) for {self.model} at {s.get('resolution')} px, "
            f"batch {s.get('batch_size')}: {fits}"
        )
        names = {k: self.labels.get(k, k) for k in self.parts}
        width = max(len(k) for k in [*names.values(), *self.phases])
        lines = [head, "  training:"]
        lines += [f"    {names[k]:<{width}}  {v:6.2f} GiB" for k, v in self.parts.items() if v > 0.005]
        lines.append(f"    {'= training':<{width}}  {self.phases['training']:6.2f} GiB")
        others = [(k, v) for k, v in self.phases.items() if k != "training"]
        if others:
            lines.append("  before training:")
            lines += [f"    {k:<{width}}  {v:6.2f} GiB" for k, v in others]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _value(obj: Any, name: str, default: Any) -> Any:
    """A config field as a plain value (enums as their value); `default` while a field does not exist yet."""
    v = getattr(obj, name, default)
    return getattr(v, "value", v)


def _flux_swap_split(blocks_to_swap: int) -> tuple[int, int]:
    """sd-scripts' Flux blocks_to_swap: n // 2 double blocks and (n - n // 2) × 2 single blocks."""
    double = blocks_to_swap // 2
    return double, (blocks_to_swap - double) * 2


def _swapped(size: ModelSize, blocks_to_swap: int, notes: list[str]) -> tuple[int, int]:
    """(parameters of the swapped blocks, parameters of the largest swapped block)."""
    if not blocks_to_swap or not size.is_transformer:
        if blocks_to_swap:
            notes.append("flow.blocks_to_swap is for the flow transformers; ignored")
        return 0, 0
    if size.family == "flux":
        double, single = size.blocks
        n_d, n_s = _flux_swap_split(blocks_to_swap)
        if n_d > double.count or n_s > single.count:
            n_d, n_s = min(n_d, double.count), min(n_s, single.count)
            notes.append(f"blocks_to_swap = {blocks_to_swap} is more than the model has; counted {n_d}+{n_s}")
        params = n_d * double.params + n_s * single.params
        largest = double.params if n_d else (single.params if n_s else 0)
        return params, largest
    # SD3: the last n blocks in forward order
    sizes = [b.params for b in size.blocks for _ in range(b.count)]
    last = size.blocks[-1].last_params
    if last is not None:
        sizes[-1] = last
    n = min(blocks_to_swap, len(sizes))
    if n < blocks_to_swap:
        notes.append(f"blocks_to_swap = {blocks_to_swap} is more than the model's {len(sizes)} blocks")
    chosen = sizes[len(sizes) - n :]
    return sum(chosen), max(chosen, default=0)


def _trained_blocks(size: ModelSize, flow: Any) -> dict[str, int]:
    """How many blocks of each kind get adapters (Flux: train_blocks and the index lists)."""
    counts = {b.name: b.count for b in size.blocks}
    if size.family != "flux":  # SD3: double_block_indices number the joint blocks across their kinds
        indices = _value(flow, "double_block_indices", None)
        if indices is not None:
            kinds = [b.name for b in size.blocks for _ in range(b.count)]
            chosen = {i for i in indices if 0 <= i < len(kinds)}
            counts = {b.name: sum(1 for i in chosen if kinds[i] == b.name) for b in size.blocks}
        return counts
    which = _value(flow, "train_blocks", "all")
    if which == "double":
        counts["single"] = 0
    elif which == "single":
        counts["double"] = 0
    for kind, name in (("double", "double_block_indices"), ("single", "single_block_indices")):
        indices = _value(flow, name, None)
        if indices is not None and counts.get(kind):
            counts[kind] = len({i for i in indices if 0 <= i < counts[kind]})
    return counts


def estimate(cfg: TrainingConfig, params: ModelSize | None = None) -> VramEstimate:
    """The GPU memory `cfg` needs on one card, in GiB, part by part (see the module's docstring)."""
    size = params or model_size_for(cfg)
    tr, flow, net, data = cfg.training, cfg.flow, cfg.network, cfg.dataset
    notes: list[str] = []

    mixed = _value(tr, "mixed_precision", "no")
    full_bf16 = bool(_value(tr, "full_bf16", False))
    half = mixed in ("fp16", "bf16") or full_bf16
    act_bytes = 2.0 if half else 4.0
    base_bytes = 2.0 if half else 4.0
    quant = str(_value(tr, "base_quantization", "none"))
    if not size.is_transformer and quant != "none":
        notes.append(f"base_quantization = {quant} is for the flow transformers; counted as unquantized")
        quant = "none"
    checkpointing = bool(_value(tr, "gradient_checkpointing", False))
    cpu_offload = bool(_value(tr, "cpu_offload_checkpointing", False)) and checkpointing
    te_cached = bool(_value(tr, "cache_text_encoder_outputs", False)) or bool(
        _value(tr, "cache_text_encoder_outputs_to_disk", False)
    )
    if bool(_value(net, "train_text_encoder", False)):
        te_cached = False
        notes.append("text-encoder training keeps the encoders on the card (their adapters are not counted)")
    latents_cached = bool(_value(tr, "cache_latents", False)) or bool(_value(tr, "cache_latents_to_disk", False))
    t5_on_cpu = bool(_value(flow, "t5_on_cpu", False))
    blocks_to_swap = int(_value(flow, "blocks_to_swap", 0) or 0)
    batch = int(_value(tr, "batch_size", 1))
    resolution = int(_value(data, "resolution", 512))
    rank = int(_value(net, "dim", 16))
    kind = str(_value(net, "kind", "lora"))
    optimizer = str(_value(cfg.optimizer, "type", "adamw"))

    # ------------------------------------------------------------------ the frozen base
    swapped, largest_swapped = _swapped(size, blocks_to_swap, notes)
    quantized = size.block_params if quant != "none" else 0
    store = STORAGE_BYTES.get(quant, base_bytes) if quant != "none" else base_bytes
    resident_quantized = quantized - (swapped if quant != "none" else 0)
    resident_plain = size.denoiser_params - quantized - (swapped if quant == "none" else 0)
    base = resident_quantized * store + resident_plain * base_bytes
    swap_in = largest_swapped * (store if quant != "none" else base_bytes)  # the one swapped block on the card
    dequant = 2 * size.largest_linear * act_bytes if quant != "none" else 0.0

    # ------------------------------------------------------------------ text encoders and VAE
    te_gpu = sum(p for name, p in size.text_encoders if not (t5_on_cpu and name == size.t5)) * base_bytes
    te_training = 0.0 if te_cached else te_gpu
    vae = size.vae_params * base_bytes
    pixels = resolution * resolution
    vae_work = pixels * VAE_WORK_BYTES_PER_PIXEL * batch * (act_bytes / 2)
    vae_training = 0.0 if latents_cached else vae

    # ------------------------------------------------------------------ the adapter and its optimizer
    if size.is_transformer:
        trained = _trained_blocks(size, flow)
        lora_per_rank = sum(b.lora_per_rank * trained.get(b.name, 0) for b in size.blocks)
    else:
        lora_per_rank = size.unet_lora_per_rank
    lora_params = rank * lora_per_rank * NETWORK_PARAM_FACTOR.get(kind, 1.0)
    weight_bytes = 2.0 if full_bf16 else 4.0
    state_bytes = OPTIMIZER_STATE_BYTES.get(optimizer, 8.0)
    if not optimizer.endswith("8bit"):
        state_bytes *= weight_bytes / 4.0  # states follow the weights' dtype (full_bf16)
    adapter = lora_params * weight_bytes
    grads = lora_params * weight_bytes
    opt_state = lora_params * state_bytes

    # ------------------------------------------------------------------ activations
    latent_side = resolution // size.latent_factor
    if size.is_transformer:
        image_tokens = (latent_side // size.patch) ** 2
        t5_len = _value(flow, "t5_max_token_length", None) or size.text_tokens
        tokens = batch * (image_tokens + size.clip_tokens + int(t5_len))
        unit = tokens * size.hidden * act_bytes
        n_blocks = sum(b.count for b in size.blocks)
        working = max(b.saved_units for b in size.blocks) + BACKWARD_EXTRA
        if not checkpointing:
            kept = sum(b.count * b.saved_units for b in size.blocks)
        elif cpu_offload:
            kept = 2.0  # the block inputs live on the CPU; one in flight each way
        else:
            kept = float(n_blocks)  # each block's input
        activations = (kept + working + EDGE_UNITS) * unit
        act_detail = f"{tokens:,} tokens × {size.hidden} × {act_bytes:.0f} B = {unit / 2**20:.1f} MiB a unit"
    else:
        lat_pixels = batch * latent_side * latent_side
        no_ckpt = size.unet_saved_per_pixel * lat_pixels * (act_bytes / 2)
        activations = (size.unet_ckpt_per_pixel * lat_pixels + 0.1 * no_ckpt) if checkpointing else no_ckpt
        act_detail = f"{lat_pixels:,} latent pixels"
        if cpu_offload:
            notes.append("cpu_offload_checkpointing is for the flow transformers; not counted")
    if not latents_cached:
        activations = max(activations, vae_work)  # the VAE encodes before the denoiser's step, not beside it

    dynamic = activations + dequant + grads
    allocator = ALLOCATOR_SHARE * dynamic
    parts_bytes = {
        "cuda_context": CUDA_CONTEXT_GIB * GIB,
        "base_weights": base,
        "swapped_block": swap_in,
        "dequantize_scratch": dequant,
        "text_encoders": te_training,
        "vae": vae_training,
        "adapter": adapter,
        "adapter_gradients": grads,
        "optimizer_state": opt_state,
        "activations": activations,
        "allocator_slack": allocator,
    }
    storage = quant if quant != "none" else ("bf16" if half else "fp32")
    labels = {
        "cuda_context": "CUDA context",
        "base_weights": f"base weights ({storage})",
        "swapped_block": "swapped block on the card",
        "dequantize_scratch": "dequantize scratch",
        "text_encoders": "text encoders",
        "vae": "VAE",
        "adapter": f"adapter ({lora_params / 1e6:.1f} M params)",
        "adapter_gradients": "adapter gradients",
        "optimizer_state": f"optimizer state ({optimizer})",
        "activations": "activations",
        "allocator_slack": "allocator slack",
    }
    parts = {k: v / GIB for k, v in parts_bytes.items()}
    phases = {"training": sum(parts.values())}
    if te_cached:
        phases["text-encoder caching"] = CUDA_CONTEXT_GIB + (te_gpu / GIB) + TEXT_ENCODE_WORK_GIB
    if latents_cached:
        phases["latent caching"] = CUDA_CONTEXT_GIB + (vae + vae_work) / GIB

    if swapped:
        notes.append(
            f"{swapped / 1e9:.2f} B parameters of swapped blocks stay in CPU memory "
            f"({swapped * (store if quant != 'none' else base_bytes) / GIB:.1f} GiB of RAM)"
        )
    if t5_on_cpu and size.t5:
        notes.append("T5 runs on the CPU: about 9 GiB less on the card, a slower start")
    if blocks_to_swap and not checkpointing and size.is_transformer:
        notes.append("block swapping saves its memory with gradient checkpointing on (autograd keeps weights)")
    notes.append(f"activations: {act_detail}")
    settings = {
        "resolution": resolution,
        "batch_size": batch,
        "rank": rank,
        "base_quantization": quant,
        "gradient_checkpointing": checkpointing,
        "cpu_offload_checkpointing": cpu_offload,
        "blocks_to_swap": blocks_to_swap,
        "text_encoders_cached": te_cached,
        "latents_cached": latents_cached,
        "t5_on_cpu": t5_on_cpu,
        "optimizer": optimizer,
        "precision": "bf16/fp16" if half else "fp32",
    }
    return VramEstimate(size.name, parts, phases, notes, settings, labels)
