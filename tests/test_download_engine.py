"""The download engine against a local server that fails on cue (tests/dl_faults.py).

Each test is one way a real download goes wrong on a rented GPU box — a connection cut mid-body, a 503
storm, a CDN that ignores ranges, a login page served as the model, a token leaking to a CDN — and checks
both the outcome (the right bytes at the final path, or nothing there and a clear error) and, from the
server's request log, that the engine did not fetch a byte twice or retry what cannot succeed.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from dl_faults import FaultServer

from nyx_tui.downloads import engine, sidecar
from nyx_tui.downloads.engine import (
    content_disposition_filename,
    fetch,
    fetch_all,
    parse_retry_after,
    safe_subdir,
    sanitize_filename,
)
from nyx_tui.downloads.model import DownloadCancelled, DownloadError, DownloadsFailed, Progress, RemoteFile

ROOT = Path(__file__).resolve().parents[1]
MB = 1_000_000
pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def srv() -> Iterator[FaultServer]:
    with FaultServer() as s:
        yield s


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def quick(file: RemoteFile, dest: Path, **kw: Any) -> Path:
    """fetch with test-sized waits."""
    kw.setdefault("backoff_s", 0.01)
    kw.setdefault("min_free_bytes", 0)
    path: Path = run(fetch(file, dest, **kw))
    return path


def leftovers(dest: Path) -> list[str]:
    return sorted(p.name for p in dest.rglob("*") if p.name.endswith((".part", ".part.json")))


# ------------------------------------------------------------------------------------------- resume
def test_dropped_connection_resumes_without_refetching(srv: FaultServer, tmp_path: Path) -> None:
    r = srv.add("/m/model.safetensors", size=3 * MB, drop_after=MB, drop_times=2)
    path = quick(RemoteFile(srv.url("/m/model.safetensors"), "model.safetensors", sha256=r.sha256), tmp_path)
    assert path == tmp_path / "model.safetensors"
    assert path.read_bytes() == r.data
    reqs = srv.requests("/m/model.safetensors")
    assert [q.range for q in reqs] == [None, f"bytes={MB}-", f"bytes={2 * MB}-"]
    assert all(q.if_range == r.etag for q in reqs[1:])
    assert srv.bytes_sent("/m/model.safetensors") == r.size  # not one byte twice
    assert leftovers(tmp_path) == []


def test_part_on_disk_already_whole_gets_416_and_is_verified(srv: FaultServer, tmp_path: Path) -> None:
    r = srv.add("/whole.bin", size=MB)
    part = tmp_path / "whole.bin.part"
    part.write_bytes(r.data)
    sidecar.write(part, sidecar.PartInfo(url=srv.url("/whole.bin"), etag=r.etag, size=r.size))
    path = quick(RemoteFile(srv.url("/whole.bin"), "whole.bin", sha256=r.sha256), tmp_path)
    assert path.read_bytes() == r.data
    [q] = srv.requests("/whole.bin")
    assert (q.range, q.status, q.bytes_sent) == (f"bytes={MB}-", 416, 0)
    assert leftovers(tmp_path) == []


def test_server_ignoring_range_restarts_cleanly(srv: FaultServer, tmp_path: Path) -> None:
    r = srv.add("/norange.bin", size=2 * MB, drop_after=MB // 2, ignore_range=True)
    path = quick(RemoteFile(srv.url("/norange.bin"), "norange.bin"), tmp_path)
    assert path.read_bytes() == r.data
    reqs = srv.requests("/norange.bin")
    assert [q.status for q in reqs] == [200, 200] and reqs[1].range == f"bytes={MB // 2}-"


def test_file_changed_on_server_restarts_via_if_range(srv: FaultServer, tmp_path: Path) -> None:
    srv.add("/c.bin", size=2 * MB, seed=1, drop_after=MB)
    with pytest.raises(DownloadError):
        quick(RemoteFile(srv.url("/c.bin"), "c.bin"), tmp_path, retries=0)
    assert (tmp_path / "c.bin.part").stat().st_size == MB
    new = srv.add("/c.bin", size=2 * MB, seed=2)  # new content, new ETag
    path = quick(RemoteFile(srv.url("/c.bin"), "c.bin"), tmp_path)
    assert path.read_bytes() == new.data
    last = srv.requests("/c.bin")[-1]
    assert last.range == f"bytes={MB}-" and last.status == 200  # If-Range did not match: whole new file


def test_cancel_then_resume_in_a_new_process(srv: FaultServer, tmp_path: Path) -> None:
    """A job killed by the user and started again days later (a new process) resumes from the part; the
    server sees only the remaining bytes. The URL is signed: its query must not reach the sidecar."""
    r = srv.add("/dl/big.bin", size=4 * MB, chunk=16 * 1024, delay_s=0.004)
    script = tmp_path / "child.py"
    script.write_text(
        textwrap.dedent(
            """
            import asyncio, signal, sys
            from pathlib import Path
            from nyx_tui.downloads.engine import fetch
            from nyx_tui.downloads.model import DownloadCancelled, RemoteFile

            async def main() -> int:
                cancel = asyncio.Event()
                asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, cancel.set)
                f = RemoteFile(sys.argv[1], "big.bin", sha256=sys.argv[3], source="url:test")
                try:
                    p = await fetch(f, Path(sys.argv[2]), cancel=cancel, backoff_s=0.01, min_free_bytes=0)
                except DownloadCancelled:
                    return 3
                print(p)
                return 0

            sys.exit(asyncio.run(main()))
            """
        )
    )
    dest = tmp_path / "dest"
    url = srv.url("/dl/big.bin") + "?X-Amz-Signature=SECRET123&token=hf_SECRET"
    argv = [sys.executable, str(script), url, str(dest), r.sha256]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    part = dest / "big.bin.part"
    first = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not (part.exists() and part.stat().st_size >= MB) and time.monotonic() < deadline:
        time.sleep(0.02)
    first.send_signal(signal.SIGTERM)
    _out, err = first.communicate(timeout=30)
    assert first.returncode == 3, err
    kept = part.stat().st_size
    assert MB <= kept < r.size
    side = sidecar.sidecar_path(part).read_text()
    assert "SECRET" not in side and json.loads(side)["url"] == srv.url("/dl/big.bin")

    r.delay_s = 0
    second = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
    assert second.returncode == 0, second.stderr
    assert (dest / "big.bin").read_bytes() == r.data
    last = srv.requests("/dl/big.bin")[-1]
    assert last.range == f"bytes={kept}-" and last.status == 206
    assert last.bytes_sent == r.size - kept  # only what was missing
    assert leftovers(dest) == []


def test_cancel_event_stops_promptly_and_keeps_part(srv: FaultServer, tmp_path: Path) -> None:
    r = srv.add("/slow.bin", size=4 * MB, chunk=16 * 1024, delay_s=0.004)
    f = RemoteFile(srv.url("/slow.bin"), "slow.bin", sha256=r.sha256)

    async def go() -> float:
        cancel = asyncio.Event()

        def on_progress(p: Progress) -> None:
            if p.done >= MB // 2:
                cancel.set()

        t = 0.0
        with pytest.raises(DownloadCancelled):
            task = asyncio.ensure_future(
                fetch(f, tmp_path, cancel=cancel, on_progress=on_progress, min_free_bytes=0, backoff_s=0.01)
            )
            await cancel.wait()
            t = time.monotonic()
            await task
        return time.monotonic() - t

    assert run(go()) < 0.5
    assert leftovers(tmp_path) == ["slow.bin.part", "slow.bin.part.json"]
    r.delay_s = 0
    assert quick(f, tmp_path).read_bytes() == r.data


# ------------------------------------------------------------------------------------------- retries
def test_503_and_429_honour_retry_after(srv: FaultServer, tmp_path: Path) -> None:
    a = srv.add("/busy.bin", size=MB, status_first=503, status_times=1, retry_after="1")
    b = srv.add("/limited.bin", size=MB, status_first=429, status_times=1, retry_after="1")
    for path, route in (("/busy.bin", a), ("/limited.bin", b)):
        got = quick(RemoteFile(srv.url(path), path[1:], sha256=route.sha256), tmp_path)
        assert got.read_bytes() == route.data
        first, second = srv.requests(path)
        assert first.status in (503, 429) and second.status == 200
        assert second.t_start - first.t_end >= 0.99  # waited Retry-After, not the 10 ms backoff


def test_5xx_gives_up_after_retries_with_a_retryable_error(srv: FaultServer, tmp_path: Path) -> None:
    srv.add("/down.bin", size=1000, status_first=502, status_times=99)
    with pytest.raises(DownloadError) as e:
        quick(RemoteFile(srv.url("/down.bin"), "down.bin"), tmp_path, retries=2)
    assert e.value.retryable and e.value.status == 502 and "gave up after 2 retries" in str(e.value)
    assert len(srv.requests("/down.bin")) == 3
    assert not (tmp_path / "down.bin").exists() and leftovers(tmp_path) == []


def test_parse_retry_after() -> None:
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after("Wed, 21 Oct 2026 07:28:10 GMT", now=1792567680.0) == pytest.approx(10.0)
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None and parse_retry_after("-3") is None


def test_resolve_gives_a_fresh_url_before_each_attempt(srv: FaultServer, tmp_path: Path) -> None:
    r = srv.add("/signed.bin", size=2 * MB, drop_after=MB)
    calls: list[int] = []

    def resolve() -> str:
        calls.append(1)
        return srv.url("/signed.bin") + f"?sig={len(calls)}"

    f = RemoteFile("https://expired.invalid/x", "signed.bin", sha256=r.sha256, resolve=resolve)
    assert quick(f, tmp_path).read_bytes() == r.data
    assert [q.query for q in srv.requests("/signed.bin")] == ["sig=1", "sig=2"]


# ------------------------------------------------------------------------------------------- refusals
def test_wrong_hash_leaves_nothing_and_names_both(srv: FaultServer, tmp_path: Path) -> None:
    r = srv.add("/bad.bin", size=MB, corrupt=True)
    with pytest.raises(DownloadError) as e:
        quick(RemoteFile(srv.url("/bad.bin"), "bad.bin", sha256=r.sha256), tmp_path)
    msg = str(e.value)
    assert "sha256 mismatch" in msg and r.sha256 in msg and not e.value.retryable
    assert list(tmp_path.iterdir()) == []


def test_hub_linked_etag_on_the_redirect_is_checked(srv: FaultServer, tmp_path: Path) -> None:
    """The Hub's 302 carries the LFS sha256 in X-Linked-Etag: a corrupt CDN body is caught with no hash
    from the source."""
    cdn = srv.add("/cdn/blob", size=MB, corrupt=True)
    srv.add(
        "/org/repo/resolve/main/unet.bin",
        b"",
        redirect=srv.url("/cdn/blob", host="localhost"),
        extra_headers={"X-Linked-Etag": f'"{cdn.sha256}"', "X-Linked-Size": str(MB)},
    )
    with pytest.raises(DownloadError, match="sha256 mismatch"):
        quick(RemoteFile(srv.url("/org/repo/resolve/main/unet.bin"), "unet.bin"), tmp_path)
    cdn.corrupt = False
    assert quick(RemoteFile(srv.url("/org/repo/resolve/main/unet.bin"), "unet.bin"), tmp_path).read_bytes() == cdn.data


def test_size_mismatch_with_the_source_is_refused_before_the_body(srv: FaultServer, tmp_path: Path) -> None:
    srv.add("/short.bin", size=MB)
    with pytest.raises(DownloadError, match=f"expected {MB + 1} bytes, the server has {MB}"):
        quick(RemoteFile(srv.url("/short.bin"), "short.bin", size=MB + 1), tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("faults", "needle"),
    [
        ({"html": True}, "Please log in"),
        ({"content_type": "application/json"}, "application/json"),
    ],
)
def test_error_page_with_200_is_refused(srv: FaultServer, tmp_path: Path, faults: dict[str, Any], needle: str) -> None:
    srv.add("/model.safetensors", **faults, size=4096)
    with pytest.raises(DownloadError) as e:
        quick(RemoteFile(srv.url("/model.safetensors"), "model.safetensors"), tmp_path)
    assert needle in str(e.value) and not e.value.retryable
    assert len(srv.requests("/model.safetensors")) == 1
    assert list(tmp_path.iterdir()) == []


def test_error_body_sniffed_even_as_octet_stream(srv: FaultServer, tmp_path: Path) -> None:
    srv.add("/x.ckpt", b'{"error": "Model is gated", "code": 403}' + b" " * 100)
    with pytest.raises(DownloadError, match="Model is gated"):
        quick(RemoteFile(srv.url("/x.ckpt"), "x.ckpt"), tmp_path)
    # a file that IS json is fine
    srv.add("/config.json", b'{"error": 0.1}', content_type="application/json")
    assert quick(RemoteFile(srv.url("/config.json"), "config.json"), tmp_path).read_bytes() == b'{"error": 0.1}'


@pytest.mark.parametrize(
    ("path", "token", "status", "fix"),
    [
        ("/gated.bin", None, 401, "this needs a token: set HF_TOKEN / CIVITAI_TOKEN"),
        ("/gated.bin", "wrong", 401, "the token was refused"),
        ("/missing.bin", None, 404, "check the id/path"),
    ],
)
def test_auth_and_missing_are_not_retried(
    srv: FaultServer, tmp_path: Path, path: str, token: str | None, status: int, fix: str
) -> None:
    srv.add("/gated.bin", size=1000, require_token="right")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with pytest.raises(DownloadError) as e:
        quick(RemoteFile(srv.url(path), "f.bin", headers=headers), tmp_path)
    assert e.value.status == status and fix in str(e.value) and not e.value.retryable
    assert len(srv.requests(path)) == 1
    assert "right" not in str(e.value) and (token is None or token not in str(e.value))
    assert list(tmp_path.iterdir()) == []


def test_403_says_accept_the_terms(srv: FaultServer, tmp_path: Path) -> None:
    srv.add("/terms.bin", size=10, status_first=403, status_times=9, status_body=b"Access to model is restricted")
    with pytest.raises(DownloadError, match="accept the model's terms") as e:
        quick(RemoteFile(srv.url("/terms.bin"), "terms.bin"), tmp_path)
    assert "restricted" in str(e.value) and len(srv.requests("/terms.bin")) == 1


def test_free_disk_checked_before_any_byte(srv: FaultServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    srv.add("/huge.bin", size=1000)
    usage = type(engine.shutil.disk_usage(tmp_path))
    monkeypatch.setattr(engine.shutil, "disk_usage", lambda p: usage(10**12, 10**12 - 5 * 2**30, 5 * 2**30))
    f = RemoteFile(srv.url("/huge.bin"), "huge.bin", size=20 * 2**30)
    with pytest.raises(DownloadError) as e:
        run(fetch(f, tmp_path, min_free_bytes=2**30))
    assert "needs 20.0 GiB (+1.0 GiB margin) = 21.0 GiB, 5.0 GiB free" in str(e.value)
    assert srv.requests() == [] and list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------- names, auth
def test_traversal_filename_from_content_disposition_stays_inside(srv: FaultServer, tmp_path: Path) -> None:
    srv.add("/api/download/models/1", b"weights", content_disposition='attachment; filename="../../.evil.safetensors"')
    srv.add(
        "/api/download/models/2",
        b"weights2",
        content_disposition="attachment; filename=\"fallback.bin\"; filename*=UTF-8''..%2F..%2Fcaf%C3%A9.bin",
    )
    dest = tmp_path / "dest"
    p1 = quick(RemoteFile(srv.url("/api/download/models/1"), ""), dest)
    p2 = quick(RemoteFile(srv.url("/api/download/models/2"), ""), dest)
    assert p1 == dest / "evil.safetensors" and p1.read_bytes() == b"weights"
    assert p2 == dest / "café.bin" and p2.read_bytes() == b"weights2"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["café.bin", "dest", "evil.safetensors"]


def test_sanitize_filename_and_content_disposition() -> None:
    assert sanitize_filename("../../etc/passwd") == "passwd"
    assert sanitize_filename("..\\..\\win.ini") == "win.ini"
    assert sanitize_filename("..") == "download" and sanitize_filename("") == "download"
    assert sanitize_filename(".bashrc") == "bashrc"
    assert sanitize_filename("a\x00b\nc\u202e.bin") == "abc.bin"
    long = sanitize_filename("é" * 300 + ".safetensors")
    assert long.endswith(".safetensors") and len(long.encode()) <= 255
    assert content_disposition_filename('attachment; filename="a \\"b\\".bin"') == 'a "b".bin'
    assert content_disposition_filename("attachment; filename=plain.bin") == "plain.bin"
    assert content_disposition_filename("attachment; filename*=UTF-8''%E2%82%AC%20rates.bin") == "€ rates.bin"
    assert content_disposition_filename("inline") is None
    with pytest.raises(DownloadError):
        safe_subdir("../up")
    with pytest.raises(DownloadError):
        safe_subdir("/abs")
    assert str(safe_subdir("unet/./sub/")) == "unet/sub"


def test_unsafe_subdir_is_refused_before_any_request(srv: FaultServer, tmp_path: Path) -> None:
    srv.add("/f.bin", b"x")
    with pytest.raises(DownloadError, match="unsafe subfolder"):
        quick(RemoteFile(srv.url("/f.bin"), "f.bin", subdir="a/../../b"), tmp_path)
    assert srv.requests() == []
    assert quick(RemoteFile(srv.url("/f.bin"), "f.bin", subdir="unet"), tmp_path) == tmp_path / "unet" / "f.bin"


def test_auth_not_forwarded_to_another_host_on_redirect(srv: FaultServer, tmp_path: Path) -> None:
    """Civitai: /api/download/models/N (token) → 307 → signed CDN URL on another host (no token there)."""
    cdn = srv.add("/cdn/lora.safetensors", size=MB)
    srv.add(
        "/api/download/models/9",
        b"",
        require_token="tok",
        redirect=srv.url("/cdn/lora.safetensors", host="localhost") + "?sig=abc",
        redirect_status=307,
    )
    srv.add("/same/hop", b"", require_token="tok", redirect="/api/download/models/9")
    headers = {"Authorization": "Bearer tok", "X-Api-Key": "k"}
    f = RemoteFile(srv.url("/same/hop"), "lora.safetensors", headers=headers, sha256=cdn.sha256)
    assert quick(f, tmp_path).read_bytes() == cdn.data
    [hop] = srv.requests("/same/hop")
    [api] = srv.requests("/api/download/models/9")
    [got] = srv.requests("/cdn/lora.safetensors")
    assert hop.auth and api.auth  # same origin: the token goes along
    assert got.host.startswith("localhost") and not got.auth and "x-api-key" not in got.headers


# ------------------------------------------------------------------------------------------- many files
def test_fetch_all_respects_concurrency_and_reports_each_failure(srv: FaultServer, tmp_path: Path) -> None:
    routes = [srv.add(f"/f{i}.bin", size=256 * 1024, seed=i, chunk=16 * 1024, delay_s=0.005) for i in range(6)]
    files = [RemoteFile(srv.url(f"/f{i}.bin"), f"f{i}.bin", sha256=r.sha256) for i, r in enumerate(routes)]
    files.insert(2, RemoteFile(srv.url("/nope.bin"), "nope.bin"))
    with pytest.raises(DownloadsFailed) as e:
        run(fetch_all(files, tmp_path, concurrency=2, min_free_bytes=0, backoff_s=0.01))
    assert srv.max_concurrent == 2
    res = e.value.results
    assert [i for i, _ in e.value.failures] == [2]
    assert isinstance(res[2], DownloadError) and res[2].status == 404
    for i, r in enumerate(routes):
        assert Path(res[i + (i >= 2)]).read_bytes() == r.data

    srv.reset_log()
    paths = run(fetch_all([f for f in files if f.filename != "nope.bin"], tmp_path, concurrency=3, min_free_bytes=0))
    assert len(paths) == 6 and srv.requests() == []  # all already in place and verified: nothing fetched


def test_two_fetches_of_one_file_do_not_interleave(srv: FaultServer, tmp_path: Path) -> None:
    r = srv.add("/one.bin", size=MB, chunk=32 * 1024, delay_s=0.002)
    f = RemoteFile(srv.url("/one.bin"), "one.bin", sha256=r.sha256)

    async def both() -> list[Any]:
        kw: dict[str, Any] = {"min_free_bytes": 0, "backoff_s": 0.01}
        return list(await asyncio.gather(fetch(f, tmp_path, **kw), fetch(f, tmp_path, **kw), return_exceptions=True))

    a, b = run(both())
    ok = [x for x in (a, b) if isinstance(x, Path)]
    err = [x for x in (a, b) if isinstance(x, DownloadError)]
    assert len(ok) == 1 and len(err) == 1 and "another process" in str(err[0])
    assert ok[0].read_bytes() == r.data


def test_progress_is_throttled_with_speed_and_eta(srv: FaultServer, tmp_path: Path) -> None:
    r = srv.add("/p.bin", size=2 * MB, chunk=16 * 1024, delay_s=0.006)
    seen: list[Progress] = []
    t0 = time.monotonic()
    quick(RemoteFile(srv.url("/p.bin"), "p.bin", sha256=r.sha256, subdir="vae"), tmp_path, on_progress=seen.append)
    took = time.monotonic() - t0
    assert took > 0.5
    assert len(seen) <= took * 5 + 2
    assert all(p.filename == "vae/p.bin" and p.total == r.size for p in seen)
    assert [p.done for p in seen] == sorted(p.done for p in seen)
    assert seen[-1].done == r.size and seen[-1].eta_s == 0
    mid = [p for p in seen[1:-1] if p.speed_bps > 0]
    assert mid and all(p.eta_s is not None for p in mid)


# ------------------------------------------------------------------------------------------- the fast path
@pytest.fixture(params=["socket", "chunks"])
def body_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Run a test over both ways a body is read: straight from the socket (large plain bodies) and as the
    chunks httpx hands over (small, encoded or chunked bodies). Checks the one asked for was the one used."""
    monkeypatch.setattr(engine, "DIRECT_READ_MIN_BYTES", 0 if request.param == "socket" else 1 << 62)
    used: list[str] = []
    real = engine._body_source

    def spy(*args: Any) -> Any:
        source = real(*args)
        used.append(type(source).__name__)
        return source

    monkeypatch.setattr(engine, "_body_source", spy)
    yield request.param
    assert used and set(used) == {"_SocketSource" if request.param == "socket" else "_ChunkSource"}


def test_both_body_paths_resume_without_refetching(srv: FaultServer, tmp_path: Path, body_path: str) -> None:
    r = srv.add("/r.bin", size=3 * MB, drop_after=MB + 123, drop_times=2)
    assert quick(RemoteFile(srv.url("/r.bin"), "r.bin", sha256=r.sha256), tmp_path).read_bytes() == r.data
    reqs = srv.requests("/r.bin")
    assert [q.range for q in reqs] == [None, f"bytes={MB + 123}-", f"bytes={2 * (MB + 123)}-"]
    assert srv.bytes_sent("/r.bin") == r.size
    assert leftovers(tmp_path) == []


def test_cancel_while_a_read_is_blocked_is_prompt(srv: FaultServer, tmp_path: Path, body_path: str) -> None:
    """The server sends 512 KiB and goes silent: what came is written (progress shows it), a cancel wakes the
    read blocked on the socket at once, and a resume asks for exactly the rest."""
    half = 512 * 1024
    r = srv.add("/stall.bin", size=2 * MB, chunk=half, delay_s=5.0)
    f = RemoteFile(srv.url("/stall.bin"), "stall.bin", sha256=r.sha256)
    seen: list[int] = []

    async def go() -> float:
        cancel = asyncio.Event()

        def on_progress(p: Progress) -> None:
            seen.append(p.done)
            if p.done >= half:
                cancel.set()

        task = asyncio.ensure_future(fetch(f, tmp_path, cancel=cancel, on_progress=on_progress, min_free_bytes=0))
        await asyncio.wait_for(cancel.wait(), 3)  # the 512 KiB reached the part while the link is silent
        t = time.monotonic()
        with pytest.raises(DownloadCancelled):
            await task
        return time.monotonic() - t

    assert run(go()) < 0.5
    assert seen[-1] == half and (tmp_path / "stall.bin.part").stat().st_size == half
    r.delay_s = 0
    assert quick(f, tmp_path).read_bytes() == r.data
    last = srv.requests("/stall.bin")[-1]
    assert (last.range, last.bytes_sent) == (f"bytes={half}-", r.size - half)


def test_a_silent_connection_times_out_and_resumes(srv: FaultServer, tmp_path: Path, body_path: str) -> None:
    """Each response sends 256 KiB and stalls past the read timeout: every attempt keeps its bytes and the next
    one resumes after them (progress resets the retry count, so 4 attempts with retries=1 finish the file)."""
    quarter = 256 * 1024
    r = srv.add("/silent.bin", size=4 * quarter, chunk=quarter, delay_s=1.5)
    f = RemoteFile(srv.url("/silent.bin"), "silent.bin", sha256=r.sha256)

    async def go() -> Path:
        async with engine.make_client(timeout_s=0.3) as client:
            return await fetch(f, tmp_path, client=client, retries=1, backoff_s=0.01, min_free_bytes=0)

    assert run(go()).read_bytes() == r.data
    assert [q.range for q in srv.requests("/silent.bin")] == [None] + [f"bytes={i * quarter}-" for i in (1, 2, 3)]


def test_large_file_is_read_from_the_socket_and_verified(
    srv: FaultServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Default settings: a body from DIRECT_READ_MIN_BYTES up takes the socket path; the bytes, the hash and
    the connection handling (closed, not pooled, after it) are right, and a second file still downloads."""
    size = engine.DIRECT_READ_MIN_BYTES + 12345
    a = srv.add("/a.bin", size=size, seed=1)
    b = srv.add("/b.bin", size=MB, seed=2)
    used: list[str] = []
    real = engine._body_source
    monkeypatch.setattr(engine, "_body_source", lambda *args: used.append(type(s := real(*args)).__name__) or s)

    async def go() -> list[Path]:
        async with engine.make_client() as client:
            files = [RemoteFile(srv.url(p), p[1:], sha256=x.sha256) for p, x in (("/a.bin", a), ("/b.bin", b))]
            return [await fetch(f, tmp_path, client=client, min_free_bytes=0) for f in files]

    pa, pb = run(go())
    assert pa.read_bytes() == a.data and pb.read_bytes() == b.data
    assert used == ["_SocketSource", "_ChunkSource"]


def test_an_httpx_async_client_is_still_accepted(srv: FaultServer, tmp_path: Path) -> None:
    """The API took an httpx.AsyncClient before: its timeout and headers are used by a client made for the call."""
    r = srv.add("/compat.bin", size=MB)

    async def go() -> Path:
        async with httpx.AsyncClient(headers={"User-Agent": "compat-test"}) as client:
            return await fetch(RemoteFile(srv.url("/compat.bin"), "compat.bin"), tmp_path, client=client)

    assert run(go()).read_bytes() == r.data
    assert srv.requests("/compat.bin")[0].headers["user-agent"] == "compat-test"


def test_progress_callbacks_run_on_the_event_loop_thread(srv: FaultServer, tmp_path: Path) -> None:
    """Bodies are read on worker threads, but a callback may touch asyncio objects (set an Event, redraw a
    view): it must run on the loop's thread."""
    r = srv.add("/t.bin", size=2 * MB, chunk=64 * 1024, delay_s=0.01)
    threads: set[int] = set()

    async def go() -> int:
        await fetch(
            RemoteFile(srv.url("/t.bin"), "t.bin", sha256=r.sha256),
            tmp_path,
            on_progress=lambda p: threads.add(threading.get_ident()),
            min_free_bytes=0,
        )
        return threading.get_ident()

    assert threads == {run(go())}
