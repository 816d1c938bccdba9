"""The LoRA screen (mode `lora`): open a LoRA file, see what it is, edit its metadata, and run the LoRA tools
on it (resize, convert, compare, upload).

The file comes from the path field, from the list of LoRA files saved by finished jobs (their `artifact`
events with `what: lora`) or from the recently opened files (`<config>/lora_recent.json`); the dashboard's
"LoRA tools" key opens a finished run's LoRA here (`NyxApp.open_lora`).

Reading a file (a safetensors header: `nyx_tui.lora.inspect`, `nyx_tui.lora.metadata`, both torch-free) and
saving metadata (a header-only rewrite) run in thread workers that post messages. The tools that need torch
run as `nyx lora …` subprocesses in thread workers, so this process never imports torch and the UI never
waits; their output and errors are shown in the screen. A bad file shows its `LoraFileError` message, not a
traceback. The Hugging Face token for uploads comes from the environment or `<config>/secrets.toml` (the
child process reads it); it is never typed into a field nor put on a command line.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.screen import Screen
from textual.widgets import (
    Button,
    Checkbox,
    DataTable,
    Footer,
    Input,
    Label,
    OptionList,
    Select,
    Static,
    TabbedContent,
    TabPane,
)
from textual.widgets.option_list import Option
from textual.worker import get_current_worker

from nyx_tui import paths

RECENT_FILE = "lora_recent.json"  # in the config folder: the LoRA files opened lately, newest first
RECENT_MAX = 20
JOB_FILES_MAX = 200
TOP_TAGS = 40
RESIZE_METHODS = ("rank", "sv_ratio", "sv_fro", "sv_cumulative")
CONVERT_TARGETS = ("kohya", "diffusers")
JOB_ID_RE = re.compile(r"\d{8}-\d{6}-[\w.-]+")
OUTPUT_TAIL = 4000  # characters of a tool's output shown


# ---------------------------------------------------------------------------------------------- files


@dataclass(frozen=True)
class LoraFile:
    """One entry of the file list: a LoRA a job saved, or one opened lately."""

    path: Path
    label: str
    source: str  # "job" or "recent"


def recent_path() -> Path:
    return paths.config_dir() / RECENT_FILE


def read_recent() -> list[Path]:
    """The recently opened files, newest first; a missing or damaged list is an empty one."""
    try:
        data = json.loads(recent_path().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    if not isinstance(data, list):
        return []
    return [Path(p) for p in data if isinstance(p, str)][:RECENT_MAX]


def remember(path: Path) -> None:
    """Put `path` at the top of the recent files (atomic write)."""
    from nyx_tui.jobs.jobdir import atomic_write

    path = path.resolve()
    items = [path, *(p for p in read_recent() if p != path)][:RECENT_MAX]
    recent_path().parent.mkdir(parents=True, exist_ok=True)
    atomic_write(recent_path(), json.dumps([str(p) for p in items], indent=1))


def job_loras() -> list[LoraFile]:
    """The LoRA files that finished jobs saved, newest job first and each job's last file first."""
    from nyx_tui.jobs.jobdir import list_jobs

    out: list[LoraFile] = []
    for job in reversed(list_jobs()):
        try:
            if job.effective_state() != "finished":
                continue
            artifacts = [a for a in job.artifacts() if a.get("what") == "lora" and a.get("path")]
        except (OSError, ValueError):
            continue
        for a in reversed(artifacts):
            p = Path(str(a["path"]))
            p = p if p.is_absolute() else job.path / p
            step = f" @{a['step']}" if a.get("step") is not None else ""
            out.append(LoraFile(p, f"{job.id}: {p.name}{step}", "job"))
            if len(out) >= JOB_FILES_MAX:
                return out
    return out


def list_files() -> list[LoraFile]:
    """The file list: recent files, then the jobs' files not already listed."""
    recent = [LoraFile(p, f"recent: {p.name}  ({p.parent.name}/)", "recent") for p in read_recent()]
    seen = {f.path.resolve() for f in recent}
    return recent + [f for f in job_loras() if f.path.resolve() not in seen]


# ---------------------------------------------------------------------------------------------- commands


def default_output(
    path: Path, action: str, *, rank: str = "", method: str = "rank", param: str = "", target: str = "kohya"
) -> Path:
    """Where a tool writes when the output field is left empty: beside the input, never over it."""
    if action == "resize":
        tag = f"r{rank}" if method == "rank" else f"{method}-{param}"
        return path.with_name(f"{path.stem}-{tag}.safetensors")
    if action == "convert":
        return path.with_name(f"{path.stem}-{target}.safetensors")
    if action == "compare":
        return path.with_name(f"{path.stem}-compare.png")
    raise ValueError(f"no output for {action}")


def _positive_int(text: str, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{what} must be a whole number, not {text!r}") from None
    if value < 1:
        raise ValueError(f"{what} must be at least 1, not {value}")
    return value


def _positive_float(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{what} must be a number, not {text!r}") from None
    if value <= 0:
        raise ValueError(f"{what} must be above 0, not {value}")
    return value


def _output(path: Path, output: str, default: Path) -> Path:
    out = Path(output).expanduser() if output.strip() else default
    if out.resolve() == path.resolve():
        raise ValueError(f"the output {out} is the input file; choose another name (the input is never overwritten)")
    return out


def resize_command(path: Path, *, method: str, value: str, output: str = "") -> tuple[list[str], Path]:
    """`nyx lora resize` for a fixed rank (`method` "rank") or a dynamic method with its parameter."""
    value = value.strip()
    if method == "rank":
        rank = _positive_int(value, "the rank")
        out = _output(path, output, default_output(path, "resize", rank=str(rank)))
        how = ["--rank", str(rank)]
    elif method in RESIZE_METHODS:
        param = _positive_float(value, f"the {method} parameter")
        out = _output(path, output, default_output(path, "resize", method=method, param=value))
        how = ["--dynamic", method, "--param", repr(param)]
    else:
        raise ValueError(f"unknown resize method {method!r}; choose one of {', '.join(RESIZE_METHODS)}")
    argv = [sys.executable, "-m", "nyx_tui", "lora", "resize", str(path), "-o", str(out), *how, "--json"]
    return argv, out


def convert_command(path: Path, *, target: str, output: str = "") -> tuple[list[str], Path]:
    if target not in CONVERT_TARGETS:
        raise ValueError(f"unknown format {target!r}; choose one of {', '.join(CONVERT_TARGETS)}")
    out = _output(path, output, default_output(path, "convert", target=target))
    return [sys.executable, "-m", "nyx_tui", "lora", "convert", str(path), "-o", str(out), "--to", target], out


def parse_strengths(text: str) -> str:
    """`0, 0.5,1` → `0,0.5,1`; a clear error for anything that is not a list of numbers."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise ValueError("give at least one strength, e.g. 0,0.5,1")
    for p in parts:
        try:
            float(p)
        except ValueError:
            raise ValueError(f"strength {p!r} is not a number; write them as 0,0.5,1") from None
    return ",".join(parts)


def compare_command(path: Path, *, model: str, prompt: str, strengths: str, output: str = "") -> tuple[list[str], Path]:
    if not model.strip():
        raise ValueError("name the base model to compare on (a diffusers folder, a .safetensors file or a hub id)")
    if not prompt.strip():
        raise ValueError("type a prompt for the comparison grid")
    out = _output(path, output, default_output(path, "compare"))
    argv = [
        sys.executable,
        "-m",
        "nyx_tui",
        "lora",
        "compare",
        str(path),
        "--model",
        model.strip(),
        "--prompt",
        prompt.strip(),
        "--strength",
        parse_strengths(strengths),
        "-o",
        str(out),
        "--detach",
    ]
    return argv, out


REPO_RE = re.compile(r"^([A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")  # NAME alone: under the token's user


def upload_command(path: Path, *, repo: str, private: bool) -> list[str]:
    repo = repo.strip()
    if not REPO_RE.match(repo):
        raise ValueError(f"the repo must read OWNER/NAME or NAME (e.g. me/my-lora), not {repo!r}")
    return [sys.executable, "-m", "nyx_tui", "lora", "upload", str(path), "--repo", repo] + (
        ["--private"] if private else []
    )


def compare_job_id(stdout: str) -> str | None:
    """The job id `nyx lora compare --detach` prints on stdout (its last line), or None."""
    for line in reversed(stdout.strip().splitlines()):
        found = JOB_ID_RE.fullmatch(line.strip())
        if found:
            return found.group(0)
    return None


def tool_summary(action: str, stdout: str) -> str:
    """A tool's stdout as shown: `resize --json`'s report boiled down to a line, the rest as printed."""
    text = stdout.strip()
    if action != "resize" or not text.startswith("{"):
        return text
    try:
        report = json.loads(text)
    except ValueError:
        return text
    modules = report.get("modules") or []
    ranks = sorted({int(m["new_rank"]) for m in modules if isinstance(m, dict) and isinstance(m.get("new_rank"), int)})
    parts = [f"{len(modules)} modules"]
    if ranks:
        parts.append("new rank " + (f"{ranks[0]}" if len(ranks) == 1 else f"{ranks[0]}–{ranks[-1]}"))
    if isinstance(report.get("mean_fro_retained"), int | float):
        parts.append(f"mean Frobenius norm kept {report['mean_fro_retained']:.1%}")
    if report.get("old_size") is not None and report.get("new_size") is not None:
        parts.append(f"sum of ranks {report['old_size']} → {report['new_size']}")
    return ", ".join(parts)


# ---------------------------------------------------------------------------------------------- showing an inspection


def _fmt_size(n: Any) -> str:
    if not isinstance(n, int | float):
        return "?"
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"  # pragma: no cover


def _fmt_value(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k}={_fmt_value(v)}" for k, v in value.items())
    if isinstance(value, list | tuple):
        return ", ".join(_fmt_value(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    return "" if value is None else str(value)


def _fmt_summary(summary: Any) -> str:
    """A per-module number (`inspect.Summary` as JSON): `4`, or `2–16 (most often 8)`."""
    if not isinstance(summary, dict) or summary.get("min") is None:
        return "?"
    lo, hi, common = summary["min"], summary["max"], summary.get("most_common")
    if lo == hi:
        return _fmt_value(lo)
    return f"{_fmt_value(lo)}–{_fmt_value(hi)} (most often {_fmt_value(common)})"


def summary_text(path: Path, info: dict[str, Any]) -> Text:
    """The inspection's headline: file, family, network kind, key format, size, ranks and alphas, problems."""
    t = Text()
    t.append(f"{path.name}\n", style="bold")
    if str(path.parent) != ".":
        t.append(f"{path.parent}\n", style="dim")
    family = info.get("family") or "unknown"
    if info.get("family_source") in ("metadata", "keys"):
        family += f"  (from the {info['family_source']})"
    components = info.get("components") or {}
    modules = f"{len(info.get('modules') or [])}"
    if isinstance(components, dict) and components:
        modules += "  (" + ", ".join(f"{k} {v}" for k, v in components.items()) + ")"
    dtypes = info.get("dtypes") or {}
    rows: list[tuple[str, str]] = [
        ("Family", family),
        ("Kind", str(info.get("network") or "?")),
        ("Keys", str(info.get("key_format") or "?")),
        ("Size", _fmt_size(info.get("file_size"))),
        ("Modules", modules),
        ("Parameters", f"{info['parameters']:,}" if isinstance(info.get("parameters"), int) else "?"),
        ("Rank", _fmt_summary(info.get("rank"))),
        ("Alpha", _fmt_summary(info.get("alpha"))),
        ("Dtypes", ", ".join(f"{k} {v}" for k, v in dtypes.items()) if isinstance(dtypes, dict) else "?"),
    ]
    title = (info.get("metadata") or {}).get("modelspec.title")
    if title:
        rows.insert(0, ("Title", str(title)))
    for label, value in rows:
        t.append(f"{label:>11}: ", style="bold")
        t.append(f"{value}\n")
    for problem in info.get("problems") or []:
        t.append(f"! {problem}\n", style="yellow")
    return t


def training_rows(info: dict[str, Any]) -> list[tuple[str, str]]:
    params = info.get("training") or {}
    if not isinstance(params, dict):
        return []
    return [(str(k), _fmt_value(v)) for k, v in params.items() if v not in (None, "", "None")]


def tag_rows(info: dict[str, Any], limit: int = TOP_TAGS) -> list[tuple[str, int]]:
    """The most frequent tags over all the dataset folders (inspect merges them), as (tag, count)."""
    rows: list[tuple[str, int]] = []
    for item in info.get("tag_frequency") or []:
        if isinstance(item, dict) and isinstance(item.get("count"), int):
            rows.append((str(item.get("tag")), item["count"]))
        elif isinstance(item, list | tuple) and len(item) == 2 and isinstance(item[1], int):
            rows.append((str(item[0]), item[1]))
    return rows[:limit]


TAG_WIDTH = 18  # the tag column of the tag-frequency table (its panel is about 28 columns wide)
MODULE_COLUMNS = ("kind", "rank", "alpha", "name")  # the long name last: the numbers stay in view


def module_rows(info: dict[str, Any]) -> list[tuple[str, ...]]:
    rows = []
    for m in info.get("modules") or []:
        if isinstance(m, dict):
            rows.append(tuple(_fmt_value(m.get(c, "")) for c in MODULE_COLUMNS))
    return rows


def field_id(key: str) -> str:
    return "meta-" + re.sub(r"[^A-Za-z0-9_-]", "_", key)


# ---------------------------------------------------------------------------------------------- the screen


class LoraScreen(Screen[None]):
    """Inspect, edit and transform one LoRA file."""

    DEFAULT_CSS = """
    LoraScreen #lora-top { height: 3; margin: 0 1; }
    LoraScreen #lora-path { width: 1fr; }
    LoraScreen #lora-open { width: 10; }
    LoraScreen #lora-error { height: auto; margin: 0 2; color: $error; }
    LoraScreen #lora-error.-hidden { display: none; }
    LoraScreen #lora-main { height: 1fr; }
    LoraScreen #lora-side { width: 44; border-right: vkey $panel; }
    LoraScreen #lora-files-title { height: 1; padding: 0 1; color: $text-muted; }
    LoraScreen #lora-files { height: 1fr; }
    LoraScreen #lora-tabs { width: 1fr; }
    LoraScreen #lora-summary { height: auto; padding: 0 1; }
    LoraScreen .lora-title { height: 1; margin-top: 1; padding: 0 1; text-style: bold; }
    LoraScreen #lora-modules { height: auto; max-height: 14; }
    LoraScreen #lora-pair { height: auto; }
    LoraScreen #lora-training-col { width: 2fr; height: auto; }
    LoraScreen #lora-tags-col { width: 1fr; height: auto; }
    LoraScreen #lora-training { height: auto; max-height: 16; }
    LoraScreen #lora-tags { height: auto; max-height: 16; }
    LoraScreen .lora-row { height: auto; }
    LoraScreen .lora-row Label { width: 22; padding: 1 1 0 1; }
    LoraScreen .lora-row Input { width: 1fr; }
    LoraScreen .lora-row Select { width: 24; }
    LoraScreen .lora-row Button { margin: 0 1; }
    LoraScreen #meta-status { height: auto; padding: 0 1; }
    LoraScreen #action-status { height: auto; max-height: 12; padding: 0 1; border-top: solid $panel; }
    LoraScreen #upload-token { height: auto; padding: 0 1; color: $text-muted; }
    LoraScreen.-narrow #lora-side { width: 26; }
    LoraScreen.-narrow .lora-row Label { width: 14; }
    LoraScreen.-narrow .lora-row Select { width: 16; }
    """
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (110, "-wide")]  # noqa: RUF012
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("ctrl+o", "focus_path", "Open path", id="nyx.lora.focus_path"),
        Binding("ctrl+s", "save_metadata", "Save metadata", id="nyx.lora.save"),
        Binding("ctrl+r", "reload", "Reload", id="nyx.lora.reload"),
        Binding("f2", "show_tab('tab-inspect')", "Inspect", id="nyx.lora.tab_inspect"),
        Binding("f3", "show_tab('tab-meta')", "Metadata", id="nyx.lora.tab_meta"),
        Binding("f4", "show_tab('tab-tools')", "Tools", id="nyx.lora.tab_tools"),
    ]

    # `seq`: which request a worker answers; an answer to an older request than the last is dropped (a
    # cancelled worker may still post what it had read)
    class Files(Message):
        def __init__(self, files: list[LoraFile], seq: int) -> None:
            super().__init__()
            self.files, self.seq = files, seq

    class Inspected(Message):
        def __init__(self, path: Path, info: dict[str, Any], metadata: dict[str, str], seq: int | None = None) -> None:
            super().__init__()
            self.path, self.info, self.metadata, self.seq = path, info, metadata, seq

    class Failed(Message):
        def __init__(self, path: Path, error: str, seq: int | None = None) -> None:
            super().__init__()
            self.path, self.error, self.seq = path, error, seq

    class Saved(Message):
        def __init__(self, path: Path, metadata: dict[str, str]) -> None:
            super().__init__()
            self.path, self.metadata = path, metadata

    class ToolDone(Message):
        def __init__(self, action: str, ok: bool, output: str, produced: Path | None, job_id: str | None) -> None:
            super().__init__()
            self.action, self.ok, self.output, self.produced, self.job_id = action, ok, output, produced, job_id

    def __init__(self, path: Path | str | None = None) -> None:
        super().__init__()
        self.initial = Path(path) if path else None
        self.path: Path | None = None  # the file shown (inspected without error)
        self.info: dict[str, Any] | None = None
        self.metadata: dict[str, str] = {}
        self.files: list[LoraFile] = []
        self.error: str | None = None
        self.busy: str | None = None  # the tool running now
        self.tools_done = 0  # tool runs that have ended (tests wait on it)
        self._files_seq = 0
        self._inspect_seq = 0
        self.last_command: list[str] | None = None  # the argv of the last tool started (tests, the status line)

    # ------------------------------------------------------------------ layout
    def compose(self) -> ComposeResult:
        from nyx_tui.lora.metadata import EDITABLE_FIELDS

        with Horizontal(id="lora-top"):
            yield Input(placeholder="path to a LoRA .safetensors file (enter opens it)", id="lora-path")
            yield Button("Open", id="lora-open")
        yield Static("", id="lora-error", classes="-hidden")
        with Horizontal(id="lora-main"):
            with Vertical(id="lora-side"):
                yield Static("LoRA files (recent, then finished jobs)", id="lora-files-title")
                yield OptionList(id="lora-files")
            with TabbedContent(id="lora-tabs", initial="tab-inspect"):
                with TabPane("Inspect", id="tab-inspect"), VerticalScroll():
                    yield Static("Open a LoRA file: type its path above or pick one on the left.", id="lora-summary")
                    yield Static("Modules", classes="lora-title")
                    yield DataTable(id="lora-modules", zebra_stripes=True, cursor_type="row")
                    with Horizontal(id="lora-pair"):
                        with Vertical(id="lora-training-col"):
                            yield Static("Training parameters", classes="lora-title")
                            yield DataTable(id="lora-training", cursor_type="row")
                        with Vertical(id="lora-tags-col"):
                            yield Static("Tag frequencies", classes="lora-title")
                            yield DataTable(id="lora-tags", cursor_type="row")
                with TabPane("Metadata", id="tab-meta"), VerticalScroll():
                    for key, label in EDITABLE_FIELDS:
                        with Horizontal(classes="lora-row"):
                            yield Label(label)
                            yield Input(id=field_id(key), placeholder=key)
                    with Horizontal(classes="lora-row"):
                        yield Button("Save (ctrl+s)", id="meta-save", variant="primary")
                    yield Static("", id="meta-status")
                with TabPane("Tools", id="tab-tools"), VerticalScroll():
                    yield Static("Resize", classes="lora-title")
                    with Horizontal(classes="lora-row"):
                        yield Select(
                            [(m, m) for m in RESIZE_METHODS], value="rank", allow_blank=False, id="resize-method"
                        )
                        yield Input(placeholder="rank (e.g. 8) or the method's parameter", id="resize-value")
                    with Horizontal(classes="lora-row"):
                        yield Input(placeholder="output (empty: beside the input)", id="resize-out")
                        yield Button("Resize", id="resize-run")
                    yield Static("Convert", classes="lora-title")
                    with Horizontal(classes="lora-row"):
                        yield Select(
                            [(t, t) for t in CONVERT_TARGETS], value="kohya", allow_blank=False, id="convert-to"
                        )
                        yield Input(placeholder="output (empty: beside the input)", id="convert-out")
                        yield Button("Convert", id="convert-run")
                    yield Static("Compare (a job: a grid of samples at each strength)", classes="lora-title")
                    with Horizontal(classes="lora-row"):
                        yield Input(
                            placeholder="base model: diffusers folder, .safetensors or hub id", id="compare-model"
                        )
                    with Horizontal(classes="lora-row"):
                        yield Input(placeholder="prompt", id="compare-prompt")
                        yield Input(value="0,0.5,1", placeholder="strengths", id="compare-strengths")
                        yield Button("Compare", id="compare-run")
                    yield Static("Upload to the Hugging Face hub", classes="lora-title")
                    with Horizontal(classes="lora-row"):
                        yield Input(placeholder="OWNER/NAME", id="upload-repo")
                        yield Checkbox("private", value=True, id="upload-private")
                        yield Button("Upload", id="upload-run")
                    yield Static("", id="upload-token")
                    yield Static("", id="action-status")
        yield Footer()

    def on_mount(self) -> None:
        for table_id, columns in (
            ("#lora-modules", MODULE_COLUMNS),
            ("#lora-training", ("parameter", "value")),
        ):
            self.query_one(table_id, DataTable).add_columns(*columns)
        # fixed widths: an auto-sized header could be drawn before the rows widen it (a stale header line)
        tags = self.query_one("#lora-tags", DataTable)
        tags.add_column("tag", width=TAG_WIDTH)
        tags.add_column("count", width=6)
        self.query_one("#upload-token", Static).update(self._token_text())
        self.refresh_files()
        if self.initial is not None:
            self.open_path(self.initial)
            self.initial = None
        self.take_request()
        if self.path is None:
            self.query_one("#lora-path", Input).focus()

    def on_screen_resume(self) -> None:
        self.take_request()
        self.refresh_files()

    def take_request(self) -> None:
        """Open the file the App was asked to show (`NyxApp.open_lora`), once."""
        request = getattr(self.app, "lora_request", None)
        if request:
            self.app.lora_request = None  # type: ignore[attr-defined]
            self.open_path(Path(request))

    @staticmethod
    def _token_text() -> str:
        from nyx_tui.settings import get_secret, secrets_path

        if get_secret("HF_TOKEN"):
            return "token: HF_TOKEN found (environment or secrets.toml); it is never shown or put in argv"
        return f'no token: set HF_TOKEN, or put HF_TOKEN = "…" in {secrets_path()} (chmod 600)'

    # ------------------------------------------------------------------ the file list
    def refresh_files(self) -> None:
        self._files_seq += 1
        self._read_files(self._files_seq)

    @work(thread=True, exclusive=True, group="lora-files", exit_on_error=False)
    def _read_files(self, seq: int) -> None:
        try:
            files = list_files()
        except Exception as e:  # a half-written job folder: say so, the next refresh reads it again
            self.app.call_from_thread(self.notify, f"could not list the jobs' LoRA files: {e}", severity="warning")
            return
        self.post_message(self.Files(files, seq))

    def on_lora_screen_files(self, message: Files) -> None:
        if message.seq != self._files_seq:
            return
        self.files = message.files
        view = self.query_one("#lora-files", OptionList)
        highlighted = view.highlighted
        view.clear_options()
        if not message.files:
            view.add_option(Option("no LoRA files yet: finished runs and opened files show here", disabled=True))
            return
        view.add_options(
            Option(Text(f.label, no_wrap=True, overflow="ellipsis"), id=str(i)) for i, f in enumerate(message.files)
        )
        if highlighted is not None and highlighted < len(message.files):
            view.highlighted = highlighted

    @on(OptionList.OptionSelected, "#lora-files")
    def _file_picked(self, event: OptionList.OptionSelected) -> None:
        if event.option.id is not None:
            self.open_path(self.files[int(event.option.id)].path)

    # ------------------------------------------------------------------ opening
    def action_focus_path(self) -> None:
        field = self.query_one("#lora-path", Input)
        field.focus()
        field.select_all()

    @on(Input.Submitted, "#lora-path")
    def _path_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self._open_typed()

    @on(Button.Pressed, "#lora-open")
    def _open_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        self._open_typed()

    def _open_typed(self) -> None:
        text = self.query_one("#lora-path", Input).value.strip()
        if not text:
            self.show_error("type the path of a LoRA .safetensors file")
            return
        self.open_path(Path(text).expanduser())

    def open_path(self, path: Path) -> None:
        """Read `path` in a worker; the result arrives as Inspected or Failed."""
        self.query_one("#lora-path", Input).value = str(path)
        if path != self.path:  # a re-read after a save keeps "saved, tensors unchanged" in view
            self.query_one("#meta-status", Static).update("")
        self.query_one("#lora-summary", Static).update(f"reading {path} …")
        self._inspect_seq += 1
        self._inspect(path, self._inspect_seq)

    def action_reload(self) -> None:
        if self.path is not None:
            self.open_path(self.path)

    @work(thread=True, exclusive=True, group="lora-inspect", exit_on_error=False)
    def _inspect(self, path: Path, seq: int) -> None:
        from nyx_tui.lora.header import LoraFileError
        from nyx_tui.lora.inspect import inspect_lora
        from nyx_tui.lora.metadata import read_metadata

        try:
            info = inspect_lora(path).to_json()
            metadata = read_metadata(path)
        except LoraFileError as e:
            self.post_message(self.Failed(path, str(e), seq))
            return
        except OSError as e:
            self.post_message(self.Failed(path, f"{path}: {e.strerror or e}", seq))
            return
        except Exception as e:  # a bug in a reader must not close the screen
            self.post_message(self.Failed(path, f"{path}: could not be read ({type(e).__name__}: {e})", seq))
            return
        if get_current_worker().is_cancelled:
            return
        with contextlib.suppress(OSError):
            remember(path)
        self.post_message(self.Inspected(path, info, metadata, seq))

    def show_error(self, text: str | None) -> None:
        self.error = text
        widget = self.query_one("#lora-error", Static)
        widget.update(text or "")
        widget.set_class(text is None, "-hidden")

    def on_lora_screen_failed(self, message: Failed) -> None:
        if message.seq is not None and message.seq != self._inspect_seq:
            return
        self.show_error(message.error)
        if self.path is not None and self.info is not None and self.path != message.path:
            # another file stays open: show it again in place of "reading …"
            self.query_one("#lora-summary", Static).update(summary_text(self.path, self.info))
            return
        self.path, self.info = None, None
        self.query_one("#lora-summary", Static).update("No file open.")
        for table_id in ("#lora-modules", "#lora-training", "#lora-tags"):
            self.query_one(table_id, DataTable).clear()

    def on_lora_screen_inspected(self, message: Inspected) -> None:
        if message.seq is not None and message.seq != self._inspect_seq:
            return
        self.show_error(None)
        self.path, self.info, self.metadata = message.path, message.info, dict(message.metadata)
        self.query_one("#lora-summary", Static).update(summary_text(message.path, message.info))
        modules = self.query_one("#lora-modules", DataTable)
        modules.clear()
        modules.add_rows(module_rows(message.info))
        training = self.query_one("#lora-training", DataTable)
        training.clear()
        training.add_rows(training_rows(message.info))
        tags = self.query_one("#lora-tags", DataTable)
        tags.clear()
        tags.add_rows(tag_rows(message.info))
        self._fill_form(message.metadata)
        self.refresh_files()

    # ------------------------------------------------------------------ metadata
    def _fill_form(self, metadata: dict[str, str]) -> None:
        from nyx_tui.lora.metadata import EDITABLE_FIELDS

        for key, _label in EDITABLE_FIELDS:
            self.query_one(f"#{field_id(key)}", Input).value = metadata.get(key, "")

    def form_updates(self) -> dict[str, str | None]:
        """What the form changed: new values, and None for a field emptied (the key is removed)."""
        from nyx_tui.lora.metadata import EDITABLE_FIELDS

        updates: dict[str, str | None] = {}
        for key, _label in EDITABLE_FIELDS:
            value = self.query_one(f"#{field_id(key)}", Input).value.strip()
            old = self.metadata.get(key)
            if value and value != old:
                updates[key] = value
            elif not value and old:
                updates[key] = None
        return updates

    def action_save_metadata(self) -> None:
        if self.path is None:
            self.notify("open a LoRA file first", severity="warning")
            return
        updates = self.form_updates()
        if not updates:
            self.query_one("#meta-status", Static).update("nothing changed")
            return
        self.query_one("#meta-status", Static).update("saving …")
        self._save(self.path, updates)

    @on(Button.Pressed, "#meta-save")
    def _save_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        self.action_save_metadata()

    @work(thread=True, exclusive=True, group="lora-save", exit_on_error=False)
    def _save(self, path: Path, updates: dict[str, str | None]) -> None:
        from nyx_tui.lora.header import LoraFileError
        from nyx_tui.lora.metadata import read_metadata, write_metadata

        try:
            written = write_metadata(path, updates)
            metadata = read_metadata(written)
        except (LoraFileError, OSError, ValueError) as e:
            self.post_message(self.Failed(path, f"metadata not saved: {e}"))
            self.app.call_from_thread(self.query_one("#meta-status", Static).update, "not saved (see above)")
            return
        self.post_message(self.Saved(written, metadata))

    def on_lora_screen_saved(self, message: Saved) -> None:
        self.show_error(None)
        if message.path == self.path:
            self.metadata = dict(message.metadata)
            self._fill_form(message.metadata)
        self.query_one("#meta-status", Static).update(
            Text(f"saved, tensors unchanged ({message.path.name})", style="green")
        )
        self.notify(f"saved the metadata of {message.path.name}; the tensors are unchanged", title="metadata")
        self.open_path(message.path)

    # ------------------------------------------------------------------ tools
    def _need_file(self) -> Path | None:
        if self.path is None:
            self.notify("open a LoRA file first", severity="warning")
            return None
        if self.busy:
            self.notify(f"{self.busy} is still running; wait for it", severity="warning")
            return None
        return self.path

    def _value(self, selector: str) -> str:
        return self.query_one(selector, Input).value

    def _selected(self, selector: str) -> str:
        value = self.query_one(selector, Select).value
        return "" if value is Select.NULL else str(value)

    @on(Button.Pressed, "#resize-run")
    def _resize_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        path = self._need_file()
        if path is None:
            return
        try:
            argv, out = resize_command(
                path,
                method=self._selected("#resize-method"),
                value=self._value("#resize-value"),
                output=self._value("#resize-out"),
            )
        except ValueError as e:
            self._refuse("resize", e)
            return
        self.start_tool("resize", argv, out)

    @on(Button.Pressed, "#convert-run")
    def _convert_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        path = self._need_file()
        if path is None:
            return
        try:
            argv, out = convert_command(path, target=self._selected("#convert-to"), output=self._value("#convert-out"))
        except ValueError as e:
            self._refuse("convert", e)
            return
        self.start_tool("convert", argv, out)

    @on(Button.Pressed, "#compare-run")
    def _compare_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        path = self._need_file()
        if path is None:
            return
        try:
            argv, _out = compare_command(
                path,
                model=self._value("#compare-model"),
                prompt=self._value("#compare-prompt"),
                strengths=self._value("#compare-strengths"),
            )
        except ValueError as e:
            self._refuse("compare", e)
            return
        self.start_tool("compare", argv, None)

    @on(Button.Pressed, "#upload-run")
    def _upload_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        path = self._need_file()
        if path is None:
            return
        try:
            argv = upload_command(
                path, repo=self._value("#upload-repo"), private=self.query_one("#upload-private", Checkbox).value
            )
        except ValueError as e:
            self._refuse("upload", e)
            return
        self.query_one("#upload-token", Static).update(self._token_text())
        self.start_tool("upload", argv, None)

    def _refuse(self, action: str, error: Exception) -> None:
        self.query_one("#action-status", Static).update(Text(f"{action}: {error}", style="bold red"))
        self.notify(str(error), title=f"{action} not started", severity="error")

    def start_tool(self, action: str, argv: list[str], produced: Path | None) -> None:
        self.busy = action
        self.last_command = argv
        shown = " ".join(argv[2:]) if argv[:2] == [sys.executable, "-m"] else " ".join(argv)
        status = self.query_one("#action-status", Static)
        status.update(Text(f"{action}: running  {shown} …", style="bold"))
        status.scroll_visible(animate=False)
        self._run_tool(action, argv, produced)

    @work(thread=True, group="lora-tool", exit_on_error=False)
    def _run_tool(self, action: str, argv: list[str], produced: Path | None) -> None:
        worker = get_current_worker()
        env = {**os.environ, "COLUMNS": "160"}  # rich wraps a pipe's output at 80
        try:
            proc = subprocess.Popen(
                argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL, env=env
            )
        except OSError as e:
            self.post_message(self.ToolDone(action, False, f"could not start: {e}", None, None))
            return
        while True:
            try:
                stdout, stderr = proc.communicate(timeout=0.2)
                break
            except subprocess.TimeoutExpired:
                if worker.is_cancelled:  # the app is closing: do not leave the child behind
                    proc.kill()
                    proc.communicate()
                    return
        ok = proc.returncode == 0
        job_id = None
        if ok and action == "compare":
            job_id = compare_job_id(stdout)
        output = "\n".join(x for x in (tool_summary(action, stdout), stderr.strip()) if x)
        self.post_message(self.ToolDone(action, ok, output, produced if ok else None, job_id))

    def on_lora_screen_tool_done(self, message: ToolDone) -> None:
        self.busy = None
        self.tools_done += 1
        tail = message.output.strip()[-OUTPUT_TAIL:]
        status = self.query_one("#action-status", Static)
        if not message.ok:
            text = Text(f"{message.action} failed\n", style="bold red")
            text.append(tail or "(no output)")
            status.update(text)
            self.notify(
                tail.splitlines()[-1] if tail else "see the output", title=f"{message.action} failed", severity="error"
            )
            return
        text = Text(f"{message.action}: done\n", style="bold green")
        if message.produced is not None:
            text.append(f"wrote {message.produced}\n")
            with contextlib.suppress(OSError):
                remember(message.produced)
            self.refresh_files()
        if message.job_id:
            text.append(f"started job {message.job_id} (the dashboard shows it)\n")
        text.append(tail, style="dim")
        status.update(text)
        status.scroll_visible(animate=False)
        self.notify(
            f"{message.action} done" + (f": {message.produced}" if message.produced else ""), title="LoRA tools"
        )
        if message.job_id:
            from nyx_tui.screens.messages import OpenJob

            self.post_message(OpenJob(message.job_id))

    # ------------------------------------------------------------------ tabs
    def action_show_tab(self, tab: str) -> None:
        self.query_one("#lora-tabs", TabbedContent).active = tab


__all__ = [
    "LoraFile",
    "LoraScreen",
    "compare_command",
    "compare_job_id",
    "convert_command",
    "job_loras",
    "list_files",
    "resize_command",
    "upload_command",
]
