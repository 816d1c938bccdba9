"""The training dashboard: one job's progress, loss, GPU, logs, and its end.

Opening a job replays `events.jsonl` from offset 0 in a thread worker, then follows it by offset
(~0.25 s polls). The worker folds events into a `JobSeries` under a lock; a 10 Hz timer redraws only
when the series changed, so a job writing thousands of events a second costs at most ~10 redraws/s.
The screen follows the App's reactive `current_job` and asks the App for things with messages.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen, Screen
from textual.widgets import Button, Footer, OptionList, ProgressBar, Sparkline, Static
from textual.widgets.option_list import Option
from textual.worker import get_current_worker

from nyx_tui.jobs.events import EventTail
from nyx_tui.jobs.jobdir import ACTIVE, TERMINAL, JobDir, find_job, list_jobs
from nyx_tui.jobs.series import REPLAY_CHUNK, JobSeries, format_duration
from nyx_tui.widgets.gpu_panel import GpuPanel
from nyx_tui.widgets.log_view import LogTail, OutputLogTail
from nyx_tui.widgets.loss_chart import LossChart
from nyx_tui.widgets.sample_panel import SamplePanel

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
EMPTY_TEXT = (
    "No job open.\n\n"
    "d  start the demo (a tiny LoRA trained on the CPU in about a minute)\n"
    "2  the config form, to set up a real training run\n"
    "1  the job list\n"
    "j  open any job here     [ / ]  cycle running jobs"
)
JOB_ACTIONS = frozenset({"stop", "cancel_job", "save_now", "sample_now", "show_lora", "toggle_output", "lora_tools"})
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


class JobPickerScreen(ModalScreen[str | None]):
    """Pick any job (running or not) to show: newest first, state as a word. The list is read in a
    thread worker (one status file per job)."""

    DEFAULT_CSS = """
    JobPickerScreen { align: center middle; }
    JobPickerScreen > Vertical { width: 90; max-width: 95%; height: auto; max-height: 80%; border: thick $accent;
                                 padding: 0 1; background: $surface; }
    JobPickerScreen #picker-title { height: 1; }
    JobPickerScreen OptionList { height: auto; max-height: 20; }
    """
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "close", "Close", id="nyx.dashboard.picker_close"),
    ]

    def __init__(self, current: str | None = None) -> None:
        super().__init__()
        self.current = current

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Static(content="Open a job  (enter: open, escape: close)", id="picker-title")
            yield OptionList(id="picker")

    def on_mount(self) -> None:
        self.query_one(OptionList).focus()
        self.run_worker(self._load, thread=True, exclusive=True)

    def _load(self) -> None:
        rows = [(j.id, j.effective_state()) for j in list_jobs()]
        self.app.call_from_thread(self._show, rows)

    def _show(self, rows: list[tuple[str, str]]) -> None:
        picker = self.query_one(OptionList)
        if not rows:
            picker.add_option(Option("no jobs yet", id="", disabled=True))
            return
        rows.sort(key=lambda r: r[0], reverse=True)
        picker.add_options(Option(f"{STATE_SYMBOL.get(state, state):12} {job_id}", id=job_id) for job_id, state in rows)
        ids = [r[0] for r in rows]
        picker.highlighted = ids.index(self.current) if self.current in ids else 0

    @on(OptionList.OptionSelected)
    def _picked(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(event.option.id or None)

    def action_close(self) -> None:
        self.dismiss(None)


def _abs_path(job: JobDir, path: str) -> Path:
    p = Path(path)
    return p if p.is_absolute() else job.path / p


class DashboardScreen(Screen[None]):
    DEFAULT_CSS = """
    DashboardScreen { layout: vertical; }
    DashboardScreen #empty { height: 1fr; align: center middle; }
    DashboardScreen #empty-text { width: auto; height: auto; padding: 1 2; border: round $panel; }
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
    DashboardScreen #samples { height: 1fr; margin-top: 1; }
    DashboardScreen #endinfo { height: auto; max-height: 14; padding: 0 1; border-top: solid $panel; }
    DashboardScreen #log { height: 7; border-top: solid $panel; }
    DashboardScreen.-narrow #main { layout: vertical; }
    DashboardScreen.-narrow #right { width: 1fr; height: auto; border-left: none; padding: 0 1; }
    DashboardScreen.-narrow #log { height: 4; }
    DashboardScreen.-narrow #samples { height: auto; margin-top: 0; }
    DashboardScreen.-narrow #sample-image { display: none; }
    DashboardScreen.-narrow #endinfo { max-height: 8; }
    """
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (100, "-wide")]  # noqa: RUF012
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("s", "stop", "Stop", id="nyx.dashboard.stop"),
        Binding("x", "cancel_job", "Cancel", id="nyx.dashboard.cancel"),
        Binding("v", "save_now", "Save", id="nyx.dashboard.save_now"),
        Binding("p", "sample_now", "Sample", id="nyx.dashboard.sample_now"),
        Binding("left_square_bracket", "cycle(-1)", "Prev", id="nyx.dashboard.prev_job"),
        Binding("right_square_bracket", "cycle(1)", "Next", id="nyx.dashboard.next_job"),
        Binding("j", "pick_job", "Jobs", id="nyx.dashboard.pick_job"),
        Binding("o", "show_lora", "LoRA", id="nyx.dashboard.show_lora"),
        Binding("d", "demo", "Demo", id="nyx.dashboard.demo"),
        # off the footer (it is full); F1 lists it
        Binding("l", "toggle_output", "Output log", show=False, id="nyx.dashboard.toggle_output"),
        Binding("t", "lora_tools", "LoRA tools", show=False, id="nyx.dashboard.lora_tools"),
    ]

    def __init__(self, job_id: str | None = None, *, name: str | None = None, id: str | None = None) -> None:
        super().__init__(name=name, id=id)
        self.initial_job = job_id
        self.job: JobDir | None = None
        self.series = JobSeries()
        self._lock = threading.Lock()
        self._drawn_version = -1
        self._logs_shown = 0
        self._output: OutputLogTail | None = None  # set while the log panel shows output.log instead of log events
        self._output_drawn = -1
        self._dir_state = "queued"  # effective_state() as the follow worker last read it
        self.replayed = False  # the whole history up to the open has been folded in and drawn
        self.shown_step = 0  # the step the last redraw put on screen (tests, bench)
        self._replay_done = False
        self._generation = 0

    # ------------------------------------------------------------------ layout
    def compose(self) -> ComposeResult:
        with Vertical(id="empty"):
            yield Static(content=EMPTY_TEXT, id="empty-text")
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
                    yield SamplePanel(id="samples")
            yield Static(content="", id="endinfo")
            yield LogTail(max_lines=500, id="log")
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
            self._output = None
        self._drawn_version = -1
        self._logs_shown = 0
        self._output_drawn = -1
        self.query_one("#log", LogTail).border_title = None
        self.replayed = False
        self._replay_done = False
        self._dir_state = "queued"
        self.query_one("#log", LogTail).clear()
        self.query_one("#samples", SamplePanel).show(None)
        self.refresh_bindings()
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
        """Thread worker: replay from offset 0, then poll by offset. Blocking reads stay here. A worker
        whose generation is stale (another job was opened meanwhile) touches nothing and ends."""
        worker = get_current_worker()

        def current() -> bool:
            return not worker.is_cancelled and generation == self._generation

        self._dir_state = job.effective_state()
        tail = EventTail(job.events_path)
        if not self._read_on(tail, generation, current):
            return
        with self._lock:
            if generation != self._generation:
                return
            self._replay_done = True
            self.series.version += 1
        last_state_check = time.monotonic()
        while current():
            now = time.monotonic()
            if now - last_state_check >= 1.0:
                state = job.effective_state()
                if not current():
                    return
                self._dir_state = state
                last_state_check = now
            if not self._read_on(tail, generation, current):
                return
            self._poll_output(generation)
            # once the end event is in, a slow watch is enough
            interval = 1.0 if self.series.ended and self._dir_state in TERMINAL else POLL_S
            deadline = time.monotonic() + interval
            while time.monotonic() < deadline and current():
                time.sleep(0.02)

    def _read_on(self, tail: EventTail, generation: int, current: Callable[[], bool]) -> bool:
        """Fold in every complete line appended since the last call: on opening, the whole history from
        byte 0. `REPLAY_CHUNK` bytes at a time, so a million-step log never sits in memory at once, through
        `JobSeries.feed_lines` (msgspec + numpy: ~0.5 s of CPU for a million steps). The lock is taken per chunk, so
        the UI thread never waits long (a millisecond a chunk). False when the job changed meanwhile."""
        while current():
            data = tail.read_lines(REPLAY_CHUNK)
            if not data:
                return True
            with self._lock:
                if generation != self._generation:
                    return False
                self.series.feed_lines(data)
        return False

    def _poll_output(self, generation: int) -> None:
        """Thread side of the output.log view: read what the worker printed since the last poll."""
        out = self._output
        if out is not None:
            with self._lock:
                if generation == self._generation and out is self._output:
                    out.poll()

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
        self._redraw_output()
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
            logs = list(s.logs)[len(s.logs) - new_logs :] if new_logs and self._output is None else []
            endinfo = self._end_text(s) if s.end is not None or self.state() in TERMINAL else None
            sample = s.sample
        self.query_one("#header", Static).update(header)
        self.query_one("#progress", ProgressBar).update(progress=round((fraction or 0.0) * 100, 1))
        self.query_one("#spark", Sparkline).data = spark or [0.0]
        self.query_one("#chart", LossChart).set_points(history)
        self.query_one("#log", LogTail).add(logs)
        end_widget = self.query_one("#endinfo", Static)
        end_widget.display = endinfo is not None
        if endinfo is not None:
            end_widget.update(endinfo)
        self.query_one("#samples", SamplePanel).show(sample, self.job.path)
        self.replayed = True

    def _redraw_output(self) -> None:
        with self._lock:
            out = self._output
            if out is None or out.version == self._output_drawn:
                return
            self._output_drawn = out.version
            lines = out.lines
        self.query_one("#log", LogTail).show_lines(lines)

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
        if "val_loss" in s.metrics:  # the held-out images' loss (dataset.validation_split), when it was measured
            val_step, val = s.metrics["val_loss"]
            parts.append(f"val {val:.4f}@{val_step}")
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
        self._go_to(nxt)

    def action_pick_job(self) -> None:
        def picked(job_id: str | None) -> None:
            if job_id and job_id != (self.job.id if self.job else None):
                self._go_to(job_id)

        self.app.push_screen(JobPickerScreen(self.job.id if self.job else None), picked)

    def _go_to(self, job_id: str) -> None:
        """Ask the App to show `job_id` (it sets `current_job`, which this screen watches); a host
        without `current_job` gets the job opened here directly."""
        from nyx_tui.screens.messages import OpenJob

        self.post_message(OpenJob(job_id))
        if not hasattr(self.app, "current_job"):
            self.open_job(job_id)

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        """With no job open the footer offers what starts one (`d` demo) instead of job commands; with a
        job open `d` is off (it would start a second job by surprise)."""
        if action == "demo":
            return self.job is None
        if action in JOB_ACTIONS:
            return self.job is not None
        return True

    def action_toggle_output(self) -> None:
        """Show the worker's raw output (output.log: a backend's own prints, tracebacks, its progress bar as
        one updating line) in the log panel instead of the job's log events, or back."""
        if self.job is None:
            return
        log = self.query_one("#log", LogTail)
        with self._lock:
            if self._output is None:
                self._output = OutputLogTail(self.job.log_path, max_lines=500)
                self._output_drawn = -1
                lines: list[tuple[str, str]] = []
            else:
                self._output = None
                lines = list(self.series.logs)
                self._logs_shown = self.series.log_total
        log.border_title = "output.log  (l: log events)" if self._output is not None else None
        log.clear()
        log.add(lines)
        if self._output is not None:  # the first read now, not at the follow worker's next poll
            self.run_worker(
                lambda gen=self._generation: self._poll_output(gen), thread=True, group="output", exclusive=True
            )

    def action_demo(self) -> None:
        from nyx_tui.screens.messages import StartDemo

        self.post_message(StartDemo())

    def _final_lora(self) -> Path | None:
        """The open job's last saved LoRA, or None after telling the user why there is none."""
        if self.job is None:
            self.notify("no job open", severity="warning")
            return None
        with self._lock:
            lora = self.series.final_lora()
        if lora is None:
            self.notify("this job has not saved a LoRA yet", severity="warning")
            return None
        return _abs_path(self.job, lora)

    def action_show_lora(self) -> None:
        found = self._final_lora()
        if found is None:
            return
        path = str(found)
        self.app.copy_to_clipboard(path)
        self.notify(f"{path}\n(copied to the clipboard)", title="LoRA")

    def action_lora_tools(self) -> None:
        """Open the job's last LoRA on the LoRA screen (inspect, metadata, resize, convert, compare, upload)."""
        path = self._final_lora()
        if path is None:
            return
        open_lora = getattr(self.app, "open_lora", None)
        if callable(open_lora):
            open_lora(path)
            return
        from nyx_tui.screens.lora import LoraScreen  # a host without the LoRA mode: show it over this screen

        self.app.push_screen(LoraScreen(path))
