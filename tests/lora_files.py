"""Builders of real LoRA files for the `nyx lora` tool tests: Nyx's own writer on the tiny demo models (a
network attached, its weights set at random so the LoRA changes the outputs, saved by `lora_io.save_lora`),
LyCORIS' own networks saved under its default `lycoris_` prefix, and crafted broken files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

DIM, ALPHA = 4, 2.0  # alpha != dim: a lost alpha changes the outputs
TAGS = {"5_shapes": {"red circle": 4, "blue square": 2}, "1_extra": {"red circle": 1, "star": 3}}


def config(model_dir: Path, family: str = "sd15", flow: dict[str, Any] | None = None, **network: Any) -> Any:
    from nyx_tui.config.model import TrainingConfig

    return TrainingConfig.model_validate(
        {
            "model": {"family": family, "pretrained": str(model_dir)},
            "network": {"dim": DIM, "alpha": ALPHA, **network},
            "flow": flow or {},
            "optimizer": {"type": "adamw", "learning_rate": 1e-3},
        }
    )


def randomize(network: Any, seed: int = 0) -> None:
    """Every adapter weight set at random (rounded to fp16), so the LoRA really changes the model."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in network.params:
            noise = torch.randn(p.shape, generator=gen)
            if p.dim() == 1 or (p.shape[-1] == 1 and p.dim() == 2):  # DoRA magnitudes: near their init
                p.mul_(1 + 0.1 * noise)
            else:
                p.copy_(0.2 * noise)
            p.copy_(p.half().float())
    network.eval()


def attached(cfg: Any, seed: int = 0) -> tuple[Any, Any]:
    """The model of `cfg` (SD or flow family) with a Nyx network attached and randomized."""
    import torch

    from nyx_tui.config.fields import FLOW_FAMILIES
    from nyx_tui.trainers.native import models, networks

    model: Any
    if cfg.model.family in FLOW_FAMILIES:
        from nyx_tui.trainers.native.flow_files import load_flow_model

        model = load_flow_model(cfg.model)
    else:
        model = models.load_model(cfg.model)
        models.freeze(model)
    torch.manual_seed(seed)
    network = networks.attach(model, cfg)
    randomize(network, seed)
    return model, network


def metadata(family: str = "sd15") -> dict[str, str]:
    """sd-scripts-like metadata (what `lora_io.build_metadata` writes, a few keys of it)."""
    versions = {"sd15": "sd_v1", "sdxl": "sdxl_base_v1-0", "flux": "flux1", "sd3": "medium"}
    return {
        "ss_base_model_version": versions[family],
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(DIM),
        "ss_network_alpha": f"{ALPHA:g}",
        "ss_steps": "120",
        "ss_epoch": "3",
        "ss_num_epochs": "3",
        "ss_learning_rate": "0.0001",
        "ss_optimizer": "torch.optim.adamw.AdamW",
        "ss_resolution": "(64, 64)",
        "ss_output_name": "shapes",
        "ss_tag_frequency": json.dumps(TAGS),
        "modelspec.title": "Shapes",
        "modelspec.architecture": {
            "sd15": "stable-diffusion-v1/lora",
            "sdxl": "stable-diffusion-xl-v1-base/lora",
            "flux": "flux-1-dev/lora",
            "sd3": "stable-diffusion-3-medium/lora",
        }[family],
    }


def save_nyx_lora(network: Any, path: Path, family: str = "sd15", dtype: str = "fp32") -> Path:
    """The network saved as Nyx saves a trained LoRA (kohya names, real alphas, sd-scripts metadata)."""
    from nyx_tui.trainers.native import lora_io

    torch_dtype = lora_io.SAVE_DTYPES["float" if dtype == "fp32" else dtype]
    return lora_io.save_lora(path, network.kohya_state_dict(torch_dtype), metadata(family))


def lycoris_file(model_dir: Path, path: Path, algo: str, prefix: str = "lycoris", **kw: Any) -> tuple[Any, Path]:
    """A LyCORIS network (`algo`: locon, loha, lokr; `dora_wd=True` for DoRA) on the tiny SD1.5 UNet's
    attention and ResNet modules, weights at random, saved by LyCORIS itself with `prefix` (its default,
    `lycoris`, is the wrong one). Returns (the pipeline with the network applied, the file)."""
    import torch
    from diffusers import DiffusionPipeline
    from lycoris import LycorisNetwork, create_lycoris

    pipe = DiffusionPipeline.from_pretrained(model_dir)
    LycorisNetwork.apply_preset({"target_module": ["Transformer2DModel", "ResnetBlock2D"], "lora_prefix": prefix})
    try:
        torch.manual_seed(0)
        net = create_lycoris(
            pipe.unet, 1.0, linear_dim=DIM, linear_alpha=ALPHA, conv_dim=DIM, conv_alpha=1.0, algo=algo, **kw
        )
        net.apply_to()
        gen = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for p in net.parameters():
                p.copy_(p + 0.1 * torch.randn(p.shape, generator=gen))
        net.save_weights(str(path), torch.float32, {"ss_base_model_version": "sd_v1"})
    finally:
        LycorisNetwork.apply_preset({"lora_prefix": "lycoris"})
    return pipe, path


def write_numpy(path: Path, tensors: dict[str, np.ndarray], meta: dict[str, str] | None = None) -> Path:
    import safetensors.numpy

    safetensors.numpy.save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path), meta or {})
    return path


def crafted(path: Path, header: bytes, length: int | None = None, tail: bytes = b"") -> Path:
    """A file with the given header bytes (and length prefix, default their length) and data."""
    n = len(header) if length is None else length
    path.write_bytes(n.to_bytes(8, "little") + header + tail)
    return path
