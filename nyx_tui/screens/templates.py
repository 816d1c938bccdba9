"""The templates library: every preset and user template in one table, to pick one for the config form.

Pushed by the config screen (its "Templates" key, or the command palette). It shows what each template is
for, the family it trains and the VRAM it needs (`nyx_tui.config.templates`, torch-free), filters by family,
and dismisses with the chosen name, which the config screen loads through its preset path. It also saves
the config form as a user template (name + description) and deletes user templates, after asking.
"""

from __future__ import annotations

from typing import Any, ClassVar

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen, Screen
from textual.widgets import Button, DataTable, Footer, Input, Select, Static

from nyx_tui.config.fields import ALL_FAMILIES
from nyx_tui.config.model import TrainingConfig
from nyx_tui.config.templates import Template, TemplateError, delete_template, list_templates, save_template
from nyx_tui.screens.config_dialogs import ConfirmDialog

ALL = "all"
COLUMNS = (("name", "name"), ("for", "for"), ("families", "families"), ("VRAM", "vram"), ("source", "source"))


def _b(key: str, action: str, description: str, *, show: bool = True, priority: bool = False) -> Binding:
    return Binding(key, action, description, id=f"nyx.templates.{action}", show=show, priority=priority)


class SaveTemplateDialog(ModalScreen[tuple[str, str] | None]):
    """Ask for a template's name and description. Enter in the last field (or OK) accepts; escape cancels."""

    DEFAULT_CSS = """
    SaveTemplateDialog { align: center middle; }
    SaveTemplateDialog > Vertical { width: 80; max-width: 95%; height: auto; border: thick $accent;
        background: $surface; padding: 1 2; }
    SaveTemplateDialog .title { margin-bottom: 1; text-style: bold; }
    SaveTemplateDialog Input { margin-bottom: 1; }
    SaveTemplateDialog #save-error { color: $text-error; height: auto; }
    SaveTemplateDialog Horizontal { height: auto; }
    SaveTemplateDialog Button { margin-right: 2; }
    """
    BINDINGS: ClassVar[list[BindingType]] = [_b("escape", "cancel", "Cancel")]

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Static("Save the config form as a user template", classes="title", markup=False)
            yield Input(placeholder="name, e.g. my-flux-style", id="template-name")
            yield Input(placeholder="what it is for (first sentence is shown in the table)", id="template-desc")
            yield Static("", id="save-error", markup=False)
            with Horizontal():
                yield Button("Save", id="ok", variant="primary", compact=True)
                yield Button("Cancel", id="cancel", compact=True)

    def on_mount(self) -> None:
        self.query_one("#template-name", Input).focus()

    def _accept(self) -> None:
        name = self.query_one("#template-name", Input).value.strip()
        if not name:
            self.query_one("#save-error", Static).update("a name is needed")
            self.query_one("#template-name", Input).focus()
            return
        self.dismiss((name, self.query_one("#template-desc", Input).value.strip()))

    @on(Input.Submitted)
    def _submitted(self, event: Input.Submitted) -> None:
        event.stop()
        if event.input.id == "template-name":
            self.query_one("#template-desc", Input).focus()
        else:
            self._accept()

    @on(Button.Pressed)
    def _pressed(self, event: Button.Pressed) -> None:
        event.stop()
        if event.button.id == "ok":
            self._accept()
        else:
            self.dismiss(None)

    def action_cancel(self) -> None:
        self.dismiss(None)


class TemplatesScreen(Screen[str | None]):
    """The library. Dismisses with the name of the template to load, or None."""

    DEFAULT_CSS = """
    TemplatesScreen #templates-title { height: 1; padding: 0 1; background: $panel; text-style: bold; }
    TemplatesScreen #filter-bar { height: 1; }
    TemplatesScreen #family { width: 24; }
    TemplatesScreen #filter-hint { width: 1fr; padding: 0 1; color: $text-muted; }
    TemplatesScreen #templates { height: auto; max-height: 50%; }
    TemplatesScreen #details { height: 1fr; min-height: 6; border-top: solid $primary; padding: 0 1;
        overflow-y: auto; }
    """
    BINDINGS: ClassVar[list[BindingType]] = [
        _b("enter", "load", "Load"),
        _b("ctrl+s", "save", "Save form as template", priority=True),
        _b("delete", "delete", "Delete"),
        _b("f", "focus_family", "Family filter"),
        _b("escape", "close", "Back"),
    ]

    def __init__(self, current: TrainingConfig | None = None, family: str | None = None) -> None:
        super().__init__()
        self.current = current  # the config form's valid config, for "save as template"
        self.family = family if family in ALL_FAMILIES else ALL
        self.templates: list[Template] = []
        self.shown: list[Template] = []

    def compose(self) -> ComposeResult:
        yield Static("Nyx · templates library", id="templates-title")
        with Horizontal(id="filter-bar"):
            yield Select(
                [("all families", ALL), *((f.value, f.value) for f in ALL_FAMILIES)],
                value=self.family,
                allow_blank=False,
                id="family",
                compact=True,
            )
            yield Static("enter loads · ctrl+s saves the form · del deletes a user template", id="filter-hint")
        table: DataTable[Any] = DataTable(id="templates", cursor_type="row", zebra_stripes=True)
        for label, key in COLUMNS:
            table.add_column(label, key=key)
        yield table
        yield Static("", id="details")
        yield Footer()

    @property
    def table(self) -> DataTable[Any]:
        return self.query_one("#templates", DataTable)

    def on_mount(self) -> None:
        self.reload()
        self.table.focus()

    # ------------------------------------------------------------------ data
    def reload(self, select: str | None = None) -> None:
        self.templates = list_templates()
        self._render_rows(select)

    def _render_rows(self, select: str | None = None) -> None:
        current = self.selected()
        selected = select or (current.name if current else None)
        self.shown = [t for t in self.templates if self.family == ALL or self.family in t.families]
        table = self.table
        table.clear()
        for t in self.shown:
            table.add_row(
                t.name,
                t.summary if not t.error else Text("does not load", style="red"),
                ", ".join(t.families),
                t.vram_text,
                t.source,
                key=t.name,
            )
        index = next((i for i, t in enumerate(self.shown) if t.name == selected), 0)
        if self.shown:
            table.move_cursor(row=index, animate=False)
        self._show_details()

    def selected(self) -> Template | None:
        if not self.shown or not self.is_mounted:
            return None
        row = min(max(self.table.cursor_row, 0), len(self.shown) - 1)
        return self.shown[row]

    def _show_details(self) -> None:
        t = self.selected()
        box = self.query_one("#details", Static)
        if t is None:
            box.update(Text("No template matches the family filter."))
            return
        text = Text()
        text.append(f"{t.name}", style="bold")
        text.append(f"  ({t.source}{', ' + str(t.path) if t.path else ''})\n")
        if t.error:
            text.append(f"does not load: {t.error}\n", style="red")
        text.append((t.description or "(no description)") + "\n\n")
        text.append("VRAM: ", style="bold")
        text.append(f"{t.vram_text} for the full-size model\n")
        for key, value in t.settings.items():
            text.append(f"{key}: ", style="bold")
            text.append(f"{value}\n")
        box.update(text)

    @on(DataTable.RowHighlighted, "#templates")
    def _highlighted(self, event: DataTable.RowHighlighted) -> None:
        self._show_details()

    @on(Select.Changed, "#family")
    def _family_changed(self, event: Select.Changed) -> None:
        event.stop()
        if isinstance(event.value, str) and event.value != self.family:
            self.family = event.value
            self._render_rows()

    # ------------------------------------------------------------------ actions
    @on(DataTable.RowSelected, "#templates")
    def _row_selected(self, event: DataTable.RowSelected) -> None:
        event.stop()
        self.action_load()

    def action_load(self) -> None:
        t = self.selected()
        if t is None:
            self.notify("no template selected", severity="warning")
            return
        if t.error:
            self.notify(t.error, title=f"{t.name} does not load", severity="error")
            return
        self.dismiss(t.name)

    def action_focus_family(self) -> None:
        self.query_one("#family", Select).focus()

    def action_close(self) -> None:
        self.dismiss(None)

    def action_save(self) -> None:
        config = self.current
        if config is None:
            self.notify("the config form has errors; fix them before saving it", title="Not saved", severity="error")
            return

        def write(name: str, description: str, overwrite: bool) -> None:
            try:
                path = save_template(name, config, description, overwrite=overwrite)
            except (TemplateError, OSError) as e:
                self.notify(str(e), title="Not saved", severity="error")
                return
            self.notify(f"saved {path}", title="template saved")
            self.reload(select=path.stem)

        def ask(result: tuple[str, str] | None) -> None:
            if result is None:
                return
            name, description = result
            existing = next((t for t in self.templates if t.name == name and not t.builtin), None)
            if existing is None:
                write(name, description, overwrite=False)
                return

            def confirmed(yes: bool | None) -> None:
                if yes:
                    write(name, description, overwrite=True)

            self.app.push_screen(ConfirmDialog(f"A user template {name!r} exists. Overwrite it?"), confirmed)

        self.app.push_screen(SaveTemplateDialog(), ask)

    def action_delete(self) -> None:
        t = self.selected()
        if t is None:
            return
        if t.builtin:
            self.notify(f"{t.name} is built in; only user templates can be deleted", severity="warning")
            return
        name = t.name

        def confirmed(yes: bool | None) -> None:
            if not yes:
                return
            try:
                delete_template(name)
            except (TemplateError, OSError) as e:
                self.notify(str(e), title="Not deleted", severity="error")
                return
            self.notify(f"deleted template {name}")
            self.reload()

        self.app.push_screen(ConfirmDialog(f"Delete the user template {name!r}? Its file is removed."), confirmed)


__all__ = ["SaveTemplateDialog", "TemplatesScreen"]
