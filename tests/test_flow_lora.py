"""Flux and SD3 adapters and their files: sd-scripts' module names, the fused q/k/v layout, round trips.

On tiny Flux (dev- and schnell-style, 2 double + 2 single blocks) and SD3 (2 joint blocks, the last one
context-pre-only) models: the network is attached from a config (`networks.attach`), its adapter weights are
set at random (a trained LoRA is not a no-op) and rounded to fp16 (the save precision, so the comparisons
are exact up to fp32 arithmetic), and saved with `kohya_state_dict`. The file's module names are
sd-scripts' (`reference/sd-scripts-lora-keys.json`), module for module, for the blocks the flow settings
select; loaded into a fresh model by our loader (`init_weights.load_flow_lora`) or into a fresh network
(`network.weights`), and in the diffusers format by diffusers' own `load_lora_weights`, the transformer's
(and text encoders') outputs are the trained model's. diffusers' kohya-Flux converter hard-codes full-size
Flux, so the fused tensors are compared with the shapes sd-scripts writes instead.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from nyx_tui.config.model import TrainingConfig

torch = pytest.importorskip("torch")

DIM, ALPHA = 4, 2.0  # alpha != dim: a wrongly scaled load changes the outputs
TOL = 1e-5
REFERENCE = Path(__file__).resolve().parent / "data" / "sd-scripts-reference" / "sd-scripts-lora-keys.json"
# the sample module sets of sd-scripts' files, at block 0 (used when the reference is not at hand)
DOUBLE_SAMPLE = [
    f"lora_unet_double_blocks_0_{side}_{m}"
    for side in ("img", "txt")
    for m in ("attn_proj", "attn_qkv", "mlp_0", "mlp_2", "mod_lin")
]
SINGLE_SAMPLE = [f"lora_unet_single_blocks_0_{m}" for m in ("linear1", "linear2", "modulation_lin")]
SD3_SAMPLE = [
    f"lora_unet_joint_blocks_0_{side}_{m}"
    for side in ("context_block", "x_block")
    for m in ("adaLN_modulation_1", "attn_proj", "attn_qkv", "mlp_fc1", "mlp_fc2")
]


# ----------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from nyx_tui.demo_assets import build_tiny_flux, build_tiny_sd3

    root = tmp_path_factory.mktemp("flow_lora")
    return {
        "dev": build_tiny_flux(root / "dev", double_blocks=2, single_blocks=2),
        "schnell": build_tiny_flux(root / "schnell", schnell=True, double_blocks=2, single_blocks=2),
        "sd3": build_tiny_sd3(root / "sd3", layers=2),
    }


@pytest.fixture(scope="module")
def reference() -> dict[str, Any]:
    if REFERENCE.is_file():
        return dict(json.loads(REFERENCE.read_text()))
    return {
        "flux_lora_default": {"double_sample": DOUBLE_SAMPLE, "single_sample": SINGLE_SAMPLE},
        "sd3_lora_default": {"block0": SD3_SAMPLE},
    }


def family_of(variant: str) -> str:
    return "sd3" if variant == "sd3" else "flux"


def config(model_dir: Path, variant: str, flow: dict[str, Any] | None = None, **network: Any) -> TrainingConfig:
    return TrainingConfig.model_validate(
        {
            "model": {"family": family_of(variant), "pretrained": str(model_dir)},
            "network": {"dim": DIM, "alpha": ALPHA, **network},
            "flow": flow or {},
            "optimizer": {"type": "adamw", "learning_rate": 1e-3},
        }
    )


def load(cfg: TrainingConfig) -> Any:
    from nyx_tui.trainers.native.flow_files import load_flow_model

    return load_flow_model(cfg.model)


def attached(cfg: TrainingConfig, seed: int = 0) -> tuple[Any, Any]:
    """A fresh model with the network attached and its weights set at random, rounded to fp16."""
    from nyx_tui.trainers.native import networks

    model = load(cfg)
    torch.manual_seed(seed)
    network = networks.attach(model, cfg)
    with torch.no_grad():
        for p in network.params:
            if p.dim() == 1 or p.shape[-1] == 1:  # DoRA magnitudes: near their init
                p.mul_(1 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))
            p.copy_(p.half().float())
    network.eval()
    return model, network


def module_names(state: dict[str, Any]) -> set[str]:
    return {k.split(".", 1)[0] for k in state}


def transformer_out(model: Any, seed: int = 1) -> Any:
    """The transformer's output on fixed random inputs (its shapes as the pipelines call it)."""
    g = torch.Generator().manual_seed(seed)
    t = model.transformer
    with torch.no_grad():
        if model.family.value == "flux":
            seq, txt = 16, 6
            kwargs: dict[str, Any] = {
                "hidden_states": torch.randn(1, seq, t.config.in_channels, generator=g),
                "encoder_hidden_states": torch.randn(1, txt, t.config.joint_attention_dim, generator=g),
                "pooled_projections": torch.randn(1, t.config.pooled_projection_dim, generator=g),
                "timestep": torch.tensor([0.5]),
                "img_ids": torch.zeros(seq, 3),
                "txt_ids": torch.zeros(txt, 3),
            }
            kwargs["img_ids"][:, 1] = torch.arange(seq) // 4
            kwargs["img_ids"][:, 2] = torch.arange(seq) % 4
            if model.guidance_embeds:
                kwargs["guidance"] = torch.tensor([3.5])
        else:
            kwargs = {
                "hidden_states": torch.randn(1, t.config.in_channels, 8, 8, generator=g),
                "encoder_hidden_states": torch.randn(1, 6, t.config.joint_attention_dim, generator=g),
                "pooled_projections": torch.randn(1, t.config.pooled_projection_dim, generator=g),
                "timestep": torch.tensor([500.0]),
            }
        return t(**kwargs, return_dict=False)[0]


def encoder_outs(model: Any) -> list[Any]:
    """The CLIP encoders' hidden states for one caption (the encoders Nyx trains)."""
    from nyx_tui.trainers.native.networks import text_encoders

    ids = model.tokenizer(["a red circle"], padding="max_length", max_length=16, return_tensors="pt").input_ids
    with torch.no_grad():
        return [enc(ids, output_hidden_states=True).hidden_states[-2] for _, enc in text_encoders(model)]


def saved(tmp_path: Path, state: dict[str, Any], name: str = "lora.safetensors") -> Path:
    from nyx_tui.trainers.native import lora_io

    return lora_io.save_lora(tmp_path / name, state, {"ss_network_module": "test"})


# ------------------------------------------------------------------------------------------- names


def expected_flux(reference: dict[str, Any], doubles: list[int], singles: list[int]) -> set[str]:
    ref = reference["flux_lora_default"]
    out = {n.replace("_double_blocks_0_", f"_double_blocks_{i}_") for n in ref["double_sample"] for i in doubles}
    out |= {n.replace("_single_blocks_0_", f"_single_blocks_{i}_") for n in ref["single_sample"] for i in singles}
    return out


def test_flux_names_are_sd_scripts(dirs: dict[str, Path], reference: dict[str, Any]) -> None:
    cfg = config(dirs["dev"], "dev", train_text_encoder=True)
    _, network = attached(cfg)
    names = module_names(network.kohya_state_dict(torch.float16))
    unet = {n for n in names if n.startswith("lora_unet_")}
    assert unet == expected_flux(reference, [0, 1], [0, 1])
    te = names - unet
    assert te and all(n.startswith("lora_te1_text_model_encoder_layers_") for n in te)
    # the reference's text-encoder names are among ours (same spelling), and no T5 (lora_te3_) module
    ref_te = {k.split(".")[0] for k in reference.get("flux_lora_default", {}).get("sample", []) if "_te1_" in k}
    assert ref_te <= te
    # each module has down, up and alpha
    state = network.kohya_state_dict(torch.float16)
    assert {k.split(".", 1)[1] for k in state} == {"lora_down.weight", "lora_up.weight", "alpha"}


def test_sd3_names_are_sd_scripts(dirs: dict[str, Path], reference: dict[str, Any]) -> None:
    cfg = config(dirs["sd3"], "sd3", train_text_encoder=True)
    _, network = attached(cfg)
    names = module_names(network.kohya_state_dict(torch.float16))
    block0 = set(reference["sd3_lora_default"]["block0"])
    assert {n for n in names if "_joint_blocks_0_" in n} == block0
    # the last block is context-pre-only: its context block has q/k/v and the modulation only
    last = {n.replace("_joint_blocks_0_", "_joint_blocks_1_") for n in block0}
    last -= {f"lora_unet_joint_blocks_1_context_block_{m}" for m in ("attn_proj", "mlp_fc1", "mlp_fc2")}
    assert {n for n in names if "_joint_blocks_1_" in n} == last
    assert {n.split("_text_model")[0] for n in names if not n.startswith("lora_unet_")} == {"lora_te1", "lora_te2"}


def test_block_selection(dirs: dict[str, Path], reference: dict[str, Any]) -> None:
    from nyx_tui.trainers.native import networks

    def names(variant: str = "dev", **flow: Any) -> set[str]:
        cfg = config(dirs[variant], variant, flow)
        return {a.name for a in networks.plan(load(cfg), cfg)}

    assert names(train_blocks="single") == expected_flux(reference, [], [0, 1])
    assert names(train_blocks="double") == expected_flux(reference, [0, 1], [])
    assert names(double_block_indices=[1], single_block_indices=[0]) == expected_flux(reference, [1], [0])
    assert names(train_blocks="single", single_block_indices=[1]) == expected_flux(reference, [], [1])
    dropped = names(block_type_dims={"img_attn": 0, "single_mod": 0})
    assert dropped == {
        n for n in expected_flux(reference, [0, 1], [0, 1]) if "img_attn" not in n and "modulation" not in n
    }
    sd3 = names("sd3", double_block_indices=[0])
    assert sd3 == set(reference["sd3_lora_default"]["block0"])
    with pytest.raises(ValueError, match="double_block_indices"):
        names(double_block_indices=[2])


def test_type_dims_set_ranks(dirs: dict[str, Path]) -> None:
    cfg = config(dirs["dev"], "dev", {"block_type_dims": {"txt_mlp": 2, "single": 8}})
    _, network = attached(cfg)
    state = network.kohya_state_dict(torch.float16)
    assert state["lora_unet_double_blocks_0_txt_mlp_0.lora_down.weight"].shape[0] == 2
    assert state["lora_unet_single_blocks_1_linear1.lora_down.weight"].shape[0] == 8
    assert state["lora_unet_single_blocks_1_linear2.lora_down.weight"].shape[0] == 8
    assert state["lora_unet_single_blocks_1_modulation_lin.lora_down.weight"].shape[0] == DIM
    assert state["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"].shape[0] == DIM


# ------------------------------------------------------------------------------------------ fused q/k/v


def test_fused_shapes_are_sd_scripts(dirs: dict[str, Path]) -> None:
    """sd-scripts' shapes for the tiny model: a rank-r LoRA on the fused Linear (3·32 or 3·32+128 outputs)
    without split_qkv; with it, r per piece stacked: down (n·r, in), block-diagonal up (Σo, n·r), alpha
    n·alpha (so the loaders' alpha/rank is the trained one)."""
    width, mlp = 32, 128
    _, network = attached(config(dirs["dev"], "dev"))
    state = network.kohya_state_dict(torch.float16)
    qkv, lin1 = "lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_single_blocks_0_linear1"
    assert state[f"{qkv}.lora_down.weight"].shape == (DIM, width)
    assert state[f"{qkv}.lora_up.weight"].shape == (3 * width, DIM)
    assert state[f"{lin1}.lora_up.weight"].shape == (3 * width + mlp, DIM)
    assert float(state[f"{qkv}.alpha"]) == ALPHA
    # one shared down: the network has one parameter where the file has one matrix
    pieces = [a for a in network.adapted if a.name == qkv]
    assert len(pieces) == 3 and len({id(a.named["lora_down.weight"]) for a in pieces}) == 1
    assert len({id(p) for p in network.params}) == len(network.params)

    _, split = attached(config(dirs["dev"], "dev", {"split_qkv": True}))
    state = split.kohya_state_dict(torch.float16)
    assert state[f"{qkv}.lora_down.weight"].shape == (3 * DIM, width)
    up = state[f"{qkv}.lora_up.weight"]
    assert up.shape == (3 * width, 3 * DIM)
    assert float(state[f"{qkv}.alpha"]) == 3 * ALPHA
    from nyx_tui.trainers.native.flow_names import is_block_diagonal

    assert is_block_diagonal(up, [width] * 3)
    assert state[f"{lin1}.lora_down.weight"].shape == (4 * DIM, width)
    assert state[f"{lin1}.lora_up.weight"].shape == (3 * width + mlp, 4 * DIM)


def test_fuse_unfuse_exact() -> None:
    """Both encodings give back the pieces' products ΔW_i = (alpha_i/r_i)·up_i·down_i, and SD3's swap is its
    own inverse."""
    from nyx_tui.trainers.native.flow_names import fuse, unfuse

    g = torch.Generator().manual_seed(0)
    sizes = [3, 3, 5]
    down = torch.randn(2, 4, generator=g)
    pieces = [
        {"lora_down.weight": torch.randn(2, 4, generator=g), "lora_up.weight": torch.randn(o, 2, generator=g)}
        for o in sizes
    ]
    for p in pieces:
        p["alpha"] = torch.tensor(1.5)

    def delta(ps: list[dict[str, Any]]) -> Any:
        return torch.cat(
            [p["alpha"] / p["lora_down.weight"].shape[0] * p["lora_up.weight"] @ p["lora_down.weight"] for p in ps]
        )

    fused = fuse(pieces, shared_down=False)
    assert float(fused["alpha"]) == 4.5
    assert torch.allclose(fused["alpha"] / 6 * fused["lora_up.weight"] @ fused["lora_down.weight"], delta(pieces))
    assert torch.allclose(delta(unfuse(fused, sizes)), delta(pieces))
    shared = [{**p, "lora_down.weight": down} for p in pieces]
    fused = fuse(shared, shared_down=True, swap=False)
    assert fused["lora_down.weight"].shape == (2, 4)
    back = unfuse(fused, sizes)  # not block-diagonal: whole down to each piece
    assert torch.allclose(delta(back), delta(shared))
    single = {"lora_down.weight": down, "lora_up.weight": torch.randn(6, 2, generator=g), "alpha": torch.tensor(2.0)}
    swapped = fuse([single], shared_down=False, swap=True)
    assert torch.equal(swapped["lora_up.weight"][:3], single["lora_up.weight"][3:])
    assert torch.equal(unfuse(swapped, [6], swap=True)[0]["lora_up.weight"], single["lora_up.weight"])


# ------------------------------------------------------------------------------------------- round trips


ROUND_TRIPS = [
    ("dev", "lora", False),
    ("dev", "lora", True),
    ("dev", "dora", False),
    ("schnell", "lora", False),
    ("schnell", "locon", True),
    ("sd3", "lora", False),
    ("sd3", "lora", True),
    ("sd3", "dora", True),
    ("sd3", "locon", False),
]


@pytest.mark.parametrize(("variant", "kind", "split"), ROUND_TRIPS)
def test_kohya_file_round_trip(dirs: dict[str, Path], tmp_path: Path, variant: str, kind: str, split: bool) -> None:
    """The fp16 file, put on a fresh model by our loader, gives the trained model's transformer and text
    encoder outputs."""
    from nyx_tui.trainers.native.init_weights import load_flow_lora

    cfg = config(dirs[variant], variant, {"split_qkv": split}, kind=kind, train_text_encoder=True)
    model, network = attached(cfg)
    want, want_te = transformer_out(model), encoder_outs(model)
    base = transformer_out(load(cfg))
    assert (want - base).abs().max() > 1e-3  # the adapter does something
    path = saved(tmp_path, network.kohya_state_dict(torch.float16))
    fresh = load(cfg)
    assert load_flow_lora(fresh, path) == []
    assert torch.allclose(transformer_out(fresh), want, atol=TOL, rtol=TOL)
    for got, exp in zip(encoder_outs(fresh), want_te, strict=True):
        assert torch.allclose(got, exp, atol=TOL, rtol=TOL)


@pytest.mark.parametrize(("variant", "split"), [("dev", False), ("dev", True), ("sd3", False)])
def test_network_weights_round_trip(dirs: dict[str, Path], tmp_path: Path, variant: str, split: bool) -> None:
    """`network.weights`: the file into a fresh network of the same config gives the same file back."""
    from nyx_tui.trainers.native import init_weights, networks

    cfg = config(dirs[variant], variant, {"split_qkv": split}, train_text_encoder=True)
    model, network = attached(cfg)
    want = transformer_out(model)
    state = network.kohya_state_dict(torch.float16)
    path = saved(tmp_path, state)
    fresh = load(cfg)
    torch.manual_seed(5)
    other = networks.attach(fresh, cfg)
    lines = init_weights.load_into(other, path)
    assert [level for _, level in lines] == ["info"]
    other.eval()
    assert torch.allclose(transformer_out(fresh), want, atol=TOL, rtol=TOL)
    again = other.kohya_state_dict(torch.float16)
    assert again.keys() == state.keys()
    assert all(torch.equal(again[k], state[k]) for k in state)


def test_shared_file_into_split_network(dirs: dict[str, Path], tmp_path: Path) -> None:
    """A genuine rank-r fused LoRA (sd-scripts' default) into a split_qkv network of rank r: each piece gets
    the whole down and its rows of the up, exactly."""
    from nyx_tui.trainers.native import init_weights, networks

    model, network = attached(config(dirs["dev"], "dev"))
    want = transformer_out(model)
    path = saved(tmp_path, network.kohya_state_dict(torch.float16))
    cfg = config(dirs["dev"], "dev", {"split_qkv": True})
    fresh = load(cfg)
    other = networks.attach(fresh, cfg)
    init_weights.load_into(other, path)
    other.eval()
    assert torch.allclose(transformer_out(fresh), want, atol=TOL, rtol=TOL)


def test_network_weights_rank_mismatch(dirs: dict[str, Path], tmp_path: Path) -> None:
    from nyx_tui.trainers.native import init_weights, networks

    _, network = attached(config(dirs["dev"], "dev", {"split_qkv": True}))
    path = saved(tmp_path, network.kohya_state_dict(torch.float16))
    cfg = config(dirs["dev"], "dev")  # shared down: the block-diagonal file is rank 3·4 there
    other = networks.attach(load(cfg), cfg)
    with pytest.raises(ValueError, match=r"img_attn_qkv.*rank is 12"):
        init_weights.load_into(other, path)


# ------------------------------------------------------------------------------------------- diffusers


@pytest.mark.parametrize(
    ("variant", "kind", "split"), [("dev", "lora", False), ("schnell", "dora", True), ("sd3", "lora", False)]
)
def test_diffusers_export_loads_in_diffusers(
    dirs: dict[str, Path], tmp_path: Path, variant: str, kind: str, split: bool
) -> None:
    import diffusers

    cfg = config(dirs[variant], variant, {"split_qkv": split}, kind=kind, train_text_encoder=True)
    cfg.saving.lora_format = "diffusers"  # type: ignore[assignment]
    model, network = attached(cfg)
    want, want_te = transformer_out(model), encoder_outs(model)
    state = network.file_state_dict(torch.float16)
    assert all(re.match(r"^(transformer|text_encoder|text_encoder_2)\.", k) for k in state)
    assert any(k.endswith(".lora_A.weight") for k in state) and any(k.endswith(".lora_B.weight") for k in state)
    path = saved(tmp_path, state)
    cls = diffusers.StableDiffusion3Pipeline if variant == "sd3" else diffusers.FluxPipeline
    pipe = cls.from_pretrained(str(dirs[variant]))
    pipe.load_lora_weights(str(path))
    fresh = load(cfg)
    fresh.transformer = pipe.transformer
    fresh.text_encoder = pipe.text_encoder
    if variant == "sd3":
        fresh.text_encoder_2 = pipe.text_encoder_2
    assert torch.allclose(transformer_out(fresh), want, atol=TOL, rtol=TOL)
    for got, exp in zip(encoder_outs(fresh), want_te, strict=True):
        assert torch.allclose(got, exp, atol=TOL, rtol=TOL)


# ------------------------------------------------------------------------------------------- settings


def test_loha_lokr_refused_for_flow() -> None:
    from nyx_tui.trainers.native.network_check import network_problems

    for kind in ("loha", "lokr"):
        cfg = TrainingConfig.model_validate({"model": {"family": "flux"}, "network": {"kind": kind}})
        problems = [p for p in network_problems(cfg) if p.field == "network.kind"]
        assert problems and "lora" in problems[0].fix
    cfg = TrainingConfig.model_validate({"model": {"family": "sd3"}, "network": {"kind": "locon"}})
    assert not [p for p in network_problems(cfg) if p.field == "network.kind"]


@pytest.mark.parametrize(
    ("family", "model_type", "version", "arch"),
    [
        ("flux", "dev", "flux1", "flux-1-dev/lora"),
        ("flux", "schnell", "flux1", "flux-1-schnell/lora"),
        ("sd3", "medium", "medium", "stable-diffusion-3-medium/lora"),
        ("sd3", "5-large", "5-large", "stable-diffusion-3-5-large/lora"),
    ],
)
def test_flow_metadata(family: str, model_type: str, version: str, arch: str) -> None:
    from nyx_tui.trainers.native import lora_io

    flow: dict[str, Any] = {"split_qkv": True}
    if family == "flux":
        flow |= {"train_blocks": "single", "block_type_dims": {"single_mod": 0}, "single_block_indices": [0, 3]}
    cfg = TrainingConfig.model_validate({"model": {"family": family}, "flow": flow})
    meta = lora_io.build_metadata(
        cfg,
        step=1,
        num_train_images=1,
        tag_frequency={},
        started_at=0.0,
        mixed_precision="no",
        prediction_type="flow",
        epoch=1,
        num_epochs=1,
        model_type=model_type,
    )
    assert meta["ss_base_model_version"] == version
    assert meta["modelspec.architecture"] == arch
    args = json.loads(meta["ss_network_args"])
    assert args["split_qkv"] == "True"
    if family == "flux":
        assert meta["ss_network_module"] == "networks.lora_flux"
        assert args["train_blocks"] == "single" and args["single_mod_dim"] == "0"
        assert args["train_single_block_indices"] == "0,3"
        assert "modelspec.prediction_type" not in meta
        assert meta["modelspec.implementation"] == lora_io.FLUX_IMPLEMENTATION
    else:
        assert meta["ss_network_module"] == "networks.lora_sd3"
    assert "ss_v2" not in meta


def test_model_type() -> None:
    from nyx_tui.trainers.native.flow_names import sd3_model_type

    assert sd3_model_type({"qk_norm": None, "dual_attention_layers": []}) == "medium"
    assert sd3_model_type({"qk_norm": "rms_norm", "dual_attention_layers": [0, 1]}) == "5-medium"
    assert sd3_model_type({"qk_norm": "rms_norm", "dual_attention_layers": []}) == "5-large"


def test_train_mode_and_groups(dirs: dict[str, Path]) -> None:
    """The transformer (the `unet` root) and CLIP train; T5 stays in eval mode; no parameter is in the
    optimizer twice (the shared downs)."""
    cfg = config(dirs["sd3"], "sd3", train_text_encoder=True)
    model, network = attached(cfg)
    network.train()
    assert model.transformer.training and model.text_encoder.training and model.text_encoder_2.training
    assert not model.text_encoder_3.training
    ids = [id(p) for g in network.param_groups() for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(network.params)
    network.eval()
    assert not model.transformer.training
