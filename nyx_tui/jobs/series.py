"""Fold a job's events into what the dashboard shows. No Textual here.

`JobSeries.feed(events)` is called with every batch `EventTail.poll()` returns, from the first byte of
`events.jsonl` on. The loss history stays bounded however long the job runs: raw losses are averaged
into buckets of `stride` steps; when `max_points` buckets are full, neighbours are merged pairwise and
the stride doubles (so 1,000,000 steps keep at most `max_points` points, each the mean of its steps).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class LossPoint:
    step: int  # the last step in the bucket
    loss: float  # mean raw loss over the bucket
    loss_avg: float  # the writer's smoothed loss at `step`


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    f = float(value)
    return f if f == f and f not in (float("inf"), float("-inf")) else None


class JobSeries:
    def __init__(self, max_points: int = 512, recent: int = 240, log_lines: int = 200) -> None:
        self.max_points = max(4, max_points - max_points % 2)
        self.stride = 1
        self._points: list[LossPoint] = []
        self._bucket_sum = 0.0
        self._bucket_n = 0
        self._bucket_step = 0
        self._bucket_avg = 0.0
        self.recent_loss: deque[float] = deque(maxlen=recent)  # last raw losses, for the sparkline
        self.logs: deque[tuple[str, str]] = deque(maxlen=log_lines)  # (level, message)
        self.log_total = 0  # log events ever seen (the deque keeps the last `log_lines`)
        self.artifacts: list[dict[str, Any]] = []
        self.metrics: dict[str, tuple[int, float]] = {}
        self.sample: dict[str, Any] | None = None
        self.progress: dict[str, Any] | None = None
        self.end: dict[str, Any] | None = None
        self.job: str | None = None
        self.job_kind: str | None = None
        self.started_t: float | None = None
        self.last_t: float | None = None
        self.total: int | None = None
        self.total_epochs: int | None = None
        self.step = 0
        self.epoch: int | None = None
        self.loss: float | None = None
        self.loss_avg: float | None = None
        self.lr: list[float] = []
        self.it_s: float | None = None
        self.eta_s: float | None = None
        self.state = "queued"
        self.events_seen = 0
        self.version = 0  # bumped by every feed that changed something: a cheap "redraw?" test

    # ------------------------------------------------------------------ folding
    def feed(self, events: Iterable[dict[str, Any]]) -> int:
        """Fold events in; return how many were used."""
        used = 0
        for e in events:
            kind = e.get("kind")
            if kind == "step":
                self._step(e)
            elif kind == "log":
                self.logs.append((str(e.get("level", "info")), str(e.get("message", ""))))
                self.log_total += 1
            elif kind == "start":
                self.job = str(e.get("job")) if e.get("job") is not None else self.job
                self.job_kind = str(e.get("job_kind")) if e.get("job_kind") is not None else None
                total = e.get("total_steps")
                if isinstance(total, int):
                    self.total = total
                epochs = e.get("total_epochs")
                if isinstance(epochs, int):
                    self.total_epochs = epochs
                self.started_t = _num(e.get("t"))
                if self.end is None:
                    self.state = "running"
            elif kind == "progress":
                self.progress = {k: e.get(k) for k in ("done", "total", "unit", "message")}
            elif kind == "metric":
                value = _num(e.get("value"))
                if value is not None:
                    self.metrics[str(e.get("name"))] = (int(e.get("step") or 0), value)
            elif kind == "sample":
                self.sample = {k: e.get(k) for k in ("step", "images", "prompts")}
            elif kind == "artifact":
                self.artifacts.append({k: e[k] for k in ("path", "what", "step") if k in e})
            elif kind == "end":
                self.end = dict(e)
                self.state = str(e.get("state", "lost"))
            else:
                continue
            t = e.get("t")
            if isinstance(t, int | float):
                self.last_t = float(t)
            used += 1
        if used:
            self.events_seen += used
            self.version += 1
        return used

    def _step(self, e: dict[str, Any]) -> None:
        step = e.get("step")
        if isinstance(step, int):
            self.step = step
        total = e.get("total")
        if isinstance(total, int) and total > 0:
            self.total = total
        epoch = e.get("epoch")
        if isinstance(epoch, int):
            self.epoch = epoch
        lr = e.get("lr")
        if isinstance(lr, list):
            self.lr = [v for v in (_num(x) for x in lr) if v is not None]
        elif (one := _num(lr)) is not None:
            self.lr = [one]
        self.it_s = _num(e.get("it_s"))
        self.eta_s = _num(e.get("eta_s"))
        avg = _num(e.get("loss_avg"))
        if avg is not None:
            self.loss_avg = avg
        if self.end is None and self.state in ("queued", "starting"):
            self.state = "running"
        loss = _num(e.get("loss"))
        if loss is None:
            return
        self.loss = loss
        self.recent_loss.append(loss)
        self._bucket_sum += loss
        self._bucket_n += 1
        self._bucket_step = self.step
        self._bucket_avg = avg if avg is not None else loss
        if self._bucket_n >= self.stride:
            self._points.append(LossPoint(self._bucket_step, self._bucket_sum / self._bucket_n, self._bucket_avg))
            self._bucket_sum, self._bucket_n = 0.0, 0
            if len(self._points) >= self.max_points:
                self._halve()

    def _halve(self) -> None:
        pts = self._points
        self._points = [
            LossPoint(b.step, (a.loss + b.loss) / 2.0, b.loss_avg) for a, b in zip(pts[0::2], pts[1::2], strict=False)
        ]
        if len(pts) % 2:
            self._points.append(pts[-1])
        self.stride *= 2

    # ------------------------------------------------------------------ reading
    def history(self) -> list[LossPoint]:
        """The downsampled loss history, including the bucket still filling."""
        if self._bucket_n:
            return [
                *self._points,
                LossPoint(self._bucket_step, self._bucket_sum / self._bucket_n, self._bucket_avg),
            ]
        return list(self._points)

    @property
    def ended(self) -> bool:
        return self.end is not None

    @property
    def fraction(self) -> float | None:
        if not self.total:
            return None
        return max(0.0, min(1.0, self.step / self.total))

    def loras(self) -> list[str]:
        return [str(a["path"]) for a in self.artifacts if a.get("what") == "lora"]

    def final_lora(self) -> str | None:
        loras = self.loras()
        return loras[-1] if loras else None


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    s = max(0, round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
