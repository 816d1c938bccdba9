from __future__ import annotations

import time
from typing import Any

from nyx_tui.jobs.series import JobSeries, format_duration


def step(n: int, total: int = 1000, loss: float = 0.5) -> dict[str, Any]:
    return {
        "v": 1,
        "t": 1000.0 + n,
        "kind": "step",
        "step": n,
        "total": total,
        "epoch": 1 + n // 100,
        "loss": loss,
        "loss_avg": loss * 0.9,
        "lr": [1e-4],
        "it_s": 2.5,
        "eta_s": float(total - n),
    }


def test_fold_basic_fields() -> None:
    s = JobSeries()
    s.feed([{"v": 1, "t": 1.0, "kind": "start", "job": "j", "job_kind": "train", "total_steps": 1000}])
    assert s.state == "running" and s.total == 1000 and s.job_kind == "train"
    s.feed([step(1, loss=0.4), step(2, loss=0.2)])
    assert s.step == 2 and s.loss == 0.2 and abs(s.loss_avg - 0.18) < 1e-9  # type: ignore[operator]
    assert s.lr == [1e-4] and s.it_s == 2.5 and s.eta_s == 998.0 and s.epoch == 1
    assert [p.step for p in s.history()] == [1, 2]
    assert s.fraction == 0.002
    v = s.version
    s.feed([{"v": 1, "t": 2.0, "kind": "unknown"}])
    assert s.version == v  # nothing used, no redraw


def test_logs_artifacts_sample_end() -> None:
    s = JobSeries(log_lines=3)
    s.feed([{"v": 1, "t": 1.0, "kind": "log", "level": "info", "message": f"m{i}"} for i in range(5)])
    assert [m for _, m in s.logs] == ["m2", "m3", "m4"]
    s.feed(
        [
            {"v": 1, "t": 2.0, "kind": "artifact", "path": "output/a-000050.safetensors", "what": "lora", "step": 50},
            {"v": 1, "t": 2.0, "kind": "artifact", "path": "output/state", "what": "state"},
            {"v": 1, "t": 3.0, "kind": "artifact", "path": "output/a.safetensors", "what": "lora"},
            {"v": 1, "t": 3.0, "kind": "sample", "step": 50, "images": ["x.png"], "prompts": ["p"]},
            {"v": 1, "t": 4.0, "kind": "end", "state": "failed", "error": "CUDA out of memory", "hint": "lower it"},
        ]
    )
    assert s.loras() == ["output/a-000050.safetensors", "output/a.safetensors"]
    assert s.final_lora() == "output/a.safetensors"
    assert s.sample == {"step": 50, "images": ["x.png"], "prompts": ["p"]}
    assert s.state == "failed" and s.ended and s.end is not None and s.end["hint"] == "lower it"
    s.feed([step(60)])  # a late step never revives an ended job
    assert s.state == "failed"


def test_history_bounded_and_means_preserved() -> None:
    s = JobSeries(max_points=64)
    n = 100_000
    s.feed(step(i, total=n, loss=float(i % 2)) for i in range(1, n + 1))
    hist = s.history()
    assert len(hist) <= 65
    assert hist[-1].step == n
    assert all(abs(p.loss - 0.5) < 1e-9 for p in hist[:-1])  # buckets of even size average 0 and 1
    steps = [p.step for p in hist]
    assert steps == sorted(steps)


def test_million_steps_fast_and_bounded() -> None:
    s = JobSeries()
    events = [step(i, total=1_000_000) for i in range(1, 1_000_001)]
    t0 = time.perf_counter()
    for i in range(0, len(events), 10_000):
        s.feed(events[i : i + 10_000])
    elapsed = time.perf_counter() - t0
    assert len(s.history()) <= s.max_points + 1
    assert s.step == 1_000_000 and len(s.recent_loss) == 240
    assert elapsed < 10, elapsed


def test_bad_values_ignored() -> None:
    s = JobSeries()
    s.feed(
        [
            {
                "v": 1,
                "t": 1.0,
                "kind": "step",
                "step": 3,
                "total": 10,
                "epoch": 1,
                "loss": None,
                "loss_avg": "x",
                "lr": 0.001,
                "it_s": None,
                "eta_s": None,
            }
        ]
    )
    assert s.step == 3 and s.loss is None and s.history() == [] and s.lr == [0.001]


def test_format_duration() -> None:
    assert format_duration(None) == "—"
    assert format_duration(65) == "1:05"
    assert format_duration(3725) == "1:02:05"
