"""The types the download engine, the sources, the job worker and the views share.

A source (`hf:owner/repo/file`, `civitai:123`, an https URL) resolves to `RemoteFile`s; the engine fetches
each into a folder; progress goes out as `Progress`. Tokens live only in `RemoteFile.headers` in memory:
never in a sidecar, an event, a job spec or a log line.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


class DownloadError(Exception):
    """A download that cannot succeed as asked. `fix` says what the user can do; `retryable` is True for
    transport trouble (a later retry may work), False for 401/403/404, a wrong hash, an HTML error page."""

    def __init__(self, message: str, fix: str = "", *, retryable: bool = False, status: int | None = None) -> None:
        super().__init__(message)
        self.message, self.fix, self.retryable, self.status = message, fix, retryable, status

    def __str__(self) -> str:
        return f"{self.message} ({self.fix})" if self.fix else self.message


@dataclass
class RemoteFile:
    """One file to fetch.

    `url` is where to GET it now; for signed CDN URLs (Civitai) `resolve` returns a fresh one and is called
    before every attempt (signed URLs are never stored). `filename` is already sanitized (a plain name, no
    separators). `subdir` places it below the destination folder (a repo file's path: `unet/x.safetensors`).
    `size`/`sha256` (lower-case hex) are what the source promised; the engine checks them before the file
    takes its final name. `headers` carry auth for the source's own host only.
    """

    url: str
    filename: str
    size: int | None = None
    sha256: str | None = None
    subdir: str = ""
    headers: dict[str, str] = field(default_factory=dict, repr=False)
    resolve: Callable[[], str] | None = field(default=None, repr=False)
    source: str = ""  # the user's spelling of the source, for messages


@dataclass
class Resolved:
    """What a source stands for: its files and what the views show before downloading (Civitai: name,
    type, base model). `dest_hint`: where the source wants its files by default (the HF cache layout)."""

    source: str
    files: list[RemoteFile]
    title: str = ""
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Progress:
    """One file's progress: bytes so far (including a resumed `.part`), its size when known, speed over
    the last seconds, ETA."""

    filename: str
    done: int
    total: int | None
    speed_bps: float = 0.0
    eta_s: float | None = None


class DownloadCancelled(Exception):
    """The caller's `cancel` event stopped a fetch. Not a `DownloadError` on purpose: a user's cancel is not a
    failure, and `except DownloadError` must not count it as one. The `.part` and its sidecar stay on disk,
    so the next fetch of the same file resumes where this one stopped. `path` is the final path it was for."""

    def __init__(self, message: str = "download cancelled", *, path: str = "") -> None:
        super().__init__(message)
        self.path = path


class DownloadsFailed(DownloadError):
    """`fetch_all` finished with at least one file not fetched. `results` is aligned with the files passed
    in: a `Path` for each file now in place, the exception (a `DownloadError`, `DownloadCancelled`, …) for
    each that is not — so a caller (the job worker) can report every failure, not only the first."""

    def __init__(self, message: str, results: list[Any], fix: str = "", *, retryable: bool = False) -> None:
        super().__init__(message, fix, retryable=retryable)
        self.results = results

    @property
    def failures(self) -> list[tuple[int, BaseException]]:
        """(index into the files, exception) for each file that did not arrive."""
        return [(i, r) for i, r in enumerate(self.results) if isinstance(r, BaseException)]
