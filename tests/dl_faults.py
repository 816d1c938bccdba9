"""A local HTTP file server with fault injection, for download tests and the download bench.

No hub is reachable from the test machines, and the failures worth testing (a connection cut mid-body, a
503 storm, a CDN that ignores ranges, a login page served with 200) never happen on cue on a real one. This
server makes each happen on cue and records what it sent, so a test can assert "no byte was sent twice".

    from dl_faults import FaultServer          # tests/ is on sys.path under pytest (no __init__.py)

    with FaultServer() as srv:                  # 127.0.0.1, a free port, one thread per connection
        r = srv.add("/repo/model.bin", b"...")  # or srv.add(path, size=N): deterministic bytes, not stored
        r.drop_after = 1_000_000                # any fault below; change them between requests at will
        url = srv.url("/repo/model.bin")        # http://127.0.0.1:PORT/repo/model.bin
        cdn = srv.url("/cdn/x", host="localhost")   # the same server as a second host (another origin)
        ...
        srv.requests("/repo/model.bin")         # [Request(...)] in arrival order
        srv.bytes_sent("/repo/model.bin")       # body bytes written for that path, all requests
        srv.max_concurrent                      # most GETs in flight at once (any path)

`Route` (what `add` returns) — content and faults, all plain attributes:
    body            `BytesBody(data)` or `PatternBody(size, seed)`; `r.sha256`, `r.size` describe it
    etag            sent as ETag and checked against If-Range (default: a quoted 32-hex tag derived from the
                    content — not a sha256, so an engine cannot take it for one); None: no ETag
    last_modified   sent as Last-Modified (also accepted in If-Range); None: not sent
    content_type    default application/octet-stream
    content_disposition   a raw Content-Disposition value (e.g. a traversal filename) or None
    extra_headers   more response headers (e.g. {"X-Linked-Etag": '"<sha256>"'} on a redirect)
    status_first, status_times, retry_after, status_body
                    answer the next `status_times` requests with `status_first` (429, 503, …), with
                    Retry-After when set, before serving normally
    drop_after, drop_times
                    cut the connection after `drop_after` body bytes, for the next `drop_times` responses
    ignore_range    always answer 200 with the whole body (a CDN that does not do ranges)
    html            answer 200 text/html with a login page instead of the file
    corrupt         flip one byte in the middle (same size, different sha256)
    redirect, redirect_status
                    answer with a redirect to `redirect` (a path on this host, or a full URL — use
                    `srv.url(path, host="localhost")` for another origin); 302 unless told
    require_token   a Bearer token: without `Authorization: Bearer <it>` → 401 with a JSON error body
    chunk, delay_s  body written `chunk` bytes at a time, sleeping `delay_s` between chunks (slow links)

`Request` (one per request, appended when it arrives, completed when it ends): method, path, query, host,
headers (lower-case names), range, if_range, auth (Authorization present?), status, bytes_sent, dropped,
t_start, t_end (time.monotonic()).

Run standalone (the bench does, so the server does not share the engine's GIL):
    python tests/dl_faults.py /big.bin=1073741824 /f0.bin=134217728 …   → prints "PORT <n>", serves until
    stdin closes or it is killed. Each file is `PatternBody(size, seed=index)`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import socket
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

__all__ = ["BytesBody", "FaultServer", "PatternBody", "Request", "Route"]

HTML_PAGE = (
    b"<!DOCTYPE html>\n<html><head><title>Log in</title></head>"
    b"<body><h1>Please log in to download this model</h1><form>...</form></body></html>\n"
)


class BytesBody:
    """Content held in memory."""

    def __init__(self, data: bytes) -> None:
        self.data = bytes(data)
        self.size = len(self.data)
        self._sha: str | None = None

    def chunks(self, start: int, end: int, chunk: int) -> Iterator[memoryview]:
        """The bytes [start, end) in pieces of at most `chunk`."""
        mv = memoryview(self.data)
        for pos in range(start, end, chunk):
            yield mv[pos : min(end, pos + chunk)]

    @property
    def sha256(self) -> str:
        if self._sha is None:
            self._sha = hashlib.sha256(self.data).hexdigest()
        return self._sha


class PatternBody:
    """`size` deterministic bytes, never stored: a 1 MiB pseudo-random block (from `seed`) repeated. Serves
    gigabytes with no memory and no disk; `data()` materialises it for small sizes."""

    BLOCK = 1 << 20

    def __init__(self, size: int, seed: int = 0) -> None:
        self.size = size
        self.block = random.Random(seed).randbytes(self.BLOCK)
        self._sha: str | None = None

    def chunks(self, start: int, end: int, chunk: int) -> Iterator[memoryview]:
        mv = memoryview(self.block)
        pos = start
        while pos < end:
            off = pos % self.BLOCK
            n = min(chunk, end - pos, self.BLOCK - off)
            yield mv[off : off + n]
            pos += n

    def data(self) -> bytes:
        return b"".join(bytes(c) for c in self.chunks(0, self.size, self.BLOCK))

    @property
    def sha256(self) -> str:
        if self._sha is None:
            h = hashlib.sha256()
            for c in self.chunks(0, self.size, self.BLOCK):
                h.update(c)
            self._sha = h.hexdigest()
        return self._sha


@dataclass
class Route:
    """One path's content and faults (see the module docstring)."""

    body: BytesBody | PatternBody
    etag: str | None = "auto"
    last_modified: str | None = "Wed, 21 Oct 2026 07:28:00 GMT"
    content_type: str = "application/octet-stream"
    content_disposition: str | None = None
    extra_headers: dict[str, str] = field(default_factory=dict)
    status_first: int | None = None
    status_times: int = 0
    retry_after: str | None = None
    status_body: bytes = b"Service Unavailable"
    drop_after: int | None = None
    drop_times: int = 1
    ignore_range: bool = False
    html: bool = False
    corrupt: bool = False
    redirect: str | None = None
    redirect_status: int = 302
    require_token: str | None = None
    chunk: int = 256 * 1024
    delay_s: float = 0.0

    def __post_init__(self) -> None:
        if self.etag == "auto":
            self.etag = f'"{self.body.sha256[:32]}"'

    @property
    def size(self) -> int:
        return self.body.size

    @property
    def sha256(self) -> str:
        """The sha256 of what a client should end up with (the uncorrupted body)."""
        return self.body.sha256

    @property
    def data(self) -> bytes:
        """The whole body (small bodies only)."""
        b = self.body
        return b.data if isinstance(b, BytesBody) else b.data()


@dataclass
class Request:
    """What the server saw and did for one request."""

    method: str
    path: str
    query: str
    host: str
    headers: dict[str, str]
    range: str | None
    if_range: str | None
    auth: bool
    status: int = 0
    bytes_sent: int = 0
    dropped: bool = False
    t_start: float = 0.0
    t_end: float = 0.0


class FaultServer:
    """The server (see the module docstring). Use as a context manager, or `start()`/`close()`."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.routes: dict[str, Route] = {}
        self.log: list[Request] = []
        self.active = 0
        self.max_concurrent = 0
        self._lock = threading.Lock()
        outer = self

        class Handler(_Handler):
            server_ref = outer

        self.httpd = ThreadingHTTPServer((host, 0), Handler)
        self.httpd.daemon_threads = True
        self.port = int(self.httpd.server_address[1])
        self._thread: threading.Thread | None = None

    # -- lifecycle
    def start(self) -> FaultServer:
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> FaultServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- content
    def add(
        self, path: str, data: bytes | None = None, *, size: int | None = None, seed: int = 0, **faults: Any
    ) -> Route:
        """Serve `data` (or `size` pattern bytes) at `path`; `faults` set `Route` attributes. Replacing a
        path's content gives it a new ETag (a file that changed on the server)."""
        body: BytesBody | PatternBody = BytesBody(data) if data is not None else PatternBody(size or 0, seed)
        route = Route(body, **faults)
        with self._lock:
            self.routes[path] = route
        return route

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        """A URL for `path`; `host="localhost"` names the same server as another origin."""
        return f"http://{host}:{self.port}{path}"

    # -- what happened
    def requests(self, path: str | None = None) -> list[Request]:
        with self._lock:
            return [r for r in self.log if path is None or r.path == path]

    def bytes_sent(self, path: str) -> int:
        return sum(r.bytes_sent for r in self.requests(path))

    def reset_log(self) -> None:
        with self._lock:
            self.log.clear()
            self.max_concurrent = 0

    def _enter(self, req: Request) -> None:
        with self._lock:
            self.log.append(req)
            self.active += 1
            self.max_concurrent = max(self.max_concurrent, self.active)

    def _leave(self) -> None:
        with self._lock:
            self.active -= 1


def _parse_range(value: str, size: int) -> tuple[int, int] | str | None:
    """(start, end exclusive), "unsatisfiable", or None (absent, malformed or multi-range: serve it all)."""
    v = value.strip()
    if not v.lower().startswith("bytes=") or "," in v:
        return None
    spec = v[6:].strip()
    first, dash, last = spec.partition("-")
    if not dash:
        return None
    try:
        if first == "":
            n = int(last)
            return (max(0, size - n), size) if n > 0 else "unsatisfiable"
        start = int(first)
        end = int(last) + 1 if last else size
    except ValueError:
        return None
    if start >= size:
        return "unsatisfiable"
    if end <= start:
        return None
    return start, min(end, size)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_ref: FaultServer

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def do_HEAD(self) -> None:
        self._handle(head=True)

    def do_GET(self) -> None:
        self._handle(head=False)

    def _handle(self, *, head: bool) -> None:
        srv = self.server_ref
        parts = urlsplit(self.path)
        headers = {k.lower(): v for k, v in self.headers.items()}
        req = Request(
            method=self.command,
            path=parts.path,
            query=parts.query,
            host=headers.get("host", ""),
            headers=headers,
            range=headers.get("range"),
            if_range=headers.get("if-range"),
            auth="authorization" in headers,
            t_start=time.monotonic(),
        )
        srv._enter(req)
        try:
            self._serve(srv, req, head)
        except (BrokenPipeError, ConnectionResetError):
            req.dropped = True
            self.close_connection = True
        finally:
            req.t_end = time.monotonic()
            srv._leave()

    def _simple(self, req: Request, status: int, body: bytes, ctype: str, extra: dict[str, str] | None = None) -> None:
        req.status = status
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if req.method != "HEAD":
            self.wfile.write(body)
            req.bytes_sent += len(body)

    def _serve(self, srv: FaultServer, req: Request, head: bool) -> None:
        with srv._lock:
            route = srv.routes.get(req.path)
            status_now = None
            if route is not None and route.status_first is not None and route.status_times > 0:
                route.status_times -= 1
                status_now = route.status_first
            drop_at = None
            if route is not None and route.drop_after is not None and route.drop_times > 0 and not head:
                route.drop_times -= 1
                drop_at = route.drop_after
        if route is None:
            self._simple(req, 404, b'{"error":"Entry not found"}', "application/json")
            return
        if route.require_token is not None and headers_auth(req) != f"Bearer {route.require_token}":
            self._simple(req, 401, b'{"error":"Unauthorized","message":"a token is required"}', "application/json")
            return
        if status_now is not None:
            extra = {"Retry-After": route.retry_after} if route.retry_after is not None else {}
            self._simple(req, status_now, route.status_body, "text/plain", extra)
            return
        if route.redirect is not None:
            extra = {"Location": route.redirect, **route.extra_headers}
            self._simple(req, route.redirect_status, b"", "text/plain", extra)
            return
        if route.html:
            self._simple(req, 200, HTML_PAGE, "text/html; charset=utf-8")
            return

        size = route.size
        start, end, status = 0, size, 200
        rng = None if route.ignore_range or req.range is None else _parse_range(req.range, size)
        if rng is not None and req.if_range is not None and req.if_range not in (route.etag, route.last_modified):
            rng = None  # the client's copy is of another version: send the whole current one
        if rng == "unsatisfiable":
            self._simple(req, 416, b"", "text/plain", {"Content-Range": f"bytes */{size}"})
            return
        if isinstance(rng, tuple):
            start, end = rng
            status = 206

        req.status = status
        self.send_response(status)
        self.send_header("Content-Type", route.content_type)
        self.send_header("Content-Length", str(end - start))
        self.send_header("Accept-Ranges", "none" if route.ignore_range else "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
        if route.etag:
            self.send_header("ETag", route.etag)
        if route.last_modified:
            self.send_header("Last-Modified", route.last_modified)
        if route.content_disposition:
            self.send_header("Content-Disposition", route.content_disposition)
        for k, v in route.extra_headers.items():
            self.send_header(k, v)
        self.end_headers()
        if head:
            return
        flip = size // 2 if route.corrupt else -1
        pos = start
        for piece in route.body.chunks(start, end, route.chunk):
            n = len(piece)
            if drop_at is not None and req.bytes_sent + n > drop_at:
                piece = piece[: drop_at - req.bytes_sent]
            if pos <= flip < pos + len(piece):
                buf = bytearray(piece)
                buf[flip - pos] ^= 0xFF
                piece = memoryview(buf)
            if len(piece):
                self.wfile.write(piece)
                req.bytes_sent += len(piece)
                pos += len(piece)
            if drop_at is not None and req.bytes_sent >= drop_at:
                req.dropped = True
                self.close_connection = True
                with contextlib.suppress(OSError):
                    self.connection.shutdown(socket.SHUT_RDWR)
                return
            if route.delay_s:
                time.sleep(route.delay_s)


def headers_auth(req: Request) -> str:
    """The Authorization header a request carried ("" when none)."""
    return req.headers.get("authorization", "")


def main(argv: list[str]) -> int:
    """`python tests/dl_faults.py PATH=SIZE …`: serve pattern files in this process until stdin closes."""
    srv = FaultServer()
    for i, spec in enumerate(argv):
        path, _, size = spec.partition("=")
        route = srv.add(path, size=int(size), seed=i, chunk=1 << 20)
        _ = route.sha256  # compute up front so the first request is not slowed
    srv.start()
    print(f"PORT {srv.port}", flush=True)
    print(json.dumps({p: r.sha256 for p, r in srv.routes.items()}), flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        sys.stdin.read()
    srv.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
