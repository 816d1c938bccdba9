"""The LR range test (`nyx lr-find CONFIG`): a short run with the learning rate rising exponentially, to pick
one before a long run (docs/quality.md).

The job worker, `python -m nyx_tui.workflows.lr_find JOB_DIR [--start 1e-7] [--end 1] [--steps 100]`, builds
the run exactly as training would (`engine.prepare`: the same data, model, adapter and optimizer) and steps it
with `engine.optimizer_step`, setting the learning rate before each step to start·(end/start)^(i/(steps−1)).
Each step is a `metric` event `{name: "lr_find", value: loss, step, lr}`. It stops early when the loss
explodes: NaN/inf, or the smoothed loss above `EXPLODE_FACTOR` × its lowest value.

The suggestion (`suggest`): the learning rate where the smoothed loss falls fastest against log(lr) — the
most negative slope d(smoothed loss)/d(log10 lr) —, looked for between the first `SKIP_START` of the points
(the smoothing has not settled there) and the point of the lowest smoothed loss (past it the loss only
climbs). If the smoothed loss never falls, a tenth of the learning rate at its lowest value, kept in the
swept range. It is always one of the swept learning rates or inside [start, end]. Written to `report.json`
in the job folder (an `artifact` with what = "report"), as a `log` event and a `metric` "lr_suggestion".
Nothing is saved: the adapter's weights are thrown away with the process.

Schedule and options the test overrides: constant schedule without warmup, no EMA, no resume, no
validation, no samples; with several GPUs configured it runs on one. Adaptive optimizers (Prodigy, DAdapt,
relative-step Adafactor) set their own step size: the test is meaningless for them and says so.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import traceback
from pathlib import Path
from typing import Any

import numpy as np

EXPLODE_FACTOR = 4.0  # the smoothed loss above this × its lowest value: the test stops
SKIP_START = 0.1  # the first tenth of the points: the smoothing has not settled
MIN_STEPS = 5
KIND = "lr-find"


def lr_at(i: int, steps: int, start: float, end: float) -> float:
    """The i-th (0-based) of `steps` learning rates spaced evenly in log from `start` to `end`."""
    if steps <= 1:
        return start
    return float(start * (end / start) ** (i / (steps - 1)))


def smooth(losses: list[float], span: int) -> list[float]:
    """Bias-corrected exponential moving average (the quality checks' `LossSmoother`)."""
    from nyx_tui.trainers.native.quality import LossSmoother

    s = LossSmoother(span)
    return [s.update(x) for x in losses]


def smoothing_span(steps: int) -> int:
    return max(5, steps // 8)


def suggest(
    lrs: list[float], losses: list[float], start: float, end: float, span: int | None = None
) -> tuple[float, str]:
    """(the suggested learning rate, how it was chosen) for a sweep's learning rates and losses (finite ones,
    in order), smoothed over `span` steps (default: `smoothing_span` of their count). See the module doc."""
    if not lrs:
        return start, "no step finished: the first learning rate of the range"
    smoothed = smooth(losses, span or smoothing_span(len(losses)))
    lowest = int(np.argmin(smoothed))
    first = min(int(len(smoothed) * SKIP_START), max(0, lowest - 1))
    if lowest - first >= 2:
        x = np.log10(np.asarray(lrs[first : lowest + 1]))
        y = np.asarray(smoothed[first : lowest + 1])
        slope = np.gradient(y, x)
        at = first + int(np.argmin(slope))
        if slope[at - first] < 0:
            return lrs[at], f"steepest descent of the smoothed loss, {slope[at - first]:.3g} per decade of lr"
    fallback = min(max(lrs[lowest] / 10, start), end)
    return fallback, "the smoothed loss never fell clearly: a tenth of the learning rate at its lowest value"


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m nyx_tui.workflows.lr_find")
    p.add_argument("job_dir")
    p.add_argument("--start", type=float, default=1e-7)
    p.add_argument("--end", type=float, default=1.0)
    p.add_argument("--steps", type=int, default=100)
    return p.parse_args(argv)


def range_problem(start: float, end: float, steps: int) -> str | None:
    """What is wrong with a sweep's range (None when it is fine)."""
    if not (math.isfinite(start) and math.isfinite(end)) or start <= 0 or end <= 0:
        return f"--start ({start:g}) and --end ({end:g}) must be positive learning rates, e.g. --start 1e-7 --end 1"
    if start >= end:
        return f"--start ({start:g}) must be below --end ({end:g}); the learning rate rises from start to end"
    if steps < MIN_STEPS:
        return f"--steps is {steps}; the curve needs at least {MIN_STEPS} points, e.g. --steps 100"
    return None


def sweep_config(cfg: Any, steps: int) -> Any:
    """The training config as the range test runs it (see the module doc)."""
    data = cfg.dump()
    data["training"].update(max_steps=steps, max_epochs=0, ema_decay=0.0, validate_every_n_steps=0, num_processes=1)
    data["training"].pop("resume", None)
    data["scheduler"].update(type="constant", warmup_steps=0)
    data["sampling"].update(prompts=[], every_n_steps=0, every_n_epochs=0, sample_at_first=False)
    return type(cfg).model_validate(data)


def run(job_dir: Path, start: float, end: float, steps: int) -> int:
    """The worker: 0 after a sweep (also one stopped by an explosion), 1 on an error, 2 on a bad range."""
    from nyx_tui.config.io import load_config
    from nyx_tui.jobs.events import EventWriter
    from nyx_tui.jobs.jobdir import JobDir, atomic_write
    from nyx_tui.trainers.native import LOAD_STAGES

    job = JobDir(job_dir.resolve())
    with EventWriter(job.events_path) as events:
        events.emit("start", job=job.id, job_kind=KIND, total=steps)  # a progress bar, not a training one
        problem = range_problem(start, end, steps)
        if problem:
            events.emit("log", level="error", message=problem, error=problem, hint="nyx lr-find --help")
            print(problem, file=sys.stderr)
            return 2
        events.emit("artifact", path=str(job.config_path), what="config")
        events.emit("progress", done=0, total=len(LOAD_STAGES), unit="stage", message=LOAD_STAGES[0])
        logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
        from nyx_tui.trainers.native import engine, optim

        cfg = sweep_config(load_config(job.config_path), steps)
        s = engine.prepare(job, cfg, events)
        report = s.report
        opt = cfg.optimizer
        adaptive = opt.type.value == "prodigy" or bool(opt.args.get("relative_step"))
        if adaptive or any(name in (opt.class_path or "") for name in ("Prodigy", "DAdapt")):
            report.log(
                f"optimizer.type {cfg.optimizer.type.value} sets its own step size: the range test shows little "
                "for it (tune its own options instead)",
                "warning",
            )
        inner = optim._unwrap(s.optimizer)
        base = [float(lr) for lr in s.lr_scheduler.base_lrs]
        ratios = [b / base[0] if base[0] else 1.0 for b in base]
        report.stage(len(LOAD_STAGES))
        report.log(f"LR range test: {steps} steps, learning rate {start:.3g} → {end:.3g} (exponential)")
        lrs: list[float] = []
        losses: list[float] = []
        smoother_span = smoothing_span(steps)
        from nyx_tui.trainers.native.quality import LossSmoother

        smoother = LossSmoother(smoother_span)
        lowest = math.inf
        stop_reason = ""
        for i in range(steps):
            lr = lr_at(i, steps, start, end)
            for group, ratio in zip(inner.param_groups, ratios, strict=False):
                group["lr"] = lr * ratio
            loss, _ = engine.optimizer_step(s, first=i == 0)
            if not math.isfinite(loss):
                stop_reason = f"the loss became {loss} at learning rate {lr:.3g}"
                break
            lrs.append(lr)
            losses.append(loss)
            smoothed = smoother.update(loss)
            report.emit("metric", name="lr_find", value=loss, step=i + 1, lr=lr, smoothed=smoothed)
            report.emit("progress", done=i + 1, total=steps, unit="steps", message="LR range test")
            lowest = min(lowest, smoothed)
            if i >= smoother_span and smoothed > EXPLODE_FACTOR * lowest:
                stop_reason = (
                    f"the smoothed loss rose to {smoothed:.4g}, over {EXPLODE_FACTOR:g}× its lowest "
                    f"({lowest:.4g}), at learning rate {lr:.3g}"
                )
                break
        if stop_reason:
            report.log(f"stopped early after {len(lrs)} of {steps} steps: {stop_reason}")
        suggestion, rule = suggest(lrs, losses, start, end, smoother_span)
        smoothed_curve = smooth(losses, smoother_span)
        data = {
            "kind": KIND,
            "job": job.id,
            "start": start,
            "end": end,
            "steps": steps,
            "steps_done": len(lrs),
            "stopped_early": stop_reason or None,
            "suggestion": suggestion,
            "rule": rule,
            "curve": [
                {"step": i + 1, "lr": lr, "loss": loss, "smoothed": sm}
                for i, (lr, loss, sm) in enumerate(zip(lrs, losses, smoothed_curve, strict=True))
            ],
        }
        path = job.path / "report.json"
        atomic_write(path, json.dumps(data, indent=1, allow_nan=False) + "\n")
        report.emit("artifact", path=str(path), what="report", step=len(lrs))
        report.emit("metric", name="lr_suggestion", value=suggestion, step=len(lrs))
        report.log(
            f"suggested learning rate: {suggestion:.3g} ({rule}); set optimizer.learning_rate = {suggestion:.3g}"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return run(Path(args.job_dir), args.start, args.end, args.steps)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        return 130
    except Exception:
        traceback.print_exc()
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
