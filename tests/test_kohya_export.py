"""Export to kohya sd-scripts: every emitted key is an argument of that script with the type sd-scripts expects,
network options only inside `network_args`, and the dataset TOML passes sd-scripts' schema (checked by a small
validator written from the reference JSON). Checked for every preset and a generated matrix of configs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from nyx_tui.cli import main
from nyx_tui.config.model import NetworkKind, OptimizerKind, SchedulerKind, TrainingConfig
from nyx_tui.config.presets import builtin_presets, load_preset
from nyx_tui.trainers.kohya import samples, translate
from nyx_tui.trainers.kohya.translate import KohyaExport, to_kohya, write_export


def _reference_dir() -> Path | None:
    """The reference data (sd-scripts' arguments and dataset schema, read from its code at a pinned commit) is
    kept in `tests/data/sd-scripts-reference/`; NYX_KOHYA_REFERENCE may point at a newer copy."""
    here = Path(__file__).resolve().parent
    for candidate in (os.environ.get("NYX_KOHYA_REFERENCE"), here / "data" / "sd-scripts-reference"):
        if candidate and (Path(candidate) / "sd-scripts-args.json").is_file():
            return Path(candidate)
    return None


REF_DIR = _reference_dir()
assert REF_DIR is not None, "tests/data/sd-scripts-reference is part of the repository"
ARGS: dict[str, dict[str, Any]] = (
    json.loads((REF_DIR / "sd-scripts-args.json").read_text())["scripts"] if REF_DIR else {}
)
SCHEMA: dict[str, Any] = json.loads((REF_DIR / "sd-scripts-dataset-schema.json").read_text()) if REF_DIR else {}

# network options sd-scripts reads only from network_args (at the top level they are silently ignored)
NETWORK_OPTIONS = {
    "conv_dim",
    "conv_alpha",
    "rank_dropout",
    "module_dropout",
    "block_dims",
    "block_alphas",
    "conv_block_dims",
    "conv_block_alphas",
    "down_lr_weight",
    "mid_lr_weight",
    "up_lr_weight",
    "train_blocks",
    "split_qkv",
    "train_double_block_indices",
    "train_single_block_indices",
    "train_block_indices",
    "factor",
    "algo",
    "dora_wd",
    *translate.FLUX_TYPE_DIM_ARGS.values(),
}


# ------------------------------------------------------------------------------------------- validators

_SCALAR: dict[str, tuple[type, ...]] = {
    "str": (str,),
    "Path": (str,),
    "int": (int,),
    "float": (float,),
    "bool": (bool,),
    "int_or_float": (int, float),
}


def _is(value: Any, types: tuple[type, ...]) -> bool:
    if isinstance(value, bool) and bool not in types:
        return False
    return isinstance(value, types)


def config_errors(export: KohyaExport) -> list[str]:
    """Every way the config dict breaks the reference for its script."""
    script = export.script.removesuffix(".py")
    ref = ARGS[script]
    errors = []
    for key, value in export.config.items():
        if key in NETWORK_OPTIONS:
            errors.append(f"{key}: a network option at the top level")
        arg = ref.get(key)
        if arg is None:
            errors.append(f"{key}: not an argument of {script}")
            continue
        types = _SCALAR[arg["type"]]
        if arg["nargs"] in ("*", "+"):
            if not isinstance(value, list) or not all(_is(v, types) for v in value):
                errors.append(f"{key}: wants a list of {arg['type']}, got {value!r}")
            continue
        if not _is(value, types):
            errors.append(f"{key}: wants {arg['type']}, got {type(value).__name__} {value!r}")
        if arg["choices"] is not None and value not in arg["choices"]:
            errors.append(f"{key}: {value!r} is not one of {arg['choices']}")
    for item in export.config.get("network_args", []):
        if "=" not in item or not item.split("=", 1)[0]:
            errors.append(f"network_args: {item!r} is not key=value")
    for key in ("optimizer_args", "lr_scheduler_args"):
        for item in export.config.get(key, []):
            if "=" not in item:
                errors.append(f"{key}: {item!r} is not key=value")
    return errors


def dataset_errors(data: dict[str, Any]) -> list[str]:
    """sd-scripts' dataset schema (voluptuous, PREVENT_EXTRA, isinstance types) as the reference says it."""
    types: dict[str, tuple[type, ...]] = {}
    for name, keys in SCHEMA["types"].items():
        t = {
            "bool": (bool,),
            "int": (int,),
            "float": (float,),
            "float_or_int": (float, int),
            "str": (str,),
            "int_or_pair": (int, list),
        }[name]
        for k in keys:
            types[k] = t
    general_keys = set(SCHEMA["general"])
    subset_keys = set(SCHEMA["dreambooth_subset"])
    dataset_only = {"batch_size", "resolution", "network_multiplier", "validation_seed", "validation_split"} | {
        k for k in general_keys if "bucket" in k
    }
    errors: list[str] = []

    def check(where: str, table: dict[str, Any], allowed: set[str]) -> None:
        for key, value in table.items():
            if key not in allowed:
                errors.append(f"{where}.{key}: unknown key")
            elif key in types and not _is(value, types[key]):
                errors.append(f"{where}.{key}: {value!r} is not {types[key]}")
            elif (
                key == "resolution"
                and isinstance(value, list)
                and not (len(value) == 2 and all(_is(v, (int,)) for v in value))
            ):
                errors.append(f"{where}.resolution: a pair of ints")

    if set(data) - {"general", "datasets"}:
        errors.append(f"top level: unknown {set(data) - {'general', 'datasets'}}")
    check("general", data.get("general", {}), general_keys)
    for i, ds in enumerate(data.get("datasets", [])):
        check(f"datasets[{i}]", {k: v for k, v in ds.items() if k != "subsets"}, general_keys)
        for j, sub in enumerate(ds.get("subsets", [])):
            where = f"datasets[{i}].subsets[{j}]"
            check(where, sub, subset_keys)
            if "image_dir" not in sub:
                errors.append(f"{where}: no image_dir")
            errors.extend(f"{where}.{k}: dataset-level key in a subset" for k in sub if k in dataset_only)
    return errors


def assert_valid(export: KohyaExport) -> None:
    errors = config_errors(export) + dataset_errors(export.dataset)
    errors += [f"{k}: a secret in the config" for k in export.config if "token" in k and "max_token" not in k]
    assert not errors, "\n".join(errors)


def errors_of(export: KohyaExport) -> dict[str, str]:
    return {p.field: p.message for p in export.problems if p.is_error}


make = samples.make


# ------------------------------------------------------------------------------------------------ tests


def test_emitted_arg_names_exist_in_every_script_they_are_offered_for() -> None:
    for fam, script in translate.SCRIPTS.items():
        missing = translate.script_args(script) - set(ARGS[script.removesuffix(".py")])
        assert not missing, f"{fam}: {sorted(missing)}"


@pytest.mark.parametrize("name", builtin_presets())
def test_every_preset_exports_valid_keys_and_dataset(name: str) -> None:
    cfg = load_preset(name)
    export = to_kohya(cfg)
    assert export.script == translate.SCRIPTS[cfg.model.family]
    assert_valid(export)
    assert export.config["resolution"] == f"{cfg.dataset.resolution},{cfg.dataset.resolution}"
    if cfg.scheduler.warmup_steps:
        assert export.config["lr_warmup_steps"] == cfg.scheduler.warmup_steps


@pytest.mark.parametrize("custom", [False, True])
def test_matrix_of_configs_exports_valid_keys(custom: bool) -> None:
    checked = 0
    for sample in samples.matrix():
        kind, opt, cfg = sample.kind, sample.optimizer, sample.config
        export = to_kohya(cfg, custom=custom)
        assert_valid(export)
        cfg_net = export.config.get("network_args", [])
        if kind is not NetworkKind.LORA:
            assert export.config["network_module"] == translate.LYCORIS_MODULE
            assert f"algo={translate.LYCORIS_ALGOS[kind]}" in cfg_net
            assert ("dora_wd=True" in cfg_net) == (kind is NetworkKind.DORA)
        else:
            assert export.config["network_module"] == translate.NETWORK_MODULES[cfg.model.family]
        if opt in translate.OPTIMIZERS:
            assert export.config["optimizer_type"] == translate.OPTIMIZERS[opt]
        elif opt is OptimizerKind.CAME:
            if custom:
                assert export.config["optimizer_type"] == "pytorch_optimizer.CAME"
            else:
                assert "optimizer.type" in errors_of(export)
        checked += 1
    assert checked == len(samples.matrix_keys())


def test_network_options_go_inside_network_args() -> None:
    sd = to_kohya(
        make(
            "sd15",
            network={
                "kind": "lora",
                "conv_dim": 8,
                "conv_alpha": 4,
                "rank_dropout": 0.1,
                "block_dims": [4] * 25,
                "block_lr_weights": [1.0] * 12 + [0.5] + [0.0] * 12,
            },
        )
    )
    args = sd.config["network_args"]
    assert "conv_dim=8" in args and "conv_alpha=4.0" in args and "rank_dropout=0.1" in args
    assert "block_dims=" + ",".join(["4"] * 25) in args
    assert "mid_lr_weight=0.5" in args and "down_lr_weight=" + ",".join(["1.0"] * 12) in args
    assert not set(sd.config) & NETWORK_OPTIONS
    flux = to_kohya(make("flux", flow={"train_blocks": "double", "split_qkv": True, "block_type_dims": {"txt_mlp": 2}}))
    assert {"train_blocks=double", "split_qkv=True", "txt_mlp_dim=2"} <= set(flux.config["network_args"])
    # a LyCORIS kind with convolutions by default, as Nyx
    loha = to_kohya(make("sdxl", network={"kind": "loha", "dim": 8, "alpha": 2}))
    assert {"algo=loha", "conv_dim=8", "conv_alpha=2.0"} <= set(loha.config["network_args"])
    assert loha.config["network_module"] == "lycoris.kohya"
    sd3 = to_kohya(make("sd3", flow={"double_block_indices": [0, 3]}))
    assert "train_block_indices=0,3" in sd3.config["network_args"]


def test_value_conversions() -> None:
    e = to_kohya(make("sdxl", scheduler={"type": "constant", "warmup_steps": 20}, dataset={"resolution": 768}))
    assert e.config["lr_scheduler"] == "constant_with_warmup"  # sd-scripts' constant refuses a warmup
    assert e.config["lr_warmup_steps"] == 20 and isinstance(e.config["lr_warmup_steps"], int)
    assert e.config["resolution"] == "768,768"
    assert e.dataset["datasets"][0]["resolution"] == 768
    assert e.config["network_train_unet_only"] is True
    assert e.dataset["datasets"][0]["subsets"][0]["num_repeats"] == 10  # from `10_mychar`
    cos = to_kohya(make(scheduler={"type": "cosine", "min_lr_ratio": 0.1}))
    assert cos.config["lr_scheduler"] == "cosine_with_min_lr" and cos.config["lr_scheduler_min_lr_ratio"] == 0.1
    ada = to_kohya(make(optimizer={"type": "adafactor"}))
    assert {"relative_step=False", "scale_parameter=False", "warmup_init=False"} <= set(ada.config["optimizer_args"])
    custom = to_kohya(make(optimizer={"type": "custom", "class_path": "my.pkg.Opt", "args": {"x": 1}}))
    assert custom.config["optimizer_type"] == "my.pkg.Opt" and custom.config["optimizer_args"] == ["x=1"]
    te = to_kohya(make(network={"train_text_encoder": True, "text_encoder_lr": 1e-5}))
    assert "network_train_unet_only" not in te.config and te.config["text_encoder_lr"] == [1e-5]
    epochs = to_kohya(make(training={"max_steps": 0, "max_epochs": 4}, saving={"every_n_steps": 0}))
    assert epochs.config["max_train_epochs"] == 4 and "max_train_steps" not in epochs.config
    assert "save_every_n_steps" not in epochs.config  # 0 = never; sd-scripts would compute `% 0`
    keep = to_kohya(make(saving={"every_n_steps": 100, "keep_last_n": 3}))
    assert keep.config["save_last_n_steps"] == 300
    flux = to_kohya(make("flux", training={"base_quantization": "fp8"}))
    assert flux.config["fp8_base"] is True and flux.config["ae"] == "ae.safetensors" and "vae" not in flux.config
    sd3 = to_kohya(make("sd3", flow={"t5_on_cpu": True}))
    assert sd3.config["t5xxl_device"] == "cpu"
    masked = to_kohya(make(training={"masked_loss": True}))
    assert masked.config["masked_loss"] is True
    assert all(s["alpha_mask"] is True for s in masked.dataset["datasets"][0]["subsets"])


def test_sd2_gets_v2_and_prediction_type_from_the_model_name() -> None:
    v = to_kohya(make("sd2"))
    assert v.config["v2"] is True and v.config["v_parameterization"] is True and v.config["sdpa"] is True
    eps = to_kohya(make("sd2", model={"single_file_config": "stabilityai/stable-diffusion-2-1-base"}))
    assert eps.config["v2"] is True and "v_parameterization" not in eps.config
    assert any(p.field == "model.family" and not p.is_error for p in eps.problems)
    assert "v2" not in to_kohya(make("sd15")).config


def test_sample_prompts_get_nyx_defaults() -> None:
    e = to_kohya(
        make(sampling={"prompts": ["a cat", "a dog --w 640 --h 512 --d 9"], "every_n_steps": 10}, training={"seed": 5})
    )
    assert e.prompts_text == "a cat --w 512 --h 512 --d 5\na dog --w 640 --h 512 --d 9\n"
    assert e.config["sample_every_n_steps"] == 10 and e.config["sample_sampler"] == "ddim"


def test_refused_options_are_problems_not_dropped() -> None:
    cases: list[tuple[TrainingConfig, bool, str]] = [
        (make(optimizer={"type": "came"}), False, "optimizer.type"),
        (make(scheduler={"type": "rex"}), False, "scheduler.type"),
        (make(scheduler={"type": "rex"}, training={"max_steps": 0, "max_epochs": 2}), True, "training.max_epochs"),
        (make("flux", training={"base_quantization": "int8"}), False, "training.base_quantization"),
        (make("flux", training={"base_quantization": "nf4"}), False, "training.base_quantization"),
        (make("flux", flow={"t5_on_cpu": True}), False, "flow.t5_on_cpu"),
        (make("flux", saving={"lora_format": "diffusers"}), False, "saving.lora_format"),
        (make(training={"ema_decay": 0.999}), False, "training.ema_decay"),
        (make(network={"target_modules": ["to_q"]}), False, "network.target_modules"),
        (make(training={"cache_text_encoder_outputs": True}), False, "training.cache_text_encoder_outputs"),
        (make("sdxl", network={"block_lr_weights": [1.0] * 23}), False, "network.block_lr_weights"),
        (make(network={"kind": "locon", "block_dims": [4] * 25}), False, "network.block_dims"),
        (make(scheduler={"type": "linear", "min_lr_ratio": 0.2}), False, "scheduler.min_lr_ratio"),
        (make("sd3", flow={"discrete_flow_shift": 2.0}), False, "flow.discrete_flow_shift"),
        (make(dataset={"subsets": []}), False, "dataset.subsets"),
        (
            TrainingConfig.model_validate(
                {
                    "model": {"family": "flux", "pretrained": "black-forest-labs/FLUX.1-dev"},
                    "dataset": {"subsets": [{"image_dir": "x"}]},
                }
            ),
            False,
            "model.clip_l",
        ),
    ]
    for cfg, custom, field in cases:
        export = to_kohya(cfg, custom=custom)
        errors = errors_of(export)
        assert field in errors, (field, export.problems)
        assert not export.ok
        assert_valid(export)  # what is emitted stays valid even then


def test_custom_backend_gets_came_and_rex_by_dotted_path() -> None:
    e = to_kohya(make(optimizer={"type": "came"}, scheduler={"type": "rex", "warmup_steps": 5}), custom=True)
    assert e.ok, e.problems
    assert e.config["optimizer_type"] == "pytorch_optimizer.CAME"
    assert e.config["lr_scheduler_type"] == translate.CUSTOM_SCHEDULERS[SchedulerKind.REX]
    assert "lr_warmup_steps" not in e.config  # sd-scripts refuses a warmup beside a custom class
    assert "total_steps=1000" in e.config["lr_scheduler_args"] and "warmup_steps=5" in e.config["lr_scheduler_args"]
    via_config = to_kohya(make(optimizer={"type": "came"}, backend={"name": "kohya-custom"}))
    assert via_config.config["optimizer_type"] == "pytorch_optimizer.CAME"


def test_train_data_dir_becomes_subsets(tmp_path: Path) -> None:
    for name in ("10_mychar", "2_style", "notes"):
        (tmp_path / "train" / name).mkdir(parents=True)
    cfg = make(dataset={"subsets": [], "train_data_dir": str(tmp_path / "train")})
    e = to_kohya(cfg)
    subs = e.dataset["datasets"][0]["subsets"]
    assert [(s["num_repeats"], s["class_tokens"]) for s in subs] == [(10, "mychar"), (2, "style")]
    assert "train_data_dir" not in e.config  # ignored by sd-scripts beside a dataset config
    assert_valid(e)
    missing = to_kohya(make(dataset={"subsets": [], "train_data_dir": str(tmp_path / "nope")}))
    assert "dataset.train_data_dir" in errors_of(missing)


def test_write_export_and_launch_command(tmp_path: Path) -> None:
    e = to_kohya(make(sampling={"prompts": ["a cat"]}, training={"mixed_precision": "fp16", "num_processes": 2}))
    files = write_export(e, tmp_path, sd_scripts_dir="/opt/sd-scripts", python="/venv/bin/python")
    assert set(files) == {"config", "dataset", "prompts", "launch"}
    config = tomllib.loads(files["config"].read_text())
    assert config["sample_prompts"] == str(files["prompts"])
    assert tomllib.loads(files["dataset"].read_text()) == e.dataset
    argv = e.launch_argv("/opt/sd-scripts", "/venv/bin/python", None, files["config"], files["dataset"])
    assert argv[:3] == ["/venv/bin/python", "-m", "accelerate.commands.launch"]
    assert argv[argv.index("--num_processes") + 1] == "2" and argv[argv.index("--mixed_precision") + 1] == "fp16"
    assert argv[argv.index("--dynamo_backend") + 1] == "no"
    assert "/opt/sd-scripts/train_network.py" in argv
    assert "accelerate.commands.launch" in files["launch"].read_text()


def test_cli_export_writes_files_tomllib_reads(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "images").mkdir()
    cfg_file = tmp_path / "cfg.toml"
    cfg_file.write_text(
        '[model]\nfamily = "sdxl"\npretrained = "base.safetensors"\n\n[[dataset.subsets]]\nimage_dir = "images"\n'
    )
    out = tmp_path / "out"
    rc = main(["config", "export", "--to", "kohya", str(cfg_file), "-o", str(out)])
    assert rc == 0
    config = tomllib.loads((out / "config.toml").read_text())
    dataset = tomllib.loads((out / "dataset.toml").read_text())
    assert config["network_module"] == "networks.lora"
    assert config["output_dir"] == str(out.absolute() / "output")
    assert dataset["datasets"][0]["subsets"][0]["image_dir"] == str(tmp_path / "images")
    printed = capsys.readouterr().out
    assert "sdxl_train_network.py" in printed and str(out / "dataset.toml") in printed
    # an option sd-scripts lacks: problems printed, exit 2, nothing written
    bad = tmp_path / "bad.toml"
    bad.write_text(cfg_file.read_text() + '\n[optimizer]\ntype = "came"\n')
    rc = main(["config", "export", "--to", "kohya", str(bad), "-o", str(tmp_path / "out2")])
    assert rc == 2 and not (tmp_path / "out2").exists()
    assert "optimizer.type" in capsys.readouterr().err
    rc = main(["config", "export", "--to", "kohya", str(bad), "-o", str(tmp_path / "out3"), "--custom"])
    assert rc == 0


def test_translate_imports_no_torch() -> None:
    code = (
        "import sys; import nyx_tui.trainers.kohya.translate as t; "
        "assert 'torch' not in sys.modules, 'torch'; assert 'diffusers' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_lycoris_kinds_get_no_convolutions_through_a_preset() -> None:
    """lycoris.kohya reads `conv_dim = int(kwargs.get("conv_dim", dim) or dim)`: absent or 0 means 3x3
    convolutions at rank dim. Nyx's "no convolutions" (conv_dim = 0; DoRA's empty) is its full-lin preset."""
    dora = to_kohya(make("sd15", network={"kind": "dora", "dim": 8}))
    args = dora.config["network_args"]
    assert f"preset={translate.LYCORIS_NO_CONV_PRESET}" in args and "dora_wd=True" in args
    assert not any(a.startswith("conv_dim=") for a in args)
    locon0 = to_kohya(make("sdxl", network={"kind": "locon", "conv_dim": 0}))
    assert "preset=full-lin" in locon0.config["network_args"]
    assert not any(a.startswith("conv_dim=") for a in locon0.config["network_args"])
    dora_conv = to_kohya(make("sd15", network={"kind": "dora", "conv_dim": 4}))
    assert "conv_dim=4" in dora_conv.config["network_args"]
    assert not any(a.startswith("preset=") for a in dora_conv.config["network_args"])
    locon = to_kohya(make("sd15", network={"kind": "locon", "dim": 8}))  # empty: convolutions at dim
    assert "conv_dim=8" in locon.config["network_args"]
    assert not any(a.startswith("preset=") for a in locon.config["network_args"])
    lora0 = to_kohya(make("sd15", network={"kind": "lora", "conv_dim": 0}))  # networks.lora: none without it
    assert "network_args" not in lora0.config
    flux = to_kohya(make("flux", network={"kind": "dora"}))  # a transformer: no convolutions to speak of
    assert not any(a.startswith(("preset=", "conv_")) for a in flux.config["network_args"])


@pytest.mark.parametrize(
    ("family", "flow", "field"),
    [
        ("flux", {"train_blocks": "single"}, "flow.train_blocks"),
        ("flux", {"split_qkv": True}, "flow.split_qkv"),
        ("flux", {"double_block_indices": [0, 1]}, "flow.double_block_indices"),
        ("flux", {"block_type_dims": {"img_attn": 8}}, "flow.block_type_dims.img_attn"),
        ("sd3", {"double_block_indices": [2]}, "flow.double_block_indices"),
    ],
)
def test_lora_module_block_options_are_refused_with_lycoris(family: str, flow: dict[str, Any], field: str) -> None:
    """sd-scripts' real parser check found these reaching lycoris.kohya, which never reads them."""
    for kind in ("locon", "loha", "lokr", "dora"):
        export = to_kohya(make(family, network={"kind": kind}, flow=flow))
        assert field in errors_of(export), (kind, export.problems)
        assert not set(export.config.get("network_args", [])) & {
            a for a in export.config.get("network_args", []) if a.split("=")[0] in translate.LORA_MODULE_ONLY_ARGS
        }
    assert to_kohya(make(family, network={"kind": "lora"}, flow=flow)).ok
