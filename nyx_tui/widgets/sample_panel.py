"""The latest sample image of a job, through textual-image.

`textual_image.renderable` probes the terminal (sixel / kitty graphics) when it is imported, and that
probe cannot run once Textual owns the terminal; so this module imports it at module import, and the App
must import this module (or `textual_image.renderable`) before `App.run()`. Which renderer draws the
image: the probe's answer, or `NYX_IMAGE_RENDERER` = auto | tgp | sixel | halfcell | unicode (tests force
halfcell so snapshots do not depend on the terminal; tmux without passthrough wants halfcell too).

Images are read and shrunk in a thread worker (decoding a 1024² PNG takes tens of ms); every refresh
re-sends the image to the terminal, so the panel keeps one small thumbnail.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import textual_image.renderable  # noqa: F401  (the terminal probe must run before the App starts)
from PIL import Image as PILImage
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Static
from textual_image.widget import HalfcellImage, SixelImage, TGPImage, UnicodeImage
from textual_image.widget import Image as AutoImage

RENDERERS: dict[str, Any] = {
    "auto": AutoImage,
    "tgp": TGPImage,
    "sixel": SixelImage,
    "halfcell": HalfcellImage,
    "unicode": UnicodeImage,
}
THUMBNAIL_PX = 256


def image_class() -> Any:
    """The image widget class `NYX_IMAGE_RENDERER` asks for (unknown names fall back to auto)."""
    return RENDERERS.get(os.environ.get("NYX_IMAGE_RENDERER", "auto").strip().lower(), AutoImage)


def load_thumbnail(path: Path, size: int = THUMBNAIL_PX) -> PILImage.Image:
    """Decode and shrink one image (blocking: call it from a thread worker)."""
    with PILImage.open(path) as src:
        src.draft("RGB", (size, size))  # JPEG: decode at a reduced scale
        im = src.convert("RGB")
    im.thumbnail((size, size))
    return im


def caption(sample: dict[str, Any] | None) -> str:
    """One line about the sample: step, how many images, the first prompt."""
    if not sample:
        return "samples: none yet"
    images = sample.get("images") or []
    prompts = sample.get("prompts") or []
    first = f": {prompts[0]}" if prompts else ""
    return f"sample at step {sample.get('step')}, {len(images)} image(s){first}"


class SamplePanel(Vertical):
    """Caption + the first image of the latest `sample` event ("samples: none yet" before one)."""

    DEFAULT_CSS = """
    SamplePanel { height: 1fr; }
    SamplePanel > #sample-caption { height: auto; max-height: 2; color: $text-muted; }
    SamplePanel > #sample-image { width: auto; height: 1fr; max-height: 14; }
    """

    def __init__(self, *, id: str | None = None, classes: str | None = None) -> None:
        super().__init__(id=id, classes=classes)
        self.sample: dict[str, Any] | None = None
        self.shown_path: Path | None = None

    def compose(self) -> ComposeResult:
        yield Static(content=caption(None), id="sample-caption")
        yield image_class()(None, id="sample-image")

    def show(self, sample: dict[str, Any] | None, base: Path | None = None) -> None:
        """Show a `sample` event; relative image paths are taken from `base` (the job directory)."""
        if sample == self.sample:
            return
        self.sample = sample
        self.query_one("#sample-caption", Static).update(caption(sample))
        images = (sample or {}).get("images") or []
        if not images:
            self._set_image(None, None)
            return
        path = Path(str(images[0]))
        if not path.is_absolute() and base is not None:
            path = base / path
        self.run_worker(lambda: self._load(path), thread=True, exclusive=True, group="sample-image")

    def _load(self, path: Path) -> None:
        try:
            image: PILImage.Image | None = load_thumbnail(path)
        except (OSError, ValueError, SyntaxError) as exc:  # missing, truncated or not an image
            self.app.call_from_thread(self._failed, path, exc)
            return
        self.app.call_from_thread(self._set_image, image, path)

    def _failed(self, path: Path, exc: BaseException) -> None:
        self._set_image(None, None)
        self.query_one("#sample-caption", Static).update(f"{caption(self.sample)}\n(cannot show {path.name}: {exc})")

    def _set_image(self, image: PILImage.Image | None, path: Path | None) -> None:
        self.shown_path = path
        self.query_one("#sample-image").image = image  # type: ignore[attr-defined]
