"""sd-scripts' names for SDXL UNet modules: diffusers' module paths in SGM (Stability's generative-models) form.

sd-scripts trains SD1.5/SD2 on diffusers' UNet, so their LoRA files name modules by diffusers paths
(`lora_unet_down_blocks_0_attentions_0_…`); it trains SDXL on its own copy of SGM's UNet, so SDXL files
name them the SGM way (`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`). A1111, ComfyUI and
Forge expect that spelling for SDXL (diffusers reads both). This module maps one to the other; it is pure
string work (no torch) and, covering every UNet module and parameter, also gives the SGM checkpoint keys.

The SGM UNet is a flat list of levels:
- `input_blocks.0.0` is conv_in; then each down level i has `layers_per_block` layers at
  `input_blocks.{1 + i·(L+1) + j}` (`.0` the ResNet, `.1` the transformer), and its downsampler at
  `input_blocks.{(i+1)·(L+1)}.0.op`;
- `middle_block.0/1/2`: ResNet, transformer, ResNet;
- each up level i has L+1 layers at `output_blocks.{i·(L+1) + j}` (`.0` ResNet, `.1` transformer) and its
  upsampler in the last layer, after the transformer if there is one (`.2.conv`, else `.1.conv`);
- `time_embed.0/2` (diffusers' time_embedding.linear_1/2), `label_emb.0.0/0.2` (add_embedding), `out.0/2`
  (conv_norm_out, conv_out).
Inside a ResNet: norm1 → in_layers.0, conv1 → in_layers.2, time_emb_proj → emb_layers.1, norm2 →
out_layers.0, conv2 → out_layers.3, conv_shortcut → skip_connection. Inside a transformer nothing changes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
TOP = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


@dataclass(frozen=True)
class UNetLayout:
    """What the SGM numbering depends on: layers per level, and which up levels have transformers.
    The default is SDXL base's (every SDXL fine-tune shares it)."""

    layers_per_block: int = 2
    up_attentions: tuple[bool, ...] = (True, True, False)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> UNetLayout:
        """The layout of a diffusers UNet config (`unet.config`)."""
        layers = config.get("layers_per_block", 2)
        if not isinstance(layers, int):  # a per-level list: SGM numbering needs one count
            if len(set(layers)) != 1:
                raise ValueError(f"layers_per_block {layers} differs per level: no SGM numbering for that UNet")
            layers = layers[0]
        ups = tuple("CrossAttn" in str(t) for t in config.get("up_block_types", ()))
        return cls(int(layers), ups or cls.up_attentions)


SDXL_LAYOUT = UNetLayout()


def _inner(rest: str, table: Mapping[str, str], sep: str) -> str | None:
    """`rest` with its leading module name replaced through `table`; None when no name matches."""
    for name, sgm in table.items():
        name = name.replace(".", sep)
        if rest == name or rest.startswith(name + sep):
            return sgm.replace(".", sep) + rest[len(name) :]
    return None


def sgm_path(path: str, layout: UNetLayout = SDXL_LAYOUT, sep: str = ".") -> str:
    """The SGM spelling of a diffusers UNet path — a module (`down_blocks.1.attentions.0.proj_in`) or a
    parameter (`….proj_in.weight`) with `sep` "."; or a kohya module name without its `lora_unet_` prefix
    (`down_blocks_1_attentions_0_proj_in`) with `sep` "_". Paths outside the mapped ones come back unchanged."""
    s = re.escape(sep)
    n = layout.layers_per_block
    kinds = "resnets|attentions|downsamplers|upsamplers"
    m = re.match(rf"^(down|up)_blocks{s}(\d+){s}({kinds}){s}(\d+)(?:{s}(.*))?$", path)
    if m:
        side, level, kind, j, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5) or ""
        if kind == "resnets":
            rest = _inner(rest, RESNET, sep) or rest
        elif kind == "downsamplers":
            rest = _inner(rest, {"conv": "op"}, sep) or rest
        if side == "down":
            index = (level + 1) * (n + 1) if kind == "downsamplers" else 1 + level * (n + 1) + j
            where = f"input_blocks{sep}{index}{sep}{1 if kind == 'attentions' else 0}"
        else:
            if kind == "upsamplers":
                has_attention = level < len(layout.up_attentions) and layout.up_attentions[level]
                index, sub = level * (n + 1) + n, 2 if has_attention else 1
            else:
                index, sub = level * (n + 1) + j, 1 if kind == "attentions" else 0
            where = f"output_blocks{sep}{index}{sep}{sub}"
        return f"{where}{sep}{rest}" if rest else where
    m = re.match(rf"^mid_block{s}(resnets|attentions){s}(\d+)(?:{s}(.*))?$", path)
    if m:
        kind, j, rest = m.group(1), int(m.group(2)), m.group(3) or ""
        if kind == "resnets":
            rest = _inner(rest, RESNET, sep) or rest
        where = f"middle_block{sep}{2 * j + (1 if kind == 'attentions' else 0)}"
        return f"{where}{sep}{rest}" if rest else where
    return _inner(path, TOP, sep) or path
