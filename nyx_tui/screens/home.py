"""The home screen: every job in one table, refreshed about once a second.

A workflow's or sweep's stages (jobs whose spec names a `parent`) are listed right under their orchestrator
job, indented and labelled with their stage, so the run reads as one unit.

The table is read in a thread worker (`Store().sync()` touches SQLite and every unfinished job's files;
it must never stall the event loop) that posts `JobsLoaded`; the screen only renders. Opening, stopping
and starting jobs are requests to the App (`OpenJob`, `ControlJob`, `StartDemo`), which owns state.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.screen import ModalScreen, Screen
from textual.widgets import Button, DataTable, Footer, Static

from nyx_tui.jobs.jobdir import TERMINAL
from nyx_tui.jobs.store import group_jobs
from nyx_tui.screens.messages import ControlJob, OpenJob, StartDemo

REFRESH_S = 1.0
TAIL_BYTES = 64 * 1024

STATE_SYMBOLS: dict[str, tuple[str, str]] = {
    # state: (symbol, theme color name). The symbol carries the meaning without color (NO_COLOR).
    "queued": ("…", "secondary"),
    "starting": ("◌", "secondary"),
    "running": ("▶", "primary"),
    "finished": ("✓", "success"),
    "failed": ("✗", "error"),
    "cancelled": ("■", "warning"),
    "lost": ("?", "error"),
}
COLUMNS = (("id", "id"), ("kind", "kind"), ("state", "state"), ("progress", "progress"),
           ("artifacts", "artifacts"), ("started", "started"))  # fmt: skip


def last_progress(events_path: Path) -> tuple[int, int | None] | None:
    """(done, total) from the newest `step` or `progress` event, reading only the end of the log:
    a six-hour run's events file is large and this runs every second."""
    try:
        with open(events_path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            f.seek(max(0, size - TAIL_BYTES))
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            event = json.loads(line)
        except ValueError:
            continue  # a partial first line, or one being written
        if not isinstance(event, dict):
            continue
        kind = event.get("kind")
        if kind == "step" and isinstance(event.get("step"), int):
            total = event.get("total")
            return event["step"], total if isinstance(total, int) else None
        if kind == "progress" and isinstance(event.get("done"), int | float):
            total = event.get("total")
            return int(event["done"]), int(total) if isinstance(total, int | float) else None
    return None


@dataclass(frozen=True)
class JobRow:
    """What the table shows of one job; compared between refreshes so unchanged rows are not redrawn."""

    id: str
    kind: str
    state: str
    progress: str
    artifacts: int
    started: str
    name: str = ""
    stage: str | None = None
    depth: int = 0  # 0: a job of its own; 1: a stage of the job in the row above it (or further up)

    @property
    def label(self) -> str:
        """The first column: the id, or for a stage `└ <stage>  <name>`, indented under its parent."""
        if self.depth == 0:
            return self.id
        stage = f"{self.stage}  " if self.stage else ""
        return f"{'  ' * (self.depth - 1)}└ {stage}{self.name or self.id}"


def format_started(started: Any) -> str:
    if not isinstance(started, int | float):
        return ""
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(started))


def job_rows(summaries: list[dict[str, Any]], progress_cache: dict[str, str]) -> list[JobRow]:
    """Rows newest first, each workflow's stages under it in the order they were created. Ended jobs'
    progress is cached: their event logs never change again."""
    rows = []
    for job, depth in group_jobs(sorted(summaries, key=lambda j: str(j["id"]), reverse=True)):
        job_id, state = str(job["id"]), str(job.get("state", "?"))
        progress = progress_cache.get(job_id)
        if progress is None:
            found = last_progress(Path(job["dir"]) / "events.jsonl")
            progress = "" if found is None else f"{found[0]}/{found[1]}" if found[1] else str(found[0])
            if state in TERMINAL:
                progress_cache[job_id] = progress
        rows.append(
            JobRow(
                id=job_id,
                kind=str(job.get("kind", "?")),
                state=state,
                progress=progress,
                artifacts=len(job.get("artifacts") or []),
                started=format_started(job.get("started")),
                name=str(job.get("name") or job_id),
                stage=None if job.get("stage") is None else str(job["stage"]),
                depth=depth,
            )
        )
    return rows


class ConfirmStop(ModalScreen[bool]):
    """Stopping a run is not undoable (it saves and exits): ask first."""

    DEFAULT_CSS = """
    ConfirmStop { align: center middle; }
    ConfirmStop > Vertical { width: auto; max-width: 80; height: auto; border: thick $warning;
        background: $surface; padding: 1 2; }
    ConfirmStop #question { width: auto; margin-bottom: 1; }
    ConfirmStop Horizontal { height: auto; width: auto; }
    ConfirmStop Button { margin-right: 2; }
    """
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("y", "answer(True)", "Yes", id="nyx.home.confirm_yes"),
        Binding("n", "answer(False)", "No", id="nyx.home.confirm_no"),
        Binding("escape", "answer(False)", "No", show=False, id="nyx.home.confirm_escape"),
    ]

    def __init__(self, job_id: str) -> None:
        super().__init__()
        self.job_id = job_id

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Static(
                content=f"Stop {self.job_id}?\nIt saves its LoRA, then exits. (y/n)",
                id="question",
            )
            with Horizontal():
                yield Button("Stop", variant="warning", id="yes")
                yield Button("Keep running", id="no")

    def action_answer(self, answer: bool) -> None:
        self.dismiss(answer)

    @on(Button.Pressed)
    def _pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")


class HomeScreen(Screen[None]):
    """The jobs table, the start of every session."""

    DEFAULT_CSS = """
    HomeScreen #title { height: 1; padding: 0 1; background: $panel; color: $text; text-style: bold; }
    HomeScreen #jobs { height: 1fr; }
    HomeScreen #empty { height: 1fr; content-align: center middle; text-align: center; padding: 1 2;
        color: $text-muted; }
    HomeScreen.-empty #jobs { display: none; }
    HomeScreen #empty { display: none; }
    HomeScreen.-empty #empty { display: block; }
    """

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("enter", "open_job", "Open", id="nyx.home.open"),
        Binding("d", "demo", "Demo", id="nyx.home.demo"),
        Binding("n", "new_config", "New", id="nyx.home.new_config"),
        Binding("s", "stop_job", "Stop", id="nyx.home.stop"),
        Binding("r", "refresh", "Refresh", id="nyx.home.refresh", show=False),
    ]

    class JobsLoaded(Message):
        """From the refresh worker: the current rows, or why they could not be read."""

        def __init__(self, rows: list[JobRow], error: str | None = None) -> None:
            super().__init__()
            self.rows = rows
            self.error = error

    def __init__(self, *, refresh_s: float = REFRESH_S, name: str | None = None, id: str | None = None) -> None:
        super().__init__(name=name, id=id)
        self.refresh_s = refresh_s
        self.rows: list[JobRow] = []
        self._progress_cache: dict[str, str] = {}
        self._shown: tuple[list[JobRow], str] | None = None  # (rows, theme) last drawn
        self._error_shown: str | None = None

    def compose(self) -> ComposeResult:
        yield Static(content="Nyx · jobs", id="title")
        table: DataTable[Any] = DataTable(id="jobs", cursor_type="row", zebra_stripes=True)
        for label, key in COLUMNS:
            table.add_column(label, key=key)
        yield table
        yield Static(content="", id="empty")
        yield Footer()

    @property
    def table(self) -> DataTable[Any]:
        return self.query_one("#jobs", DataTable)

    def on_mount(self) -> None:
        self.add_class("-empty")
        self._update_empty_text()
        self.refresh_jobs()
        self.set_interval(self.refresh_s, self.refresh_jobs)
        self.app.theme_changed_signal.subscribe(self, lambda _theme: self._render_rows(force=True))

    # ------------------------------------------------------------------ data
    def refresh_jobs(self) -> None:
        self._load()

    @work(thread=True, exclusive=True, group="home-refresh")
    def _load(self) -> None:
        from nyx_tui.jobs.store import Store

        try:
            rows = job_rows(Store().sync(), self._progress_cache)
        except Exception as e:  # a locked or corrupt index must not take the screen down
            self.post_message(self.JobsLoaded([], f"could not read the jobs: {type(e).__name__}: {e}"))
            return
        self.post_message(self.JobsLoaded(rows))

    def on_home_screen_jobs_loaded(self, message: JobsLoaded) -> None:
        if message.error:
            if message.error != self._error_shown:  # once, not every second
                self.notify(message.error, severity="error", timeout=8)
                self._error_shown = message.error
            return
        self._error_shown = None
        self.rows = message.rows
        self._render_rows()

    def _state_text(self, state: str) -> Text:
        symbol, color_name = STATE_SYMBOLS.get(state, ("·", "foreground"))
        theme = self.app.current_theme
        color = getattr(theme, color_name, None) or theme.foreground or ""
        return Text(f"{symbol} {state}", style=color)

    def _render_rows(self, force: bool = False) -> None:
        if not self.is_mounted:
            return
        key = (self.rows, self.app.theme)
        if not force and self._shown == key:
            return
        self._shown = (list(self.rows), self.app.theme)
        table = self.table
        selected = self.selected_job_id()
        table.clear()
        for row in self.rows:
            table.add_row(
                row.label,
                row.kind,
                self._state_text(row.state),
                row.progress,
                str(row.artifacts) if row.artifacts else "",
                row.started,
                key=row.id,
            )
        if selected is not None:
            index = next((i for i, r in enumerate(self.rows) if r.id == selected), None)
            if index is not None:
                table.move_cursor(row=index, animate=False)
        self.set_class(not self.rows, "-empty")
        if self.rows and self.focused is None:
            table.focus()

    def _key(self, binding_id: str, default: str) -> str:
        keys = getattr(self.app, "_keymap", {}).get(binding_id, default)
        return self.app.get_key_display(Binding(keys.split(",")[0], ""))

    def _update_empty_text(self) -> None:
        demo, new = self._key("nyx.home.demo", "d"), self._key("nyx.home.new_config", "n")
        palette = self._key("nyx.palette", "ctrl+p")
        self.query_one("#empty", Static).update(
            "No jobs yet.\n\n"
            f"Press {demo} to train the demo LoRA: a tiny model on the CPU, no download, about a minute.\n"
            f"Press {new} to write a training config from a preset.\n"
            f"{palette} opens the command palette: every action, searchable."
        )

    # ------------------------------------------------------------------ actions
    def selected_job_id(self) -> str | None:
        table = self.table
        if not self.rows or table.row_count == 0:
            return None
        row = min(max(table.cursor_row, 0), len(self.rows) - 1)
        return self.rows[row].id

    def selected_row(self) -> JobRow | None:
        job_id = self.selected_job_id()
        return next((r for r in self.rows if r.id == job_id), None)

    @on(DataTable.RowSelected, "#jobs")
    def _row_selected(self, event: DataTable.RowSelected) -> None:
        event.stop()
        if event.row_key.value is not None:
            self.post_message(OpenJob(str(event.row_key.value)))

    def action_open_job(self) -> None:
        job_id = self.selected_job_id()
        if job_id is None:
            self.notify("no job selected", severity="warning")
            return
        self.post_message(OpenJob(job_id))

    def action_demo(self) -> None:
        self.post_message(StartDemo())

    def action_new_config(self) -> None:
        self.app.switch_mode("config")

    def action_refresh(self) -> None:
        self.refresh_jobs()

    def action_stop_job(self) -> None:
        row = self.selected_row()
        if row is None:
            self.notify("no job selected", severity="warning")
            return
        if row.state in TERMINAL:
            self.notify(f"{row.id} has already ended ({row.state}); nothing to stop")
            return
        job_id = row.id

        def answered(yes: bool | None) -> None:
            if yes:
                self.post_message(ControlJob(job_id, "stop"))

        self.app.push_screen(ConfirmStop(job_id), answered)
