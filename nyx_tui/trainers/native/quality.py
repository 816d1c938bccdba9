"""Automatic quality checks of a run and its report: is the loss diverging, is the LoRA overfitting, which
checkpoint to keep, and what the samples say (docs/quality.md).

Small pure pieces the engine feeds as it goes, testable on synthetic loss curves without training:

- `LossSmoother`: an exponential moving average of the step losses (bias-corrected, so the first values are
  not pulled towards 0). Diffusion losses jump from step to step with the sampled timestep; every check and
  every ranking here uses the smoothed value.
- `DivergenceWatch`: a NaN/inf loss stops at once; otherwise, after a warm-up, the smoothed loss above
  `factor` × the best smoothed value seen since the warm-up for `patience` steps in a row is an explosion.
  The best value is only taken once the warm-up is over: the first, barely smoothed values can be
  outliers low enough to make any later loss look like an explosion.
- `OverfitWatch`: the validation loss rose at `patience` validations in a row while the smoothed training
  loss fell over the same stretch; overfitting is dated from the validation where the rise began.
- `rank_checkpoints`: the checkpoint to keep — the lowest validation loss when the run measured one, else
  the lowest smoothed training loss; never one saved after the loss began to diverge.
- `compare_samples`: pixel statistics (numpy + Pillow) of the sample images: the mean absolute difference
  between a prompt's images at consecutive sample steps, between the images of one step ("collapse" when
  they are nearly alike) and against the base model's image at step 0 ("no effect" when the LoRA changed
  nothing).

`RunRecord` gathers what the engine saw, `build_report` turns it into `report.json`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from itertools import combinations, pairwise
from pathlib import Path
from typing import Any

import numpy as np

# sample statistics: mean absolute difference of pixels scaled to [0, 1]
COLLAPSE_BELOW = 0.03  # the images of one step (different prompts/seeds) this alike: the LoRA collapsed
NO_EFFECT_BELOW = 0.004  # a LoRA sample this close to the base model's (about one grey level): no effect


# ------------------------------------------------------------------------------------------- the loss


class LossSmoother:
    """Exponential moving average over a span of N steps (alpha = 2 / (N + 1)), bias-corrected."""

    def __init__(self, span: int) -> None:
        self.alpha = 2.0 / (max(1, span) + 1.0)
        self._avg = 0.0
        self._weight = 0.0

    def update(self, value: float) -> float:
        self._avg = (1.0 - self.alpha) * self._avg + self.alpha * value
        self._weight = (1.0 - self.alpha) * self._weight + self.alpha
        return self._avg / self._weight

    @property
    def value(self) -> float | None:
        return self._avg / self._weight if self._weight else None


@dataclass(frozen=True)
class Divergence:
    """Why a run stopped: `cause` is "non-finite" or "explosion"."""

    step: int
    cause: str
    loss: float
    smoothed: float | None = None
    best: float | None = None
    best_step: int | None = None
    onset: int | None = None  # the first step of the streak above the threshold

    def describe(self) -> str:
        if self.cause == "non-finite":
            return f"the loss became {self.loss} at step {self.step}"
        return (
            f"the loss exploded: its smoothed value rose to {self.smoothed:.4g} at step {self.step}, "
            f"{(self.smoothed or 0) / (self.best or 1):.1f}× its best ({self.best:.4g} at step {self.best_step}), "
            f"and stayed above the threshold since step {self.onset}"
        )


def divergence_hint(learning_rate: float, fp16: bool = False) -> str:
    """What to do after a divergence: a tenth of the learning rate, or a range test to find one."""
    overflow = ' With fp16, mixed_precision = "bf16" also avoids overflows.' if fp16 else ""
    return (
        f"lower optimizer.learning_rate (it is {learning_rate:.3g}; try {learning_rate / 10:.3g}, a tenth), or "
        f"find one with `nyx lr-find CONFIG`.{overflow} The checkpoints saved before the loss went up are kept."
    )


class DivergenceWatch:
    """Fed every step's loss; `update` returns a `Divergence` when the run should stop."""

    def __init__(
        self, factor: float = 5.0, warmup: int = 50, patience: int = 20, span: int = 20, enabled: bool = True
    ) -> None:
        self.factor, self.warmup, self.patience, self.enabled = factor, warmup, patience, enabled
        self.smoother = LossSmoother(span)
        self.seen = 0  # steps fed (a resumed run starts counting afresh)
        self.best: float | None = None
        self.best_step: int | None = None
        self.above = 0
        self.onset: int | None = None

    @property
    def smoothed(self) -> float | None:
        return self.smoother.value

    @property
    def alarmed(self) -> bool:
        """The smoothed loss is above the threshold now (not for long enough yet to stop)."""
        return self.above > 0

    def update(self, step: int, loss: float) -> Divergence | None:
        if not math.isfinite(loss):
            return Divergence(step, "non-finite", loss, self.smoothed, self.best, self.best_step, step)
        self.seen += 1
        smoothed = self.smoother.update(loss)
        if not self.enabled or self.seen <= self.warmup:
            return None
        if self.best is None or smoothed < self.best:
            self.best, self.best_step = smoothed, step
        if smoothed > self.factor * self.best:
            self.above += 1
            if self.onset is None:
                self.onset = step
            if self.above >= self.patience:
                return Divergence(step, "explosion", loss, smoothed, self.best, self.best_step, self.onset)
        else:
            self.above, self.onset = 0, None
        return None


@dataclass(frozen=True)
class Overfit:
    from_step: int  # the validation before the rise: the best validation loss of the stretch
    detected_at: int
    val_from: float
    val_now: float
    train_from: float
    train_now: float

    def describe(self) -> str:
        return (
            f"overfitting from step {self.from_step}: the validation loss rose from {self.val_from:.4g} to "
            f"{self.val_now:.4g} by step {self.detected_at} while the smoothed training loss fell from "
            f"{self.train_from:.4g} to {self.train_now:.4g}"
        )


class OverfitWatch:
    """Fed every validation (step, validation loss, smoothed training loss or None before the first step);
    `update` returns an `Overfit` once, the first time the rule holds."""

    def __init__(self, patience: int = 3, enabled: bool = True) -> None:
        self.patience, self.enabled = patience, enabled
        self.history: list[tuple[int, float, float | None]] = []
        self.flagged: Overfit | None = None

    def update(self, step: int, val_loss: float, train_loss: float | None) -> Overfit | None:
        if self.history and self.history[-1][0] == step:  # validated twice at one step: keep the last
            self.history.pop()
        self.history.append((step, val_loss, train_loss))
        if not self.enabled or self.flagged is not None or len(self.history) <= self.patience:
            return None
        window = self.history[-(self.patience + 1) :]
        vals = [v for _, v, _ in window]
        if not all(b > a for a, b in pairwise(vals)):
            return None
        trains = [(s, t) for s, _, t in window if t is not None]
        if len(trains) < 2 or not trains[-1][1] < trains[0][1]:
            return None
        self.flagged = Overfit(window[0][0], step, vals[0], vals[-1], trains[0][1], trains[-1][1])
        return self.flagged


# ------------------------------------------------------------------------------------------ checkpoints


@dataclass
class Checkpoint:
    path: str
    step: int
    val_loss: float | None = None
    train_loss: float | None = None  # the smoothed training loss at its step

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "step": self.step,
            "val_loss": self.val_loss,
            "train_loss_smoothed": self.train_loss,
            "exists": Path(self.path).exists(),
        }


def rank_checkpoints(checkpoints: list[Checkpoint], diverged_from: int | None = None) -> tuple[Checkpoint | None, str]:
    """(the checkpoint to keep, the measure it was chosen by: "val_loss" | "train_loss_smoothed" | "last").
    Only files that still exist (keep_last_n prunes), none saved at or after `diverged_from`; ties go to the
    earlier step (less trained, same quality)."""
    pool = [c for c in checkpoints if Path(c.path).exists() and (diverged_from is None or c.step < diverged_from)]
    with_val = [c for c in pool if c.val_loss is not None and math.isfinite(c.val_loss)]
    if with_val:
        return min(with_val, key=lambda c: (c.val_loss, c.step)), "val_loss"
    with_train = [c for c in pool if c.train_loss is not None and math.isfinite(c.train_loss)]
    if with_train:
        return min(with_train, key=lambda c: (c.train_loss, c.step)), "train_loss_smoothed"
    return (max(pool, key=lambda c: c.step), "last") if pool else (None, "none")


# ---------------------------------------------------------------------------------------------- samples


def load_pixels(path: str | Path, size: tuple[int, int] | None = None) -> np.ndarray:
    """An image as float32 RGB in [0, 1] (resized to `size` = (width, height) when given)."""
    from PIL import Image

    with Image.open(path) as im:
        rgb = im.convert("RGB")
        if size is not None and rgb.size != size:
            rgb = rgb.resize(size, Image.Resampling.BILINEAR)
        return np.asarray(rgb, dtype=np.float32) / 255.0


def mean_abs_diff(a: str | Path, b: str | Path) -> float:
    """Mean absolute pixel difference of two images in [0, 1] (`b` resized to `a`'s size if needed)."""
    pa = load_pixels(a)
    pb = load_pixels(b, (pa.shape[1], pa.shape[0]))
    return float(np.abs(pa - pb).mean())


def compare_samples(
    samples: dict[int, list[str]],
    collapse_below: float = COLLAPSE_BELOW,
    no_effect_below: float = NO_EFFECT_BELOW,
) -> dict[str, Any]:
    """Statistics of the sample images by step (the images of a step in prompt order). Step 0, when
    present, is the base model (sample_at_first: rendered before the LoRA trained)."""
    steps = sorted(s for s, imgs in samples.items() if imgs)
    out: dict[str, Any] = {"steps": steps, "between_steps": [], "within_step": [], "vs_base": [], "flags": []}
    for a, b in pairwise(steps):
        pairs = list(zip(samples[a], samples[b], strict=False))
        if pairs:
            diff = float(np.mean([mean_abs_diff(x, y) for x, y in pairs]))
            out["between_steps"].append({"from": a, "to": b, "mean_abs_diff": round(diff, 5)})
    for s in steps:
        imgs = samples[s]
        if len(imgs) < 2:
            continue
        diff = float(np.mean([mean_abs_diff(x, y) for x, y in combinations(imgs, 2)]))
        collapse = s > 0 and diff < collapse_below
        out["within_step"].append({"step": s, "mean_abs_diff": round(diff, 5), "collapse": collapse})
        if collapse:
            out["flags"].append(
                f"collapse at step {s}: its {len(imgs)} samples are nearly alike (mean difference {diff:.4f})"
            )
    if samples.get(0):
        for s in steps:
            if s == 0:
                continue
            pairs = list(zip(samples[0], samples[s], strict=False))
            diff = float(np.mean([mean_abs_diff(x, y) for x, y in pairs]))
            no_effect = diff < no_effect_below
            out["vs_base"].append({"step": s, "mean_abs_diff": round(diff, 5), "no_effect": no_effect})
            if no_effect:
                out["flags"].append(
                    f"no effect at step {s}: the samples equal the base model's (mean difference {diff:.4f})"
                )
    return out


# ------------------------------------------------------------------------------------------------ report


@dataclass
class RunRecord:
    """What the engine saw during a run, for the report."""

    checkpoints: list[Checkpoint] = field(default_factory=list)
    val_losses: dict[int, float] = field(default_factory=dict)
    samples: dict[int, list[str]] = field(default_factory=dict)
    divergence: Divergence | None = None
    overfit: Overfit | None = None

    def checkpoint(self, path: str, step: int, train_loss: float | None) -> None:
        self.checkpoints = [c for c in self.checkpoints if c.path != path]  # the final file may be re-saved
        self.checkpoints.append(Checkpoint(path, step, self.val_losses.get(step), train_loss))

    def validated(self, step: int, value: float) -> None:
        self.val_losses[step] = value
        for c in self.checkpoints:
            if c.step == step:
                c.val_loss = value


def build_report(record: RunRecord, *, job: str, state: str, step: int, total_steps: int) -> dict[str, Any]:
    """`report.json`: the checkpoint to keep, the flags, the checkpoints and the sample statistics.
    `state` is finished | stopped | diverged."""
    diverged_from = None
    if record.divergence is not None:
        diverged_from = record.divergence.onset or record.divergence.step
    keep, by = rank_checkpoints(record.checkpoints, diverged_from)
    flags: dict[str, Any] = {"diverged": None, "overfitting": None}
    if record.divergence is not None:
        d = record.divergence
        flags["diverged"] = {"step": d.step, "cause": d.cause, "from_step": diverged_from, "message": d.describe()}
    if record.overfit is not None:
        o = record.overfit
        flags["overfitting"] = {
            "from_step": o.from_step,
            "detected_at": o.detected_at,
            "val_from": o.val_from,
            "val_now": o.val_now,
            "train_from": o.train_from,
            "train_now": o.train_now,
            "message": o.describe(),
        }
    try:
        samples = compare_samples(record.samples)
    except Exception as e:  # a missing or unreadable image must not cost the report
        samples = {"error": f"{type(e).__name__}: {e}"}
    keep_json = None
    if keep is not None:
        value = keep.val_loss if by == "val_loss" else keep.train_loss if by == "train_loss_smoothed" else None
        keep_json = {"path": keep.path, "step": keep.step, "by": by, "value": value}
    return {
        "job": job,
        "state": state,
        "step": step,
        "total_steps": total_steps,
        "keep": keep_json,
        "flags": flags,
        "checkpoints": [c.to_json() for c in record.checkpoints],
        "val_losses": {str(s): v for s, v in sorted(record.val_losses.items())},
        "samples": samples,
    }


def summary(report: dict[str, Any]) -> str:
    """One line for the log: what to keep and what was flagged."""
    keep = report.get("keep")
    if keep:
        measure = {"val_loss": "lowest validation loss", "train_loss_smoothed": "lowest smoothed training loss"}
        why = measure.get(keep["by"], "the last one saved")
        value = f" {keep['value']:.4g}" if isinstance(keep.get("value"), float) else ""
        text = f"keep {Path(keep['path']).name} (step {keep['step']}: {why}{value})"
    else:
        text = "no checkpoint to keep"
    notes = [f["message"] for f in report["flags"].values() if f]
    notes += list(report.get("samples", {}).get("flags", []))
    return "run report: " + text + ("; " + "; ".join(notes) if notes else "")
