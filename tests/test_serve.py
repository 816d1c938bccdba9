"""`nyx serve`: a real server on 127.0.0.1, its page and assets over HTTP, a clean stop; the refusal of
non-loopback addresses and a clear error for a taken port. (The browser-side websocket session itself is not
driven here: that is textual-serve's protocol.)"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import wait_for

from nyx_tui import serve


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def env_for(tmp_path: Path) -> dict[str, str]:
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    return {**os.environ, "NYX_HOME": str(home), "NYX_GPU": "none", "COLUMNS": "160"}


def nyx_serve(*args: str, env: dict[str, str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nyx_tui", "serve", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def descendants(pid: int) -> set[int]:
    """Every process below `pid` (walks /proc's parent links)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], int]]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "nyx_tui", "serve", "--port", str(port)],
        env=env_for(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    yield proc, port
    if proc.poll() is None:
        for pid in descendants(proc.pid):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        proc.kill()
        proc.wait(timeout=10)


def fetch_page(port: int, **headers: str) -> httpx.Response:
    def get() -> httpx.Response | None:
        try:
            return httpx.get(f"http://127.0.0.1:{port}/", headers=headers, timeout=5)
        except httpx.TransportError:
            return None

    response = wait_for(get, timeout=30)
    assert isinstance(response, httpx.Response)
    return response


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.20"])
def test_non_loopback_is_refused_without_public(host: str, tmp_path: Path) -> None:
    done = nyx_serve("--host", host, "--port", "8123", env=env_for(tmp_path))
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert f"refusing to serve on {host}" in done.stderr
    assert "shell-equivalent" in done.stderr
    assert "ssh -L 8123:127.0.0.1:8123" in done.stderr and "--public" in done.stderr


def test_public_lifts_the_refusal(tmp_path: Path) -> None:
    """With --public the address is accepted; 192.0.2.1 (TEST-NET) is no address of this box, so the bind
    fails with its own clear message instead of opening anything."""
    done = nyx_serve("--host", "192.0.2.1", "--port", "8123", "--public", env=env_for(tmp_path))
    assert done.returncode == 1
    assert "refusing" not in done.stderr and "Traceback" not in done.stderr
    assert "not an address of this machine" in done.stderr


def test_taken_port_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = nyx_serve("--port", str(port), env=env_for(tmp_path))
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert f"port {port} on 127.0.0.1 is already in use" in done.stderr
    assert "--port" in done.stderr


def test_help_gives_the_tunnel_recipe(tmp_path: Path) -> None:
    done = nyx_serve("--help", env=env_for(tmp_path))
    assert done.returncode == 0
    assert "ssh -L 8000:127.0.0.1:8000" in " ".join(done.stdout.split())


def test_loopback_detection() -> None:
    for host in ("127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"):
        assert serve.loopback_only(host), host
    for host in ("0.0.0.0", "::", "10.0.0.5", "192.168.1.20", "2001:db8::1"):
        assert not serve.loopback_only(host), host
    with pytest.raises(serve.HostError, match="does not resolve"):
        serve.loopback_only("no-such-host.invalid")


def listening_on(port: int) -> set[str]:
    """The local addresses with a socket listening on `port` (from /proc/net/tcp and tcp6)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                address, hex_port = local.rsplit(":", 1)
                if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                    raw = bytes.fromhex(address)
                    if len(raw) == 4:
                        found.add(socket.inet_ntop(socket.AF_INET, raw[::-1]))
                    else:
                        words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
                        found.add(socket.inet_ntop(socket.AF_INET6, words))
    return found


def test_serve_answers_its_page_over_loopback_and_stops_cleanly(server: tuple[subprocess.Popen[str], int]) -> None:
    """The page a browser loads: textual-serve's, naming the session websocket on the same loopback address
    (and, behind a tunnel from another local port, on the port the browser used). Ctrl+C stops the server."""
    proc, port = server
    page = fetch_page(port)
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert f'data-session-websocket-url="ws://127.0.0.1:{port}/ws"' in page.text
    assert f"http://127.0.0.1:{port}/static/" in page.text  # its scripts come from the same server
    tunnelled = fetch_page(port, host="127.0.0.1:9000")
    assert 'data-session-websocket-url="ws://127.0.0.1:9000/ws"' in tunnelled.text
    static = re.search(r'src="(http://127\.0\.0\.1:\d+/static/[^"]+\.js)"', page.text)
    assert static, page.text[:2000]
    assert httpx.get(static.group(1), timeout=5).status_code == 200
    assert listening_on(port) == {"127.0.0.1"}  # loopback only: not the wildcard address, not IPv6
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert "Nyx in the browser: http://127.0.0.1:" in out and "ssh -L" in out
    assert not descendants(proc.pid)
