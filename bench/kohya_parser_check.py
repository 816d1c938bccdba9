"""Opt-in check of the kohya export against sd-scripts' REAL code, at a pinned commit, in its own venv.

The export tests (`tests/test_kohya_export.py`) compare every key with reference data read from sd-scripts;
this goes one step further and runs sd-scripts itself on what Nyx writes, since sd-scripts reads its TOML
without mercy (unknown keys silently ignored, values not converted):

    python bench/kohya_parser_check.py --repo /work/.mirror/kohya-ss+sd-scripts/repo   # or the GitHub URL
    python bench/kohya_parser_check.py --sd-scripts ~/sd-scripts                        # an existing checkout

It prepares a work folder (`--workdir`, default `~/.cache/nyx/sd-scripts-check`): a clone at `--commit`
(skipped with `--sd-scripts`) and a venv made with `python3.11 -m venv` holding `torch==2.13.0`,
`torchvision==0.28.0` (sd-scripts imports it without listing it), `lycoris-lora==3.4.0` (the LyCORIS
exports' network module) and sd-scripts' requirements.txt (pip runs in the checkout, for its `-e .` line). A
prepared work folder is reused. Then it exports every preset and the generated matrix
(`nyx_tui.trainers.kohya.samples`: every family × network kind × optimizer × extras, official and
`--custom`) with `write_export`, and runs THIS file again with the venv's Python as the driver
(`--drive MANIFEST`), which for each export:

1. imports the family's script (train_network, sdxl_/flux_/sd3_train_network), calls `setup_parser()` and
   parses `--config_file X --dataset_config Y` as the script's `__main__` does
   (`verify_command_line_training_args`, `read_config_from_file`);
2. checks every key of our TOML is an argument of that parser (else sd-scripts would ignore it), arrived
   with an equal value, the type argparse would have given it and one of its `choices`, and that sd-scripts'
   own TOML reader (`toml` 0.10) reads the file as Nyx meant it;
3. runs `verify_training_args` and `prepare_dataset_args` (what `train()` runs first);
4. validates the dataset TOML with `ConfigSanitizer(True, True, args.masked_loss, True)` (the flags
   `NetworkTrainer.train` uses), builds the blueprint with `BlueprintGenerator.generate(user_config, args)`,
   compares each subset's parameters with what Nyx wrote, builds the dataset group
   (`generate_dataset_group_by_blueprint`, on a real one-image folder) and runs the trainer's
   `assert_extra_args`;
5. reads the sample prompts with `load_prompts` (each must carry its size and seed, as Nyx writes them);
   checks each `network_args` key is one the network module reads (`kwargs.get("key"…)` in its source:
   sd-scripts' `networks/*.py`; `lycoris/kohya.py` when LyCORIS is installed in that venv, else said),
   and for SD1/SD2/SDXL builds the network as train_network does (`create_network` with the args as
   strings) on sd-scripts' own UNet of the family (made on the meta device, given stride-0 tensors) and
   checks it has 3x3 convolution adapters exactly when the Nyx config asks for them, DoRA's weight
   decomposition exactly for DoRA, and the LyCORIS module class of the kind;
6. builds the optimizer with `train_util.get_optimizer` (on a small tensor) and the schedule with
   `get_scheduler_fix`, and steps them, so `optimizer_args`/`lr_scheduler_args` are really passed. For
   `--custom` exports `pytorch_optimizer.CAME` (in sd-scripts' requirements) is really built, and Nyx's
   REX class is imported by its dotted path from this repository on PYTHONPATH (as the custom backend does).

It prints a table (one row per export) and a summary, and exits 1 on any failure. No weights are loaded.
The top of this file imports only the standard library: the driver runs in sd-scripts' venv.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

DEFAULT_REPO = "https://github.com/kohya-ss/sd-scripts.git"
DEFAULT_COMMIT = "48d368fa557731ad0488c07304dfeba8c07910eb"
DEFAULT_TORCH = "torch==2.13.0 torchvision==0.28.0"
DEFAULT_EXTRAS = "lycoris-lora==3.4.0"
"""Installed beside the requirements: the LyCORIS exports' network module (`lycoris.kohya`), whose source says
which network_args it reads and whose networks are built. Not in sd-scripts' requirements (the custom backends
install it). Pinned: lycoris-lora 4.1.3 stops on sd-scripts' SD1/SD2 UNet here ("duplicated lora name:
lora_unet_time_embedding_linear_1", with any algo or preset); 3.4.0 builds them."""
"""sd-scripts imports torchvision (library/utils.py) without listing it: it comes with torch, as its README says."""
REPO_ROOT = Path(__file__).resolve().parent.parent
TRAINERS = {
    "train_network": "NetworkTrainer",
    "sdxl_train_network": "SdxlNetworkTrainer",
    "flux_train_network": "FluxNetworkTrainer",
    "sd3_train_network": "Sd3NetworkTrainer",
}


def default_workdir() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "nyx" / "sd-scripts-check"


# ------------------------------------------------------------------------------------------------ prepare


def _git(args: list[str], cwd: Path | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=False)
    if check and done.returncode != 0:
        raise SystemExit(f"git {' '.join(args)} failed:\n{done.stderr.strip()}")
    return done


def prepare_checkout(workdir: Path, repo: str, commit: str, say: Any = print) -> Path:
    """A clone of `repo` at `commit` in workdir/sd-scripts (reused when it is already there)."""
    checkout = workdir / "sd-scripts"
    if not (checkout / ".git").exists():
        say(f"cloning {repo} into {checkout}")
        workdir.mkdir(parents=True, exist_ok=True)
        _git(["clone", "--quiet", "--no-checkout", repo, str(checkout)])
    head = _git(["rev-parse", "HEAD"], cwd=checkout, check=False).stdout.strip()
    if head != commit or not (checkout / "train_network.py").is_file():
        if _git(["cat-file", "-e", f"{commit}^{{commit}}"], cwd=checkout, check=False).returncode != 0:
            _git(["fetch", "--quiet", repo, commit], cwd=checkout)
        done = _git(["checkout", "--quiet", "--force", "--detach", commit], cwd=checkout, check=False)
        head = _git(["rev-parse", "HEAD"], cwd=checkout, check=False).stdout.strip()
        if head != commit:
            raise SystemExit(f"cannot check out {commit} in {checkout}:\n{done.stderr.strip()}")
        if done.returncode != 0:
            # a mirror may lack its largest blobs (DLLs, tokenizer files): the Python sources are what matter
            missing = [line for line in done.stderr.splitlines() if "unable to read" in line or "invalid" in line]
            say(f"warning: {len(missing)} file(s) of the checkout could not be read (large blobs absent?)")
    for script in TRAINERS:
        if not (checkout / f"{script}.py").is_file():
            raise SystemExit(f"{checkout} has no {script}.py: not sd-scripts at a recent enough commit")
    return checkout


def prepare_venv(
    workdir: Path, checkout: Path, torch_spec: str, python: str, extras: str = DEFAULT_EXTRAS, say: Any = print
) -> Path:
    """workdir/venv with torch and sd-scripts' requirements; skipped when the same ones are installed."""
    venv = workdir / "venv"
    py = venv / "bin" / "python"
    if not py.exists():
        say(f"creating {venv} with {python}")
        subprocess.run([python, "-m", "venv", str(venv)], check=True)
    requirements = (checkout / "requirements.txt").read_bytes()
    wanted = {"torch": torch_spec, "extras": extras, "requirements_sha256": hashlib.sha256(requirements).hexdigest()}
    marker = workdir / "prepared.json"
    try:
        if json.loads(marker.read_text()).get("packages") == wanted:
            return py
    except (OSError, ValueError):
        pass
    log = workdir / "pip.log"
    say(f"pip install {torch_spec} {extras} -r requirements.txt (in {checkout}; log: {log}; takes minutes)")
    with log.open("w") as out:
        # requirements.txt ends in `-e .` (sd-scripts' `library` package): pip must run in the checkout
        rc = subprocess.run(
            [str(py), "-m", "pip", "install", *torch_spec.split(), *extras.split(), "-r", "requirements.txt"],
            cwd=checkout,
            stdout=out,
            stderr=subprocess.STDOUT,
            check=False,
        ).returncode
    if rc != 0:
        tail = "\n".join(log.read_text().splitlines()[-15:])
        raise SystemExit(f"pip failed (exit {rc}); see {log}:\n{tail}")
    tmp = marker.with_suffix(".tmp")
    tmp.write_text(json.dumps({"packages": wanted, "checkout": str(checkout), "at": time.time()}, indent=2))
    os.replace(tmp, marker)
    return py


def locate_prepared(workdir: Path) -> tuple[Path, Path] | None:
    """(checkout, venv python) of a prepared work folder, or None (for the opt-in pytest)."""
    try:
        marker = json.loads((workdir / "prepared.json").read_text())
    except (OSError, ValueError):
        return None
    checkout, py = Path(marker.get("checkout", workdir / "sd-scripts")), workdir / "venv" / "bin" / "python"
    if not (checkout / "train_network.py").is_file() or not py.exists():
        return None
    return checkout, py


# ------------------------------------------------------------------------------------------------ exports


def _tiny_image_folder(root: Path) -> Path:
    """A kohya `10_mychar` folder with one real PNG and its caption (sd-scripts lists the folder)."""
    import struct
    import zlib

    folder = root / "train" / "10_mychar"
    folder.mkdir(parents=True, exist_ok=True)
    width = height = 64
    rows = b"".join(
        b"\x00" + b"".join(bytes([(x * 4) % 256, (y * 4) % 256, 128]) for x in range(width)) for y in range(height)
    )

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    png = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )
    (folder / "img0.png").write_bytes(png)
    (folder / "img0.txt").write_text("mychar, a test image\n")
    (folder / "img0.caption").write_text("mychar, a test image\n")
    return folder


def build_exports(out: Path, only: str | None = None) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """Export presets and the matrix into `out`; returns the manifest (one entry per export written) and
    the (name, reasons) of configs the export refused (CAME/REX on official sd-scripts …)."""
    sys.path.insert(0, str(REPO_ROOT))

    from nyx_tui.config.model import TrainingConfig
    from nyx_tui.config.presets import list_presets, load_preset
    from nyx_tui.trainers.kohya import samples
    from nyx_tui.trainers.kohya.translate import to_kohya, write_export

    images = _tiny_image_folder(out)
    configs: list[tuple[str, TrainingConfig]] = []
    for name in list_presets():
        data = load_preset(name).model_dump(mode="json")
        data["dataset"]["subsets"] = [{"image_dir": str(images)}]
        data["dataset"]["train_data_dir"] = None
        data["dataset"]["reg_data_dir"] = None
        if data["model"]["family"] == "flux":  # the user sets these files; a repo id is refused for Flux
            data["model"].update(
                pretrained="flux1-dev.safetensors", clip_l="clip_l.safetensors", t5xxl="t5xxl_fp16.safetensors"
            )
            data["model"]["vae"] = "ae.safetensors"
        configs.append((f"preset-{name}", TrainingConfig.model_validate(data)))
    configs += [(s.name, s.config) for s in samples.matrix(str(images))]
    manifest: list[dict[str, Any]] = []
    refused: list[tuple[str, str]] = []
    for name, cfg in configs:
        for custom in (False, True):
            label = name + ("+custom" if custom else "")
            if only and only not in label:
                continue
            export = to_kohya(cfg, custom=custom, output_dir=str(out / "output"))
            if not export.ok:
                refused.append((label, "; ".join(f"{p.field}: {p.message}" for p in export.problems if p.is_error)))
                continue
            manifest.append(manifest_entry(label, cfg, export, write_export(export, out / label), custom))
    return manifest, refused


def manifest_entry(name: str, cfg: Any, export: Any, paths: dict[str, Path], custom: bool) -> dict[str, Any]:
    """What the driver needs about one written export: its files, what Nyx meant by them, and the facts of
    the Nyx config the network check compares with."""
    import tomllib

    return {
        "name": name,
        "module": export.script.removesuffix(".py"),
        "custom": custom,
        "config": str(paths["config"]),
        "dataset": str(paths["dataset"]),
        "expected": tomllib.loads(paths["config"].read_text()),
        "expected_dataset": export.dataset,
        "unet": cfg.model.family.value in ("sd15", "sd2", "sdxl"),
        "family": cfg.model.family.value,
        "kind": cfg.network.kind.value,
        "wants_conv": _wants_conv(cfg),
    }


def _wants_conv(cfg: Any) -> bool:
    """Whether Nyx trains 3x3 convolution adapters for this config (network.conv_dim's rule)."""
    net = cfg.network
    if net.conv_dim is None:
        return bool(net.kind.value in ("locon", "loha", "lokr"))
    return bool(net.conv_dim > 0)


# ------------------------------------------------------------------------------------------------ driver
# Everything below `drive` runs inside sd-scripts' venv, with the checkout as the working folder.


def _type_problem(action: Any, value: Any) -> str | None:
    """What argparse would have produced from the command line, compared with the TOML value."""
    import argparse as ap

    if isinstance(action, (ap._StoreTrueAction, ap._StoreFalseAction)):
        return None if isinstance(value, bool) else f"wants a bool, got {value!r}"
    many = action.nargs in ("*", "+") or isinstance(action.nargs, int)
    items = value if many else [value]
    if many and not isinstance(value, list):
        return f"wants a list (nargs={action.nargs}), got {value!r}"
    for item in items:
        t = action.type
        if t in (int, float, str):
            ok = isinstance(item, t) and not isinstance(item, bool)
            if not ok:
                return f"wants {t.__name__}, got {type(item).__name__} {item!r}"
        elif t is None:
            if not isinstance(item, str):
                return f"wants a str (no type), got {type(item).__name__} {item!r}"
        elif callable(t):
            try:
                converted = t(str(item))
            except Exception as e:
                return f"{getattr(t, '__name__', t)}({item!r}) fails: {e}"
            if converted != item or type(converted) is not type(item):
                return f"{getattr(t, '__name__', t)}({str(item)!r}) gives {converted!r}, TOML has {item!r}"
        if action.choices is not None and item not in action.choices:
            return f"{item!r} is not one of {list(action.choices)}"
    return None


def _network_keys_read(module_name: str) -> set[str] | None:
    """Keys a network module reads from its kwargs (network_args), from its source; None when unknown."""
    import importlib.util
    import re

    try:
        spec = importlib.util.find_spec(module_name)
    except ModuleNotFoundError:  # its package (lycoris) is not installed
        return None
    if spec is None or not spec.origin:
        return None
    text = Path(spec.origin).read_text(encoding="utf-8")
    return set(re.findall(r"""kwargs\.get\(\s*["']([A-Za-z0-9_]+)["']""", text))


def _unet_models(family: str, cache: dict[str, Any]) -> tuple[Any, Any]:
    """sd-scripts' own UNet of the family (what train_network hands the network module), built on the meta
    device and given stride-0 CPU tensors (the real shapes, no memory), and a small CLIP text encoder from a
    config (the module classes sd-scripts' CLIP has)."""
    key = f"models-{family}"
    if key not in cache:
        import torch
        from transformers import CLIPTextConfig, CLIPTextModel

        with torch.device("meta"):
            if family == "sdxl":
                from library.sdxl_original_unet import SdxlUNet2DConditionModel

                unet = SdxlUNet2DConditionModel()
            else:
                from library.original_unet import UNet2DConditionModel

                v2 = family == "sd2"  # model_util's SD2 settings: 64-channel heads, 1024-wide text, linear proj
                unet = UNet2DConditionModel(
                    sample_size=96 if v2 else 64,
                    attention_head_dim=[5, 10, 20, 20] if v2 else 8,
                    cross_attention_dim=1024 if v2 else 768,
                    use_linear_projection=v2,
                )
            te = CLIPTextModel(
                CLIPTextConfig(
                    hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, vocab_size=1000
                )
            )
        for model in (unet, te):  # real CPU tensors of the right shapes, one element of storage each
            for module in model.modules():
                for name, t in list(module._parameters.items()):
                    if t is not None:
                        module._parameters[name] = torch.nn.Parameter(
                            torch.full((1,), 0.01).expand(t.shape), requires_grad=False
                        )
                for name, t in list(module._buffers.items()):
                    if t is not None:
                        module._buffers[name] = torch.zeros((1,), dtype=t.dtype).expand(t.shape)
        cache[key] = (unet, te if family != "sdxl" else [te, te])
    models: tuple[Any, Any] = cache[key]
    return models


def _check_network(args: Any, net_kwargs: dict[str, str], entry: dict[str, Any], cache: dict[str, Any]) -> list[str]:
    """Build the network as train_network does (create_network with network_args as strings) on sd-scripts'
    UNet of the family, and check it has what the Nyx config asked for: 3x3 convolution adapters or none, DoRA's weight
    decomposition, the LyCORIS algorithm."""
    import importlib

    import torch

    family = entry["family"]
    key = json.dumps([family, args.network_module, args.network_dim, args.network_alpha, sorted(net_kwargs.items())])
    seen = cache.setdefault("networks", {})
    if key in seen:
        return list(seen[key])
    unet, te = _unet_models(family, cache)
    module = importlib.import_module(args.network_module)
    kwargs = dict(net_kwargs)
    kwargs.setdefault("dropout", args.network_dropout)
    network = module.create_network(
        1.0, args.network_dim, args.network_alpha, None, te, unet, neuron_dropout=args.network_dropout, **kwargs
    )
    errors: list[str] = []
    loras = list(network.unet_loras)
    if not loras:
        errors.append("network: no UNet adapters were created")

    def is_conv3(m: Any) -> bool:
        if hasattr(m, "lora_down"):  # sd-scripts' LoRAModule
            return isinstance(m.lora_down, torch.nn.Conv2d) and tuple(m.lora_down.kernel_size) != (1, 1)
        return getattr(m, "module_type", "") == "conv2d" and tuple(m.shape[2:]) != (1, 1)

    conv3 = sum(1 for m in loras if is_conv3(m))
    if bool(conv3) != entry["wants_conv"]:
        errors.append(
            f"network: {conv3} 3x3 convolution adapters, but the Nyx config wants "
            f"{'some' if entry['wants_conv'] else 'none'} (network_args {sorted(net_kwargs.items())})"
        )
    if args.network_module == "lycoris.kohya":
        dora = any(getattr(m, "wd", False) for m in loras)
        if dora != (entry["kind"] == "dora"):
            errors.append(f"network: weight decomposition {dora}, the Nyx kind is {entry['kind']}")
        classes = {type(m).__name__ for m in loras}
        want = {"locon": "LoConModule", "dora": "LoConModule", "loha": "LohaModule", "lokr": "LokrModule"}
        if classes != {want[entry["kind"]]}:
            errors.append(f"network: LyCORIS modules {sorted(classes)}, the Nyx kind is {entry['kind']}")
    seen[key] = errors
    return list(errors)


def _check_one(entry: dict[str, Any], cache: dict[str, Any]) -> dict[str, Any]:
    import importlib
    import math

    import toml
    import torch
    from library import config_util, train_util

    errors: list[str] = []
    notes: list[str] = []
    stage = "import"
    try:
        mod = cache.get(entry["module"]) or importlib.import_module(entry["module"])
        cache[entry["module"]] = mod
        stage = "parse"
        parser = mod.setup_parser()
        argv = ["--config_file", entry["config"], "--dataset_config", entry["dataset"]]
        sys.argv = [f"{entry['module']}.py", *argv]  # read_config_from_file parses sys.argv again
        try:
            args = parser.parse_args()
            train_util.verify_command_line_training_args(args)
            args = train_util.read_config_from_file(args, parser)
        except SystemExit as e:
            return {"name": entry["name"], "ok": False, "errors": [f"the parser exited ({e.code})"], "notes": []}
        actions = {a.dest: a for a in parser._actions}
        loaded = toml.load(entry["config"])
        if loaded != entry["expected"]:
            diff = sorted(k for k in set(loaded) | set(entry["expected"]) if loaded.get(k) != entry["expected"].get(k))
            errors.append(f"sd-scripts' toml reads these keys differently from tomllib: {diff}")
        for key, value in loaded.items():
            action = actions.get(key)
            if action is None:
                errors.append(f"{key}: not an argument of {entry['module']} (sd-scripts would ignore it)")
                continue
            if getattr(args, key) != value:
                errors.append(f"{key}: parsed as {getattr(args, key)!r}, TOML has {value!r}")
            problem = _type_problem(action, value)
            if problem:
                errors.append(f"{key}: {problem}")
        stage = "verify_training_args"
        train_util.verify_training_args(args)
        train_util.prepare_dataset_args(args, True)

        stage = "dataset"
        sanitizer = config_util.ConfigSanitizer(True, True, args.masked_loss, True)
        user_config = config_util.load_user_config(entry["dataset"])
        sanitizer.sanitize_user_config(user_config)
        blueprint = config_util.BlueprintGenerator(sanitizer).generate(user_config, args)
        want = entry["expected_dataset"]
        general = want.get("general", {})
        for i, ds_bp in enumerate(blueprint.dataset_group.datasets):
            ds_want = want["datasets"][i]
            for key in ("batch_size", "enable_bucket", "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps"):
                if key in ds_want and getattr(ds_bp.params, key) != ds_want[key]:
                    errors.append(f"dataset {key}: blueprint {getattr(ds_bp.params, key)!r}, TOML {ds_want[key]!r}")
            reso = ds_bp.params.resolution
            if tuple(reso) != (ds_want["resolution"], ds_want["resolution"]):
                errors.append(f"dataset resolution: blueprint {reso!r}, TOML {ds_want['resolution']!r}")
            for j, sub_bp in enumerate(ds_bp.subsets):
                merged = {**general, **{k: v for k, v in ds_want.items() if k != "subsets"}}
                merged.update(ds_want["subsets"][j])
                for key, value in merged.items():
                    if hasattr(sub_bp.params, key) and getattr(sub_bp.params, key) != value:
                        errors.append(f"subset {j} {key}: blueprint {getattr(sub_bp.params, key)!r}, TOML {value!r}")
        train_group, val_group = config_util.generate_dataset_group_by_blueprint(blueprint.dataset_group)
        if len(train_group) == 0:
            errors.append("the dataset group is empty (sd-scripts: No data found)")
        stage = "assert_extra_args"
        trainer = getattr(mod, TRAINERS[entry["module"]])()
        trainer.assert_extra_args(args, train_group, val_group)

        if args.sample_prompts:
            stage = "sample_prompts"
            prompts = train_util.load_prompts(args.sample_prompts)
            if not prompts:
                errors.append(f"sample_prompts: sd-scripts reads no prompt from {args.sample_prompts}")
            for i, prompt in enumerate(prompts):
                missing = [k for k in ("prompt", "width", "height", "seed") if k not in prompt]
                if missing:
                    errors.append(f"sample prompt {i}: sd-scripts reads no {missing} from it")

        stage = "network_args"
        net_kwargs = dict(item.split("=", 1) for item in (args.network_args or []))
        read = _network_keys_read(args.network_module)
        if read is None:
            if net_kwargs:
                notes.append(
                    f"{args.network_module} not installed here: network_args keys {sorted(net_kwargs)} unchecked"
                )
        else:
            read.add("dropout")  # train_network passes it itself (LyCORIS' workaround)
            unread = sorted(set(net_kwargs) - read)
            if unread:
                errors.append(f"network_args {unread}: {args.network_module} does not read them")

        if entry.get("unet") and read is not None:
            stage = "network"
            errors += _check_network(args, net_kwargs, entry, cache)

        stage = "optimizer"
        if args.max_train_steps is None or args.max_train_epochs:
            # train() computes it from the epochs and the data loader's length
            args.max_train_steps = int(args.max_train_epochs or 1) * max(1, len(train_group))
        param = torch.nn.Parameter(torch.zeros(8, 8))
        groups = [{"params": [param], "lr": args.learning_rate}]
        try:
            _name, _desc, optimizer = train_util.get_optimizer(args, groups)
        except Exception as e:
            if "cuda" in str(e).lower() or "gpu" in str(e).lower():
                notes.append(f"optimizer {args.optimizer_type} not built on this CPU box: {e}")
                optimizer = None
            else:
                raise
        if optimizer is not None:
            stage = "scheduler"
            scheduler = train_util.get_scheduler_fix(args, optimizer, 1)
            train_fn, _eval_fn = train_util.get_optimizer_train_eval_fn(optimizer, args)
            train_fn()
            for _ in range(3):
                param.grad = torch.full_like(param, 0.01)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            lrs = [g["lr"] for g in optimizer.param_groups]
            if not all(isinstance(lr, float) and math.isfinite(lr) for lr in lrs):
                errors.append(f"scheduler gives learning rates {lrs}")
            if entry["custom"] and args.lr_scheduler_type:
                notes.append(f"custom schedule {type(scheduler).__name__} built by dotted path")
            if entry["custom"] and "." in (args.optimizer_type or ""):
                notes.append(f"custom optimizer {type(optimizer).__name__} built by dotted path")
    except Exception as e:
        errors.append(f"{stage}: {type(e).__name__}: {e}")
    return {"name": entry["name"], "ok": not errors, "errors": errors, "notes": notes}


def _import_torchvision() -> str | None:
    """sd-scripts imports torchvision (only its Python transforms on this path). PyPI's torchvision wheel is
    built against CUDA torch; beside a CPU torch its C ops do not load and its import dies registering fake
    kernels for them. Then import it with those registrations skipped (detection ops nobody here calls) and
    say so; with a matching torchvision this does nothing."""
    try:
        import torchvision
    except RuntimeError as e:
        if "torchvision::" not in str(e):
            raise
    else:
        return None
    import torch.library as tl

    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    real = tl.register_fake

    def tolerant(op: Any, fn: Any = None, /, *args: Any, **kwargs: Any) -> Any:
        if isinstance(op, str) and op.startswith("torchvision::"):
            return fn if fn is not None else (lambda f: f)
        return real(op, fn, *args, **kwargs)

    tl.register_fake = tolerant
    try:
        import torchvision  # noqa: F401
    finally:
        tl.register_fake = real
    return "torchvision's C ops do not load beside this torch (CPU torch, CUDA torchvision): imported without them"


def drive(manifest_path: Path, results_path: Path) -> int:
    import contextlib
    import io
    import logging

    sys.path.insert(0, os.getcwd())  # the checkout: its scripts are modules, not installed
    logging.disable(logging.WARNING)
    tv_note = _import_torchvision()
    entries = json.loads(manifest_path.read_text())
    cache: dict[str, Any] = {}
    results = []
    for entry in entries:
        sink = io.StringIO()
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            result = _check_one(entry, cache)
        if tv_note:
            result["notes"].append(tv_note)
        if not result["ok"] and sink.getvalue().strip():
            result["errors"].append("output: " + " | ".join(sink.getvalue().strip().splitlines()[-3:]))
        results.append(result)
    tmp = results_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1))
    os.replace(tmp, results_path)
    return 0


# ------------------------------------------------------------------------------------------------ main


def run_driver(checkout: Path, python: Path, manifest: list[dict[str, Any]], folder: Path) -> list[dict[str, Any]]:
    """Run the driver (this file, `--drive`) with sd-scripts' venv on `manifest`; its results, one per entry."""
    manifest_path, results_path = folder / "manifest.json", folder / "results.json"
    manifest_path.write_text(json.dumps(manifest))
    results_path.unlink(missing_ok=True)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
        "PYTHONPATH": str(REPO_ROOT),  # Nyx's REX class, by dotted path, as the custom backend does
        "HF_HUB_OFFLINE": "1",
        "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
    }
    done = subprocess.run(
        [str(python), str(Path(__file__).resolve()), "--drive", str(manifest_path), str(results_path)],
        cwd=checkout,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0 or not results_path.exists():
        raise SystemExit(f"the driver failed (exit {done.returncode}):\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    results: list[dict[str, Any]] = json.loads(results_path.read_text())
    return results


def run_check(checkout: Path, python: Path, only: str | None = None, keep: Path | None = None) -> dict[str, Any]:
    """Export, run the driver in sd-scripts' venv; {results, refused, exported (count), seconds}."""
    out = Path(tempfile.mkdtemp(prefix="nyx-kohya-check-")) if keep is None else keep
    try:
        manifest, refused = build_exports(out, only)
        started = time.monotonic()
        results = run_driver(checkout, python, manifest, out)
        return {
            "results": results,
            "refused": refused,
            "exported": len(manifest),
            "seconds": time.monotonic() - started,
        }
    finally:
        if keep is None:
            shutil.rmtree(out, ignore_errors=True)


def report(outcome: dict[str, Any], verbose: bool = False) -> int:
    results = outcome["results"]
    width = max([len(r["name"]) for r in results] + [10])
    for r in results:
        if verbose or not r["ok"]:
            print(f"{r['name']:<{width}}  {'pass' if r['ok'] else 'FAIL'}")
            for e in r["errors"]:
                print(f"{'':<{width}}    {e}")
            for n in r["notes"] if verbose else []:
                print(f"{'':<{width}}    note: {n}")
    by_module: dict[str, list[int]] = {}
    for r in results:
        family = r["name"].split("-")[0] if not r["name"].startswith("preset-") else "preset"
        by_module.setdefault(family, [0, 0])[0 if r["ok"] else 1] += 1
    print(f"\n{'group':<10} {'pass':>6} {'fail':>6}")
    for k, (ok, bad) in sorted(by_module.items()):
        print(f"{k:<10} {ok:>6} {bad:>6}")
    failed = [r for r in results if not r["ok"]]
    notes = sorted({n.split(":")[0] for r in results for n in r["notes"]})
    print(
        f"\n{len(results)} of {outcome.get('exported', len(results))} exports checked with sd-scripts' own parser, "
        "dataset validator, optimizer and "
        f"schedule builders in {outcome['seconds']:.0f} s: {len(results) - len(failed)} pass, {len(failed)} fail"
    )
    reasons: dict[str, int] = {}
    for _name, why in outcome["refused"]:
        for part in why.split("; "):
            reasons[part.split(":")[0]] = reasons.get(part.split(":")[0], 0) + 1
    print(
        f"{len(outcome['refused'])} configs refused by the export itself (not written, as designed): "
        + ", ".join(f"{k} ×{n}" for k, n in sorted(reasons.items()))
    )
    if verbose:
        for name, why in outcome["refused"]:
            print(f"  refused {name}: {why}")
    if notes:
        print("notes (not failures): " + "; ".join(notes))
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--sd-scripts", type=Path, help="an existing sd-scripts checkout (no clone)")
    p.add_argument("--repo", default=DEFAULT_REPO, help=f"git URL or path to clone (default {DEFAULT_REPO})")
    p.add_argument("--commit", default=DEFAULT_COMMIT, help="the commit to check against")
    p.add_argument("--workdir", type=Path, default=default_workdir(), help="where the clone and venv live")
    p.add_argument(
        "--torch", default=DEFAULT_TORCH, help=f"torch requirements, space-separated (default {DEFAULT_TORCH!r})"
    )
    p.add_argument("--extras", default=DEFAULT_EXTRAS, help=f"more packages for the venv (default {DEFAULT_EXTRAS!r})")
    p.add_argument("--python", default="python3.11", help="the Python that makes the venv")
    p.add_argument("--only", help="check only exports whose name contains this")
    p.add_argument("--keep", type=Path, help="write the exports here and keep them")
    p.add_argument("-v", "--verbose", action="store_true", help="one row per export, with notes")
    p.add_argument("--drive", nargs=2, metavar=("MANIFEST", "RESULTS"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.drive:
        return drive(Path(args.drive[0]), Path(args.drive[1]))
    workdir = args.workdir.expanduser().absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    checkout = args.sd_scripts.expanduser().absolute() if args.sd_scripts else None
    if checkout is None:
        checkout = prepare_checkout(workdir, args.repo, args.commit)
    python = prepare_venv(workdir, checkout, args.torch, args.python, args.extras)
    commit = _git(["rev-parse", "HEAD"], cwd=checkout, check=False).stdout.strip()
    print(f"sd-scripts {commit or '?'} in {checkout}; venv {python}")
    return report(run_check(checkout, python, args.only, args.keep), args.verbose)


if __name__ == "__main__":
    sys.exit(main())
