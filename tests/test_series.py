from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nyx_tui.jobs.events import EventTail, parse_lines
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


# ---------------------------------------------------------------------------- bounded tailing, fast replay
def _line(e: dict[str, Any]) -> bytes:
    return (json.dumps(e, separators=(",", ":")) + "\n").encode()


def test_tail_reads_bounded_chunks_without_losing_or_repeating(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    long_message = "x" * 5000  # a line much longer than the chunk comes out whole
    events = [step(i) for i in range(1, 40)]
    events.insert(7, {"v": 1, "t": 1.0, "kind": "log", "level": "info", "message": long_message})
    path.write_bytes(b"".join(map(_line, events)) + b'{"v":1,"t":2.0,"kind":"st')  # torn last line
    tail = EventTail(path)
    got: list[dict[str, Any]] = []
    reads = 0
    while True:
        batch = tail.poll(max_bytes=100)
        got += batch
        reads += 1
        assert len(batch) <= 2 or any(e["kind"] == "log" for e in batch)  # ~100 bytes a call
        if tail.caught_up:
            break
    assert got == events and reads > 20
    size = path.stat().st_size
    assert tail.offset == size - len(b'{"v":1,"t":2.0,"kind":"st')  # after the last complete line
    assert tail.poll(max_bytes=100) == [] and tail.caught_up
    # a second tail resumes at `offset`; both see the torn line once it is complete, and only once
    other = EventTail(path, tail.offset)
    with open(path, "ab") as f:
        f.write(b'ep","step":40,"loss":0.1}\n')
    for t in (tail, other):
        assert [e.get("step") for e in t.poll(max_bytes=3)] == [40]
        assert t.poll() == [] and t.offset == path.stat().st_size


def test_tail_long_torn_line_is_not_reread(tmp_path: Path) -> None:
    """A line still being written that is longer than a chunk is kept, not read again each poll."""
    path = tmp_path / "events.jsonl"
    head = b'{"v":1,"t":1.0,"kind":"log","level":"info","message":"' + b"y" * 1000
    path.write_bytes(_line(step(1)) + head)
    tail = EventTail(path)
    assert [e["step"] for e in tail.poll(max_bytes=100)] == [1]
    assert tail.poll(max_bytes=100) == [] and tail.caught_up
    assert tail._partial == head  # held, so the next poll reads only what comes after it
    with open(path, "ab") as f:
        f.write(b'"}\n')
    assert [len(e["message"]) for e in tail.poll(max_bytes=100)] == [1000]
    assert tail.offset == path.stat().st_size and tail._partial == b""


def test_tail_follow_drains_a_backlog_without_sleeping(tmp_path: Path) -> None:
    from nyx_tui.jobs import events as events_module

    path = tmp_path / "events.jsonl"
    path.write_bytes(
        b"".join(_line(step(i)) for i in range(1, 2001)) + _line({"v": 1, "t": 9.0, "kind": "end", "state": "finished"})
    )
    old = events_module.READ_CHUNK
    try:
        events_module.READ_CHUNK = 1000  # many chunks; with a sleep between them this would take minutes
        t0 = time.perf_counter()
        got = list(EventTail(path).follow(interval=10.0))
    finally:
        events_module.READ_CHUNK = old
    assert len(got) == 2001 and got[-1]["kind"] == "end"
    assert time.perf_counter() - t0 < 5


# Lines msgspec decodes (so the fast path folds them) with values `feed` treats specially.
ODD_BUT_DECODABLE = [
    b'{"v":1,"kind":"step","loss":null,"loss_avg":null,"lr":0.001,"it_s":null,"total":0,"epoch":"e"}\n',
    b'{"v":1,"t":4,"kind":"step","loss":0.25,"lr":[],"total":true}\n',  # no step: it keeps the last one
    b'{"v":1,"t":4.0,"kind":"step","step":7,"loss":-0.0,"loss_avg":1e-300,"lr":["x",1,null],"eta_s":"soon"}\n',
    b'{"v":1,"kind":"step","loss":1e-400,"total":"9","epoch":null,"lr":1e999,"it_s":1e999,"x":{"kind":"log"}}\n',
    b'{"v":1,"t":5.5,"kind":"step"}\n',  # a step with nothing in it
    b'{"v":1,"t":5.5,"kind":"st\\u0065p","step":3,"loss":0.5,"loss":0.75}\n',  # an escaped kind; a repeated key
    b"\n  \n",  # blank lines
]
# Lines msgspec refuses, or reads otherwise than line by line: the chunk that holds one takes the slow path.
BROKEN = [
    b'{"v":1,"t":3.0,"kind":"step","step":5,"loss":NaN,"loss_avg":Infinity,"lr":[NaN]}\n',
    b'{"v":1,"t":1,"kind":"step","step":3.0,"loss":1e999,"loss_avg":2}\n',  # a float step is no step
    b'{"v":1,"t":4.0,"kind":"step","step":8,"loss":1' + b"0" * 330 + b"}\n",  # too large for a float
    b'{"v":1,"t":5.0,"kind":"st\n',  # malformed
    b'[1,2]\n"step"\n',  # not objects
    b'{"v":1,"t":5.0,"kind":"step","step":1,"loss":0.5,"x":"\xff"}\n',  # not UTF-8: skipped
    b'{"v":1,"kind":"step"} {"v":1,"kind":"step"}\n',  # two objects on a line: skipped
    b'{"v":1,"kind":"step","step":4,"loss":0.3,"loss_avg":"x","t":"x"}\n',
]


def _mixed_log(rng: random.Random, n_steps: int, broken: bool = True) -> bytes:
    """Every kind, oddities the schema says to skip, and the values `feed` treats specially, a torn last line."""
    out: list[bytes] = [_line({"v": 1, "t": 1.0, "kind": "start", "job": "j", "job_kind": "train", "total_steps": 500})]
    for i in range(1, n_steps + 1):
        e = step(i, total=n_steps, loss=rng.choice([rng.random(), rng.uniform(-1e-3, 1e3), 1e-300, -0.0, 7.0]))
        e["loss_avg"] = rng.random() * 10 ** rng.randint(-5, 5)
        e["lr"] = [rng.random() * 1e-4, 2e-5]
        out.append(_line(e))
        r = rng.randrange(40)
        if r == 0:
            out.append(_line({"v": 1, "t": 2.0 + i, "kind": "log", "level": "warning", "message": f"m{i}"}))
        elif r == 1:
            out.append(_line({"v": 1, "kind": "artifact", "path": f"out/a-{i}.safetensors", "what": "lora", "step": i}))
        elif r == 2:
            out.append(_line({"v": 1, "t": 2.0, "kind": "metric", "name": "val_loss", "value": 0.5, "step": i}))
        elif r == 3:
            out.append(_line({"v": 1, "t": 6.0, "kind": "sample", "step": i, "images": ["s.png"], "prompts": ["p"]}))
            out.append(_line({"v": 1, "t": 6.0, "kind": "progress", "done": i, "total": 9, "unit": "images"}))
            out.append(_line({"v": 1, "t": 6.0, "kind": "mystery", "step": i}))
        elif r < 10:
            out.append(rng.choice(ODD_BUT_DECODABLE))
        elif r == 10 and broken:
            out.append(rng.choice(BROKEN))
    out.append(ODD_BUT_DECODABLE[3])  # the last step before the end leaves lr, total and epoch to the one before
    out.append(_line({"v": 1, "t": 9.0, "kind": "end", "state": "failed", "error": "boom", "last_lines": ["a", "b"]}))
    out.append(_line(step(n_steps + 1)))  # a late step never revives an ended job
    return b"".join(out) + b'{"v":1,"t":9.5,"kind":"step","step":99999,"loss":0.1'  # torn


def _state(s: JobSeries) -> dict[str, Any]:
    """Everything a view reads, compared by repr so that floats must match bit for bit (and -0.0 ≠ 0.0)."""
    d = {k: repr(v) for k, v in vars(s).items() if k not in ("version", "feed")}
    d["history"] = repr(s.history())
    return d


@pytest.mark.parametrize("broken", [True, False])
@pytest.mark.parametrize("chunk", [1 << 20, 4096, 333, 1])
def test_replay_equals_feeding_events_one_by_one(tmp_path: Path, chunk: int, broken: bool) -> None:
    data = _mixed_log(random.Random(chunk), 3000, broken)
    path = tmp_path / "events.jsonl"
    path.write_bytes(data)
    slow = JobSeries(max_points=16, recent=50, log_lines=7)
    for e in parse_lines(data):
        slow.feed([e])
    fast = JobSeries(max_points=16, recent=50, log_lines=7)
    fed_one_by_one = 0
    feed = fast.feed

    def counting_feed(events: Any) -> int:
        nonlocal fed_one_by_one
        used = feed(events)
        fed_one_by_one += used
        return used

    fast.feed = counting_feed  # type: ignore[method-assign]
    offset = fast.replay(path, max_bytes=chunk)
    assert offset == data.rfind(b"\n") + 1
    assert fast.events_seen > 3000 and fast.state == "failed" and fast.stride > 16
    assert _state(fast) == _state(slow)
    # and the same after every chunk, not only at the end (a later chunk would hide a wrong earlier one)
    fast2, slow2 = JobSeries(max_points=16, recent=50, log_lines=7), JobSeries(max_points=16, recent=50, log_lines=7)
    tail = EventTail(path)
    while lines := tail.read_lines(chunk):
        fast2.feed_lines(lines)
        slow2.feed(parse_lines(lines))
        assert _state(fast2) == _state(slow2)
    if not broken or chunk < 1000:  # the fast path did the steps; only the other kinds went through `feed`
        assert fed_one_by_one < fast.events_seen / 3
    # following on from the offset: the torn line, completed, is seen once
    with open(path, "ab") as f:
        f.write(b',"loss_avg":0.1}\n')
    tail = EventTail(path, offset)
    fast.feed(tail.poll())
    slow.feed(parse_lines(path.read_bytes()[offset:]))
    assert fast.step == 99999 and _state(fast) == _state(slow)


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32),
    n=st.integers(0, 400),
    max_points=st.sampled_from([4, 6, 16]),
    cuts=st.lists(st.integers(1, 30_000), max_size=6),
    broken=st.booleans(),
)
def test_feed_lines_equals_feed_in_any_split(seed: int, n: int, max_points: int, cuts: list[int], broken: bool) -> None:
    """Cut the log anywhere (at line ends: `feed_lines` takes whole lines) and fold the pieces in turn."""
    data = _mixed_log(random.Random(seed), n, broken)
    data = data[: data.rfind(b"\n") + 1]
    ends = [*sorted({data.find(b"\n", c % max(1, len(data))) + 1 for c in cuts} - {0}), len(data)]
    slow = JobSeries(max_points=max_points, recent=13)
    fast = JobSeries(max_points=max_points, recent=13)
    start = 0
    for end in ends:
        fast.feed_lines(data[start:end])
        slow.feed(parse_lines(data[start:end]))
        assert _state(fast) == _state(slow)
        start = end


def test_replay_bucket_sums_are_sequential(tmp_path: Path) -> None:
    """numpy's `sum` is pairwise; the fold must add left to right like `feed` or means drift in the last bits."""
    rng = random.Random(5)
    path = tmp_path / "events.jsonl"
    path.write_bytes(
        b"".join(_line(step(i, loss=rng.uniform(0, 1) * 10 ** rng.randint(-8, 8))) for i in range(1, 50_001))
    )
    fast, slow = JobSeries(max_points=8), JobSeries(max_points=8)
    fast.replay(path)
    slow.feed(parse_lines(path.read_bytes()))
    assert fast.stride == slow.stride >= 8192
    assert repr(fast.history()) == repr(slow.history())
