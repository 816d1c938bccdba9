"""Caption files, read and written so that no edit is ever lost.

A caption is read together with a `CaptionStamp` (the bytes' sha256, or "no file"). A write passes that
stamp back: if the file on disk no longer matches it (someone edited it in another editor, another tool
wrote it), the write is refused with `CaptionConflict` instead of overwriting the other edit. Writes are
atomic: a temporary file in the same folder, fsynced, then renamed over the caption, so a crash leaves
either the old caption or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path


class CaptionConflict(RuntimeError):
    """The caption changed on disk since it was read; the write was refused (nothing was written)."""

    def __init__(self, path: Path) -> None:
        super().__init__(
            f"{path} changed on disk since it was read; not overwritten (reload it and apply the edit again)"
        )
        self.path = path


@dataclass(frozen=True)
class CaptionStamp:
    """What the caption file held when it was read: its bytes' sha256, or None when there was no file."""

    sha256: str | None

    @classmethod
    def of_bytes(cls, data: bytes | None) -> CaptionStamp:
        return cls(None if data is None else hashlib.sha256(data).hexdigest())


MISSING = CaptionStamp(None)


def caption_path(image: Path, extension: str = ".txt") -> Path:
    """The caption file beside `image` (`a.png` → `a.txt`)."""
    return Path(image).with_suffix(extension)


def _read_bytes(path: Path) -> bytes | None:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        return None


def read_caption(path: Path) -> tuple[str, CaptionStamp]:
    """The caption text (stripped; "" for no file) and its stamp. Undecodable bytes are replaced, not fatal."""
    data = _read_bytes(path)
    text = "" if data is None else data.decode("utf-8", errors="replace").strip()
    return text, CaptionStamp.of_bytes(data)


def read_caption_bytes(path: Path) -> tuple[bytes | None, CaptionStamp]:
    """The caption file's exact bytes (None for no file) and its stamp: what an undo restores."""
    data = _read_bytes(path)
    return data, CaptionStamp.of_bytes(data)


def write_caption(path: Path, text: str, expected: CaptionStamp) -> CaptionStamp:
    """Atomically replace the caption with `text` if the file still matches `expected` (the stamp from
    `read_caption`; `MISSING` when it must not exist yet). Returns the new stamp; raises CaptionConflict."""
    return _replace(Path(path), text.strip().encode("utf-8"), expected)


def restore_caption(path: Path, data: bytes | None, expected: CaptionStamp) -> CaptionStamp:
    """Put back exact bytes (`None`: delete the file) if the file still matches `expected`, atomically.
    Returns the new stamp (`MISSING` after a delete); raises CaptionConflict and writes nothing otherwise."""
    path = Path(path)
    if data is not None:
        return _replace(path, data, expected)
    if CaptionStamp.of_bytes(_read_bytes(path)) != expected:
        raise CaptionConflict(path)
    path.unlink(missing_ok=True)
    return MISSING


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _umask()  # read once, at import (os.umask can only be read by setting it)


def _mode_for(path: Path) -> int:
    """The permissions the written caption gets: the old file's, or a new file's under the umask (mkstemp's
    0600 would hide captions from a trainer running as another user)."""
    try:
        return path.stat().st_mode & 0o7777
    except OSError:
        return 0o666 & ~_UMASK


def _replace(path: Path, data: bytes, expected: CaptionStamp) -> CaptionStamp:
    if CaptionStamp.of_bytes(_read_bytes(path)) != expected:
        raise CaptionConflict(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with contextlib.suppress(OSError):
            os.fchmod(fd, _mode_for(path))
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if CaptionStamp.of_bytes(_read_bytes(path)) != expected:  # changed while we wrote: keep theirs
            raise CaptionConflict(path)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return CaptionStamp.of_bytes(data)
