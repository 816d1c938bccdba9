"""Event schema v1: the one language every job kind and every backend speaks (docs/events.md).

`events.jsonl` is append-only, one JSON object a line, written by the worker and by the supervisor.
Each line is written with a single `write()` on a file opened with O_APPEND, so two writers never
interleave inside a line. Readers tolerate a torn last line (a writer killed mid-write): it is skipped
until it is complete.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

SCHEMA_VERSION = 1

EventKind = Literal["start", "progress", "step", "metric", "sample", "artifact", "log", "end"]
EVENT_KINDS: tuple[str, ...] = ("start", "progress", "step", "metric", "sample", "artifact", "log", "end")

# required fields per kind (beyond v, t, kind); optional ones are documented in docs/events.md
REQUIRED: dict[str, tuple[str, ...]] = {
    # DESIGN.md's `start {job, kind}` would collide with the event's own `kind`: the job kind is `job_kind`
    "start": ("job", "job_kind"),
    "progress": ("done", "total", "unit"),
    "step": ("step", "total", "epoch", "loss", "loss_avg", "lr", "it_s", "eta_s"),
    "metric": ("name", "value", "step"),
    "sample": ("step", "images", "prompts"),
    "artifact": ("path", "what"),
    "log": ("level", "message"),
    "end": ("state",),
}


class EventError(ValueError):
    """A line that is not a valid v1 event."""


def make_event(kind: str, **fields: Any) -> dict[str, Any]:
    if kind not in REQUIRED:
        raise EventError(f"unknown event kind {kind!r}; one of {', '.join(EVENT_KINDS)}")
    if "kind" in fields or "v" in fields:
        raise EventError("`kind` and `v` are reserved; a start event names the job kind `job_kind`")
    return {"v": SCHEMA_VERSION, "t": round(time.time(), 3), "kind": kind, **fields}


def validate(event: dict[str, Any]) -> dict[str, Any]:
    """Raise EventError unless `event` is a v1 event with its kind's required fields."""
    if event.get("v") != SCHEMA_VERSION:
        raise EventError(f"unsupported event version {event.get('v')!r}")
    kind = event.get("kind")
    if kind not in REQUIRED:
        raise EventError(f"unknown event kind {kind!r}")
    missing = [f for f in REQUIRED[kind] if f not in event]
    if missing:
        raise EventError(f"{kind} event lacks {', '.join(missing)}")
    return event


class EventWriter:
    """Appends events to one `events.jsonl`. Safe to use from the worker and the supervisor at once."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def emit(self, kind: str, **fields: Any) -> dict[str, Any]:
        event = make_event(kind, **fields)
        line = (json.dumps(event, separators=(",", ":"), allow_nan=False, default=str) + "\n").encode()
        os.write(self._fd, line)
        return event

    # convenience wrappers for the common kinds
    def log(self, message: str, level: str = "info") -> None:
        self.emit("log", level=level, message=message)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> EventWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _parse(line: bytes) -> dict[str, Any] | None:
    try:
        event = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        return None
    return event if isinstance(event, dict) else None


def parse_lines(data: bytes) -> list[dict[str, Any]]:
    """The events of complete lines (`data` ends with a newline or is a set of whole lines); text after the
    last newline is not a complete line and is ignored, as are lines that are not JSON objects."""
    return [e for e in map(_parse, data.split(b"\n")[:-1]) if e is not None]


def read_events(path: Path) -> list[dict[str, Any]]:
    """All complete, parseable events of a file (a missing file has none). Holds them all: for a long
    run use `EventTail` (or `JobSeries.replay`), which read a bounded chunk at a time."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return []
    return parse_lines(data)


READ_CHUNK = 4 << 20  # bytes an EventTail reads per call: a million-step log never sits in memory at once


class EventTail:
    """Incremental reader: `poll()` returns the events appended since the last call, a bounded chunk at a time.

    `offset` is the byte after the last complete line handed out, so `EventTail(path, offset)` resumes
    exactly there; a line still being written is not handed out until its newline has arrived.
    Each call reads at most `max_bytes` new bytes (a line longer than that is read on to its end and
    comes out whole), so re-attaching to a long run costs bounded memory. A caller that wants everything
    appended so far loops while `caught_up` is false (`follow()` does).
    """

    def __init__(self, path: Path, offset: int = 0) -> None:
        self.path = Path(path)
        self.offset = offset
        self._partial = b""
        self.caught_up = False  # the last read reached the end of the file

    def read_lines(self, max_bytes: int = READ_CHUNK) -> bytes:
        """The next complete lines, raw (each ending in `\\n`), from about `max_bytes` of new data; `b""`
        only when no complete line is left to read."""
        max_bytes = max(1, max_bytes)
        try:
            f = open(self.path, "rb")  # noqa: SIM115  (closed below)
        except FileNotFoundError:
            self.caught_up = True
            return b""
        with f:
            f.seek(self.offset + len(self._partial))
            pieces = [self._partial] if self._partial else []
            while True:
                chunk = f.read(max_bytes)
                self.caught_up = len(chunk) < max_bytes
                pieces.append(chunk)
                if self.caught_up or b"\n" in chunk:
                    break
        data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        cut = data.rfind(b"\n") + 1
        self.offset += cut
        # The start of a line still being written is read again next time (a few bytes: cheaper than keeping
        # and joining it, which costs a fresh buffer a chunk), unless it is already longer than a chunk.
        self._partial = data[cut:] if len(data) - cut > max_bytes else b""
        return data if cut == len(data) else data[:cut]

    def poll(self, max_bytes: int = READ_CHUNK) -> list[dict[str, Any]]:
        """The events of the next complete lines (see `read_lines`); lines that are not JSON objects are
        skipped, so an empty list does not by itself mean the end of the file: see `caught_up`."""
        return parse_lines(self.read_lines(max_bytes))

    def follow(self, interval: float = 0.2, stop: Any = None) -> Iterator[dict[str, Any]]:
        """Yield events as they arrive until an `end` event (or `stop()` returns true)."""
        while True:
            events = self.poll()
            yield from events
            if any(e.get("kind") == "end" for e in events):
                return
            if not self.caught_up:
                continue  # a backlog: read on without sleeping
            if stop is not None and stop():
                while True:
                    yield from self.poll()
                    if self.caught_up:
                        return
            time.sleep(interval)
