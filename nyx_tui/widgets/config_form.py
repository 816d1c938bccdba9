"""The config screen's form: one row per declared parameter, generated from `iter_params(TrainingConfig)`.

Nothing here knows a particular field. A row's editor is chosen from the field's annotation (bool →
Checkbox, enum → Select, numbers/text/lists/tables → Input) and its value is turned back into TOML-shaped
data by the same rules; validation itself is the config package's (`validate_data`), so the form shows
exactly the messages and fixes the CLI shows.
"""

from __future__ import annotations

import csv
import types
import typing
from collections.abc import Iterable, Iterator
from enum import Enum
from typing import Any

from pydantic import BaseModel
from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.widget import Widget
from textual.widgets import Button, Checkbox, Input, Select, Static

from nyx_tui.config.errors import Problem
from nyx_tui.config.fields import Family, Param, iter_params
from nyx_tui.config.model import TrainingConfig
from nyx_tui.families import FAMILY_DEFAULTS

SUBSETS_PATH = "dataset.subsets"

# ------------------------------------------------------------------------------------------- type rules


def strip_optional(annotation: Any) -> tuple[Any, bool]:
    """(inner annotation, may be None)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            return rest[0], len(rest) != len(args)
    return annotation, False


def kind_of(annotation: Any) -> str:
    """The editor kind for an annotation: bool, enum, int, float, str, list, dict, tuple, tables."""
    ann, _ = strip_optional(annotation)
    origin = typing.get_origin(ann)
    if ann is bool:
        return "bool"
    if isinstance(ann, type) and issubclass(ann, Enum):
        return "enum"
    if ann is int:
        return "int"
    if ann is float:
        return "float"
    if origin is list:
        args = typing.get_args(ann)
        if args and isinstance(args[0], type) and issubclass(args[0], BaseModel):
            return "tables"
        return "list"
    if origin is dict:
        return "dict"
    if origin is tuple:
        return "tuple"
    return "str"


def _scalar_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Enum):
        return str(value.value)
    return str(value)


def format_value(annotation: Any, value: Any) -> str:
    """How a value is written in its Input (`a, b`, `k=v, k=v`, `` for None)."""
    if value is None:
        return ""
    kind = kind_of(annotation)
    if kind in ("list", "tuple"):
        return _join_items([_scalar_text(v) for v in value])
    if kind == "dict":
        return ", ".join(f"{k}={_scalar_text(v)}" for k, v in dict(value).items())
    return _scalar_text(value)


def _split_items(raw: str) -> list[str]:
    """Comma-separated items, CSV-style: an item in double quotes may hold commas
    (`"a photo of sks, smiling", a cat`)."""
    try:
        return next(csv.reader([raw], skipinitialspace=True), [])
    except csv.Error:
        return raw.split(",")


def _join_items(items: list[str]) -> str:
    """The inverse of `_split_items`: an item with a comma or a quote is quoted, CSV-style."""
    return ", ".join('"' + i.replace('"', '""') + '"' if ("," in i or '"' in i) else i for i in items)


def _parse_scalar(text: str) -> Any:
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return text


class _Unset:
    """An empty optional field: the key is left out of the data."""


UNSET = _Unset()


def parse_text(annotation: Any, text: str) -> Any:
    """An Input's text as TOML-shaped data; `UNSET` for an empty optional. Text that does not parse is
    passed on as written, so validation reports it in the config's own words."""
    _, optional = strip_optional(annotation)
    kind = kind_of(annotation)
    raw = text.strip()
    if raw == "" and optional:  # an optional list left empty is unset, not an empty list
        return UNSET
    if kind in ("list", "tuple"):
        items = [p.strip() for p in _split_items(raw) if p.strip()]
        return [_parse_scalar(i) for i in items] if kind == "tuple" else items
    if kind == "dict":
        out: dict[str, Any] = {}
        for part in _split_items(raw):
            if not part.strip():
                continue
            key, sep, val = part.partition("=")
            if not sep or not key.strip():
                return raw  # not `key=value`: validation names the field instead of guessing a value
            out[key.strip()] = _parse_scalar(val.strip())
        return out
    if kind in ("int", "float"):
        try:
            return int(raw) if kind == "int" else float(raw)
        except ValueError:
            return raw
    return text


def placeholder_for(annotation: Any) -> str:
    kind = kind_of(annotation)
    _, optional = strip_optional(annotation)
    hint = {"list": "a, b, c", "dict": "key=value, key=value", "tuple": "a, b", "int": "integer", "float": "number"}
    text = hint.get(kind, "")
    if optional:
        text = f"{text} (empty = unset)" if text else "empty = unset"
    return text


# ------------------------------------------------------------------------------------------- data paths


def set_in(data: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def get_in(data: dict[str, Any], dotted: str, default: Any = None) -> Any:
    node: Any = data
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """`{"network": {"dim": 8}}` → `{"network.dim": 8}`; lists of tables get `[i]`."""
    out: dict[str, Any] = {}
    if isinstance(data, dict):
        for key, value in data.items():
            out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    elif isinstance(data, list) and data and all(isinstance(v, dict) for v in data):
        for i, value in enumerate(data):
            out.update(flatten(value, f"{prefix}[{i}]"))
    else:
        out[prefix] = data
    return out


def all_params() -> list[Param]:
    return list(iter_params(TrainingConfig))


def top_params() -> list[Param]:
    """Parameters that get a row of their own (not the keys inside a list of tables)."""
    return [p for p in all_params() if "[]" not in p.path]


def subset_params() -> list[Param]:
    return [p for p in all_params() if p.path.startswith(SUBSETS_PATH + "[].")]


def row_id(path: str, index: int | None = None) -> str:
    """A DOM id for a parameter's row (`row-network--dim`, `row-dataset--subsets-0-image_dir`)."""
    base = path.replace("[].", "-").replace(".", "--")
    return f"row-{base}" if index is None else f"row-{base.replace('subsets-', f'subsets-{index}-')}"


def matches(param: Param, needle: str) -> bool:
    needle = needle.strip().lower()
    if not needle:
        return True
    return any(needle in s.lower() for s in (param.name, param.path, param.description, param.meta.kohya or ""))


def problem_text(problems: Iterable[Problem], with_field: bool = False) -> Text:
    """Problems as text with a word marker (not color alone): `✗ error:` / `! warning:` and the fix."""
    text = Text()
    for i, p in enumerate(problems):
        if i:
            text.append("\n")
        text.append("✗ error: " if p.is_error else "! warning: ", style="bold")
        text.append(f"{p.field}: {p.message}" if with_field else p.message)
        if p.fix:
            text.append("\n  fix: " + p.fix)
    return text


# ------------------------------------------------------------------------------------------------- rows


class ParamRow(Horizontal):
    """Label, editor and (when there is one) the problem under it, for one parameter."""

    DEFAULT_CSS = """
    ParamRow { height: auto; }
    ParamRow > .label { width: 26; height: 1; padding-right: 1; }
    ParamRow > Vertical { width: 1fr; height: auto; }
    ParamRow .problem { height: auto; color: $text-error; }
    ParamRow .problem.-warning { color: $text-warning; }
    ParamRow Checkbox { width: auto; }
    ParamRow Input { width: 1fr; }
    ParamRow Select { width: 1fr; }
    """

    def __init__(self, param: Param, value: Any, index: int | None = None) -> None:
        super().__init__(id=row_id(param.path, index), classes="param-row")
        self.param = param
        self.index = index  # the subset this row edits, for `dataset.subsets[].…`
        self.kind = kind_of(param.annotation)
        self._initial = value

    @property
    def key(self) -> str:
        """The dotted key of this value in problems (`dataset.subsets[0].image_dir`)."""
        if self.index is None:
            return self.param.path
        return self.param.path.replace("[]", f"[{self.index}]")

    def compose(self) -> ComposeResult:
        label = self.param.name + (f" ({self.param.meta.unit})" if self.param.meta.unit else "")
        if self.param.meta.advanced:
            label += " *"
        yield Static(label, classes="label", markup=False)
        with Vertical():
            yield self._make_editor(self._initial)
            yield Static("", classes="problem")

    def _make_editor(self, value: Any) -> Widget:
        ann, optional = strip_optional(self.param.annotation)
        if self.kind == "bool":
            return Checkbox(_scalar_text(bool(value)), bool(value), compact=True, classes="editor")
        if self.kind == "enum":
            options = [(str(m.value), str(m.value)) for m in ann]
            current = _scalar_text(value) if value is not None else Select.NULL
            return Select(options, value=current, allow_blank=optional, compact=True, classes="editor")
        input_type = {"int": "integer", "float": "number"}.get(self.kind, "text")
        return Input(
            format_value(self.param.annotation, value),
            placeholder=placeholder_for(self.param.annotation),
            type=input_type,  # type: ignore[arg-type]
            compact=True,
            classes="editor",
            select_on_focus=False,
        )

    @property
    def editor(self) -> Widget:
        return self.query_one(".editor")

    def get_value(self) -> Any:
        editor = self.editor
        if isinstance(editor, Checkbox):
            return editor.value
        if isinstance(editor, Select):
            return UNSET if editor.value is Select.NULL else editor.value
        assert isinstance(editor, Input)
        return parse_text(self.param.annotation, editor.value)

    def set_value(self, value: Any) -> None:
        editor = self.editor
        if isinstance(editor, Checkbox):
            editor.value = bool(value)
            editor.label = _scalar_text(bool(value))
        elif isinstance(editor, Select):
            editor.value = _scalar_text(value) if value is not None else Select.NULL
        elif isinstance(editor, Input):
            editor.value = format_value(self.param.annotation, value)

    def show_problems(self, problems: list[Problem]) -> None:
        box = self.query_one(".problem", Static)
        box.update(problem_text(problems) if problems else "")
        box.display = bool(problems)
        box.set_class(bool(problems) and not any(p.is_error for p in problems), "-warning")

    def on_mount(self) -> None:
        self.query_one(".problem", Static).display = False

    def on_checkbox_changed(self, event: Checkbox.Changed) -> None:
        event.checkbox.label = _scalar_text(event.value)  # the word, not only the box


class Section(Vertical):
    """A group of rows under its title."""

    DEFAULT_CSS = """
    Section { height: auto; margin-bottom: 1; }
    Section > .section-title { text-style: bold; background: $boost; width: 1fr; }
    """

    def __init__(self, group: str, rows: Iterable[Widget]) -> None:
        super().__init__(id=f"section-{group}", classes="section")
        self.group = group
        self._rows = list(rows)

    def compose(self) -> ComposeResult:
        yield Static(f"[{self.group}]", classes="section-title", markup=False)
        yield from self._rows


class SubsetBox(Vertical):
    """One `[[dataset.subsets]]` table: its rows and a Remove button."""

    DEFAULT_CSS = """
    SubsetBox { height: auto; border-left: thick $primary; padding-left: 1; margin-bottom: 1; }
    SubsetBox > .subset-title { height: 1; }
    """

    def __init__(self, index: int, data: dict[str, Any]) -> None:
        super().__init__(classes="subset")
        self.index = index
        self._data = data

    def compose(self) -> ComposeResult:
        yield Static(f"subset {self.index}  [[dataset.subsets]]", classes="subset-title", markup=False)
        for p in subset_params():
            fallback = "" if p.info.is_required() else p.default
            yield ParamRow(p, self._data.get(p.name, fallback), self.index)
        yield Button(f"Remove subset {self.index}", id=f"remove-subset-{self.index}", compact=True, classes="remove")


class SubsetsEditor(Vertical):
    """The list of tables `dataset.subsets`: a box per subset, plus Add."""

    DEFAULT_CSS = """
    SubsetsEditor { height: auto; }
    SubsetsEditor > .subsets-label { height: 1; }
    """

    class Changed(Message):
        """A subset was added or removed."""

    def __init__(self, param: Param, subsets: list[dict[str, Any]]) -> None:
        super().__init__(id="subsets-editor")
        self.param = param
        self.subsets = [dict(s) for s in subsets]

    def compose(self) -> ComposeResult:
        yield Static(f"{self.param.name}: image folders", classes="subsets-label", markup=False)
        with Vertical(id="subset-list"):
            for i, s in enumerate(self.subsets):
                yield SubsetBox(i, s)
        yield Button("Add subset (F6)", id="add-subset", compact=True)

    def current(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for box in self.query(SubsetBox):
            entry: dict[str, Any] = {}
            for row in box.query(ParamRow):
                value = row.get_value()
                if value is not UNSET:
                    entry[row.param.name] = value
            out.append(entry)
        return out

    async def set_subsets(self, subsets: list[dict[str, Any]]) -> None:
        self.subsets = [dict(s) for s in subsets]
        holder = self.query_one("#subset-list", Vertical)
        await holder.remove_children()
        await holder.mount_all([SubsetBox(i, s) for i, s in enumerate(self.subsets)])

    async def add_subset(self) -> None:
        await self.set_subsets([*self.current(), {"image_dir": ""}])
        self.post_message(self.Changed())

    async def remove_subset(self, index: int) -> None:
        rows = self.current()
        if 0 <= index < len(rows):
            del rows[index]
        await self.set_subsets(rows)
        self.post_message(self.Changed())

    async def on_button_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        bid = event.button.id or ""
        if bid == "add-subset":
            await self.add_subset()
        elif bid.startswith("remove-subset-"):
            await self.remove_subset(int(bid.rsplit("-", 1)[1]))


# ------------------------------------------------------------------------------------------------- form


class ConfigForm(VerticalScroll):
    """Every parameter of `TrainingConfig`, by group. `data()` is the form as TOML-shaped data."""

    DEFAULT_CSS = """
    ConfigForm { height: 1fr; padding-right: 1; }
    ConfigForm #general-problems { height: auto; color: $text-error; }
    ConfigForm #empty-note { height: auto; }
    """

    def __init__(self, config: TrainingConfig, *, id: str | None = "config-form") -> None:
        super().__init__(id=id)
        self._config_data = config.model_dump(mode="json")
        self._family: Family | None = config.model.family
        self.filter_text = ""
        self.show_advanced = False

    def compose(self) -> ComposeResult:
        yield Static("", id="general-problems")
        groups: dict[str, list[Widget]] = {}
        for p in top_params():
            value = get_in(self._config_data, p.path, p.default)
            widget: Widget = (
                SubsetsEditor(p, list(value or [])) if kind_of(p.annotation) == "tables" else ParamRow(p, value)
            )
            groups.setdefault(p.meta.group, []).append(widget)
        for group, rows in groups.items():
            yield Section(group, rows)
        yield Static("no parameter matches the filter", id="empty-note")

    def on_mount(self) -> None:
        self.query_one("#general-problems", Static).display = False
        self.refresh_visibility()

    # -- values

    def rows(self) -> Iterator[ParamRow]:
        yield from self.query(ParamRow)

    def top_rows(self) -> list[ParamRow]:
        return [r for r in self.query(ParamRow) if r.index is None]

    def row(self, path: str, index: int | None = None) -> ParamRow:
        return self.query_one(f"#{row_id(path, index)}", ParamRow)

    def data(self) -> dict[str, Any]:
        data: dict[str, Any] = {}
        for row in self.top_rows():
            value = row.get_value()
            if value is not UNSET:
                set_in(data, row.param.path, value)
        set_in(data, SUBSETS_PATH, self.query_one(SubsetsEditor).current())
        return data

    def family(self) -> Family | None:
        value = self.row("model.family").get_value()
        try:
            return Family(value)
        except ValueError:
            return None

    def follow_family(self) -> None:
        """After model.family changed: a resolution still at the old family's native size takes the new one's
        (SD1.5 512 → SDXL 1024), as a config file that leaves it out would; a size the user typed stays."""
        new, old = self.family(), self._family
        self._family = new
        if old is None or new is None or old == new:
            return
        row = self.row("dataset.resolution")
        if row.get_value() == FAMILY_DEFAULTS[old].resolution:
            with self.prevent(Input.Changed):
                row.set_value(FAMILY_DEFAULTS[new].resolution)

    async def set_config(self, config: TrainingConfig) -> None:
        self._family = config.model.family
        data = config.model_dump(mode="json")
        with self.prevent(Input.Changed, Select.Changed, Checkbox.Changed):
            for row in self.top_rows():
                row.set_value(get_in(data, row.param.path))
        await self.query_one(SubsetsEditor).set_subsets(list(get_in(data, SUBSETS_PATH) or []))
        self.refresh_visibility()

    # -- visibility

    def is_visible(self, param: Param, family: Family | None) -> bool:
        if family is not None and family not in param.meta.families:
            return False
        if self.filter_text.strip():  # a search finds advanced parameters too
            return matches(param, self.filter_text)
        return self.show_advanced or not param.meta.advanced

    def refresh_visibility(self) -> None:
        family = self.family()
        any_shown = False
        for section in self.query(Section):
            shown = False
            for child in section.children:
                if isinstance(child, ParamRow):
                    child.display = self.is_visible(child.param, family)
                    shown |= child.display
                elif isinstance(child, SubsetsEditor):
                    child.display = self.is_visible(child.param, family) or any(
                        self.is_visible(p, family) for p in subset_params()
                    )
                    shown |= child.display
            section.display = shown
            any_shown |= shown
        editor = self.query_one(SubsetsEditor)
        for row in self.rows():
            if row.index is not None:
                row.display = self.is_visible(row.param, family) or (
                    bool(self.filter_text.strip()) and matches(editor.param, self.filter_text)
                )
        self.query_one("#empty-note", Static).display = not any_shown

    def visible_paths(self) -> list[str]:
        return [r.param.path for r in self.top_rows() if r.display and r.parent is not None and r.parent.display]

    # -- problems

    def show_problems(self, problems: list[Problem]) -> list[Problem]:
        """Put each problem under its row; return the ones that have no row (shown at the top)."""
        rows = list(self.rows())
        keys = {r.key: r for r in rows}
        by_key: dict[str, list[Problem]] = {}
        loose: list[Problem] = []
        for p in problems:
            target = self._row_key_for(p.field, keys)
            if target is None:
                loose.append(p)
            else:
                by_key.setdefault(target, []).append(p)
        for row in rows:
            row.show_problems(by_key.get(row.key, []))
            if by_key.get(row.key) and not row.display:
                row.display = True  # a problem is never hidden by the filter or the advanced toggle
                if row.parent is not None:
                    row.parent.display = True
        general = self.query_one("#general-problems", Static)
        general.update(problem_text(loose, with_field=True) if loose else "")
        general.display = bool(loose)
        return loose

    @staticmethod
    def _row_key_for(field: str, keys: dict[str, ParamRow]) -> str | None:
        if field in keys:
            return field
        best: str | None = None
        for key in keys:  # `optimizer.betas[1]`, `optimizer.args.foo` → the row that holds them
            if (
                field.startswith(key)
                and field[len(key) : len(key) + 1] in ("[", ".")
                and (best is None or len(key) > len(best))
            ):
                best = key
        return best
