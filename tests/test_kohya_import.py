"""sd-scripts config (+ dataset TOML / train_data_dir) → TrainingConfig, and import → export → import.

The sample configs are written here the way sd-scripts users write them (sections, `k=v` lists, strings
for resolution, a warmup ratio), so the import is checked against what people actually have.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from nyx_tui.cli import main
from nyx_tui.config.io import load_config
from nyx_tui.config.model import TrainingConfig
from nyx_tui.trainers.kohya.importer import ImportResult, family_of, from_kohya, read_kohya_files

# ------------------------------------------------------------------------------------------ samples


def sd15(tmp: Path) -> tuple[dict[str, Any], dict[str, Any] | None, str | None]:
    (tmp / "prompts.txt").write_text(
        "# samples\nmychar smiling --w 512 --h 512 --d 1\n\nmychar in a park --w 512 --h 512 --d 2\n"
    )
    config = {
        "model": {"pretrained_model_name_or_path": "stable-diffusion-v1-5/stable-diffusion-v1-5"},
        "network": {
            "network_module": "networks.lora",
            "network_dim": 32,
            "network_alpha": 16,
            "network_args": ["conv_dim=8", "conv_alpha=4"],
        },
        "optimizer": {
            "optimizer_type": "AdamW8bit",
            "learning_rate": 1e-4,
            "optimizer_args": ["weight_decay=0.05", "betas=(0.9,0.99)"],
            "lr_scheduler": "cosine",
            "lr_warmup_steps": 0.1,
        },
        "training": {
            "max_train_steps": 2000,
            "mixed_precision": "bf16",
            "seed": 1234,
            "train_batch_size": 2,
            "gradient_checkpointing": True,
            "cache_latents": True,
            "network_train_unet_only": True,
            "min_snr_gamma": 5.0,
            "noise_offset": 0.05,
            "xformers": True,
        },
        "saving": {
            "output_dir": "out",
            "output_name": "mychar",
            "save_precision": "fp16",
            "save_every_n_steps": 500,
            "save_model_as": "safetensors",
        },
        "sample": {"sample_prompts": "prompts.txt", "sample_every_n_steps": 250, "sample_sampler": "euler_a"},
    }
    dataset = {
        "general": {"shuffle_caption": True, "caption_extension": ".txt", "keep_tokens": 1},
        "datasets": [
            {
                "resolution": 512,
                "batch_size": 2,
                "enable_bucket": True,
                "subsets": [
                    {"image_dir": "img/10_mychar", "num_repeats": 10, "class_tokens": "mychar woman"},
                    {"image_dir": "reg/1_woman", "is_reg": True, "num_repeats": 1, "caption_extension": ".txt"},
                ],
            }
        ],
    }
    return config, dataset, None


def sdxl_lokr(tmp: Path) -> tuple[dict[str, Any], dict[str, Any] | None, str | None]:
    config = {
        "pretrained_model_name_or_path": "/models/base.safetensors",
        "network_module": "lycoris.kohya",
        "network_dim": 16,
        "network_alpha": 1,
        "network_args": ["algo=lokr", "factor=8", "preset=full"],
        "optimizer_type": "Prodigy",
        "learning_rate": 1.0,
        "optimizer_args": ["decouple=True", "weight_decay=0.01", "d_coef=2", "use_bias_correction=True"],
        "lr_scheduler": "constant",
        "max_train_epochs": 10,
        "resolution": "1024,1024",
        "mixed_precision": "bf16",
        "cache_text_encoder_outputs": True,
        "network_train_unet_only": True,
        "output_dir": "/out",
        "seed": 7,
    }
    dataset = {
        "general": {"caption_extension": ".txt"},
        "datasets": [{"resolution": [1024, 1024], "batch_size": 4, "subsets": [{"image_dir": "/data/5_style"}]}],
    }
    return config, dataset, "sdxl_train_network.py"


def flux(tmp: Path) -> tuple[dict[str, Any], dict[str, Any] | None, str | None]:
    config = {
        "pretrained_model_name_or_path": "/m/flux1-dev.safetensors",
        "clip_l": "/m/clip_l.safetensors",
        "t5xxl": "/m/t5xxl_fp16.safetensors",
        "ae": "/m/ae.safetensors",
        "network_module": "networks.lora_flux",
        "network_dim": 16,
        "network_alpha": 16,
        "network_args": ["train_blocks=single"],
        "timestep_sampling": "shift",
        "discrete_flow_shift": 3.1582,
        "model_prediction_type": "raw",
        "guidance_scale": 1.0,
        "blocks_to_swap": 18,
        "fp8_base": True,
        "gradient_checkpointing": True,
        "optimizer_type": "adafactor",
        "optimizer_args": ["relative_step=False", "scale_parameter=False", "warmup_init=False"],
        "learning_rate": 1e-4,
        "lr_scheduler": "constant_with_warmup",
        "lr_warmup_steps": 10,
        "max_train_steps": 1000,
        "cache_text_encoder_outputs": True,
        "cache_text_encoder_outputs_to_disk": True,
        "network_train_unet_only": True,
        "mixed_precision": "bf16",
        "sdpa": True,
        "output_dir": "/out",
        "seed": 42,
    }
    dataset = {
        "general": {"caption_extension": ".txt"},
        "datasets": [{"resolution": 1024, "batch_size": 1, "subsets": [{"image_dir": "/data/1_me", "num_repeats": 1}]}],
    }
    return config, dataset, None


def sd3(tmp: Path) -> tuple[dict[str, Any], dict[str, Any] | None, str | None]:
    config = {
        "pretrained_model_name_or_path": "/m/sd3.5_medium.safetensors",
        "clip_l": "/m/clip_l.safetensors",
        "clip_g": "/m/clip_g.safetensors",
        "t5xxl": "/m/t5xxl_fp16.safetensors",
        "network_module": "networks.lora_sd3",
        "network_dim": 16,
        "network_alpha": 8,
        "network_args": ["train_block_indices=0-3,10"],
        "weighting_scheme": "logit_normal",
        "training_shift": 3.0,
        "apply_lg_attn_mask": True,
        "clip_l_dropout_rate": 0.1,
        "t5xxl_device": "cpu",
        "cache_text_encoder_outputs": True,
        "network_train_unet_only": True,
        "optimizer_type": "AdamW",
        "learning_rate": 1e-4,
        "max_train_steps": 500,
        "mixed_precision": "bf16",
        "output_dir": "/out",
        "seed": 3,
    }
    dataset = {
        "general": {"caption_extension": ".txt"},
        "datasets": [{"resolution": 1024, "batch_size": 1, "subsets": [{"image_dir": "/data/1_me", "num_repeats": 2}]}],
    }
    return config, dataset, None


def folders(tmp: Path) -> tuple[dict[str, Any], dict[str, Any] | None, str | None]:
    for d in ("train/10_char", "train/2_char outfit", "reg/1_person"):
        (tmp / d).mkdir(parents=True)
    config = {
        "pretrained_model_name_or_path": "stable-diffusion-v1-5/stable-diffusion-v1-5",
        "network_module": "networks.lora",
        "network_dim": 8,
        "network_alpha": 4,
        "train_data_dir": "train",
        "reg_data_dir": "reg",
        "resolution": "768",
        "caption_extension": ".txt",
        "shuffle_caption": True,
        "enable_bucket": True,
        "learning_rate": 1e-4,
        "max_train_steps": 800,
        "output_dir": "out",
        "seed": 42,
    }
    return config, None, None


SAMPLES = {"sd15": sd15, "sdxl_lokr": sdxl_lokr, "flux": flux, "sd3": sd3, "train_data_dir": folders}


def run_sample(tmp: Path, name: str) -> ImportResult:
    config, dataset, script = SAMPLES[name](tmp)
    (tmp / "config.toml").write_text(tomli_w.dumps(config))
    ds_path = None
    if dataset is not None:
        ds_path = tmp / "dataset.toml"
        ds_path.write_text(tomli_w.dumps(dataset))
    return read_kohya_files(tmp / "config.toml", ds_path, script=script)


def ok(result: ImportResult) -> TrainingConfig:
    assert result.problems == [], "\n".join(str(p) for p in result.problems)
    assert result.config is not None
    return result.config


# ------------------------------------------------------------------------------------------ imports


def test_sd15_lora_with_dataset_toml(tmp_path: Path) -> None:
    result = run_sample(tmp_path, "sd15")
    cfg = ok(result)
    assert cfg.model.family == "sd15"
    assert cfg.model.pretrained == "stable-diffusion-v1-5/stable-diffusion-v1-5"  # a repo id stays one
    net = cfg.network
    assert (net.kind, net.dim, net.alpha, net.conv_dim, net.conv_alpha) == ("lora", 32, 16.0, 8, 4.0)
    assert (net.train_unet, net.train_text_encoder) == (True, False)
    opt = cfg.optimizer
    assert (opt.type, opt.learning_rate, opt.weight_decay, opt.betas, opt.args) == (
        "adamw8bit",
        1e-4,
        0.05,
        (0.9, 0.99),
        {},
    )
    assert cfg.scheduler.type == "cosine"
    assert cfg.scheduler.warmup_steps == 200  # the ratio 0.1 of max_train_steps
    tr = cfg.training
    assert (tr.max_steps, tr.max_epochs, tr.batch_size, tr.seed, tr.mixed_precision) == (2000, 0, 2, 1234, "bf16")
    assert tr.gradient_checkpointing and tr.cache_latents
    assert (tr.min_snr_gamma, tr.noise_offset) == (5.0, 0.05)
    ds = cfg.dataset
    assert (ds.resolution, ds.enable_bucket, ds.shuffle_caption, ds.keep_tokens, ds.caption_extension) == (
        512,
        True,
        True,
        1,
        ".txt",
    )
    assert [
        (
            Path(s.image_dir).relative_to(tmp_path).as_posix(),
            s.num_repeats,
            s.is_reg,
            s.class_tokens,
            s.caption_extension,
        )
        for s in ds.subsets
    ] == [
        ("img/10_mychar", 10, False, "mychar woman", None),
        ("reg/1_woman", 1, True, None, None),
    ]
    assert cfg.saving.output_dir == str(tmp_path / "out")
    assert (cfg.saving.output_name, cfg.saving.precision, cfg.saving.every_n_steps) == ("mychar", "fp16", 500)
    assert cfg.sampling.prompts == ["mychar smiling --w 512 --h 512 --d 1", "mychar in a park --w 512 --h 512 --d 2"]
    assert (cfg.sampling.every_n_steps, cfg.sampling.sampler) == (250, "euler_a")
    assert any(line.startswith("xformers = true") for line in result.unrepresented)
    assert not any("save_model_as" in line for line in result.unrepresented)  # its default: nothing to say


def test_sdxl_lycoris_lokr(tmp_path: Path) -> None:
    result = run_sample(tmp_path, "sdxl_lokr")
    cfg = ok(result)
    assert cfg.model.family == "sdxl"
    assert (cfg.network.kind, cfg.network.dim, cfg.network.alpha, cfg.network.lokr_factor) == ("lokr", 16, 1.0, 8)
    assert cfg.network.conv_dim is None  # LyCORIS's default (dim) is Nyx's empty
    assert cfg.optimizer.type == "prodigy"
    assert cfg.optimizer.weight_decay == 0.01
    assert cfg.optimizer.args == {"decouple": True, "d_coef": 2, "use_bias_correction": True}
    assert (cfg.training.max_epochs, cfg.training.max_steps, cfg.training.batch_size) == (10, 0, 4)
    assert cfg.dataset.resolution == 1024
    assert cfg.dataset.subsets[0].num_repeats == 1  # a dataset TOML does not read folder names
    assert cfg.training.cache_text_encoder_outputs
    assert result.unrepresented == [], result.unrepresented


def test_flux(tmp_path: Path) -> None:
    result = run_sample(tmp_path, "flux")
    cfg = ok(result)
    m, fl = cfg.model, cfg.flow
    assert m.family == "flux"
    assert (m.clip_l, m.t5xxl, m.vae) == ("/m/clip_l.safetensors", "/m/t5xxl_fp16.safetensors", "/m/ae.safetensors")
    assert (fl.timestep_sampling, fl.discrete_flow_shift, fl.model_prediction_type, fl.guidance_scale) == (
        "shift",
        3.1582,
        "raw",
        1.0,
    )
    assert (fl.blocks_to_swap, fl.train_blocks) == (18, "single")
    assert cfg.training.base_quantization == "fp8"
    assert cfg.optimizer.type == "adafactor"
    assert cfg.optimizer.args == {}  # Nyx's Adafactor already runs with these
    assert (cfg.scheduler.type, cfg.scheduler.warmup_steps) == ("constant_with_warmup", 10)
    assert cfg.training.cache_text_encoder_outputs_to_disk
    assert [u.split(" =")[0] for u in result.unrepresented] == ["sdpa"]


def test_sd3(tmp_path: Path) -> None:
    cfg = ok(run_sample(tmp_path, "sd3"))
    assert cfg.model.family == "sd3"
    assert cfg.model.clip_g == "/m/clip_g.safetensors"
    fl = cfg.flow
    assert (fl.weighting_scheme, fl.training_shift, fl.apply_lg_attn_mask, fl.clip_l_dropout_rate) == (
        "logit_normal",
        3.0,
        True,
        0.1,
    )
    assert fl.double_block_indices == [0, 1, 2, 3, 10]
    assert fl.t5_on_cpu
    assert cfg.dataset.subsets[0].num_repeats == 2


def test_train_data_dir_layout(tmp_path: Path) -> None:
    result = run_sample(tmp_path, "train_data_dir")
    cfg = ok(result)
    ds = cfg.dataset
    assert ds.subsets == []
    assert (ds.train_data_dir, ds.reg_data_dir) == (str(tmp_path / "train"), str(tmp_path / "reg"))
    assert (ds.resolution, ds.caption_extension, ds.shuffle_caption, ds.enable_bucket) == (768, ".txt", True, True)
    # sd-scripts trains the text encoder unless told not to, and its learning rate is the one given
    assert cfg.network.train_text_encoder and cfg.network.text_encoder_lr is None


def test_sd_scripts_defaults_for_keys_left_out() -> None:
    """A key an sd-scripts config leaves out means sd-scripts' default, not Nyx's."""
    result = from_kohya({"pretrained_model_name_or_path": "a/b", "train_data_dir": "/d"})
    cfg = ok(result)
    assert (cfg.network.alpha, cfg.optimizer.learning_rate, cfg.training.max_steps) == (1.0, 2e-6, 1600)
    assert cfg.dataset.caption_extension == ".caption"
    assert cfg.saving.precision == "float" and cfg.saving.save_state is False
    assert any(line.startswith("seed (not set)") for line in result.unrepresented)


def test_unknown_and_custom_keys_are_listed() -> None:
    result = from_kohya(
        {
            "pretrained_model_name_or_path": "a/b",
            "train_data_dir": "/d",
            "seed": 1,
            "lr_scheduler_type": "my.module.Sched",
            "optimizer_type": "DAdaptAdam",
            "network_args": ["conv_dim=4", "loraplus_lr_ratio=16", "mystery=1"],
            "resolution": "1024,768",
            "max_train_epochs": 4,
            "lr_warmup_steps": 0.05,
            "foo_bar": 3,
            "nested": {"deep_thing": "x"},
        }
    )
    cfg = ok(result)
    text = "\n".join(result.unrepresented)
    assert 'lr_scheduler_type = "my.module.Sched": a custom scheduler class is not a Nyx option' in text
    assert 'optimizer_type = "DAdaptAdam"' in text
    assert "network_args.loraplus_lr_ratio" in text and "network_args.mystery" in text
    assert 'resolution = "1024,768": a non-square' in text
    assert "lr_warmup_steps = 0.05: a warmup ratio needs a step count" in text
    assert "foo_bar = 3" in text
    assert 'deep_thing = "x"' in text  # a section's keys are flattened like sd-scripts does
    assert cfg.network.conv_dim == 4 and cfg.training.max_epochs == 4


def test_custom_optimizer_and_rex_from_custom_backend() -> None:
    result = from_kohya(
        {
            "train_data_dir": "/d",
            "seed": 1,
            "optimizer_type": "pytorch_optimizer.SOAP",
            "optimizer_args": ["weight_decay=0.1", "betas=(0.9,0.95)"],
            "lr_scheduler_type": "nyx_tui.trainers.kohya.schedulers.RexLR",
            "lr_scheduler_args": ["total_steps=1000", "warmup_steps=50", "min_lr_ratio=0.1"],
            "max_train_steps": 1000,
        }
    )
    cfg = ok(result)
    assert (cfg.optimizer.type, cfg.optimizer.class_path) == ("custom", "pytorch_optimizer.SOAP")
    assert cfg.optimizer.args == {"weight_decay": 0.1, "betas": "(0.9,0.95)"}
    assert (cfg.scheduler.type, cfg.scheduler.warmup_steps, cfg.scheduler.min_lr_ratio) == ("rex", 50, 0.1)
    assert result.unrepresented == []


def test_dora_and_algos() -> None:
    base = {"train_data_dir": "/d", "seed": 1, "network_module": "lycoris.kohya"}
    dora = ok(from_kohya({**base, "network_args": ["algo=lora", "dora_wd=True"]}))
    assert dora.network.kind == "dora"
    loha = ok(from_kohya({**base, "network_args": ["algo=loha"]}))
    assert loha.network.kind == "loha"
    res = from_kohya({**base, "network_args": ["algo=ia3"]})
    assert any("network_args.algo" in u for u in res.unrepresented)


@pytest.mark.parametrize(
    ("flat", "script", "family"),
    [
        ({}, "sdxl_train_network.py", "sdxl"),
        ({}, "flux_train_network", "flux"),
        ({"sdxl": True}, None, "sdxl"),
        ({"t5xxl": "x", "ae": "y"}, None, "flux"),
        ({"clip_g": "x", "t5xxl": "y"}, None, "sd3"),
        ({"v2": True, "v_parameterization": True}, None, "sd2"),
        ({"network_module": "networks.lora_flux"}, None, "flux"),
        ({}, None, "sd15"),
    ],
)
def test_family(flat: dict[str, Any], script: str | None, family: str) -> None:
    assert family_of(flat, script) == family


def test_a_bad_value_is_a_problem_not_a_crash() -> None:
    result = from_kohya({"train_data_dir": "/d", "seed": 1, "network_dim": 5000})
    assert result.config is None
    assert any(p.field == "network.dim" for p in result.problems)


# ------------------------------------------------------------------------------------------ round trip


def _roundtrip(tmp: Path, cfg: TrainingConfig, name: str) -> TrainingConfig:
    from nyx_tui.trainers.kohya.translate import to_kohya, write_export

    export = to_kohya(cfg)
    assert export.ok, "\n".join(str(p) for p in export.problems)
    paths = write_export(export, tmp / f"export-{name}")
    return ok(read_kohya_files(paths["config"], paths["dataset"], script=export.script))


@pytest.mark.parametrize("name", ["sd15", "sdxl_lokr", "flux", "sd3"])
def test_import_export_import(tmp_path: Path, name: str) -> None:
    first = ok(run_sample(tmp_path, name))
    second = _roundtrip(tmp_path, first, "1")
    assert second.dump() == first.dump()


def test_train_data_dir_roundtrip(tmp_path: Path) -> None:
    """The export lists train_data_dir's N_name folders as subsets (sd-scripts ignores train_data_dir beside a
    dataset config), so the second import has the same folders as subsets; from there it is stable."""
    first = ok(run_sample(tmp_path, "train_data_dir"))
    second = _roundtrip(tmp_path, first, "1")
    got = sorted((Path(s.image_dir).name, s.num_repeats, s.class_tokens, s.is_reg) for s in second.dataset.subsets)
    assert got == [
        ("10_char", 10, "char", False),
        ("1_person", 1, "person", True),
        ("2_char outfit", 2, "char outfit", False),
    ]
    a, b = first.dump(), second.dump()
    for d in (a, b):
        for key in ("subsets", "train_data_dir", "reg_data_dir"):
            d["dataset"].pop(key, None)
    assert a == b
    third = _roundtrip(tmp_path, second, "2")
    assert third.dump() == second.dump()


# ------------------------------------------------------------------------------------------ CLI, torch


def test_cli_import(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config, dataset, _ = sd15(tmp_path)
    (tmp_path / "c.toml").write_text(tomli_w.dumps(config))
    assert dataset is not None
    (tmp_path / "d.toml").write_text(tomli_w.dumps(dataset))
    out = tmp_path / "nyx.toml"
    rc = main(["config", "import", str(tmp_path / "c.toml"), "--dataset", str(tmp_path / "d.toml"), "-o", str(out)])
    assert rc == 0
    assert "xformers" in capsys.readouterr().err
    assert load_config(out).network.dim == 32


def test_cli_import_nothing_built(tmp_path: Path) -> None:
    (tmp_path / "c.toml").write_text('train_data_dir = "/d"\nnetwork_dim = 5000\n')
    assert main(["config", "import", str(tmp_path / "c.toml"), "-o", str(tmp_path / "o.toml")]) == 2
    assert not (tmp_path / "o.toml").exists()


def test_importer_imports_no_torch() -> None:
    code = (
        "import sys; import nyx_tui.trainers.kohya.importer as m; "
        "m.from_kohya({'train_data_dir': '/d'}); "
        "bad = [x for x in ('torch', 'diffusers', 'transformers') if x in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize(
    "dataset",
    [{"datasets": "nope"}, {"general": 5}, {"datasets": [{"subsets": [{"image_dir": "/i", "num_repeats": "x"}]}]}],
)
def test_a_malformed_dataset_toml_is_a_problem(dataset: dict[str, Any]) -> None:
    result = from_kohya({"seed": 1}, dataset)
    assert result.config is None and result.problems


def test_lycoris_convolutions_as_lycoris_reads_them() -> None:
    """lycoris.kohya trains 3x3 convolutions at rank network_dim when conv_dim is absent (or 0), and none with
    its full-lin preset: DoRA without conv_dim therefore has convolutions (Nyx's DoRA empty has none)."""
    base = {"train_data_dir": "/d", "seed": 1, "network_module": "lycoris.kohya", "network_dim": 8}
    dora = ok(from_kohya({**base, "network_args": ["algo=lora", "dora_wd=True"]}))
    assert (dora.network.kind, dora.network.conv_dim) == ("dora", 8)
    dora_lin = ok(from_kohya({**base, "network_args": ["algo=lora", "dora_wd=True", "preset=full-lin"]}))
    assert (dora_lin.network.kind, dora_lin.network.conv_dim) == ("dora", None)
    locon_lin = from_kohya({**base, "network_args": ["algo=locon", "preset=full-lin"]})
    assert ok(locon_lin).network.conv_dim == 0 and locon_lin.unrepresented == []
    locon = ok(from_kohya({**base, "network_args": ["algo=locon"]}))
    assert locon.network.conv_dim is None  # Nyx's empty: dim, as LyCORIS


@pytest.mark.parametrize(
    "network",
    [
        {"kind": "dora", "dim": 8, "alpha": 4},
        {"kind": "dora", "dim": 8, "conv_dim": 4},
        {"kind": "locon", "dim": 8, "conv_dim": 0},
        {"kind": "loha", "dim": 8},
    ],
)
def test_lycoris_convolutions_roundtrip(tmp_path: Path, network: dict[str, Any]) -> None:
    first = TrainingConfig.model_validate(
        {
            "model": {"family": "sd15", "pretrained": "base.safetensors"},
            "dataset": {"subsets": [{"image_dir": str(tmp_path / "img"), "num_repeats": 1}]},
            "network": network,
            "training": {"seed": 1},
        }
    )
    second = _roundtrip(tmp_path, first, "1")
    assert second.network.model_dump() == first.network.model_dump()


def test_lora_module_block_args_under_lycoris_are_listed_not_imported() -> None:
    """lycoris.kohya never reads Flux's/SD3's block args: importing them would promise what did not train."""
    flux = {
        "train_data_dir": "/d",
        "seed": 1,
        "network_module": "lycoris.kohya",
        "ae": "ae.safetensors",
        "t5xxl": "t5.safetensors",
        "network_args": ["algo=lokr", "train_blocks=single", "train_double_block_indices=0-3"],
    }
    result = from_kohya(flux, script="flux_train_network.py")
    cfg = ok(result)
    assert cfg.network.kind == "lokr" and cfg.flow.train_blocks == "all" and cfg.flow.double_block_indices is None
    assert {u.split(" =")[0] for u in result.unrepresented} >= {
        "network_args.train_blocks",
        "network_args.train_double_block_indices",
    }
    lora = ok(from_kohya({**flux, "network_module": "networks.lora_flux", "network_args": ["train_blocks=single"]}))
    assert lora.flow.train_blocks == "single"
