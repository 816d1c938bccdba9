"""A small image preview (the datasets list's thumbnail, the tags editor's larger view) through textual-image.

The image is decoded and shrunk in a thread worker (`sample_panel.load_thumbnail`); the renderer is the one
`NYX_IMAGE_RENDERER` asks for (tests force halfcell). Every refresh re-sends the image to the terminal, so
previews stay small: `size_px` is the longest side kept.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image as PILImage
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Static

from nyx_tui.widgets.sample_panel import image_class, load_thumbnail


class Thumb(Vertical):
    """One image, loaded in a thread; `show(None)` clears it. `shown_path` is what is on screen now."""

    DEFAULT_CSS = """
    Thumb { height: auto; }
    Thumb > .thumb-image { width: auto; height: 10; }
    Thumb > .thumb-note { height: auto; color: $text-muted; }
    """

    def __init__(self, size_px: int = 128, *, id: str | None = None, classes: str | None = None) -> None:
        super().__init__(id=id, classes=classes)
        self.size_px = size_px
        self.wanted: Path | None = None
        self.shown_path: Path | None = None

    def compose(self) -> ComposeResult:
        yield image_class()(None, classes="thumb-image")
        yield Static(content="", classes="thumb-note")

    def show(self, path: Path | None) -> None:
        if path == self.wanted:
            return
        self.wanted = path
        if path is None:
            self._set(None, None, "")
            return
        self.run_worker(lambda: self._load(path), thread=True, exclusive=True, group="thumb")

    def _load(self, path: Path) -> None:
        try:
            image: PILImage.Image | None = load_thumbnail(path, self.size_px)
        except (OSError, ValueError, SyntaxError) as exc:  # missing, truncated or not an image
            self.app.call_from_thread(self._set, None, path, f"cannot show {path.name}: {exc}")
            return
        self.app.call_from_thread(self._set, image, path, "")

    def _set(self, image: PILImage.Image | None, path: Path | None, note: str) -> None:
        if path != self.wanted:  # a newer request is on its way
            return
        self.shown_path = path
        widget: Any = self.query_one(".thumb-image")
        widget.image = image
        self.query_one(".thumb-note", Static).update(note)
