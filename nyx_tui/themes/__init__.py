"""Themes as data: each `*.toml` here (and in `<config>/themes/`) is one Textual `Theme`.

Keeping themes in TOML rather than code means a user can copy `nyx-dark.toml` into their config folder,
change a few colors and get a new theme without touching Python, and a bad file costs one warning, not a
crash. Fields are those of `textual.theme.Theme` (name, primary, secondary, accent, foreground, background,
surface, panel, boost, success, warning, error, dark, luminosity_spread, text_alpha) plus a `[variables]`
table of Textual CSS variables.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from textual.color import Color, ColorParseError
from textual.theme import Theme

DEFAULT_THEME = "nyx-dark"
NO_COLOR_THEME = "nyx-high-contrast"
"""Under NO_COLOR Textual renders in greys; this theme's greys stay far apart, so it stays readable."""

_COLOR_FIELDS = (
    "primary",
    "secondary",
    "accent",
    "foreground",
    "background",
    "surface",
    "panel",
    "boost",
    "success",
    "warning",
    "error",
)
_FLOAT_FIELDS = ("luminosity_spread", "text_alpha")


@dataclass
class LoadedThemes:
    """The themes that loaded, and one line per file that did not (shown to the user as a notification)."""

    themes: list[Theme] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def theme_from_data(data: dict[str, Any], source: str) -> Theme:
    """A `Theme` from a parsed TOML table. Raises ValueError naming the field that is wrong."""
    unknown = set(data) - {"name", "dark", "variables", *_COLOR_FIELDS, *_FLOAT_FIELDS}
    if unknown:
        raise ValueError(f"{source}: unknown field(s) {', '.join(sorted(unknown))}")
    name = data.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError(f"{source}: `name` must be a non-empty string")
    if not isinstance(data.get("primary"), str):
        raise ValueError(f'{source}: `primary` (a color such as "#9D7CD8") is required')
    kwargs: dict[str, Any] = {"name": name, "dark": bool(data.get("dark", True))}
    for key in _COLOR_FIELDS:
        if key in data:
            value = data[key]
            try:
                Color.parse(value)
            except (ColorParseError, TypeError, ValueError):
                raise ValueError(f"{source}: `{key}` = {value!r} is not a color") from None
            kwargs[key] = value
    for key in _FLOAT_FIELDS:
        if key in data:
            if not isinstance(data[key], int | float):
                raise ValueError(f"{source}: `{key}` must be a number")
            kwargs[key] = float(data[key])
    variables = data.get("variables", {})
    if not isinstance(variables, dict) or not all(isinstance(v, str) for v in variables.values()):
        raise ValueError(f"{source}: [variables] must map variable names to strings")
    kwargs["variables"] = dict(variables)
    return Theme(**kwargs)


def _load_text(text: str, source: str, out: LoadedThemes) -> None:
    try:
        out.themes.append(theme_from_data(tomllib.loads(text), source))
    except (tomllib.TOMLDecodeError, ValueError) as e:
        out.problems.append(f"theme {source} skipped: {e}")


def builtin_theme_names() -> list[str]:
    return sorted(p.name.removesuffix(".toml") for p in resources.files(__name__).iterdir() if p.name.endswith(".toml"))


def load_themes(user_dir: Path | None = None) -> LoadedThemes:
    """Nyx's own themes, then the user's (`<config>/themes/*.toml`; a user theme may replace a built-in
    one by using its name)."""
    out = LoadedThemes()
    for entry in sorted(resources.files(__name__).iterdir(), key=lambda p: p.name):
        if entry.name.endswith(".toml"):
            _load_text(entry.read_text(encoding="utf-8"), entry.name, out)
    if user_dir is not None and user_dir.is_dir():
        for path in sorted(user_dir.glob("*.toml")):
            try:
                text = path.read_text(encoding="utf-8")
            except OSError as e:
                out.problems.append(f"theme {path} skipped: {e}")
                continue
            _load_text(text, str(path), out)
    return out
