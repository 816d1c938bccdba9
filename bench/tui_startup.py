"""TUI benchmarks (prints figures, asserts nothing).

(a) Time to first frame, headless, in a fresh interpreter each run (imports included): `nyx_tui.app:NyxApp`
    if it exists, else a host App showing the dashboard (said so), against a bare Textual hello-world.
(b) A synthetic job writes 2,000 step events/s for ~10 s while a dashboard follows it: the lag between the
    newest step written and the step on screen, sampled every 50 ms, and whether it keeps up.
(c) Opening a finished job with a long history (200,000 steps): time until it is all on screen.

    .venv/bin/python bench/tui_startup.py [--runs 5] [--seconds 10] [--rate 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

CHILD_HELLO = """
import time
from textual.app import App
from textual.widgets import Static
class Hello(App):
    def compose(self):
        yield Static("Hello, world")
def first(pilot):
    async def go(p):
        await p.pause()
        print("FIRST", time.time(), flush=True)
        p.app.exit()
    return go
Hello().run(headless=True, size=(120, 36), auto_pilot=first(None))
"""

CHILD_NYX = """
import time
try:
    from nyx_tui.app import NyxApp
    app = NyxApp(watch_terminal=False)
    which = "nyx_tui.app:NyxApp"
except ImportError:
    from textual.app import App
    from nyx_tui.screens.dashboard import DashboardScreen
    class Host(App):
        def on_mount(self):
            self.push_screen(DashboardScreen(None))
    app = Host()
    which = "host App + DashboardScreen (nyx_tui.app is not there yet)"
async def go(p):
    await p.pause()
    print("FIRST", time.time(), which, flush=True)
    p.app.exit()
app.run(headless=True, size=(120, 36), auto_pilot=go)
"""


CHILD_DASH = """
import time
from textual.app import App
from nyx_tui.screens.dashboard import DashboardScreen
class Host(App):
    def on_mount(self):
        self.push_screen(DashboardScreen(None))
async def go(p):
    await p.pause()
    print("FIRST", time.time(), "host App + DashboardScreen (empty state)", flush=True)
    p.app.exit()
Host().run(headless=True, size=(120, 36), auto_pilot=go)
"""


def first_frame(code: str, env: dict[str, str]) -> tuple[float, str]:
    t0 = time.time()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60).stdout
    line = next(x for x in out.splitlines() if x.startswith("FIRST"))
    parts = line.split(" ", 2)
    return float(parts[1]) - t0, (parts[2] if len(parts) > 2 else "")


def bench_startup(runs: int, env: dict[str, str]) -> None:
    first_frame(CHILD_HELLO, env)  # warm the OS file cache and .pyc files
    first_frame(CHILD_NYX, env)
    first_frame(CHILD_DASH, env)
    hello: list[float] = []
    others: dict[str, list[float]] = {}
    for _ in range(runs):  # interleaved, so a noisy moment hits every variant alike
        hello.append(first_frame(CHILD_HELLO, env)[0])
        for code in (CHILD_NYX, CHILD_DASH):
            t, which = first_frame(code, env)
            others.setdefault(which, []).append(t)
    mh = statistics.median(hello)
    print(f"(a) time to first frame, headless 120x36, median of {runs} fresh processes (imports included)")
    print(f"    bare Textual hello-world: {mh * 1000:6.0f} ms   (runs: {', '.join(f'{t * 1000:.0f}' for t in hello)})")
    for which, times in others.items():
        m = statistics.median(times)
        print(
            f"    {which}: {m * 1000:6.0f} ms = {m / mh:.2f}x hello (goal <= 1.5x)   "
            f"(runs: {', '.join(f'{t * 1000:.0f}' for t in times)})"
        )


def bench_follow(seconds: float, rate: int) -> None:
    from textual.app import App

    from nyx_tui.jobs.jobdir import create_job
    from nyx_tui.screens.dashboard import DashboardScreen

    job = create_job("train", "bench", ["true"])
    fd = job.try_lock()
    job.write_status(state="running")
    total = int(seconds * rate) + 1
    written_at: dict[int, float] = {}
    newest = [0]
    stop = threading.Event()

    def writer() -> None:
        f = os.open(job.events_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        start = {"v": 1, "t": time.time(), "kind": "start", "job": job.id, "job_kind": "train", "total_steps": total}
        os.write(f, (json.dumps(start) + "\n").encode())
        t0 = time.monotonic()
        step = 0
        batch = max(1, rate // 200)  # every 5 ms
        while not stop.is_set() and step < total:
            due = int((time.monotonic() - t0) * rate)
            lines = []
            while step < min(due, total):
                step += 1
                e = {
                    "v": 1,
                    "t": round(time.time(), 3),
                    "kind": "step",
                    "step": step,
                    "total": total,
                    "epoch": 1,
                    "loss": 0.1 + (step % 97) / 1000,
                    "loss_avg": 0.15,
                    "lr": [1e-4],
                    "it_s": float(rate),
                    "eta_s": (total - step) / rate,
                }
                lines.append(json.dumps(e, separators=(",", ":")) + "\n")
            if lines:
                os.write(f, "".join(lines).encode())
                now = time.monotonic()
                written_at[step] = now
                newest[0] = step
            time.sleep(batch / rate)
        os.close(f)

    lag_steps: list[int] = []
    lag_s: list[float] = []
    catch_up: list[float] = []

    class Host(App[None]):
        def on_mount(self) -> None:
            self.push_screen(DashboardScreen(job.id))

    async def run() -> None:
        app = Host()
        async with app.run_test(size=(120, 36)) as pilot:
            await pilot.pause(0.3)
            th = threading.Thread(target=writer, daemon=True)
            th.start()
            screen: Any = app.screen
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                await asyncio.sleep(0.05)
                shown = screen.shown_step
                now = time.monotonic()
                lag_steps.append(newest[0] - shown)
                # age of the newest step that is on screen: when was the first batch containing a later step
                later = [s for s in written_at if s > shown]
                lag_s.append(now - written_at[min(later)] if later else 0.0)
            stop.set()
            th.join()
            t_stop = time.monotonic()
            while screen.shown_step < newest[0] and time.monotonic() - t_stop < 10:
                await asyncio.sleep(0.01)
            catch_up.append(time.monotonic() - t_stop if screen.shown_step >= newest[0] else float("inf"))

    asyncio.run(run())
    os.close(fd or -1)
    q = statistics.quantiles(lag_s, n=100)
    half = len(lag_s) // 2
    first_half, second_half = statistics.median(lag_s[:half]), statistics.median(lag_s[half:])
    keeps_up = second_half < first_half * 1.5 + 0.05 and catch_up[0] < 1.0
    print(f"(b) follow: {rate} step events/s for {seconds:.0f} s ({newest[0]} written), {len(lag_s)} samples")
    print(
        f"    lag behind the newest event: p50 {q[49] * 1000:.0f} ms, p95 {q[94] * 1000:.0f} ms, "
        f"max {max(lag_s) * 1000:.0f} ms; in steps p50 {statistics.median(lag_steps):.0f}, max {max(lag_steps)}"
    )
    print(
        f"    median lag first half {first_half * 1000:.0f} ms, second half {second_half * 1000:.0f} ms; "
        f"last step on screen {catch_up[0] * 1000:.0f} ms after the writer stopped -> "
        f"{'keeps up' if keeps_up else 'FALLS BEHIND'} (poll 0.25 s + redraw 0.1 s bound the lag by design)"
    )


def bench_replay(steps: int) -> None:
    """(c) Opening a finished job with a long history: time until the whole history is on screen."""
    from textual.app import App

    from nyx_tui.jobs.jobdir import create_job
    from nyx_tui.screens.dashboard import DashboardScreen

    job = create_job("train", "replay", ["true"])
    lines = [json.dumps({"v": 1, "t": 1.0, "kind": "start", "job": job.id, "job_kind": "train", "total_steps": steps})]
    for i in range(1, steps + 1):
        e = {
            "v": 1,
            "t": 1.0 + i,
            "kind": "step",
            "step": i,
            "total": steps,
            "epoch": 1,
            "loss": 0.1 + (i % 97) / 1000,
            "loss_avg": 0.15,
            "lr": [1e-4],
            "it_s": 3.0,
            "eta_s": float(steps - i),
        }
        lines.append(json.dumps(e, separators=(",", ":")))
    lines.append(json.dumps({"v": 1, "t": 2.0 + steps, "kind": "end", "state": "finished", "exit_code": 0}))
    job.events_path.write_text("\n".join(lines) + "\n")
    job.write_status(state="finished")
    size_mb = job.events_path.stat().st_size / 2**20
    elapsed: list[float] = []

    class Host(App[None]):
        def on_mount(self) -> None:
            self.push_screen(DashboardScreen(job.id))

    async def run() -> None:
        t0 = time.monotonic()
        async with Host().run_test(size=(120, 36)) as pilot:
            screen: Any = pilot.app.screen
            while not (getattr(screen, "replayed", False) and screen.shown_step == steps):
                await asyncio.sleep(0.01)
                screen = pilot.app.screen
            elapsed.append(time.monotonic() - t0)

    asyncio.run(run())
    print(
        f"(c) open a finished job of {steps} steps ({size_mb:.0f} MB of events): history on screen in "
        f"{elapsed[0]:.2f} s ({steps / elapsed[0] / 1000:.0f}k events/s)"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--rate", type=int, default=2000)
    ap.add_argument("--replay-steps", type=int, default=200_000)
    args = ap.parse_args()
    home = tempfile.mkdtemp(prefix="nyx-bench-")
    os.environ["NYX_HOME"] = home
    os.environ.setdefault("NYX_GPU", "none")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    bench_startup(args.runs, env)
    bench_follow(args.seconds, args.rate)
    bench_replay(args.replay_steps)


if __name__ == "__main__":
    main()
