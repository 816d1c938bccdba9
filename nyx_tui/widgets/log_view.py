"""The dashboard's log tail: the job's `log` events, newest at the bottom, bounded; or, toggled, the
last lines of the worker's raw `output.log` (`OutputLogTail`).

A thin `Log` subclass so the level is written as a word (WARNING, ERROR) in front of the message: the
level must read without colour (NO_COLOR, high-contrast themes, screen readers)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from textual import events
from textual.widgets import Log

if TYPE_CHECKING:
    from nyx_tui.jobs.supervisor import OutputTail


def format_line(level: str, message: str) -> str:
    """`info` lines are indented to line up with the level words so warnings stand out by shape too."""
    lvl = level.lower()
    if lvl == "info":
        return f"        {message}"
    return f"{lvl.upper():7.7} {message}"


class LogTail(Log):
    """The last `max_lines` log lines of a job; `add` appends a batch in one refresh."""

    DEFAULT_CSS = """
    LogTail { height: 7; }
    """

    def __init__(self, max_lines: int = 500, *, id: str | None = None, classes: str | None = None) -> None:
        super().__init__(max_lines=max_lines, id=id, classes=classes)

    def add(self, lines: Iterable[tuple[str, str]]) -> None:
        """Append `(level, message)` pairs; a message with newlines becomes several lines."""
        out: list[str] = []
        for level, message in lines:
            first, *rest = str(message).splitlines() or [""]
            out.append(format_line(level, first))
            out.extend(f"        {line}" for line in rest)
        if out:
            self.write_lines(out)

    def show_lines(self, lines: Iterable[str]) -> None:
        """Replace everything with `lines` (the raw output view: its last line may be redrawn in place)."""
        self.clear()
        self.write_lines(list(lines))

    def on_resize(self, event: events.Resize) -> None:
        """Keep the newest line in view when the panel changes size (the layout stacks and unstacks as
        the terminal is resized or the end summary appears); `Log` only scrolls on writes."""
        if self.auto_scroll:
            self.scroll_end(animate=False, immediate=True)


class OutputLogTail:
    """The last lines of a job's `output.log`, read by offset, for the log panel. No Textual here.

    A run's output.log can hold gigabytes, most of it progress-bar redraws: sd-scripts' tqdm rewrites its
    bar with a bare `\\r` and no newline, megabytes of it. So opening reads only the file's last
    `start_bytes`, each `poll` reads only what was appended (at most `max_bytes`: a flood skips ahead, its
    older lines would scroll away anyway), and the supervisor's `OutputTail` splits on `\\r` and `\\n`
    with redraws collapsed, so a bar redrawn a thousand times is one line that updates. (A frame shows
    once the next one starts: tqdm ends none of them.)
    """

    def __init__(self, path: Path, max_lines: int = 500, start_bytes: int = 64 << 10, max_bytes: int = 1 << 20) -> None:
        self.path = Path(path)
        self.max_lines = max_lines
        self.start_bytes = start_bytes
        self.max_bytes = max_bytes
        self.offset: int | None = None  # None until the first read
        self.version = 0  # bumped when the lines changed
        from nyx_tui.jobs.supervisor import OutputTail  # on first use: the dashboard's first frame skips it

        self._tail: OutputTail = OutputTail(maxlen=max_lines)
        self._in_line = False  # reading resumed in the middle of a line: drop it up to its end

    @property
    def lines(self) -> list[str]:
        return list(self._tail.lines)

    def poll(self) -> bool:
        """Read what was appended since the last call; True when the lines changed."""
        try:
            f = open(self.path, "rb")  # noqa: SIM115  (closed below)
        except FileNotFoundError:
            return False
        with f:
            size = os.fstat(f.fileno()).st_size
            start = self.offset if self.offset is not None and self.offset <= size else max(0, size - self.start_bytes)
            if size - start > self.max_bytes:
                start = size - self.max_bytes
            if start != self.offset:  # the first read, or a skip ahead: not at a line start
                if self.offset is not None:  # the line being written when the flood came is gone
                    old, self._tail = self._tail, type(self._tail)(maxlen=self.max_lines)
                    self._tail.lines.extend(old.lines)
                self._in_line = start > 0
            f.seek(start)
            data = f.read(size - start)
        self.offset = size
        if self._in_line:
            ends = [i for i in (data.find(b"\n"), data.find(b"\r")) if i >= 0]
            data = data[min(ends) + 1 :] if ends else b""
            self._in_line = not ends
        if not data:
            return False
        before = list(self._tail.lines)
        self._tail.feed(data)
        if list(self._tail.lines) == before:
            return False
        self.version += 1
        return True
