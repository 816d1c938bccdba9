"""Fetch files over HTTP(S): resumable, verified, atomic. The one place Nyx's bytes come in from a network.

Why it is built this way (the users rent GPU boxes and pull 2–25 GB checkpoints over links that drop):

- **Resume, never refetch.** Bytes land in `<final>.part`; a sidecar `<final>.part.json` (see `sidecar`) holds
  the response's validator (ETag / Last-Modified), the expected size and sha256. A later fetch — the same
  process after a dropped connection, or a new process after a crash, a reboot, a cancel — sends
  `Range: bytes=N-` with `If-Range: <validator>`: a 206 appends; a 200 (the server ignores ranges, or the
  file changed) truncates and starts cleanly; a 416 for a part already whole goes straight to verification.
  The hash of the part on disk is computed by reading it once, then kept up to date while streaming.
- **Nothing wrong takes the final name.** Size (Content-Length / Content-Range / the source's promise) and
  sha256 (the source's, or a 64-hex `X-Linked-Etag`/`ETag` such as the Hub sends) are checked first; on a
  mismatch the part is deleted and a `DownloadError` names expected vs got. A good file is fsynced, renamed
  with `os.replace` (atomic) and its folder fsynced before the sidecar goes.
- **Error pages are not models.** A 200 whose Content-Type is HTML/JSON/XML, or whose body starts like
  `<!DOCTYPE`, `<html`, `{"error"`, is refused (unless the file asked for is itself such a text file), with
  the first ~200 characters of the body in the message — a login page saved as `model.safetensors` costs an
  hour of confusion later.
- **Transient trouble is retried; a user's mistake is not.** Transport errors (reset, timeout, a body cut
  short), 408, 429 and 5xx are retried with exponential backoff or the server's `Retry-After`, each retry
  resuming from the part; 401/403/404 fail at once with what to do about it. `RemoteFile.resolve` is
  called before every attempt, so a signed CDN URL that expired is replaced by a fresh one.
- **Tokens stay home.** Redirects are followed here, not by httpx: `RemoteFile.headers` (auth) go only to
  the origin of the file's URL. httpx itself strips only `Authorization` on a cross-origin redirect (checked
  in 0.28: other headers such as an API-key header would travel on to the CDN). Signed URLs are never
  written to a sidecar or a message (query strings are cut, see `sidecar.redact_url`).
- **The disk is checked first.** Before a byte is fetched, the folder must have the remaining bytes plus a
  margin free; a download that would fill the disk halfway through a training run's checkpoint save is worse
  than one that never starts.

Throughput (a 2-core cloud box must keep up with a datacenter link; see bench/download.py and
docs/downloads.md): HTTP goes through a synchronous `httpx.Client` on worker threads, never the event loop.
A body is read into a few reused 1 MiB buffers — a large plain one straight from the connection's socket
(`_SocketSource`), anything else as httpx hands it over — each buffer written with `os.pwrite` by the reading
thread and hashed by a second one (hashlib and the system calls release the GIL), so reading, writing and
hashing run at once on different cores with no per-chunk Python work on the loop. Progress reaches the
loop through `call_soon_threadsafe`, a few times a second.

Cancelling: set the `cancel` event. The fetch stops within one read (or at once when waiting for the network
or a backoff; a read blocked on a silent connection is woken by shutting its socket down), writes what it
already received, keeps the part and sidecar, and raises `DownloadCancelled` (see `model`). Cancelling the
task itself (`task.cancel()`) also keeps the part and raises `asyncio.CancelledError` as usual.

Two fetches of the same file (two jobs) cannot interleave: the part is held under an exclusive `flock`;
the second fails at once with a `DownloadError` saying so.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import email.utils
import fcntl
import hashlib
import os
import queue
import random
import re
import select
import shutil
import socket
import ssl
import threading
import time
import unicodedata
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any, TypeVar
from urllib.parse import unquote, urlsplit

import httpx

from nyx_tui.downloads import sidecar
from nyx_tui.downloads.model import DownloadCancelled, DownloadError, DownloadsFailed, Progress, RemoteFile

__all__ = [
    "DEFAULT_MIN_FREE_BYTES",
    "Client",
    "content_disposition_filename",
    "fetch",
    "fetch_all",
    "final_path",
    "make_client",
    "parse_retry_after",
    "safe_subdir",
    "sanitize_filename",
]

DEFAULT_MIN_FREE_BYTES = 256 * 1024 * 1024
"""Margin left free beyond the file itself: room for logs, checkpoints and the file system's own needs."""

PROGRESS_INTERVAL_S = 0.2  # at most ~5 callbacks a second per file (plus a final one): views redraw, jobs log
SPEED_WINDOW_S = 5.0  # speed is measured over the last seconds, so a stall shows within seconds
MAX_REDIRECTS = 10
MAX_BACKOFF_S = 60.0
MAX_RETRY_AFTER_S = 900.0  # a server asking for an hour's pause is treated as a failure sooner than that
SYNC_EVERY_BYTES = 64 * 1024 * 1024  # background fdatasync while streaming (see `_Fetcher._pump`)
BUFFER_BYTES = 1024 * 1024  # a body is read into reused buffers of this size (no allocation per chunk)
BUFFERS = 8  # per file: how far reading and writing may run ahead of hashing
FLUSH_S = 0.1  # a buffer is written when full, or when nothing more came for up to this long
DIRECT_READ_MIN_BYTES = 8 * 1024 * 1024  # bodies from this size are read from the socket (`_SocketSource`)
SNIFF_BYTES = 512  # how much of a body's start is looked at to tell an error page from a model

_TEXT_SUFFIXES = {".json", ".jsonl", ".html", ".htm", ".txt", ".md", ".xml", ".yaml", ".yml", ".csv", ".toml"}
_ERROR_CONTENT_TYPES = ("text/html", "application/json", "application/problem+json", "application/xml", "text/xml")
_ERROR_PREFIXES = (b"<!doctype", b"<html", b"<?xml")
_JSON_ERROR_RE = re.compile(rb'^\{\s*"(error|errors|message|detail)"\s*:')
_HEX64_RE = re.compile(r"^[0-9a-f]{64}$")
_CONTENT_RANGE_RE = re.compile(r"^\s*bytes\s+(?:(\d+)-(\d+)|\*)\s*/\s*(\d+|\*)\s*$", re.IGNORECASE)
_HASH_READ = 4 * 1024 * 1024
_T = TypeVar("_T")


# ----------------------------------------------------------------------------------------- names and paths
def sanitize_filename(name: str, default: str = "download") -> str:
    """A plain file name that is safe to create inside a folder, from whatever a server or a user said.

    A `Content-Disposition` name is attacker-controlled: `../../.bashrc` must become `bashrc`, never a path.
    Directories are stripped (both `/` and `\\`), control characters removed, leading dots and spaces
    stripped (no hidden files, no `..`), the result NFC-normalized and cut to 255 bytes (keeping the
    extension). An empty result gives `default`. Never returns a string with a path separator.
    """
    name = unicodedata.normalize("NFC", name or "")
    name = name.replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(ch for ch in name if unicodedata.category(ch) not in ("Cc", "Cf", "Zl", "Zp"))
    name = name.strip().lstrip(". ").rstrip(" ")
    if not name or name in (".", ".."):
        return default
    if len(name.encode("utf-8")) > 255:
        _stem, dot, ext = name.rpartition(".")
        ext = f".{ext}" if dot and len(ext.encode("utf-8")) <= 16 else ""
        base = name[: len(name) - len(ext)] if ext else name
        while len((base + ext).encode("utf-8")) > 255:
            base = base[:-1]
        name = base + ext
    return name


def content_disposition_filename(value: str | None) -> str | None:
    """The file name a `Content-Disposition` header offers, unsanitized (pass it to `sanitize_filename`).

    RFC 6266: `filename*=UTF-8''caf%C3%A9.bin` (RFC 5987, wins over the plain form), `filename="a b.bin"`
    (quoted string with backslash escapes) or `filename=a.bin`. None when the header has no name.
    """
    if not value:
        return None
    params: dict[str, str] = {}
    # name=value pairs; a value is a quoted string (with \-escapes) or a token up to the next ';'
    for m in re.finditer(r';\s*([A-Za-z0-9_.*-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;]*)', ";" + value.split(";", 1)[-1]):
        key, raw = m.group(1).lower(), m.group(2).strip()
        if raw.startswith('"') and raw.endswith('"') and len(raw) >= 2:
            raw = re.sub(r"\\(.)", r"\1", raw[1:-1])
        params.setdefault(key, raw)
    ext = params.get("filename*")
    if ext:
        pieces = ext.split("'", 2)  # charset'language'percent-encoded
        if len(pieces) == 3:
            try:
                return unquote(pieces[2], encoding=pieces[0] or "utf-8", errors="strict")
            except (LookupError, UnicodeDecodeError):
                pass
    plain = params.get("filename")
    return plain if plain else None


def safe_subdir(subdir: str) -> PurePosixPath:
    """`RemoteFile.subdir` as a relative path that stays below the destination: no absolute path, no `..`,
    no backslash or NUL (a repo path comes from a server too). Empty → `.`."""
    if "\\" in subdir or "\x00" in subdir:
        raise DownloadError(f"unsafe subfolder {subdir!r}", "a subfolder may not contain '\\' or NUL")
    p = PurePosixPath(subdir)
    if p.is_absolute() or any(part == ".." for part in p.parts):
        raise DownloadError(f"unsafe subfolder {subdir!r}", "a subfolder must be relative, without '..'")
    return PurePosixPath(*[part for part in p.parts if part not in ("", ".")])


def final_path(file: RemoteFile, dest_dir: Path) -> Path:
    """Where `file` ends up: `dest_dir / subdir / filename` (filename must be known)."""
    return Path(dest_dir) / safe_subdir(file.subdir) / sanitize_filename(file.filename)


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a `Retry-After` header: delta-seconds or an HTTP date. None when absent/bad."""
    if not value:
        return None
    v = value.strip()
    try:
        secs = float(v)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(v)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            return None
        return max(0.0, when.timestamp() - (time.time() if now is None else now))
    return secs if secs >= 0 and secs == secs else None


class Client:
    """Connections shared by fetches (what `make_client` returns; one per job, passed to each `fetch`).

    It wraps a *synchronous* `httpx.Client`: the engine sends requests and reads bodies on worker threads
    (see the module docstring: off the event loop a body costs a fraction of the CPU), and httpx's sync
    connection pool is thread-safe. Close it with `await client.aclose()` (or `close()`, or `async with`).
    """

    def __init__(self, http: httpx.Client) -> None:
        self.http = http

    def close(self) -> None:
        self.http.close()

    async def aclose(self) -> None:
        self.close()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


def make_client(*, timeout_s: float = 60.0) -> Client:
    """The client `fetch` makes when given none: generous read timeout (a CDN may pause), no pool timeout
    (the semaphore in `fetch_all` bounds connections), no automatic redirects (auth is handled here)."""
    return Client(
        httpx.Client(
            timeout=httpx.Timeout(timeout_s, connect=min(20.0, timeout_s), pool=None),
            follow_redirects=False,
            headers={"User-Agent": "nyx-tui/0.1 (+downloads)"},
        )
    )


def _as_client(client: Client | httpx.AsyncClient | None) -> tuple[Client, bool]:
    """The `Client` to use and whether this call owns it (closes it when done). An `httpx.AsyncClient` (the
    type this API took before) lends its timeout, headers and proxy-from-environment setting to a sync client
    made for the call; its own connections and transport are not used."""
    if isinstance(client, Client):
        return client, False
    if client is None:
        return make_client(), True
    http = httpx.Client(
        timeout=client.timeout, headers=client.headers, follow_redirects=False, trust_env=client.trust_env
    )
    return Client(http), True


# ----------------------------------------------------------------------------------------- helpers
def _origin(url: httpx.URL) -> tuple[str, str, int | None]:
    port = url.port or {"http": 80, "https": 443}.get(url.scheme)
    return (url.scheme, url.host.lower(), port)


def _strip_quotes(etag: str) -> str:
    e = etag.strip()
    if e.startswith("W/"):
        e = e[2:]
    return e.strip('"').strip()


def _sha_from_etag(value: str | None) -> str | None:
    """A 64-hex ETag is a sha256 (the Hub's `X-Linked-Etag` for LFS files); anything else is opaque."""
    if not value or value.strip().startswith("W/"):
        return None
    e = _strip_quotes(value).lower()
    return e if _HEX64_RE.match(e) else None


def _snippet(data: bytes, n: int = 200) -> str:
    text = data.decode("utf-8", errors="replace")
    return " ".join(text.split())[:n]


def _looks_like_error_page(first: bytes) -> bool:
    head = first[:SNIFF_BYTES].lstrip().lower()
    return head.startswith(_ERROR_PREFIXES) or bool(_JSON_ERROR_RE.match(head))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _hash_fd(fd: int, length: int, stop: threading.Event | None = None) -> Any:
    """sha256 of the first `length` bytes of an open file (read once, on a worker thread; `stop` ends it early,
    the result is then of no use)."""
    h = hashlib.sha256()
    pos = 0
    while pos < length and not (stop is not None and stop.is_set()):
        block = os.pread(fd, min(_HASH_READ, length - pos), pos)
        if not block:
            break
        h.update(block)
        pos += len(block)
    return h


def _hash_path(path: Path, stop: threading.Event | None = None) -> str:
    with open(path, "rb") as fh:
        return str(_hash_fd(fh.fileno(), os.fstat(fh.fileno()).st_size, stop).hexdigest())


def _pwrite_all(fd: int, data: memoryview, pos: int) -> None:
    while data:
        n = os.pwrite(fd, data, pos)
        data, pos = data[n:], pos + n


def _fdatasync_quietly(fd: int) -> None:
    with contextlib.suppress(OSError):  # a failed background sync is redone by the fsync before the rename
        os.fdatasync(fd)


# ----------------------------------------------------------------------------------------- threads
def _start_thread(fn: Callable[[], _T]) -> concurrent.futures.Future[_T]:
    """`fn()` on a new thread of its own: not the loop's default executor, where eight hour-long body reads
    would hold every worker and starve each other `to_thread` of the process."""
    fut: concurrent.futures.Future[_T] = concurrent.futures.Future()

    def work() -> None:
        if not fut.set_running_or_notify_cancel():
            return
        try:
            result = fn()
        except BaseException as e:
            fut.set_exception(e)
        else:
            fut.set_result(result)

    threading.Thread(target=work, name="nyx-download", daemon=True).start()
    return fut


async def _joined(fn: Callable[[], _T], stop: threading.Event, interrupt: Callable[[], None] | None = None) -> _T:
    """Run `fn` on its own thread and wait for it. When the waiting task is cancelled, set `stop` (and call
    `interrupt`, which wakes a read blocked on the network) and still wait for the thread before the cancel
    goes on: it uses the part's file descriptor, which must not be closed under it. `fn` checks `stop`
    between reads, so that wait is short."""
    fut = _start_thread(fn)
    try:
        return await asyncio.wrap_future(fut)
    except asyncio.CancelledError:
        stop.set()
        if interrupt is not None:
            interrupt()
        waiter = asyncio.wrap_future(fut)
        while not waiter.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait([waiter])
        if not waiter.cancelled():
            waiter.exception()  # retrieved: what the thread raised after a cancel does not matter
        raise


async def _abandoned_on_cancel(fn: Callable[[], _T], cleanup: Callable[[_T], None]) -> _T:
    """Run `fn` on its own thread; when the waiting task is cancelled, return at once and hand the result to
    `cleanup` whenever it comes (sending a request cannot be interrupted mid-connect, and touches no file)."""
    fut = _start_thread(fn)
    try:
        return await asyncio.wrap_future(fut)
    except asyncio.CancelledError:

        def late(f: concurrent.futures.Future[_T]) -> None:
            if not f.cancelled() and f.exception() is None:
                cleanup(f.result())

        fut.add_done_callback(late)
        raise


def _socket_of(resp: httpx.Response) -> socket.socket | None:
    stream = resp.extensions.get("network_stream")
    get = getattr(stream, "get_extra_info", None)
    sock = get("socket") if get is not None else None
    return sock if isinstance(sock, socket.socket) else None


def _interrupt(resp: httpx.Response) -> None:
    """Wake a thread blocked reading `resp`'s body (a cancel): shut its socket down. The connection is closed
    with the response afterwards, never reused. (`socket.socket.shutdown` on purpose: an `SSLSocket`'s own
    would drop its TLS state under the reading thread.)"""
    sock = _socket_of(resp)
    if sock is not None:
        with contextlib.suppress(OSError):
            socket.socket.shutdown(sock, socket.SHUT_RDWR)


# ----------------------------------------------------------------------------------------- body sources
class _ChunkSource:
    """A body as httpx hands it over (any framing; decoded when it has a Content-Encoding), copied into the
    pump's buffers. Reads block; run on a worker thread. `sock` (the connection's, when known) lets `wait`
    tell whether a read would block."""

    def __init__(self, chunks: Iterator[bytes], sock: socket.socket | None) -> None:
        self.chunks = chunks
        self.pending = memoryview(b"")
        self.done = False
        self.sock = sock
        self.poll: Any = None
        if sock is not None:
            with contextlib.suppress(OSError, ValueError):
                poll = select.poll()
                poll.register(sock.fileno(), select.POLLIN)
                self.poll = poll

    def wait(self, timeout: float) -> bool:
        """Wait up to `timeout` s for data; False when none came (a read now would block). True when it cannot
        tell (no socket; bytes in httpx's own buffers may still be there after a False: harmless)."""
        if self.pending or self.poll is None:
            return True
        if isinstance(self.sock, ssl.SSLSocket) and self.sock.pending():
            return True
        try:
            return bool(self.poll.poll(max(0.0, timeout) * 1000))
        except OSError:
            return True  # let the read say what is wrong

    def readinto(self, buf: memoryview) -> int:
        """Bytes put at the start of `buf`; 0 only at the end of the body (then `done`)."""
        while not self.pending:
            chunk = next(self.chunks, None)
            if chunk is None:
                self.done = True
                return 0
            self.pending = memoryview(chunk)
        n = min(len(buf), len(self.pending))
        buf[:n] = self.pending[:n]
        self.pending = self.pending[n:]
        return n


class _SocketSource(_ChunkSource):
    """A plain `Content-Length` body over HTTP/1.x read straight from the connection's socket.

    Why: httpcore reads 64 KiB at a time and each piece passes h11's buffer and becomes a new bytes object
    (several copies and a dozen Python calls per 64 KiB: 0.5 s of CPU per GiB measured on loopback, against
    0.1 s for `recv_into` a reused 1 MiB buffer — one copy, one call per read). Why it is correct: the first
    piece still comes through httpx, and h11 hands over everything it has buffered of a Content-Length body
    in one piece, so the socket then stands exactly at the rest, `length - first` bytes, read here with the
    client's read timeout. httpcore never reads the connection again: the response is closed with h11
    unfinished, which closes the connection rather than pooling it (one connection per large file). Over TLS
    the socket is the `ssl.SSLSocket`, which decrypts as it reads. Used only on httpcore's own plain or TLS
    `SyncStream` (not TLS inside an https proxy's TLS, where the socket is the outer layer).
    """

    def __init__(self, chunks: Iterator[bytes], sock: socket.socket, length: int, timeout: float | None) -> None:
        super().__init__(chunks, sock)
        self.direct, self.left, self.timeout = sock, length, timeout
        self.started = False

    def wait(self, timeout: float) -> bool:
        return not self.started or self.left <= 0 or super().wait(timeout)

    def readinto(self, buf: memoryview) -> int:
        if not self.started:
            self.started = True
            first = next(self.chunks, b"")
            self.left -= len(first)
            self.pending = memoryview(first)
            self.direct.settimeout(self.timeout)
        if self.pending:
            return super().readinto(buf)
        if self.left <= 0:
            self.done = True
            return 0
        try:
            n = self.direct.recv_into(buf, min(len(buf), self.left))
        except TimeoutError as e:
            raise httpx.ReadTimeout(f"no data for {self.timeout} s") from e
        except OSError as e:
            raise httpx.ReadError(f"{type(e).__name__}: {e}") from e
        if n == 0:
            raise httpx.RemoteProtocolError(
                f"peer closed connection without sending complete message body ({self.left} bytes missing)"
            )
        self.left -= n
        return n


def _body_source(resp: httpx.Response, encoded: bool, body_len: int | None) -> _ChunkSource:
    chunks = resp.iter_bytes() if encoded else resp.iter_raw()
    sock = _socket_of(resp)
    kind = type(resp.extensions.get("network_stream"))
    if (
        sock is not None
        and not encoded
        and body_len is not None
        and body_len >= DIRECT_READ_MIN_BYTES
        and "transfer-encoding" not in resp.headers
        and resp.http_version in ("HTTP/1.1", "HTTP/1.0")
        and kind.__name__ == "SyncStream"
        and kind.__module__.startswith("httpcore.")
    ):
        timeout = resp.request.extensions.get("timeout", {}).get("read", 60.0)
        return _SocketSource(chunks, sock, body_len, timeout)
    return _ChunkSource(chunks, sock)


class _Retry(Exception):
    """One attempt failed in a way a later one may not: back off (or wait `retry_after`) and resume."""

    def __init__(self, message: str, *, retry_after: float | None = None, status: int | None = None) -> None:
        super().__init__(message)
        self.message, self.retry_after, self.status = message, retry_after, status


class _Again(Exception):
    """Go round once more at once (not a failure): e.g. the name just learned has a part to resume."""


@dataclass
class _Linked:
    """What redirect responses said about the file (the Hub puts size and sha256 on its 302)."""

    sha256: str | None = None
    size: int | None = None


class _Meter:
    """Throttled progress: at most one callback per `PROGRESS_INTERVAL_S`, speed over a sliding window."""

    def __init__(self, label: str, cb: Callable[[Progress], None] | None) -> None:
        self.label, self.cb = label, cb
        self.total: int | None = None
        self.samples: deque[tuple[float, int]] = deque()
        self.last_emit = 0.0
        self.speed = 0.0

    def reset(self, done: int) -> None:
        """A new baseline (start, resume, restart from 0): bytes already there are not speed."""
        self.samples.clear()
        self.samples.append((time.monotonic(), done))

    def update(self, done: int, *, final: bool = False) -> None:
        if self.cb is None:
            return
        now = time.monotonic()
        if not final and now - self.last_emit < PROGRESS_INTERVAL_S:
            return
        self.last_emit = now
        if not self.samples:
            self.samples.append((now, done))
        self.samples.append((now, done))
        while len(self.samples) > 2 and now - self.samples[1][0] >= SPEED_WINDOW_S:
            self.samples.popleft()
        t0, d0 = self.samples[0]
        if now - t0 > 1e-3:
            self.speed = max(0.0, (done - d0) / (now - t0))
        eta: float | None = None
        if self.total is not None:
            left = max(0, self.total - done)
            eta = 0.0 if left == 0 else (left / self.speed if self.speed > 0 else None)
        self.cb(Progress(self.label, done, self.total, self.speed, eta))


# ----------------------------------------------------------------------------------------- one file
class _Fetcher:
    """The state of one `fetch`: the part (open and locked), bytes in it, their running hash, the sidecar."""

    def __init__(
        self,
        file: RemoteFile,
        dest_dir: Path,
        client: Client,
        *,
        on_progress: Callable[[Progress], None] | None,
        retries: int,
        backoff_s: float,
        min_free_bytes: int,
    ) -> None:
        self.file, self.dest_dir, self.http = file, Path(dest_dir), client.http
        self.retries, self.backoff_s, self.min_free_bytes = max(0, retries), max(0.0, backoff_s), min_free_bytes
        self.subdir = safe_subdir(file.subdir)
        self.expected_sha = self._check_sha(file.sha256)
        self.header_sha: str | None = None
        self.total: int | None = file.size
        self.name = sanitize_filename(file.filename) if file.filename else ""
        self.final: Path | None = None
        self.part: Path | None = None
        self.fh: IO[bytes] | None = None
        self.offset = 0
        self.hasher: Any = hashlib.sha256()
        self.info = sidecar.PartInfo(url=file.url, source=file.source, size=file.size, sha256=self.expected_sha)
        self.meter = _Meter("", on_progress)
        self.label = file.source or sidecar.redact_url(file.url)

    @staticmethod
    def _check_sha(sha: str | None) -> str | None:
        if sha is None or sha == "":
            return None
        s = sha.strip().lower()
        if not _HEX64_RE.match(s):
            raise DownloadError(f"not a sha256: {sha!r}", "the source gave a malformed hash; report it")
        return s

    # -- the part ---------------------------------------------------------------------------------
    async def _open_part(self, name: str) -> None:
        """Learn the final path, lock the part, and decide whether what is there can be resumed."""
        self.name = name
        rel = self.subdir / name
        self.final = self.dest_dir / rel
        self.part = self.final.with_name(self.final.name + ".part")
        self.meter.label = rel.as_posix()
        self.final.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.part, os.O_RDWR | os.O_CREAT, 0o644)
        fh = os.fdopen(fd, "r+b")
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            raise DownloadError(
                f"{rel.as_posix()} is being downloaded by another process", "wait for that download to finish"
            ) from None
        self.fh = fh
        size = os.fstat(fd).st_size
        old = sidecar.read(self.part)
        if size > 0 and old is not None and self._compatible(old, size):
            self.info.etag, self.info.last_modified = old.etag, old.last_modified
            self.info.size = self.info.size or old.size
            self.total = self.total or old.size
            self.header_sha = old.sha256 if not self.expected_sha else None
            stop = threading.Event()
            self.hasher = await _joined(lambda: _hash_fd(fd, size, stop), stop)
            self.offset = size
        else:
            self._truncate()
            sidecar.remove(self.part)
        self.meter.total = self.total
        self.meter.reset(self.offset)

    def _compatible(self, old: sidecar.PartInfo, size: int) -> bool:
        """Is the part on disk a prefix of the file asked for now? (Same promised size/hash/source, and a way
        to ask the server whether its file is still the one: a validator, or a hash to check at the end.)"""
        if old.size is not None and self.file.size is not None and old.size != self.file.size:
            return False
        if old.sha256 and self.expected_sha and old.sha256 != self.expected_sha:
            return False
        if old.source and self.file.source and old.source != self.file.source:
            return False
        if old.size is not None and size > old.size:
            return False
        return bool(old.validator or old.sha256 or self.expected_sha)

    def _truncate(self) -> None:
        assert self.fh is not None
        os.ftruncate(self.fh.fileno(), 0)
        self.offset = 0
        self.hasher = hashlib.sha256()
        self.meter.reset(0)

    def _close_part(self, *, drop_if_empty: bool) -> None:
        """Flush and unlock. An empty part we own (nothing worth resuming) is removed first, while still
        locked — never one another process holds."""
        fh, self.fh = self.fh, None
        if fh is None:
            return
        with contextlib.suppress(OSError):
            fh.flush()
            if drop_if_empty and self.part is not None and self.offset == 0 and os.fstat(fh.fileno()).st_size == 0:
                self.part.unlink()
                sidecar.remove(self.part)
        fh.close()

    def _discard(self) -> None:
        """A part that can never become the file (wrong size or hash): delete it and its sidecar."""
        if self.fh is not None:
            self.fh.close()
            self.fh = None
        if self.part is not None:
            self.part.unlink(missing_ok=True)
            sidecar.remove(self.part)
        self.offset = 0

    # -- checks -----------------------------------------------------------------------------------
    def _check_free(self, remaining: int) -> None:
        where = self.final.parent if self.final is not None else self.dest_dir
        probe = where
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        free = shutil.disk_usage(probe).free
        need = remaining + self.min_free_bytes
        if free < need:
            raise DownloadError(
                f"not enough free disk for {self.meter.label or self.label}: needs {_fmt(remaining)} "
                f"(+{_fmt(self.min_free_bytes)} margin) = {_fmt(need)}, {_fmt(free)} free in {probe}",
                "free some space or choose another destination folder",
            )

    def _status_error(self, status: int, url: httpx.URL, body: bytes) -> DownloadError:
        where = f"{self.label}: HTTP {status} from {url.host}"
        detail = f": {_snippet(body)}" if body.strip() else ""
        has_auth = any(k.lower() == "authorization" for k in self.file.headers)
        if status == 401:
            fix = (
                "the token was refused: check HF_TOKEN / CIVITAI_TOKEN"
                if has_auth
                else "this needs a token: set HF_TOKEN / CIVITAI_TOKEN"
            )
        elif status == 403:
            fix = "accept the model's terms on its page / your token lacks access"
        elif status == 404:
            fix = "check the id/path"
        else:
            fix = "the server refused the request"
        return DownloadError(where + detail, fix, retryable=False, status=status)

    # -- one request ------------------------------------------------------------------------------
    def _send(self, url: str, headers: dict[str, str], linked: _Linked) -> httpx.Response:
        """GET following redirects by hand (on a worker thread): the file's own headers (auth) go to its URL's
        origin only. Returns the final response, its body not read yet; the caller closes it."""
        current = httpx.URL(url)
        origin = _origin(current)
        for _ in range(MAX_REDIRECTS + 1):
            if current.scheme not in ("http", "https"):
                raise DownloadError(f"{self.label}: unsupported URL scheme {current.scheme!r}", "use http(s)")
            h = dict(self.file.headers) if _origin(current) == origin else {}
            h.update(headers)
            request = self.http.build_request("GET", current, headers=h)
            response = self.http.send(request, stream=True, follow_redirects=False)
            location = response.headers.get("location")
            if response.status_code in (301, 302, 303, 307, 308) and location:
                linked.sha256 = linked.sha256 or _sha_from_etag(response.headers.get("x-linked-etag"))
                size = response.headers.get("x-linked-size")
                if size and size.isdigit() and linked.size is None:
                    linked.size = int(size)
                response.close()
                current = current.join(location)
                continue
            return response
        raise DownloadError(f"{self.label}: more than {MAX_REDIRECTS} redirects", "check the URL")

    async def _attempt(self, url: str) -> bool:
        """One GET. True when the part now holds the whole file (verify next); raises `_Retry`, `_Again` or
        `DownloadError`."""
        headers = {"Accept-Encoding": "identity"}
        if self.offset > 0:
            headers["Range"] = f"bytes={self.offset}-"
            if self.info.validator:
                headers["If-Range"] = self.info.validator
        linked = _Linked()
        resp = await _abandoned_on_cancel(lambda: self._send(url, headers, linked), _close_response)
        try:
            status = resp.status_code
            if status in (408, 429) or status >= 500:
                body = await _read_some(resp, 2048)
                raise _Retry(
                    f"HTTP {status}{': ' + _snippet(body) if body.strip() else ''}",
                    retry_after=parse_retry_after(resp.headers.get("retry-after")),
                    status=status,
                )
            if status == 416:
                return self._on_416(resp)
            if status not in (200, 206):
                body = await _read_some(resp, 2048)
                raise self._status_error(status, resp.url, body)

            if self.part is None:  # the name comes from the response
                cd = content_disposition_filename(resp.headers.get("content-disposition"))
                name = sanitize_filename(cd or "", default="")
                if not name:
                    name = sanitize_filename(unquote(resp.url.path.rsplit("/", 1)[-1]), default="")
                if not name:
                    name = sanitize_filename(unquote(urlsplit(url).path.rsplit("/", 1)[-1]))
                await self._open_part(name)
                if self.offset > 0:
                    raise _Again()  # ask again with a Range for what is missing

            encoded = resp.headers.get("content-encoding", "identity").lower() not in ("identity", "")
            length = resp.headers.get("content-length")
            body_len = int(length) if length and length.isdigit() and not encoded else None
            start = 0
            server_total: int | None = None
            if status == 206:
                m = _CONTENT_RANGE_RE.match(resp.headers.get("content-range", ""))
                if not m or m.group(1) is None:
                    raise _Retry("206 without a usable Content-Range")
                start = int(m.group(1))
                server_total = int(m.group(3)) if m.group(3) != "*" else None
                if start != self.offset:
                    # not the range we asked for: the part cannot be trusted to line up; start over
                    self._truncate()
                    sidecar.remove(self._part())
                    raise _Retry(f"asked for bytes from {self.offset}, got a range from {start}")
            else:
                server_total = body_len
                if self.offset > 0:  # 200 to a Range: ignored, or the file changed (If-Range) — start over
                    self._truncate()

            self._learn(resp, linked, server_total)
            await self._stream(resp, encoded, body_len)
        finally:
            resp.close()
        if self.total is not None and self.offset < self.total:
            raise _Retry(f"connection closed at {self.offset} of {self.total} bytes")
        return True

    def _part(self) -> Path:
        assert self.part is not None
        return self.part

    def _on_416(self, resp: httpx.Response) -> bool:
        """Range not satisfiable: fine when the part is already whole (verify it), else the part is longer
        than the file now is — start over."""
        m = _CONTENT_RANGE_RE.match(resp.headers.get("content-range", ""))
        server_total = int(m.group(3)) if m and m.group(3) != "*" else None
        whole = self.total if self.total is not None else server_total
        if self.offset > 0 and whole is not None and self.offset == whole and server_total in (None, whole):
            self.total = whole
            return True
        if self.part is not None and self.fh is not None:
            self._truncate()
            sidecar.remove(self.part)
        raise _Retry(f"HTTP 416 for a part of {self.offset} bytes (server size {server_total})", status=416)

    def _learn(self, resp: httpx.Response, linked: _Linked, server_total: int | None) -> None:
        """Size, hash and validators from the response; refuse a size that contradicts the source; write the
        sidecar before the first byte of this response lands in the part."""
        promised = self.file.size if self.file.size is not None else linked.size
        if server_total is not None and promised is not None and server_total != promised:
            self._discard()
            raise DownloadError(
                f"{self.meter.label}: size mismatch: expected {promised} bytes, the server has {server_total}",
                "the file on the server is not the one the source describes; try again later or report it",
            )
        self.total = server_total if server_total is not None else (promised if promised is not None else self.total)
        if not self.expected_sha:
            self.header_sha = linked.sha256 or _sha_from_etag(resp.headers.get("etag")) or self.header_sha
        self.info.etag = resp.headers.get("etag")
        self.info.last_modified = resp.headers.get("last-modified")
        self.info.size = self.total
        self.info.sha256 = self.expected_sha or self.header_sha
        self.meter.total = self.total
        sidecar.write(self._part(), self.info)
        if self.total is not None:
            self._check_free(self.total - self.offset)

    async def _stream(self, resp: httpx.Response, encoded: bool, body_len: int | None) -> None:
        """Body → part, hashed, with progress: `_pump` on a worker thread; a cancel stops it within one read
        (a blocked read is woken by shutting the socket down) and waits for it to finish writing."""
        source = _body_source(resp, encoded, body_len)
        stop = threading.Event()
        post: Callable[[int], None] | None = None
        if self.meter.cb is not None:
            loop, update = asyncio.get_running_loop(), self.meter.update

            def post(done: int) -> None:  # on the pump's thread: the callback runs on the loop
                loop.call_soon_threadsafe(update, done)

        await _joined(lambda: self._pump(resp, source, stop, post), stop, lambda: _interrupt(resp))

    def _pump(
        self, resp: httpx.Response, source: _ChunkSource, stop: threading.Event, post: Callable[[int], None] | None
    ) -> None:
        """On a worker thread: fill a buffer, write it at the part's end, hand it to the hashing thread, repeat.

        A buffer is written when full, when the body ends or `stop` is set, and `FLUSH_S` after it was begun
        or sooner when nothing more is arriving — so a slow or stalled link has what it sent on disk and in
        the progress. The first bytes of a body written from 0 are looked at before any is kept. What was
        received before an error or a stop is still written and hashed, so a resume asks for exactly the
        rest. Sets `self.offset` (= bytes in the part = bytes hashed) when done, however it ends."""
        assert self.fh is not None
        fd = self.fh.fileno()
        hasher, offset = self.hasher, self.offset
        sniff = SNIFF_BYTES if offset == 0 else 0  # bytes needed before the error-page check; 0: checked
        free: queue.SimpleQueue[bytearray] = queue.SimpleQueue()
        for _ in range(BUFFERS):
            free.put(bytearray(BUFFER_BYTES))
        hashing: queue.SimpleQueue[tuple[bytearray, int] | None] = queue.SimpleQueue()

        def hash_loop() -> None:
            while (item := hashing.get()) is not None:
                buf, n = item
                hasher.update(memoryview(buf)[:n])
                free.put(buf)

        hash_thread = threading.Thread(target=hash_loop, name="nyx-download-hash", daemon=True)
        hash_thread.start()
        # Flush to disk in the background as we go, so the fsync before the rename has little left to do
        # (on a 1 GiB file it was a quarter of the time when left to the end).
        next_sync = offset + SYNC_EVERY_BYTES
        syncing: threading.Thread | None = None
        last_post = 0.0
        try:
            while not source.done and not stop.is_set():
                buf = free.get()
                mv = memoryview(buf)
                n, error = 0, None
                t0 = time.monotonic()
                try:
                    while n < BUFFER_BYTES:
                        if n and n >= sniff:
                            left = t0 + FLUSH_S - time.monotonic()
                            if stop.is_set() or left <= 0 or not source.wait(left):
                                break
                        got = source.readinto(mv[n:])
                        if got == 0:
                            break
                        n += got
                except Exception as e:  # written first (below), raised after
                    error = e
                if sniff:
                    if n < sniff and not source.done:  # cut short before the body could be judged: keep nothing
                        if error is not None:
                            raise error
                        return
                    self._refuse_error_page(resp, bytes(mv[: min(n, 4 * SNIFF_BYTES)]))
                    sniff = 0
                if n:
                    _pwrite_all(fd, mv[:n], offset)
                    offset += n
                    hashing.put((buf, n))
                else:
                    free.put(buf)
                if error is not None:
                    raise error
                if offset >= next_sync and (syncing is None or not syncing.is_alive()):
                    syncing = threading.Thread(target=_fdatasync_quietly, args=(fd,), daemon=True)
                    syncing.start()
                    next_sync = offset + SYNC_EVERY_BYTES
                if post is not None and (now := time.monotonic()) - last_post >= PROGRESS_INTERVAL_S / 2:
                    last_post = now
                    post(offset)
        finally:
            hashing.put(None)
            hash_thread.join()
            if syncing is not None:  # never let the file be closed under a sync still running
                syncing.join()
            self.offset = offset

    def _refuse_error_page(self, resp: httpx.Response, first: bytes) -> None:
        if Path(self.name).suffix.lower() in _TEXT_SUFFIXES:
            return
        ctype = resp.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if ctype in _ERROR_CONTENT_TYPES or _looks_like_error_page(first):
            what = ctype or "an error page"
            self._discard()
            raise DownloadError(
                f"{self.label}: the server sent {what} instead of {self.name}: {_snippet(first)!r}",
                "the link may need a token or point at a web page, not the file; open it in a browser to see",
            )

    # -- the whole fetch --------------------------------------------------------------------------
    async def _verify_and_place(self) -> Path:
        assert self.final is not None and self.part is not None and self.fh is not None
        fh = self.fh
        fh.flush()
        if self.total is not None and self.offset != self.total:
            got = self.offset
            self._discard()
            raise DownloadError(
                f"{self.meter.label}: size mismatch: expected {self.total} bytes, got {got}",
                "try again; if it repeats, the server is sending a different file",
            )
        want = self.expected_sha or self.header_sha
        got_sha = self.hasher.hexdigest()
        if want and got_sha != want:
            self._discard()
            raise DownloadError(
                f"{self.meter.label}: sha256 mismatch: expected {want}, got {got_sha}",
                "the downloaded bytes are not the promised file; the part was deleted — try again later or report it",
            )
        await asyncio.to_thread(os.fsync, fh.fileno())
        os.replace(self.part, self.final)
        await asyncio.to_thread(_fsync_dir, self.final.parent)
        sidecar.remove(self.part)
        self.fh = None
        fh.close()  # the lock goes with it; the inode is the final file now
        self.meter.total = self.offset if self.total is None else self.total
        self.meter.update(self.offset, final=True)
        return self.final

    async def _existing(self) -> Path | None:
        """The final file already there and provably the one asked for (the promised sha256, or at least the
        promised size when no hash is known): nothing to fetch."""
        if not self.name or (self.file.size is None and not self.expected_sha):
            return None
        final = self.dest_dir / self.subdir / self.name
        try:
            st = final.stat()
        except OSError:
            return None
        if self.file.size is not None and st.st_size != self.file.size:
            return None
        stop = threading.Event()
        if self.expected_sha and await _joined(lambda: _hash_path(final, stop), stop) != self.expected_sha:
            return None
        self.meter.label = (self.subdir / self.name).as_posix()
        self.meter.total = st.st_size
        self.meter.reset(st.st_size)
        self.meter.update(st.st_size, final=True)
        return final

    async def _url(self) -> str:
        if self.file.resolve is None:
            return self.file.url
        try:
            return await asyncio.to_thread(self.file.resolve)
        except DownloadError:
            raise
        except Exception as e:  # a source's resolver failing is a transient failure like any other
            raise _Retry(f"could not get a fresh URL: {e}") from e

    async def run(self) -> Path:
        if (done := await self._existing()) is not None:
            return done
        try:
            if self.name:
                await self._open_part(self.name)
                if self.total is not None:
                    self._check_free(self.total - self.offset)
            failures = 0
            last = ""
            while True:
                before = self.offset
                try:
                    url = await self._url()
                    if await self._attempt(url):
                        return await self._verify_and_place()
                except _Again:
                    continue
                except (_Retry, httpx.TransportError) as e:
                    if isinstance(e, _Retry):
                        last, retry_after = e.message, e.retry_after
                    else:
                        last, retry_after = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__, None
                    if isinstance(e, httpx.UnsupportedProtocol):
                        raise DownloadError(f"{self.label}: {last}", "check the URL") from e
                    failures = 1 if self.offset > before else failures + 1  # progress resets the count
                    if failures > self.retries:
                        raise DownloadError(
                            f"{self.meter.label or self.label}: gave up after {self.retries} retries: {last}",
                            "check the connection and run the download again; it resumes where it stopped",
                            retryable=True,
                            status=e.status if isinstance(e, _Retry) else None,
                        ) from e
                    if retry_after is not None:
                        delay = min(retry_after, MAX_RETRY_AFTER_S)
                    else:
                        delay = min(MAX_BACKOFF_S, self.backoff_s * 2 ** (failures - 1)) * random.uniform(0.8, 1.2)
                    await asyncio.sleep(delay)
                except OSError as e:
                    raise DownloadError(
                        f"{self.meter.label or self.label}: cannot write the file: {e}",
                        "check free space and permissions of the destination; the part is kept for a resume",
                    ) from e
        finally:
            self._close_part(drop_if_empty=True)


async def _read_some(resp: httpx.Response, limit: int) -> bytes:
    """Up to `limit` bytes of an error body, for the message (never the whole thing)."""

    def read() -> bytes:
        out = b""
        with contextlib.suppress(httpx.HTTPError):
            for chunk in resp.iter_raw():
                out += chunk
                if len(out) >= limit:
                    break
        return out[:limit]

    return await _joined(read, threading.Event(), lambda: _interrupt(resp))


def _close_response(resp: httpx.Response) -> None:
    with contextlib.suppress(Exception):
        resp.close()


def _fmt(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


async def _race_cancel(coro: Any, cancel: asyncio.Event | None, where: str) -> Any:
    """Run `coro`; if `cancel` is set first, cancel it (its cleanup keeps the part) and raise
    `DownloadCancelled`. A result that arrived in the same instant wins over the cancel."""
    if cancel is None:
        return await coro
    task = asyncio.ensure_future(coro)
    if cancel.is_set():
        task.cancel()
    waiter = asyncio.ensure_future(cancel.wait())
    try:
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        waiter.cancel()
        await asyncio.gather(task, waiter, return_exceptions=True)
        raise
    waiter.cancel()
    if not task.done():
        task.cancel()
    try:
        return await task
    except asyncio.CancelledError:
        if cancel.is_set():
            raise DownloadCancelled(f"cancelled: {where}", path=where) from None
        raise


# ----------------------------------------------------------------------------------------- public API
async def fetch(
    file: RemoteFile,
    dest_dir: Path,
    *,
    client: Client | httpx.AsyncClient | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    cancel: asyncio.Event | None = None,
    retries: int = 5,
    backoff_s: float = 1.0,
    min_free_bytes: int = DEFAULT_MIN_FREE_BYTES,
) -> Path:
    """Fetch one file to `dest_dir / file.subdir / file.filename` and return that path.

    An empty `file.filename` is taken from the response (`Content-Disposition`, else the URL's last path
    segment), sanitized. Resumes a `.part` left by any earlier attempt. `retries` counts consecutive failed
    attempts (an attempt that brought bytes resets it, so a link that drops every few minutes still finishes
    a 20 GB file); waits are `backoff_s · 2^n` (±20 %, at most 60 s) or the server's `Retry-After`.
    A final file already in place with the promised sha256 (or, with no hash known, the promised size) is
    returned as is, without a request.

    `on_progress` gets `Progress` at most ~5 times a second plus once at the end; its `filename` is the path
    relative to `dest_dir`. Raises `DownloadError` (see its `retryable`/`status`/`fix`), or
    `DownloadCancelled` when `cancel` was set (the part is kept). Pass `client` (from `make_client`) to share
    connections; put auth in `file.headers`, never in the client's default headers (those would follow
    redirects to any host).
    """
    label = file.source or sidecar.redact_url(file.url)
    if cancel is not None and cancel.is_set():
        raise DownloadCancelled(f"cancelled before start: {label}", path=label)
    http, own = _as_client(client)
    try:
        fetcher = _Fetcher(
            file,
            Path(dest_dir),
            http,
            on_progress=on_progress,
            retries=retries,
            backoff_s=backoff_s,
            min_free_bytes=min_free_bytes,
        )
        result: Path = await _race_cancel(fetcher.run(), cancel, label)
        return result
    finally:
        if own:
            http.close()


async def fetch_all(
    files: Iterable[RemoteFile],
    dest_dir: Path,
    *,
    concurrency: int = 4,
    fail_fast: bool = False,
    client: Client | httpx.AsyncClient | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    cancel: asyncio.Event | None = None,
    retries: int = 5,
    backoff_s: float = 1.0,
    min_free_bytes: int = DEFAULT_MIN_FREE_BYTES,
) -> list[Path]:
    """Fetch many files, at most `concurrency` at a time, over one shared client; return their paths in order.

    One file failing does not stop the others (a 20-file repo with one gated file still brings 19) unless
    `fail_fast` (then the rest are cancelled, their parts kept). If any file did not arrive, raises
    `DownloadsFailed` after all have finished: its `results` list holds a `Path` or the exception for each
    file, in the order given, and `failures` the (index, exception) pairs. If `cancel` was set and every
    failure is a cancel, raises `DownloadCancelled` instead. Two files with the same destination are refused
    before any request.
    """
    todo = list(files)
    seen: dict[Path, int] = {}
    for i, f in enumerate(todo):
        if f.filename:
            p = final_path(f, Path(dest_dir))
            if p in seen:
                raise DownloadError(
                    f"files {seen[p]} and {i} would both be written to {p}", "give them different names or subfolders"
                )
            seen[p] = i
    sem = asyncio.Semaphore(max(1, concurrency))
    http, own = _as_client(client)

    async def one(f: RemoteFile) -> Path:
        async with sem:
            return await fetch(
                f,
                dest_dir,
                client=http,
                on_progress=on_progress,
                cancel=cancel,
                retries=retries,
                backoff_s=backoff_s,
                min_free_bytes=min_free_bytes,
            )

    try:
        tasks = [asyncio.ensure_future(one(f)) for f in todo]
        if fail_fast and tasks:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for t in tasks:
                t.cancel()
        gathered = await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        if own:
            http.close()
    results: list[Path | BaseException] = []
    for f, r in zip(todo, gathered, strict=True):
        if isinstance(r, asyncio.CancelledError):
            r = DownloadCancelled(f"cancelled after another file failed: {f.source or f.filename}")
        results.append(r)
    failed = [r for r in results if isinstance(r, BaseException)]
    if not failed:
        return [r for r in results if isinstance(r, Path)]
    if cancel is not None and cancel.is_set() and all(isinstance(r, DownloadCancelled) for r in failed):
        raise DownloadCancelled(f"cancelled with {len(failed)} of {len(todo)} files not done")
    errors = [r for r in failed if not isinstance(r, DownloadCancelled)]
    first = errors[0] if errors else failed[0]
    raise DownloadsFailed(
        f"{len(failed)} of {len(todo)} files failed; first: {first}",
        results,
        getattr(first, "fix", ""),
        retryable=all(getattr(r, "retryable", False) for r in errors),
    )
