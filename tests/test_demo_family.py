"""`nyx demo --family flux|sd3`: the tiny model of that family, the shared shapes dataset, a config that fits
(64 px, a short run, samples before and after), and the whole run end to end: a quick check that a new box
can train the family with nothing downloaded.

The end-to-end tests need the native engine's flow-matching loop; the others only the demo side.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import run_nyx

from nyx_tui import demo
from nyx_tui.config.model import TrainingConfig
from nyx_tui.config.prompts import parse_prompts
from nyx_tui.jobs.events import read_events

FLOW = ("flux", "sd3")


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One workspace with both flow models and the dataset, made as `nyx demo` makes them (a child process)."""
    ws = tmp_path_factory.mktemp("demo-ws")
    for family in FLOW:
        demo.prepare_workspace(ws, family)
    return ws


def test_family_models_sit_beside_the_sd15_one(ws: Path) -> None:
    assert demo.model_dir(ws, "flux") == ws / "model-flux"
    assert demo.model_dir(ws, "sd3") == ws / "model-sd3"
    assert demo.model_dir(ws) == ws / "model"  # the SD1.5 demo's folder is unchanged
    for family in FLOW:
        assert demo.is_ready(ws, family)
    assert not demo.is_ready(ws)  # only the families asked for are built
    assert len(list((ws / "dataset").glob("*.png"))) == 24  # one dataset for every family


def test_assets_are_idempotent_and_say_where_they_are(ws: Path) -> None:
    stamp = {p: p.stat().st_mtime_ns for p in (ws / "model-flux").rglob("*.safetensors")}
    proc = subprocess.run(
        [sys.executable, "-m", "nyx_tui.demo_assets", str(ws), "--family", "flux"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {
        "model": str(ws / "model-flux"),
        "dataset": str(ws / "dataset"),
    }
    assert {p: p.stat().st_mtime_ns for p in (ws / "model-flux").rglob("*.safetensors")} == stamp  # not rebuilt
    bad = subprocess.run(
        [sys.executable, "-m", "nyx_tui.demo_assets", str(ws), "--family", "sdxl"], capture_output=True, text=True
    )
    assert bad.returncode == 2 and "--family sd15|flux|sd3" in bad.stderr


def test_the_flux_demo_model_is_dev_style_and_loads(ws: Path) -> None:
    pytest.importorskip("torch")
    from nyx_tui.config.model import ModelSection
    from nyx_tui.trainers.native.flow_files import load_flow_model

    flux = load_flow_model(ModelSection.model_validate({"family": "flux", "pretrained": str(ws / "model-flux")}))
    assert flux.variant == "dev" and flux.guidance_embeds
    sd3 = load_flow_model(ModelSection.model_validate({"family": "sd3", "pretrained": str(ws / "model-sd3")}))
    assert sd3.text_encoder_3 is not None


@pytest.mark.parametrize("family", FLOW)
def test_family_config_fits_the_tiny_model(family: str, ws: Path) -> None:
    path = demo.write_config(ws, family=family)
    assert path == ws / f"demo-{family}.toml"
    from nyx_tui.config.io import load_config

    cfg: TrainingConfig = load_config(path)
    assert cfg.model.family.value == family
    assert Path(cfg.model.pretrained) == ws / f"model-{family}"  # relative to the workspace
    assert cfg.dataset.resolution == 64 and not cfg.dataset.enable_bucket
    assert cfg.training.max_steps == demo.FLOW_STEPS
    assert cfg.sampling.sample_at_first and cfg.sampling.every_n_steps == cfg.training.max_steps
    assert parse_prompts(cfg.sampling.prompts)
    short = demo.config_data(family, steps=12)
    assert short["training"]["max_steps"] == 12 and short["sampling"]["every_n_steps"] == 12
    assert short["scheduler"]["warmup_steps"] < 12
    # the SD1.5 demo's config is still the preset as it was
    sd15 = demo.config_data()
    assert sd15["model"]["family"] == "sd15" and "sampling" not in sd15


# ------------------------------------------------------------------------------ end to end (needs the engine)


@pytest.fixture(scope="module", params=FLOW)
def run(request: pytest.FixtureRequest, ws: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    family: str = request.param
    home = tmp_path_factory.mktemp(f"home-{family}")
    proc = run_nyx(
        "demo", "--family", family, "--headless", "--workspace", str(ws), "--json", "--steps", "12", home=home
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    answer = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"family": family, "home": home, "answer": answer}


@pytest.mark.slow
def test_family_demo_trains_saves_and_samples(run: dict[str, Any], ws: Path) -> None:
    family, answer = run["family"], run["answer"]
    assert set(answer) == {"job", "lora", "model", "dataset"}
    assert Path(answer["model"]) == ws / f"model-{family}"
    lora = Path(answer["lora"])
    assert lora.is_file()
    events = read_events(run["home"] / "jobs" / answer["job"] / "events.jsonl")
    assert events[-1]["kind"] == "end" and events[-1]["state"] == "finished"
    losses = [e["loss"] for e in events if e["kind"] == "step"]
    assert len(losses) == 12 and all(loss == loss for loss in losses)  # every step, none NaN
    samples = [e for e in events if e["kind"] == "sample"]
    assert [e["step"] for e in samples] == [0, 12]  # before and after
    for event in samples:
        assert len(event["images"]) == len(demo.FLOW_PROMPTS)
        assert all(Path(p).is_file() for p in event["images"])
    assert Path(samples[-1]["images"][0]).parent == lora.parent / "samples"


@pytest.mark.slow
def test_family_demo_config_passes_the_check(run: dict[str, Any], ws: Path) -> None:
    proc = run_nyx("config", "check", str(ws / f"demo-{run['family']}.toml"), home=run["home"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
