"""Converting LoRA files between kohya (sd-scripts) and diffusers/peft layouts, and repairing LyCORIS prefixes.

Torch-free: tensors are read with `header.read_tensor` (float32 numpy), changed only where a layout needs it,
and written back in their file dtype (`header.encode`), so a renamed tensor keeps its exact bytes.

**kohya** names modules `lora_unet_<path with _>` / `lora_te_…` (SD1.5/SD2: diffusers paths; SDXL: SGM paths,
`kohya_names.sgm_path`, and `lora_te1_`/`lora_te2_`; Flux/SD3: BFL/SGM modules, `lora_unet_double_blocks_0_
img_attn_qkv`…) with `lora_down.weight`, `lora_up.weight` and `alpha`; loaders scale up·down by alpha/rank.

**diffusers** (what `pipe.load_lora_weights` reads as its own format, and what `save_lora_weights` writes) keys
peft tensors by the pipeline part and module path: `unet.down_blocks.0….to_q.lora_A.weight` / `lora_B`,
`text_encoder.text_model.…`, `text_encoder_2.…`, `transformer.…` for Flux/SD3. peft has no per-module alpha
tensor: diffusers reads the alphas from the file's `lora_adapter_metadata` (the LoraConfig kwargs per part,
`unet.lora_alpha`, `unet.alpha_pattern`…), and takes alpha = rank when there is none. So kohya → diffusers keeps
the weights as they are and writes every module's alpha and rank there (exact, and reversible); diffusers →
kohya reads them back (else a `.alpha` tensor, else the rank).

**Fused q/k/v** (Flux, SD3; `flow_names` explains the two encodings): kohya's module (`img_attn_qkv`, Flux's
single-block `linear1` = q|k|v|proj_mlp) becomes diffusers' `to_q`, `to_k`, `to_v` (+ `proj_mlp`): when the
pieces use disjoint columns of the up matrix (sd-scripts' `split_qkv`, Nyx's block-diagonal layout) each piece
takes its rows of the down and its block of the up, alpha scaled to its rank so alpha/rank stays; otherwise
(one LoRA on the fused Linear, a shared down) each piece gets the whole down and its rows of the up, alpha
unchanged. Back to kohya, pieces that share one down and one scale give the shared-down form; others are
stacked (downs concatenated, ups block-diagonal, alpha = scale × total rank), missing pieces as zero rows.
Both directions keep every ΔW = scale · up · down exactly (SD3's last context adaLN has its halves swapped).

LoHa, LoKr, DoRA and full-diff modules have no diffusers/peft LoRA form that diffusers loads: converting them
to diffusers is refused (their kohya files are what the webuis load). `repair_prefix` renames LyCORIS files
saved with its default `lycoris_` prefix (or none) to the kohya prefixes so A1111, ComfyUI and diffusers load
them; every tensor keeps its bytes.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nyx_tui.lora.header import (
    LoraFileError,
    SafetensorsHeader,
    encode,
    read_header,
    read_raw,
    read_tensor,
    write_safetensors,
)
from nyx_tui.lora.inspect import (
    ADAPTER_METADATA_KEY,
    diffusers_alphas,
    family_from_keys,
    family_from_metadata,
    key_format,
    read_modules,
    split_key,
)
from nyx_tui.trainers.native.flow_tables import FLUX_DOUBLE, FLUX_SINGLE, SD3_JOINT  # shared with the trainer
from nyx_tui.trainers.native.kohya_names import RESNET, SDXL_LAYOUT, TOP, UNetLayout, sgm_path

FAMILIES = ("sd15", "sd2", "sdxl", "flux", "sd3")
TARGETS = ("kohya", "diffusers")


# Flux's modules outside the blocks (diffusers' `_convert_sd_scripts_to_ai_toolkit`); the final adaLN's
# halves are (shift, scale) in BFL's model and (scale, shift) in diffusers'
FLUX_TOP: dict[str, str] = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in_in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in_out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in_in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in_out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in_in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in_out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer_linear": "proj_out",
    "final_layer_adaLN_modulation_1": "norm_out.linear",
}
FLUX_TOP_SWAPPED = {"final_layer_adaLN_modulation_1"}

# module-name parts that contain "_" (kohya names flatten paths with "_": these put the dots back)
_COMPOUND_NAMES = """
down_blocks up_blocks mid_block transformer_blocks single_transformer_blocks to_q to_k to_v to_out proj_in
proj_out time_emb_proj conv_shortcut conv_in conv_out conv_norm_out time_embedding linear_1 linear_2
add_embedding add_q_proj add_k_proj add_v_proj to_add_out ff_context norm1_context norm_out proj_mlp
x_embedder context_embedder time_text_embed timestep_embedder text_embedder guidance_embedder text_model
self_attn q_proj k_proj v_proj out_proj final_layer_norm layer_norm1 layer_norm2 token_embedding
position_embedding text_projection embed_tokens layer_norm wi_0 wi_1 input_blocks middle_block output_blocks
in_layers emb_layers out_layers skip_connection time_embed label_emb relative_attention_bias
"""
_COMPOUND = set(_COMPOUND_NAMES.split())
_MAX_COMPOUND = max(len(c.split("_")) for c in _COMPOUND)
_PEFT_TENSORS = {
    "lora_A.weight": "lora_down.weight",
    "lora_B.weight": "lora_up.weight",
    "lora.down.weight": "lora_down.weight",
    "lora.up.weight": "lora_up.weight",
}
_LORA_ONLY = {"lora_down.weight", "lora_up.weight", "alpha"}


def dotted(name: str) -> str:
    """A kohya module path (`down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q`) with its dots back
    (`down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`): the known names that hold "_" stay whole."""
    tokens = name.split("_")
    out: list[str] = []
    i = 0
    while i < len(tokens):
        for n in range(min(_MAX_COMPOUND, len(tokens) - i), 1, -1):
            if "_".join(tokens[i : i + n]) in _COMPOUND:
                out.append("_".join(tokens[i : i + n]))
                i += n
                break
        else:
            out.append(tokens[i])
            i += 1
    return ".".join(out)


def _invert(table: Mapping[str, str]) -> dict[str, str]:
    return {v: k for k, v in table.items()}


def diffusers_path(sgm: str, layout: UNetLayout = SDXL_LAYOUT) -> str:
    """The diffusers UNet path of an SGM one (dotted): the inverse of `kohya_names.sgm_path`."""
    n = layout.layers_per_block
    resnet, top = _invert(RESNET), _invert(TOP)

    def inner(rest: str, table: Mapping[str, str]) -> str:
        for sgm_name, name in table.items():
            if rest == sgm_name or rest.startswith(sgm_name + "."):
                return name + rest[len(sgm_name) :]
        return rest

    def join(where: str, rest: str) -> str:
        return f"{where}.{rest}" if rest else where

    m = re.match(r"^input_blocks\.(\d+)\.(\d+)(?:\.(.*))?$", sgm)
    if m and int(m.group(1)) > 0:
        k, sub, rest = int(m.group(1)), int(m.group(2)), m.group(3) or ""
        if k % (n + 1) == 0:
            return join(f"down_blocks.{k // (n + 1) - 1}.downsamplers.0", inner(rest, {"op": "conv"}))
        level, j = (k - 1) // (n + 1), (k - 1) % (n + 1)
        if sub == 1:
            return join(f"down_blocks.{level}.attentions.{j}", rest)
        return join(f"down_blocks.{level}.resnets.{j}", inner(rest, resnet))
    m = re.match(r"^middle_block\.(\d+)(?:\.(.*))?$", sgm)
    if m:
        k, rest = int(m.group(1)), m.group(2) or ""
        if k == 1:
            return join("mid_block.attentions.0", rest)
        return join(f"mid_block.resnets.{k // 2}", inner(rest, resnet))
    m = re.match(r"^output_blocks\.(\d+)\.(\d+)(?:\.(.*))?$", sgm)
    if m:
        k, sub, rest = int(m.group(1)), int(m.group(2)), m.group(3) or ""
        level, j = k // (n + 1), k % (n + 1)
        has_attention = level < len(layout.up_attentions) and layout.up_attentions[level]
        if sub == 0:
            return join(f"up_blocks.{level}.resnets.{j}", inner(rest, resnet))
        if sub == 1 and has_attention:
            return join(f"up_blocks.{level}.attentions.{j}", rest)
        return join(f"up_blocks.{level}.upsamplers.0", rest)
    return inner(sgm, top)


# ------------------------------------------------------------------------------------------ reading


@dataclass
class Piece:
    """A LoRA on one module: down (r × in[ × k × k]), up (out × r[ × 1 × 1]), alpha, the file dtype, and any
    other tensors it had (LyCORIS kinds keep theirs, by suffix)."""

    down: np.ndarray | None
    up: np.ndarray | None
    alpha: float | None
    dtype: str
    other: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def rank(self) -> int:
        assert self.down is not None
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return (self.alpha if self.alpha is not None else self.rank) / self.rank


def _read_pieces(header: SafetensorsHeader) -> dict[str, Piece]:
    """Every module of the file as a Piece (module names as in the file)."""
    groups: dict[str, dict[str, str]] = {}
    for key in header.tensors:
        module, suffix = split_key(key)
        if not suffix:
            raise LoraFileError(
                f"{header.path}: tensor {key!r} is no LoRA tensor (lora_down/up, lora_A/B, alpha, hada_…, lokr_…)",
                "check that the file is a LoRA, not a full model or an embedding",
            )
        groups.setdefault(module, {})[suffix] = key
    out: dict[str, Piece] = {}
    with open(header.path, "rb") as f:
        for module, parts in groups.items():
            arrays = {_PEFT_TENSORS.get(s, s): read_tensor(header, k, f) for s, k in parts.items()}
            dtypes = [header.tensors[k].dtype for s, k in parts.items() if s != "alpha"]
            alpha = arrays.pop("alpha", None)
            out[module] = Piece(
                down=arrays.pop("lora_down.weight", None),
                up=arrays.pop("lora_up.weight", None),
                alpha=float(alpha.reshape(-1)[0]) if alpha is not None else None,
                dtype=dtypes[0] if dtypes else "F32",
                other=arrays,
            )
    return out


# ------------------------------------------------------------------------------------------ names


def _te_prefixes(family: str) -> dict[str, str]:
    """kohya text-encoder prefix → diffusers pipeline part, per family."""
    if family in ("sd15", "sd2"):
        return {"lora_te_": "text_encoder"}
    if family == "sdxl":
        return {"lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2", "lora_te_": "text_encoder"}
    if family == "flux":
        return {"lora_te1_": "text_encoder", "lora_te3_": "text_encoder_2", "lora_te_": "text_encoder"}
    return {"lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2", "lora_te3_": "text_encoder_3"}


def _flow_tables(family: str) -> list[tuple[str, str, tuple[tuple[str, str, tuple[str, ...]], ...]]]:
    """(kohya block name, diffusers container, table) per block kind."""
    if family == "flux":
        return [
            ("double_blocks", "transformer_blocks", FLUX_DOUBLE),
            ("single_blocks", "single_transformer_blocks", FLUX_SINGLE),
        ]
    return [("joint_blocks", "transformer_blocks", SD3_JOINT)]


_KOHYA_TE: dict[str, dict[str, str]] = {  # diffusers pipeline part → the kohya prefix sd-scripts writes
    "sd15": {"text_encoder": "lora_te_"},
    "sd2": {"text_encoder": "lora_te_"},
    "sdxl": {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"},
    "flux": {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te3_"},
    "sd3": {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_", "text_encoder_3": "lora_te3_"},
}


def kohya_to_diffusers_paths(name: str, family: str, layout: UNetLayout = SDXL_LAYOUT) -> tuple[str, ...]:
    """The diffusers module paths (with the pipeline part: `unet.…`, `transformer.…`, `text_encoder.…`) a
    kohya module stands for, in the file's row order (several for a fused Flux/SD3 module)."""
    for prefix, part in _te_prefixes(family).items():
        if name.startswith(prefix):
            path = dotted(name.removeprefix(prefix))
            return (f"{part}.{path}",)
    if not name.startswith("lora_unet_"):
        raise ValueError(f"{name}: not a kohya module name (lora_unet_…, lora_te…)")
    rest = name.removeprefix("lora_unet_")
    if family in ("flux", "sd3"):
        for bfl, container, table in _flow_tables(family):
            m = re.match(rf"^{bfl}_(\d+)_(.+)$", rest)
            if m:
                i, sub = m.group(1), m.group(2)
                for fname, _, rel in table:
                    if fname == sub:
                        return tuple(f"transformer.{container}.{i}.{p}" for p in rel)
                raise ValueError(f"{name}: no {family} module {sub!r} in sd-scripts' {bfl}")
        if family == "flux" and rest in FLUX_TOP:
            return (f"transformer.{FLUX_TOP[rest]}",)
        raise ValueError(f"{name}: not a module of sd-scripts' {family} LoRA")
    path = dotted(rest)
    if family == "sdxl" and re.match(r"^(input_blocks|middle_block|output_blocks|time_embed|label_emb|out)\.", path):
        path = diffusers_path(path, layout)
    return (f"unet.{path}",)


def _needs_swap(name: str, piece: Piece) -> bool:
    """Whether a kohya module's output halves are swapped against diffusers' (Flux's final adaLN, SD3's
    context-pre-only last adaLN: 2 × width outputs where the others have 6)."""
    if name.endswith("final_layer_adaLN_modulation_1"):
        return True
    if name.endswith("context_block_adaLN_modulation_1") and piece.up is not None and piece.down is not None:
        return int(piece.up.shape[0]) == 2 * int(piece.down.shape[1])
    return False


def diffusers_to_kohya_name(path: str, family: str, layout: UNetLayout = SDXL_LAYOUT) -> str:
    """The kohya module name of a (non-fused) diffusers module path with its part (`unet.…`, `text_encoder.…`)."""
    part, _, rest = path.partition(".")
    if part.startswith("text_encoder"):
        prefix = _KOHYA_TE.get(family, {}).get(part)
        if prefix is None:
            raise ValueError(f"{path}: no {family} text encoder {part}")
        t5 = (family, part) in (("flux", "text_encoder_2"), ("sd3", "text_encoder_3"))
        if not t5 and not rest.startswith("text_model."):  # transformers 5 dropped this level; files keep it
            rest = f"text_model.{rest}"
        return prefix + rest.replace(".", "_")
    if part not in ("unet", "transformer"):
        raise ValueError(f"{path}: not under unet., transformer. or text_encoder.")
    if family == "flux":
        for top, dpath in FLUX_TOP.items():
            if rest == dpath:
                return f"lora_unet_{top}"
        raise ValueError(f"{path}: not a module of sd-scripts' Flux LoRA")
    if family == "sd3":
        raise ValueError(f"{path}: sd-scripts' SD3 LoRA adapts the joint blocks only (no name for this module)")
    if family == "sdxl":
        rest = sgm_path(rest, layout)
    return "lora_unet_" + rest.replace(".", "_")


# ------------------------------------------------------------------------------------------ fuse / unfuse


def _swap(t: np.ndarray) -> np.ndarray:
    half = t.shape[0] // 2
    return np.concatenate([t[half:], t[:half]], axis=0)


def _piece_sizes(name: str, piece: Piece, n: int) -> list[int]:
    """Out sizes of a fused module's pieces: equal thirds for q/k/v; Flux's `linear1` is q, k, v (the block
    width each, the down's input size) and the MLP's input projection (the rest)."""
    assert piece.up is not None and piece.down is not None
    rows = int(piece.up.shape[0])
    if n == 4:
        width = int(piece.down.shape[1])
        return [width, width, width, rows - 3 * width]
    if rows % n:
        raise ValueError(f"{name}: {rows} output rows do not split into {n} equal q/k/v parts")
    return [rows // n] * n


def unfuse(name: str, piece: Piece, n: int) -> list[Piece | None]:
    """A fused kohya module's pieces in row order (None: a piece with no LoRA, all-zero rows) — exact: each
    piece's scale · up · down is the fused module's rows (module docstring)."""
    assert piece.up is not None and piece.down is not None
    sizes = _piece_sizes(name, piece, n)
    up, down = piece.up, piece.down
    flat_up = up.reshape(up.shape[0], up.shape[1])
    bounds = np.cumsum([0, *sizes])
    cols = [np.flatnonzero(np.any(flat_up[bounds[j] : bounds[j + 1]] != 0, axis=0)) for j in range(n)]
    used = [c for c in cols if c.size]
    disjoint = bool(used) and sum(c.size for c in used) == len(np.unique(np.concatenate(used)))
    scale = piece.scale
    out: list[Piece | None] = []
    for j in range(n):
        rows = slice(int(bounds[j]), int(bounds[j + 1]))
        if used and not cols[j].size:
            out.append(None)
        elif disjoint and len(used) > 1:
            c = cols[j]
            out.append(Piece(down[c], up[rows][:, c], scale * c.size, piece.dtype))
        else:
            out.append(Piece(down, up[rows], piece.alpha if piece.alpha is not None else piece.rank, piece.dtype))
    return out


def fuse(name: str, pieces: Sequence[Piece | None], sizes: Sequence[int]) -> Piece:
    """One kohya module from its diffusers pieces (None: no LoRA there, zero rows of `sizes[j]`): the shared-
    down form when every piece is there with one down and one scale, else downs stacked and ups block-diagonal
    with alpha = scale × total rank (each piece's own scale folded into its up)."""
    present = [p for p in pieces if p is not None]
    if not present:
        raise ValueError(f"{name}: no pieces")
    first = present[0]
    assert first.down is not None and first.up is not None
    dtype = first.dtype
    if len(present) == len(pieces) and all(
        p.down is not None
        and p.down.shape == first.down.shape
        and np.array_equal(p.down, first.down)
        and abs(p.scale - first.scale) <= 1e-6 * max(1.0, abs(first.scale))
        for p in present
    ):
        ups = [p.up for p in present if p.up is not None]
        return Piece(
            first.down, np.concatenate(ups, axis=0), first.alpha if first.alpha is not None else first.rank, dtype
        )
    scale = first.scale
    rank = sum(p.rank for p in present)
    trailing = first.up.shape[2:]
    up = np.zeros((sum(sizes), rank, *trailing), dtype=np.float32)
    downs = []
    row = col = 0
    for p, size in zip(pieces, sizes, strict=True):
        if p is not None:
            assert p.up is not None and p.down is not None
            if p.up.shape[0] != size:
                raise ValueError(f"{name}: a piece has {p.up.shape[0]} outputs where {size} fit")
            up[row : row + size, col : col + p.rank] = p.up * (p.scale / scale)
            downs.append(p.down)
            col += p.rank
        row += size
    return Piece(np.concatenate(downs, axis=0), up, scale * rank, dtype)


# ------------------------------------------------------------------------------------------ alphas in diffusers files


def adapter_metadata(pieces: Mapping[str, Piece]) -> str:
    """diffusers' `lora_adapter_metadata` for peft modules (`part.path` → Piece): per part the LoraConfig
    kwargs with every module's rank and alpha spelled out (rank_pattern/alpha_pattern, escaped paths)."""
    parts: dict[str, dict[str, Piece]] = {}
    for module, piece in pieces.items():
        part, _, rest = module.partition(".")
        # CLIP's modules lost their `text_model.` level in transformers 5; peft matches a target by the end of
        # the path, so the shorter name finds them with and without it (the tensor keys keep it)
        parts.setdefault(part, {})[rest.removeprefix("text_model.")] = piece
    doc: dict[str, Any] = {}
    for part, mods in parts.items():
        ranks = {m: p.rank for m, p in mods.items()}
        alphas = {m: (p.alpha if p.alpha is not None else float(p.rank)) for m, p in mods.items()}
        r = max(set(ranks.values()), key=list(ranks.values()).count)
        a = max(set(alphas.values()), key=list(alphas.values()).count)
        doc[f"{part}.r"] = r
        doc[f"{part}.lora_alpha"] = a
        doc[f"{part}.rank_pattern"] = {re.escape(m): v for m, v in ranks.items() if v != r}
        doc[f"{part}.alpha_pattern"] = {re.escape(m): v for m, v in alphas.items() if v != a}
        doc[f"{part}.target_modules"] = sorted(mods)
        doc[f"{part}.use_dora"] = False
        doc[f"{part}.lora_bias"] = False
    return json.dumps(doc, indent=2, sort_keys=True)


# ------------------------------------------------------------------------------------------ the conversions


def _refuse_kinds(pieces: Mapping[str, Piece], path: Path, to: str = "diffusers") -> None:
    odd = [(m, sorted(p.other)) for m, p in pieces.items() if p.other or p.down is None or p.up is None]
    if not odd:
        return
    module, tensors = odd[0]
    what = f"{path}: module {module} is not a plain LoRA ({', '.join(tensors) or 'no up/down pair'}; {len(odd)} such)"
    if to == "diffusers":
        raise LoraFileError(
            f"{what}: LoHa, LoKr, DoRA and full-diff modules have no diffusers LoRA form",
            "keep the kohya file (A1111, ComfyUI and Forge load it; diffusers loads LoCon but not LoHa/LoKr)",
        )
    raise LoraFileError(
        f"{what}: only plain LoRA modules convert from the peft layout to kohya's",
        "load this file with diffusers/peft as it is",
    )


def to_diffusers(
    pieces: Mapping[str, Piece], family: str, path: Path, layout: UNetLayout = SDXL_LAYOUT
) -> dict[str, Piece]:
    """kohya modules → diffusers modules (`unet.…`, `transformer.…`, `text_encoder.…`)."""
    _refuse_kinds(pieces, path)
    out: dict[str, Piece] = {}
    for name, piece in pieces.items():
        try:
            paths = kohya_to_diffusers_paths(name, family, layout)
        except ValueError as e:
            raise LoraFileError(f"{path}: {e}", f"check --family (this file was read as {family})") from None
        if _needs_swap(name, piece):
            assert piece.up is not None
            piece = Piece(piece.down, _swap(piece.up), piece.alpha, piece.dtype)
        if len(paths) == 1:
            out[paths[0]] = piece
            continue
        for p, part in zip(paths, unfuse(name, piece, len(paths)), strict=True):
            if part is not None:
                out[p] = part
    return out


_PARTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")


def _peft_module(module: str, family: str) -> str:
    """A peft module path with its pipeline part: `base_model.model.` files (peft's own save) and paths with
    no part (`get_peft_model_state_dict` of a UNet) are the family's main model."""
    rest = module.removeprefix("base_model.model.")
    if rest.split(".", 1)[0] in _PARTS:
        return rest
    return f"{'transformer' if family in ('flux', 'sd3') else 'unet'}.{rest}"


def to_kohya(
    pieces: Mapping[str, Piece], family: str, path: Path, layout: UNetLayout = SDXL_LAYOUT
) -> dict[str, Piece]:
    """diffusers modules → kohya modules (fusing Flux/SD3 pieces)."""
    _refuse_kinds(pieces, path, "kohya")
    pieces = {_peft_module(m, family): p for m, p in pieces.items()}
    out: dict[str, Piece] = {}
    taken: set[str] = set()
    if family in ("flux", "sd3"):
        for bfl, container, table in _flow_tables(family):
            indices = sorted(
                {int(m.group(1)) for k in pieces if (m := re.match(rf"^transformer\.{container}\.(\d+)\.", k))}
            )
            for i in indices:
                for fname, _, rel in table:
                    paths = [f"transformer.{container}.{i}.{p}" for p in rel]
                    got = [pieces.get(p) for p in paths]
                    if not any(got):
                        continue
                    name = f"lora_unet_{bfl}_{i}_{fname}"
                    taken.update(p for p in paths if p in pieces)
                    if len(paths) == 1:
                        piece = got[0]
                        assert piece is not None
                    else:
                        piece = fuse(name, got, _fused_sizes(got))
                    if piece.up is not None and piece.down is not None and _needs_swap(name, piece):
                        piece = Piece(piece.down, _swap(piece.up), piece.alpha, piece.dtype)
                    out[name] = piece
    for module, piece in pieces.items():
        if module in taken:
            continue
        try:
            name = diffusers_to_kohya_name(module, family, layout)
            if family == "flux" and piece.up is not None and _needs_swap(name, piece):
                piece = Piece(piece.down, _swap(piece.up), piece.alpha, piece.dtype)
            out[name] = piece
        except ValueError as e:
            raise LoraFileError(f"{path}: {e}", f"check --family (this file was read as {family})") from None
    return out


def _fused_sizes(got: Sequence[Piece | None]) -> list[int]:
    """Out sizes of the pieces of a fused module, missing ones told from the others: q/k/v share one width,
    Flux's proj_mlp is 4 × the width (the model's MLP ratio)."""
    sizes: list[int | None] = [int(p.up.shape[0]) if p is not None and p.up is not None else None for p in got]
    qkv = next((s for s in sizes[:3] if s is not None), None)
    if qkv is None:  # only Flux's proj_mlp: its input is the block width
        p = got[3]
        assert p is not None and p.down is not None
        qkv = int(p.down.shape[1])
    out = [s if s is not None else qkv for s in sizes[:3]]
    if len(got) == 4:
        out.append(sizes[3] if sizes[3] is not None else 4 * qkv)
    return out


def _pieces_to_tensors(pieces: Mapping[str, Piece], to: str) -> list[tuple[str, str, tuple[int, ...], bytes]]:
    out: list[tuple[str, str, tuple[int, ...], bytes]] = []
    for module, p in pieces.items():
        assert p.down is not None and p.up is not None
        if to == "kohya":
            names = (f"{module}.lora_down.weight", f"{module}.lora_up.weight")
        else:
            names = (f"{module}.lora_A.weight", f"{module}.lora_B.weight")
        for key, arr in zip(names, (p.down, p.up), strict=True):
            arr = np.ascontiguousarray(arr, dtype=np.float32)
            out.append((key, p.dtype, tuple(arr.shape), encode(arr, p.dtype)))
        if to == "kohya":
            alpha = np.array(p.alpha if p.alpha is not None else p.rank, dtype=np.float32)
            out.append((f"{module}.alpha", p.dtype, (), encode(alpha, p.dtype)))
    return out


def _family(header: SafetensorsHeader, family: str | None) -> str:
    if family is not None:
        if family not in FAMILIES:
            raise LoraFileError(f"unknown family {family!r}", f"pass one of {', '.join(FAMILIES)}")
        return family
    found = family_from_metadata(header.metadata) or family_from_keys(read_modules(header))
    if found is None:
        raise LoraFileError(
            f"{header.path}: cannot tell the model family from its metadata or module names",
            f"pass --family ({', '.join(FAMILIES)})",
        )
    return found


def convert_file(
    src: Path | str,
    dst: Path | str,
    to: str,
    family: str | None = None,
    *,
    fix_prefix: bool = False,
    unet_config: Mapping[str, Any] | None = None,
) -> Path:
    """Convert `src` to the `to` layout (`kohya` or `diffusers`) and write it to `dst` (atomically); the
    metadata is kept (diffusers' adapter metadata added or dropped). `family` when neither metadata nor names
    tell it; `unet_config` (a UNet's config dict) for SDXL-like UNets whose SGM numbering is not SDXL's.
    `fix_prefix` first renames LyCORIS' `lycoris_` (or missing) prefixes (`repair_prefix`)."""
    src, dst = Path(src), Path(dst)
    if to not in TARGETS:
        raise LoraFileError(f"unknown target layout {to!r}", "pass --to kohya or --to diffusers")
    if src.resolve() == dst.resolve():
        raise LoraFileError(f"{dst} is the input file", "write the converted file elsewhere (-o OUT)")
    header = read_header(src)
    layout = UNetLayout.from_config(unet_config) if unet_config is not None else SDXL_LAYOUT
    fam = _family(header, family)
    modules = list(dict.fromkeys(split_key(k)[0] for k in header.tensors))
    fmt = key_format(modules)
    pieces = _read_pieces(header)
    if fmt == "lycoris-prefix":
        if not fix_prefix:
            raise LoraFileError(
                f"{src}: its module names lack the kohya prefix (first: {modules[0]}); nothing loads them",
                "add --fix-prefix (or run nyx lora convert … --to kohya --fix-prefix first)",
            )
        if to == "kohya":  # a rename only: every tensor keeps its bytes
            return repair_prefix(src, dst, fam)
        pieces = {_repaired_name(m, fam): p for m, p in pieces.items()}
        fmt = "kohya"
    meta = {k: v for k, v in header.metadata.items() if k != ADAPTER_METADATA_KEY}
    if fmt == "kohya":
        if to == "kohya":
            out = dict(pieces)
        else:
            out = to_diffusers(pieces, fam, src, layout)
            meta[ADAPTER_METADATA_KEY] = adapter_metadata(out)
    elif fmt == "peft":
        alphas = diffusers_alphas(header.metadata, pieces)
        pieces = {
            m: Piece(p.down, p.up, p.alpha if p.alpha is not None else alphas.get(m), p.dtype, p.other)
            for m, p in pieces.items()
        }
        if to == "diffusers":
            out = {_peft_module(m, fam): p for m, p in pieces.items()}
            _refuse_kinds(out, src)
            meta[ADAPTER_METADATA_KEY] = adapter_metadata(out)
        else:
            out = to_kohya(pieces, fam, src, layout)
    else:
        raise LoraFileError(
            f"{src}: mixes kohya and diffusers key names ({modules[0]}, …)", "convert each part separately"
        )
    if to == "kohya" and any(p.other for p in out.values()):
        return _write_with_other(out, meta, dst)
    _refuse_kinds(out, src, to)
    return write_safetensors(dst, _pieces_to_tensors(out, to), meta)


def _write_with_other(pieces: Mapping[str, Piece], meta: Mapping[str, str], dst: Path) -> Path:
    """kohya output for LyCORIS modules (LoHa/LoKr/DoRA tensors kept as they are, by suffix)."""
    tensors: list[tuple[str, str, tuple[int, ...], bytes]] = []
    for module, p in pieces.items():
        named = dict(p.other)
        if p.down is not None:
            named["lora_down.weight"] = p.down
        if p.up is not None:
            named["lora_up.weight"] = p.up
        for suffix, arr in named.items():
            arr = np.ascontiguousarray(arr, dtype=np.float32)
            tensors.append((f"{module}.{suffix}", p.dtype, tuple(arr.shape), encode(arr, p.dtype)))
        if p.alpha is not None:
            tensors.append((f"{module}.alpha", p.dtype, (), encode(np.array(p.alpha, np.float32), p.dtype)))
    return write_safetensors(dst, tensors, meta)


# ------------------------------------------------------------------------------------------ LyCORIS prefixes


def _repaired_name(module: str, family: str) -> str:
    """A module name with the kohya prefix: `lycoris_text_model_…`/`text_model_…` → `lora_te_`/`lora_te1_`,
    `lycoris_te2_…` → `lora_te2_`, `lycoris_…`/`lora_transformer_…`/bare UNet paths → `lora_unet_`."""
    if module.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", "lora_te3_")):
        return module
    rest = module
    for prefix in ("lycoris_", "lora_transformer_", "lora_"):
        if rest.startswith(prefix):
            rest = rest.removeprefix(prefix)
            break
    m = re.match(r"^te([123])?_(.*)$", rest)
    if m:
        n, rest = m.group(1), m.group(2)
        if n:
            return f"lora_te{n}_{rest}"
        return ("lora_te_" if family in ("sd15", "sd2") else "lora_te1_") + rest
    if rest.startswith(("text_model_", "encoder_block_")):
        return ("lora_te_" if family in ("sd15", "sd2") else "lora_te1_") + rest
    return f"lora_unet_{rest}"


def repair_prefix(src: Path | str, dst: Path | str | None = None, family: str | None = None) -> Path:
    """Rename the modules of a LyCORIS file saved with the wrong prefix (`lycoris_…`, or none) to kohya's
    (`_repaired_name`) so that A1111, ComfyUI and diffusers load it; tensors keep their bytes and dtypes,
    metadata is kept. Writes `dst` (default: replace `src`, atomically)."""
    src = Path(src)
    dst = Path(dst) if dst is not None else src
    header = read_header(src)
    fam = family or family_from_metadata(header.metadata) or family_from_keys(read_modules(header)) or "sd15"
    renamed: dict[str, str] = {}
    for key in header.tensors:
        module, suffix = split_key(key)
        new = f"{_repaired_name(module, fam)}.{suffix}" if suffix else key
        if new in renamed.values():
            raise LoraFileError(
                f"{src}: two tensors would both be named {new}", "the file mixes prefixes; fix it by hand"
            )
        renamed[key] = new
    if all(k == v for k, v in renamed.items()):
        raise LoraFileError(f"{src}: every module already has a kohya prefix", "nothing to repair")
    with open(src, "rb") as f:
        tensors = [(renamed[t.name], t.dtype, t.shape, read_raw(header, t.name, f)) for t in header.tensors.values()]
    return write_safetensors(dst, tensors, header.metadata)
