"""Shared fixtures: every test gets its own NYX_HOME, so no test sees another's jobs."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def _no_job_outlives_the_tests(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Jobs are detached by design, so a test that fails or times out before it stops its job would leave a
    training run going after pytest exits (eating the CPU of whatever runs next). At the end of the session
    every job under this session's temp folder that is still active gets its process group signalled."""
    yield
    import json
    import signal

    for status in tmp_path_factory.getbasetemp().glob("**/jobs/*/status.json"):
        try:
            state = json.loads(status.read_text())
        except (OSError, ValueError):
            continue
        if state.get("state") not in ("starting", "running"):
            continue
        for key in ("supervisor_pid", "worker_pid"):
            pid = state.get(key)
            try:  # only our own processes: a pid of a job that ended unrecorded may have been reused
                ours = isinstance(pid, int) and pid > 1 and b"nyx_tui" in Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                ours = False
            if ours:
                assert isinstance(pid, int)
                with contextlib.suppress(OSError):
                    os.killpg(pid, signal.SIGKILL)  # a group leader (the supervisor): the worker goes with it
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)


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


@pytest.fixture(scope="session")
def demo_assets_master(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny demo model and the shapes dataset, built once per session in a subprocess (as `nyx demo` does).
    Tests use copies (`assets`), so one that edits an image or a caption cannot change another's data."""
    ws = tmp_path_factory.mktemp("demo-master")
    proc = subprocess.run([sys.executable, "-m", "nyx_tui.demo_assets", str(ws)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return ws


@pytest.fixture(scope="module")
def assets(demo_assets_master: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A private copy of the demo workspace for one test module: ws, model, dataset."""
    ws = tmp_path_factory.mktemp("ws")
    shutil.copytree(demo_assets_master, ws, dirs_exist_ok=True)
    return {"ws": ws, "model": ws / "model", "dataset": ws / "dataset"}
