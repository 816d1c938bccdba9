"""Shared fixtures: every test gets its own NYX_HOME, so no test sees another's jobs."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest


@pytest.fixture
def nyx_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "nyx-home"
    home.mkdir()
    monkeypatch.setenv("NYX_HOME", str(home))
    return home


def nyx_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "nyx_tui", *args]


def run_nyx(*args: str, home: Path, timeout: float = 300, **kw: object) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NYX_HOME": str(home), "COLUMNS": "200"}
    return subprocess.run(nyx_cmd(*args), env=env, capture_output=True, text=True, timeout=timeout, **kw)  # type: ignore[call-overload,no-any-return]


def wait_for(predicate: Callable[[], object], timeout: float = 120, interval: float = 0.2) -> object:
    """Poll until `predicate()` is truthy; fail the test with a clear message otherwise."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s: {getattr(predicate, '__name__', predicate)}")
