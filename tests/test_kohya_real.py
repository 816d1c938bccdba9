"""Opt-in: the kohya export through sd-scripts' REAL parser, dataset validator, optimizer and schedule builders
(`bench/kohya_parser_check.py`), in sd-scripts' own venv at a pinned commit.

Needs a prepared work folder: `python bench/kohya_parser_check.py --repo URL_OR_MIRROR` makes one (default
`~/.cache/nyx/sd-scripts-check`); then `NYX_SD_SCRIPTS=~/.cache/nyx/sd-scripts-check pytest -m sdscripts
tests/test_kohya_real.py`. Without NYX_SD_SCRIPTS these tests skip (the one opt-in skip); with it set to a
folder that is not prepared they fail, saying so.
"""

from __future__ import annotations

import importlib.util
import os
import tomllib
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import tomli_w

from nyx_tui.trainers.kohya import samples
from nyx_tui.trainers.kohya.translate import to_kohya, write_export

pytestmark = pytest.mark.sdscripts

BENCH = Path(__file__).resolve().parent.parent / "bench" / "kohya_parser_check.py"


def _bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("kohya_parser_check", BENCH)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def sd_scripts() -> tuple[ModuleType, Path, Path]:
    """(the bench module, the checkout, the venv's python) of the prepared work folder."""
    workdir = os.environ.get("NYX_SD_SCRIPTS")
    if not workdir:
        pytest.skip(
            "opt-in: set NYX_SD_SCRIPTS to a work folder prepared by "
            "`python bench/kohya_parser_check.py --repo https://github.com/kohya-ss/sd-scripts.git`"
        )
    bench = _bench()
    found = bench.locate_prepared(Path(workdir).expanduser())
    assert found, f"NYX_SD_SCRIPTS={workdir} is not a prepared work folder: run bench/kohya_parser_check.py first"
    checkout, python = found
    return bench, checkout, python


def test_every_preset_and_matrix_export_passes_sd_scripts(sd_scripts: tuple[ModuleType, Path, Path]) -> None:
    bench, checkout, python = sd_scripts
    outcome = bench.run_check(checkout, python)
    results = outcome["results"]
    assert len(results) == outcome["exported"] > 1000
    assert {r["name"] for r in results} >= {"preset-sdxl-lora", "flux-dora-adamw-x4", "sd3-lokr-came-x0+custom"}
    failed = {r["name"]: r["errors"] for r in results if not r["ok"]}
    assert not failed, "\n".join(f"{k}: {v}" for k, v in list(failed.items())[:20])
    notes = {n for r in results for n in r["notes"]}
    assert any("RexLR built by dotted path" in n for n in notes)  # the custom schedule really was built
    assert any("CAME built by dotted path" in n for n in notes)


def _entry(bench: ModuleType, folder: Path, image_dir: str, name: str, **sections: dict[str, Any]) -> dict[str, Any]:
    cfg = samples.make("sd15", image_dir, **sections)
    export = to_kohya(cfg, output_dir=str(folder / "output"))
    assert export.ok, export.problems
    entry: dict[str, Any] = bench.manifest_entry(name, cfg, export, write_export(export, folder / name), False)
    return entry


def _tamper(entry: dict[str, Any], config: dict[str, Any] | None = None, general: dict[str, Any] | None = None) -> None:
    if config is not None:
        entry["expected"].update(config)
        Path(entry["config"]).write_text(tomli_w.dumps(entry["expected"]))
    if general is not None:
        data = tomllib.loads(Path(entry["dataset"]).read_text())
        data["general"].update(general)
        Path(entry["dataset"]).write_text(tomli_w.dumps(data))


def test_the_driver_finds_what_sd_scripts_would_ignore_or_reject(
    sd_scripts: tuple[ModuleType, Path, Path], tmp_path: Path
) -> None:
    """Broken exports, one fault each: the check must name each fault (so a pass above means something)."""
    bench, checkout, python = sd_scripts
    images = str(bench._tiny_image_folder(tmp_path))
    cases: dict[str, tuple[dict[str, Any], str]] = {
        "unknown-key": ({"config": {"nyx_unknown_option": 1}}, "not an argument of train_network"),
        "int-for-float": ({"config": {"learning_rate": 1}}, "learning_rate: wants float"),
        "bad-choice": ({"config": {"mixed_precision": "fp32"}}, "is not one of"),
        "unread-network-arg": ({"config": {"network_args": ["bogus_option=1"]}}, "does not read them"),
        "optimizer-kwarg": ({"config": {"optimizer_args": ["no_such_kw=1"]}}, "optimizer: TypeError"),
        "rejected-combination": (
            {"config": {"scale_v_pred_loss_like_noise_pred": True}},
            "verify_training_args: ValueError",
        ),
        "dataset-unknown-key": ({"general": {"bogus_key": True}}, "dataset:"),
        # the bug this check found: LyCORIS trains 3x3 convolutions for a DoRA without conv_dim
        "dora-without-preset": (
            {"config": {"network_args": ["algo=lora", "dora_wd=True"]}},
            "3x3 convolution adapters, but the Nyx config wants none",
        ),
    }
    dora: dict[str, dict[str, Any]] = {"network": {"kind": "dora", "dim": 8}}
    manifest = [_entry(bench, tmp_path, images, "good"), _entry(bench, tmp_path, images, "good-dora", **dora)]
    for name, (tamper, _expected) in cases.items():
        entry = _entry(bench, tmp_path, images, name, **(dora if name == "dora-without-preset" else {}))
        _tamper(entry, **tamper)
        manifest.append(entry)
    results = {r["name"]: r for r in bench.run_driver(checkout, python, manifest, tmp_path)}
    assert results["good"]["ok"], results["good"]["errors"]
    assert results["good-dora"]["ok"], results["good-dora"]["errors"]
    for name, (_tamper_args, expected) in cases.items():
        r = results[name]
        assert not r["ok"], name
        assert any(expected in e for e in r["errors"]), (name, r["errors"])
