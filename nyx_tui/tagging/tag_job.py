"""Worker of a tagging job: `python -m nyx_tui.tagging.tag_job JOB_DIR` (the supervisor passes `.`).

The options come from `spec.json` (`tag`: the folder, the model and `TagOptions`, written by `nyx tag`).
The `start` event, with the number of images, is written before onnxruntime loads, so a view shows the
job at once. Progress events are thinned to at most `PROGRESS_EVERY_S`; warnings (unreadable images,
captions edited meanwhile) are `log` events. `stop` and `cancel` from control.jsonl are obeyed between
batches: captions already written stay, and the worker exits 0 (the supervisor records the stop).

Exit codes: 0 done (or stopped on request); 1 an error (a model problem as one line on stderr, anything
else with its traceback); 2 a bad command line; 130 interrupted by SIGINT (the supervisor's escalation).
"""

from __future__ import annotations

import sys
import time
import traceback
from pathlib import Path
from typing import Any

from nyx_tui.jobs.control import ControlReader
from nyx_tui.jobs.events import EventWriter
from nyx_tui.jobs.jobdir import JobDir

PROGRESS_EVERY_S = 0.25  # at most 4 progress events a second: views redraw at about that rate anyway


class _Progress:
    """Thins progress events in time; the last one (done == total) is always written."""

    def __init__(self, events: EventWriter, message: str) -> None:
        self.events = events
        self.message = message
        self.last = 0.0

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if done < total and now - self.last < PROGRESS_EVERY_S:
            return
        self.last = now
        self.events.emit("progress", done=done, total=total, unit="images", message=self.message)


class _Commands:
    """`stop`/`cancel` from control.jsonl, read between batches (one small file read each)."""

    def __init__(self, job: JobDir, events: EventWriter) -> None:
        self.reader = ControlReader(job.control_path)
        self.events = events
        self.requested: str | None = None

    def __call__(self) -> bool:
        for cmd in self.reader.poll():
            what = cmd.get("command")
            if what in ("stop", "cancel") and self.requested is None:
                self.requested = str(what)
                self.events.emit(
                    "log",
                    level="info",
                    message=f"{what} received: stopping after this batch; captions already written stay",
                    ack=what,
                )
            elif what in ("save_now", "sample_now"):
                self.events.emit("log", level="info", message=f"{what} means nothing to a tagging job", ack=what)
        return self.requested is not None


def run(job: JobDir, events: EventWriter) -> int:
    spec: dict[str, Any] = job.spec()
    tag: dict[str, Any] = spec["tag"]
    folder = Path(tag["folder"])
    from nyx_tui.datasets.images import iter_images

    if not folder.is_dir():  # checked by `nyx tag`, but the folder may have gone while the job was queued
        events.emit("log", level="error", message=f"{folder} is not a folder (any more); nothing to tag")
        print(f"error: {folder} is not a folder", file=sys.stderr, flush=True)
        return 1
    images = list(iter_images(folder, recursive=bool(tag.get("recursive", True))))
    total = len(images)
    events.emit("start", job=job.id, job_kind="tag", total=total, model=tag["model"], folder=str(folder))
    events.emit("progress", done=0, total=total, unit="images", message="loading the tagger")
    print(f"{total} images in {folder}; loading {tag['model']}…", flush=True)

    from nyx_tui.tagging.wd14 import ModelError, Tagger, TagOptions, tag_images

    options = TagOptions.from_json(tag["options"])
    try:
        tagger = Tagger.load(str(tag["model"]))
    except ModelError as e:
        events.emit("log", level="error", message=str(e))
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    batch = tagger.batch_size(options.batch_size)
    fixed = " (fixed by the model)" if tagger.fixed_batch is not None else ""
    events.log(
        f"{tagger.size}px input, batches of {batch}{fixed}, on {tagger.providers[0]}; mode {options.mode}, "
        f"{'MCut' if options.mcut else f'thresholds {options.threshold:g}/{options.character_threshold:g}'}"
    )

    def warn(message: str) -> None:
        events.emit("log", level="warning", message=message)
        print(f"warning: {message}", flush=True)

    commands = _Commands(job, events)
    summary = tag_images(
        tagger,
        images,
        options,
        progress=_Progress(events, "tagging"),
        warn=warn,
        should_stop=commands,
        decode_workers=int(tag.get("decode_workers", 2)),
    )
    events.log(summary.describe())
    print(summary.describe(), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m nyx_tui.tagging.tag_job JOB_DIR", file=sys.stderr)
        return 2
    job = JobDir(Path(args[0]).resolve())
    try:
        with EventWriter(job.events_path) as events:
            return run(job, events)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        return 130
    except Exception:
        traceback.print_exc()
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
