"""NyxApp: the Textual application. It owns state (the current job, the theme, the keymap) and starts
jobs; screens only show things and post requests (`screens.messages`).

Modes: `home` (the jobs table), `config` (the config form) and `train` (the live dashboard, which follows
`current_job`). Blocking work (the pre-flight check, building the demo workspace, spawning a supervisor)
runs in thread workers that report back with notifications and by setting `current_job`; a failure is a
notification, never a crash. Jobs run detached in their own session: closing the app, even by losing
the terminal, never touches them.

Keys: every binding has an id so `<config>/keymap.toml` can remap it (`[keys]` "nyx.quit" = "ctrl+x").
Themes: Nyx's themes come from TOML files (`nyx_tui.themes`), registered beside Textual's own; the choice
persists in `<config>/settings.toml`.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import select
import signal
import sys
import termios
import threading
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from textual import work
from textual.app import App, SystemCommand
from textual.binding import Binding, BindingType
from textual.command import DiscoveryHit, Hit, Hits, Provider
from textual.dom import DOMNode
from textual.reactive import reactive
from textual.screen import Screen
from textual.widgets import Footer, Static

from nyx_tui import paths
from nyx_tui.screens.home import HomeScreen
from nyx_tui.screens.messages import ControlJob, OpenJob, StartDemo, StartTraining
from nyx_tui.settings import Settings, load_keymap, load_settings, save_settings
from nyx_tui.themes import DEFAULT_THEME, NO_COLOR_THEME, load_themes

if TYPE_CHECKING:
    from nyx_tui.config.model import TrainingConfig

MODE_TITLES = {
    "home": "Jobs",
    "config": "Config",
    "train": "Dashboard",
    "datasets": "Datasets",
    "tags": "Tags",
    "downloads": "Downloads",
    "lora": "LoRA",
}
STDIN_CHECK_S = 1.0
EOF_CHECKS = 3  # readable-but-empty this many checks in a row = EOF (one could be a race with a read)
HANGUP_GRACE_S = 5.0
HANGUP_EXIT_CODE = 129  # 128 + SIGHUP, as a shell reports it


class Unavailable(Screen[None]):
    """Stands in for a screen whose module failed to import, so one broken area does not close the app."""

    def __init__(self, what: str, error: BaseException) -> None:
        super().__init__()
        self.what, self.error = what, error

    def compose(self) -> Any:
        yield Static(content=f"The {self.what} screen could not be loaded:\n{type(self.error).__name__}: {self.error}")
        yield Footer()


def make_config_screen(path: Path | None = None, preset: str | None = None) -> Screen[Any]:
    """The config form, imported when first shown: the form generator is the heaviest screen."""
    try:
        from nyx_tui.screens.config import ConfigScreen
    except ImportError as e:
        return Unavailable("config", e)
    return ConfigScreen(path=path, preset=preset)


def make_dashboard_screen(job_id: str | None = None) -> Screen[Any]:
    try:
        from nyx_tui.screens.dashboard import DashboardScreen
    except ImportError as e:
        return Unavailable("dashboard", e)
    return DashboardScreen(job_id=job_id)


def make_workflow_screen(job_id: str | None = None) -> Screen[Any]:
    """The view of a workflow or sweep job (its stages, a sweep's comparison table)."""
    try:
        from nyx_tui.screens.workflow import WorkflowScreen
    except ImportError as e:
        return Unavailable("workflow", e)
    return WorkflowScreen(job_id)


WORKFLOW_KINDS = frozenset({"workflow", "sweep"})


def job_kind(job_id: str) -> str | None:
    """The `kind` in a job's spec.json, or None when it cannot be read (the caller falls back to the dashboard)."""
    import json

    try:
        spec = json.loads((paths.jobs_dir() / job_id / "spec.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    kind = spec.get("kind") if isinstance(spec, dict) else None
    return kind if isinstance(kind, str) else None


def make_datasets_screen() -> Screen[Any]:
    try:
        from nyx_tui.screens.datasets import DatasetsScreen
    except ImportError as e:
        return Unavailable("datasets", e)
    return DatasetsScreen()


def make_tags_screen() -> Screen[Any]:
    try:
        from nyx_tui.screens.tags import TagsScreen
    except ImportError as e:
        return Unavailable("tags", e)
    return TagsScreen()


def make_downloads_screen() -> Screen[Any]:
    try:
        from nyx_tui.screens.downloads import DownloadsScreen
    except ImportError as e:
        return Unavailable("downloads", e)
    return DownloadsScreen()


def make_lora_screen() -> Screen[Any]:
    try:
        from nyx_tui.screens.lora import LoraScreen
    except ImportError as e:
        return Unavailable("LoRA", e)
    return LoraScreen()


def known_binding_ids() -> set[str]:
    """Every binding id declared by a loaded Textual class (the app, every screen and widget), so a
    keymap entry that matches none can be reported instead of silently doing nothing."""
    for module in (
        "nyx_tui.screens.config",
        "nyx_tui.screens.dashboard",
        "nyx_tui.screens.datasets",
        "nyx_tui.screens.tags",
        "nyx_tui.screens.downloads",
        "nyx_tui.screens.lora",
        "nyx_tui.screens.templates",
        "nyx_tui.screens.workflow",
    ):
        with contextlib.suppress(ImportError):
            __import__(module)
    ids: set[str] = set()
    stack: list[type] = [DOMNode]
    seen: set[type] = set()
    while stack:
        cls = stack.pop()
        if cls in seen:
            continue
        seen.add(cls)
        stack.extend(cls.__subclasses__())
        for binding in getattr(cls, "BINDINGS", []) or []:
            if isinstance(binding, Binding) and binding.id:
                ids.add(binding.id)
    return ids


class NyxCommands(Provider):
    """The command palette's Nyx commands: every action of the app, searchable by name."""

    async def startup(self) -> None:
        from nyx_tui.config.presets import list_presets
        from nyx_tui.jobs.store import Store

        app = self.app
        assert isinstance(app, NyxApp)

        def gather() -> tuple[list[str], list[dict[str, Any]]]:
            try:
                presets = list_presets()
            except Exception:
                presets = []
            try:
                jobs = Store().all()
            except Exception:
                jobs = []
            return presets, jobs

        presets, jobs = await asyncio.to_thread(gather)
        self.commands: list[tuple[str, str, Callable[[], Any]]] = app.palette_commands(presets, jobs)

    async def discover(self) -> Hits:
        for text, help_text, callback in self.commands:
            yield DiscoveryHit(text, callback, help=help_text)

    async def search(self, query: str) -> Hits:
        matcher = self.matcher(query)
        for text, help_text, callback in self.commands:
            score = matcher.match(text)
            if score > 0:
                yield Hit(score, matcher.highlight(text), callback, text=text, help=help_text)


class NyxApp(App[None]):
    """Nyx's terminal UI."""

    TITLE = "Nyx"
    CSS = """
    Toast { max-width: 80; }
    """
    MODES: ClassVar[dict[str, str | Callable[[], Screen[Any]]]] = {
        "home": HomeScreen,
        "config": make_config_screen,
        "train": make_dashboard_screen,
        "datasets": make_datasets_screen,
        "tags": make_tags_screen,
        "downloads": make_downloads_screen,
        "lora": make_lora_screen,
        "workflow": make_workflow_screen,  # replaced by open_job for each workflow/sweep job opened
    }
    DEFAULT_MODE = "home"
    COMMANDS = App.COMMANDS | {NyxCommands}
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("1", "switch_mode('home')", "Jobs", id="nyx.mode.home"),
        Binding("2", "switch_mode('config')", "Config", id="nyx.mode.config"),
        Binding("3", "switch_mode('train')", "Dashboard", id="nyx.mode.train"),
        Binding("4", "switch_mode('datasets')", "Datasets", id="nyx.mode.datasets"),
        Binding("5", "switch_mode('tags')", "Tags", id="nyx.mode.tags"),
        Binding("6", "switch_mode('downloads')", "Downloads", id="nyx.mode.downloads"),
        Binding("7", "switch_mode('lora')", "LoRA", id="nyx.mode.lora", show=False),  # footer full: F1 lists it
        Binding("ctrl+t", "change_theme", "Theme", id="nyx.theme", show=False),
        Binding("f1", "toggle_keys", "Keys", id="nyx.keys"),
        Binding("ctrl+p", "command_palette", "Palette", id="nyx.palette", priority=True, show=False),
        Binding("ctrl+q", "quit", "Quit", id="nyx.quit", priority=True),
        Binding("ctrl+c", "help_quit", show=False, system=True, id="nyx.help_quit"),
    ]

    current_job: reactive[str | None] = reactive(None)
    """The job the dashboard shows; set by OpenJob and by starting a job."""

    def __init__(self, job_id: str | None = None, *, watch_terminal: bool = True) -> None:
        super().__init__()
        self.initial_job = job_id
        self.watch_terminal = watch_terminal
        self.settings, self._startup_problems = load_settings()
        loaded = load_themes(paths.config_dir() / "themes")
        self._startup_problems += loaded.problems
        for theme in loaded.themes:
            self.register_theme(theme)
        # NO_COLOR: Textual turns every color to grey (its Monochrome filter). Many themes become mush
        # in grey, so render with the high-contrast one, whose greys stay far apart, without saving it.
        if self.no_color:
            self.theme = NO_COLOR_THEME
        elif self.settings.theme in self.available_themes:
            self.theme = self.settings.theme
        else:
            self._startup_problems.append(f"theme {self.settings.theme!r} is not installed; using {DEFAULT_THEME}")
            self.theme = DEFAULT_THEME
        keymap, problems = load_keymap()
        self._startup_problems += problems
        if keymap:
            known = known_binding_ids()
            unknown = sorted(set(keymap) - known)
            if unknown:
                self._startup_problems.append(
                    f"keymap.toml: no binding has the id {', '.join(map(repr, unknown))}; see docs/tui.md for the ids"
                )
            self.set_keymap({k: v for k, v in keymap.items() if k in known})
        self._starting = False
        self.lora_request: Path | None = None  # a file for the LoRA screen to open (open_lora)
        self._eof_count = 0
        self._hung_up = False

    # ------------------------------------------------------------------ life cycle
    def on_mount(self) -> None:
        for problem in self._startup_problems:
            self.notify(problem, title="settings", severity="warning", timeout=10)
        self.theme_changed_signal.subscribe(self, self._theme_changed)
        if self.initial_job:
            self.open_job(self.initial_job)
        if self.watch_terminal and not self.is_headless:
            self._install_terminal_guards()

    def _theme_changed(self, _theme: Any) -> None:
        if self.no_color or self.theme == self.settings.theme:
            return
        self.settings = Settings.model_validate({**self.settings.model_dump(), "theme": self.theme})
        try:
            save_settings(self.settings)
        except OSError as e:
            self.notify(f"could not save the theme choice: {e}", severity="warning")

    # ------------------------------------------------------------------ terminal gone
    def _install_terminal_guards(self) -> None:
        """Exit when the terminal goes away. SIGHUP is the polite way; an SSH drop can instead leave
        stdin at EOF with no signal, and Textual's input thread then spins at 100% CPU forever."""
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self._hangup, "SIGHUP")
        self.set_interval(STDIN_CHECK_S, self._check_stdin, name="nyx-stdin-check")

    def _check_stdin(self) -> None:
        reason = stdin_gone(self._eof_count)
        if reason == "eof?":
            self._eof_count += 1
            if self._eof_count >= EOF_CHECKS:
                self._hangup("stdin at EOF")
        elif reason:
            self._hangup(reason)
        else:
            self._eof_count = 0

    def _hangup(self, why: str) -> None:
        """Leave without touching jobs. Restoring a terminal that is gone can block or fail, so a timer
        ends the process outright if the orderly exit has not finished in a few seconds."""
        if self._hung_up:
            return
        self._hung_up = True
        timer = threading.Timer(HANGUP_GRACE_S, os._exit, args=(HANGUP_EXIT_CODE,))
        timer.daemon = True
        timer.start()
        self.exit(return_code=HANGUP_EXIT_CODE, message=None)

    # ------------------------------------------------------------------ actions
    def action_toggle_keys(self) -> None:
        if self.screen.query("HelpPanel"):
            self.action_hide_help_panel()
        else:
            self.action_show_help_panel()

    async def open_config(self, preset: str | None = None, path: Path | None = None) -> None:
        """Show a fresh config form for `preset` (or `path`): the config mode's screen is replaced."""
        if self.current_mode == "config":
            await self.switch_mode("home")
        await self.remove_mode("config")
        self.add_mode("config", partial(make_config_screen, path, preset))
        await self.switch_mode("config")

    def open_job(self, job_id: str) -> None:
        """Show a job: a workflow or sweep in its own view (`open_workflow`), any other in the dashboard."""
        if job_kind(job_id) in WORKFLOW_KINDS:
            self.call_later(self.open_workflow, job_id)
            return
        self.current_job = job_id
        self.switch_mode("train")

    async def open_workflow(self, job_id: str) -> None:
        """Show the workflow view of `job_id`: the workflow mode's screen is replaced, like open_config's."""
        if self.current_mode == "workflow":
            await self.switch_mode("home")
        await self.remove_mode("workflow")
        self.add_mode("workflow", partial(make_workflow_screen, job_id))
        await self.switch_mode("workflow")

    async def open_templates(self) -> None:
        """The config form with its templates library on top (the command palette's "Templates library")."""
        if self.current_mode != "config":
            await self.switch_mode("config")
        action = getattr(self.screen, "action_templates", None)
        if callable(action):
            action()

    def open_lora(self, path: Path) -> None:
        """Show the LoRA screen on `path` (the dashboard's "LoRA tools" key). The screen takes the request
        when it is mounted or shown again (`LoraScreen.take_request`)."""
        self.lora_request = Path(path)
        if self.current_mode == "lora":
            take = getattr(self.screen, "take_request", None)
            if callable(take):
                take()
        else:
            self.switch_mode("lora")

    # ------------------------------------------------------------------ messages from screens
    def on_open_job(self, message: OpenJob) -> None:
        self.open_job(message.job_id)

    def on_control_job(self, message: ControlJob) -> None:
        from nyx_tui.jobs.control import ControlError, send
        from nyx_tui.jobs.jobdir import TERMINAL, find_job

        try:
            job = find_job(message.job_id)
            state = job.effective_state()
            if state in TERMINAL:
                self.notify(f"{job.id} has already ended ({state})")
                return
            if state == "queued" and message.command in ("stop", "cancel"):
                from nyx_tui.jobs.queue import cancel_queued

                if cancel_queued(job):  # never started: nothing to save, and it must not start now
                    self.notify(f"cancelled {job.id} before it started", title="queue")
                    return
            send(job.control_path, message.command)
        except (LookupError, ControlError, OSError) as e:
            self.notify(str(e), title=f"could not send {message.command}", severity="error")
            return
        self.notify(f"asked {job.id} to {message.command}", title=message.command)

    def on_start_training(self, message: StartTraining) -> None:
        if self._refuse_if_starting():
            return
        self._start_training(message.config, message.queue)

    def on_start_demo(self, message: StartDemo) -> None:
        if self._refuse_if_starting():
            return
        self.notify("building the demo workspace (tiny model, synthetic images)…", title="demo")
        self._start_demo()

    def _refuse_if_starting(self) -> bool:
        if self._starting:
            self.notify("a job is being started; wait a moment", severity="warning")
            return True
        self._starting = True
        return False

    @work(thread=True, group="start", exit_on_error=False)
    def _start_training(self, config: TrainingConfig, queue: bool = False) -> None:
        try:
            self._launch(config, queue)
        finally:
            self._starting = False

    @work(thread=True, group="start", exit_on_error=False)
    def _start_demo(self) -> None:
        from nyx_tui import demo
        from nyx_tui.config.io import load_config

        try:
            ws = demo.workspace()
            demo.prepare_workspace(ws)
            config = load_config(demo.write_config(ws))
            self._launch(config)
        except Exception as e:
            self._notify_from_thread(f"{type(e).__name__}: {e}", title="the demo did not start", severity="error")
        finally:
            self._starting = False

    def _launch(self, config: TrainingConfig, queue: bool = False) -> None:
        """Check, create, spawn, wait until the supervisor has the job, then show it; or, with `queue`,
        hand it to the scheduler and show the jobs list. Runs in a thread."""
        from nyx_tui.config.check import check_config
        from nyx_tui.jobs import launch
        from nyx_tui.jobs.store import Store, job_summary
        from nyx_tui.trainers.base import create_training_job

        try:
            problems = check_config(config)
            errors = [p for p in problems if p.is_error]
            if errors:
                text = "\n".join(f"• {p.field}: {p.message}\n  fix: {p.fix}" for p in errors[:6])
                more = f"\n…and {len(errors) - 6} more" if len(errors) > 6 else ""
                self._notify_from_thread(text + more, title="not started: fix the config", severity="error")
                return
            job = create_training_job(config, queue=queue)
            if queue:
                from nyx_tui.jobs.queue import enqueue

                enqueue(job)
            else:
                launch.spawn_supervisor(job)
            # the store is an index; the home screen's sync finds the job dir anyway
            with contextlib.suppress(Exception):
                Store().upsert(job_summary(job))
            if queue:
                self.call_from_thread(self._queued, job.id)
                return
            launch.wait_started(job)
        except Exception as e:
            self._notify_from_thread(f"{type(e).__name__}: {e}", title="the job did not start", severity="error")
            return
        self.call_from_thread(self._started, job.id)

    def _queued(self, job_id: str) -> None:
        self.notify(f"queued {job_id}: it starts when a GPU is free, with or without Nyx open", title="queue")
        self.switch_mode("home")

    def _started(self, job_id: str) -> None:
        self.notify(f"started {job_id}", title="training")
        self.open_job(job_id)

    def _notify_from_thread(self, text: str, *, title: str, severity: Any) -> None:
        self.call_from_thread(partial(self.notify, text, title=title, severity=severity, timeout=12))

    # ------------------------------------------------------------------ command palette
    def get_system_commands(self, screen: Screen[Any]) -> Iterable[SystemCommand]:
        # Nyx's provider offers quit and themes itself; keep Textual's other system commands
        for command in super().get_system_commands(screen):
            if command.title not in ("Quit", "Theme"):
                yield command

    def palette_commands(
        self, presets: list[str], jobs: list[dict[str, Any]]
    ) -> list[tuple[str, str, Callable[[], Any]]]:
        """(text, help, callback) for every palette command. Jobs newest first."""
        from nyx_tui.jobs.jobdir import TERMINAL

        commands: list[tuple[str, str, Callable[[], Any]]] = []
        for preset in presets:
            commands.append(
                (
                    f"New config: {preset}",
                    f"open the config form filled from preset {preset}",
                    partial(self.open_config, preset=preset),
                )
            )
        commands.append(
            (
                "Templates library",
                "presets and your templates: VRAM, families; load one into the config form or save the form",
                self.open_templates,
            )
        )
        commands.append(
            (
                "Start demo",
                "train a tiny LoRA on the CPU: no download, about a minute",
                partial(self.post_message, StartDemo()),
            )
        )
        for job in sorted(jobs, key=lambda j: str(j["id"]), reverse=True):
            job_id = str(job["id"])
            commands.append(
                (
                    f"Open job {job_id}",
                    f"{job.get('kind', '?')}, {job.get('state', '?')}",
                    partial(self.post_message, OpenJob(job_id)),
                )
            )
        for job in sorted(jobs, key=lambda j: str(j["id"]), reverse=True):
            if job.get("state") not in TERMINAL:
                job_id = str(job["id"])
                commands.append(
                    (f"Stop job {job_id}", "save, then exit", partial(self.post_message, ControlJob(job_id, "stop")))
                )
        for name in sorted(self.available_themes):
            commands.append(
                (f"Theme: {name}", "switch theme (saved for next time)", partial(setattr, self, "theme", name))
            )
        for mode, title in MODE_TITLES.items():
            commands.append((f"Go to {title}", f"switch to the {mode} mode", partial(self.switch_mode, mode)))
        commands.append(("Quit", "quit Nyx; running jobs go on", self.exit))
        return commands


def stdin_gone(previous_eof: int = 0) -> str | None:
    """Why stdin is gone ("hangup", "error"), "eof?" when it reads as readable yet holds no bytes (EOF on
    a pipe or tty; confirm over a few checks), or None while it is a live terminal."""
    try:
        fd = sys.__stdin__.fileno() if sys.__stdin__ is not None else 0
    except (ValueError, OSError):
        return "closed"
    poller = select.poll()
    poller.register(fd, select.POLLIN | select.POLLPRI)
    try:
        events = poller.poll(0)
    except OSError:
        return "error"
    mask = events[0][1] if events else 0
    if mask & select.POLLNVAL:
        return "closed"
    if mask & (select.POLLHUP | select.POLLERR):
        return "hangup"
    if mask & select.POLLIN:
        try:
            pending = int.from_bytes(fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"), sys.byteorder)
        except OSError:
            return "eof?"  # readable but not a tty or pipe (/dev/null, a file): always at EOF
        return "eof?" if pending == 0 else None
    return None


def run(job_id: str | None = None) -> int:
    """Run the app (the `nyx` command with no arguments); the process exit code."""
    # textual-image asks the terminal what graphics it speaks when `textual_image.renderable` is first
    # imported. Done while the app runs (the dashboard's sample panel), the terminal's answer lands in
    # Textual's input as key presses ("2" switched to the config mode); so ask before the app starts.
    with contextlib.suppress(Exception):
        import textual_image.renderable  # noqa: F401
    app = NyxApp(job_id=job_id)
    app.run()
    return int(app.return_code or 0)
