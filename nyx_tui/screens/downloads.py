"""The downloads screen (mode `downloads`): one row per download job (newest first) with its state, file,
a progress bar, speed and ETA; add a download by URL or id after a preview of what it stands for; cancel,
resume or retry the selected one.

Everything that touches the disk or the network runs in thread workers that post messages: the rows are
re-read every `REFRESH_S` from the jobs' `status.json` and their last `progress` event (`last_event` reads
the file's tail only); resolving a source (`sources.resolve`, network I/O) and starting a job (as `nyx
download` does: `create_job` + a supervisor) too. A bad source or a failed resolve is a notification with
the fix, never a traceback.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, VerticalScroll
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Footer, Input, Label, ListItem, ListView, ProgressBar, Static

if TYPE_CHECKING:
    from nyx_tui.downloads.model import Resolved
    from nyx_tui.jobs.jobdir import JobDir

REFRESH_S = 0.5
RESUMABLE = ("cancelled", "failed", "lost")
STATE_STYLES = {
    "finished": "green",
    "failed": "bold red",
    "lost": "red",
    "cancelled": "yellow",
    "running": "cyan",
    "starting": "cyan",
    "queued": "dim",
}


# ---------------------------------------------------------------------------------------------- formatting


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"  # pragma: no cover


def fmt_speed(bps: float | None) -> str:
    return f"{fmt_bytes(bps)}/s" if bps else ""


def fmt_eta(seconds: float | None) -> str:
    if seconds is None:
        return ""
    s = max(0, round(seconds))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


# ---------------------------------------------------------------------------------------------- the rows


@dataclass
class DownloadRow:
    """What one row shows, read from a job's folder."""

    id: str
    state: str
    name: str
    done: float | None = None
    total: float | None = None
    speed_bps: float | None = None
    eta_s: float | None = None
    files_done: int | None = None
    files_total: int | None = None
    error: str | None = None
    sources: list[str] = field(default_factory=list)

    @property
    def percent(self) -> float | None:
        if self.state == "finished":
            return 100.0
        if self.done is None or not self.total:
            return None
        return max(0.0, min(100.0, 100.0 * self.done / self.total))


def _last_error(job: JobDir) -> str | None:
    for e in reversed(job.events()):
        if e.get("kind") == "log" and e.get("level") == "error":
            return str(e.get("message"))
    return None


def read_row(job: JobDir) -> DownloadRow | None:
    """The row of a download job, or None for another kind of job (or an unreadable one)."""
    from nyx_tui.jobs.jobdir import ACTIVE

    try:
        spec = job.spec()
    except (OSError, ValueError):
        return None
    if spec.get("kind") != "download":
        return None
    d = spec.get("download") or {}
    sources = [str(s) for s in d.get("sources") or []]
    state = job.effective_state()
    last = job.last_event("progress") or {}
    name = str(last.get("file") or "") or (sources[0] if sources else job.id)
    error = None
    if state in ("failed", "lost"):
        error = _last_error(job) or job.status().get("error")
    active = state in ACTIVE

    def num(key: str) -> float | None:
        value = last.get(key)
        return float(value) if isinstance(value, int | float) else None

    files_done, files_total = num("files_done"), num("files_total")
    return DownloadRow(
        id=job.id,
        state=state,
        name=name,
        done=num("done"),
        total=num("total"),
        speed_bps=num("speed_bps") if active else None,
        eta_s=num("eta_s") if active else None,
        files_done=None if files_done is None else int(files_done),
        files_total=None if files_total is None else int(files_total),
        error=str(error) if error else None,
        sources=sources,
    )


def read_rows() -> list[DownloadRow]:
    """Every download job's row, newest first."""
    from nyx_tui.jobs.jobdir import list_jobs

    rows = [r for r in (read_row(j) for j in reversed(list_jobs())) if r is not None]
    return rows


# ---------------------------------------------------------------------------------------------- jobs


def check_source(text: str) -> None:
    """Raise DownloadError (message + fix) when `text` is no source `nyx download` would take."""
    from nyx_tui.downloads.sources import parse_source

    parse_source(text)


def start_download(spec: dict[str, Any]) -> JobDir:
    """Create and spawn a download job for `spec` (sources, dest, sha256, file), as `nyx download` does."""
    from nyx_tui.downloads.cli import _slug_source
    from nyx_tui.jobs.jobdir import create_job
    from nyx_tui.jobs.launch import spawn_supervisor

    argv = [sys.executable, "-m", "nyx_tui.downloads.job", "."]
    name = "download-" + _slug_source(spec["sources"][0])
    job = create_job("download", name, argv, extra={"download": spec, "resource": "cpu"})
    spawn_supervisor(job)
    with contextlib.suppress(Exception):  # the store is an index; the job dir is the truth
        from nyx_tui.jobs.store import Store, job_summary

        Store().upsert(job_summary(job))
    return job


def cancel_download(job: JobDir) -> str:
    """Stop a running (or queued) download, as `nyx downloads cancel`. Returns what happened; raises
    ValueError when there is nothing to cancel."""
    from nyx_tui.jobs.control import send
    from nyx_tui.jobs.jobdir import TERMINAL

    state = job.effective_state()
    if state in TERMINAL:
        raise ValueError(f"{job.id} has already ended ({state}); nothing to cancel")
    if state == "queued":
        from nyx_tui.jobs.queue import cancel_queued

        if cancel_queued(job):
            return f"cancelled {job.id}; it had not started"
    send(job.control_path, "cancel")
    return f"asked {job.id} to stop; its .part files stay (r resumes it)"


def resume_download(job: JobDir) -> JobDir:
    """Start a cancelled/failed/lost download again as a new job (it goes on from its .part files), as
    `nyx downloads resume/retry`. Raises ValueError with the reason and the fix."""
    state = job.effective_state()
    if state == "finished":
        raise ValueError(f"{job.id} finished; there is nothing to resume (add its source again to re-download)")
    if state not in RESUMABLE:
        raise ValueError(f"{job.id} is {state}: it is still going (c cancels it)")
    spec = dict(job.spec().get("download") or {})
    if not spec.get("sources"):
        raise ValueError(f"{job.id}'s spec names no sources; add the download again")
    return start_download(spec)


def preview_text(resolved: Resolved) -> Text:
    """What a source stands for, shown before downloading."""
    meta = resolved.meta
    out = Text()
    out.append("Download ", style="bold")
    out.append(f"{resolved.title or resolved.source}\n")
    if meta.get("kind") == "civitai":
        for label, key in (("Name", "name"), ("Version", "version"), ("Type", "type"), ("Base model", "base_model")):
            out.append(f"{label}: ", style="bold")
            out.append(f"{meta.get(key) or '?'}\n")
        words = meta.get("trained_words") or []
        if words:
            out.append("Trigger words: ", style="bold")
            out.append(", ".join(str(w) for w in words) + "\n")
        out.append("Files", style="bold")
        out.append(" (▸ the one downloaded)\n")
        for f in meta.get("files") or []:
            mark = "▸" if f.get("chosen") else " "
            kind = f" [{f.get('type')}]" if f.get("type") else ""
            out.append(f" {mark} {f.get('name')}  {fmt_bytes(f.get('size'))}{kind}\n")
    else:
        total = sum(f.size or 0 for f in resolved.files)
        out.append("Files", style="bold")
        out.append(f" ({len(resolved.files)}, {fmt_bytes(total)})\n")
        for f in resolved.files[:20]:
            path = f"{f.subdir}/{f.filename}" if f.subdir and f.subdir != "blobs" else f.filename
            out.append(f"   {path}  {fmt_bytes(f.size)}\n")
        if len(resolved.files) > 20:
            out.append(f"   …and {len(resolved.files) - 20} more\n")
    if meta.get("dest_dir"):
        out.append("Into: ", style="bold")
        out.append(f"{meta['dest_dir']}\n")
    for w in meta.get("warnings") or []:
        out.append(f"! {w}\n", style="yellow")
    out.append("\nenter / y: download    escape: cancel", style="italic")
    return out


# ---------------------------------------------------------------------------------------------- widgets


class DownloadItem(ListItem):
    """One download's row: state, file, progress bar, speed, ETA."""

    def __init__(self, row: DownloadRow) -> None:
        super().__init__(id=f"dl-{row.id}")
        self.row = row

    def compose(self) -> ComposeResult:
        with Horizontal(classes="dl-row"):
            yield Label("", classes="dl-state")
            yield Label("", classes="dl-name")
            yield ProgressBar(total=100, show_eta=False, classes="dl-bar")
            yield Label("", classes="dl-speed")
            yield Label("", classes="dl-eta")

    def on_mount(self) -> None:
        self.show(self.row)

    def show(self, row: DownloadRow) -> None:
        self.row = row
        with contextlib.suppress(Exception):  # not composed yet: on_mount shows it
            self.query_one(".dl-state", Label).update(Text(row.state, style=STATE_STYLES.get(row.state, "")))
            files = f" ({row.files_done}/{row.files_total})" if row.files_total and row.files_total > 1 else ""
            name = row.name + files
            if row.error:
                name += f" — {row.error}"
            self.query_one(".dl-name", Label).update(Text(name, no_wrap=True, overflow="ellipsis"))
            bar = self.query_one(ProgressBar)
            percent = row.percent
            if percent is None:
                bar.update(total=None if row.state in ("running", "starting") else 100, progress=0)
            else:
                bar.update(total=100, progress=percent)
            self.query_one(".dl-speed", Label).update(fmt_speed(row.speed_bps))
            self.query_one(".dl-eta", Label).update(fmt_eta(row.eta_s))


class PreviewPanel(VerticalScroll, can_focus=True):
    """What a source resolved to; enter / y downloads it, escape drops it."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("enter", "confirm", "Download", id="nyx.downloads.confirm"),
        Binding("y", "confirm", "Download", show=False, id="nyx.downloads.confirm_y"),
        Binding("escape", "dismiss", "Cancel", id="nyx.downloads.dismiss"),
    ]

    def compose(self) -> ComposeResult:
        yield Static("", id="dl-preview-text")

    def action_confirm(self) -> None:
        screen = self.screen
        if isinstance(screen, DownloadsScreen):
            screen.confirm_preview()

    def action_dismiss(self) -> None:
        screen = self.screen
        if isinstance(screen, DownloadsScreen):
            screen.close_preview()


# ---------------------------------------------------------------------------------------------- the screen


class DownloadsScreen(Screen[None]):
    """Download jobs with live progress; add, cancel, resume, retry."""

    DEFAULT_CSS = """
    DownloadsScreen #dl-source { margin: 0 1; }
    DownloadsScreen #dl-status { height: 1; margin: 0 2; color: $text-muted; }
    DownloadsScreen #dl-preview { height: auto; max-height: 16; border: round $primary; margin: 0 1;
        padding: 0 1; }
    DownloadsScreen #dl-preview.-hidden { display: none; }
    DownloadsScreen #dl-list { height: 1fr; margin: 0 1; }
    DownloadsScreen .dl-row { height: 1; }
    DownloadsScreen .dl-state { width: 11; }
    DownloadsScreen .dl-name { width: 1fr; }
    DownloadsScreen .dl-bar { width: 34; }
    DownloadsScreen .dl-bar Bar { width: 24; }
    DownloadsScreen .dl-speed { width: 12; }
    DownloadsScreen .dl-eta { width: 9; }
    """
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("a", "add", "Add", id="nyx.downloads.add"),
        Binding("c", "cancel_job", "Cancel", id="nyx.downloads.cancel"),
        Binding("r", "resume_job", "Resume", id="nyx.downloads.resume"),
        Binding("t", "retry_job", "Retry", id="nyx.downloads.retry"),
    ]

    class Rows(Message):
        def __init__(self, rows: list[DownloadRow]) -> None:
            super().__init__()
            self.rows = rows

    class Previewed(Message):
        def __init__(self, source: str, resolved: Resolved) -> None:
            super().__init__()
            self.source, self.resolved = source, resolved

    def __init__(self) -> None:
        super().__init__()
        self.pending: str | None = None  # the source of the preview shown
        self.rows: list[DownloadRow] = []

    def compose(self) -> ComposeResult:
        yield Input(placeholder="add by URL or id: hf:owner/repo/file, civitai:ID, https://…  (enter)", id="dl-source")
        yield Static("", id="dl-status")
        yield PreviewPanel(id="dl-preview", classes="-hidden")
        yield ListView(id="dl-list")
        yield Footer()

    def on_mount(self) -> None:
        self.refresh_rows()
        self.set_interval(REFRESH_S, self.refresh_rows)
        self.query_one("#dl-list").focus()

    # ------------------------------------------------------------------ rows
    def refresh_rows(self) -> None:
        self._read_rows()

    @work(thread=True, exclusive=True, group="dl-rows", exit_on_error=False)
    def _read_rows(self) -> None:
        try:
            rows = read_rows()
        except Exception:  # a half-written job folder: the next tick reads it again
            return
        self.post_message(self.Rows(rows))

    def on_downloads_screen_rows(self, message: Rows) -> None:
        self.rows = message.rows
        view = self.query_one("#dl-list", ListView)
        items = {item.row.id: item for item in view.query(DownloadItem)}
        wanted = [r.id for r in message.rows]
        for job_id, item in items.items():
            if job_id not in wanted:
                item.remove()
        present = [i.row.id for i in view.query(DownloadItem) if i.row.id in wanted]
        for index, row in enumerate(message.rows):
            if row.id in items:
                items[row.id].show(row)
            else:
                # new jobs are newer than every shown one: they go on top, in order
                view.insert(min(index, len(present)), [DownloadItem(row)])
                present.insert(min(index, len(present)), row.id)
        running = sum(1 for r in message.rows if r.state in ("running", "starting"))
        self.query_one("#dl-status", Static).update(
            f"{len(message.rows)} downloads, {running} running" if message.rows else "no downloads yet: type a source"
        )

    def selected(self) -> DownloadRow | None:
        view = self.query_one("#dl-list", ListView)
        item = view.highlighted_child
        if isinstance(item, DownloadItem):
            return item.row
        return None

    # ------------------------------------------------------------------ adding
    def action_add(self) -> None:
        field = self.query_one("#dl-source", Input)
        field.focus()
        field.select_all()

    @on(Input.Submitted, "#dl-source")
    def _source_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        from nyx_tui.downloads.model import DownloadError

        text = event.value.strip()
        if not text:
            self.notify("type a source: hf:owner/repo/file, civitai:ID or an https:// URL", severity="warning")
            return
        try:
            check_source(text)
        except DownloadError as e:
            self.notify(self._error_text(e), title="not a source", severity="error", timeout=10)
            return
        self.query_one("#dl-status", Static).update(f"looking up {text} …")
        self._resolve(text)

    @staticmethod
    def _error_text(e: BaseException) -> str:
        from nyx_tui.downloads.model import DownloadError

        if isinstance(e, DownloadError):
            return e.message + (f"\nfix: {e.fix}" if e.fix else "")
        if isinstance(e, ValueError):
            return str(e)
        return f"{type(e).__name__}: {e}"

    @work(thread=True, exclusive=True, group="dl-resolve", exit_on_error=False)
    def _resolve(self, text: str) -> None:
        from nyx_tui.downloads.sources import resolve

        try:
            resolved = resolve(text, dest=None)
        except Exception as e:
            message = self._error_text(e)
            self.app.call_from_thread(self.notify, message, title="could not look it up", severity="error", timeout=10)
            self.app.call_from_thread(self.query_one("#dl-status", Static).update, "")
            return
        self.post_message(self.Previewed(text, resolved))

    def on_downloads_screen_previewed(self, message: Previewed) -> None:
        self.pending = message.source
        self.query_one("#dl-status", Static).update("")
        self.query_one("#dl-preview-text", Static).update(preview_text(message.resolved))
        panel = self.query_one("#dl-preview", PreviewPanel)
        panel.remove_class("-hidden")
        panel.focus()

    def close_preview(self) -> None:
        self.pending = None
        self.query_one("#dl-preview").add_class("-hidden")
        self.query_one("#dl-list").focus()

    def confirm_preview(self) -> None:
        source = self.pending
        if source is None:
            return
        self.close_preview()
        self.query_one("#dl-source", Input).value = ""
        self._start({"sources": [source], "dest": None, "sha256": None, "file": None}, "download")

    @work(thread=True, group="dl-start", exit_on_error=False)
    def _start(self, spec: dict[str, Any], what: str, old: str | None = None) -> None:
        try:
            if old is None:
                job = start_download(spec)
            else:
                from nyx_tui.jobs.jobdir import find_job

                job = resume_download(find_job(old))
        except Exception as e:
            message = self._error_text(e)
            self.app.call_from_thread(self.notify, message, title=f"{what} did not start", severity="error")
            return
        self.app.call_from_thread(self.notify, f"started {job.id}", title=what)
        self.app.call_from_thread(self.refresh_rows)

    # ------------------------------------------------------------------ cancel / resume / retry
    def action_cancel_job(self) -> None:
        row = self.selected()
        if row is None:
            self.notify("no download selected", severity="warning")
            return
        if row.state not in ("running", "starting", "queued"):
            self.notify(f"{row.id} is {row.state}: only a running download can be cancelled", severity="warning")
            return
        self._cancel(row.id)

    @work(thread=True, group="dl-cancel", exit_on_error=False)
    def _cancel(self, job_id: str) -> None:
        from nyx_tui.jobs.jobdir import find_job

        try:
            text = cancel_download(find_job(job_id))
        except Exception as e:
            message = self._error_text(e)
            self.app.call_from_thread(self.notify, message, title="cancel", severity="error")
            return
        self.app.call_from_thread(self.notify, text, title="cancel")
        self.app.call_from_thread(self.refresh_rows)

    def _resume(self, what: str) -> None:
        row = self.selected()
        if row is None:
            self.notify("no download selected", severity="warning")
            return
        if row.state not in RESUMABLE:
            hint = "c cancels it" if row.state in ("running", "starting", "queued") else "add its source again"
            self.notify(f"{row.id} is {row.state}: nothing to {what} ({hint})", severity="warning")
            return
        self._start({}, what, row.id)

    def action_resume_job(self) -> None:
        self._resume("resume")

    def action_retry_job(self) -> None:
        self._resume("retry")


__all__ = [
    "DownloadRow",
    "DownloadsScreen",
    "cancel_download",
    "preview_text",
    "read_row",
    "read_rows",
    "resume_download",
    "start_download",
]
