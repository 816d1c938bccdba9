"""The view of a workflow or sweep job: its stages (or trials) as one unit, and a sweep's comparison table.

A workflow/sweep job's orchestrator keeps `workflow.json` in its job dir up to date (kind, name, state, the
stages with their child job, artifacts and losses; for a sweep the trials and the ranked table). This screen
only reads that file: once a second it compares the file's size and mtime and re-reads it only when they
changed, so an idle view costs one `stat`. A half-written or foreign file keeps the last good view and says
so. Enter on a stage or trial asks the App to open that child job (`OpenJob`), which shows its dashboard.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, ClassVar

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Static

from nyx_tui.screens.home import STATE_SYMBOLS
from nyx_tui.screens.messages import OpenJob
from nyx_tui.workflows.plan import short_params as format_params

WORKFLOW_KINDS = frozenset({"workflow", "sweep"})
FILE = "workflow.json"
POLL_S = 1.0
STAGE_COLUMNS = (("#", "n"), ("stage", "stage"), ("state", "state"), ("job", "job"), ("from", "from"),
                 ("set", "set"), ("artifacts", "artifacts"), ("final loss", "final"), ("val loss", "val"))  # fmt: skip
TRIAL_COLUMNS = (("#", "n"), ("trial", "stage"), ("state", "state"), ("job", "job"), ("params", "params"),
                 ("final loss", "final"), ("val loss", "val"))  # fmt: skip
TABLE_COLUMNS = (("rank", "rank"), ("params", "params"), ("val loss", "val"), ("final loss", "final"),
                 ("job", "job"), ("lora", "lora"), ("sample", "sample"))  # fmt: skip


def _b(key: str, action: str, description: str, *, show: bool = True) -> Binding:
    return Binding(key, action, description, id=f"nyx.workflow.{action}", show=show)


def read_workflow(path: Path) -> dict[str, Any]:
    """`workflow.json` as a dict; ValueError (with the reason) for anything else, OSError if unreadable."""
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"{path.name} holds {type(data).__name__}, not an object")
    return data


def format_loss(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return ""
    return f"{value:.4f}"


def state_text(state: Any) -> Text:
    symbol, _color = STATE_SYMBOLS.get(str(state), ("·", "foreground"))
    style = {"finished": "green", "failed": "red", "running": "bold", "cancelled": "yellow"}.get(str(state), "")
    return Text(f"{symbol} {state or '?'}", style=style)


def _items(data: dict[str, Any], key: str) -> list[dict[str, Any]]:
    value = data.get(key)
    return [x for x in value if isinstance(x, dict)] if isinstance(value, list) else []


class WorkflowScreen(Screen[None]):
    """One workflow or sweep job: header, stages/trials, a sweep's ranked table, the selected row's details."""

    DEFAULT_CSS = """
    WorkflowScreen #wf-title { height: 1; padding: 0 1; background: $panel; text-style: bold; }
    WorkflowScreen #wf-note { height: auto; padding: 0 1; color: $text-warning; }
    WorkflowScreen #wf-note.-empty { display: none; }
    WorkflowScreen .wf-caption { height: 1; padding: 0 1; color: $text-muted; }
    WorkflowScreen #wf-table { height: auto; max-height: 50%; }
    WorkflowScreen #wf-stages { height: 1fr; }
    WorkflowScreen #wf-details { height: 8; border-top: solid $primary; padding: 0 1; overflow-y: auto; }
    WorkflowScreen.-workflow #wf-table, WorkflowScreen.-workflow #wf-table-caption { display: none; }
    """
    BINDINGS: ClassVar[list[BindingType]] = [
        _b("enter", "open_child", "Open job"),
        _b("tab", "switch_table", "Table/trials", show=False),
        _b("r", "reload", "Reload", show=False),
        _b("escape", "back", "Jobs"),
    ]

    def __init__(self, job_id: str | None = None, *, job_dir: Path | None = None, poll_s: float = POLL_S) -> None:
        super().__init__()
        self.job_id = job_id
        self._job_dir = job_dir
        self.poll_s = poll_s
        self.data: dict[str, Any] = {}
        self.note = ""
        self._stamp: tuple[int, int, int] | None = None
        self._stage_jobs: list[str | None] = []
        self._table_jobs: list[str | None] = []
        self._details: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ layout
    def compose(self) -> ComposeResult:
        yield Static("", id="wf-title")
        yield Static("", id="wf-note", classes="-empty")
        yield Static(
            "comparison, best first (enter opens a trial's dashboard, tab switches tables)",
            id="wf-table-caption",
            classes="wf-caption",
        )
        table: DataTable[Any] = DataTable(id="wf-table", cursor_type="row", zebra_stripes=True)
        yield table
        yield Static("stages", id="wf-stages-caption", classes="wf-caption")
        stages: DataTable[Any] = DataTable(id="wf-stages", cursor_type="row", zebra_stripes=True)
        yield stages
        yield Static("", id="wf-details")
        yield Footer()

    @property
    def job_dir(self) -> Path | None:
        if self._job_dir is None and self.job_id:
            from nyx_tui.jobs.jobdir import find_job

            try:
                self._job_dir = find_job(self.job_id).path
            except LookupError:
                return None
        return self._job_dir

    def on_mount(self) -> None:
        self.poll()
        self.set_interval(self.poll_s, self.poll, name="nyx-workflow-poll")

    # ------------------------------------------------------------------ reading
    def poll(self) -> None:
        """Re-read workflow.json when its inode, size or mtime changed (one stat otherwise)."""
        folder = self.job_dir
        if folder is None:
            self._set_note(f"no job {self.job_id!r}" if self.job_id else "no workflow open")
            self._render_title()
            return
        path = folder / FILE
        try:
            st = path.stat()
        except OSError:
            self._stamp = None
            self._set_note(f"waiting for {FILE} (the orchestrator writes it when the workflow starts)")
            self._render_title()
            return
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)  # atomic replaces give a new inode
        if stamp == self._stamp:
            return
        try:
            data = read_workflow(path)
        except (OSError, ValueError) as e:
            self._set_note(f"{FILE} could not be read ({e}); showing the last good copy")
            return  # a writer mid-replace: try again next tick (the stamp is not kept)
        self._stamp = stamp
        self._set_note("")
        if data != self.data:
            self.data = data
            self._redraw()

    def _set_note(self, text: str) -> None:
        if text == self.note:
            return
        self.note = text
        note = self.query_one("#wf-note", Static)
        note.update(Text(text))
        note.set_class(not text, "-empty")

    # ------------------------------------------------------------------ rendering
    @property
    def kind(self) -> str:
        return "sweep" if self.data.get("kind") == "sweep" else "workflow"

    def _render_title(self) -> None:
        d = self.data
        name = d.get("name") or self.job_id or "?"
        title = Text(f"Nyx · {self.kind} {name} · ")
        title.append_text(state_text(d.get("state", "?")))
        if self.job_id:
            title.append(f" · job {self.job_id}")
        if self.kind == "sweep":
            trials = _items(d, "trials")
            done = sum(1 for t in trials if t.get("state") in ("finished", "failed", "cancelled", "lost"))
            title.append(f" · {done}/{len(trials)} trials done")
        self.query_one("#wf-title", Static).update(title)

    def _redraw(self) -> None:
        self.set_class(self.kind != "sweep", "-workflow")
        self._render_title()
        sweep = self.kind == "sweep"
        stages = _items(self.data, "trials" if sweep else "stages")
        self.query_one("#wf-stages-caption", Static).update(
            "trials" if sweep else "stages (enter opens a stage's job in the dashboard)"
        )
        self._fill(
            self.query_one("#wf-stages", DataTable),
            TRIAL_COLUMNS if sweep else STAGE_COLUMNS,
            [self._stage_cells(i, s, sweep) for i, s in enumerate(stages)],
        )
        self._stage_jobs = [s.get("job") if isinstance(s.get("job"), str) else None for s in stages]
        self._details = stages
        rows = _items(self.data, "table") if sweep else []
        self._fill(
            self.query_one("#wf-table", DataTable),
            TABLE_COLUMNS,
            [
                (
                    str(r.get("rank", i + 1)),
                    format_params(r.get("params")),
                    format_loss(r.get("val_loss")),
                    format_loss(r.get("final_loss")),
                    str(r.get("job") or ""),
                    Path(str(r["lora"])).name if r.get("lora") else "",
                    Path(str(r["sample"])).name if r.get("sample") else "",
                )
                for i, r in enumerate(rows)
            ],
        )
        self._table_jobs = [r.get("job") if isinstance(r.get("job"), str) else None for r in rows]
        self._show_details()
        if self.focused is None:
            (self.query_one("#wf-table", DataTable) if rows else self.query_one("#wf-stages", DataTable)).focus()

    @staticmethod
    def _stage_cells(i: int, s: dict[str, Any], sweep: bool) -> tuple[Any, ...]:
        artifacts = s.get("artifacts") if isinstance(s.get("artifacts"), list) else []
        common_head = (str(i + 1), str(s.get("name", "")), state_text(s.get("state", "?")), str(s.get("job") or "—"))
        tail = (format_loss(s.get("final_loss")), format_loss(s.get("val_loss")))
        if sweep:
            return (*common_head, format_params(s.get("params")), *tail)
        return (
            *common_head,
            str(s.get("from") or ""),
            format_params(s.get("set")),
            str(len(artifacts)) if artifacts else "",
            *tail,
        )

    @staticmethod
    def _fill(table: DataTable[Any], columns: tuple[tuple[str, str], ...], rows: list[tuple[Any, ...]]) -> None:
        cursor = table.cursor_row
        table.clear(columns=True)
        for label, key in columns:
            table.add_column(label, key=key)
        for row in rows:
            table.add_row(*row)
        if rows:
            table.move_cursor(row=min(max(cursor, 0), len(rows) - 1), animate=False)

    def _show_details(self) -> None:
        box = self.query_one("#wf-details", Static)
        table = self.query_one("#wf-stages", DataTable)
        if not self._details:
            box.update(Text("no stages yet" if self.data else ""))
            return
        s = self._details[min(max(table.cursor_row, 0), len(self._details) - 1)]
        text = Text()
        text.append(str(s.get("name", "?")), style="bold")
        text.append(f"  job {s.get('job') or '(not started)'}\n")
        for label, key in (("params", "params"), ("set", "set")):
            if isinstance(s.get(key), dict) and s[key]:
                text.append(f"{label}: ", style="bold")
                text.append(format_params(s[key]) + "\n")
        artifacts = [a for a in s.get("artifacts") or [] if isinstance(a, dict)]
        if artifacts:
            text.append("artifacts:\n", style="bold")
        for a in artifacts:
            step = f" (step {a['step']})" if a.get("step") is not None else ""
            text.append(f"  {a.get('what', '?')}{step}: {a.get('path', '?')}\n")
        box.update(text)

    @on(DataTable.RowHighlighted, "#wf-stages")
    def _highlighted(self, event: DataTable.RowHighlighted) -> None:
        self._show_details()

    # ------------------------------------------------------------------ actions
    def selected_child(self) -> str | None:
        """The child job of the focused table's row (the comparison table or the stages/trials)."""
        focused = self.focused
        if isinstance(focused, DataTable) and focused.id == "wf-table":
            jobs = self._table_jobs
            row = focused.cursor_row
        else:
            jobs = self._stage_jobs
            row = self.query_one("#wf-stages", DataTable).cursor_row
        if not jobs or row < 0 or row >= len(jobs):
            return None
        return jobs[row]

    @on(DataTable.RowSelected)
    def _row_selected(self, event: DataTable.RowSelected) -> None:
        event.stop()
        self.action_open_child()

    def action_open_child(self) -> None:
        job = self.selected_child()
        if job is None:
            self.notify("this stage has no job yet (it has not started)", severity="warning")
            return
        self.post_message(OpenJob(job))

    def action_switch_table(self) -> None:
        table = self.query_one("#wf-table", DataTable)
        stages = self.query_one("#wf-stages", DataTable)
        (stages if self.focused is table or self.kind != "sweep" else table).focus()

    def action_reload(self) -> None:
        self._stamp = None
        self.poll()

    def action_back(self) -> None:
        self.app.switch_mode("home")


__all__ = ["WORKFLOW_KINDS", "WorkflowScreen", "read_workflow"]
