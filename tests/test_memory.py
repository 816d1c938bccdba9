"""Memory modes on the CPU with a tiny Flux transformer: quantized storage, block swapping, offloaded checkpoints.

What a GPU would show as memory saved, the CPU shows as bytes stored and as correctness: the quantized base
stores the expected fraction of its bytes and computes close to the original, adapters (peft and LyCORIS)
train on top of it with the base frozen, and block swapping and offloaded checkpointing change nothing in the
loss or the gradients. The swap tests use a swapper whose offloaded weights are NaN: any computation that
touches a block's weights while it is away shows up in the loss.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("peft")

from diffusers import FluxPipeline, FluxTransformer2DModel  # noqa: E402
from peft import LoraConfig, inject_adapter_in_model  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.checkpoint import checkpoint  # noqa: E402

from nyx_tui.trainers.native import memory  # noqa: E402

LORA_TARGETS = ["to_q", "to_v", "add_k_proj", "proj_mlp", "proj_out", "ff.net.2", "norm1.linear"]
QUANT = ["fp8", "int8", "nf4"]


def tiny_flux(double: int = 1, single: int = 1, dtype: Any = None) -> FluxTransformer2DModel:
    torch.manual_seed(0)
    model = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=double,
        num_single_layers=single,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=True,
        axes_dims_rope=(4, 4, 8),
    )
    model.requires_grad_(False)
    if dtype is not None:
        model.to(dtype)
    return model.eval()


def flux_inputs(batch: int = 2, height: int = 8, width: int = 8, text: int = 6) -> dict[str, Any]:
    """As FluxPipeline builds them: 2x2-packed latents (4 channels → 16), image ids on the packed grid."""
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(batch, 4, height, width, generator=g)
    return {
        "hidden_states": FluxPipeline._pack_latents(latents, batch, 4, height, width),
        "encoder_hidden_states": torch.randn(batch, text, 32, generator=g),
        "pooled_projections": torch.randn(batch, 32, generator=g),
        "timestep": torch.rand(batch, generator=g),
        "img_ids": FluxPipeline._prepare_latent_image_ids(batch, height // 2, width // 2, "cpu", torch.float32),
        "txt_ids": torch.zeros(text, 3),
        "guidance": torch.full((batch,), 3.5),
        "return_dict": False,
    }


def add_lora(model: nn.Module, dropout: float = 0.0) -> list[nn.Parameter]:
    """peft LoRA as the engine adds it; the up matrices get small values so every adapter has a gradient."""
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=LORA_TARGETS, lora_dropout=dropout), model)
    gen = torch.Generator().manual_seed(5)
    params = []
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()
            if "lora_B" in name:
                p.data.normal_(0, 0.02, generator=gen)
            p.requires_grad_(True)
            params.append(p)
    return params


def loss_and_grads(model: nn.Module, inputs: dict[str, Any], seed: int = 0) -> tuple[float, dict[str, Any]]:
    torch.manual_seed(seed)
    out = model(**inputs)[0]
    loss = out.float().square().mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.item(), grads


def assert_same(a: tuple[float, dict[str, Any]], b: tuple[float, dict[str, Any]], tol: float = 0.0) -> None:
    assert a[0] == pytest.approx(b[0], abs=tol, rel=tol)
    assert a[1].keys() == b[1].keys()
    for name in a[1]:
        assert torch.allclose(a[1][name], b[1][name], atol=tol, rtol=tol), name


# ------------------------------------------------------------------------------------------ quantization


def _expected_weight_bytes(mode: str, layer: nn.Linear) -> int:
    out_f, in_f = layer.weight.shape
    n = out_f * in_f
    if mode == "fp8":
        return n + 4  # 1 byte each + one fp32 scale
    if mode == "int8":
        return n + 4 * out_f  # 1 byte each + one fp32 scale per row
    blocks = -(-n // memory.NF4_BLOCKSIZE)
    return n // 2 + blocks + 4 * -(-blocks // 256) + 4  # 4 bits, 8-bit absmax per 64, fp32 absmax per 256, offset


@pytest.mark.parametrize("mode", QUANT)
def test_quantized_base_stores_the_expected_bytes(mode: str) -> None:
    model = tiny_flux()
    block_linears = {
        n: m for n, m in model.named_modules() if type(m) is nn.Linear and not memory.skip_outside_blocks(n, m)
    }
    expected = sum(_expected_weight_bytes(mode, m) for m in block_linears.values())
    fp32_bytes = sum(m.weight.numel() * 4 for m in block_linears.values())
    before = memory.stored_bytes(model)

    report = memory.quantize_frozen(model, mode, torch.float32)

    assert report.layers == len(block_linears)
    assert report.weight_bytes_before == fp32_bytes
    assert report.weight_bytes_after == expected
    # fp8 and int8 store a quarter of fp32 (half of bf16), NF4 an eighth; plus their scales
    ideal = {"fp8": 1 / 4, "int8": 1 / 4, "nf4": 1 / 8}[mode]
    assert ideal <= report.weight_ratio <= ideal * (1.13 if mode == "int8" else 1.04)  # rows are 32 wide here
    # the whole model shrinks by exactly what the replaced layers gave up; the rest is untouched
    assert before - memory.stored_bytes(model) == report.bytes_before - report.bytes_after
    assert "x_embedder" in report.skipped and "proj_out" in report.skipped  # outside the blocks: kept as is
    assert type(model.x_embedder) is nn.Linear


def test_fp8_from_bf16_halves_the_weights() -> None:
    model = tiny_flux(dtype=torch.bfloat16)
    report = memory.quantize_frozen(model, "fp8", torch.bfloat16)
    assert report.weight_bytes_after - 4 * report.layers == report.weight_bytes_before // 2


@pytest.mark.parametrize(("mode", "tolerance"), [("fp8", 0.02), ("int8", 0.005), ("nf4", 0.05)])
def test_quantized_base_computes_close_to_the_original(mode: str, tolerance: float) -> None:
    model = tiny_flux()
    inputs = flux_inputs()
    with torch.no_grad():
        reference = model(**inputs)[0]
        memory.quantize_frozen(model, mode, torch.float32)
        out = model(**inputs)[0]
    assert out.dtype == torch.float32
    error = (out - reference).abs().max() / reference.abs().max()
    assert 0 < error < tolerance  # quantized (not the same), upcast compute (close)


@pytest.mark.parametrize("cls", [memory.Fp8Linear, memory.Int8Linear])
def test_quantized_linear_backward_matches_autograd(cls: Any) -> None:
    """The layer's own backward (it keeps the stored weight, not the upcast copy) against autograd on the
    dequantized weight; a bias someone unfreezes gets its gradient too."""
    torch.manual_seed(0)
    layer = cls.from_linear(nn.Linear(24, 16), torch.float32)
    layer.bias.requires_grad_(True)
    x = torch.randn(3, 5, 24, requires_grad=True)
    layer(x).sin().sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    bias = layer.bias.detach().clone().requires_grad_(True)
    torch.nn.functional.linear(x2, layer.dequantize(), bias).sin().sum().backward()
    assert torch.allclose(x.grad, x2.grad, atol=1e-6)
    assert torch.allclose(layer.bias.grad, bias.grad, atol=1e-6)
    assert layer.weight.grad is None and not layer.weight.requires_grad


def test_storage_keeps_its_dtype_when_the_model_is_cast() -> None:
    model = tiny_flux()
    memory.quantize_frozen(model, "fp8", torch.float32)
    layer = model.transformer_blocks[0].attn.to_q
    scale = layer.weight_scale.clone()
    model.to(torch.bfloat16)
    assert isinstance(layer, memory.Fp8Linear)
    assert layer.weight.dtype == torch.float8_e4m3fn and layer.weight_scale.dtype == torch.float32
    assert torch.equal(layer.weight_scale, scale)  # not rounded through bf16
    assert layer.compute_dtype == torch.bfloat16 and layer.bias.dtype == torch.bfloat16
    with torch.no_grad():
        out = model(**{k: v.to(torch.bfloat16) if torch.is_tensor(v) else v for k, v in flux_inputs().items()})[0]
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_quantize_keeps_trainable_layers_and_asks_for_a_frozen_base() -> None:
    model = tiny_flux()
    model.requires_grad_(True)
    with pytest.raises(ValueError, match="freeze the base"):
        memory.quantize_frozen(model, "fp8", torch.float32)
    model.requires_grad_(False)
    model.transformer_blocks[0].attn.to_q.requires_grad_(True)
    report = memory.quantize_frozen(model, "int8", torch.float32)
    assert "transformer_blocks.0.attn.to_q" in report.skipped
    assert type(model.transformer_blocks[0].attn.to_q) is nn.Linear
    assert memory.quantize_frozen(tiny_flux(), "none", torch.float32).layers == 0
    with pytest.raises(ValueError, match="unknown base quantization"):
        memory.quantize_frozen(tiny_flux(), "fp4", torch.float32)


def test_quantize_before_adapters_only() -> None:
    model = tiny_flux()
    add_lora(model)
    with pytest.raises(ValueError, match="before the adapters"):
        memory.quantize_frozen(model, "fp8", torch.float32)


def _train_one_step(model: nn.Module, params: list[nn.Parameter]) -> None:
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    adapters = [p.detach().clone() for p in params]
    optimizer = torch.optim.SGD(params, lr=0.1)
    out = model(**flux_inputs())[0]
    out.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)  # the base stays frozen
    optimizer.step()
    assert all(not torch.equal(p, a) for p, a in zip(params, adapters, strict=True))
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen[name]), name


@pytest.mark.parametrize("mode", QUANT)
def test_peft_lora_trains_on_a_quantized_base(mode: str) -> None:
    model = tiny_flux()
    memory.quantize_frozen(model, mode, torch.float32)
    params = add_lora(model)
    wrapped = model.transformer_blocks[0].attn.to_q
    assert type(wrapped).__name__ == ("Linear4bit" if mode == "nf4" else "Linear")  # peft's bnb 4-bit path for NF4
    assert all(p.dtype == torch.float32 for p in params)  # the adapter is not cast to the storage dtype
    _train_one_step(model, params)


@pytest.mark.parametrize("mode", QUANT)
def test_lycoris_modules_train_on_a_quantized_base(mode: str) -> None:
    """LoCon, LoHa and LoKr as the engine builds them (lycoris module classes in bypass mode)."""
    from lycoris.modules.locon import LoConModule
    from lycoris.modules.loha import LohaModule
    from lycoris.modules.lokr import LokrModule

    for cls in (LoConModule, LohaModule, LokrModule):
        model = tiny_flux()
        memory.quantize_frozen(model, mode, torch.float32)
        with torch.no_grad():
            reference = model(**flux_inputs())[0]
        container = nn.ModuleDict()
        for name, layer in list(model.named_modules()):
            if name.endswith(("attn.to_q", "attn.to_v", "proj_mlp", "ff.net.2")):
                extra = {"factor": -1} if cls is LokrModule else {}
                key = "lora_unet_" + name.replace(".", "_")
                lyco = cls(key, layer, multiplier=1.0, lora_dim=4, alpha=4, bypass_mode=True, **extra)
                lyco.apply_to()
                container[key] = lyco
        model.add_module("nyx_adapters", container)
        params = list(container.parameters())
        for p in params:
            p.requires_grad_(True)
        with torch.no_grad():
            assert torch.equal(model(**flux_inputs())[0], reference), cls.__name__  # a no-op at init
            for p in params:
                p.add_(torch.randn_like(p) * 0.01)
        _train_one_step(model, params)


@pytest.fixture
def lycoris_presets() -> Iterator[None]:
    """`LycorisNetwork.apply_preset` sets class attributes for the whole process: put them back."""
    from lycoris import LycorisNetwork

    saved = {k: v for k, v in vars(LycorisNetwork).items() if k.isupper()}
    yield
    for k, v in saved.items():
        setattr(LycorisNetwork, k, v)


@pytest.mark.parametrize("mode", QUANT)
def test_create_lycoris_wraps_the_quantized_layers(mode: str, lycoris_presets: None) -> None:
    from lycoris import LycorisNetwork, create_lycoris

    LycorisNetwork.apply_preset(
        {"target_module": ["FluxTransformerBlock", "FluxSingleTransformerBlock"], "lora_prefix": "lora_unet"}
    )
    model = tiny_flux()
    memory.quantize_frozen(model, mode, torch.float32)
    # LyCORIS forces bypass mode for the fp8 layer (by its name) and bitsandbytes' layers; int8 needs it asked for
    options = {"bypass_mode": True} if mode == "int8" else {}
    network = create_lycoris(model, 1.0, linear_dim=4, linear_alpha=4, algo="lora", **options)
    network.apply_to()
    quantized = {memory.Fp8Linear: "fp8", memory.Int8Linear: "int8"}
    wrapped = {quantized.get(type(m.org_module[0]), "nf4") for m in network.loras}
    assert wrapped == {mode} and len(network.loras) > 0
    assert all(m.bypass_mode for m in network.loras)
    params = list(network.parameters())
    for p in params:
        p.requires_grad_(True)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn_like(p) * 0.01)
    model.add_module("lycoris_network", network)
    _train_one_step(model, params)


def test_dora_on_a_scaled_base_is_refused_by_name() -> None:
    for mode in ("fp8", "int8"):
        with pytest.raises(ValueError, match=f"dora.*{mode}"):
            memory.check_adapter_support(mode, "dora")
    for mode, kind in [("nf4", "dora"), ("none", "dora"), ("fp8", "lora"), ("int8", "lokr"), ("fp8", "locon")]:
        memory.check_adapter_support(mode, kind)


def test_dora_trains_on_nf4() -> None:
    model = tiny_flux()
    memory.quantize_frozen(model, "nf4", torch.float32)
    with torch.no_grad():
        reference = model(**flux_inputs())[0]
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_v"], use_dora=True), model)
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    with torch.no_grad():
        assert torch.allclose(model(**flux_inputs())[0], reference, atol=1e-5)  # the magnitude matches the base
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    _train_one_step(model, params)


# ----------------------------------------------------------------------------------------- block swap


class PoisonSwapper(memory.BlockSwapper):
    """Offloaded weights read as NaN, and every move in makes a fresh copy: a block computing while it is
    away, or autograd reading a weight after its block left, turns the loss or a gradient into NaN."""

    def _to_compute(self, host: Any) -> Any:
        return host.clone()

    def _to_offload(self, host: Any) -> Any:
        if host.dtype.is_floating_point:
            return torch.full_like(host, float("nan"))
        return torch.full_like(host, 99)  # int8/uint8 storage: garbage


def reentrant_checkpoint(module: nn.Module, *args: Any) -> Any:
    return checkpoint(module.__call__, *args, use_reentrant=True)


def _checkpoint(model: Any, how: str) -> None:
    if how == "non-reentrant":
        model.enable_gradient_checkpointing()
    elif how == "reentrant":
        model.enable_gradient_checkpointing(reentrant_checkpoint)


@pytest.mark.parametrize("mode", ["none", "fp8", "nf4"])
@pytest.mark.parametrize("how", ["off", "non-reentrant", "reentrant"])
def test_block_swap_changes_nothing_but_where_weights_are(mode: str, how: str) -> None:
    model = tiny_flux(double=2, single=2)
    memory.quantize_frozen(model, mode, torch.float32)
    params = add_lora(model)
    _checkpoint(model, how)
    inputs = flux_inputs()
    inputs["hidden_states"].requires_grad_(True)  # reentrant checkpointing needs an input that requires grad
    plain = loss_and_grads(model, inputs)

    blocks = memory.swappable_blocks(model)
    swapper = PoisonSwapper(blocks, [1, 3], "cpu", record=True)  # a double and a single block
    assert torch.isnan(blocks[3].attn.to_q.base_layer.bias).all()  # the weights are away
    assert not torch.isnan(blocks[2].attn.to_q.base_layer.bias).any()  # the unswapped ones are not
    swapped = loss_and_grads(model, inputs)

    assert_same(plain, swapped)
    assert all(p is q for p, q in zip(params, [p for p in model.parameters() if p.requires_grad], strict=True))
    assert all(not torch.isnan(p).any() for p in params)  # adapters never leave
    # forward: each swapped block comes in right before its forward and leaves right after it; backward: the
    # later block comes back first, and leaves when the earlier one comes in
    assert swapper.moves[:4] == [(1, "in"), (1, "out"), (3, "in"), (3, "out")]
    assert swapper.moves[4:] == [(3, "in"), (3, "out"), (1, "in")]
    assert swapper.resident == [1]
    swapper.offload_all()
    assert swapper.resident == [] and swapper.moves[-1] == (1, "out")


def test_block_swap_forward_without_grad_and_a_training_step() -> None:
    model = tiny_flux(double=2, single=2)
    params = add_lora(model)
    model.enable_gradient_checkpointing()
    inputs = flux_inputs()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    with torch.no_grad():
        reference = model(**inputs)[0]
    swapper = PoisonSwapper(memory.swappable_blocks(model), 2, "cpu", record=True)  # the two single blocks
    with torch.no_grad():
        assert torch.equal(model(**inputs)[0], reference)  # sampling: in, out, in, out
    assert swapper.moves == [(2, "in"), (2, "out"), (3, "in"), (3, "out")]
    assert swapper.moved_in == swapper.moved_out == 2 and swapper.bytes_in > 0

    before = [p.detach().clone() for p in params]
    optimizer = torch.optim.SGD(params, lr=0.1)
    model(**inputs)[0].square().mean().backward()
    optimizer.step()  # the same Parameter objects, on the compute device, with their gradients
    assert all(not torch.equal(p, b) for p, b in zip(params, before, strict=True))
    swapper.remove()
    assert swapper.resident == []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen[name]), name  # every block back, unchanged


def test_place_moves_all_but_the_swapped_weights() -> None:
    model = tiny_flux(double=2, single=2)
    add_lora(model)
    swapper = PoisonSwapper(memory.swappable_blocks(model), [0], "cpu")
    swapper.place(model)
    assert torch.isnan(model.transformer_blocks[0].norm1.linear.base_layer.weight).all()
    assert not torch.isnan(model.transformer_blocks[1].norm1.linear.base_layer.weight).any()
    assert swapper.offloaded_bytes() > 0


def test_flux_blocks_to_swap_counts_as_sd_scripts() -> None:
    # n // 2 double blocks and (n - n // 2) * 2 single blocks, the last of each kind
    indices = memory.flux_swap_indices(19, 38, 18)
    assert indices == [*range(10, 19), *range(19 + 20, 19 + 38)]
    assert memory.flux_swap_indices(19, 38, 1) == [19 + 36, 19 + 37]
    assert memory.flux_swap_indices(19, 38, 0) == []
    with pytest.raises(ValueError, match="at most 38"):
        memory.flux_swap_indices(19, 38, 39)
    model = tiny_flux(double=2, single=2)
    assert memory.swap_indices(model, 2) == [1, 2, 3]
    swapper = memory.make_block_swapper(model, 1, "cpu")
    assert swapper is not None and swapper.swapped == [2, 3]
    assert memory.make_block_swapper(model, 0, "cpu") is None


# ------------------------------------------------------------------------------------ checkpointing


def test_offloaded_checkpointing_gives_the_plain_gradients() -> None:
    """With adapter dropout: the recomputed blocks must draw the same masks as the first forward."""
    model = tiny_flux(double=2, single=2)
    add_lora(model, dropout=0.2)
    model.train()
    inputs = flux_inputs()
    plain = loss_and_grads(model, inputs, seed=3)
    func = memory.checkpointing(model, enabled=True, cpu_offload=True)
    assert isinstance(func, memory.OffloadedCheckpoint) and model.gradient_checkpointing
    assert_same(plain, loss_and_grads(model, inputs, seed=3), tol=1e-6)
    assert memory.checkpointing(model, enabled=True, cpu_offload=False) is None
    assert_same(plain, loss_and_grads(model, inputs, seed=3), tol=1e-6)
    memory.checkpointing(model, enabled=False)
    assert not model.gradient_checkpointing
    with pytest.raises(ValueError, match="needs gradient_checkpointing"):
        memory.checkpointing(model, enabled=False, cpu_offload=True)


class MarkedOffload(memory.OffloadedCheckpoint):
    """On a CPU the offload device is the compute device: copies are marked to tell them apart."""

    def __init__(self) -> None:
        super().__init__()
        self.host_ids: set[int] = set()
        self.keep: list[Any] = []

    def _is_host(self, t: Any) -> bool:
        return id(t) in self.host_ids

    def _to_host(self, t: Any) -> Any:
        host = t.clone()
        self.host_ids.add(id(host))
        self.keep.append(host)  # ids stay unique while the test runs
        return host

    def _to_device(self, t: Any, device: Any) -> Any:
        return t.clone()


def test_offloaded_checkpoint_copies_each_input_once() -> None:
    model = tiny_flux(double=2, single=2)
    add_lora(model)
    inputs = flux_inputs()
    plain = loss_and_grads(model, inputs)
    func = MarkedOffload()
    model.enable_gradient_checkpointing(func)
    offloaded = loss_and_grads(model, inputs)
    assert_same(plain, offloaded, tol=1e-6)
    # block 0's hidden and text states, the time embedding and the rotary cos/sin: once each for four blocks;
    # every later block gets the host original of the output it is handed
    assert func.stashed == 5


def test_offload_activations_gives_the_plain_gradients() -> None:
    model = tiny_flux()
    add_lora(model)
    inputs = flux_inputs()
    plain = loss_and_grads(model, inputs)
    with memory.offload_activations(True):
        torch.manual_seed(0)
        loss = model(**inputs)[0].float().square().mean()
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert_same(plain, (loss.item(), grads), tol=1e-6)
    with memory.offload_activations(False):
        pass
