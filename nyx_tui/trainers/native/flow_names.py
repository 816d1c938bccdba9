"""sd-scripts' module names for Flux and SD3 LoRAs, and the fused q/k/v layout of their files.

sd-scripts trains Flux on BFL's own model code and SD3 on Stability's MMDiT, so its files name BFL/SGM modules
(`lora_unet_double_blocks_0_img_attn_qkv`, `lora_unet_joint_blocks_0_x_block_attn_qkv`); ComfyUI, Forge and
diffusers (for Flux) load that layout. Nyx trains diffusers' transformers, whose modules are finer: one BFL
`qkv` Linear is diffusers' `to_q`, `to_k`, `to_v`, and a Flux single block's `linear1` is q, k, v and the MLP's
input projection (`proj_mlp`), stacked in that order along the output. The tables below say which diffusers
modules make each file module, in the file's row order; they agree with diffusers' own converters
(`_convert_sd_scripts_to_ai_toolkit` for Flux, `convert_sd3_transformer_checkpoint_to_diffusers` for SD3).

Flux, double block i (diffusers `transformer_blocks.i`), file `lora_unet_double_blocks_i_<name>`:
  img_attn_qkv = attn.to_q|to_k|to_v     txt_attn_qkv = attn.add_q_proj|add_k_proj|add_v_proj
  img_attn_proj = attn.to_out.0          txt_attn_proj = attn.to_add_out
  img_mlp_0 = ff.net.0.proj              txt_mlp_0 = ff_context.net.0.proj
  img_mlp_2 = ff.net.2                   txt_mlp_2 = ff_context.net.2
  img_mod_lin = norm1.linear             txt_mod_lin = norm1_context.linear
Flux, single block i (`single_transformer_blocks.i`), file `lora_unet_single_blocks_i_<name>`:
  linear1 = attn.to_q|to_k|to_v|proj_mlp, linear2 = proj_out, modulation_lin = norm.linear
SD3, joint block i (`transformer_blocks.i`), file `lora_unet_joint_blocks_i_<name>`:
  x_block_attn_qkv = attn.to_q|to_k|to_v, x_block_attn_proj = attn.to_out.0, x_block_mlp_fc1 = ff.net.0.proj,
  x_block_mlp_fc2 = ff.net.2, x_block_adaLN_modulation_1 = norm1.linear, (SD3.5's dual-attention blocks)
  x_block_attn2_qkv = attn2.to_q|to_k|to_v, x_block_attn2_proj = attn2.to_out.0; context_block_* the same
  with add_*_proj, to_add_out, ff_context, norm1_context. The last block is context-pre-only: its context
  block has only attn_qkv and adaLN_modulation_1 (no proj, no MLP), and that adaLN's output is (shift, scale)
  in SGM but (scale, shift) in diffusers (`AdaLayerNormContinuous`): its rows are swapped in the file.

A fused file module holds one LoRA for several diffusers modules. Two exact encodings (`fuse`/`unfuse`):
- **separate pieces** (sd-scripts' `split_qkv`): each piece has its own down (r × in) and up (o_i × r); the
  file stacks the downs (n·r × in) and places the ups block-diagonally (Σo × n·r). Loaders scale by
  alpha / down.shape[0], so the file's alpha is n·alpha: alpha/rank, and the output, stay the trained ones.
  (sd-scripts itself keeps alpha there, which plays its split-qkv LoRAs at 1/n strength on those modules.)
- **shared down** (sd-scripts' default, one LoRA on the fused Linear): the pieces share one down (r × in)
  and the file's up is theirs stacked (Σo × r), alpha unchanged.
DoRA's `dora_scale` is per output channel, and a fused row is a row of exactly one piece, so DoRA on the
fused module is DoRA on each piece: the scales are concatenated. LoHa/LoKr of a fused matrix are no product
of per-piece ones: they are refused for these families (`network_check`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from nyx_tui.config.fields import Family
from nyx_tui.trainers.native.flow_tables import FLUX_DOUBLE, FLUX_SINGLE, SD3_JOINT

FLOW_UNET_PREFIX = "lora_unet_"


@dataclass(frozen=True)
class FlowModule:
    """One module of the file: its name, the diffusers Linears it is made of (full paths in the transformer,
    in the file's row order), its type (per-type ranks), block kind (double, single, joint) and index, and
    whether its output halves are swapped between the file and diffusers (SD3's context-pre-only adaLN)."""

    name: str
    paths: tuple[str, ...]
    kind: str
    block: str
    index: int
    swap_halves: bool = False

    @property
    def fused(self) -> bool:
        return len(self.paths) > 1


def _linear(root: nn.Module, path: str) -> nn.Linear | None:
    try:
        module = root.get_submodule(path)
    except AttributeError:
        return None
    return module if isinstance(module, nn.Linear) else None


def _parent(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path.rsplit(".", 1)[0])


def flow_modules(family: Family | str, transformer: nn.Module) -> list[FlowModule]:
    """Every module sd-scripts' LoRA adapts in this transformer's blocks, in sd-scripts' order (double then
    single blocks for Flux). A table entry whose Linears the model lacks is left out, as sd-scripts' module
    search finds no Linear there: SD3's last context block (no proj, no MLP), attn2 outside SD3.5's
    dual-attention blocks."""
    family = Family(family)
    if family == Family.FLUX:
        groups = [
            ("double", "transformer_blocks", "double_blocks", FLUX_DOUBLE),
            ("single", "single_transformer_blocks", "single_blocks", FLUX_SINGLE),
        ]
    elif family == Family.SD3:
        groups = [("joint", "transformer_blocks", "joint_blocks", SD3_JOINT)]
    else:
        raise ValueError(f"{family.value} is not a flow-matching family (flux, sd3)")
    out: list[FlowModule] = []
    for block, container, bfl, table in groups:
        blocks: Any = getattr(transformer, container, [])
        for i in range(len(blocks)):
            for name, kind, rel in table:
                paths = tuple(f"{container}.{i}.{p}" for p in rel)
                if not all(_linear(transformer, p) is not None for p in paths):
                    continue
                swap = type(_parent(transformer, paths[0])).__name__ == "AdaLayerNormContinuous"
                out.append(FlowModule(f"{FLOW_UNET_PREFIX}{bfl}_{i}_{name}", paths, kind, block, i, swap))
    return out


def block_count(transformer: nn.Module, block: str) -> int:
    """How many double/joint (`double`) or single (`single`) blocks the transformer has."""
    if block == "single":
        return len(getattr(transformer, "single_transformer_blocks", []))
    return len(getattr(transformer, "transformer_blocks", []))


def sd3_model_type(config: Mapping[str, Any]) -> str:
    """sd-scripts' SD3 model type from the transformer's config, as its `sd3_utils` tells them apart:
    `medium` (3 medium: no q/k norm), `5-medium` (3.5 medium: q/k norm and dual-attention blocks),
    `5-large` (3.5 large: q/k norm, no dual attention)."""
    if config.get("qk_norm") is None:
        return "medium"
    return "5-medium" if config.get("dual_attention_layers") else "5-large"


def model_type(model: Any) -> str:
    """The model type sd-scripts writes for a loaded `FlowModel`: Flux `dev`/`schnell`, SD3 as
    `sd3_model_type`."""
    if Family(model.family) == Family.FLUX:
        return str(model.variant or "dev")
    return sd3_model_type(model.transformer.config)


# ------------------------------------------------------------------------------------------ fuse / unfuse


def swap_halves(t: torch.Tensor) -> torch.Tensor:
    """The two halves of the output rows swapped: SGM's (shift, scale) ↔ diffusers' (scale, shift)."""
    first, second = t.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def _alpha(tensors: Mapping[str, torch.Tensor]) -> float:
    down = tensors["lora_down.weight"]
    return float(tensors["alpha"]) if "alpha" in tensors else float(down.shape[0])


def fuse(
    parts: Sequence[Mapping[str, torch.Tensor]], *, shared_down: bool, swap: bool = False
) -> dict[str, torch.Tensor]:
    """The file tensors of one module from its pieces' (`lora_down.weight`, `lora_up.weight`, `alpha`,
    optionally `dora_scale`), pieces in the file's row order. `shared_down`: the pieces share one down matrix
    (one LoRA on the fused Linear); else they are separate LoRAs, stacked block-diagonally with alpha scaled
    so alpha/rank stays (the module docstring). `swap`: swap the output halves (SD3's last context adaLN)."""
    allowed = {"lora_down.weight", "lora_up.weight", "alpha", "dora_scale"}
    for part in parts:
        extra = sorted(set(part) - allowed)
        if extra:
            raise ValueError(f"cannot fuse {', '.join(extra)}: only LoRA/LoCon/DoRA tensors fit the fused layout")
    downs = [p["lora_down.weight"] for p in parts]
    ups = [p["lora_up.weight"] for p in parts]
    dtype = ups[0].dtype
    if len(parts) == 1:
        out = dict(parts[0])
        out["alpha"] = torch.tensor(_alpha(parts[0]))
    elif shared_down:
        if any(d.shape != downs[0].shape or not torch.equal(d, downs[0]) for d in downs[1:]):
            raise ValueError("pieces with a shared down matrix have different ones")
        alpha = torch.tensor(_alpha(parts[0]))
        out = {"lora_down.weight": downs[0], "lora_up.weight": torch.cat(ups, 0), "alpha": alpha}
    else:
        scales = [_alpha(p) / d.shape[0] for p, d in zip(parts, downs, strict=True)]
        if any(abs(s - scales[0]) > 1e-6 * max(1.0, abs(scales[0])) for s in scales):
            raise ValueError(f"pieces of one fused module scale differently ({scales}): one alpha/rank can't hold them")
        rank = sum(d.shape[0] for d in downs)
        out = {
            "lora_down.weight": torch.cat(downs, 0),
            "lora_up.weight": torch.block_diag(*[u.to(dtype) for u in ups]),
            "alpha": torch.tensor(scales[0] * rank),
        }
    if len(parts) > 1 and "dora_scale" in parts[0]:
        out["dora_scale"] = torch.cat([p["dora_scale"] for p in parts], 0)
    if swap:
        out["lora_up.weight"] = swap_halves(out["lora_up.weight"])
        if "dora_scale" in out:
            out["dora_scale"] = swap_halves(out["dora_scale"])
    return out


def is_block_diagonal(up: torch.Tensor, sizes: list[int]) -> bool:
    """Whether a fused up matrix is the block-diagonal stack of len(sizes) equal-rank pieces (the separate-
    pieces encoding): its rank divides evenly and every off-diagonal block is zero."""
    n = len(sizes)
    if up.shape[1] % n or up.shape[0] != sum(sizes):
        return False
    r = up.shape[1] // n
    row = 0
    for j, size in enumerate(sizes):
        rows = up[row : row + size]
        off = torch.cat([rows[:, : j * r], rows[:, (j + 1) * r :]], dim=1)
        if off.numel() and bool(off.any()):
            return False
        row += size
    return True


def unfuse(
    tensors: Mapping[str, torch.Tensor], sizes: list[int], *, shared: bool | None = None, swap: bool = False
) -> list[dict[str, torch.Tensor]]:
    """The pieces of one file module (out sizes `sizes`, in row order), each as `lora_down.weight`,
    `lora_up.weight`, `alpha` (+ `dora_scale`); every split is exact (the pieces' outputs are the fused
    module's rows).

    `shared` None: a block-diagonal up (`is_block_diagonal`: Nyx's or sd-scripts' split-qkv files) gives each
    piece its rows of the down and its block of the up, alpha/n (so alpha/rank stays); any other up (a genuine
    rank-r LoRA on the fused Linear) gives each piece the whole down and its rows of the up, alpha unchanged.
    `shared` True forces the second way (a network whose pieces share a down), False asks for the first
    and falls back to the second when the up is not block-diagonal."""
    down, up = tensors["lora_down.weight"], tensors["lora_up.weight"]
    alpha = _alpha(tensors)
    dora = tensors.get("dora_scale")
    if swap:
        up = swap_halves(up)
        dora = swap_halves(dora) if dora is not None else None
    if up.shape[0] != sum(sizes):
        raise ValueError(f"the up matrix has {up.shape[0]} rows, the modules {sum(sizes)} outputs ({sizes})")
    n = len(sizes)
    split = n > 1 and shared is not True and is_block_diagonal(up, sizes)
    out: list[dict[str, torch.Tensor]] = []
    row = 0
    r = down.shape[0] // n
    for j, size in enumerate(sizes):
        rows = slice(row, row + size)
        if split:
            piece = {
                "lora_down.weight": down[j * r : (j + 1) * r],
                "lora_up.weight": up[rows, j * r : (j + 1) * r],
                "alpha": torch.tensor(alpha / n),
            }
        else:
            piece = {"lora_down.weight": down, "lora_up.weight": up[rows], "alpha": torch.tensor(alpha)}
        if dora is not None:
            piece["dora_scale"] = dora[rows]
        out.append({k: v.contiguous() for k, v in piece.items()})
        row += size
    return out


def out_sizes(transformer: nn.Module, module: FlowModule) -> list[int]:
    """The output width of each diffusers piece of a file module."""
    sizes = []
    for path in module.paths:
        linear = _linear(transformer, path)
        if linear is None:  # peft wraps the Linear: its base layer has the shape
            base: Any = transformer.get_submodule(path)
            linear = base.get_base_layer()
        sizes.append(int(linear.out_features))
    return sizes
