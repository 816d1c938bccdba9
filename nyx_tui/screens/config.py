"""The config screen: edit a TrainingConfig in a form generated from its declarations, check it, start it.

Every change re-validates the form's data with `validate_data` and puts each problem (message and fix) under
its field; Start is refused while any is an error, then runs the pre-flight check (`check_config`) in a
worker and posts `StartTraining`. Presets fill the form; relative paths of the demo preset resolve in the
demo workspace (built in a worker when the preset is picked), those of other presets against the cwd and
those of a loaded file against the file's folder.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, ClassVar

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal
from textual.message import Message
from textual.screen import Screen
from textual.widget import Widget
from textual.widgets import Button, Checkbox, Footer, Input, Select, Static

from nyx_tui import demo
from nyx_tui.config.check import check_config
from nyx_tui.config.errors import ConfigError, Problem
from nyx_tui.config.fields import ALL_FAMILIES, Param
from nyx_tui.config.io import load_config, save_config, toml_value, validate_data
from nyx_tui.config.model import TrainingConfig
from nyx_tui.config.presets import list_presets, preset_data
from nyx_tui.screens.config_dialogs import ConfirmDialog, PathDialog, TextDialog
from nyx_tui.screens.messages import StartTraining
from nyx_tui.widgets.config_form import ConfigForm, ParamRow, SubsetsEditor, flatten, format_value


def _b(key: str, action: str, description: str, *, priority: bool = False, show: bool = True) -> Binding:
    return Binding(key, action, description, id=f"nyx.config.{action}", priority=priority, show=show)


def diff_lines(baseline: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """`key: preset value → current value` for every key whose value differs."""
    before, after = flatten(baseline), flatten(current)
    lines = []
    for key in sorted(set(before) | set(after)):
        a, b = before.get(key), after.get(key)
        if a != b:
            shown_a = "(unset)" if a is None else toml_value(a)
            shown_b = "(unset)" if b is None else toml_value(b)
            lines.append(f"{key}: {shown_a} → {shown_b}")
    return lines


class ConfigScreen(Screen[None]):
    """Edit, validate, save/load and start a training config."""

    DEFAULT_CSS = """
    ConfigScreen #topbar { height: 1; }
    ConfigScreen #preset { width: 24; }
    ConfigScreen #filter { width: 1fr; }
    ConfigScreen #advanced { width: auto; }
    ConfigScreen #main { height: 1fr; }
    ConfigScreen #help { width: 34%; max-width: 48; height: 1fr; border-left: solid $primary; padding: 0 1;
        overflow-y: auto; }
    ConfigScreen #status { height: 1; background: $boost; }
    ConfigScreen #status.-error { color: $text-error; }
    """

    BINDINGS: ClassVar[list[BindingType]] = [
        _b("ctrl+f", "focus_filter", "Filter", priority=True),
        _b("f2", "toggle_advanced", "Advanced"),
        _b("f3", "show_diff", "Diff"),
        _b("f4", "focus_preset", "Preset"),
        _b("f5", "start", "Start"),
        _b("f7", "check", "Check"),
        _b("f8", "queue", "Queue"),
        _b("ctrl+s", "save", "Save", priority=True),
        _b("ctrl+o", "load", "Load", priority=True),
        _b("f6", "add_subset", "Add subset"),
        _b("f9", "templates", "Templates", show=False),  # footer full: F1 lists it
    ]

    class _Loaded(Message):
        def __init__(self, config: TrainingConfig | None, path: Path, problems: list[Problem]) -> None:
            super().__init__()
            self.config, self.path, self.problems = config, path, problems

    class _Saved(Message):
        def __init__(self, path: Path, error: str | None) -> None:
            super().__init__()
            self.path, self.error = path, error

    class _Checked(Message):
        def __init__(self, config: TrainingConfig, problems: list[Problem], start: bool, queue: bool) -> None:
            super().__init__()
            self.config, self.problems, self.start, self.queue = config, problems, start, queue

    class _DemoReady(Message):
        def __init__(self, error: str | None) -> None:
            super().__init__()
            self.error = error

    def __init__(self, path: Path | str | None = None, preset: str | None = None) -> None:
        super().__init__()
        self.source: Path | None = Path(path) if path else None
        self.preset: str | None = None
        self.problems: list[Problem] = []
        self.config: TrainingConfig | None = None
        self.checking = False
        self._demo_lock = threading.Lock()
        initial = TrainingConfig()
        self._baseline: dict[str, Any] = initial.dump()
        self._initial_preset = preset if preset in list_presets() else None
        if self._initial_preset:
            initial, self._baseline = self._preset_config(self._initial_preset)
            self.preset = self._initial_preset
        self._initial = initial

    # ------------------------------------------------------------------------------------------ layout

    def compose(self) -> ComposeResult:
        with Horizontal(id="topbar"):
            yield Select(
                [(name, name) for name in list_presets()],
                prompt="(no preset)",
                value=self._initial_preset or Select.NULL,
                id="preset",
                compact=True,
            )
            yield Input(placeholder="filter: name, key or help (ctrl+f)", id="filter", compact=True)
            yield Checkbox("advanced: off", False, id="advanced", compact=True)
        with Horizontal(id="main"):
            yield ConfigForm(self._initial)
            yield Static("", id="help")
        yield Static("", id="status")
        yield Footer()

    @property
    def form(self) -> ConfigForm:
        return self.query_one(ConfigForm)

    def on_mount(self) -> None:
        self.validate_form()
        self._show_help(None)
        if self.source is not None:
            self._load(self.source)
        elif self.preset == demo.PRESET:
            self._prepare_demo()

    # ---------------------------------------------------------------------------------------- presets

    @staticmethod
    def _preset_config(name: str) -> tuple[TrainingConfig, dict[str, Any]]:
        cfg = validate_data(preset_data(name), source=f"preset {name}")
        return cfg, cfg.dump()

    @on(Select.Changed, "#preset")
    async def _preset_changed(self, event: Select.Changed) -> None:
        event.stop()
        name = event.value
        if name is Select.NULL or not isinstance(name, str) or name == self.preset:
            return
        await self.apply_preset(name)

    async def apply_preset(self, name: str) -> None:
        """Fill the form from the preset or user template `name` (the preset menu and the templates library)."""
        try:
            cfg, baseline = self._preset_config(name)
        except ConfigError as e:
            self.notify("\n".join(str(p) for p in e.problems), title=f"preset {name}", severity="error")
            return
        self.preset, self._baseline, self.source = name, baseline, None
        select = self.query_one("#preset", Select)
        with self.prevent(Select.Changed):
            select.set_options([(n, n) for n in list_presets()])  # the library may have added or removed some
            select.value = name
        await self.form.set_config(cfg)
        self.validate_form()
        self.set_status(f"preset {name} applied")
        if name == demo.PRESET:
            self._prepare_demo()

    @work(thread=True, exclusive=True, group="demo")
    def _prepare_demo(self) -> None:
        ws = demo.workspace()
        error: str | None = None
        try:
            with self._demo_lock:
                if not demo.is_ready(ws):
                    self.app.call_from_thread(self.set_status, f"building the demo workspace in {ws} …")
                    demo.prepare_workspace(ws)
        except (demo.DemoError, OSError) as e:
            error = str(e)
        self.post_message(self._DemoReady(error))

    def on_config_screen__demo_ready(self, message: _DemoReady) -> None:
        if message.error:
            self.set_status("✗ the demo workspace could not be built", error=True)
            self.app.push_screen(TextDialog("Demo workspace", message.error))
        else:
            self.set_status(f"demo workspace ready: {demo.workspace()}")

    def base_dir(self) -> Path:
        """Where the form's relative paths point."""
        if self.source is not None:
            return self.source.expanduser().absolute().parent
        if self.preset == demo.PRESET:
            return demo.workspace()
        return Path.cwd()

    # -------------------------------------------------------------------------------------- validation

    def validate_form(self) -> bool:
        """Validate the form's data; put every problem under its field. True when there are no errors."""
        try:
            self.config = validate_data(self.form.data(), source="form")
            self.problems = []
        except ConfigError as e:
            self.config = None
            self.problems = list(e.problems)
        self.form.show_problems(self.problems)
        errors = sum(1 for p in self.problems if p.is_error)
        if errors:
            self.set_status(f"✗ {errors} error(s): Start is blocked until they are fixed", error=True)
        else:
            self.set_status(f"✓ valid{self._vram_note()} (F5 checks the files and starts)")
        return not errors

    def _vram_note(self) -> str:
        """The VRAM estimate of the valid form, for the status line (`nyx_tui.vram`: arithmetic, no torch)."""
        from nyx_tui import vram

        if self.config is None:
            return ""
        try:
            found = vram.estimate(self.config)
        except Exception:  # an estimate must never break the form
            return ""
        tier = vram.smallest_tier(found.total_gib)
        fits = f"fits {tier} GB" if tier else "more than one card"
        return f" · VRAM ≈ {found.total_gib:.1f} GiB for full-size {found.model}, {fits}"

    def set_status(self, text: str, error: bool = False) -> None:
        status = self.query_one("#status", Static)
        status.update(Text(text))
        status.set_class(error, "-error")

    def _in_form(self, widget: Widget) -> bool:
        return any(isinstance(a, ConfigForm) for a in widget.ancestors)

    def _after_edit(self, widget: Widget) -> None:
        row = next((a for a in widget.ancestors if isinstance(a, ParamRow)), None)
        if row is not None and row.param.path == "model.family":
            self.form.follow_family()
            self.form.refresh_visibility()
        self.validate_form()

    @on(Input.Changed)
    def _input_changed(self, event: Input.Changed) -> None:
        if event.input.id == "filter":
            self.form.filter_text = event.value
            self.form.refresh_visibility()
        elif self._in_form(event.input):
            self._after_edit(event.input)

    @on(Select.Changed)
    def _select_changed(self, event: Select.Changed) -> None:
        if event.select.id != "preset" and self._in_form(event.select):
            self._after_edit(event.select)

    @on(Checkbox.Changed)
    def _checkbox_changed(self, event: Checkbox.Changed) -> None:
        if event.checkbox.id == "advanced":
            event.checkbox.label = f"advanced: {'on' if event.value else 'off'}"
            self.form.show_advanced = event.value
            self.form.refresh_visibility()
        elif self._in_form(event.checkbox):
            self._after_edit(event.checkbox)

    def on_subsets_editor_changed(self, event: SubsetsEditor.Changed) -> None:
        self.form.refresh_visibility()
        self.validate_form()

    # -------------------------------------------------------------------------------------------- help

    def on_descendant_focus(self, event: Any) -> None:
        widget = event.widget
        row = next((a for a in widget.ancestors_with_self if isinstance(a, ParamRow)), None)
        if row is not None:
            self._show_help(row.param, row.key)
            return
        editor = next((a for a in widget.ancestors_with_self if isinstance(a, SubsetsEditor)), None)
        if editor is not None:
            self._show_help(editor.param)

    def _show_help(self, param: Param | None, key: str | None = None) -> None:
        help_box = self.query_one("#help", Static)
        if param is None:
            help_box.update(
                Text(
                    "Focus a field to see its help.\n\nTab moves between fields; ctrl+f filters; "
                    "F2 shows advanced fields (marked *); F5 checks and starts."
                )
            )
            return
        meta = param.meta
        text = Text()
        text.append(param.name + "\n", style="bold")
        text.append(param.description + "\n\n")
        families = "all" if set(meta.families) == set(ALL_FAMILIES) else ", ".join(f.value for f in meta.families)
        default = param.default
        default_text = (
            "(required)"
            if repr(default) == "PydanticUndefined"
            else (format_value(param.annotation, default) or "(unset)")
        )
        for label, value in (
            ("key", key or param.path),
            ("sd-scripts", meta.kohya or "—"),
            ("unit", meta.unit or "—"),
            ("default", default_text),
            ("families", families),
            ("advanced", "yes" if meta.advanced else "no"),
        ):
            text.append(f"{label}: ", style="bold")
            text.append(f"{value}\n")
        help_box.update(text)

    # ----------------------------------------------------------------------------------------- actions

    def action_focus_filter(self) -> None:
        self.query_one("#filter", Input).focus()

    def action_focus_preset(self) -> None:
        self.query_one("#preset", Select).focus()

    def action_templates(self) -> None:
        """The templates library; the template picked there fills the form."""
        from nyx_tui.screens.templates import TemplatesScreen

        self.validate_form()

        async def picked(name: str | None) -> None:
            if name:
                await self.apply_preset(name)
            else:  # templates may have been saved or deleted
                select = self.query_one("#preset", Select)
                with self.prevent(Select.Changed):
                    value = select.value
                    select.set_options([(n, n) for n in list_presets()])
                    if isinstance(value, str) and value in list_presets():
                        select.value = value

        self.app.push_screen(TemplatesScreen(self.config), picked)

    def action_toggle_advanced(self) -> None:
        box = self.query_one("#advanced", Checkbox)
        box.value = not box.value

    async def action_add_subset(self) -> None:
        await self.query_one(SubsetsEditor).add_subset()

    def current_data(self) -> dict[str, Any]:
        return self.config.dump() if self.config is not None else self.form.data()

    def action_show_diff(self) -> None:
        what = f"preset {self.preset}" if self.preset else "the defaults"
        lines = diff_lines(self._baseline, self.current_data())
        body = "\n".join(lines) if lines else f"nothing differs from {what}"
        self.app.push_screen(TextDialog(f"What differs from {what}", body))

    # start

    def action_start(self) -> None:
        self._preflight(start=True)

    def action_check(self) -> None:
        """The pre-flight check alone: every problem with its fix, nothing started."""
        self._preflight(start=False)

    def action_queue(self) -> None:
        """Like Start, but the job waits in the queue for a free GPU (`nyx train --queue`)."""
        self._preflight(start=True, queue=True)

    def _preflight(self, start: bool, queue: bool = False) -> None:
        if self.checking:
            self.set_status("the pre-flight check is already running")
            return
        if not self.validate_form():
            self.notify("fix the errors marked ✗ first", title="Start refused", severity="error")
            return
        try:
            cfg = validate_data(self.form.data(), base_dir=self.base_dir(), source="form")
        except ConfigError as e:
            self.form.show_problems(list(e.problems))
            self.set_status("✗ a path could not be resolved", error=True)
            return
        self.checking = True
        self.set_status("checking the files …")
        self._check(cfg, self.preset == demo.PRESET and self.source is None, start, queue)

    @work(thread=True, exclusive=True, group="check")
    def _check(self, cfg: TrainingConfig, needs_demo: bool, start: bool, queue: bool) -> None:
        problems: list[Problem] = []
        if needs_demo:
            ws = demo.workspace()
            try:
                with self._demo_lock:
                    if not demo.is_ready(ws):
                        demo.prepare_workspace(ws)
            except (demo.DemoError, OSError) as e:
                problems.append(Problem("model.pretrained", f"the demo workspace could not be built: {e}", "retry"))
        if not problems:
            problems = check_config(cfg)
        self.post_message(self._Checked(cfg, problems, start, queue))

    def on_config_screen__checked(self, message: _Checked) -> None:
        self.checking = False
        self.form.show_problems(message.problems)
        errors = [p for p in message.problems if p.is_error]
        warnings = [p for p in message.problems if not p.is_error]
        if errors:
            self.set_status(f"✗ pre-flight: {len(errors)} error(s)" + (", not started" if message.start else ""),
                            error=True)
            title = "Pre-flight check: not started" if message.start else "Pre-flight check"
            self.app.push_screen(TextDialog(title, "\n\n".join(map(str, message.problems))))
            return
        if not message.start:
            self.set_status(f"✓ pre-flight passed ({len(warnings)} warning(s))")
            if warnings:
                self.notify("\n".join(map(str, warnings)), title="Pre-flight warnings", severity="warning")
            return
        if warnings:
            self.notify("\n".join(map(str, warnings)), title="Started with warnings", severity="warning")
        self.set_status("✓ pre-flight passed: " + ("queued" if message.queue else "starting"))
        self.post_message(StartTraining(message.config, self.source, queue=message.queue))

    # save / load

    def action_save(self) -> None:
        if not self.validate_form() or self.config is None:
            self.notify("fix the errors marked ✗ before saving", title="Not saved", severity="error")
            return
        config = self.config
        default = str(self.source) if self.source else "nyx-config.toml"

        def chosen(path: Path | None) -> None:
            if path is None:
                return
            if path.exists():

                def confirmed(yes: bool | None) -> None:
                    if yes:
                        self._save(config, path)

                self.app.push_screen(ConfirmDialog(f"{path} exists. Overwrite it?"), confirmed)
            else:
                self._save(config, path)

        self.app.push_screen(PathDialog("Save the config as TOML", default), chosen)

    @work(thread=True, group="io")
    def _save(self, config: TrainingConfig, path: Path) -> None:
        error: str | None = None
        try:
            save_config(config, path)
        except (OSError, ValueError) as e:
            error = f"{type(e).__name__}: {e}"
        self.post_message(self._Saved(path, error))

    def on_config_screen__saved(self, message: _Saved) -> None:
        if message.error:
            self.set_status(f"✗ not saved: {message.error}", error=True)
            self.notify(message.error, title="Not saved", severity="error")
        else:
            self.source = message.path
            self.set_status(f"saved {message.path}")

    def action_load(self) -> None:
        def chosen(path: Path | None) -> None:
            if path is not None:
                self._load(path)

        self.app.push_screen(PathDialog("Load a TOML config", str(self.source or "")), chosen)

    @work(thread=True, group="io")
    def _load(self, path: Path) -> None:
        try:
            cfg = load_config(path)
        except ConfigError as e:
            self.post_message(self._Loaded(None, path, list(e.problems)))
            return
        except Exception as e:  # never a traceback on screen
            self.post_message(
                self._Loaded(None, path, [Problem(str(path), f"could not be read: {e}", "check the file")])
            )
            return
        self.post_message(self._Loaded(cfg, path, []))

    async def on_config_screen__loaded(self, message: _Loaded) -> None:
        if message.config is None:
            self.set_status(f"✗ could not load {message.path}", error=True)
            self.app.push_screen(TextDialog(f"Could not load {message.path}", "\n\n".join(map(str, message.problems))))
            return
        self.source = message.path
        preset = self.query_one("#preset", Select)
        with self.prevent(Select.Changed):
            preset.value = Select.NULL
        self._baseline = TrainingConfig().dump()
        self.preset = None
        await self.form.set_config(message.config)
        self.validate_form()
        self.set_status(f"loaded {message.path}")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        event.stop()


__all__ = ["ConfigScreen", "diff_lines"]
