"""Re-attaching to a long run: replaying a big `events.jsonl`, and following a writer that never pauses.

(a) Replay a synthetic job log (a start, N step events, a few logs and artifacts, an end; the format
    `EventWriter` writes) into a dashboard-ready `JobSeries`, each way in a fresh process:
      fast      `JobSeries.replay(path)`: bounded chunks, msgspec + numpy (what the dashboard does now)
      chunked   `EventTail.poll()` + `JobSeries.feed` until caught up: bounded chunks, json.loads a line
      naive     `read_events(path)` + `JobSeries.feed`: the whole file and every event in memory at once
    Time is wall-clock around the replay alone (imports done before), and the process's CPU time over the
    same span (user + system: what the replay costs when the machine is busy with other work). Memory is
    the growth of the process's peak RSS (ru_maxrss after minus before: what the machine really had to
    give) and, in a second run of the same child, tracemalloc's peak (Python allocations only). Each child
    checks its result equals `fast`'s (step, loss, loss_avg, lr, history, logs, artifacts, end, …).
(b) A writer process appends step events as fast as it can (`EventWriter.emit`, one write() a line) for
    a few seconds while a follower in this process keeps up:
      dashboard  `EventTail.read_lines` + `JobSeries.feed_lines` every 0.25 s (the dashboard's worker)
      poll+feed  `EventTail.poll` + `JobSeries.feed` every 0.25 s
      attach     `nyx attach`'s `JobFollower` (Rich progress) rendering to a null terminal Console
    Reports the writer's rate, the follower's rate, the lag (age of the newest event folded in, sampled
    after each poll) and how long after the writer's last event the follower had it.

    .venv/bin/python bench/reattach.py [--steps 1000000] [--quick] [--seconds 5] [--no-tracemalloc]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------- (a)
def write_log(path: Path, steps: int) -> None:
    """A long run as the native engine would leave it (steps thinned to none: one event per step)."""
    t0 = 1_795_846_583.0
    dumps = json.JSONEncoder(separators=(",", ":")).encode
    with open(path, "w") as f:
        f.write(dumps({"v": 1, "t": t0, "kind": "start", "job": "bench", "job_kind": "train", "total_steps": steps}))
        f.write("\n")
        lines = []
        for i in range(1, steps + 1):
            loss = 0.05 + ((i * 7919) % 1000) / 10_000 + 0.2 / (1 + i / 1000)
            lines.append(
                dumps(
                    {
                        "v": 1,
                        "t": round(t0 + i * 0.75, 3),
                        "kind": "step",
                        "step": i,
                        "total": steps,
                        "epoch": 1 + i // 10_000,
                        "loss": loss,
                        "loss_avg": round(0.05 + 0.2 / (1 + i / 1000), 6),
                        "lr": [1e-4 * (1 - i / steps), 5e-5 * (1 - i / steps)],
                        "it_s": 1.33,
                        "eta_s": round((steps - i) / 1.33, 1),
                    }
                )
            )
            if i % (steps // 8 or 1) == 0:
                msg = {"v": 1, "t": t0 + i * 0.75, "kind": "log", "level": "info", "message": f"saving at step {i}"}
                lines.append(dumps(msg))
                art = {"v": 1, "t": t0 + i * 0.75, "kind": "artifact", "path": f"output/bench-{i:07d}.safetensors"}
                lines.append(dumps({**art, "what": "lora", "step": i}))
            if len(lines) >= 10_000:
                f.write("\n".join(lines) + "\n")
                lines.clear()
        lines.append(dumps({"v": 1, "t": t0 + steps, "kind": "end", "state": "finished", "exit_code": 0}))
        f.write("\n".join(lines) + "\n")


def summary(s: Any) -> str:
    """What the dashboard shows, as one string, to compare the ways."""
    fields = ("step", "total", "epoch", "loss", "loss_avg", "lr", "it_s", "eta_s", "state", "end", "artifacts")
    return repr(([getattr(s, k) for k in fields], s.history(), list(s.recent_loss), list(s.logs), s.events_seen))


def child(way: str, path: str, traced: bool) -> None:
    """Replay one way; print a JSON line with the figures."""
    import tracemalloc

    import msgspec  # noqa: F401  (imports are not the replay's cost)
    import numpy  # noqa: F401

    from nyx_tui.jobs.events import EventTail, read_events
    from nyx_tui.jobs.series import JobSeries

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if traced:
        tracemalloc.start()
    t0, c0 = time.perf_counter(), time.process_time()
    s = JobSeries()
    if way == "fast":
        s.replay(Path(path))
    elif way == "chunked":
        tail = EventTail(Path(path))
        while True:
            s.feed(tail.poll())
            if tail.caught_up:
                break
    else:
        s.feed(read_events(Path(path)))
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak = tracemalloc.get_traced_memory()[1] if traced else 0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0
    print(json.dumps({"s": elapsed, "cpu": cpu, "rss_kb": rss, "traced": peak, "summary": summary(s)}))


def run_child(way: str, path: Path, traced: bool) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, __file__, "--child", way, str(path), *(["--traced"] if traced else [])],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    ).stdout
    return dict(json.loads(out.strip().splitlines()[-1]))


def bench_replay(steps: int, tmp: Path, traced: bool) -> None:
    path = tmp / "events.jsonl"
    t0 = time.perf_counter()
    write_log(path, steps)
    size = path.stat().st_size
    print(f"(a) replay {steps:,} step events ({size / 2**20:.0f} MiB, written in {time.perf_counter() - t0:.1f} s)")
    print("    each way in a fresh process; RSS = growth of ru_maxrss over the replay; traced = tracemalloc peak")
    print(f"    {'way':10} {'wall':>8} {'cpu':>8} {'events/s':>10} {'RSS':>9} {'traced':>9}  same result")
    rows: dict[str, dict[str, Any]] = {}
    for way in ("fast", "chunked", "naive"):
        r = run_child(way, path, traced=False)
        if traced:
            r["traced"] = run_child(way, path, traced=True)["traced"]
        rows[way] = r
        same = "yes" if r["summary"] == rows["fast"]["summary"] else "NO"
        traced_mb = f"{r['traced'] / 2**20:7.0f} MB" if traced else "        —"
        print(
            f"    {way:10} {r['s']:7.2f}s {r['cpu']:7.2f}s {steps / r['s']:10,.0f} {r['rss_kb'] / 1024:6.0f} MB "
            f"{traced_mb}  {same}"
        )
    fast = rows["fast"]
    for way in ("chunked", "naive"):
        r = rows[way]
        rss_ratio = max(r["rss_kb"], 1) / max(fast["rss_kb"], 1)
        print(
            f"    {way} / fast: {r['s'] / fast['s']:.1f}x the wall time, {r['cpu'] / fast['cpu']:.1f}x the CPU time, "
            f"{rss_ratio:.1f}x the RSS growth"
            + (f", {r['traced'] / max(fast['traced'], 1):.1f}x the traced peak" if traced else "")
        )
    for clock in ("s", "cpu"):
        goal = fast[clock] < 1.0 and fast["rss_kb"] < 100 * 1024
        print(
            f"    goal for 1,000,000 steps, < 1 s and < 100 MB, by {'wall' if clock == 's' else 'CPU'} time: "
            f"{'met' if goal else 'NOT met'} (at {steps:,} steps, load average {os.getloadavg()[0]:.1f})"
        )


# ---------------------------------------------------------------------------------------------- (b)
WRITER = """
import sys, time
from nyx_tui.jobs.events import EventWriter
path, seconds = sys.argv[1], float(sys.argv[2])
w = EventWriter(path)
w.emit("start", job="bench", job_kind="train", total_steps=10**9)
step = 0
t_end = time.monotonic() + seconds
while time.monotonic() < t_end:
    for _ in range(100):
        step += 1
        w.emit("step", step=step, total=10**9, epoch=1, loss=0.1 + (step % 97) / 1000, loss_avg=0.15,
               lr=[1e-4], it_s=1000.0, eta_s=1.0)
w.emit("end", state="finished", exit_code=0)
w.close()
print(step, time.time(), flush=True)
"""


def start_writer(path: Path, seconds: float) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path), str(seconds)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def follow_loop(path: Path, seconds: float, fast: bool) -> dict[str, Any]:
    """The dashboard's worker loop: drain what is there, sleep POLL_S, again; until the end event."""
    from nyx_tui.jobs.events import EventTail
    from nyx_tui.jobs.series import REPLAY_CHUNK, JobSeries

    s = JobSeries()
    tail = EventTail(path)
    lags: list[float] = []
    writer = start_writer(path, seconds)
    t0 = time.time()
    while not s.ended:
        while True:  # drain, a chunk at a time
            if fast:
                data = tail.read_lines(REPLAY_CHUNK)
                if not data:
                    break
                s.feed_lines(data)
            else:
                events = tail.poll()
                s.feed(events)
            if s.last_t is not None and not s.ended:
                lags.append(time.time() - s.last_t)
            if not fast and tail.caught_up:
                break
        time.sleep(0.25)
    done = time.time()
    out, _ = writer.communicate()
    written, t_last = out.split()
    return {"written": int(written), "t0": t0, "t_writer_end": float(t_last), "t_done": done, "lags": lags}


def follow_attach(seconds: float, tmp: Path) -> dict[str, Any]:
    """`nyx attach`'s follower, rendering to a terminal-like Console that writes nowhere."""
    from rich.console import Console

    from nyx_tui.follow import JobFollower
    from nyx_tui.jobs.jobdir import create_job

    os.environ["NYX_HOME"] = str(tmp / "home")
    job = create_job("train", "attach", ["true"])
    console = Console(file=io.StringIO(), force_terminal=True, width=120)
    follower = JobFollower(job, console)
    lags: list[float] = []
    on_event = follower._on_event

    def timed(e: dict[str, Any]) -> None:
        on_event(e)
        if e.get("kind") == "step" and e["step"] % 1000 == 0:
            lags.append(time.time() - e["t"])

    follower._on_event = timed  # type: ignore[method-assign]
    writer = start_writer(job.events_path, seconds)
    t0 = time.time()
    follower.run()
    done = time.time()
    out, _ = writer.communicate()
    written, t_last = out.split()
    return {"written": int(written), "t0": t0, "t_writer_end": float(t_last), "t_done": done, "lags": lags}


def bench_follow(seconds: float, tmp: Path) -> None:
    print(f"(b) follow a writer appending step events as fast as it can for {seconds:.0f} s (one write() an event)")
    print(
        f"    {'follower':10} {'writer ev/s':>12} {'follower ev/s':>14} {'lag p50':>8} {'p95':>7} {'max':>7} "
        f"{'after last':>11}"
    )
    for name in ("dashboard", "poll+feed", "attach"):
        if name == "attach":
            r = follow_attach(seconds, tmp)
        else:
            path = tmp / f"follow-{name.replace('+', '-')}.jsonl"
            r = follow_loop(path, seconds, fast=name == "dashboard")
        lags = r["lags"] or [0.0]
        q95 = statistics.quantiles(lags, n=20, method="inclusive")[-1] if len(lags) > 1 else lags[0]
        writer_rate = r["written"] / seconds
        follower_rate = r["written"] / (r["t_done"] - r["t0"])
        print(
            f"    {name:10} {writer_rate:12,.0f} {follower_rate:14,.0f} {statistics.median(lags) * 1000:6.0f}ms "
            f"{q95 * 1000:5.0f}ms {max(lags) * 1000:5.0f}ms {(r['t_done'] - r['t_writer_end']) * 1000:8.0f} ms"
        )
    print("    lag: age of the newest event folded in, after each chunk (the poll interval, 0.25 s, is part of it);")
    print("    attach samples it every 1000th step as it renders. 'after last': the end event written -> seen.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1_000_000)
    ap.add_argument("--quick", action="store_true", help="100,000 steps and a 3 s follow")
    ap.add_argument("--seconds", type=float, default=5.0, help="how long the writer of (b) writes")
    ap.add_argument("--no-tracemalloc", action="store_true", help="skip the tracemalloc runs (slow for naive)")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--traced", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child[0], args.child[1], args.traced)
        return
    steps = 100_000 if args.quick else args.steps
    seconds = 3.0 if args.quick else args.seconds
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory(prefix="nyx-reattach-") as d:
        tmp = Path(d)
        bench_replay(steps, tmp, traced=not args.no_tracemalloc)
        bench_follow(seconds, tmp)


if __name__ == "__main__":
    main()
