"""The LR range test: the suggestion rule on synthetic curves, the range checks, and `nyx lr-find` on the
tiny SD1.5 model as a real job (CLI → supervisor → worker), its curve in the events and in report.json."""

from __future__ import annotations

import json
import math
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tomli_w
from conftest import run_nyx

import nyx_tui.config
from nyx_tui.jobs.events import read_events
from nyx_tui.jobs.jobdir import list_jobs
from nyx_tui.workflows.lr_find import lr_at, range_problem, suggest

PRESET = Path(nyx_tui.config.__file__).parent / "presets" / "demo-tiny-cpu.toml"


def test_learning_rates_rise_exponentially_from_start_to_end() -> None:
    lrs = [lr_at(i, 7, 1e-6, 1.0) for i in range(7)]
    assert lrs[0] == pytest.approx(1e-6) and lrs[-1] == pytest.approx(1.0)
    assert np.allclose(np.diff(np.log10(lrs)), 1.0)


def test_suggestion_is_the_steepest_descent_of_the_smoothed_loss() -> None:
    """A clean curve: flat, a fall that is steepest around 1e-3, a floor, then an explosion."""
    lrs = [lr_at(i, 100, 1e-7, 1.0) for i in range(100)]
    x = np.log10(lrs)
    loss = 1.0 - 0.8 / (1 + np.exp(-(x + 3) * 3))  # a logistic fall centred on 1e-3
    loss = np.where(x > -1, loss + (x + 1) ** 2 * 5, loss)  # explodes past 0.1
    lr, rule = suggest(lrs, list(loss), 1e-7, 1.0, span=3)
    assert "steepest descent" in rule
    assert 10**-3.5 < lr < 10**-2.5  # the middle of the fall (the smoothing lags it a little)


def test_suggestion_without_a_fall_stays_in_the_range() -> None:
    lrs = [lr_at(i, 20, 1e-5, 1e-2) for i in range(20)]
    rising = list(np.linspace(1.0, 3.0, 20))
    lr, rule = suggest(lrs, rising, 1e-5, 1e-2)
    assert lr == 1e-5 and "never fell" in rule  # a tenth of 1e-5 would leave the range: clamped to its start
    assert suggest([], [], 1e-5, 1e-2)[0] == 1e-5


@pytest.mark.parametrize(
    ("start", "end", "steps", "words"),
    [(1e-3, 1e-4, 50, "below --end"), (0.0, 1.0, 50, "positive"), (1e-7, 1.0, 2, "at least")],
)
def test_bad_ranges_are_refused(start: float, end: float, steps: int, words: str) -> None:
    problem = range_problem(start, end, steps)
    assert problem is not None and words in problem
    assert range_problem(1e-7, 1.0, 100) is None


def write_config(assets: dict[str, Path], path: Path) -> Path:
    data: dict[str, Any] = tomllib.loads(PRESET.read_text())
    data["model"]["pretrained"] = str(assets["model"])
    data["dataset"]["subsets"] = [{"image_dir": str(assets["dataset"])}]
    path.write_text(tomli_w.dumps(data))
    return path


def test_lr_find_job_sweeps_suggests_and_stops_when_the_loss_explodes(
    assets: dict[str, Path], nyx_home: Path, tmp_path: Path
) -> None:
    """From 1e-4 to 1e4 in 40 steps (×1.6 a step): the tiny model's loss falls, then blows up at the top of
    the range (AdamW at a learning rate of 10 gives NaN within a few steps), so the sweep stops early."""
    start, end, steps = 1e-4, 1e4, 40
    config = write_config(assets, tmp_path / "cfg.toml")
    args = ["lr-find", str(config), "--start", str(start), "--end", str(end), "--steps", str(steps)]
    proc = run_nyx(*args, home=nyx_home, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (job,) = list_jobs(nyx_home / "jobs")
    assert json.loads(job.spec_path.read_text())["kind"] == "lr-find"
    report = json.loads((job.path / "report.json").read_text())
    suggestion = report["suggestion"]
    assert start <= suggestion <= end
    assert f"suggested learning rate: {suggestion:.3g}" in proc.stdout
    # the curve is in the events: one metric a step, with its learning rate, rising exponentially
    events = read_events(job.events_path)
    curve = [e for e in events if e["kind"] == "metric" and e["name"] == "lr_find"]
    assert [e["step"] for e in curve] == list(range(1, len(curve) + 1))
    assert [e["lr"] for e in curve] == pytest.approx([lr_at(i, steps, start, end) for i in range(len(curve))])
    assert all(math.isfinite(e["value"]) for e in curve)
    assert [(c["lr"], c["loss"]) for c in report["curve"]] == [(e["lr"], e["value"]) for e in curve]
    # stopped early at the explosion; the suggestion comes from before it
    assert report["stopped_early"] and len(curve) < steps
    assert suggestion <= curve[-1]["lr"]
    (suggested,) = [e for e in events if e["kind"] == "metric" and e["name"] == "lr_suggestion"]
    assert suggested["value"] == suggestion
    assert any(e["kind"] == "log" and "suggested learning rate" in e["message"] for e in events)
    assert any(e["kind"] == "artifact" and e["what"] == "report" for e in events)
    (end_event,) = [e for e in events if e["kind"] == "end"]
    assert end_event["state"] == "finished"
    assert not list(job.path.glob("**/*.safetensors"))  # nothing saved


def test_lr_find_refuses_a_bad_range_before_starting(assets: dict[str, Path], nyx_home: Path, tmp_path: Path) -> None:
    config = write_config(assets, tmp_path / "cfg.toml")
    proc = run_nyx("lr-find", str(config), "--start", "1", "--end", "0.1", home=nyx_home)
    assert proc.returncode == 2 and "below --end" in proc.stderr
    assert not list_jobs(nyx_home / "jobs")
