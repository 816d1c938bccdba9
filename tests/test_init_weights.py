"""`network.weights`: a network starts from a LoRA file's weights (sd-scripts' `--network_weights`).

Round trips on the tiny SD1.5 and SDXL models, every kind, UNet (attention and, at conv_dim 2 / conv_alpha 1,
the ResNet convolutions) and text encoder(s): train a few steps, save the kohya file, attach a fresh
network, load the file into it (`init_weights.load_into`) and get the trained model's outputs back. The
pre-flight (`init_check.weights_problems`, torch-free) passes those files with their own config and names
each way a file can be wrong for a config: missing, not a LoRA, another family, another kind, rank, alpha,
convolutions, text encoder, target modules, a layout Nyx does not train. The engine's loader refuses what
does not fit with one error and warns about modules on one side only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from nyx_tui.config.errors import Problem
from nyx_tui.config.model import TrainingConfig

torch = pytest.importorskip("torch")

KINDS = ["lora", "dora", "locon", "loha", "lokr"]
DIM, ALPHA, LR = 4, 2.0, 1e-2  # alpha != dim: a wrongly scaled load changes the outputs
CONV = {"conv_dim": 2, "conv_alpha": 1.0}
TOL = 1e-5
CAPTIONS = ["a red circle", "a blue square"]


# ----------------------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def sd15_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from nyx_tui.demo_assets import build_tiny_sd15

    return build_tiny_sd15(tmp_path_factory.mktemp("init") / "sd15")


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from nyx_tui.demo_assets import build_tiny_sdxl

    return build_tiny_sdxl(tmp_path_factory.mktemp("init") / "sdxl")


def config(model_dir: Path, family: str = "sd15", **network: Any) -> TrainingConfig:
    return TrainingConfig.model_validate(
        {
            "model": {"family": family, "pretrained": str(model_dir)},
            "network": {"dim": DIM, "alpha": ALPHA, **network},
            "optimizer": {"type": "adamw", "learning_rate": LR},
        }
    )


def attached(cfg: TrainingConfig, seed: int = 0) -> tuple[Any, Any]:
    from nyx_tui.trainers.native import models, networks

    model = models.load_model(cfg.model)
    models.freeze(model)
    torch.manual_seed(seed)
    return model, networks.attach(model, cfg)


def train_steps(model: Any, network: Any, cfg: TrainingConfig, steps: int = 3) -> None:
    """A few real optimizer steps on the denoising loss (random latents: the weights only need to move)."""
    import torch.nn.functional as F

    from nyx_tui.trainers.native import models, optim

    optimizer = optim.build_optimizer(cfg.optimizer, network.param_groups())
    network.train()
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        latents = torch.randn(2, 4, 8, 8, generator=gen)
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, 1000, (2,), generator=gen)
        cond = models.encode_text(model, CAPTIONS, torch.device("cpu"))
        noisy = model.noise_scheduler.add_noise(latents, noise, t)
        loss = F.mse_loss(models.predict(model, model.unet, noisy, t, cond, {}), noise)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    network.eval()


def probe(model: Any) -> list[Any]:
    """The UNet's output and each text encoder's last hidden state on fixed inputs."""
    unet, cfg = model.unet, model.unet.config
    gen = torch.Generator().manual_seed(7)
    x, h = torch.randn(1, 4, 8, 8, generator=gen), torch.randn(1, 77, cfg.cross_attention_dim, generator=gen)
    extra: dict[str, Any] = {}
    if cfg.addition_embed_type == "text_time":  # SDXL: pooled text and the six size/crop numbers
        pooled = torch.randn(
            1, cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim, generator=gen
        )
        extra["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
    ids = model.tokenizer(["a green star"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    encoders = [e for e in (model.text_encoder, getattr(model, "text_encoder_2", None)) if e is not None]
    with torch.no_grad():
        return [unet(x, torch.tensor([500]), h, **extra).sample, *[e(ids).last_hidden_state for e in encoders]]


def save(network: Any, path: Path, metadata: dict[str, str] | None = None) -> Path:
    from nyx_tui.trainers.native import lora_io

    return lora_io.save_lora(path, network.kohya_state_dict(torch.float32), metadata or {"ss_network_module": "t"})


def problems(cfg: TrainingConfig) -> list[Problem]:
    from nyx_tui.trainers.native.init_check import weights_problems

    return weights_problems(cfg)


def only(found: list[Problem], field: str, *words: str, severity: str = "error") -> Problem:
    """The one problem of `found`, on `field`, whose message and fix say `words`."""
    assert len(found) == 1, "\n".join(map(str, found))
    (problem,) = found
    assert (problem.field, problem.severity) == (field, severity), str(problem)
    text = f"{problem.message} fix: {problem.fix}"
    for word in words:
        assert word in text, f"{word!r} not in: {text}"
    return problem


def trained_file(model_dir: Path, family: str, kind: str, path: Path, **network: Any) -> tuple[Path, list[Any]]:
    """A LoRA trained a few steps and saved to `path`, and the trained model's probe outputs."""
    cfg = config(model_dir, family, kind=kind, **network)
    model, network_ = attached(cfg)
    train_steps(model, network_, cfg)
    return save(network_, path), probe(model)


@pytest.fixture(scope="module")
def sd15_lora(sd15_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A trained SD1.5 LoRA: attention + convolutions (conv_dim 2, conv_alpha 1) + text encoder."""
    path = tmp_path_factory.mktemp("files") / "sd15-lora.safetensors"
    return trained_file(sd15_dir, "sd15", "lora", path, train_text_encoder=True, **CONV)[0]


# ----------------------------------------------------------------------------------------- round trips


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_network_starts_from_the_file(request: pytest.FixtureRequest, tmp_path: Path, family: str, kind: str) -> None:
    from nyx_tui.trainers.native import init_weights

    model_dir: Path = request.getfixturevalue(f"{family}_dir")
    network_args: dict[str, Any] = {"train_text_encoder": True, **CONV}
    path, want = trained_file(model_dir, family, kind, tmp_path / f"{kind}.safetensors", **network_args)
    cfg = config(model_dir, family, kind=kind, weights=str(path), **network_args)
    assert problems(cfg) == [], "the pre-flight passes a file with the config it was trained with"

    model, network = attached(cfg, seed=5)  # another init: only the file can give the trained outputs
    base = probe(model)
    lines = init_weights.load_into(network, path)
    n = len(network.adapted)
    assert lines == [(f"the adapter starts from {path}: {n} of {n} modules loaded", "info")]
    assert any(a.conv for a in network.adapted) and any(a.root != "unet" for a in network.adapted)
    got = probe(model)
    for i, (g, w, b) in enumerate(zip(got, want, base, strict=True)):
        what = "UNet" if i == 0 else f"text encoder {i}"
        assert (w - b).abs().max() > 100 * TOL, f"{what}: training moved nothing"
        assert (g - w).abs().max() <= TOL, f"{family} {kind} {what}: {(g - w).abs().max():.2e} off the trained output"


@pytest.mark.slow
def test_sdxl_file_in_diffusers_names_loads_too(sdxl_dir: Path, tmp_path: Path) -> None:
    """SDXL's UNet modules spelled the diffusers way (`lora_unet_down_blocks_…`), as some tools write them."""
    import safetensors.torch

    from nyx_tui.trainers.native import init_weights

    cfg = config(sdxl_dir, "sdxl")
    model, network = attached(cfg)
    train_steps(model, network, cfg)
    want = probe(model)[0]
    state = {f"{a.name}.{suffix}": p.detach().clone() for a in network.adapted for suffix, p in a.named.items()}
    state.update({f"{a.name}.alpha": torch.tensor(a.alpha) for a in network.adapted})
    assert any(k.startswith("lora_unet_down_blocks_") for k in state)
    path = tmp_path / "diffusers-names.safetensors"
    safetensors.torch.save_file(state, path)
    model, network = attached(cfg, seed=5)
    init_weights.load_into(network, path)
    assert (probe(model)[0] - want).abs().max() <= TOL


# ----------------------------------------------------------------------------------------- the engine's loader


def test_loader_refuses_other_shapes_and_alphas(sd15_dir: Path, sd15_lora: Path) -> None:
    from nyx_tui.trainers.native import init_weights

    _, network = attached(config(sd15_dir, dim=8, train_text_encoder=True, **CONV))
    before = [p.detach().clone() for p in network.params]
    with pytest.raises(ValueError, match=r"lora_down\.weight: \(4, 32\) in the file, \(8, 32\) here \(the file's rank"):
        init_weights.load_into(network, sd15_lora)
    assert all(torch.equal(p, b) for p, b in zip(network.params, before, strict=True)), "nothing half-loaded"

    _, network = attached(config(sd15_dir, alpha=4.0, train_text_encoder=True, **CONV))
    with pytest.raises(ValueError, match=r"\.alpha: 2 in the file, 4 here"):
        init_weights.load_into(network, sd15_lora)

    _, network = attached(config(sd15_dir, kind="loha", train_text_encoder=True, **CONV))
    with pytest.raises(ValueError, match=r"a loha module has hada_w1_a.*lacks"):
        init_weights.load_into(network, sd15_lora)


def test_loader_warns_about_modules_on_one_side(sd15_dir: Path, sd15_lora: Path, tmp_path: Path) -> None:
    from nyx_tui.trainers.native import init_weights

    _, network = attached(config(sd15_dir, train_text_encoder=False, **CONV))  # the file also has the encoder's
    info, left_out = init_weights.load_into(network, sd15_lora)
    assert info[1] == "info" and left_out[1] == "warning"
    assert "modules of sd15-lora.safetensors match no module of this network" in left_out[0]
    assert "lora_te_text_model_encoder_layers_0_self_attn" in left_out[0]

    import safetensors.torch

    unet_only = tmp_path / "unet-only.safetensors"
    state = {k: v for k, v in safetensors.torch.load_file(sd15_lora).items() if k.startswith("lora_unet_")}
    safetensors.torch.save_file(state, unet_only)
    _, network = attached(config(sd15_dir, train_text_encoder=True, target_modules=["to_q"], **CONV))
    lines = init_weights.load_into(network, unet_only)
    fresh = [m for m, level in lines if "start fresh" in m]
    assert len(fresh) == 1 and "lora_te_text_model_encoder_layers_0" in fresh[0]
    assert any("match no module" in m and "to_k" in m for m, _ in lines), "to_k etc. are not targeted here"

    other = tmp_path / "nothing.safetensors"
    safetensors.torch.save_file({"lora_unet_nowhere.lora_down.weight": torch.zeros(4, 32)}, other)
    with pytest.raises(ValueError, match=r"none of the 1 modules of nothing\.safetensors"):
        init_weights.load_into(network, other)


# ----------------------------------------------------------------------------------------- the pre-flight


def test_preflight_needs_an_existing_lora_file(sd15_dir: Path, tmp_path: Path) -> None:
    import safetensors.torch

    only(problems(config(sd15_dir, weights=str(tmp_path / "gone.safetensors"))), "network.weights", "not found")
    only(problems(config(sd15_dir, weights=str(tmp_path))), "network.weights", "is a folder")
    pickle = tmp_path / "old.ckpt"
    pickle.write_bytes(b"\x80")
    only(problems(config(sd15_dir, weights=str(pickle))), "network.weights", "not a .safetensors file")

    vae = tmp_path / "vae.safetensors"
    safetensors.torch.save_file(
        {"encoder.conv_in.weight": torch.zeros(8, 3, 3, 3), "decoder.conv_in.weight": torch.zeros(8, 4, 3, 3)}, vae
    )
    only(problems(config(sd15_dir, weights=str(vae))), "network.weights", "is a VAE", "not a LoRA", "model.vae")

    checkpoint = tmp_path / "model.safetensors"
    safetensors.torch.save_file(
        {
            "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3),
            "cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.zeros(768),
        },
        checkpoint,
    )
    only(
        problems(config(sd15_dir, weights=str(checkpoint))),
        "network.weights",
        "is a single-file checkpoint",
        "model.pretrained",
    )
    peft = tmp_path / "peft.safetensors"
    safetensors.torch.save_file({"unet.down_blocks.0.attn1.to_q.lora_A.weight": torch.zeros(4, 32)}, peft)
    only(problems(config(sd15_dir, weights=str(peft))), "network.weights", "not in kohya names")


@pytest.mark.slow
def test_preflight_names_another_family(sd15_dir: Path, sdxl_dir: Path, sd15_lora: Path, tmp_path: Path) -> None:
    sdxl_lora, _ = trained_file(sdxl_dir, "sdxl", "lora", tmp_path / "sdxl.safetensors", train_text_encoder=True)
    only(
        problems(config(sd15_dir, weights=str(sdxl_lora), train_text_encoder=True)),
        "network.weights",
        "this LoRA is for SDXL",
        "the model is SD1.5",
        "use an SD1.5 LoRA",
    )
    only(
        problems(config(sdxl_dir, "sdxl", weights=str(sd15_lora), train_text_encoder=True, **CONV)),
        "network.weights",
        "this LoRA is for SD1.5 or SD2",
        "the model is SDXL",
    )


def test_preflight_names_the_setting_that_differs(sd15_dir: Path, sd15_lora: Path) -> None:
    def check(**network: Any) -> list[Problem]:
        return problems(config(sd15_dir, weights=str(sd15_lora), **{"train_text_encoder": True, **CONV, **network}))

    assert check() == []
    assert check(kind="locon") == [], "LoRA and LoCon files are the same tensors"
    only(check(dim=8), "network.dim", "is 8", "rank 4", "set network.dim = 4")
    only(check(alpha=8.0, conv_alpha=1.0), "network.alpha", "is 8", "alpha 2", "set network.alpha = 2")
    only(check(conv_dim=3), "network.conv_dim", "rank 2", "set network.conv_dim = 2")
    only(check(conv_alpha=2.0), "network.conv_alpha", "alpha 1", "set network.conv_alpha = 1")
    only(check(kind="loha"), "network.kind", "is 'loha'", "a LoRA/LoCon", 'set network.kind = "lora" or "locon"')
    only(check(kind="dora"), "network.kind", 'set network.kind = "lora"')
    only(check(train_text_encoder=False), "network.train_text_encoder", "text-encoder modules")
    only(check(conv_dim=None, conv_alpha=None), "network.conv_dim", "3x3 convolutions", "set network.conv_dim = 2")
    only(check(conv_dim=0, conv_alpha=None), "network.conv_dim", "conv_dim = 0 turns them off")
    only(
        check(target_modules=["to_q", "to_v"]),
        "network.target_modules",
        "leaves out",
        '["to_q", "to_v", "to_k", "to_out.0"]',
    )
    assert check(block_dims=[8] * 25) == [], "block-wise ranks: the engine checks them, with the model's layout"


def test_preflight_refuses_layouts_nyx_does_not_train(sd15_dir: Path, tmp_path: Path) -> None:
    import safetensors.torch

    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    tucker = tmp_path / "tucker.safetensors"
    safetensors.torch.save_file(
        {
            f"{name}.lora_down.weight": torch.zeros(4, 32),
            f"{name}.lora_up.weight": torch.zeros(32, 4),
            f"{name}.lora_mid.weight": torch.zeros(4, 4, 3, 3),
            f"{name}.alpha": torch.tensor(ALPHA),
        },
        tucker,
    )
    only(problems(config(sd15_dir, weights=str(tucker))), "network.weights", "lora_mid.weight", "Tucker")
    ia3 = tmp_path / "ia3.safetensors"
    safetensors.torch.save_file({f"{name}.lora_up.weight": torch.zeros(32, 4), f"{name}.on_input": torch.zeros(1)}, ia3)
    only(problems(config(sd15_dir, weights=str(ia3))), "network.weights", "no adapter Nyx trains", "on_input")


def test_preflight_reads_alphas_of_every_precision(sd15_dir: Path, tmp_path: Path) -> None:
    """The alphas are read from the file's bytes (no numpy, no torch): fp32, fp16 and bf16 scalars."""
    import safetensors.torch

    from nyx_tui.trainers.native.init_check import read_lora

    state = {}
    for i, dtype in enumerate((torch.float32, torch.float16, torch.bfloat16)):
        name = f"lora_unet_mid_block_attentions_0_transformer_blocks_0_attn{i}_to_q"
        state[f"{name}.lora_down.weight"] = torch.zeros(DIM, 32)
        state[f"{name}.lora_up.weight"] = torch.zeros(32, DIM)
        state[f"{name}.alpha"] = torch.tensor(0.3 + i, dtype=dtype)
    path = tmp_path / "alphas.safetensors"
    safetensors.torch.save_file(state, path)
    lora = read_lora(path)
    alphas = [m.alpha for m in lora.modules.values()]
    assert alphas[0] == pytest.approx(0.3) and alphas[1] == pytest.approx(1.3, rel=1e-3)
    assert alphas[2] == pytest.approx(2.3, rel=1e-2)
    assert {m.rank for m in lora.modules.values()} == {DIM}


def test_preflight_runs_in_the_config_check_and_warns_with_resume(sd15_dir: Path, sd15_lora: Path) -> None:
    from nyx_tui.config.check import preflight

    cfg = config(sd15_dir, weights=str(sd15_lora.with_name("missing.safetensors")))
    assert [p.field for p in preflight(cfg) if p.field.startswith("network.")] == ["network.weights"]
    data = config(sd15_dir, weights=str(sd15_lora), train_text_encoder=True, **CONV).model_dump(mode="json")
    data["training"]["resume"] = "./some-state"
    only(
        problems(TrainingConfig.model_validate(data)),
        "network.weights",
        "does nothing with training.resume",
        severity="warning",
    )
