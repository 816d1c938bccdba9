"""Following a job from the command line: Rich progress over its events, nothing else.

This is a view: it reads `events.jsonl` and `status.json` and never signals the job, so killing it
(Ctrl+C, a dropped SSH session, `kill -9`) leaves the job running. The one thing it may write is the
`lost` end of a job whose supervisor died, as `nyx jobs` does; then it ends like any other follower.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from nyx_tui.jobs.events import EventTail
from nyx_tui.jobs.jobdir import TERMINAL, JobDir
from nyx_tui.jobs.store import LOST_ERROR

_LEVEL_STYLE = {"debug": "dim", "info": "", "warning": "yellow", "error": "bold red"}


def _fmt_eta(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds < 0:
        return "--:--"
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60:02d}:{s % 60:02d}"


class JobFollower:
    """Renders one job's events as they arrive; returns the `end` event (or a synthesized one)."""

    def __init__(self, job: JobDir, console: Console, poll_s: float = 0.25) -> None:
        self.job = job
        self.console = console
        self.poll_s = poll_s
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            console=console,
            transient=False,
        )
        self._train: TaskID | None = None
        self._stage: TaskID | None = None
        self._tty = _terminal_fd(console)

    def _on_event(self, e: dict[str, Any]) -> None:
        kind = e.get("kind")
        p = self.progress
        if kind == "start":
            total = e.get("total_steps")
            self.console.print(f"[bold]{e.get('job')}[/] started ({e.get('job_kind', 'job')})")
            if total:
                self._train = p.add_task("train", total=total, info="")
        elif kind == "progress":
            desc = str(e.get("message") or e.get("unit") or "working")
            if self._stage is None:
                self._stage = p.add_task(desc, total=e.get("total") or None, info="")
            p.update(self._stage, description=desc, completed=e.get("done", 0), total=e.get("total") or None)
        elif kind == "step":
            if self._stage is not None:
                p.update(self._stage, visible=False)
            if self._train is None:
                self._train = p.add_task("train", total=e.get("total"), info="")
            lr = e.get("lr") or []
            info = (
                f"loss {e.get('loss', float('nan')):.4f} avg {e.get('loss_avg', float('nan')):.4f} "
                f"lr {lr[0] if lr else 0:.2e} {e.get('it_s', 0):.2f} it/s ETA {_fmt_eta(e.get('eta_s'))}"
            )
            p.update(self._train, completed=e.get("step", 0), total=e.get("total"), info=info)
        elif kind == "artifact":
            self.console.print(f"saved {e.get('what')}: {e.get('path')}")
        elif kind == "log":
            level = str(e.get("level", "info"))
            style = _LEVEL_STYLE.get(level, "")
            msg = str(e.get("message", ""))
            self.console.print(f"[{style}]{msg}[/]" if style else msg, markup=bool(style), highlight=False)
        elif kind == "metric":
            self.console.print(f"{e.get('name')} = {e.get('value')} (step {e.get('step')})")

    def run(self) -> dict[str, Any]:
        tail = EventTail(self.job.events_path)
        end: dict[str, Any] | None = None
        last_check = 0.0
        with self.progress:
            while end is None:
                end = self._read(tail)
                if end is not None:
                    break
                now = time.monotonic()
                if now - last_check > 2.0:  # a job can end without an end event only if it was lost
                    last_check = now
                    if self._tty is not None and not os.isatty(self._tty):
                        # the terminal was hung up (an SSH drop) but SIGHUP is ignored here (`nohup`,
                        # `trap '' HUP`): nobody sees this view and every write fails. End as the hangup
                        # would have; the job goes on.
                        os._exit(128 + signal.SIGHUP)
                    state = self.job.effective_state()
                    if state in TERMINAL:
                        if state == "lost":
                            _record_lost(self.job)
                        end = self._read(tail)
                        if end is None:
                            status = self.job.status()
                            error = status.get("error") or (LOST_ERROR if state == "lost" else None)
                            end = {"kind": "end", "state": state, "error": error, "hint": status.get("hint")}
                        break
                time.sleep(self.poll_s)
        return end

    def _read(self, tail: EventTail) -> dict[str, Any] | None:
        """Show the new events; return the end event if it came."""
        while True:  # a long backlog comes in bounded chunks: drain it before the next sleep
            for e in tail.poll():
                if e.get("kind") == "end":
                    return e
                self._on_event(e)
            if tail.caught_up:
                return None


def _terminal_fd(console: Console) -> int | None:
    """The fd of the console's terminal, or None when it does not write to one."""
    try:
        fd = console.file.fileno()
    except (AttributeError, OSError, ValueError):
        return None
    return fd if os.isatty(fd) else None


def _record_lost(job: JobDir) -> None:
    """The supervisor died without an end (kill -9, the OOM killer): write the `lost` end the way
    `nyx jobs` would (`mark_lost`: once, under the job's lock), so this view and every later one show
    why, with the worker's last lines. Best effort: without it `run` makes up the end from the status."""
    from nyx_tui.jobs.store import mark_lost

    with contextlib.suppress(OSError):
        mark_lost(job)


def print_end(console: Console, job: JobDir, end: dict[str, Any]) -> None:
    state = end.get("state", "?")
    style = {"finished": "bold green", "cancelled": "bold yellow"}.get(state, "bold red")
    console.print(f"[{style}]{state.upper()}[/] {job.id}")
    for key in ("reason", "error", "hint"):
        if end.get(key):
            console.print(f"  {key}: {end[key]}", highlight=False)
    if state not in ("finished", "cancelled") and end.get("last_lines"):
        console.print("  last lines of output.log:")
        for line in end["last_lines"][-15:]:
            console.print(f"    {line}", markup=False, highlight=False)
    first, last = job.first_event("step"), job.last_event("step")
    if first is not None and last is not None:
        console.print(
            f"  steps {last.get('step')}/{last.get('total')}, loss (moving average) "
            f"{first.get('loss_avg', float('nan')):.4f} → {last.get('loss_avg', float('nan')):.4f}",
            highlight=False,
        )
    for a in job.artifacts():
        if a.get("what") == "lora":
            console.print(f"  lora: {a['path']}", highlight=False)
    console.print(f"  job folder: {job.path}", highlight=False)
