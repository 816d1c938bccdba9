"""Every network kind on the tiny SD1.5 and SDXL models: attach, train a few steps with real gradients, save
the kohya file, reload it with what the ecosystem uses (diffusers for LoRA/LoCon, diffusers' kohya converter
and LyCORIS for DoRA, LyCORIS for LoHa/LoKr) and get the trained model's outputs back. Plus text-encoder
adapters, block-wise ranks and learning rates, sd-scripts' block numbering, the config rules, and one run
through the engine.

Tolerances: a file saved in fp32 reproduces the outputs to 1e-4 (measured ~1e-6, float summation order);
saved in fp16 to 2e-3 (measured ~2e-4 on outputs of magnitude ~1). Every comparison also checks that the
training moved the outputs by much more than the tolerance, so a file that loads nothing fails.

The optimizer is a parameter (`OPTIMIZERS`) so the kind × optimizer matrix can grow.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

import nyx_tui.config
from nyx_tui.config.fields import Family
from nyx_tui.config.model import TrainingConfig

torch = pytest.importorskip("torch")

PRESET = Path(nyx_tui.config.__file__).parent / "presets" / "demo-tiny-cpu.toml"
# each kind with four optimizers of different kinds: Adam, sign-based, schedule-free (its averaged weights are
# what is saved and probed: train/eval switched) and Prodigy (finds its own step size from lr = 1.0)
OPTIMIZERS = ["adamw", "lion", "adamw_schedulefree", "prodigy"]
OPTIMIZER_LR = {"prodigy": 1.0}
OPTIMIZER_ARGS = {"prodigy": {"d0": 3e-3}}  # extra optimizer args: a larger first step, so 3 steps move the outputs
KINDS = ["lora", "dora", "locon", "loha", "lokr"]
DIM, ALPHA, LR = 4, 2.0, 1e-2  # alpha != dim: a wrong alpha in the file changes the outputs
TOL = {"fp32": 1e-4, "fp16": 2e-3}
CAPTIONS = ["a red circle", "a blue square"]


# ----------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from nyx_tui.demo_assets import build_tiny_sd15

    return build_tiny_sd15(tmp_path_factory.mktemp("nets") / "sd15")


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from nyx_tui.demo_assets import build_tiny_sdxl

    return build_tiny_sdxl(tmp_path_factory.mktemp("nets") / "sdxl")


def config(model_dir: Path, optimizer: str = "adamw", family: str = "sd15", **network: Any) -> TrainingConfig:
    return TrainingConfig.model_validate(
        {
            "model": {"family": family, "pretrained": str(model_dir)},
            "network": {"dim": DIM, "alpha": ALPHA, **network},
            "optimizer": {
                "type": optimizer,
                "learning_rate": OPTIMIZER_LR.get(optimizer, LR),
                "args": OPTIMIZER_ARGS.get(optimizer, {}),
            },
        }
    )


def attached(cfg: TrainingConfig) -> tuple[Any, Any]:
    from nyx_tui.trainers.native import models, networks

    model = models.load_model(cfg.model)
    models.freeze(model)
    torch.manual_seed(0)
    return model, networks.attach(model, cfg)


def train_steps(model: Any, network: Any, cfg: TrainingConfig, steps: int = 3) -> None:
    """A few real optimizer steps on the denoising loss (random latents: the weights only need to move)."""
    import torch.nn.functional as F

    from nyx_tui.trainers.native import models, optim

    optimizer = optim.build_optimizer(cfg.optimizer, network.param_groups())
    network.train()
    gen = torch.Generator().manual_seed(1)
    device = torch.device("cpu")
    for _ in range(steps):
        latents = torch.randn(2, 4, 8, 8, generator=gen)
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, 1000, (2,), generator=gen)
        cond = models.encode_text(model, CAPTIONS, device)
        noisy = model.noise_scheduler.add_noise(latents, noise, t)
        loss = F.mse_loss(models.predict(model, model.unet, noisy, t, cond, {}), noise)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    optim.eval_mode(optimizer)
    network.eval()


def probe(parts: Any) -> tuple[Any, list[Any]]:
    """The UNet's output and each text encoder's last hidden state on fixed inputs. `parts`: our loaded model
    or a diffusers pipeline (both have unet, text_encoder(_2), tokenizer)."""
    unet, cfg = parts.unet, parts.unet.config
    gen = torch.Generator().manual_seed(7)
    x, h = torch.randn(1, 4, 8, 8, generator=gen), torch.randn(1, 77, cfg.cross_attention_dim, generator=gen)
    extra: dict[str, Any] = {}
    if cfg.addition_embed_type == "text_time":  # SDXL: pooled text and the six size/crop numbers
        pooled = torch.randn(
            1, cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim, generator=gen
        )
        extra["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
    ids = parts.tokenizer(["a green star"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    encoders = [e for e in (parts.text_encoder, getattr(parts, "text_encoder_2", None)) if e is not None]
    with torch.no_grad():
        return unet(x, torch.tensor([500]), h, **extra).sample, [e(ids).last_hidden_state for e in encoders]


def fresh_pipe(model_dir: Path) -> Any:
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save(network: Any, path: Path, precision: str) -> dict[str, Any]:
    import safetensors.torch

    from nyx_tui.trainers.native import lora_io

    dtype = {"fp32": torch.float32, "fp16": torch.float16}[precision]
    lora_io.save_lora(path, network.kohya_state_dict(dtype), {"ss_network_module": "test"})
    return safetensors.torch.load_file(path)


def kohya_names(network: Any) -> dict[str, Any]:
    """kohya module name in the file → the planned module (`to_kohya_keys` maps the names only)."""
    from nyx_tui.trainers.native import lora_io

    unet_config = network.model.unet.config
    names = lora_io.to_kohya_keys(network.cfg.model.family, {f"{a.name}.x": a for a in network.adapted}, unet_config)
    return {key.rsplit(".", 1)[0]: a for key, a in names.items()}


def diffusers_unet_names(weights: dict[str, Any], network: Any) -> dict[str, Any]:
    """The file's keys with the UNet's SGM module names (SDXL) turned back into diffusers paths, for loaders
    that look modules up by the diffusers model's own paths (LyCORIS' `create_lycoris_from_weights`)."""
    back = {name: a.name for name, a in kohya_names(network).items()}
    return {back.get(k.split(".")[0], k.split(".")[0]) + "." + k.split(".", 1)[1]: v for k, v in weights.items()}


def load_with_lycoris(pipe: Any, weights: dict[str, Any]) -> None:
    """LyCORIS' own loader (`create_lycoris_from_weights`) on the UNet and the text encoders. Its module names
    come from a class-wide prefix (set here, restored after); transformers 5's CLIPTextModel has no
    `text_model` level (CLIPTextModelWithProjection has), so then the encoder's prefix carries it."""
    from lycoris import LycorisNetwork, create_lycoris_from_weights

    encoders = [e for e in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if e is not None]
    parts = [("lora_unet", pipe.unet)]
    for i, encoder in enumerate(encoders):
        prefix = "lora_te" if len(encoders) == 1 else f"lora_te{i + 1}"
        has_level = any(n.startswith("text_model.") for n, _ in encoder.named_modules())
        parts.append((prefix if has_level else f"{prefix}_text_model", encoder))
    try:
        for prefix, module in parts:
            LycorisNetwork.apply_preset({"lora_prefix": prefix})
            part = {k: v.float() for k, v in weights.items() if k.startswith(prefix + "_")}
            net, _ = create_lycoris_from_weights(1.0, "", module, weights_sd=part)
            assert len(net.loras) == len({k.split(".")[0] for k in part}), f"LyCORIS skipped {prefix} modules"
            net.apply_to()
            net.eval()
    finally:
        LycorisNetwork.apply_preset({"lora_prefix": "lycoris"})


def load_dora_with_diffusers(pipe: Any, weights: dict[str, Any]) -> None:
    """diffusers 0.42's `load_lora_weights` drops `dora_scale` keys for SD/SDXL (it warns so); its own kohya
    converter (after its SGM → diffusers block mapping) maps them to peft's magnitude, which
    `load_lora_adapter` takes once in peft's layout."""
    from diffusers.loaders.lora_conversion_utils import (
        _convert_non_diffusers_lora_to_diffusers,
        _maybe_map_sgm_blocks_to_diffusers,
    )

    unet_keys = {k: v.float() for k, v in weights.items() if k.startswith("lora_unet_")}
    state, alphas = _convert_non_diffusers_lora_to_diffusers(
        _maybe_map_sgm_blocks_to_diffusers(unet_keys, pipe.unet.config)
    )
    for key in [k for k in state if "lora_magnitude_vector" in k]:  # (out, 1) → (out,); (out, 1, 1, 1) → (1, out, 1, 1)
        state[key] = state[key].reshape(-1) if state[key].dim() == 2 else state[key].reshape(1, -1, 1, 1)
    pipe.unet.load_lora_adapter(state, prefix="unet", network_alphas=alphas)


def assert_close(got: Any, want: Any, base: Any, tol: float, what: str) -> None:
    moved = (want - base).abs().max().item()
    assert moved > 10 * tol, f"{what}: training moved the output by only {moved:.2e}"
    diff = (got - want).abs().max().item()
    assert diff <= tol, f"{what}: the reloaded output is {diff:.2e} off the trained one (tolerance {tol})"


# ----------------------------------------------------------------------------------------- round trips

LOADERS = {
    "lora": ["diffusers", "lycoris"],
    "locon": ["diffusers", "lycoris"],
    "dora": ["diffusers-converter", "lycoris"],
    "loha": ["lycoris"],
    "lokr": ["lycoris"],
}


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_kind_trains_saves_and_reloads(
    request: pytest.FixtureRequest, tmp_path: Path, family: str, kind: str, optimizer: str
) -> None:
    """UNet (attention layers and, at conv_dim 2 / conv_alpha 1, the ResNet convolutions) and text encoder(s);
    saved in fp32 and in fp16, each reloaded by every loader that takes the kind."""
    model_dir: Path = request.getfixturevalue("model_dir" if family == "sd15" else "sdxl_dir")
    cfg = config(model_dir, optimizer, family, kind=kind, train_text_encoder=True, conv_dim=2, conv_alpha=1.0)
    model, network = attached(cfg)
    base_unet, base_te = probe(model)
    train_steps(model, network, cfg)
    want_unet, want_te = probe(model)
    files = {p: tmp_path / f"{kind}-{p}.safetensors" for p in ("fp32", "fp16")}
    weights = {p: save(network, path, p) for p, path in files.items()}
    sd = weights["fp32"]
    assert {v.dtype for v in weights["fp16"].values()} == {torch.float16}

    # sd-scripts' names: every planned module is in the file under its kohya name, nothing else is
    names = kohya_names(network)
    assert {k.split(".")[0] for k in sd} == set(names)
    te_prefixes = {"lora_te_"} if family == "sd15" else {"lora_te1_", "lora_te2_"}
    assert {n.split("text_model")[0] for n in names if n.startswith("lora_te")} == te_prefixes
    if family == "sdxl":  # SGM names, as sd-scripts writes SDXL
        assert all(
            n.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_"))
            for n in names
            if n.startswith("lora_unet_")
        )
    assert any(a.conv for a in names.values()), "LoRA + conv_dim = LoCon: the ResNet convolutions too"
    # every alpha is the real one, never the rank: conv_alpha on convolutions, alpha elsewhere (LyCORIS' LoKr
    # writes alpha = rank, a scale of 1, for modules it keeps as full matrices: the tiny models' narrow layers)
    for name, a in names.items():
        assert float(sd[f"{name}.alpha"]) in ((a.alpha, a.dim) if kind == "lokr" else (a.alpha,)), name
        assert a.alpha == (1.0 if a.conv else ALPHA)
    if kind == "dora":  # LyCORIS' layout (wd_on_out): one magnitude per output channel, as (out, 1[, 1, 1])
        for name in names:
            scale, up = sd[f"{name}.dora_scale"], sd[f"{name}.lora_up.weight"]
            assert tuple(scale.shape) == (up.shape[0], *[1] * (up.dim() - 1)), name

    loaders = LOADERS[kind]
    for precision, loader in [("fp32", name) for name in loaders] + [("fp16", loaders[0])]:
        pipe = fresh_pipe(model_dir)
        if loader == "diffusers":
            pipe.load_lora_weights(str(files[precision]))
        elif loader == "diffusers-converter":
            load_dora_with_diffusers(pipe, weights[precision])
        else:
            load_with_lycoris(pipe, diffusers_unet_names(weights[precision], network))
        got_unet, got_te = probe(pipe)
        what = f"{family} {kind} saved in {precision}, loaded by {loader}"
        assert_close(got_unet, want_unet, base_unet, TOL[precision], f"{what}: UNet")
        if loader != "diffusers-converter":  # that path loads the UNet part only
            for i, (got, want, base) in enumerate(zip(got_te, want_te, base_te, strict=True)):
                assert_close(got, want, base, TOL[precision], f"{what}: text encoder {i + 1}")


# ----------------------------------------------------------------------------------------- text encoders, modes


def test_text_encoders_train_only_when_asked(model_dir: Path) -> None:
    model, network = attached(config(model_dir))
    network.train()
    assert model.unet.training and not model.text_encoder.training and not model.vae.training
    assert not network.trains_text_encoder and network.checkpoint_objects() == []
    assert not any(p.requires_grad for p in model.text_encoder.parameters())

    model, network = attached(config(model_dir, kind="loha", train_text_encoder=True, train_unet=False))
    network.train()
    assert model.text_encoder.training and not model.unet.training, "TE-only: the UNet has no adapter"
    assert {a.root for a in network.adapted} == {"text_encoder"}
    (weights,) = network.checkpoint_objects()
    state = weights.state_dict()
    assert state and all(k.startswith("lora_te_text_model_encoder_layers_") for k in state)
    zeroed = {k: torch.zeros_like(v) for k, v in state.items()}
    weights.load_state_dict(zeroed)
    assert all(float(p.detach().abs().sum()) == 0 for p in network.text_encoder_params())


@pytest.mark.parametrize("dropouts", [{"dropout": 0.5}, {"rank_dropout": 0.5}, {"module_dropout": 0.5}])
def test_lycoris_dropouts_act_in_training_only(model_dir: Path, dropouts: dict[str, float]) -> None:
    model, network = attached(config(model_dir, kind="locon", **dropouts))
    with torch.no_grad():
        for a in network.adapted:  # the up matrices start at zero: give the adapters an effect
            a.named["lora_up.weight"].normal_(0, 0.5)
    torch.manual_seed(3)
    network.train()
    runs = [probe(model)[0] for _ in range(2)]
    assert (runs[0] - runs[1]).abs().max() > 1e-4, f"{dropouts} changes nothing in training"
    network.eval()
    runs = [probe(model)[0] for _ in range(2)]
    assert torch.equal(runs[0], runs[1])


def test_text_encoder_lr_is_its_own_param_group(model_dir: Path) -> None:
    from nyx_tui.trainers.native import optim

    cfg = config(model_dir, kind="dora", train_text_encoder=True, text_encoder_lr=5e-5)
    _, network = attached(cfg)
    groups = network.param_groups()
    assert [(g["name"], g["lr"]) for g in groups] == [("unet", LR), ("text_encoder", 5e-5)]
    te_ids = {id(p) for p in network.text_encoder_params()}
    assert {id(p) for p in groups[1]["params"]} == te_ids
    assert sum(len(g["params"]) for g in groups) == len(network.params)
    optimizer = optim.build_optimizer(cfg.optimizer, groups)
    assert [g["lr"] for g in optimizer.param_groups] == [LR, 5e-5]


# ----------------------------------------------------------------------------------------- block-wise


def blocks(**values: float) -> list[float]:
    """25 SD1.5 block values: `b<N>=v` overrides, the rest 1."""
    out = [1.0] * 25
    for key, v in values.items():
        out[int(key[1:])] = v
    return out


@pytest.mark.parametrize("kind", ["lora", "locon"])
def test_block_dims_and_alphas_shape_the_file(model_dir: Path, kind: str) -> None:
    # the tiny UNet: attentions in blocks 1 (down 0), 12 (mid), 16 and 17 (up 1); convs in 1, 3, 4, 12-17
    dims = [int(d) for d in blocks(b1=2, b12=6, b16=0, b17=3)]
    dims = [DIM if d == 1 else d for d in dims]
    alphas = blocks(b1=0.5, b12=3.0)
    conv_dims = [int(d) for d in blocks(b1=5, b15=0)]
    cfg = config(model_dir, kind=kind, block_dims=dims, block_alphas=alphas, conv_block_dims=conv_dims)
    _, network = attached(cfg)
    sd = network.kohya_state_dict(torch.float32)

    def rank(module: str) -> int:
        return int(sd[f"lora_unet_{module}.lora_down.weight"].shape[0])

    attn = "attentions_0_transformer_blocks_0_attn1_to_q"
    assert rank(f"down_blocks_0_{attn}") == 2 and float(sd[f"lora_unet_down_blocks_0_{attn}.alpha"]) == 0.5
    assert rank(f"mid_block_{attn}") == 6 and float(sd[f"lora_unet_mid_block_{attn}.alpha"]) == 3.0
    assert rank("up_blocks_1_attentions_1_transformer_blocks_0_attn1_to_q") == 3
    assert not any(k.startswith("lora_unet_up_blocks_1_attentions_0_") for k in sd), "block 16 has rank 0"
    assert rank("down_blocks_0_resnets_0_conv1") == 5  # conv_block_dims, block 1
    assert rank("mid_block_resnets_0_conv1") == 1  # conv_block_dims default 1 here
    assert not any(k.startswith("lora_unet_up_blocks_0_upsamplers_0_") for k in sd), "block 15's convs: 0"
    assert rank("up_blocks_0_resnets_0_conv1") == 1  # block 13


def test_block_lr_weights_become_param_groups(model_dir: Path) -> None:
    from nyx_tui.trainers.native import lora_io

    weights = blocks(b1=0.5, b12=2.0, b17=0.0)
    cfg = config(model_dir, block_lr_weights=weights, train_text_encoder=True)
    _, network = attached(cfg)
    groups = {g["lr"]: g for g in network.param_groups()}
    assert sorted(groups) == sorted({LR * 0.5, LR * 2.0, LR})
    assert groups[LR * 0.5]["name"] == "unet blocks 1"
    assert groups[LR * 2.0]["name"] == "unet blocks 12"
    assert groups[LR]["name"] == "unet blocks 16 + text_encoder"
    by_param = {id(p): a for a in network.adapted for p in a.params}
    assert {by_param[id(p)].block for p in groups[LR * 0.5]["params"]} == {1}
    assert {by_param[id(p)].block for p in groups[LR * 2.0]["params"]} == {12}
    sd = network.kohya_state_dict(torch.float32)
    assert not any(k.startswith("lora_unet_up_blocks_1_attentions_1_") for k in sd), "lr weight 0: no module"
    module, args = lora_io.network_module_args(cfg)
    assert module == "networks.lora"
    assert args["down_lr_weight"].split(",")[:2] == ["1", "0.5"] and args["mid_lr_weight"] == "2"
    assert len(args["up_lr_weight"].split(",")) == 12


@pytest.mark.parametrize(
    ("family", "path", "block"),
    [
        # sd-scripts' get_block_index on SD1.5's diffusers names: 1 + 3i + j, samplers at 3i + 2, mid 12
        (Family.SD15, "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", 1),
        (Family.SD15, "down_blocks.0.resnets.1.conv1", 2),
        (Family.SD15, "down_blocks.0.downsamplers.0.conv", 3),
        (Family.SD15, "down_blocks.3.resnets.1.conv2", 11),
        (Family.SD15, "mid_block.attentions.0.proj_in", 12),
        (Family.SD15, "up_blocks.0.resnets.2.conv1", 15),
        (Family.SD15, "up_blocks.0.upsamplers.0.conv", 15),
        (Family.SD15, "up_blocks.3.attentions.2.proj_out", 24),
        (Family.SD15, "conv_in", None),
        (Family.SD15, "time_embedding.linear_1", None),
        # SDXL: the SGM blocks — input_blocks.n (n = 3i + j + 1) is block n + 1, middle_block 10-12, output 13+
        (Family.SDXL, "time_embedding.linear_1", 0),
        (Family.SDXL, "add_embedding.linear_2", 0),
        (Family.SDXL, "conv_in", 1),
        (Family.SDXL, "down_blocks.0.resnets.0.conv1", 2),
        (Family.SDXL, "down_blocks.0.downsamplers.0.conv", 4),
        (Family.SDXL, "down_blocks.1.attentions.0.proj_in", 5),
        (Family.SDXL, "down_blocks.2.attentions.1.proj_out", 9),
        (Family.SDXL, "mid_block.resnets.0.conv1", 10),
        (Family.SDXL, "mid_block.attentions.0.transformer_blocks.9.ff.net.2", 11),
        (Family.SDXL, "mid_block.resnets.1.time_emb_proj", 12),
        (Family.SDXL, "up_blocks.0.attentions.2.proj_in", 15),
        (Family.SDXL, "up_blocks.1.upsamplers.0.conv", 18),
        (Family.SDXL, "up_blocks.2.resnets.2.conv2", 21),
        (Family.SDXL, "conv_out", 22),
    ],
)
def test_unet_block_numbering_is_sd_scripts(family: Family, path: str, block: int | None) -> None:
    from nyx_tui.trainers.native.networks import unet_block

    assert unet_block(family, path) == block


def tiny_sdxl_parts() -> Any:
    """An SDXL-shaped UNet (two resnets a down block, three an up block, text_time conditioning) and two
    CLIP encoders (NOTES' recipe), as the model object `networks.plan` reads."""
    from types import SimpleNamespace

    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(32, 64),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=8,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32,
    )
    te = CLIPTextConfig(
        vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4
    )
    return SimpleNamespace(unet=unet, text_encoder=CLIPTextModel(te), text_encoder_2=CLIPTextModelWithProjection(te))


def test_sdxl_blocks_and_two_text_encoders() -> None:
    """SDXL's 23-block numbering on a diffusers SDXL UNet, and `lora_te1_`/`lora_te2_` for its encoders (the
    UNet's names here are the diffusers paths; `lora_io.to_kohya_keys`, where it exists, makes them SGM)."""
    from nyx_tui.trainers.native import networks

    dims = [DIM] * 23
    dims[5], dims[11], dims[14] = 2, 6, 0  # down_blocks.1.attentions.0, mid attention, up_blocks.0.attentions.1
    data = {"model": {"family": "sdxl"}, "network": {"dim": DIM, "alpha": ALPHA, "block_dims": dims}}
    cfg = TrainingConfig.model_validate({**data, "network": {**data["network"], "train_text_encoder": True}})
    model = tiny_sdxl_parts()
    adapted = networks.plan(model, cfg)
    unet = {a.path.rsplit(".transformer_blocks", 1)[0]: (a.block, a.dim) for a in adapted if a.root == "unet"}
    assert unet == {
        "down_blocks.1.attentions.0": (5, 2),
        "down_blocks.1.attentions.1": (6, DIM),
        "mid_block.attentions.0": (11, 6),
        "up_blocks.0.attentions.0": (13, DIM),
        "up_blocks.0.attentions.2": (15, DIM),
    }
    te_names = [a.name for a in adapted if a.root != "unet"]
    assert {n[: len("lora_te1_text_model_")] for n in te_names} == {"lora_te1_text_model_", "lora_te2_text_model_"}
    assert len(te_names) == 2 * 6  # one layer each: q, k, v, out, fc1, fc2


# ----------------------------------------------------------------------------------------- config rules


@pytest.mark.parametrize(("family", "count"), [("sd15", 25), ("sd2", 25), ("sdxl", 23)])
def test_block_lists_must_have_one_number_per_block(family: str, count: int) -> None:
    for field in ("block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas", "block_lr_weights"):
        value: list[float] = [1] * count
        TrainingConfig.model_validate({"model": {"family": family}, "network": {field: value}})
        with pytest.raises(ValueError, match=rf"network\.{field} has {count + 1} numbers.*give {count} numbers"):
            TrainingConfig.model_validate({"model": {"family": family}, "network": {field: [1] * (count + 1)}})
    with pytest.raises(ValueError, match="for the UNet families"):
        TrainingConfig.model_validate({"model": {"family": "flux"}, "network": {"block_dims": [4] * 23}})
    with pytest.raises(ValueError, match="between 0"):
        TrainingConfig.model_validate({"model": {"family": family}, "network": {"block_dims": [-1] * count}})


def test_native_backend_takes_every_kind_and_refuses_what_peft_lacks() -> None:
    from nyx_tui.trainers.base import NativeTrainer

    def fields(**network: Any) -> set[str]:
        cfg = TrainingConfig.model_validate({"network": network})
        return {p.field for p in NativeTrainer().problems(cfg) if p.is_error and p.field.startswith("network.")}

    for kind in KINDS:
        assert fields(kind=kind, train_text_encoder=True) == set()
    assert fields(kind="lora", rank_dropout=0.1) == {"network.rank_dropout"}
    assert fields(kind="dora", module_dropout=0.1) == {"network.module_dropout"}
    assert fields(kind="locon", rank_dropout=0.1, module_dropout=0.1) == set()
    assert fields(train_unet=False, train_text_encoder=True) == set()


def test_metadata_names_the_network_like_sd_scripts(model_dir: Path) -> None:
    from nyx_tui.trainers.native import lora_io

    assert lora_io.network_module_args(config(model_dir)) == ("networks.lora", {})
    module, args = lora_io.network_module_args(config(model_dir, conv_dim=8, conv_alpha=4))
    assert (module, args) == ("networks.lora", {"conv_dim": "8", "conv_alpha": "4"})
    module, args = lora_io.network_module_args(config(model_dir, kind="lokr", lokr_factor=8, rank_dropout=0.1))
    assert module == "lycoris.kohya"
    assert args["algo"] == "lokr" and args["factor"] == "8" and args["rank_dropout"] == "0.1"
    assert args["conv_dim"] == str(DIM), "LyCORIS kinds adapt convolutions at dim by default"
    module, args = lora_io.network_module_args(config(model_dir, kind="dora"))
    assert (module, args["algo"], args["dora_wd"]) == ("lycoris.kohya", "lora", "True")


# ----------------------------------------------------------------------------------------- through the engine


@pytest.mark.slow
def test_engine_trains_text_encoder_with_its_lr_and_keeps_it_in_the_state(model_dir: Path, tmp_path: Path) -> None:
    """The real loop: LoCon on UNet and text encoder, block lr weights, a text-encoder lr. The step events
    carry the param groups' rates, the file the trained text-encoder weights, the metadata the network, and
    the training state the text-encoder adapters (they are not inside the saved UNet)."""
    from safetensors.torch import load_file

    from nyx_tui.config.io import dumps_config
    from nyx_tui.demo_assets import make_shapes_dataset
    from nyx_tui.jobs.events import read_events
    from nyx_tui.jobs.jobdir import create_job
    from nyx_tui.trainers.native import lora_io

    data = tomllib.loads(PRESET.read_text())
    data["model"]["pretrained"] = str(model_dir)
    data["dataset"]["subsets"] = [{"image_dir": str(make_shapes_dataset(tmp_path / "data", n=4))}]
    data["scheduler"] = {"type": "constant", "warmup_steps": 0}
    data["training"].update(max_steps=4, batch_size=2)
    data["saving"].update(every_n_steps=0, save_state=True)
    data["network"] = {
        "kind": "locon",
        "dim": DIM,
        "alpha": ALPHA,
        "conv_dim": 2,
        "train_text_encoder": True,
        "text_encoder_lr": 1e-3,
        "block_lr_weights": blocks(b12=0.5),
    }
    cfg = TrainingConfig.model_validate(data)
    job = create_job("train", "t", ["native"], config_toml=dumps_config(cfg), root=tmp_path / "jobs")
    proc = subprocess.run(
        [sys.executable, "-m", "nyx_tui.trainers.native", str(job.path)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]

    events = read_events(job.events_path)
    steps = [e for e in events if e["kind"] == "step"]
    lr = cfg.optimizer.learning_rate
    assert sorted(steps[0]["lr"]) == sorted([lr, lr * 0.5, 1e-3])
    (lora_path,) = [Path(e["path"]) for e in events if e["kind"] == "artifact" and e["what"] == "lora"]
    weights = load_file(lora_path)
    te_up = [v for k, v in weights.items() if k.startswith("lora_te_") and k.endswith("lora_up.weight")]
    assert te_up and all(float(v.abs().max()) > 0 for v in te_up), "the text-encoder adapters trained"
    assert any(k.startswith("lora_unet_") and "_resnets_0_conv1." in k for k in weights)

    meta = lora_io.read_metadata(lora_path)
    assert meta["ss_network_module"] == "lycoris.kohya"
    assert json.loads(meta["ss_network_args"])["algo"] == "locon"
    assert json.loads(meta["ss_network_args"])["conv_dim"] == "2"
    assert meta["ss_network_train_unet_only"] == "False"
    assert float(meta["ss_text_encoder_lr"]) == 1e-3

    (state_dir,) = [Path(e["path"]) for e in events if e["kind"] == "artifact" and e["what"] == "state"]
    saved = {}
    for pkl in state_dir.glob("custom_checkpoint_*.pkl"):
        obj = torch.load(pkl, weights_only=False)
        if isinstance(obj, dict) and any(str(k).startswith("lora_te_") for k in obj):
            saved = obj
    te_keys = {k for k in weights if k.startswith("lora_te_") and not k.endswith(".alpha")}
    assert set(saved) == te_keys
    assert all(torch.equal(saved[k].to(weights[k].dtype), weights[k]) for k in te_keys)  # file: save precision


@pytest.mark.slow
def test_two_processes_keep_text_encoder_adapters_identical(model_dir: Path, tmp_path: Path) -> None:
    """`accelerate launch` with two CPU processes (gloo), LoHa on the UNet and the text encoder: the text
    encoders are not DDP-wrapped, so their gradients are averaged by the network; without that the ranks'
    text-encoder weights drift apart (checked by hand: the engine then logs DIFFERENT)."""
    from nyx_tui.config.io import dumps_config
    from nyx_tui.demo_assets import make_shapes_dataset
    from nyx_tui.jobs.events import read_events
    from nyx_tui.jobs.jobdir import create_job
    from nyx_tui.trainers.base import NativeTrainer

    data = tomllib.loads(PRESET.read_text())
    data["model"]["pretrained"] = str(model_dir)
    data["dataset"]["subsets"] = [{"image_dir": str(make_shapes_dataset(tmp_path / "data", n=4))}]
    data["scheduler"] = {"type": "constant", "warmup_steps": 0}
    data["training"].update(max_steps=3, batch_size=1, num_processes=2)
    data["saving"].update(every_n_steps=0, save_state=False)
    data["network"] = {"kind": "loha", "dim": DIM, "alpha": ALPHA, "train_text_encoder": True, "text_encoder_lr": LR}
    cfg = TrainingConfig.model_validate(data)
    job = create_job("train", "t", ["native"], config_toml=dumps_config(cfg), root=tmp_path / "jobs")
    proc = subprocess.run(NativeTrainer().argv(cfg), cwd=job.path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    logs = [e["message"] for e in read_events(job.events_path) if e["kind"] == "log"]
    assert "the trained weights are identical on the 2 processes" in logs
