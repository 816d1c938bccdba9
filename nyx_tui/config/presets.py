"""Presets: partial TOML overlays on the defaults, shipped as package data in `config/presets/*.toml`.

A preset holds only what differs from `TrainingConfig()`'s defaults, so a default that improves reaches
every preset, and a reader sees at a glance what the preset is about. They are read with
`importlib.resources` so they work from a wheel or a zip as well as from a checkout.

The user's own templates (`<config dir>/templates/*.toml`, `nyx_tui.config.templates`) are listed and
loaded here too, after the shipped ones, so every place that takes a preset name takes a template's.
"""

from __future__ import annotations

import difflib
import tomllib
from importlib import resources
from importlib.resources.abc import Traversable
from typing import Any

from nyx_tui.config.errors import ConfigError, Problem
from nyx_tui.config.io import parse_config
from nyx_tui.config.model import TrainingConfig

_SUFFIX = ".toml"


def _folder() -> Traversable:
    return resources.files("nyx_tui.config").joinpath("presets")


def builtin_presets() -> list[str]:
    """The names of the shipped presets (file names without `.toml`), sorted."""
    try:
        entries = list(_folder().iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(e.name[: -len(_SUFFIX)] for e in entries if e.name.endswith(_SUFFIX) and e.is_file())


def list_presets() -> list[str]:
    """The shipped presets (sorted), then the user's templates (sorted)."""
    from nyx_tui.config.templates import user_template_names

    return builtin_presets() + user_template_names()


def preset_text(name: str) -> str:
    """The TOML text of a shipped preset or a user template."""
    return _text(name)


def _text(name: str) -> str:
    names = list_presets()
    if name not in builtin_presets() and name in names:
        from nyx_tui.config.templates import user_template_path

        path = user_template_path(name)
        try:
            return path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(
                [Problem("preset", f"the user template {path} cannot be read: {e}", "fix or delete the file")],
                f"preset {name}",
            ) from None
    if name not in names:  # also keeps `../x` and other paths out
        close = difflib.get_close_matches(name, names, n=1, cutoff=0.5)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(
            [Problem("preset", f"unknown preset {name!r}", f"{hint}available presets: {', '.join(names) or 'none'}")],
            f"preset {name}",
        )
    return _folder().joinpath(name + _SUFFIX).read_text(encoding="utf-8")


def preset_data(name: str) -> dict[str, Any]:
    """The preset's overlay as plain data (a fresh dict each call; callers may change it)."""
    try:
        return tomllib.loads(_text(name))
    except tomllib.TOMLDecodeError as e:  # a broken shipped file: say which one
        raise ConfigError(
            [Problem(f"preset {name}", f"the preset file is not valid TOML: {e}", "fix the file (or reinstall Nyx)")]
        ) from None


def load_preset(name: str) -> TrainingConfig:
    """The defaults with the preset applied. Paths stay as written (`./images`): they are resolved against
    the folder of the config file the preset is saved into, when that file is loaded."""
    return parse_config(_text(name), base_dir=None, source=f"preset {name}")
