"""Memory modes for the big flow transformers: a quantized frozen base, block swapping, offloaded checkpoints.

Full-size Flux.1 is 11.9 B parameters: 22 GiB in bf16 before a single activation, more than a 24 GB card
has to spare. LoRA training only *reads* those weights, so they can live in fewer bytes or somewhere else
for most of a step. This module holds the building blocks the training loop wires together; each one is
correct on the CPU (where the tests run) and saves memory on a GPU:

- `quantize_frozen`: the frozen `nn.Linear` layers of the transformer blocks are stored as fp8 (`Fp8Linear`:
  float8_e4m3fn with one scale per tensor, sd-scripts' `fp8_base` plus a scale), int8 (`Int8Linear`: one
  scale per output row) or NF4 (bitsandbytes' `LinearNF4`, QLoRA's storage) and upcast to the compute dtype
  one layer at a time. fp8/int8 run through their own autograd function, which keeps the compact weight for
  the backward pass and dequantizes it again there: letting autograd save the upcast copy would keep a bf16
  copy of every layer alive until the backward pass, and the saving would be gone without checkpointing.
  Adapters are attached afterwards: peft wraps all three (the fp8/int8 layers are `nn.Linear` subclasses
  with a `compute_dtype`, which peft reads for the adapter's dtype; NF4 is peft's own bitsandbytes path,
  enabled by `is_loaded_in_4bit` on the root), and LyCORIS' module classes (bypass mode, as the engine uses
  them) add their output to the layer's. DoRA (peft) reads the raw weight to compute its norm, which is
  wrong for a scaled fp8/int8 weight: `check_adapter_support` refuses that pair with a clear message.
  Own int8 rather than bitsandbytes' `Linear8bitLt`: that layer moves its int8 data into a private state on
  the first forward and writes it back each call, which defeats block swapping, and it rewrites its bias's
  dtype in forward. Weight-only int8 with an upcast matmul is also what fp8 does, so both behave alike.
- `BlockSwapper`: sd-scripts' `blocks_to_swap`. The chosen blocks' frozen weights live on the offload
  device (CPU) and come to the compute device just before the block's forward, and leave after it; in the
  backward pass the block comes back when the gradient of its output arrives (a hook on the output), before
  any of its backward nodes run, and leaves when the next block's backward begins. With gradient
  checkpointing the block's forward runs again inside the backward pass: the hooks see that (the autograd
  engine is running a graph task) and keep the block in until its backward is done. Trainable parameters
  (LoRA weights inside swapped blocks) never move: the optimizer keeps stepping on the same Parameter
  objects on the compute device, and its state stays there. Frozen weights never change, so a block's host
  copy is made once (pinned for asynchronous copies to a GPU) and "moving out" only drops the device copy.
- `checkpointing` / `OffloadedCheckpoint`: diffusers' gradient checkpointing, optionally with the inputs of
  each checkpointed block kept in CPU memory (sd-scripts' `cpu_offload_checkpointing`): only one block's
  working set is on the GPU, plus what is being moved. `offload_activations` is the general tool (every
  tensor autograd saves goes to the CPU), for forwards that are not checkpointed.

Why not `torch.compile`/FSDP offloading: they do not run on a CPU-only box, and one training process per
GPU with hooks is all sd-scripts needs for the same savings.

The order that works (each step needs the one before):

1. load the transformer on the CPU and freeze it (`requires_grad_(False)`);
2. `check_adapter_support(quantization, network.kind)`, then `quantize_frozen(transformer, quantization,
   compute_dtype, device=device)`: only the compact layers travel to the GPU, one at a time;
3. attach the adapters (peft or LyCORIS) and make their weights fp32;
4. `swapper = make_block_swapper(transformer, flow.blocks_to_swap, device)` and `swapper.place(transformer)`
   (or `transformer.to(device)` without swapping): the swapped blocks' weights never reach the GPU;
5. `checkpointing(transformer, gradient_checkpointing, cpu_offload_checkpointing)`;
6. `accelerator.prepare` the transformer with `device_placement=[False, ...]` when swapping (a model-wide
   move would bring every block to the GPU for a moment); `swapper.offload_all()` repairs it otherwise.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from functools import partial
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = [
    "QUANT_MODES",
    "BlockSwapper",
    "Fp8Linear",
    "Int8Linear",
    "OffloadedCheckpoint",
    "QuantReport",
    "check_adapter_support",
    "checkpointing",
    "flux_swap_indices",
    "make_block_swapper",
    "offload_activations",
    "quantize_frozen",
    "skip_outside_blocks",
    "stored_bytes",
    "swap_indices",
    "swappable_blocks",
]

QUANT_MODES = ("none", "fp8", "int8", "nf4")
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
INT8_MAX = 127.0
NF4_BLOCKSIZE = 64  # bitsandbytes' default: one absmax per 64 weights (double-quantized: 8 bits each)

# the repeated blocks of the flow transformers (diffusers names) and of the original checkpoints
_BLOCK_PATH = re.compile(
    r"(^|\.)(transformer_blocks|single_transformer_blocks|joint_blocks|double_blocks|single_blocks)\.\d+\."
)


# --------------------------------------------------------------------------------------- quantization


def _dequantize(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """weight × scale in `dtype`, rounded once: the product is computed in fp32 (in-place on the upcast copy,
    so one layer costs one extra weight-sized tensor of `dtype`)."""
    out = weight.to(dtype, copy=True)
    return out.mul_(scale)


class _DequantLinearFn(torch.autograd.Function):
    """y = x Wᵀ + b with W dequantized on the fly; saves the *stored* weight, not the upcast copy."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        scale: torch.Tensor,
        bias: torch.Tensor | None,
        compute_dtype: torch.dtype,
    ) -> torch.Tensor:
        w = _dequantize(weight, scale, compute_dtype)
        b = None if bias is None else bias.to(compute_dtype)
        out = F.linear(x.to(compute_dtype), w, b)
        ctx.save_for_backward(weight, scale)
        ctx.x_dtype = x.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return out

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[torch.Tensor | None, None, None, torch.Tensor | None, None]:
        (grad_out,) = grads
        weight, scale = ctx.saved_tensors
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            w = _dequantize(weight, scale, grad_out.dtype)
            grad_x = grad_out.matmul(w).to(ctx.x_dtype)
        if ctx.needs_input_grad[3]:  # a bias someone chose to train
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0).to(ctx.bias_dtype)
        return grad_x, None, None, grad_bias, None


class _WeightOnlyLinear(nn.Linear):
    """An `nn.Linear` whose weight is stored in `storage_dtype` with a float32 `weight_scale` (a buffer) and
    dequantized to `compute_dtype` for each call. Frozen: the weight never has a gradient.

    `.to(dtype)`/`.half()`/`.bfloat16()` change where the layer *computes* (`compute_dtype`, like an
    `nn.Linear` cast to that dtype) and the bias's dtype, never the stored weight or its scale: a model-wide
    `.to(device, bf16)` after quantization moves them and leaves them quantized.
    """

    storage_dtype: ClassVar[torch.dtype]
    weight_scale: torch.Tensor

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        compute_dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device="meta")  # no float weight is allocated
        self.compute_dtype = compute_dtype
        self.weight = nn.Parameter(
            torch.empty(out_features, in_features, dtype=self.storage_dtype, device=device), requires_grad=False
        )
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=compute_dtype, device=device), requires_grad=False)
        self.register_buffer("weight_scale", torch.ones(self._scale_shape(out_features), device=device))

    @staticmethod
    def _scale_shape(out_features: int) -> tuple[int, ...]:
        raise NotImplementedError

    @classmethod
    def _quantize(cls, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        compute_dtype: torch.dtype,
        device: torch.device | str | None = None,
    ) -> _WeightOnlyLinear:
        """A quantized copy of `linear` (on `device`, or where its weight is)."""
        target = torch.device(device) if device is not None else linear.weight.device
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, compute_dtype, device="meta")
        q, scale = cls._quantize(linear.weight.detach().to(target, torch.float32))
        layer.weight = nn.Parameter(q, requires_grad=False)
        layer.weight_scale = scale
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().to(target, compute_dtype), requires_grad=False)
        layer.train(linear.training)
        return layer

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight as a plain tensor in `dtype` (default: the compute dtype)."""
        return _dequantize(self.weight, self.weight_scale, dtype or self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = _DequantLinearFn.apply(x, self.weight, self.weight_scale, self.bias, self.compute_dtype)
        return out

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> _WeightOnlyLinear:
        storage = (self.weight, self.weight_scale)
        probe = fn(torch.empty(0, dtype=self.compute_dtype, device=self.weight.device))
        if probe.dtype.is_floating_point and probe.dtype != self.compute_dtype:
            self.compute_dtype = probe.dtype

        def keep_dtype(t: torch.Tensor) -> torch.Tensor:
            if any(t is s for s in storage):  # device moves only
                return t.to(fn(torch.empty(0, device=t.device)).device)
            return fn(t)

        super()._apply(keep_dtype, recurse)
        return self

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, storage={self.storage_dtype}, compute_dtype={self.compute_dtype}"


class Fp8Linear(_WeightOnlyLinear):
    """float8_e4m3fn weight, one fp32 scale for the tensor (absmax / 448), upcast for compute.

    The class name and the `weight_scale` attribute are what LyCORIS looks for to treat a layer as a
    weight-only fp8 linear (it then forces bypass mode and dequantizes with the scale where it needs W)."""

    storage_dtype: ClassVar[torch.dtype] = FP8_DTYPE

    @staticmethod
    def _scale_shape(out_features: int) -> tuple[int, ...]:
        return ()

    @classmethod
    def _quantize(cls, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scale = weight.abs().amax().clamp(min=1e-12) / FP8_MAX
        return (weight / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale.float()


class Int8Linear(_WeightOnlyLinear):
    """int8 weight with one fp32 scale per output row (absmax / 127, round to nearest), upcast for compute."""

    storage_dtype: ClassVar[torch.dtype] = torch.int8

    @staticmethod
    def _scale_shape(out_features: int) -> tuple[int, ...]:
        return (out_features, 1)

    @classmethod
    def _quantize(cls, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scale = weight.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / INT8_MAX
        return torch.round(weight / scale).clamp(-INT8_MAX, INT8_MAX).to(torch.int8), scale.float()


def _nf4_from_linear(linear: nn.Linear, compute_dtype: torch.dtype, device: torch.device | str | None) -> nn.Module:
    import bitsandbytes as bnb

    target = torch.device(device) if device is not None else linear.weight.device
    layer = bnb.nn.LinearNF4(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        compute_dtype=compute_dtype,
        compress_statistics=True,  # QLoRA's double quantization: the absmax values in 8 bits
        device="meta",
    )
    # bitsandbytes repacks an eval-mode layer's weight in place into a CPU-only layout on its first no-grad CPU
    # call (an inference speed-up that fails for layers narrower than a block and breaks moving it later)
    layer.support_avx512bf16_for_cpu = False
    weight = bnb.nn.Params4bit(
        linear.weight.detach(),
        requires_grad=False,
        blocksize=NF4_BLOCKSIZE,
        compress_statistics=True,
        quant_type="nf4",
    )
    layer.weight = weight.to(target)  # type: ignore[misc]  # bitsandbytes quantizes on the move
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.detach().to(target, compute_dtype), requires_grad=False)
    layer.train(linear.training)
    return layer


@dataclass
class QuantReport:
    """What `quantize_frozen` did: layers replaced and their stored bytes before and after.

    `weight_bytes_*` count the weight matrices alone (after: with their scales or NF4 statistics);
    `bytes_*` add the biases (kept in the compute dtype)."""

    mode: str
    layers: int = 0
    params: int = 0  # weight elements quantized
    weight_bytes_before: int = 0
    weight_bytes_after: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    skipped: list[str] = field(default_factory=list)

    @property
    def weight_ratio(self) -> float:
        return self.weight_bytes_after / self.weight_bytes_before if self.weight_bytes_before else 1.0

    def describe(self) -> str:
        if self.mode == "none" or not self.layers:
            return "frozen base stored as is"
        gib = 1024**3
        return (
            f"frozen base: {self.layers} linear layers ({self.params / 1e9:.2f} B weights) stored as {self.mode}: "
            f"{self.bytes_before / gib:.2f} → {self.bytes_after / gib:.2f} GiB; {len(self.skipped)} layers kept as is"
        )


def _tensor_bytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def _quant_state_bytes(param: torch.Tensor | None = None, quant_state: Any = None) -> int:
    """bitsandbytes' 4-bit statistics: the absmax values (8-bit when double-quantized, with their own absmax)."""
    qs = quant_state if quant_state is not None else getattr(param, "quant_state", None)
    if qs is None:
        return 0
    total = _tensor_bytes(getattr(qs, "absmax", None))
    nested = getattr(qs, "state2", None)
    if nested is not None:
        total += _tensor_bytes(getattr(nested, "absmax", None)) + _tensor_bytes(getattr(qs, "offset", None))
    return total


def _layer_bytes(layer: nn.Module) -> tuple[int, int]:
    """(weight bytes incl. scales/statistics, bias bytes) of one linear layer as stored."""
    weight: torch.Tensor = layer.weight  # type: ignore[assignment]
    bias: torch.Tensor | None = layer.bias  # type: ignore[assignment]
    scale = getattr(layer, "weight_scale", None)
    w = _tensor_bytes(weight) + _quant_state_bytes(weight) + _tensor_bytes(scale)
    return w, _tensor_bytes(bias)


def stored_bytes(module: nn.Module) -> int:
    """Bytes a module holds in parameters and buffers as stored (quantized weights as quantized, with their
    scales and bitsandbytes statistics); shared tensors are counted once."""
    seen: set[int] = set()
    total = 0
    for t in [*module.parameters(), *module.buffers()]:
        if id(t) in seen:
            continue
        seen.add(id(t))
        total += _tensor_bytes(t) + _quant_state_bytes(t)
    return total


def skip_outside_blocks(name: str, module: nn.Module) -> bool:
    """The default `skip` of `quantize_frozen`: keep every layer outside the repeated transformer blocks as
    is (the embedders of latents, text, time and guidance, the final norm's modulation and `proj_out`). They
    are under 1% of Flux's weights and the most sensitive to rounding; the blocks hold the rest."""
    return _BLOCK_PATH.search(name + ".") is None


def check_adapter_support(mode: str, network_kind: str) -> None:
    """Raise a ValueError naming the combination when an adapter kind cannot train on a quantized base.

    peft's DoRA computes its weight norm from the base layer's raw `weight` (it knows how to dequantize
    bitsandbytes' layers, not a scaled fp8/int8 one), so DoRA with fp8/int8 would start from a wrong norm.
    LoRA (peft) and LoCon/LoHa/LoKr (LyCORIS, bypass mode) work on all three storages."""
    mode = str(getattr(mode, "value", mode))
    kind = str(getattr(network_kind, "value", network_kind))
    if kind == "dora" and mode in ("fp8", "int8"):
        raise ValueError(
            f"network.kind = 'dora' cannot train on a {mode} base (training.base_quantization = {mode!r}): "
            "peft's DoRA reads the unscaled stored weight for its norm. Use base_quantization = 'nf4' or 'none', "
            "or network.kind = 'lora'"
        )


def _has_adapters(module: nn.Module) -> bool:
    return any(type(m).__module__.startswith("peft.") for m in module.modules())


def quantize_frozen(
    module: nn.Module,
    mode: str,
    compute_dtype: torch.dtype,
    skip: Callable[[str, nn.Module], bool] | None = None,
    device: torch.device | str | None = None,
) -> QuantReport:
    """Replace the frozen `nn.Linear` layers of `module` by quantized ones, in place; returns what it did.

    `mode`: "none" (nothing), "fp8", "int8" or "nf4" (bitsandbytes). `compute_dtype`: what each layer
    upcasts to (bf16 on a GPU, fp32 on the CPU). `skip(name, layer)` keeps a layer as is; the default keeps
    everything outside the transformer blocks (`skip_outside_blocks`). Layers with a trainable parameter are
    always kept. `device`: where the quantized layers go (default: where each weight is). Quantize a model
    loaded on the CPU with `device="cuda"` and only the compact weights reach the GPU, one layer at a time: a
    bf16 Flux does not fit a 16 GB card even for a moment. Attach adapters afterwards (peft and LyCORIS wrap
    the quantized layers); check the adapter kind with `check_adapter_support` first.
    """
    mode = str(getattr(mode, "value", mode)).lower()
    if mode not in QUANT_MODES:
        raise ValueError(f"unknown base quantization {mode!r}; choose one of {', '.join(QUANT_MODES)}")
    report = QuantReport(mode)
    if mode == "none":
        return report
    if _has_adapters(module):
        raise ValueError("quantize_frozen runs before the adapters are attached (peft layers found in the model)")
    keep = skip or skip_outside_blocks
    targets: list[tuple[str, nn.Linear]] = []
    trainable: list[str] = []
    for name, layer in module.named_modules():
        if type(layer) is not nn.Linear:  # plain layers only: not already quantized, not an adapter wrapper
            continue
        if keep(name, layer):
            report.skipped.append(name)
        elif any(p.requires_grad for p in layer.parameters()):
            trainable.append(name)
        else:
            targets.append((name, layer))
    if trainable and not targets:
        raise ValueError(
            f"quantize_frozen found only trainable linear layers ({trainable[0]}, …): freeze the base first "
            "(requires_grad_(False)); a quantized weight cannot be trained"
        )
    report.skipped += trainable
    for name, layer in targets:
        w_before, b_before = _layer_bytes(layer)
        new: nn.Module
        if mode == "fp8":
            new = Fp8Linear.from_linear(layer, compute_dtype, device)
        elif mode == "int8":
            new = Int8Linear.from_linear(layer, compute_dtype, device)
        else:
            new = _nf4_from_linear(layer, compute_dtype, device)
        parent_name, _, child = name.rpartition(".")
        setattr(module.get_submodule(parent_name) if parent_name else module, child, new)
        w_after, b_after = _layer_bytes(new)
        report.layers += 1
        report.params += layer.weight.numel()
        report.weight_bytes_before += w_before
        report.weight_bytes_after += w_after
        report.bytes_before += w_before + b_before
        report.bytes_after += w_after + b_after
    if mode == "nf4" and report.layers:
        # peft dispatches bitsandbytes' 4-bit layers to its Linear4bit adapter only for a model marked so
        # (diffusers' quantizer sets the same flag)
        module.is_loaded_in_4bit = True  # type: ignore[assignment]
    return report


# ------------------------------------------------------------------------------------- block swapping


def _in_backward() -> bool:
    """Whether the autograd engine is running a backward pass in this thread (a checkpointed forward that
    is being recomputed runs inside one)."""
    task_id: Callable[[], int] | None = getattr(torch._C, "_current_graph_task_id", None)
    return task_id is not None and task_id() != -1


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            yield from _tensors(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors(item)
    elif hasattr(obj, "to_tuple"):  # diffusers' output dataclasses
        yield from _tensors(obj.to_tuple())


@dataclass
class _Slot:
    """One frozen tensor of a swapped block: where it is attached, and its permanent host copy."""

    module: nn.Module
    name: str
    is_param: bool
    host: torch.Tensor
    quant_state: Any = None  # bitsandbytes' 4-bit statistics move with their weight

    def attach(self, value: torch.Tensor) -> None:
        if self.is_param:
            self.module._parameters[self.name].data = value  # type: ignore[union-attr]  # the same Parameter object
        else:
            self.module._buffers[self.name] = value


class BlockSwapper:
    """Keep some blocks' frozen weights on `offload_device` and bring each to `device` only while it runs.

    `blocks`: the blocks in forward order (`swappable_blocks(transformer)`); `swap`: how many of the last
    blocks to swap, or their indices. Create it after the adapters are attached (trainable parameters found
    then stay on `device`) and after anything that moves the whole model (`accelerator.prepare`; or call
    `offload_all()` after such a move). `place(root)` moves a model to `device` without its swapped weights.

    `moved_in`/`moved_out` count block moves and `bytes_in` the bytes copied to `device`; with `record`,
    `moves` lists them as `(block index, "in" | "out")`. At most `max_resident` swapped blocks are on
    `device` at once (one: the block running; the previous one leaves first). Copies are synchronous; a
    pinned host copy lets a GPU read it asynchronously within the stream's order.
    """

    def __init__(
        self,
        blocks: Sequence[nn.Module],
        swap: int | Iterable[int],
        device: torch.device | str,
        offload_device: torch.device | str = "cpu",
        *,
        pin_memory: bool | None = None,
        record: bool = False,
        max_resident: int = 1,
    ) -> None:
        self.blocks = list(blocks)
        n = len(self.blocks)
        if isinstance(swap, int):
            if not 0 <= swap <= n:
                raise ValueError(f"cannot swap {swap} of {n} blocks")
            indices = list(range(n - swap, n))
        else:
            indices = sorted(set(swap))
            if indices and (indices[0] < 0 or indices[-1] >= n):
                raise ValueError(f"block indices {indices} are outside 0..{n - 1}")
        if max_resident < 1:
            raise ValueError("max_resident must be at least 1")
        self.swapped: list[int] = indices
        self.device = torch.device(device)
        self.offload_device = torch.device(offload_device)
        self.pin_memory = (
            pin_memory
            if pin_memory is not None
            else self.device.type == "cuda" and self.offload_device.type == "cpu" and torch.cuda.is_available()
        )
        self.non_blocking = self.pin_memory
        self.record = record
        self.max_resident = max_resident
        self.moves: list[tuple[int, str]] = []
        self.moved_in = 0
        self.moved_out = 0
        self.bytes_in = 0
        self._slots: dict[int, list[_Slot]] = {}
        self._resident: list[int] = []
        self._handles: list[Any] = []
        for i in self.swapped:
            self._install(i)

    # -- set-up

    def _install(self, index: int) -> None:
        block = self.blocks[index]
        slots: list[_Slot] = []
        for module in block.modules():
            for name, p in module._parameters.items():
                if p is None:
                    continue
                if p.requires_grad:  # adapters: resident on the compute device for good
                    p.data = p.data.to(self.device)
                    continue
                slots.append(_Slot(module, name, True, self._host_copy(p), getattr(p, "quant_state", None)))
            for name, b in module._buffers.items():
                if b is not None:
                    slots.append(_Slot(module, name, False, self._host_copy(b)))
        self._slots[index] = slots
        for slot in slots:
            slot.attach(self._to_offload(slot.host))
            if slot.quant_state is not None:
                slot.quant_state.to(self.offload_device)
        self._handles.append(block.register_forward_pre_hook(partial(self._pre_hook, index)))
        self._handles.append(block.register_forward_hook(partial(self._post_hook, index)))

    def _host_copy(self, t: torch.Tensor) -> torch.Tensor:
        host = t.detach().to(self.offload_device)
        if self.pin_memory and not host.is_pinned():
            host = host.pin_memory()
        return host

    # -- what a move does with a host copy (tests override these to make a misplaced weight visible)

    def _to_compute(self, host: torch.Tensor) -> torch.Tensor:
        """The tensor a parameter holds while its block is on the compute device."""
        return host.to(self.device, non_blocking=self.non_blocking)

    def _to_offload(self, host: torch.Tensor) -> torch.Tensor:
        """The tensor a parameter holds while its block is offloaded (the host copy itself: no copy back,
        frozen weights do not change)."""
        return host

    # -- moves

    def bring_in(self, index: int) -> None:
        if index in self._resident or index not in self._slots:
            return
        while len(self._resident) >= self.max_resident:
            self.send_out(self._resident[0])
        for slot in self._slots[index]:
            value = self._to_compute(slot.host)
            slot.attach(value)
            if slot.quant_state is not None:
                slot.quant_state.to(self.device)
            self.bytes_in += _tensor_bytes(value)
        self._resident.append(index)
        self.moved_in += 1
        if self.record:
            self.moves.append((index, "in"))

    def send_out(self, index: int) -> None:
        if index not in self._resident:
            return
        for slot in self._slots[index]:
            slot.attach(self._to_offload(slot.host))
            if slot.quant_state is not None:
                slot.quant_state.to(self.offload_device)
        self._resident.remove(index)
        self.moved_out += 1
        if self.record:
            self.moves.append((index, "out"))

    def offload_all(self) -> None:
        """Every swapped block's frozen weights back to the offload device (also after a model-wide `.to()`)."""
        for index in self.swapped:
            if index not in self._resident:  # maybe moved by someone else: put the host copies back
                for slot in self._slots[index]:
                    slot.attach(self._to_offload(slot.host))
                    if slot.quant_state is not None:
                        slot.quant_state.to(self.offload_device)
        for index in list(self._resident):
            self.send_out(index)

    def place(self, root: nn.Module) -> None:
        """Move `root` to the compute device except the swapped blocks' frozen weights (which stay offloaded):
        the way to put a model on a card that cannot hold all of it."""
        inside = {id(m) for i in self.swapped for m in self.blocks[i].modules()}
        for module in root.modules():
            if id(module) in inside:
                for p in module._parameters.values():
                    if p is not None and p.requires_grad:
                        p.data = p.data.to(self.device)
            else:
                module._apply(lambda t: t.to(self.device), recurse=False)

    def remove(self) -> None:
        """Undo: hooks off, every swapped block on the compute device (e.g. before saving or merging)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.max_resident = max(self.max_resident, len(self.swapped))
        for index in self.swapped:
            self.bring_in(index)
        self._slots.clear()
        self._resident.clear()

    @property
    def resident(self) -> list[int]:
        return list(self._resident)

    def offloaded_bytes(self) -> int:
        """Bytes of frozen weights kept off the compute device while no swapped block runs."""
        return sum(
            _tensor_bytes(s.host) + _quant_state_bytes(quant_state=s.quant_state)
            for slots in self._slots.values()
            for s in slots
        )

    # -- hooks

    def _pre_hook(self, index: int, module: nn.Module, args: Any) -> None:
        self.bring_in(index)

    def _post_hook(self, index: int, module: nn.Module, args: Any, output: Any) -> None:
        if _in_backward():  # a checkpointed block recomputed for its backward: it stays until that is done
            return
        if torch.is_grad_enabled():
            for t in _tensors(output):
                if t.requires_grad:  # the gradient of the output arrives before any of the block's backward runs
                    t.register_hook(partial(self._grad_hook, index))
        self.send_out(index)

    def _grad_hook(self, index: int, grad: torch.Tensor) -> None:
        self.bring_in(index)  # the block that ran before (later in forward order) leaves: its backward is done


def swappable_blocks(transformer: nn.Module) -> list[nn.Module]:
    """The blocks block swapping moves, in forward order: Flux's double then single blocks, SD3's joint blocks."""
    blocks: list[nn.Module] = []
    for name in ("transformer_blocks", "single_transformer_blocks"):
        container = getattr(transformer, name, None)
        if container is not None:
            blocks.extend(container)
    return blocks


def flux_swap_indices(n_double: int, n_single: int, blocks_to_swap: int) -> list[int]:
    """sd-scripts' meaning of `blocks_to_swap` for Flux: n // 2 double blocks and (n - n // 2) × 2 single
    blocks, the last ones of each kind (a double block is about twice a single one). Indices into
    `[*double, *single]`. sd-scripts caps n at 35 for full Flux (two of each kind stay); here the cap is
    that every block of a kind may be swapped."""
    n_d = blocks_to_swap // 2
    n_s = (blocks_to_swap - n_d) * 2
    if blocks_to_swap < 0 or n_d > n_double or n_s > n_single:
        limit = max(
            k for k in range(2 * (n_double + n_single) + 2) if k // 2 <= n_double and (k - k // 2) * 2 <= n_single
        )
        raise ValueError(
            f"flow.blocks_to_swap = {blocks_to_swap} would swap {n_d} of {n_double} double and {n_s} of {n_single} "
            f"single blocks; at most {limit} fits this model"
        )
    return [*range(n_double - n_d, n_double), *range(n_double + n_single - n_s, n_double + n_single)]


def swap_indices(transformer: nn.Module, blocks_to_swap: int) -> list[int]:
    """Which of `swappable_blocks(transformer)` `blocks_to_swap` means: Flux by sd-scripts' double/single
    split (`flux_swap_indices`), SD3 the last n joint blocks."""
    double = getattr(transformer, "transformer_blocks", None) or []
    single = getattr(transformer, "single_transformer_blocks", None)
    if single is not None:
        return flux_swap_indices(len(double), len(single), blocks_to_swap)
    if not 0 <= blocks_to_swap <= len(double):
        raise ValueError(f"flow.blocks_to_swap = {blocks_to_swap}: this model has {len(double)} blocks")
    return list(range(len(double) - blocks_to_swap, len(double)))


def make_block_swapper(
    transformer: nn.Module,
    blocks_to_swap: int,
    device: torch.device | str,
    offload_device: torch.device | str = "cpu",
    **options: Any,
) -> BlockSwapper | None:
    """`flow.blocks_to_swap` as a `BlockSwapper` on the transformer (None for 0)."""
    if not blocks_to_swap:
        return None
    return BlockSwapper(
        swappable_blocks(transformer), swap_indices(transformer, blocks_to_swap), device, offload_device, **options
    )


# --------------------------------------------------------------------------- checkpointing and offload


class OffloadedCheckpoint:
    """A diffusers `gradient_checkpointing_func` that keeps each checkpointed block's inputs off the GPU.

    Plain checkpointing keeps every block's inputs on the GPU until the backward pass (for Flux at 1024 px,
    57 blocks × 4608 tokens × 3072 × 2 bytes ≈ 1.5 GiB a sample). Here each block runs as
    `checkpoint(run, *inputs_on_cpu)` where `run` moves them to the GPU, calls the block and moves its outputs
    back to the CPU; the caller gets GPU copies, and when such a copy is passed to the next block its CPU
    original is used, so nothing is copied twice. A tensor passed to many blocks (the time embedding, the
    rotary embedding) is moved once per forward. A 0-element tensor on the GPU goes in with the inputs so that
    checkpoint saves and restores the GPU's random state: adapter dropout draws the same mask when the block
    is recomputed. `stashed` counts the inputs copied to the offload device.
    """

    def __init__(self, offload_device: torch.device | str = "cpu") -> None:
        self.offload_device = torch.device(offload_device)
        self.stashed = 0
        self._hosts: dict[int, tuple[weakref.ref[torch.Tensor], torch.Tensor]] = {}

    # -- the copies (tests override these to tell "device" and "host" tensors apart on a CPU)

    def _is_host(self, t: torch.Tensor) -> bool:
        return t.device == self.offload_device

    def _to_host(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.offload_device)

    def _to_device(self, t: torch.Tensor, device: torch.device) -> torch.Tensor:
        return t.to(device, non_blocking=device.type == "cuda")

    # -- bookkeeping

    def _host(self, t: torch.Tensor) -> torch.Tensor:
        if self._is_host(t):
            return t
        entry = self._hosts.get(id(t))
        if entry is not None and entry[0]() is t:
            return entry[1]
        host = self._to_host(t)
        self.stashed += 1
        self._remember(t, host)
        return host

    def _remember(self, device_tensor: torch.Tensor, host: torch.Tensor) -> None:
        """Map a device tensor to its host copy for as long as the device tensor lives."""
        if device_tensor is host:
            return
        key = id(device_tensor)
        hosts = self._hosts

        def forget(_: object, key: int = key) -> None:
            hosts.pop(key, None)

        hosts[key] = (weakref.ref(device_tensor, forget), host)

    def _map(self, obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
        if isinstance(obj, torch.Tensor):
            return fn(obj)
        if isinstance(obj, tuple):
            return tuple(self._map(o, fn) for o in obj)
        if isinstance(obj, list):
            return [self._map(o, fn) for o in obj]
        if isinstance(obj, dict):
            return {k: self._map(v, fn) for k, v in obj.items()}
        return obj

    def __call__(self, block: nn.Module, *args: Any) -> Any:
        devices = [t.device for t in _tensors(args) if not self._is_host(t)]
        device = devices[0] if devices else self.offload_device
        stored = self._map(args, self._host)

        def run(anchor: torch.Tensor, *inputs: Any) -> Any:
            out = block(*self._map(inputs, lambda t: self._to_device(t, device)))
            return self._map(out, self._to_host)

        anchor = torch.empty(0, device=device)
        out_host = checkpoint(run, anchor, *stored, use_reentrant=False)
        out = self._map(out_host, lambda t: self._to_device(t, device))
        for dev_t, host_t in zip(_tensors(out), _tensors(out_host), strict=True):
            self._remember(dev_t, host_t)
        return out


def checkpointing(transformer: nn.Module, enabled: bool, cpu_offload: bool = False) -> OffloadedCheckpoint | None:
    """Turn diffusers' gradient checkpointing on (each block's activations are recomputed in the backward
    pass) or off; with `cpu_offload` the block inputs it keeps live in CPU memory (`OffloadedCheckpoint`).
    Returns the checkpoint function when offloading."""
    model: Any = transformer
    if not enabled:
        if cpu_offload:
            raise ValueError("cpu_offload_checkpointing needs gradient_checkpointing")
        if getattr(model, "gradient_checkpointing", False):
            model.disable_gradient_checkpointing()
        return None
    func = OffloadedCheckpoint() if cpu_offload else None
    model.enable_gradient_checkpointing(func)
    return func


def offload_activations(enabled: bool = True) -> AbstractContextManager[Any]:
    """A context for a forward pass: every tensor autograd saves for the backward pass is kept in CPU memory
    (pinned when there is a GPU) and brought back when needed. For forwards that are not checkpointed; the
    checkpointed blocks are covered by `checkpointing(..., cpu_offload=True)`."""
    if not enabled:
        return nullcontext()
    return torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available())
