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

Cancelling: set the `cancel` event. The fetch stops within a chunk (or at once when waiting for the network
or a backoff), keeps the part and sidecar, and raises `DownloadCancelled` (see `model`). Cancelling the task
itself (`task.cancel()`) also keeps the part and raises `asyncio.CancelledError` as usual.

Two fetches of the same file (two jobs) cannot interleave: the part is held under an exclusive `flock`;
the second fails at once with a `DownloadError` saying so.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import fcntl
import hashlib
import os
import random
import re
import shutil
import time
import unicodedata
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any
from urllib.parse import unquote, urlsplit

import httpx

from nyx_tui.downloads import sidecar
from nyx_tui.downloads.model import DownloadCancelled, DownloadError, DownloadsFailed, Progress, RemoteFile

__all__ = [
    "DEFAULT_MIN_FREE_BYTES",
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
SYNC_EVERY_BYTES = 64 * 1024 * 1024  # background fdatasync while streaming (see `_Fetcher._stream`)
SNIFF_BYTES = 512  # how much of a body's start is looked at to tell an error page from a model

_TEXT_SUFFIXES = {".json", ".jsonl", ".html", ".htm", ".txt", ".md", ".xml", ".yaml", ".yml", ".csv", ".toml"}
_ERROR_CONTENT_TYPES = ("text/html", "application/json", "application/problem+json", "application/xml", "text/xml")
_ERROR_PREFIXES = (b"<!doctype", b"<html", b"<?xml")
_JSON_ERROR_RE = re.compile(rb'^\{\s*"(error|errors|message|detail)"\s*:')
_HEX64_RE = re.compile(r"^[0-9a-f]{64}$")
_CONTENT_RANGE_RE = re.compile(r"^\s*bytes\s+(?:(\d+)-(\d+)|\*)\s*/\s*(\d+|\*)\s*$", re.IGNORECASE)
_HASH_READ = 4 * 1024 * 1024


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


def make_client(*, timeout_s: float = 60.0) -> httpx.AsyncClient:
    """The client `fetch` makes when given none: generous read timeout (a CDN may pause), no pool timeout
    (the semaphore in `fetch_all` bounds connections), no automatic redirects (auth is handled here)."""
    return httpx.AsyncClient(
        timeout=httpx.Timeout(timeout_s, connect=min(20.0, timeout_s), pool=None),
        follow_redirects=False,
        headers={"User-Agent": "nyx-tui/0.1 (+downloads)"},
    )


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


def _hash_file(fh: IO[bytes], length: int) -> Any:
    """sha256 of the first `length` bytes of an open file (read once, in a worker thread)."""
    h = hashlib.sha256()
    fh.seek(0)
    left = length
    while left > 0:
        block = fh.read(min(_HASH_READ, left))
        if not block:
            break
        h.update(block)
        left -= len(block)
    return h


def _hash_path(path: Path) -> str:
    with open(path, "rb") as fh:
        return str(_hash_file(fh, os.fstat(fh.fileno()).st_size).hexdigest())


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
        client: httpx.AsyncClient,
        *,
        on_progress: Callable[[Progress], None] | None,
        retries: int,
        backoff_s: float,
        min_free_bytes: int,
    ) -> None:
        self.file, self.dest_dir, self.client = file, Path(dest_dir), client
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
            self.hasher = await asyncio.to_thread(_hash_file, fh, size)
            self.offset = size
        else:
            self._truncate()
            sidecar.remove(self.part)
        fh.seek(self.offset)
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
        self.fh.seek(0)
        self.fh.truncate(0)
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
    @contextlib.asynccontextmanager
    async def _open(self, url: str, headers: dict[str, str], linked: _Linked) -> AsyncIterator[httpx.Response]:
        """GET following redirects by hand: the file's own headers (auth) go to its URL's origin only."""
        current = httpx.URL(url)
        origin = _origin(current)
        for _ in range(MAX_REDIRECTS + 1):
            if current.scheme not in ("http", "https"):
                raise DownloadError(f"{self.label}: unsupported URL scheme {current.scheme!r}", "use http(s)")
            h = dict(self.file.headers) if _origin(current) == origin else {}
            h.update(headers)
            request = self.client.build_request("GET", current, headers=h)
            response = await self.client.send(request, stream=True, follow_redirects=False)
            location = response.headers.get("location")
            if response.status_code in (301, 302, 303, 307, 308) and location:
                linked.sha256 = linked.sha256 or _sha_from_etag(response.headers.get("x-linked-etag"))
                size = response.headers.get("x-linked-size")
                if size and size.isdigit() and linked.size is None:
                    linked.size = int(size)
                await response.aclose()
                current = current.join(location)
                continue
            try:
                yield response
            finally:
                await response.aclose()
            return
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
        async with self._open(url, headers, linked) as resp:
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
            await self._stream(resp, encoded)
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

    async def _stream(self, resp: httpx.Response, encoded: bool) -> None:
        """Body → part, hash and progress as it comes; the first bytes are looked at before any is kept."""
        fh = self.fh
        assert fh is not None
        chunks = resp.aiter_bytes() if encoded else resp.aiter_raw()
        first = b""
        if self.offset == 0:
            async for chunk in chunks:
                first += chunk
                if len(first) >= SNIFF_BYTES:
                    break
            self._refuse_error_page(resp, first)
            if first:
                self._write(fh, first)
        write, update = fh.write, self.hasher.update
        meter = self.meter
        offset = self.offset
        # Flush to disk in the background as we go, so the fsync before the rename has little left to do
        # (on a 1 GiB file it was a quarter of the time when left to the end).
        next_sync = offset + SYNC_EVERY_BYTES
        syncing: asyncio.Future[None] | None = None
        try:
            async for chunk in chunks:
                write(chunk)
                update(chunk)
                offset += len(chunk)
                meter.update(offset)
                if offset >= next_sync and (syncing is None or syncing.done()):
                    fh.flush()
                    syncing = asyncio.ensure_future(asyncio.to_thread(os.fdatasync, fh.fileno()))
                    next_sync = offset + SYNC_EVERY_BYTES
        finally:
            self.offset = offset
            if syncing is not None:  # never close the file under a sync still running in its thread
                await asyncio.wait({syncing})
                if not syncing.cancelled():
                    syncing.exception()  # consumed: a failed background sync is redone by the final fsync

    def _write(self, fh: IO[bytes], data: bytes) -> None:
        fh.write(data)
        self.hasher.update(data)
        self.offset += len(data)
        self.meter.update(self.offset)

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
        if self.expected_sha and await asyncio.to_thread(_hash_path, final) != self.expected_sha:
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
    out = b""
    with contextlib.suppress(httpx.HTTPError):
        async for chunk in resp.aiter_raw():
            out += chunk
            if len(out) >= limit:
                break
    return out[:limit]


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
    client: httpx.AsyncClient | None = None,
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
    `DownloadCancelled` when `cancel` was set (the part is kept). Pass `client` to share connections; put auth
    in `file.headers`, never in the client's default headers (those would follow redirects to any host).
    """
    label = file.source or sidecar.redact_url(file.url)
    if cancel is not None and cancel.is_set():
        raise DownloadCancelled(f"cancelled before start: {label}", path=label)
    own = client is None
    http = client if client is not None else make_client()
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
            await http.aclose()


async def fetch_all(
    files: Iterable[RemoteFile],
    dest_dir: Path,
    *,
    concurrency: int = 4,
    fail_fast: bool = False,
    client: httpx.AsyncClient | None = None,
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
    own = client is None
    http = client if client is not None else make_client()

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
            await http.aclose()
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
