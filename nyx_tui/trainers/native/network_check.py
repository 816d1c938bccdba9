"""What the native engine cannot do with a `network` section, said before anything loads (torch-free: the
TUI's config form and `nyx config check` run it).

Counts of blocks and the shape rules are pydantic validation (`config.model`); here are the limits of the
libraries the engine builds the network with: peft's LoRA/DoRA have no rank or module dropout (lycoris'
LoCon/LoHa/LoKr have), and a LyCORIS module dropout leaves parameters without gradients in some steps,
which DDP (several processes) does not allow. Flux and SD3 files fuse q/k/v (and Flux's single-block
linear1) into one module: LoRA, LoCon and DoRA split and fuse exactly, LoHa and LoKr do not (a Hadamard or
Kronecker product over the fused matrix is no set of per-piece ones), so they are refused there.
"""

from __future__ import annotations

from nyx_tui.config.errors import Problem
from nyx_tui.config.fields import FLOW_FAMILIES
from nyx_tui.config.model import NetworkKind, TrainingConfig

PEFT_KINDS = (NetworkKind.LORA, NetworkKind.DORA)


def network_problems(cfg: TrainingConfig) -> list[Problem]:
    net = cfg.network
    out: list[Problem] = []
    for name in ("rank_dropout", "module_dropout"):
        if getattr(net, name) and net.kind in PEFT_KINDS:
            out.append(
                Problem(
                    f"network.{name}",
                    f"{net.kind.value} is trained with peft, which has no {name.replace('_', ' ')} "
                    "(network.dropout, on the adapter's input, works)",
                    f'set network.{name} = 0, or network.kind = "locon" (LoRA with lycoris, which has it)',
                )
            )
    if cfg.model.family in FLOW_FAMILIES and net.kind in (NetworkKind.LOHA, NetworkKind.LOKR):
        out.append(
            Problem(
                "network.kind",
                f"{net.kind.value} cannot be saved for {cfg.model.family.value}: its LoRA files fuse q/k/v into "
                "one module (sd-scripts' layout, what ComfyUI and Forge load), and a "
                f"{net.kind.value} of a fused module is not one per q, k and v",
                'set network.kind = "lora", "dora" or "locon"',
            )
        )
    processes = cfg.training.num_processes
    if net.module_dropout and net.kind not in PEFT_KINDS and processes > 1:
        out.append(
            Problem(
                "network.module_dropout",
                f"skips whole modules, whose weights then get no gradient: DDP over {processes} processes "
                "stops at that",
                "set network.module_dropout = 0 (rank_dropout works), or training.num_processes = 1",
            )
        )
    if not net.train_unet and processes > 1:
        out.append(
            Problem(
                "network.train_unet",
                "text-encoder-only training runs in one process for now",
                "set network.train_unet = true, or training.num_processes = 1",
            )
        )
    if net.lokr_factor is not None and net.kind != NetworkKind.LOKR:
        out.append(
            Problem(
                "network.lokr_factor",
                f"is for lokr and does nothing with network.kind = {net.kind.value!r}",
                "remove network.lokr_factor",
                severity="warning",
            )
        )
    if net.text_encoder_lr is not None and not net.train_text_encoder:
        out.append(
            Problem(
                "network.text_encoder_lr",
                "does nothing while network.train_text_encoder is false",
                "set network.train_text_encoder = true, or remove network.text_encoder_lr",
                severity="warning",
            )
        )
    return out
