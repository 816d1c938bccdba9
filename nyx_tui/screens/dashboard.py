"""The training dashboard: one job's progress, loss, GPU, logs, and its end.

Opening a job replays `events.jsonl` from offset 0 in a thread worker, then follows it by offset
(~0.25 s polls). The worker folds events into a `JobSeries` under a lock; a 10 Hz timer redraws only
when the series changed, so a job writing thousands of events a second costs at most ~10 redraws/s.
The screen follows the App's reactive `current_job` and asks the App for things with messages.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any, ClassVar

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen, Screen
from textual.widgets import Button, Footer, Log, ProgressBar, Sparkline, Static
from textual.worker import get_current_worker

from nyx_tui.jobs.events import EventTail
from nyx_tui.jobs.jobdir import ACTIVE, TERMINAL, JobDir, find_job, list_jobs
from nyx_tui.jobs.series import JobSeries, format_duration
from nyx_tui.widgets.gpu_panel import GpuPanel
from nyx_tui.widgets.loss_chart import LossChart

STATE_SYMBOL = {
    "queued": "… queued",
    "starting": "◌ starting",
    "running": "▶ running",
    "finished": "✔ finished",
    "failed": "✖ failed",
    "cancelled": "■ cancelled",
    "lost": "? lost",
}
STATE_STYLE = {
    "running": "bold",
    "finished": "bold green",
    "failed": "bold red",
    "cancelled": "bold yellow",
    "lost": "bold magenta",
}
POLL_S = 0.25
REDRAW_S = 0.1


class ConfirmScreen(ModalScreen[bool]):
    """A y/n question."""

    DEFAULT_CSS = """
    ConfirmScreen { align: center middle; }
    ConfirmScreen > Vertical { width: 60; max-width: 95%; height: auto; border: thick $accent; padding: 1 2;
                               background: $surface; }
    ConfirmScreen Horizontal { height: auto; margin-top: 1; }
    ConfirmScreen Button { margin-right: 2; }
    """
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("y", "answer(True)", "Yes", id="nyx.dashboard.confirm_yes"),
        Binding("n", "answer(False)", "No", id="nyx.dashboard.confirm_no"),
        Binding("escape", "answer(False)", "No", show=False, id="nyx.dashboard.confirm_escape"),
    ]

    def __init__(self, question: str) -> None:
        super().__init__()
        self.question = question

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Static(content=self.question, id="question")
            with Horizontal():
                yield Button("Yes (y)", id="yes", variant="error")
                yield Button("No (n)", id="no")

    def on_mount(self) -> None:
        self.query_one("#no", Button).focus()

    def action_answer(self, answer: bool) -> None:
        self.dismiss(answer)

    @on(Button.Pressed)
    def _pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")


def _abs_path(job: JobDir, path: str) -> Path:
    p = Path(path)
    return p if p.is_absolute() else job.path / p


class DashboardScreen(Screen[None]):
    DEFAULT_CSS = """
    DashboardScreen { layout: vertical; }
    DashboardScreen #empty { height: 1fr; content-align: center middle; text-align: center; color: $text-muted; }
    DashboardScreen #dash { height: 1fr; }
    DashboardScreen #header { height: auto; padding: 0 1; }
    DashboardScreen #progress { height: 1; padding: 0 1; }
    DashboardScreen #progress Bar { width: 1fr; }
    DashboardScreen #main { height: 1fr; min-height: 6; }
    DashboardScreen #left { width: 1fr; }
    DashboardScreen #right { width: 44; height: 1fr; padding: 0 1; border-left: vkey $panel; }
    DashboardScreen #spark-row { height: 1; }
    DashboardScreen #spark-label { width: 11; padding-left: 1; color: $text-muted; }
    DashboardScreen #spark { width: 1fr; height: 1; }
    DashboardScreen #chart { height: 1fr; }
    DashboardScreen #sample-info { height: auto; color: $text-muted; }
    DashboardScreen #endinfo { height: auto; max-height: 14; padding: 0 1; border-top: solid $panel; }
    DashboardScreen #log { height: 7; border-top: solid $panel; }
    DashboardScreen.-narrow #main { layout: vertical; }
    DashboardScreen.-narrow #right { width: 1fr; height: auto; border-left: none; padding: 0 1; }
    DashboardScreen.-narrow #log { height: 4; }
    DashboardScreen.-narrow #endinfo { max-height: 8; }
    """
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (100, "-wide")]  # noqa: RUF012
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("s", "stop", "Stop", id="nyx.dashboard.stop"),
        Binding("x", "cancel_job", "Cancel", id="nyx.dashboard.cancel"),
        Binding("v", "save_now", "Save now", id="nyx.dashboard.save_now"),
        Binding("p", "sample_now", "Sample now", id="nyx.dashboard.sample_now"),
        Binding("left_square_bracket", "cycle(-1)", "Prev job", id="nyx.dashboard.prev_job"),
        Binding("right_square_bracket", "cycle(1)", "Next job", id="nyx.dashboard.next_job"),
        Binding("o", "show_lora", "LoRA path", id="nyx.dashboard.show_lora"),
    ]

    def __init__(self, job_id: str | None = None, *, name: str | None = None, id: str | None = None) -> None:
        super().__init__(name=name, id=id)
        self.initial_job = job_id
        self.job: JobDir | None = None
        self.series = JobSeries()
        self._lock = threading.Lock()
        self._drawn_version = -1
        self._logs_shown = 0
        self._dir_state = "queued"  # effective_state() as the follow worker last read it
        self.replayed = False  # the whole history up to the open has been folded in and drawn
        self.shown_step = 0  # the step the last redraw put on screen (tests, bench)
        self._replay_done = False
        self._generation = 0

    # ------------------------------------------------------------------ layout
    def compose(self) -> ComposeResult:
        yield Static(
            content="No job open.\n\nStart one from Home (or run `nyx demo`), or press [ / ] to cycle running jobs.",
            id="empty",
        )
        with Vertical(id="dash"):
            yield Static(content="", id="header")
            yield ProgressBar(total=100, show_eta=False, id="progress")
            with Horizontal(id="main"):
                with Vertical(id="left"):
                    with Horizontal(id="spark-row"):
                        yield Static(content="raw loss", id="spark-label")
                        yield Sparkline([], id="spark")
                    yield LossChart(id="chart")
                with Vertical(id="right"):
                    yield GpuPanel(id="gpu")
                    yield Static(content="samples: none yet", id="sample-info")
            yield Static(content="", id="endinfo")
            yield Log(max_lines=500, id="log")
        yield Footer()

    def on_mount(self) -> None:
        self.set_interval(REDRAW_S, self._redraw)
        app: Any = self.app
        if hasattr(app, "current_job"):
            self.watch(app, "current_job", self._on_current_job, init=False)
        job_id = self.initial_job or getattr(app, "current_job", None)
        self.open_job(job_id)

    def _on_current_job(self, job_id: str | None) -> None:
        if job_id != (self.job.id if self.job else None):
            self.open_job(job_id)

    # ------------------------------------------------------------------ opening and following
    def open_job(self, job_id: str | None) -> None:
        self.workers.cancel_group(self, "follow")
        self._generation += 1
        self.job = None
        if job_id:
            try:
                self.job = find_job(job_id)
            except LookupError as exc:
                self.notify(str(exc), severity="error")
        with self._lock:
            self.series = JobSeries()
        self._drawn_version = -1
        self._logs_shown = 0
        self.replayed = False
        self._replay_done = False
        self._dir_state = "queued"
        self.query_one("#log", Log).clear()
        self.query_one("#empty").display = self.job is None
        self.query_one("#dash").display = self.job is not None
        if self.job is not None:
            self.run_worker(
                lambda job=self.job, gen=self._generation: self._follow(job, gen),
                thread=True,
                group="follow",
                name=f"follow {self.job.id}",
                exclusive=True,
            )

    def _follow(self, job: JobDir, generation: int) -> None:
        """Thread worker: replay from offset 0, then poll by offset. Blocking reads stay here."""
        worker = get_current_worker()
        tail = EventTail(job.events_path)
        last_state_check = 0.0
        while not worker.is_cancelled and generation == self._generation:
            now = time.monotonic()
            if now - last_state_check >= 1.0 or not self._replay_done:
                self._dir_state = job.effective_state()
                last_state_check = now
            events = tail.poll()
            while events:  # replay: drain everything there is before the first draw
                with self._lock:
                    if generation != self._generation:
                        return
                    self.series.feed(events)
                if len(events) < 1000 or self._replay_done:
                    break
                events = tail.poll()
            if not self._replay_done:
                self._replay_done = True
                with self._lock:
                    self.series.version += 1
            # once the end event is in, a slow watch is enough
            interval = 1.0 if self.series.ended and self._dir_state in TERMINAL else POLL_S
            deadline = time.monotonic() + interval
            while time.monotonic() < deadline and not worker.is_cancelled:
                time.sleep(0.02)

    # ------------------------------------------------------------------ drawing
    def state(self) -> str:
        """The state word to show: the end event wins; else the job dir's effective state (which says
        `lost` when the supervisor is gone); else what the events say."""
        s = self.series
        if s.end is not None:
            return s.state
        if self._dir_state in TERMINAL or self._dir_state in ("queued", "starting"):
            return self._dir_state
        return s.state if s.state != "queued" else self._dir_state

    def _redraw(self) -> None:
        if self.job is None or not self._replay_done:
            return
        with self._lock:
            s = self.series
            if s.version == self._drawn_version and self.replayed:
                return
            self._drawn_version = s.version
            self.shown_step = s.step
            header = self._header_text(s)
            fraction = s.fraction
            history = s.history()
            spark = list(s.recent_loss)
            new_logs = min(len(s.logs), self._new_log_count(s))
            logs = list(s.logs)[len(s.logs) - new_logs :] if new_logs else []
            endinfo = self._end_text(s) if s.end is not None or self.state() in TERMINAL else None
            sample = s.sample
        self.query_one("#header", Static).update(header)
        self.query_one("#progress", ProgressBar).update(progress=round((fraction or 0.0) * 100, 1))
        self.query_one("#spark", Sparkline).data = spark or [0.0]
        self.query_one("#chart", LossChart).set_points(history)
        log = self.query_one("#log", Log)
        if logs:
            log.write_lines([f"{lvl.upper():7} {msg}" if lvl != "info" else f"        {msg}" for lvl, msg in logs])
        end_widget = self.query_one("#endinfo", Static)
        end_widget.display = endinfo is not None
        if endinfo is not None:
            end_widget.update(endinfo)
        if sample:
            images = sample.get("images") or []
            prompts = sample.get("prompts") or []
            first = f": {prompts[0]}" if prompts else ""
            self.query_one("#sample-info", Static).update(
                f"samples: step {sample.get('step')}, {len(images)} image(s){first}"
            )
        self.replayed = True

    def _new_log_count(self, s: JobSeries) -> int:
        total = s.log_total
        new = total - self._logs_shown
        self._logs_shown = total
        return max(0, new)

    def _header_text(self, s: JobSeries) -> Text:
        assert self.job is not None
        state = self.state()
        t = Text(no_wrap=True, overflow="ellipsis")
        t.append(self.job.id, style="bold")
        t.append("  ")
        t.append(STATE_SYMBOL.get(state, state), style=STATE_STYLE.get(state, "bold"))
        if s.job_kind and s.job_kind != "train":
            t.append(f"  ({s.job_kind})")
        t.append("\n")
        parts = [f"step {s.step}/{s.total}" if s.total else f"step {s.step}"]
        if s.epoch is not None:
            parts.append(f"epoch {s.epoch}" + (f"/{s.total_epochs}" if s.total_epochs else ""))
        if s.loss is not None:
            parts.append(f"loss {s.loss:.4f}")
        if s.loss_avg is not None:
            parts.append(f"avg {s.loss_avg:.4f}")
        if s.it_s is not None:
            parts.append(f"{s.it_s:.2f} it/s")
        if not s.ended:
            parts.append(f"ETA {format_duration(s.eta_s)}")
        if s.lr:
            parts.append("lr " + ",".join(f"{x:.2e}" for x in s.lr[:3]))
        if s.progress and not s.step:
            p = s.progress
            parts.append(f"{p.get('message') or 'progress'} {p.get('done')}/{p.get('total') or '?'} {p.get('unit')}")
        t.append("  ".join(parts))
        return t

    def _end_text(self, s: JobSeries) -> Text:
        end = s.end or {}
        state = str(end.get("state") or self.state())
        t = Text()
        t.append(f"{STATE_SYMBOL.get(state, state)}", style=STATE_STYLE.get(state, "bold"))
        details = []
        if end.get("exit_code") is not None:
            details.append(f"exit code {end['exit_code']}")
        if end.get("signal"):
            details.append(f"signal {end['signal']}")
        if end.get("reason"):
            details.append(str(end["reason"]))
        if details:
            t.append("  (" + ", ".join(details) + ")")
        if end.get("error"):
            t.append("\nerror: ", style="bold")
            t.append(str(end["error"]))
        if end.get("hint"):
            t.append("\nhint:  ", style="bold")
            t.append(str(end["hint"]))
        loras = s.loras()
        if loras:
            t.append("\nLoRA:  ", style="bold")
            t.append(loras[-1])
            if len(loras) > 1:
                t.append(f"  (+{len(loras) - 1} earlier; o copies the path)", style="dim")
        last = end.get("last_lines") or []
        if last and state != "finished":
            t.append("\nlast lines:", style="bold")
            for line in list(last)[-6:]:
                t.append(f"\n  {line}", style="dim")
        return t

    # ------------------------------------------------------------------ actions
    def _active_job(self, what: str) -> JobDir | None:
        if self.job is None:
            self.notify(f"{what}: no job open", severity="warning")
            return None
        state = self.state()
        if state in TERMINAL:
            self.notify(f"{what}: the job has already ended ({state})", severity="warning")
            return None
        return self.job

    def _confirm_then_send(self, command: str, question: str) -> None:
        job = self._active_job(command.replace("_", " ").capitalize())
        if job is None:
            return
        job_id = job.id

        def answered(yes: bool | None) -> None:
            if yes:
                from nyx_tui.screens.messages import ControlJob  # lazy: it pulls in the config model

                self.post_message(ControlJob(job_id, command))
                self.notify(f"{command} sent to {job_id}")

        self.app.push_screen(ConfirmScreen(question), answered)

    def action_stop(self) -> None:
        job = self.job.id if self.job else ""
        self._confirm_then_send("stop", f"Stop {job}?\n\nIt saves a LoRA at the current step, then exits.  (y/n)")

    def action_cancel_job(self) -> None:
        job = self.job.id if self.job else ""
        self._confirm_then_send("cancel", f"Cancel {job}?\n\nIt exits at once WITHOUT saving.  (y/n)")

    def _send(self, command: str, label: str) -> None:
        job = self._active_job(label)
        if job is not None:
            from nyx_tui.screens.messages import ControlJob

            self.post_message(ControlJob(job.id, command))
            self.notify(f"{label}: sent to {job.id}")

    def action_save_now(self) -> None:
        self._send("save_now", "Save now")

    def action_sample_now(self) -> None:
        self._send("sample_now", "Sample now")

    def action_cycle(self, direction: int) -> None:
        running = [j.id for j in list_jobs() if j.effective_state() in ACTIVE]
        if not running:
            self.notify("no running jobs", severity="information")
            return
        current = self.job.id if self.job else None
        if current in running:
            nxt = running[(running.index(current) + direction) % len(running)]
        else:
            nxt = running[0 if direction > 0 else -1]
        if nxt == current:
            self.notify(f"{current} is the only running job")
            return
        from nyx_tui.screens.messages import OpenJob

        self.post_message(OpenJob(nxt))
        if not hasattr(self.app, "current_job"):
            self.open_job(nxt)

    def action_show_lora(self) -> None:
        if self.job is None:
            self.notify("no job open", severity="warning")
            return
        with self._lock:
            lora = self.series.final_lora()
        if lora is None:
            self.notify("this job has not saved a LoRA yet", severity="warning")
            return
        path = str(_abs_path(self.job, lora))
        self.app.copy_to_clipboard(path)
        self.notify(f"{path}\n(copied to the clipboard)", title="LoRA")
