"""The datasets screen (mode `datasets`): scan a folder, see its kohya folders, images, numbers and layout
problems, and start WD14 tagging or captioning jobs on it.

Scanning (`datasets.scan`, a header read per image), the statistics, thumbnails and starting a job run in
thread workers that post messages; the screen owns what is shown. The scanned `Dataset` is shared with the
tags screen through a `DatasetSession` kept on the App (`session_of(app)`): the tags editor changes caption
entries in place and bumps `version`, and this screen redraws when it is shown again.

A tagging/captioning job is started the way `nyx tag` / `nyx caption` start one (`create_job` + a
supervisor), then followed by tailing its `events.jsonl` in a worker: its `progress` events feed the
progress bar, and its `end` rescans the folder so the new captions show.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from rich.text import Text
from textual import on, work
from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.screen import ModalScreen, Screen
from textual.widgets import Button, Checkbox, DataTable, Footer, Input, Label, ProgressBar, Select, Static
from textual.worker import get_current_worker

from nyx_tui import paths
from nyx_tui.screens.messages import ControlJob
from nyx_tui.widgets.thumbs import Thumb

if TYPE_CHECKING:
    from nyx_tui.datasets.scan import Dataset, ImageEntry
    from nyx_tui.datasets.stats import DatasetStats
    from nyx_tui.jobs.jobdir import JobDir

STATE_FILE = "datasets.json"  # in the config folder: the last folder scanned
FOLLOW_S = 0.25  # how often a job's events are read
BAR_WIDTH = 16
TOP_TAGS = 12
CAPTION_PREVIEW = 48  # characters of a caption shown in the image list


# ---------------------------------------------------------------------------------------------- shared state


@dataclass
class DatasetSession:
    """What the datasets and tags screens share: the scanned dataset and the image in hand. Whoever changes
    captions (the tags editor) updates the entries in place and bumps `version`."""

    dataset: Dataset | None = None
    current: str | None = None  # rel of the selected image
    version: int = 0
    _index: tuple[Any, dict[str, ImageEntry]] | None = None

    def entry(self, rel: str | None) -> ImageEntry | None:
        if self.dataset is None or rel is None:
            return None
        if self._index is None or self._index[0] is not self.dataset:
            self._index = (self.dataset, self.dataset.by_rel())
        return self._index[1].get(rel)


def session_of(app: App[Any]) -> DatasetSession:
    session = getattr(app, "nyx_dataset_session", None)
    if not isinstance(session, DatasetSession):
        session = DatasetSession()
        app.nyx_dataset_session = session  # type: ignore[attr-defined]
    return session


def refresh_captions(entries: Sequence[ImageEntry]) -> None:
    """Re-read the captions (text and stamp) of `entries` from disk, in place."""
    from nyx_tui.datasets.captions import MISSING, read_caption

    for e in entries:
        try:
            text, stamp = read_caption(e.caption_path)
        except OSError:
            continue
        e.caption, e.stamp = (None if stamp == MISSING else text), stamp


def last_folder() -> Path:
    """The folder scanned last time (if it still exists), else the working directory."""
    with contextlib.suppress(OSError, ValueError, TypeError, AttributeError):
        data = json.loads((paths.config_dir() / STATE_FILE).read_text(encoding="utf-8"))
        folder = Path(str(data["last"]))
        if folder.is_dir():
            return folder
    return Path.cwd()


def remember_folder(folder: Path) -> None:
    with contextlib.suppress(OSError):
        path = paths.config_dir() / STATE_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"last": str(folder)}), encoding="utf-8")


def shown_path(folder: Path) -> str:
    """A folder as the user would type it: relative to the working directory when inside it."""
    with contextlib.suppress(ValueError):
        rel = folder.relative_to(Path.cwd())
        return str(rel) if str(rel) != "." else "."
    return str(folder)


# ---------------------------------------------------------------------------------------------- rendering


def bar(n: int, most: int, width: int = BAR_WIDTH) -> str:
    if most <= 0 or n <= 0:
        return ""
    return "█" * max(1, round(width * n / most))


def caption_summary(entry: ImageEntry) -> Text:
    if entry.caption is None:
        return Text("— no caption", style="italic")
    if not entry.caption:
        return Text("(empty)", style="italic")
    tags = ", ".join(entry.tags)
    return Text(tags if len(tags) <= CAPTION_PREVIEW else tags[: CAPTION_PREVIEW - 1] + "…")


def size_text(entry: ImageEntry) -> str:
    if entry.error:
        return "unreadable"
    return f"{entry.size[0]}×{entry.size[1]}" if entry.size else ""


def stats_text(stats: DatasetStats, top: int = TOP_TAGS) -> Text:
    """Counts, captions, the resolution / aspect histograms as bars, buckets and the top tags."""
    out = Text()
    out.append("Images ", style="bold")
    out.append(f"{stats.images}  readable {stats.readable}  per epoch {stats.with_repeats}\n")
    out.append("Captions ", style="bold")
    out.append(f"{stats.captioned}  missing {stats.missing_captions}  empty {stats.empty_captions}")
    out.append(f"  orphans {stats.orphans}\n" if stats.orphans else "\n")
    out.append("Tags ", style="bold")
    out.append(f"{stats.unique_tags} unique, {stats.tags_per_caption:.1f} per caption\n")

    def histogram(title: str, rows: Sequence[tuple[str, int]]) -> None:
        rows = [(k, n) for k, n in rows if n]
        if not rows:
            return
        out.append(f"\n{title}\n", style="bold")
        most = max(n for _, n in rows)
        width = max(len(k) for k, _ in rows)
        for k, n in rows:
            out.append(f" {k:<{width}} {bar(n, most):<{BAR_WIDTH}} {n}\n")

    histogram("Short side (px)", stats.short_side)
    histogram("Aspect", stats.aspect)
    s = stats.settings
    out.append(f"\nBuckets at {s.resolution}", style="bold")
    out.append(" (images / per epoch)\n")
    if stats.smaller_than_resolution:
        out.append(f" {stats.smaller_than_resolution} smaller than {s.resolution}²\n", style="italic")
    for b in stats.buckets[:10]:
        size = f"{b.size[0]}×{b.size[1]}"
        out.append(f" {size:<10} {b.images:>5} / {b.with_repeats}\n")
    if len(stats.buckets) > 10:
        out.append(f" …and {len(stats.buckets) - 10} more\n")
    histogram("Top tags", [(t[:22], n) for t, n in stats.tags[:top]])
    out.rstrip()
    return out


SEVERITY_MARKS = {"error": ("✗", "bold red"), "warning": ("!", "bold yellow"), "info": ("·", "dim")}


def problems_text(problems: Sequence[Any], root: Path) -> Text:
    out = Text()
    if not problems:
        out.append("✓ no layout problems\n", style="green")
        return out
    out.append(f"Problems ({len(problems)})\n", style="bold")
    for p in problems:
        mark, style = SEVERITY_MARKS.get(p.severity, ("·", ""))
        out.append(f"{mark} {p.severity}: ", style=style)
        out.append(f"{p.message}\n")
        out.append("  fix: ", style="bold green")
        out.append(f"{p.fix}\n")
    out.rstrip()
    out.append("\n")  # one blank line before the numbers
    return out


def folder_label(f: Any) -> str:
    return "  " * f.depth + (f.path.name + "/" if f.depth else "./")


# ---------------------------------------------------------------------------------------------- jobs


def start_tag_job(folder: Path, options: dict[str, Any]) -> JobDir:
    """Check and start a WD14 job on `folder`, as `nyx tag` does. Raises ValueError with the problem and fix."""
    from nyx_tui.jobs.jobdir import create_job
    from nyx_tui.jobs.launch import spawn_supervisor
    from nyx_tui.tagging.tag_cli import _model_problem
    from nyx_tui.tagging.wd14 import TagOptions

    model = str(options.get("model") or "").strip()
    if not model:
        raise ValueError("no model: give a Hugging Face repo id or a folder with model.onnx and selected_tags.csv")
    problem = _model_problem(model)
    if problem:
        raise ValueError(f"{problem[0]}\nfix: {problem[1]}")
    tag_options = TagOptions(
        threshold=float(options.get("threshold", 0.35)),
        character_threshold=float(options.get("character_threshold", 0.85)),
        mcut=bool(options.get("mcut", False)),
        mode=options.get("mode", "append"),
        caption_ext=str(options.get("caption_ext", ".txt")),
    )
    model_path = Path(model).expanduser()
    model_ref = str(model_path.resolve()) if model_path.is_dir() else model
    spec = {"folder": str(folder.resolve()), "model": model_ref, "recursive": True, "options": tag_options.to_json()}
    argv = [sys.executable, "-m", "nyx_tui.tagging.tag_job", "."]
    job = create_job("tag", f"tag-{folder.resolve().name}", argv, extra={"tag": spec})
    spawn_supervisor(job)
    return job


def start_caption_job(folder: Path, options: dict[str, Any]) -> JobDir:
    """Check and start a captioning job on `folder`, as `nyx caption` does. Raises ValueError."""
    from nyx_tui.tagging import caption_cli
    from nyx_tui.tagging.captioners import CaptionSettings

    model = str(options.get("model") or "").strip()
    if not model:
        raise ValueError("no model: give a captioner's folder or a repo id in the local Hugging Face cache")
    if Path(model).expanduser().is_dir():
        model = str(Path(model).expanduser().resolve())
    settings = CaptionSettings(
        folder=str(folder.resolve()),
        model=model,
        prefix=str(options.get("prefix", "")),
        mode=str(options.get("mode", "overwrite")),
        caption_ext=str(options.get("caption_ext", ".txt")),
    )
    found = caption_cli.problems(settings)
    if found:
        raise ValueError("\n".join(found))
    job: JobDir = caption_cli.start_caption_job(settings)
    return job


class JobDialog(ModalScreen[dict[str, Any] | None]):
    """The main options of a tagging (`kind="tag"`) or captioning (`kind="caption"`) job."""

    DEFAULT_CSS = """
    JobDialog { align: center middle; }
    JobDialog > Vertical { width: 76; height: auto; border: thick $primary; background: $surface; padding: 1 2; }
    JobDialog .title { text-style: bold; margin-bottom: 1; }
    JobDialog Label { margin-top: 1; }
    JobDialog Horizontal { height: auto; }
    JobDialog .half { width: 1fr; }
    JobDialog .buttons { margin-top: 1; }
    JobDialog Button { margin-right: 2; }
    """
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "cancel", "Cancel", id="nyx.datasets.dialog_cancel"),
        Binding("ctrl+s", "start", "Start", id="nyx.datasets.dialog_start", priority=True),
    ]

    def __init__(self, kind: str, folder: str) -> None:
        super().__init__()
        self.kind, self.folder = kind, folder

    def compose(self) -> ComposeResult:
        with Vertical():
            if self.kind == "tag":
                from nyx_tui.tagging.tag_cli import _MODES

                yield Static(content=f"WD14 tagging of {self.folder}", classes="title")
                yield Label("Model: Hugging Face repo id, or a folder with model.onnx + selected_tags.csv")
                yield Input(value="SmilingWolf/wd-vit-tagger-v3", id="model")
                with Horizontal():
                    with Vertical(classes="half"):
                        yield Label("General threshold")
                        yield Input(value="0.35", id="threshold", type="number")
                    with Vertical(classes="half"):
                        yield Label("Character threshold")
                        yield Input(value="0.85", id="character_threshold", type="number")
                yield Label("Existing captions")
                yield Select([(m, m) for m in _MODES], value="append", allow_blank=False, id="mode")
                yield Checkbox("MCut: thresholds per image (the largest gap)", id="mcut")
            else:
                yield Static(content=f"Captioning of {self.folder}", classes="title")
                yield Label("Model: a local folder, or a repo id in the Hugging Face cache (BLIP, BLIP-2, Florence-2)")
                yield Input(placeholder="Salesforce/blip-image-captioning-large", id="model")
                yield Label("Existing captions")
                yield Select(
                    [(m, m) for m in ("overwrite", "append", "skip")], value="overwrite", allow_blank=False, id="mode"
                )
                yield Label("Prefix (put before every caption, e.g. 'mychar, ')")
                yield Input(value="", id="prefix")
            with Horizontal(classes="buttons"):
                yield Button("Start (ctrl+s)", variant="primary", id="start")
                yield Button("Cancel (esc)", id="cancel")

    def on_mount(self) -> None:
        self.query_one("#model", Input).focus()

    def values(self) -> dict[str, Any] | None:
        out: dict[str, Any] = {"model": self.query_one("#model", Input).value.strip()}
        out["mode"] = self.query_one("#mode", Select).value
        if self.kind == "tag":
            for key in ("threshold", "character_threshold"):
                text = self.query_one(f"#{key}", Input).value.strip()
                try:
                    value = float(text)
                except ValueError:
                    value = -1.0
                if not 0.0 <= value <= 1.0:
                    self.notify(f"{key.replace('_', ' ')} {text!r} is not between 0 and 1", severity="error")
                    return None
                out[key] = value
            out["mcut"] = self.query_one("#mcut", Checkbox).value
        else:
            out["prefix"] = self.query_one("#prefix", Input).value
        if not out["model"]:
            self.notify("give a model", severity="error")
            return None
        return out

    def action_start(self) -> None:
        values = self.values()
        if values is not None:
            self.dismiss(values)

    def action_cancel(self) -> None:
        self.dismiss(None)

    @on(Input.Submitted)
    def _submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self.action_start()

    @on(Button.Pressed)
    def _pressed(self, event: Button.Pressed) -> None:
        event.stop()
        if event.button.id == "start":
            self.action_start()
        else:
            self.dismiss(None)


# ---------------------------------------------------------------------------------------------- the screen


class DatasetsScreen(Screen[None]):
    """Folder → scan → folders, images (with a thumbnail), numbers and problems; tag/caption jobs."""

    DEFAULT_CSS = """
    DatasetsScreen #ds-top { height: 3; }
    DatasetsScreen #ds-top Label { padding: 1 1 0 1; }
    DatasetsScreen #folder { width: 1fr; }
    DatasetsScreen #ext { width: 10; }
    DatasetsScreen #resolution { width: 10; }
    DatasetsScreen #ds-status { height: 1; padding: 0 1; color: $text-muted; }
    DatasetsScreen .bars { height: auto; }
    DatasetsScreen .bars.-idle { display: none; }
    DatasetsScreen .bars Static { width: auto; padding: 0 1; }
    DatasetsScreen #ds-main { height: 1fr; }
    DatasetsScreen #folders { width: 30; height: 1fr; }
    DatasetsScreen #ds-middle { width: 1fr; }
    DatasetsScreen #images { height: 1fr; }
    DatasetsScreen #ds-thumb { height: auto; border-top: solid $panel; }
    DatasetsScreen #ds-thumb > .thumb-image { height: 8; }
    DatasetsScreen #ds-side { width: 46; border-left: solid $panel; padding: 0 1; }
    """

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("o", "open_folder", "Folder", id="nyx.datasets.open"),
        Binding("r", "rescan", "Rescan", id="nyx.datasets.rescan"),
        Binding("e", "edit_tags", "Edit tags", id="nyx.datasets.tags"),
        Binding("w", "tag_job", "WD14 tag", id="nyx.datasets.wd14"),
        Binding("c", "caption_job", "Caption", id="nyx.datasets.caption"),
        Binding("x", "stop_job", "Stop job", id="nyx.datasets.stop_job", show=False),
    ]

    # ------------------------------------------------------------------ messages from workers
    class ScanProgress(Message):
        def __init__(self, done: int, total: int) -> None:
            super().__init__()
            self.done, self.total = done, total

    class Scanned(Message):
        def __init__(self, dataset: Dataset | None, stats: DatasetStats | None, error: str | None = None) -> None:
            super().__init__()
            self.dataset, self.stats, self.error = dataset, stats, error

    class StatsReady(Message):
        def __init__(self, stats: DatasetStats, version: int) -> None:
            super().__init__()
            self.stats, self.version = stats, version

    class JobStarted(Message):
        def __init__(self, job_id: str, kind: str) -> None:
            super().__init__()
            self.job_id, self.kind = job_id, kind

    class JobProgress(Message):
        def __init__(self, done: int, total: int, message: str) -> None:
            super().__init__()
            self.done, self.total, self.message = done, total, message

    class JobEnded(Message):
        def __init__(self, job_id: str, kind: str, state: str, error: str | None) -> None:
            super().__init__()
            self.job_id, self.kind, self.state, self.error = job_id, kind, state, error

    def __init__(self, *, folder: Path | None = None, name: str | None = None, id: str | None = None) -> None:
        super().__init__(name=name, id=id)
        self.initial_folder = folder
        self.stats: DatasetStats | None = None
        self.folder_filter: str | None = None  # rel of the folder whose images are listed; None = all
        self.shown: list[ImageEntry] = []
        self.scanning = False
        self.job_id: str | None = None
        self.job_kind: str | None = None
        self.job_state: str | None = None  # the last job's end state
        self._seen_version = -1

    @property
    def session(self) -> DatasetSession:
        return session_of(self.app)

    @property
    def dataset(self) -> Dataset | None:
        return self.session.dataset

    def compose(self) -> ComposeResult:
        with Horizontal(id="ds-top"):
            yield Label("Folder")
            yield Input(id="folder", placeholder="a folder of images (or of kohya N_name folders)")
            yield Label("Captions")
            yield Input(value=".txt", id="ext")
            yield Label("Bucket res")
            yield Input(value="1024", id="resolution", type="integer")
        yield Static(content="Enter a folder and press enter to scan it.", id="ds-status")
        with Horizontal(id="scan-bars", classes="bars -idle"):
            yield Static(content="scanning", id="scan-label")
            yield ProgressBar(total=1, show_eta=False, id="scan-bar")
        with Horizontal(id="job-bars", classes="bars -idle"):
            yield Static(content="job", id="job-label")
            yield ProgressBar(total=1, show_eta=False, id="job-bar")
        with Horizontal(id="ds-main"):
            folders: DataTable[Any] = DataTable(id="folders", cursor_type="row")
            folders.add_column("folder", key="folder")
            folders.add_column("×", key="repeats")
            folders.add_column("images", key="images")
            yield folders
            with Vertical(id="ds-middle"):
                images: DataTable[Any] = DataTable(id="images", cursor_type="row", zebra_stripes=True)
                images.add_column("image", key="image")
                images.add_column("size", key="size")
                images.add_column("caption", key="caption")
                yield images
                yield Thumb(128, id="ds-thumb")
            with VerticalScroll(id="ds-side"):
                yield Static(content="", id="problems")
                yield Static(content="", id="stats")
        yield Footer()

    def on_mount(self) -> None:
        folder = self.initial_folder
        ds = self.dataset
        if folder is None and ds is not None:
            folder = ds.root
        self.query_one("#folder", Input).value = shown_path(folder or last_folder())
        if ds is not None:
            self._show_dataset(ds)
            self._compute_stats()
        elif folder is not None or (paths.config_dir() / STATE_FILE).exists():
            self.action_rescan()  # the folder asked for, or the last one used; never the cwd unasked
        if ds is None:
            self.query_one("#folder", Input).focus()
        else:
            self.query_one("#images").focus()

    def on_screen_resume(self) -> None:
        if self.dataset is not None and self.session.version != self._seen_version:
            self._show_dataset(self.dataset)
            self._compute_stats()

    # ------------------------------------------------------------------ scanning
    def folder_path(self) -> Path:
        text = self.query_one("#folder", Input).value.strip() or "."
        return Path(text).expanduser().absolute()

    def caption_ext(self) -> str:
        return self.query_one("#ext", Input).value.strip() or ".txt"

    def resolution(self) -> int:
        try:
            return max(64, int(self.query_one("#resolution", Input).value))
        except ValueError:
            return 1024

    def action_open_folder(self) -> None:
        field = self.query_one("#folder", Input)
        field.focus()
        field.select_all()

    def action_rescan(self) -> None:
        if self.scanning:
            self.notify("a scan is running", severity="warning")
            return
        self.scanning = True
        folder = self.folder_path()
        self.query_one("#ds-status", Static).update(f"scanning {shown_path(folder)} …")
        self._scan(folder, self.caption_ext(), self.resolution())

    @on(Input.Submitted, "#folder, #ext")
    def _folder_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self.action_rescan()

    @on(Input.Submitted, "#resolution")
    def _resolution_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self._compute_stats()

    @work(thread=True, exclusive=True, group="ds-scan", exit_on_error=False)
    def _scan(self, folder: Path, ext: str, resolution: int) -> None:
        from nyx_tui.datasets.scan import scan
        from nyx_tui.datasets.stats import BucketSettings, compute_stats

        def progress(done: int, total: int) -> None:
            self.post_message(self.ScanProgress(done, total))

        try:
            ds = scan(folder, ext, progress=progress)
            stats = compute_stats(ds, BucketSettings(resolution=resolution, max_bucket_reso=max(1024, resolution)))
        except (OSError, ValueError) as e:
            self.post_message(self.Scanned(None, None, str(e)))
            return
        except Exception as e:  # a bug must not take the screen down
            self.post_message(self.Scanned(None, None, f"{type(e).__name__}: {e}"))
            return
        self.post_message(self.Scanned(ds, stats))

    def on_datasets_screen_scan_progress(self, message: ScanProgress) -> None:
        if not self.scanning or message.total < 1:
            return
        self.query_one("#scan-bars").remove_class("-idle")
        self.query_one("#scan-label", Static).update(f"scanning {message.done}/{message.total} images")
        self.query_one("#scan-bar", ProgressBar).update(total=message.total, progress=message.done)

    def on_datasets_screen_scanned(self, message: Scanned) -> None:
        self.scanning = False
        self.query_one("#scan-bars").add_class("-idle")
        if message.dataset is None:
            self.query_one("#ds-status", Static).update(f"not scanned: {message.error}")
            self.notify(message.error or "scan failed", title="scan", severity="error")
            return
        ds = message.dataset
        remember_folder(ds.root)
        session = self.session
        session.dataset = ds
        session.version += 1
        if session.entry(session.current) is None:
            session.current = ds.images[0].rel if ds.images else None
        self.stats = message.stats
        self._show_dataset(ds)

    # ------------------------------------------------------------------ statistics
    def _compute_stats(self) -> None:
        if self.dataset is not None:
            self._stats_worker(self.dataset, self.resolution(), self.session.version)

    @work(thread=True, exclusive=True, group="ds-stats", exit_on_error=False)
    def _stats_worker(self, ds: Dataset, resolution: int, version: int) -> None:
        from nyx_tui.datasets.stats import BucketSettings, compute_stats

        stats = compute_stats(ds, BucketSettings(resolution=resolution, max_bucket_reso=max(1024, resolution)))
        self.post_message(self.StatsReady(stats, version))

    def on_datasets_screen_stats_ready(self, message: StatsReady) -> None:
        self.stats = message.stats
        self._show_stats()

    # ------------------------------------------------------------------ drawing
    def _show_dataset(self, ds: Dataset) -> None:
        self._seen_version = self.session.version
        ext = "" if ds.caption_ext == ".txt" else f", captions {ds.caption_ext}"
        captioned = sum(1 for e in ds.images if e.has_caption)
        self.query_one("#ds-status", Static).update(
            f"{ds.root.name}: {len(ds.images)} images, {captioned} captioned, "
            f"{len(ds.kohya_folders)} kohya folders{ext}"
        )
        folders = self.query_one("#folders", DataTable)
        keep = self.folder_filter
        folders.clear()
        for f in ds.folders:
            folders.add_row(
                folder_label(f), f"×{f.kohya.repeats}" if f.kohya else "", str(f.images_below), key=f.rel or "."
            )
        rels = [f.rel for f in ds.folders]
        if keep in rels:
            folders.move_cursor(row=rels.index(keep), animate=False)
        else:
            self.folder_filter = None
        self._show_images()
        self._show_stats()

    def _show_images(self) -> None:
        ds = self.dataset
        table = self.query_one("#images", DataTable)
        table.clear()
        if ds is None:
            self.shown = []
            return
        prefix = self.folder_filter
        self.shown = [e for e in ds.images if not prefix or e.folder == prefix or e.folder.startswith(prefix + "/")]
        for e in self.shown:
            table.add_row(e.rel, size_text(e), caption_summary(e), key=e.rel)
        current = self.session.current
        index = next((i for i, e in enumerate(self.shown) if e.rel == current), 0)
        if self.shown:
            table.move_cursor(row=index, animate=False)
            self._preview(self.shown[index])
        else:
            self.query_one(Thumb).show(None)

    def _show_stats(self) -> None:
        ds = self.dataset
        if ds is None:
            return
        if self.stats is not None:
            self.query_one("#stats", Static).update(stats_text(self.stats))
        self.query_one("#problems", Static).update(problems_text(ds.problems, ds.root))

    def _preview(self, entry: ImageEntry) -> None:
        self.session.current = entry.rel
        self.query_one(Thumb).show(entry.path if entry.readable else None)

    @on(DataTable.RowHighlighted, "#folders")
    def _folder_highlighted(self, event: DataTable.RowHighlighted) -> None:
        rel = str(event.row_key.value or ".")
        rel = "" if rel == "." else rel
        new = rel or None
        if new != self.folder_filter:
            self.folder_filter = new
            self._show_images()

    @on(DataTable.RowHighlighted, "#images")
    def _image_highlighted(self, event: DataTable.RowHighlighted) -> None:
        entry = self.session.entry(str(event.row_key.value))
        if entry is not None:
            self._preview(entry)

    @on(DataTable.RowSelected, "#images")
    def _image_selected(self, event: DataTable.RowSelected) -> None:
        event.stop()
        self.action_edit_tags()

    # ------------------------------------------------------------------ actions
    def selected_entry(self) -> ImageEntry | None:
        table = self.query_one("#images", DataTable)
        if not self.shown or table.row_count == 0:
            return None
        return self.shown[min(max(table.cursor_row, 0), len(self.shown) - 1)]

    def action_edit_tags(self) -> None:
        entry = self.selected_entry()
        if entry is None:
            self.notify("no image selected: scan a folder first", severity="warning")
            return
        self.session.current = entry.rel
        open_tags(self.app)

    def _check_job_start(self) -> bool:
        if self.dataset is None:
            self.notify("scan a folder first", severity="warning")
            return False
        if self.job_id is not None and self.job_state is None:
            self.notify(f"{self.job_id} is still running (x stops it)", severity="warning")
            return False
        return True

    def action_tag_job(self) -> None:
        if self._check_job_start():
            self._ask_job("tag")

    def action_caption_job(self) -> None:
        if self._check_job_start():
            self._ask_job("caption")

    def _ask_job(self, kind: str) -> None:
        ds = self.dataset
        assert ds is not None
        folder, ext = ds.root, ds.caption_ext

        def answered(values: dict[str, Any] | None) -> None:
            if values:
                self._start_job(kind, folder, {**values, "caption_ext": ext})

        self.app.push_screen(JobDialog(kind, shown_path(folder)), answered)

    def action_stop_job(self) -> None:
        if self.job_id is None or self.job_state is not None:
            self.notify("no job of this screen is running")
            return
        self.post_message(ControlJob(self.job_id, "stop"))

    @work(thread=True, exclusive=True, group="ds-job", exit_on_error=False)
    def _start_job(self, kind: str, folder: Path, options: dict[str, Any]) -> None:
        try:
            job = start_tag_job(folder, options) if kind == "tag" else start_caption_job(folder, options)
        except Exception as e:
            text = str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"
            self.app.call_from_thread(self.notify, text, title=f"the {kind} job did not start", severity="error")
            return
        with contextlib.suppress(Exception):  # the store is an index; the job dir is the truth
            from nyx_tui.jobs.store import Store, job_summary

            Store().upsert(job_summary(job))
        self.post_message(self.JobStarted(job.id, kind))
        self._follow(job, kind)

    def _follow(self, job: JobDir, kind: str) -> None:
        """Tail the job's events until its `end` (or its status says it ended without one)."""
        from nyx_tui.jobs.events import EventTail
        from nyx_tui.jobs.jobdir import TERMINAL

        worker = get_current_worker()
        tail = EventTail(job.events_path)
        checked = time.monotonic()
        while not worker.is_cancelled:
            for event in tail.poll():
                if event.get("kind") == "progress" and isinstance(event.get("done"), int | float):
                    total = event.get("total")
                    self.post_message(
                        self.JobProgress(
                            int(event["done"]),
                            int(total) if isinstance(total, int | float) else 0,
                            str(event.get("message") or ""),
                        )
                    )
                elif event.get("kind") == "end":
                    error = event.get("error") or event.get("hint")
                    self.post_message(self.JobEnded(job.id, kind, str(event.get("state")), error and str(error)))
                    return
            if tail.caught_up and time.monotonic() - checked > 2.0:
                checked = time.monotonic()
                with contextlib.suppress(Exception):
                    state = job.effective_state()
                    if state in TERMINAL and not tail.poll():
                        self.post_message(self.JobEnded(job.id, kind, state, None))
                        return
            time.sleep(FOLLOW_S)

    def on_datasets_screen_job_started(self, message: JobStarted) -> None:
        self.job_id, self.job_kind, self.job_state = message.job_id, message.kind, None
        self.query_one("#job-bars").remove_class("-idle")
        self.query_one("#job-label", Static).update(f"{message.kind} job {message.job_id}: starting")
        self.query_one("#job-bar", ProgressBar).update(total=1, progress=0)
        self.notify(f"started {message.job_id}", title=message.kind)

    def on_datasets_screen_job_progress(self, message: JobProgress) -> None:
        what = f" ({message.message})" if message.message else ""
        self.query_one("#job-label", Static).update(
            f"{self.job_kind} {message.done}/{message.total or '?'} images{what}"
        )
        if message.total:
            self.query_one("#job-bar", ProgressBar).update(total=message.total, progress=message.done)

    def on_datasets_screen_job_ended(self, message: JobEnded) -> None:
        self.job_state = message.state
        ok = message.state == "finished"
        self.query_one("#job-label", Static).update(f"{message.kind} job {message.state}")
        text = f"{message.job_id} {message.state}" + (f": {message.error}" if message.error else "")
        self.notify(text, title=message.kind, severity="information" if ok else "error", timeout=10)
        if self.dataset is not None and not self.scanning:
            self.query_one("#folder", Input).value = shown_path(self.dataset.root)
            self.action_rescan()


def open_tags(app: App[Any]) -> None:
    """Show the tags editor on the session's current image (the `tags` mode, or a pushed screen)."""
    if "tags" in getattr(app, "MODES", {}) or "tags" in getattr(app, "_modes", {}):
        app.switch_mode("tags")
        return
    from nyx_tui.screens.tags import TagsScreen

    app.push_screen(TagsScreen())


__all__ = [
    "DatasetSession",
    "DatasetsScreen",
    "JobDialog",
    "open_tags",
    "problems_text",
    "refresh_captions",
    "session_of",
    "start_caption_job",
    "start_tag_job",
    "stats_text",
]
