"""`nyx` in a real terminal: tmux for the keys and a hangup, a pty for stdin at EOF.

Each tmux test runs its own tmux server (`-S` socket in tmp), so a developer's sessions are never touched.
"""

from __future__ import annotations

import os
import pty
import shlex
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import wait_for

ROOT = Path(__file__).resolve().parent.parent
needs_tmux = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")


class Tmux:
    def __init__(self, socket: Path) -> None:
        self.socket = socket

    def __call__(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["tmux", "-S", str(self.socket), *args], capture_output=True, text=True, timeout=20)

    def screen(self) -> str:
        return self("capture-pane", "-p", "-t", "nyx").stdout


@pytest.fixture
def tmux(tmp_path: Path) -> Iterator[Tmux]:
    t = Tmux(tmp_path / "tmux.sock")
    yield t
    t("kill-server")


def start(tmux: Tmux, home: Path, shell_command: str) -> None:
    env = f"NYX_HOME={shlex.quote(str(home))} NYX_GPU=none TERM=xterm-256color"
    cmd = f"cd {shlex.quote(str(ROOT))} && {env} {shell_command}"
    proc = tmux("-f", "/dev/null", "new-session", "-d", "-s", "nyx", "-x", "120", "-y", "32", cmd)
    assert proc.returncode == 0, proc.stderr


def nyx_shell() -> str:
    return f"{shlex.quote(sys.executable)} -m nyx_tui"


def gone(pid: int) -> bool:
    """Exited: no such process, or a zombie waiting for a parent that is no longer ours to reap it."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return True
    return state in ("Z", "X")


@needs_tmux
def test_nyx_opens_home_and_quits_with_code_0(tmux: Tmux, nyx_home: Path) -> None:
    rc_file = nyx_home / "rc"
    start(tmux, nyx_home, f"{nyx_shell()}; echo $? > {shlex.quote(str(rc_file))}; sleep 60")
    wait_for(lambda: "No jobs yet" in tmux.screen(), timeout=30)
    screen = tmux.screen()
    assert "Nyx · jobs" in screen and "Quit" in screen
    tmux("send-keys", "-t", "nyx", "C-q")
    wait_for(rc_file.exists, timeout=15)
    assert rc_file.read_text().strip() == "0"


@needs_tmux
def test_nyx_exits_when_its_terminal_goes_away(tmux: Tmux, nyx_home: Path) -> None:
    start(tmux, nyx_home, f"exec {nyx_shell()}")
    wait_for(lambda: "No jobs yet" in tmux.screen(), timeout=30)
    pid = int(tmux("display-message", "-p", "-t", "nyx", "#{pane_pid}").stdout.strip())
    assert not gone(pid)
    tmux("kill-session", "-t", "nyx")  # the pane's terminal closes: SIGHUP
    wait_for(lambda: gone(pid), timeout=5)


def test_nyx_exits_when_stdin_hits_eof(nyx_home: Path) -> None:
    """An SSH drop can leave stdin at EOF with no SIGHUP; Textual's input thread would then spin at 100%
    CPU forever. Output goes to a live pty, stdin is a pipe whose writer is already closed."""
    master, slave = pty.openpty()
    read_end, write_end = os.pipe()
    os.close(write_end)
    env = {**os.environ, "NYX_HOME": str(nyx_home), "NYX_GPU": "none", "TERM": "xterm-256color"}
    code = "from nyx_tui.app import run; raise SystemExit(run())"
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdin=read_end, stdout=slave, stderr=slave, env=env, start_new_session=True
    )
    os.close(read_end)
    os.close(slave)

    def drain() -> None:  # keep the pty from filling up
        try:
            while os.read(master, 65536):
                pass
        except OSError:
            pass

    threading.Thread(target=drain, daemon=True).start()
    try:
        assert proc.wait(timeout=20) == 129  # 128 + SIGHUP: the terminal is gone
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)


def test_nyx_exits_on_sighup_in_a_pty(nyx_home: Path) -> None:
    master, slave = pty.openpty()
    env = {**os.environ, "NYX_HOME": str(nyx_home), "NYX_GPU": "none", "TERM": "xterm-256color"}
    code = "from nyx_tui.app import run; raise SystemExit(run())"
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True
    )
    os.close(slave)
    seen = bytearray()

    def drain() -> None:
        try:
            while chunk := os.read(master, 65536):
                seen.extend(chunk)
        except OSError:
            pass

    threading.Thread(target=drain, daemon=True).start()
    try:
        wait_for(lambda: b"Nyx" in seen, timeout=30)
        os.kill(proc.pid, signal.SIGHUP)
        assert proc.wait(timeout=10) == 129
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
