"""User settings (`<config>/settings.toml`), the keymap (`<config>/keymap.toml`) and secrets.

Settings are a pydantic model so a hand-edited file is validated the same way as everything else; a file
that does not validate costs a warning and the defaults, never a crash (the TUI must open to let the user
fix things). Writes are atomic (temp file + rename): a TUI killed mid-write leaves the old file.

Secrets (HF_TOKEN, CIVITAI_TOKEN) come from the environment or from `<config>/secrets.toml`, which is only
read when no one but its owner can read it (mode 0600): a token must never reach argv, logs or spec.json.
No Textual here: the CLI reads these too.
"""

from __future__ import annotations

import os
import stat
import tomllib
from pathlib import Path
from typing import Any

import tomli_w
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from nyx_tui import paths
from nyx_tui.jobs.jobdir import atomic_write


class Settings(BaseModel):
    """What the user chose in the TUI and expects to find again next time."""

    model_config = ConfigDict(extra="ignore")  # a newer Nyx's keys must not break an older one

    theme: str = Field(default="nyx-dark", description="Textual theme name (nyx-dark, nyx-light, nyx-high-contrast, …)")
    queue_cpu_jobs: int = Field(
        default=2, ge=1, le=32, description="queued jobs that need no GPU (downloads) run this many at once"
    )


def settings_path() -> Path:
    return paths.config_dir() / "settings.toml"


def keymap_path() -> Path:
    return paths.config_dir() / "keymap.toml"


def load_settings(path: Path | None = None) -> tuple[Settings, list[str]]:
    """The saved settings (defaults when there is no file) and the problems met reading them."""
    path = path or settings_path()
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return Settings(), []
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        return Settings(), [f"{path}: could not be read ({e}); using the defaults"]
    try:
        return Settings.model_validate(data), []
    except ValidationError as e:
        fields = ", ".join(".".join(str(p) for p in err["loc"]) for err in e.errors())
        return Settings(), [f"{path}: invalid value for {fields}; using the defaults"]


def save_settings(settings: Settings, path: Path | None = None) -> Path:
    path = path or settings_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    data = settings.model_dump(mode="json", exclude_none=True)
    atomic_write(path, "# Nyx settings; written by the TUI, safe to edit.\n" + tomli_w.dumps(data))
    return path


def load_keymap(path: Path | None = None) -> tuple[dict[str, str], list[str]]:
    """`[keys]` of keymap.toml as Textual's keymap (binding id → comma-separated keys), and problems.

    A value may be a string (`"ctrl+x"`, `"ctrl+x,f10"`) or a list of strings. Ids are not checked here:
    only the App knows which bindings exist.
    """
    path = path or keymap_path()
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}, []
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        return {}, [f"{path}: could not be read ({e}); default keys in use"]
    keys = data.get("keys", {})
    if not isinstance(keys, dict):
        return {}, [f'{path}: [keys] must be a table of binding id = "key"']
    keymap: dict[str, str] = {}
    problems: list[str] = []
    for binding_id, value in keys.items():
        if isinstance(value, str) and value.strip():
            keymap[binding_id] = ",".join(k.strip() for k in value.split(",") if k.strip())
        elif isinstance(value, list) and value and all(isinstance(v, str) and v.strip() for v in value):
            keymap[binding_id] = ",".join(v.strip() for v in value)
        else:
            problems.append(f'{path}: {binding_id!r} must be a key such as "ctrl+x" or a list of keys')
    return keymap, problems


def secrets_path() -> Path:
    return paths.config_dir() / "secrets.toml"


def get_secret(name: str, path: Path | None = None) -> str | None:
    """A token from the environment, else from secrets.toml when only its owner can read it."""
    value = os.environ.get(name)
    if value:
        return value
    path = path or secrets_path()
    try:
        mode = path.stat().st_mode
    except OSError:
        return None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        return None  # readable by others: refuse rather than spread it further (chmod 600 fixes it)
    try:
        data: dict[str, Any] = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return None
    found = data.get(name)
    return found if isinstance(found, str) and found else None
