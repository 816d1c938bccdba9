"""The small JSON file beside a `.part`: what the partial bytes are a prefix of.

A `.part` alone cannot be resumed safely: without the validator (ETag / Last-Modified) the server cannot
tell us, through `If-Range`, whether the file changed since; without the expected size and hash we cannot
tell whether the part belongs to the file now asked for. So the engine writes `<final>.part.json` before the
first byte of the part and keeps it until the file takes its final name.

Never a credential in it: the URL is stored without its query string, fragment and user info (a signed CDN
URL is a bearer credential for hours; Civitai's are), and request headers are not stored at all. The source
string (`civitai:123`, `hf:owner/repo/file`) says where the bytes came from instead.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

VERSION = 1


def redact_url(url: str) -> str:
    """The URL without query, fragment or user:password: safe to store in a file, an event or a log line."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    netloc = parts.hostname or ""
    if ":" in netloc:  # an IPv6 literal
        netloc = f"[{netloc}]"
    if parts.port is not None:
        netloc = f"{netloc}:{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


@dataclass
class PartInfo:
    """What a `.part` is a prefix of. `size`/`sha256` are the expected whole file's (None when unknown);
    `etag`/`last_modified` are the validators of the response the part's bytes came from."""

    url: str = ""
    source: str = ""
    etag: str | None = None
    last_modified: str | None = None
    size: int | None = None
    sha256: str | None = None
    v: int = VERSION
    updated: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        # Redact here, whatever the caller passed: the one place a URL enters the file.
        self.url = redact_url(self.url) if self.url else ""

    @property
    def validator(self) -> str | None:
        """What to send as `If-Range`: a strong ETag, else Last-Modified (RFC 9110 forbids weak ETags there)."""
        if self.etag and not self.etag.startswith("W/"):
            return self.etag
        return self.last_modified or None


def sidecar_path(part: Path) -> Path:
    """`<final>.part` → `<final>.part.json`."""
    return part.with_name(part.name + ".json")


def read(part: Path) -> PartInfo | None:
    """The sidecar of `part`, or None when it is missing, unreadable or of another version (then the part
    cannot be trusted and the engine starts over)."""
    try:
        raw = json.loads(sidecar_path(part).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(raw, dict) or raw.get("v") != VERSION:
        return None
    try:
        size = raw.get("size")
        return PartInfo(
            url=str(raw.get("url") or ""),
            source=str(raw.get("source") or ""),
            etag=raw.get("etag") if isinstance(raw.get("etag"), str) else None,
            last_modified=raw.get("last_modified") if isinstance(raw.get("last_modified"), str) else None,
            size=int(size) if isinstance(size, int) and not isinstance(size, bool) else None,
            sha256=raw.get("sha256") if isinstance(raw.get("sha256"), str) else None,
            updated=float(raw.get("updated") or 0.0),
        )
    except (TypeError, ValueError):
        return None


def write(part: Path, info: PartInfo) -> None:
    """Atomically (temp file + rename), so a crash mid-write leaves the old sidecar or the new, never half."""
    info.updated = time.time()
    path = sidecar_path(part)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(asdict(info), indent=1, sort_keys=True), encoding="utf-8")
    os.replace(tmp, path)


def remove(part: Path) -> None:
    """Delete the sidecar if present."""
    sidecar_path(part).unlink(missing_ok=True)
