"""Worker of a caption job: `python -m nyx_tui.tagging.caption_job JOB_DIR` (the supervisor passes `.`).

Reads its settings from spec.json (`caption`, a `CaptionSettings`), writes its own `start`, `progress` and
`log` events, and never writes `end` (the supervisor does). The `start` event and a "loading the model"
progress come before torch is imported, so a view shows the job at once.

Every caption write goes through `datasets.captions`: the caption is read (with its stamp) before the model
runs on its image and written only if the file is still what was read, so an edit made meanwhile (in the
TUI, in an editor) is kept and reported, never overwritten. Stop and cancel are read between batches; the
captions written so far stay. Exit codes: 0 done (or stopped on request), 1 error (traceback or the model
problem on stderr), 2 bad command line, 130 interrupted by SIGINT.
"""

from __future__ import annotations

import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from nyx_tui.datasets.captions import CaptionConflict, CaptionStamp, caption_path, read_caption, write_caption
from nyx_tui.datasets.images import iter_images
from nyx_tui.jobs.control import ControlReader
from nyx_tui.jobs.events import EventWriter
from nyx_tui.jobs.jobdir import JobDir
from nyx_tui.tagging.captioners import (
    Captioner,
    CaptionModelError,
    CaptionSettings,
    finish_caption,
    merge_caption,
    resolve_model,
)

if TYPE_CHECKING:
    from PIL.Image import Image

PROGRESS_EVERY_S = 0.1  # at most ~10 progress events a second, whatever the batch size and speed
UNIT = "images"


@dataclass
class CaptionSummary:
    """What a run did, for the closing log line and for tests."""

    total: int = 0
    captioned: int = 0
    skipped: int = 0
    conflicts: int = 0
    unreadable: int = 0
    stopped: str | None = None  # "stop" | "cancel" when a command ended the run early

    @property
    def done(self) -> int:
        return self.captioned + self.skipped + self.conflicts + self.unreadable

    def message(self) -> str:
        parts = [f"captioned {self.captioned} of {self.total} images"]
        if self.skipped:
            parts.append(f"{self.skipped} skipped (already captioned)")
        if self.conflicts:
            parts.append(f"{self.conflicts} not written (edited meanwhile)")
        if self.unreadable:
            parts.append(f"{self.unreadable} unreadable")
        if self.stopped:
            parts.append(f"{self.stopped} requested: {self.total - self.done} left uncaptioned")
        return ", ".join(parts)


class _Progress:
    """Progress events, throttled: a fast CPU model on small batches would otherwise write hundreds a second."""

    def __init__(self, events: EventWriter, total: int) -> None:
        self.events = events
        self.total = total
        self._last = 0.0
        self._sent = -1

    def update(self, done: int, force: bool = False) -> None:
        now = time.monotonic()
        if done == self._sent or (not force and now - self._last < PROGRESS_EVERY_S):
            return
        self._last, self._sent = now, done
        self.events.emit("progress", done=done, total=self.total, unit=UNIT, message="captioning")


def load_image(path: Path) -> Image:
    """An image as the captioners expect it: RGB, turned upright by its EXIF orientation, transparency laid
    on white (as the WD14 preprocessing does: a black background reads as a dark scene to a captioner)."""
    from PIL import Image as PILImage
    from PIL import ImageOps

    with PILImage.open(path) as opened:
        img = ImageOps.exif_transpose(opened)
        img.load()
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = PILImage.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = PILImage.alpha_composite(background, rgba)
    return img.convert("RGB")


def _batches(items: Sequence[Path], size: int) -> list[Sequence[Path]]:
    size = max(1, size)
    return [items[i : i + size] for i in range(0, len(items), size)]


def caption_images(
    images: Sequence[Path],
    captioner: Captioner,
    settings: CaptionSettings,
    events: EventWriter,
    control: ControlReader | None = None,
) -> CaptionSummary:
    """Caption `images` batch by batch under `settings` (mode, prefix, suffix, caption extension). Separate
    from `main` so that tests can hand in any Captioner (one that edits a caption mid-batch, say)."""
    summary = CaptionSummary(total=len(images))
    progress = _Progress(events, len(images))
    progress.update(0, force=True)
    for batch in _batches(images, settings.batch_size):
        for command in control.poll() if control is not None else []:
            name = command.get("command")
            if name in ("stop", "cancel") and summary.stopped is None:
                summary.stopped = str(name)
                events.emit(
                    "log",
                    level="info",
                    message=f"{name} received: exiting after {summary.done} of {summary.total} images; "
                    "the captions written so far stay",
                    ack=name,
                )
            elif name in ("save_now", "sample_now"):
                events.emit("log", level="warning", message=f"{name} does not apply to a caption job", ack=name)
        if summary.stopped:
            break
        todo: list[tuple[Path, str, CaptionStamp, Image]] = []
        for image in batch:
            cap = caption_path(image, settings.caption_ext)
            existing, stamp = read_caption(cap)
            if settings.mode == "skip" and existing:
                summary.skipped += 1
                continue
            try:
                img = load_image(image)
            except Exception as e:  # PIL raises many kinds (OSError, ValueError, DecompressionBombError, …)
                summary.unreadable += 1
                events.log(f"cannot read {image}: {e}; skipped", level="warning")
                continue
            todo.append((image, existing, stamp, img))
        if todo:
            texts = captioner.caption([t[3] for t in todo])
            for (image, existing, stamp, _), text in zip(todo, texts, strict=True):
                cap = caption_path(image, settings.caption_ext)
                new = finish_caption(text, settings.prefix, settings.suffix)
                merged = merge_caption(existing, new, settings.mode, settings.prefix)
                if merged is None:
                    summary.skipped += 1
                    continue
                try:
                    write_caption(cap, merged, stamp)
                except CaptionConflict as e:
                    summary.conflicts += 1
                    events.log(f"{e}; its caption was not written", level="warning")
                else:
                    summary.captioned += 1
        progress.update(summary.done)
    progress.update(summary.done, force=True)
    return summary


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m nyx_tui.tagging.caption_job JOB_DIR", file=sys.stderr)
        return 2
    job = JobDir(Path(args[0]).resolve())
    try:
        with EventWriter(job.events_path) as events:
            settings = CaptionSettings.from_dict(job.spec()["caption"])
            images = list(iter_images(Path(settings.folder), recursive=settings.recursive))
            events.emit("start", job=job.id, job_kind="caption", total=len(images))
            events.emit("progress", done=0, total=len(images), unit=UNIT, message="loading the model")
            print(f"captioning {len(images)} images in {settings.folder} with {settings.model}", flush=True)
            try:
                folder = resolve_model(settings.model, settings.download)  # before torch: a typo fails fast
                from nyx_tui.tagging.captioners import load_captioner

                captioner = load_captioner(settings, folder)
            except CaptionModelError as e:
                events.log(str(e), level="error")
                print(f"error: {e}", file=sys.stderr, flush=True)
                return 1
            events.log(f"loaded the {captioner.kind} model {settings.model} on {captioner.device}")
            summary = caption_images(images, captioner, settings, events, ControlReader(job.control_path))
            events.log(summary.message(), level="warning" if summary.conflicts or summary.unreadable else "info")
            print(summary.message(), flush=True)
            return 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        return 130
    except Exception:
        traceback.print_exc()
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
