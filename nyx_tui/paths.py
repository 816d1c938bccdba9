"""Where Nyx keeps its state: one root, so users and tests isolate a whole installation with `NYX_HOME`.

Without `NYX_HOME` the platform's folders are used (platformdirs): data (jobs, the SQLite store, demo
workspace), config (settings, keymap, presets of the user's own) and cache.
"""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

APP = "nyx"


def _home() -> Path | None:
    value = os.environ.get("NYX_HOME")
    return Path(value).expanduser().resolve() if value else None


def data_dir() -> Path:
    home = _home()
    return home if home else Path(platformdirs.user_data_dir(APP))


def config_dir() -> Path:
    home = _home()
    return home / "config" if home else Path(platformdirs.user_config_dir(APP))


def cache_dir() -> Path:
    home = _home()
    return home / "cache" if home else Path(platformdirs.user_cache_dir(APP))


def jobs_dir() -> Path:
    return data_dir() / "jobs"


def db_path() -> Path:
    return data_dir() / "nyx.db"


def demo_workspace() -> Path:
    return data_dir() / "demo"
