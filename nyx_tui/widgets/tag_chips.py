"""A caption's tags as removable chips: one compact button per tag, laid out in rows that wrap like words
(Textual has no wrapping layout, so the rows are built to the widget's width and rebuilt on resize).
Pressing a chip (click, or enter/space when it has focus) posts `TagChips.Removed`; the owner edits the
caption and calls `set_tags` again."""

from __future__ import annotations

from collections.abc import Sequence

from rich.cells import cell_len
from textual import on
from textual.containers import Horizontal, VerticalScroll
from textual.events import Resize
from textual.message import Message
from textual.widgets import Button

GAP = 1


class Chip(Button):
    """One tag; the label ends in ✕ (pressing removes it)."""

    def __init__(self, tag: str) -> None:
        super().__init__(f"{tag} ✕", compact=True, classes="chip")
        self.tag = tag


def rows(tags: Sequence[str], width: int) -> list[list[str]]:
    """`tags` in rows no wider than `width` cells (a tag wider than that gets a row of its own)."""
    out: list[list[str]] = []
    used = 0
    for tag in tags:
        need = cell_len(f"{tag} ✕") + 2  # a compact button keeps one cell of padding each side
        if out and used + GAP + need <= width:
            out[-1].append(tag)
            used += GAP + need
        else:
            out.append([tag])
            used = need
    return out


class TagChips(VerticalScroll):
    DEFAULT_CSS = """
    TagChips { height: auto; max-height: 6; }
    TagChips > .chip-row { height: 1; width: 100%; }
    TagChips .chip { width: auto; min-width: 0; height: 1; margin: 0 1 0 0; }
    TagChips .chip:focus { text-style: bold reverse; }
    """

    class Removed(Message):
        def __init__(self, tag: str) -> None:
            super().__init__()
            self.tag = tag

    def __init__(self, *, id: str | None = None, classes: str | None = None) -> None:
        super().__init__(id=id, classes=classes)
        self.tags: list[str] = []
        self._width = 0

    def set_tags(self, tags: Sequence[str]) -> None:
        tags = list(tags)
        if tags == self.tags:
            return
        self.tags = tags
        self._rebuild()

    def _rebuild(self) -> None:
        self.remove_children()
        width = self.scrollable_content_region.width or self._width or 60
        if self.tags:
            self.mount_all([Horizontal(*[Chip(t) for t in row], classes="chip-row") for row in rows(self.tags, width)])

    def on_resize(self, event: Resize) -> None:
        width = self.scrollable_content_region.width
        if width and width != self._width:
            self._width = width
            self._rebuild()

    @property
    def chips(self) -> list[Chip]:
        return list(self.query(Chip))

    @on(Button.Pressed, ".chip")
    def _pressed(self, event: Button.Pressed) -> None:
        event.stop()
        if isinstance(event.button, Chip):
            self.post_message(self.Removed(event.button.tag))
