"""sd-scripts' Flux and SD3 LoRA modules and the diffusers Linears each is made of, as data.

Torch-free, so the trainer (`flow_names`) and the file converter (`nyx_tui.lora.convert`, which the TUI may
import) read one table.
"""

from __future__ import annotations

QKV = ("to_q", "to_k", "to_v")
ADD_QKV = ("add_q_proj", "add_k_proj", "add_v_proj")

# (file name within the block, type key for per-type ranks, diffusers paths within the block, in row order)
FLUX_DOUBLE: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("img_attn_qkv", "img_attn", tuple(f"attn.{p}" for p in QKV)),
    ("img_attn_proj", "img_attn", ("attn.to_out.0",)),
    ("img_mlp_0", "img_mlp", ("ff.net.0.proj",)),
    ("img_mlp_2", "img_mlp", ("ff.net.2",)),
    ("img_mod_lin", "img_mod", ("norm1.linear",)),
    ("txt_attn_qkv", "txt_attn", tuple(f"attn.{p}" for p in ADD_QKV)),
    ("txt_attn_proj", "txt_attn", ("attn.to_add_out",)),
    ("txt_mlp_0", "txt_mlp", ("ff_context.net.0.proj",)),
    ("txt_mlp_2", "txt_mlp", ("ff_context.net.2",)),
    ("txt_mod_lin", "txt_mod", ("norm1_context.linear",)),
)
FLUX_SINGLE: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("linear1", "single", (*(f"attn.{p}" for p in QKV), "proj_mlp")),
    ("linear2", "single", ("proj_out",)),
    ("modulation_lin", "single_mod", ("norm.linear",)),
)
SD3_JOINT: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("context_block_attn_qkv", "context_attn", tuple(f"attn.{p}" for p in ADD_QKV)),
    ("context_block_attn_proj", "context_attn", ("attn.to_add_out",)),
    ("context_block_mlp_fc1", "context_mlp", ("ff_context.net.0.proj",)),
    ("context_block_mlp_fc2", "context_mlp", ("ff_context.net.2",)),
    ("context_block_adaLN_modulation_1", "context_mod", ("norm1_context.linear",)),
    ("x_block_attn_qkv", "x_attn", tuple(f"attn.{p}" for p in QKV)),
    ("x_block_attn_proj", "x_attn", ("attn.to_out.0",)),
    ("x_block_attn2_qkv", "x_attn", tuple(f"attn2.{p}" for p in QKV)),
    ("x_block_attn2_proj", "x_attn", ("attn2.to_out.0",)),
    ("x_block_mlp_fc1", "x_mlp", ("ff.net.0.proj",)),
    ("x_block_mlp_fc2", "x_mlp", ("ff.net.2",)),
    ("x_block_adaLN_modulation_1", "x_mod", ("norm1.linear",)),
)
