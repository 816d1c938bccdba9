"""The automatic quality checks (nyx_tui/trainers/native/quality.py): the watches on synthetic loss curves,
the checkpoint ranking and the sample statistics on real PNG files, then two tiny real runs: one whose
learning rate makes it diverge (through the supervisor: a `failed` end with the cause and the fix), one on a
dataset whose held-out image is unlike the training ones, with the overfitting check stopping it.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import wait_for
from PIL import Image

import nyx_tui.config
from nyx_tui.config.io import dumps_config
from nyx_tui.config.model import TrainingConfig
from nyx_tui.jobs.events import read_events
from nyx_tui.jobs.jobdir import TERMINAL, JobDir, create_job
from nyx_tui.trainers.native.quality import (
    Checkpoint,
    DivergenceWatch,
    LossSmoother,
    OverfitWatch,
    RunRecord,
    build_report,
    compare_samples,
    rank_checkpoints,
    summary,
)

PRESET = Path(nyx_tui.config.__file__).parent / "presets" / "demo-tiny-cpu.toml"


# ------------------------------------------------------------------------------------- the watches


def noisy(n: int, level: float, seed: int = 0) -> list[float]:
    """A diffusion-like loss curve: a level with heavy per-step noise (timesteps differ every step)."""
    rng = np.random.default_rng(seed)
    return list(level * rng.lognormal(0.0, 0.5, n))


def feed(watch: DivergenceWatch, losses: list[float]) -> Any:
    for step, loss in enumerate(losses, 1):
        found = watch.update(step, loss)
        if found is not None:
            return found
    return None


def test_smoother_is_bias_corrected() -> None:
    s = LossSmoother(20)
    assert s.value is None
    assert s.update(0.5) == pytest.approx(0.5)  # not pulled towards 0 by the empty start
    assert all(s.update(0.5) == pytest.approx(0.5) for _ in range(10))
    assert 0.5 < s.update(1.5) < 1.5


def test_divergence_watch_ignores_noise_and_a_short_spike() -> None:
    assert feed(DivergenceWatch(), noisy(2000, 0.1)) is None
    spike = noisy(300, 0.1)
    spike[150:154] = [2.0] * 4  # 4 steps at 20×: the smoothed loss crosses 5× its best, but not for 20 steps
    watch, alarmed = DivergenceWatch(), 0
    for step, loss in enumerate(spike, 1):
        assert watch.update(step, loss) is None
        alarmed += watch.alarmed
    assert 0 < alarmed < 20  # it was above the threshold: patience_steps is what forgave it


def test_divergence_watch_stops_an_explosion_and_dates_it() -> None:
    curve = noisy(200, 0.1) + noisy(200, 2.0, seed=1)  # 20× from step 201 on
    found = feed(DivergenceWatch(factor=5, warmup=50, patience=20, span=20), curve)
    assert found is not None and found.cause == "explosion"
    assert 201 <= found.onset <= found.step <= 201 + 20 + 40  # within patience + the smoother's lag
    assert found.step - found.onset + 1 == 20
    assert found.best is not None and found.smoothed > 5 * found.best
    assert found.best_step is not None and 50 < found.best_step <= 200
    assert "exploded" in found.describe() and f"step {found.step}" in found.describe()


def test_divergence_watch_nan_always_stops_explosion_only_when_on() -> None:
    curve = noisy(200, 0.1) + noisy(200, 2.0, seed=1)
    assert feed(DivergenceWatch(enabled=False), curve) is None
    for enabled in (True, False):
        found = feed(DivergenceWatch(enabled=enabled), [0.1, 0.2, float("nan"), 0.1])
        assert found is not None and found.cause == "non-finite" and found.step == 3
    assert feed(DivergenceWatch(), [0.1, float("inf")]).cause == "non-finite"


def test_divergence_best_is_taken_after_the_warmup() -> None:
    """A very low first value (an outlier the smoothing has not absorbed) must not become the reference."""
    curve = [0.001, *noisy(400, 0.1)]
    assert feed(DivergenceWatch(factor=3, warmup=50, patience=5, span=20), curve) is None


def test_overfit_watch_flags_rising_val_with_falling_train() -> None:
    w = OverfitWatch(patience=3)
    vals = [1.0, 0.8, 0.6, 0.5, 0.55, 0.6, 0.7, 0.8]
    trains = [None, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3]
    flags = [w.update(i * 10, v, t) for i, (v, t) in enumerate(zip(vals, trains, strict=True))]
    found = [f for f in flags if f is not None]
    assert len(found) == 1  # once
    assert found[0].from_step == 30 and found[0].detected_at == 60
    assert found[0].val_from == 0.5 and found[0].val_now == 0.7
    assert "overfitting from step 30" in found[0].describe()


@pytest.mark.parametrize(
    ("vals", "trains", "patience", "enabled"),
    [
        ([1.0, 0.5, 0.6, 0.7, 0.8], [None, 0.5, 0.6, 0.7, 0.8], 3, True),  # training loss rises too: diverging
        ([1.0, 0.5, 0.6, 0.7, 0.65, 0.7], [None, 0.5, 0.4, 0.3, 0.2, 0.1], 3, True),  # not 3 rises in a row
        ([1.0, 0.5, 0.6, 0.7, 0.8], [None, 0.5, 0.4, 0.3, 0.2], 3, False),  # the check is off
        ([1.0, 0.9, 0.8, 0.7, 0.6], [None, 0.5, 0.4, 0.3, 0.2], 1, True),  # val keeps falling
    ],
)
def test_overfit_watch_does_not_flag(
    vals: list[float], trains: list[float | None], patience: int, enabled: bool
) -> None:
    w = OverfitWatch(patience=patience, enabled=enabled)
    assert all(w.update(i, v, t) is None for i, (v, t) in enumerate(zip(vals, trains, strict=True)))
    assert w.flagged is None


# ------------------------------------------------------------------------------ ranking and samples


def test_rank_checkpoints(tmp_path: Path) -> None:
    def ck(step: int, val: float | None, train: float | None, exists: bool = True) -> Checkpoint:
        path = tmp_path / f"lora-{step}.safetensors"
        if exists:
            path.write_bytes(b"x")
        return Checkpoint(str(path), step, val, train)

    cks = [ck(10, 0.5, 0.4), ck(20, 0.3, 0.3), ck(30, 0.3, 0.2), ck(40, 0.1, 0.1, exists=False), ck(50, 0.4, 0.05)]
    best, by = rank_checkpoints(cks)
    assert (best.step, by) == (20, "val_loss")  # lowest existing val loss; the tie goes to the earlier step
    best, by = rank_checkpoints(cks, diverged_from=20)
    assert (best.step, by) == (10, "val_loss")
    no_val = [ck(10, None, 0.4), ck(20, None, 0.2), ck(30, None, 0.3)]
    assert rank_checkpoints(no_val)[0].step == 20 and rank_checkpoints(no_val)[1] == "train_loss_smoothed"
    assert rank_checkpoints([ck(10, None, None)])[1] == "last"
    assert rank_checkpoints([], diverged_from=1) == (None, "none")


def png(path: Path, value: int | np.ndarray) -> str:
    arr = np.full((16, 16, 3), value, dtype=np.uint8) if isinstance(value, int) else value
    Image.fromarray(arr).save(path)
    return str(path)


def test_compare_samples_flags_no_effect_and_collapse(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    a, b = (rng.integers(0, 256, (16, 16, 3), dtype=np.uint8) for _ in range(2))
    samples = {
        0: [png(tmp_path / "0-0.png", a), png(tmp_path / "0-1.png", b)],  # the base model
        10: [png(tmp_path / "10-0.png", a), png(tmp_path / "10-1.png", b)],  # the LoRA changed nothing
        20: [png(tmp_path / "20-0.png", 0), png(tmp_path / "20-1.png", 0)],  # both prompts: one black image
        30: [png(tmp_path / "30-0.png", 255), png(tmp_path / "30-1.png", 0)],
    }
    out = compare_samples(samples)
    assert out["steps"] == [0, 10, 20, 30]
    between = {(e["from"], e["to"]): e["mean_abs_diff"] for e in out["between_steps"]}
    assert between[(0, 10)] == 0.0
    assert between[(20, 30)] == pytest.approx(0.5)  # image 0 black → white (1.0), image 1 unchanged (0)
    within = {e["step"]: e for e in out["within_step"]}
    assert within[20]["collapse"] and within[20]["mean_abs_diff"] == 0.0
    assert not within[10]["collapse"] and not within[30]["collapse"] and within[30]["mean_abs_diff"] == 1.0
    assert not within[0]["collapse"]  # the base model is not judged
    base = {e["step"]: e for e in out["vs_base"]}
    assert base[10]["no_effect"] and not base[20]["no_effect"] and not base[30]["no_effect"]
    assert any("no effect at step 10" in f for f in out["flags"])
    assert any("collapse at step 20" in f for f in out["flags"])


def test_report_of_a_record(tmp_path: Path) -> None:
    rec = RunRecord()
    for step in (10, 20):
        path = tmp_path / f"l{step}.safetensors"
        path.write_bytes(b"x")
        rec.checkpoint(str(path), step, train_loss=0.5 / step)
    rec.validated(10, 0.2)
    rec.validated(20, 0.3)
    report = build_report(rec, job="j", state="finished", step=20, total_steps=20)
    assert report["keep"] == {"path": str(tmp_path / "l10.safetensors"), "step": 10, "by": "val_loss", "value": 0.2}
    assert report["flags"] == {"diverged": None, "overfitting": None}
    assert [c["val_loss"] for c in report["checkpoints"]] == [0.2, 0.3]
    json.dumps(report, allow_nan=False)
    assert "keep l10.safetensors" in summary(report) and "lowest validation loss" in summary(report)


# --------------------------------------------------------------------------------------- real runs


def make_config(assets: dict[str, Path], images: Path | None = None, **sections: dict[str, Any]) -> TrainingConfig:
    data = tomllib.loads(PRESET.read_text())
    data["model"]["pretrained"] = str(assets["model"])
    data["dataset"]["subsets"] = [{"image_dir": str(images or assets["dataset"])}]
    data["scheduler"] = {"type": "constant", "warmup_steps": 0}
    data["saving"].update(every_n_steps=0, save_state=False)
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return TrainingConfig.model_validate(data)


def events_of(job: JobDir, kind: str) -> list[dict[str, Any]]:
    return [e for e in read_events(job.events_path) if e["kind"] == kind]


def test_divergence_stops_the_run_and_fails_the_job(assets: dict[str, Path], nyx_home: Path, tmp_path: Path) -> None:
    """Learning rate 10 with AdamW: the loss becomes NaN within a few steps. The run stops early, keeps the
    checkpoints it saved before, writes no final LoRA, and the supervisor's end is `failed` with the
    engine's cause and fix (a tenth of the learning rate, `nyx lr-find`)."""
    from nyx_tui.jobs.launch import spawn_supervisor
    from nyx_tui.trainers.base import NativeTrainer

    steps = 60
    cfg = make_config(
        assets,
        training={"max_steps": steps},
        optimizer={"learning_rate": 10.0},
        saving={"every_n_steps": 2},
        quality={"warmup_steps": 3, "patience_steps": 2, "smoothing_steps": 2},
    )
    job = create_job("train", "diverge", NativeTrainer().argv(cfg), config_toml=dumps_config(cfg), root=tmp_path)
    spawn_supervisor(job)
    wait_for(lambda: job.effective_state() in TERMINAL, timeout=240)
    (end,) = events_of(job, "end")
    assert end["state"] == "failed" and end["exit_code"] == 1, end
    assert "training stopped early" in end["error"] and ("nan" in end["error"] or "exploded" in end["error"])
    assert "learning_rate" in end["hint"] and "try 1," in end["hint"] and "nyx lr-find" in end["hint"]
    done = [e["step"] for e in events_of(job, "step")]
    assert done and max(done) < steps
    assert all(math.isfinite(e["loss"]) for e in events_of(job, "step"))
    report = json.loads((job.path / "report.json").read_text())
    flag = report["flags"]["diverged"]
    assert report["state"] == "diverged" and flag["step"] == max(done) + 1
    loras = [e for e in events_of(job, "artifact") if e["what"] == "lora"]
    assert not (job.output_dir / "demo.safetensors").exists()  # no final save over the good ones
    assert all(Path(e["path"]).is_file() and e["step"] < flag["step"] for e in loras)
    if loras:  # the step-2 save comes before the NaN unless it hit at once
        assert report["keep"]["step"] < flag["from_step"] and Path(report["keep"]["path"]).is_file()
    assert [e for e in events_of(job, "artifact") if e["what"] == "report"]


def test_overfitting_is_flagged_and_stops_the_run(assets: dict[str, Path], tmp_path: Path) -> None:
    """The engine's wiring of the overfitting check: validation every 5 steps feeds the watch, the flag is a
    warning, a metric and a report entry, and stop_on_overfit saves and stops there. The tiny random model
    cannot really memorise in a few steps (its VAE latents are mostly sampling noise, so held-out and
    training images look alike to it): its validation loss falls with wobbles. With overfit_patience = 1 the
    first rise that comes with a falling training loss is flagged; the rule itself (K rises in a row) is
    tested above on synthetic curves, and here it is checked again on the run's own events."""
    steps = 100
    cfg = make_config(
        assets,
        training={"max_steps": steps, "validate_every_n_steps": 5},
        dataset={"validation_split": 0.2},
        optimizer={"learning_rate": 2e-2},
        quality={"overfit_patience": 1, "stop_on_overfit": True},
        saving={"every_n_steps": 10},
        sampling={
            "prompts": ["a red circle --s 2 --d 1", "a blue square --s 2 --d 2"],
            "every_n_steps": 10,
            "sample_at_first": True,
        },
    )
    job = create_job("train", "overfit", ["native"], config_toml=dumps_config(cfg), root=tmp_path / "jobs")
    proc = subprocess.run(
        [sys.executable, "-m", "nyx_tui.trainers.native", str(job.path)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    warnings = [e["message"] for e in events_of(job, "log") if e["level"] == "warning"]
    assert any("overfitting from step" in m for m in warnings), warnings
    (metric,) = [e for e in events_of(job, "metric") if e["name"] == "overfitting"]
    report = json.loads((job.path / "report.json").read_text())
    flag = report["flags"]["overfitting"]
    assert flag["from_step"] == metric["value"] and flag["detected_at"] == metric["step"]
    # the rule holds on the run's own events: the validation loss rose while the smoothed training loss fell
    val = {e["step"]: e["value"] for e in events_of(job, "metric") if e["name"] == "val_loss"}
    window = [s for s in sorted(val) if flag["from_step"] <= s <= flag["detected_at"]]
    assert window == [flag["from_step"], flag["detected_at"]] and val[window[0]] < val[window[1]]
    assert flag["val_from"] == val[window[0]] and flag["val_now"] == val[window[1]]
    assert flag["train_now"] < flag["train_from"]
    # stop_on_overfit: saved and stopped there, not at the end
    done = max(e["step"] for e in events_of(job, "step"))
    assert done == flag["detected_at"] < steps and report["state"] == "stopped"
    assert (job.output_dir / "demo.safetensors").is_file()
    # the checkpoint to keep: the lowest validation loss among the saves
    saved = {c["step"]: c for c in report["checkpoints"]}
    assert all(c["val_loss"] == val[s] for s, c in saved.items())
    assert report["keep"]["by"] == "val_loss"
    assert report["keep"]["value"] == min(c["val_loss"] for c in saved.values())
    # samples: the base model's at step 0, then every 20 steps
    samples = report["samples"]
    assert samples["steps"][0] == 0 and len(samples["steps"]) >= 2
    assert [e["step"] for e in samples["vs_base"]] == samples["steps"][1:]
    assert all(0.0 <= e["mean_abs_diff"] <= 1.0 for e in samples["between_steps"] + samples["within_step"])
    (artifact,) = [e for e in events_of(job, "artifact") if e["what"] == "report"]
    assert Path(artifact["path"]) == job.path / "report.json"
    assert any(e["message"].startswith("run report: keep ") for e in events_of(job, "log"))
