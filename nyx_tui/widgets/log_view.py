"""The dashboard's log tail: the job's `log` events, newest at the bottom, bounded.

A thin `Log` subclass so the level is written as a word (WARNING, ERROR) in front of the message: the
level must read without colour (NO_COLOR, high-contrast themes, screen readers)."""

from __future__ import annotations

from collections.abc import Iterable

from textual import events
from textual.widgets import Log


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

    def on_resize(self, event: events.Resize) -> None:
        """Keep the newest line in view when the panel changes size (the layout stacks and unstacks as
        the terminal is resized or the end summary appears); `Log` only scrolls on writes."""
        if self.auto_scroll:
            self.scroll_end(animate=False, immediate=True)
