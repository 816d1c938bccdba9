"""The trained adapter: which modules get one, of which kind and rank, their learning rates, their file form.

`attach(model, cfg)` puts the network described by `cfg.network` on the loaded model and returns a
`Network`, the one object the loop needs: `param_groups()` for the optimizer, `kohya_state_dict()` for
saving, `train()`/`eval()` for the modes, and what text-encoder training needs on top (gradients through
the encoder, their reduction across processes, their place in a training state).

Planning is separate from attaching: `plan(model, cfg)` lists every adapted module with its kohya name,
rank, alpha, UNet block and learning rate, the same for every kind. Then one of two libraries builds it:

- **lora, dora**: peft (`LoraConfig`, `use_dora` for DoRA), per-module ranks through `rank_pattern`.
- **locon, loha, lokr**: lycoris-lora's module classes, made one per planned module. They hook the
  module's `forward` and are not children of the model, so they are registered under the model root as
  `nyx_adapters` (a `ModuleDict`): then `.to()`, `.train()`, DDP and accelerate's state see them. This
  skips `LycorisNetwork` and its process-wide presets: the kohya names (`lora_unet_…`, `lora_te_…`) are
  ours from the start.

Which modules (sd-scripts' rules where Nyx has a field for them):
- Linear and 1x1-convolution layers whose path contains a `network.target_modules` name as dotted segments
  (`to_q` matches `…attn1.to_q`; a container name such as `attn1` or `ff` matches every layer in it).
- 3x3 convolutions of ResNet and up/down-sampling blocks (sd-scripts' LoCon set) when convolutions are on:
  `conv_dim` > 0 or `conv_block_dims`, or by default for locon/loha/lokr. A named convolution is adapted
  whenever convolutions are not turned off (`conv_dim = 0`).
- Text encoders (with `train_text_encoder`): every Linear of CLIP's attention and MLP (sd-scripts' set),
  at `dim`/`alpha` and `text_encoder_lr`.
- Block-wise lists (sd-scripts' numbering, `unet_block`) give a UNet module its rank, alpha and lr weight;
  a 0 rank or weight leaves it out, as in sd-scripts. Modules outside the numbered blocks (SD1.5's conv_in,
  time embedding, conv_out) keep `dim`/`alpha` and weight 1.

Flux and SD3 (`_plan_flow`) follow sd-scripts' networks/lora_flux.py and lora_sd3.py instead, and
`network.target_modules` does not apply: every Linear of the transformer blocks that sd-scripts adapts
(`flow_names`' tables: attention q/k/v and output, MLP, modulation), `flow.train_blocks` (Flux: all, double,
single), `flow.double_block_indices` (Flux double / SD3 joint blocks) and `flow.single_block_indices`, Flux's
`flow.block_type_dims` (a rank per module type; 0 leaves the type out); text encoders CLIP-L (`lora_te1_`)
and, for SD3, CLIP-G (`lora_te2_`), never T5. The transformer is the `unet` root (`FlowModel.unet`).

Fused modules: a file's `…_attn_qkv` (and Flux's `single_blocks_N_linear1`: q, k, v and the MLP input) are
several diffusers Linears. Each gets its own adapter (`Adapted.part`), all under the file module's name, and
`kohya_state_dict` fuses them back (`flow_names.fuse`). `flow.split_qkv` says how:
- false (sd-scripts' default: one rank-r LoRA on the fused Linear): the pieces share one down matrix (the
  same parameter), each keeps its rows of the up matrix — exactly the fused LoRA, with its parameter count;
- true (sd-scripts' split_qkv): independent rank-r adapters per piece; the file stacks them block-diagonally
  at rank n·r, alpha n·alpha (same alpha/rank: loaders reproduce the trained output).
Either way the file is in the fused BFL/SGM layout. LoCon (lycoris) shares the down the same way; LoHa and
LoKr are refused for these families (`network_check`): a fused file cannot hold them. DoRA is fused by
concatenating the per-output-channel scales (exact, as each output row belongs to one piece).
`saving.lora_format = "diffusers"` writes the per-piece adapters under peft's keys instead
(`diffusers_state_dict`; `file_state_dict` picks by the setting).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn

from nyx_tui.config.fields import FLOW_FAMILIES, Family
from nyx_tui.config.model import (
    UNET_BLOCK_COUNTS,
    LoraFormat,
    NetworkKind,
    NetworkSection,
    TrainBlocks,
    TrainingConfig,
)
from nyx_tui.trainers.native import flow_names, lora_io

PEFT_KINDS = (NetworkKind.LORA, NetworkKind.DORA)
LYCORIS_KINDS = (NetworkKind.LOCON, NetworkKind.LOHA, NetworkKind.LOKR)
# sd-scripts' text-encoder targets: every Linear in CLIPAttention and CLIPMLP
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
# sd-scripts' UNET_TARGET_REPLACE_MODULE_CONV2D_3X3: the blocks whose 3x3 convolutions LoCon adapts
CONV_PARENTS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
ADAPTER_NAME = "default"  # peft's adapter name (training states hold parameters named after it)
LYCORIS_CONTAINER = "nyx_adapters"

_UPDOWN = re.compile(r"^(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.")
_SDXL_MID = {"resnets.0": 10, "attentions.0": 11, "resnets.1": 12}


# ------------------------------------------------------------------------------------------- the plan


@dataclass
class Adapted:
    """One adapted module: where it is, its kohya name, rank, alpha, UNet block and learning rate; after
    `attach`, the module in place (peft's wrapper) or the lycoris module, and the trainable parameters."""

    root: str  # the model part holding it: unet (a flow model's transformer too), text_encoder, text_encoder_2
    path: str  # module path inside the root (diffusers / transformers names)
    name: str  # kohya module name: lora_unet_<path with _>, lora_te_…, lora_te1_…, lora_te2_…; flow: sd-scripts'
    module: nn.Module
    conv: bool  # a convolution with a kernel larger than 1x1 (conv_dim/conv_alpha apply)
    dim: int
    alpha: float
    block: int | None
    lr: float
    named: dict[str, nn.Parameter] = field(default_factory=dict)  # trainable, by their kohya key suffix
    lycoris: nn.Module | None = None
    part: int | None = None  # flow: this module's place in a fused file module (q, k, v[, mlp]), else None
    parts: int = 1  # how many diffusers modules the file module `name` is made of
    swap: bool = False  # flow: output halves swapped in the file (SD3's context-pre-only adaLN)

    @property
    def params(self) -> list[nn.Parameter]:
        return list(self.named.values())

    @property
    def key(self) -> str:
        """A name unique per adapted module: `name`, with the piece for a part of a fused file module."""
        return self.name if self.part is None else f"{self.name}_part{self.part}"


def unet_block(family: Family, path: str) -> int | None:
    """sd-scripts' block index of a diffusers UNet module (`get_block_index` in networks/lora.py), or None
    for a module outside the numbered blocks.

    sd15/sd2 (25): 0 has no modules, down_blocks.i → 1 + 3i + j (its downsampler 1 + 3i + 2), mid 12,
    up_blocks.i → 13 + 3i + j (upsampler 13 + 3i + 2). sdxl (23, the SGM blocks): 0 time/label embedding,
    input_blocks.n → 1 + n (conv_in is input_blocks.0; down_blocks.i.*.j is input_blocks 3i + j + 1),
    middle_block.0-2 → 10-12, output_blocks.n → 13 + n, out (conv_norm_out/conv_out) 22.
    """
    sdxl = family == Family.SDXL
    m = _UPDOWN.match(path)
    if m:
        side, i, kind, j = m.group(1), int(m.group(2)), m.group(3), int(m.group(4))
        within = 2 if kind in ("downsamplers", "upsamplers") else j
        if side == "down":
            return (2 if sdxl else 1) + 3 * i + within
        return 13 + 3 * i + within
    if path.startswith("mid_block."):
        if not sdxl:
            return 12
        part = ".".join(path.split(".")[1:3])
        return _SDXL_MID.get(part)
    if sdxl:
        if path.startswith(("time_embedding.", "add_embedding.")):
            return 0
        if path == "conv_in":
            return 1
        if path in ("conv_out", "conv_norm_out"):
            return 22
    return None


def _matches(path: str, names: list[str] | tuple[str, ...]) -> bool:
    """`name` appears in `path` as whole dotted segments (peft's suffix rule, extended to containers)."""
    dotted = f".{path}."
    return any(f".{n}." in dotted for n in names)


def _is_conv(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and tuple(module.kernel_size) != (1, 1)


def _conv_paths(root: nn.Module) -> set[str]:
    """Paths of the larger-than-1x1 convolutions inside ResNet and up/down-sampling blocks."""
    out: set[str] = set()
    for path, module in root.named_modules():
        if type(module).__name__ in CONV_PARENTS:
            out.update(f"{path}.{sub}" for sub, child in module.named_modules() if sub and _is_conv(child))
    return out


def conv_rank(net: NetworkSection) -> int:
    """The rank of convolution adapters outside block lists: conv_dim, or dim when it is empty."""
    return net.dim if net.conv_dim is None else net.conv_dim


def convs_on(net: NetworkSection) -> bool:
    """Whether the ResNet/sampling convolutions are adapted (sd-scripts: LoRA + conv_dim = LoCon)."""
    if net.conv_dim == 0 and net.conv_block_dims is None:
        return False
    return net.conv_dim is not None or net.conv_block_dims is not None or net.kind in LYCORIS_KINDS


def _per_block(values: list[Any] | None, block: int | None, default: Any) -> Any:
    return values[block] if values is not None and block is not None else default


def _plan_unet(unet: nn.Module, cfg: TrainingConfig) -> list[Adapted]:
    net, family = cfg.network, cfg.model.family
    count = UNET_BLOCK_COUNTS.get(family)
    base_lr = cfg.optimizer.learning_rate
    all_convs = _conv_paths(unet) if convs_on(net) else set()
    no_convs = net.conv_dim == 0 and net.conv_block_dims is None
    out: list[Adapted] = []
    for path, module in unet.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        conv = _is_conv(module)
        if conv and no_convs:
            continue
        if not (_matches(path, net.target_modules) or path in all_convs):
            continue
        block = unet_block(family, path) if count else None
        if block is not None and count is not None and block >= count:
            raise ValueError(f"UNet module {path} falls in block {block}, beyond the {count} blocks of {family.value}")
        if conv:
            dim = _per_block(net.conv_block_dims, block, conv_rank(net))
            alpha = _per_block(net.conv_block_alphas, block, net.alpha if net.conv_alpha is None else net.conv_alpha)
        else:
            dim = _per_block(net.block_dims, block, net.dim)
            alpha = _per_block(net.block_alphas, block, net.alpha)
        weight = _per_block(net.block_lr_weights, block, 1.0)
        if dim == 0 or weight == 0:  # sd-scripts: a block without rank or learning rate gets no module
            continue
        name = "lora_unet_" + path.replace(".", "_")
        out.append(Adapted("unet", path, name, module, conv, int(dim), float(alpha), block, base_lr * weight))
    return out


def _plan_text_encoder(root: str, prefix: str, encoder: nn.Module, cfg: TrainingConfig) -> list[Adapted]:
    net = cfg.network
    lr = net.text_encoder_lr if net.text_encoder_lr is not None else cfg.optimizer.learning_rate
    return [
        Adapted(root, path, text_encoder_name(prefix, path), module, False, net.dim, net.alpha, None, lr)
        for path, module in encoder.named_modules()
        if isinstance(module, nn.Linear) and _matches(path, TEXT_ENCODER_TARGETS)
    ]


def text_encoder_name(prefix: str, path: str) -> str:
    """sd-scripts' name of a CLIP text-encoder module: `lora_te_text_model_encoder_layers_0_self_attn_q_proj`.
    transformers 5 dropped the `text_model` level from CLIPTextModel's module paths; the files keep it
    (A1111, ComfyUI and diffusers look for it)."""
    if not path.startswith("text_model."):
        path = f"text_model.{path}"
    return f"{prefix}_{path.replace('.', '_')}"


def text_encoders(model: Any) -> list[tuple[str, Any]]:
    """(attribute, encoder) of the model's text encoders Nyx trains: one for SD1.5, two for SDXL; CLIP-L for
    Flux (its text_encoder_2 is T5, which sd-scripts does not train by default), CLIP-L and CLIP-G for SD3."""
    if getattr(model, "family", None) == Family.FLUX:
        return [("text_encoder", model.text_encoder)] if model.text_encoder is not None else []
    parts = [("text_encoder", model.text_encoder), ("text_encoder_2", getattr(model, "text_encoder_2", None))]
    return [(name, enc) for name, enc in parts if enc is not None]


def text_encoder_prefix(family: Family, index: int, count: int) -> str:
    """sd-scripts' prefix of the index-th text encoder: `lora_te` for SD1.5/SD2's only one; `lora_te1`,
    `lora_te2` for SDXL's two and for Flux/SD3 (whose CLIP-L is `lora_te1` even alone)."""
    if count == 1 and family not in FLOW_FAMILIES:
        return "lora_te"
    return f"lora_te{index + 1}"


def _plan_flow(transformer: nn.Module, cfg: TrainingConfig) -> list[Adapted]:
    """sd-scripts' Flux/SD3 modules (`flow_names.flow_modules`) the `flow` settings keep, one Adapted per
    diffusers Linear, named after its file module."""
    net, flow, family = cfg.network, cfg.flow, cfg.model.family
    flux = family == Family.FLUX
    for block, indices in (("double", flow.double_block_indices), ("single", flow.single_block_indices)):
        count = flow_names.block_count(transformer, block)
        beyond = sorted(i for i in indices or [] if i >= count)
        if beyond and (flux or block == "double"):
            what = ("double" if flux else "joint") if block == "double" else "single"
            raise ValueError(
                f"flow.{block}_block_indices {beyond}: the model has {count} {what} blocks (0-{count - 1})"
            )
    type_dims = (flow.block_type_dims or {}) if flux else {}
    out: list[Adapted] = []
    for fm in flow_names.flow_modules(family, transformer):
        if flux and flow.train_blocks == TrainBlocks.DOUBLE and fm.block == "single":
            continue
        if flux and flow.train_blocks == TrainBlocks.SINGLE and fm.block == "double":
            continue
        indices = flow.single_block_indices if fm.block == "single" else flow.double_block_indices
        if indices is not None and fm.index not in indices:
            continue
        dim = type_dims.get(fm.kind, net.dim)
        if dim == 0:  # sd-scripts: a type dim of 0 leaves that type out
            continue
        for i, path in enumerate(fm.paths):
            out.append(
                Adapted(
                    "unet",
                    path,
                    fm.name,
                    transformer.get_submodule(path),
                    False,
                    int(dim),
                    float(net.alpha),
                    None,
                    cfg.optimizer.learning_rate,
                    part=i if fm.fused else None,
                    parts=len(fm.paths),
                    swap=fm.swap_halves,
                )
            )
    return out


def plan(model: Any, cfg: TrainingConfig) -> list[Adapted]:
    """Every module the network adapts, UNet (or flow transformer) first, then the text encoders (with
    train_text_encoder)."""
    net = cfg.network
    flow = cfg.model.family in FLOW_FAMILIES
    out: list[Adapted] = []
    if net.train_unet:
        unet_part = _plan_flow(model.unet, cfg) if flow else _plan_unet(model.unet, cfg)
        if flow and not unet_part:
            raise ValueError(
                "the flow settings leave no transformer module to train (train_blocks, block indices, "
                'block_type_dims all 0?); set flow.train_blocks = "all" or give the blocks a rank'
            )
        if not unet_part:
            raise ValueError(
                f"network.target_modules {net.target_modules} matched no UNet module (or every block has rank "
                'or lr weight 0); use diffusers names such as ["to_q", "to_k", "to_v", "to_out.0"]'
            )
        out += unet_part
    if net.train_text_encoder:
        encoders = text_encoders(model)
        for i, (root, encoder) in enumerate(encoders):
            prefix = text_encoder_prefix(cfg.model.family, i, len(encoders))
            out += _plan_text_encoder(root, prefix, encoder, cfg)
    return out


# ------------------------------------------------------------------------------------------ building


def _attach_peft(root_name: str, root: nn.Module, adapted: list[Adapted], net: NetworkSection) -> None:
    """One peft adapter over the root's planned modules; ranks/alphas other than dim/alpha as patterns."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(
        r=net.dim,
        lora_alpha=net.alpha,  # type: ignore[arg-type]  # peft annotates int; a float alpha works
        lora_dropout=net.dropout,
        target_modules=[a.path for a in adapted],
        rank_pattern={re.escape(a.path): a.dim for a in adapted if a.dim != net.dim},
        alpha_pattern={re.escape(a.path): a.alpha for a in adapted if a.alpha != net.alpha},
        use_dora=net.kind == NetworkKind.DORA,
        init_lora_weights="gaussian",  # down Gaussian, up zero: the adapter starts as a no-op
    )
    if root_name == "unet":
        root.add_adapter(config)  # type: ignore[operator]  # diffusers' PEFT mixin: set_adapter & co. work
    else:  # transformers' add_adapter wants a newer peft than diffusers; injecting is what it does anyway
        inject_adapter_in_model(config, root, adapter_name=ADAPTER_NAME)
    for a in adapted:
        layer: Any = root.get_submodule(a.path)  # a peft LoraLayer now
        a.module = layer
        a.named = {
            "lora_down.weight": layer.lora_A[ADAPTER_NAME].weight,
            "lora_up.weight": layer.lora_B[ADAPTER_NAME].weight,
        }
        if net.kind == NetworkKind.DORA:
            a.named["dora_scale"] = layer.lora_magnitude_vector[ADAPTER_NAME].weight


def _attach_lycoris(root: nn.Module, adapted: list[Adapted], net: NetworkSection) -> None:
    """A lycoris module per planned module, hooked into its forward and registered under the root.

    Bypass mode (the adapter's output added to the frozen layer's, as sd-scripts' LoRA does) rather than
    LyCORIS' default of rebuilding the weight each step: only then do `dropout` and LoCon's rank-axis
    `rank_dropout` act, and LoCon skips building a full-size ΔW per forward. The weights are the same."""
    from lycoris.modules.locon import LoConModule
    from lycoris.modules.loha import LohaModule
    from lycoris.modules.lokr import LokrModule

    cls: Any = {NetworkKind.LOCON: LoConModule, NetworkKind.LOHA: LohaModule, NetworkKind.LOKR: LokrModule}[net.kind]
    extra: dict[str, Any] = {"factor": net.lokr_factor or -1} if net.kind == NetworkKind.LOKR else {}
    container = nn.ModuleDict()
    for a in adapted:
        weight = a.module.weight
        lyco = cls(
            a.name,
            a.module,
            multiplier=1.0,
            lora_dim=a.dim,
            alpha=a.alpha,
            dropout=net.dropout,
            rank_dropout=net.rank_dropout,
            module_dropout=net.module_dropout,
            use_tucker=False,
            bypass_mode=True,  # W x + ΔW x: network.dropout applies (to ΔW x), LoCon's rank dropout masks ranks
            **extra,
        )
        lyco.to(weight.device)
        lyco.apply_to()
        container[a.key] = lyco
        a.lycoris = lyco
        a.named = dict(lyco.named_parameters())
    root.add_module(LYCORIS_CONTAINER, container)


def _share_downs(adapted: list[Adapted]) -> None:
    """The pieces of each fused file module use the first piece's down matrix (the module object itself, so
    one parameter, counted once by `parameters()`, the optimizer and training states): one LoRA on the fused
    Linear, as sd-scripts trains it without split_qkv."""
    first: dict[str, Adapted] = {}
    for a in adapted:
        if a.part is None:
            continue
        lead = first.setdefault(a.name, a)
        if lead is a:
            continue
        if a.lycoris is not None and lead.lycoris is not None:
            a.lycoris.lora_down = lead.lycoris.lora_down
            a.named = dict(a.lycoris.named_parameters(remove_duplicate=False))
        else:
            layer: Any = a.module
            layer.lora_A[ADAPTER_NAME] = cast(Any, lead.module).lora_A[ADAPTER_NAME]
            a.named["lora_down.weight"] = layer.lora_A[ADAPTER_NAME].weight


def _unique(params: list[nn.Parameter]) -> list[nn.Parameter]:
    """Each parameter once (the pieces of a fused module share their down matrix)."""
    return list({id(p): p for p in params}.values())


def attach(model: Any, cfg: TrainingConfig) -> Network:
    """Add the network (its init is random: seed first). Trainable weights are fp32 whatever the base.
    `model` is a `models.SDModel` or a `flow_models.FlowModel`."""
    net = cfg.network
    adapted = plan(model, cfg)
    for root in dict.fromkeys(a.root for a in adapted):
        part = [a for a in adapted if a.root == root]
        if net.kind in PEFT_KINDS:
            _attach_peft(root, getattr(model, root), part, net)
        else:
            _attach_lycoris(getattr(model, root), part, net)
    if cfg.model.family in FLOW_FAMILIES and not cfg.flow.split_qkv:
        _share_downs(adapted)
    params = _unique([p for a in adapted for p in a.params])
    for p in params:
        p.data = p.data.float()
        p.requires_grad_(True)
    return Network(cfg, model, adapted, params)


# ------------------------------------------------------------------------------------------ the network


class AdapterWeights:
    """Parameters as an object accelerate can checkpoint (`register_for_checkpointing`): the text-encoder
    adapters, which are not inside the prepared (saved) UNet."""

    def __init__(self, named: dict[str, nn.Parameter]) -> None:
        self.named = named

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: p.detach().cpu().clone() for k, p in self.named.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = sorted(set(self.named) - set(state))
        if missing:
            raise KeyError(f"the training state lacks {len(missing)} text-encoder adapter weights, e.g. {missing[0]}")
        with torch.no_grad():
            for k, p in self.named.items():
                p.copy_(state[k])


@dataclass
class Network:
    cfg: TrainingConfig
    model: Any  # models.SDModel or flow_models.FlowModel
    adapted: list[Adapted]
    params: list[nn.Parameter] = field(default_factory=list)

    @property
    def kind(self) -> NetworkKind:
        return self.cfg.network.kind

    @property
    def roots(self) -> list[str]:
        """The model parts that carry adapters."""
        return list(dict.fromkeys(a.root for a in self.adapted))

    @property
    def trains_text_encoder(self) -> bool:
        return any(a.root != "unet" for a in self.adapted)

    @property
    def flow(self) -> bool:
        """A Flux/SD3 network: fused file modules, sd-scripts' Flux/SD3 names."""
        return self.cfg.model.family in FLOW_FAMILIES

    def text_encoder_params(self) -> list[nn.Parameter]:
        return [p for a in self.adapted if a.root != "unet" for p in a.params]

    # ------------------------------------------------------------------ the optimizer

    def param_groups(self) -> list[dict[str, Any]]:
        """One group per distinct learning rate (UNet base lr first), each named for the views/logs."""
        weighted = self.cfg.network.block_lr_weights is not None
        by_lr: dict[float, list[Adapted]] = {}
        for a in self.adapted:
            by_lr.setdefault(a.lr, []).append(a)
        return [
            {"params": _unique([p for a in group for p in a.params]), "lr": lr, "name": _group_name(group, weighted)}
            for lr, group in by_lr.items()
        ]

    # ------------------------------------------------------------------ modes

    def train(self) -> None:
        """The parts with adapters train (adapter dropouts on); frozen parts stay in eval mode."""
        roots = set(self.roots)
        for name in ("unet", "text_encoder", "text_encoder_2", "text_encoder_3"):
            part = getattr(self.model, name, None)
            if part is not None:
                part.train(name in roots)

    def eval(self) -> None:
        """Everything in eval mode (sampling, validation)."""
        for name in self.roots:
            getattr(self.model, name).eval()

    # ------------------------------------------------------------------ text-encoder training

    def reduce_text_encoder_grads(self, accelerator: Any) -> None:
        """Average the text-encoder adapters' gradients over the processes. The UNet is DDP-wrapped and
        averages its own; the text encoders are called directly, so their gradients are reduced here,
        once per optimizer step, before clipping. A no-op in one process."""
        if accelerator.num_processes == 1:
            return
        for p in self.text_encoder_params():
            grad = p.grad if p.grad is not None else torch.zeros_like(p)
            p.grad = accelerator.reduce(grad, reduction="mean")

    def checkpoint_objects(self) -> list[AdapterWeights]:
        """Extra objects for a training state: the text-encoder adapters' weights (the UNet's are saved
        with the prepared UNet). Empty when no text encoder trains."""
        named = {f"{a.name}.{key}": p for a in self.adapted if a.root != "unet" for key, p in a.named.items()}
        return [AdapterWeights(named)] if named else []

    # ------------------------------------------------------------------ saving

    def kohya_state_dict(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The weights under sd-scripts' names in `dtype`: lora_down/lora_up/alpha (+ dora_scale for DoRA,
        the LyCORIS layout for loha/lokr). `lora_io.to_kohya_keys` names them per family: SD1.5/SD2 keep the
        diffusers module paths, SDXL's UNet gets SGM names numbered after this UNet's own layout. Flux/SD3:
        sd-scripts' BFL/SGM names with the pieces of each fused module fused (`flow_names.fuse`)."""
        out: dict[str, torch.Tensor] = {}
        if self.flow:  # pieces of a file module fused back (flow_names.fuse), names as planned
            shared = not self.cfg.flow.split_qkv
            for name, group in _by_name(self.adapted).items():
                parts = [_module_state(a, self.kind) for a in group]
                fused = flow_names.fuse(parts, shared_down=shared, swap=group[0].swap)
                for key, value in fused.items():
                    out[f"{name}.{key}"] = value.detach().to("cpu", dtype).contiguous()
            return out
        for a in self.adapted:
            for key, value in _module_state(a, self.kind).items():
                out[f"{a.name}.{key}"] = value.detach().to("cpu", dtype).contiguous()
        return lora_io.to_kohya_keys(self.cfg.model.family, out, unet_config=self.model.unet.config)

    def diffusers_state_dict(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The weights in diffusers' peft format, what `load_lora_weights` of Flux/SD3 pipelines reads without
        conversion: `transformer.<path>.lora_A.weight` / `.lora_B.weight` (+ `.lora_magnitude_vector` for
        DoRA), `text_encoder.…`, `text_encoder_2.…`; one entry per diffusers module (q, k, v apart).
        alpha/rank is multiplied into lora_B: without metadata diffusers takes alpha = rank (scale 1), so the
        file plays as trained in every diffusers version (DoRA too: its norm sees the same ΔW)."""
        if self.kind not in (*PEFT_KINDS, NetworkKind.LOCON):
            raise ValueError(f"{self.kind.value} has no diffusers/peft form; save it with saving.lora_format = kohya")
        out: dict[str, torch.Tensor] = {}
        for a in self.adapted:
            state = _module_state(a, self.kind)
            down, up = state["lora_down.weight"], state["lora_up.weight"]
            scale = float(state["alpha"]) / down.shape[0]
            prefix = f"{'transformer' if a.root == 'unet' else a.root}.{a.path}"
            tensors = {"lora_A.weight": down, "lora_B.weight": up.float() * scale}
            if "dora_scale" in state:  # the text encoders' loader (transformers') wants the parameter's name
                magnitude = "lora_magnitude_vector" + ("" if a.root == "unet" else ".weight")
                tensors[magnitude] = state["dora_scale"].reshape(-1)
            for key, value in tensors.items():
                out[f"{prefix}.{key}"] = value.detach().to("cpu", dtype).contiguous()
        return out

    def file_state_dict(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The tensors of the saved LoRA file: `diffusers_state_dict` for a Flux/SD3 run with
        `saving.lora_format = "diffusers"`, else `kohya_state_dict`."""
        if self.flow and self.cfg.saving.lora_format == LoraFormat.DIFFUSERS:
            return self.diffusers_state_dict(dtype)
        return self.kohya_state_dict(dtype)

    def describe(self) -> str:
        """One log line: kind, ranks, where, how many parameters, and the learning rates when several."""
        net = self.cfg.network
        ranks = sorted({a.dim for a in self.adapted})
        rank = f"rank {net.dim}" if ranks == [net.dim] else f"ranks {ranks[0]}-{ranks[-1]}"
        convs = [a for a in self.adapted if a.conv]
        conv = (
            f" (convolutions {conv_rank(net)}, alpha {convs[0].alpha:g})" if convs and not net.conv_block_dims else ""
        )
        where = []
        for root in self.roots:
            mods = [a for a in self.adapted if a.root == root]
            n_conv = sum(a.conv for a in mods)
            where.append(f"{len(mods)} {root} modules" + (f" ({n_conv} convolutions)" if n_conv else ""))
        groups = self.param_groups()
        lrs = "; lr " + ", ".join(f"{g['name']} {g['lr']:.3g}" for g in groups) if len(groups) > 1 else ""
        return (
            f"{net.kind.value} {rank}, alpha {net.alpha:g}{conv} on {' + '.join(where)}: "
            f"{sum(p.numel() for p in self.params):,} trainable parameters{lrs}"
        )


def _group_name(group: list[Adapted], block_weights: bool) -> str:
    """`unet`, `unet blocks 1,4`, `text_encoder` …: the parts (and, with lr weights, blocks) a group holds."""
    names: list[str] = []
    for root in dict.fromkeys(a.root for a in group):
        blocks = sorted({a.block for a in group if a.root == root and a.block is not None})
        names.append(
            f"{root} blocks {','.join(map(str, blocks))}" if root == "unet" and block_weights and blocks else root
        )
    return " + ".join(names)


def _by_name(adapted: list[Adapted]) -> dict[str, list[Adapted]]:
    """Adapted modules grouped by file module name, in plan order (pieces of a fused module together)."""
    out: dict[str, list[Adapted]] = {}
    for a in adapted:
        out.setdefault(a.name, []).append(a)
    return out


def _module_state(a: Adapted, kind: NetworkKind) -> dict[str, torch.Tensor]:
    """One module's tensors under kohya's key suffixes."""
    if a.lycoris is not None:
        state: dict[str, torch.Tensor] = a.lycoris.state_dict()
        return state
    layer: Any = a.module
    out = {
        "lora_down.weight": layer.lora_A[ADAPTER_NAME].weight,
        "lora_up.weight": layer.lora_B[ADAPTER_NAME].weight,
        "alpha": torch.tensor(a.alpha),  # the real alpha (diffusers' converter would write the rank)
    }
    if kind == NetworkKind.DORA:
        out["dora_scale"] = dora_scale(layer)
    return out


def dora_scale(layer: Any) -> torch.Tensor:
    """peft's DoRA magnitude in the layout LyCORIS writes and ComfyUI/Forge/LyCORIS read (`wd_on_out`: one
    norm per output channel): (out, 1) for a Linear, (out, 1, 1, 1) for a convolution. peft keeps (out,)
    and (1, out, 1, 1)."""
    magnitude = layer.lora_magnitude_vector[ADAPTER_NAME].weight
    base = layer.get_base_layer().weight
    return magnitude.reshape(base.shape[0], *[1] * (base.dim() - 1))
