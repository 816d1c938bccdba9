"""sd-scripts' output, turned into Nyx events (docs/events.md), so a kohya job looks like a native one.

sd-scripts does not write events: it draws a tqdm bar on stderr, redrawn with a bare `\\r` (no newline for
the whole run), and prints `epoch 3/10`, `saving checkpoint: PATH` and `model saved.` on stdout, some of
them through a rich log handler (timestamp, level, message, `file.py:123`). `KohyaOutput` is fed raw byte
chunks as they are read (never lines: asyncio's `readline()` gives up after 64 KiB of `\\r`-only output)
and returns the events they carry. It also keeps what went wrong: sd-scripts exits 0 after "No data
found", so the exit code alone does not tell a run that trained from one that did nothing.

Pure Python, no torch: the worker that runs it must start fast and the tests feed it recorded strings.
"""

from __future__ import annotations

import codecs
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

Event = tuple[str, dict[str, Any]]

MAX_LINE = 16 * 1024  # a line without an end longer than this is cut (and parsed) as it is
STEP_EVERY_S = 0.25  # at most ~4 step events a second (docs/events.md lets writers thin steps out)
PROGRESS_EVERY_S = 1.0
LOG_BURST = 40  # log lines let through at once, then LOG_RATE a second
LOG_RATE = 5.0

CUDA_OOM_HINT = (
    "the GPU ran out of memory: lower training.batch_size, enable training.gradient_checkpointing, lower "
    "the resolution, or (Flux/SD3) swap blocks to the CPU (flow.blocks_to_swap); a smaller network dim "
    "helps a little."
)
NO_DATA_HINT = (
    "sd-scripts found no images: check each dataset subset's folder (it must hold the images, with "
    "captions in the caption extension), and that the folder is not empty. sd-scripts reports this "
    "and exits 0 without training."
)
TRACEBACK_HINT = "sd-scripts stopped with an error; the traceback is in output.log (`nyx attach` shows it)."
NO_SAVE_HINT = (
    "sd-scripts ended without saving a LoRA; read output.log. A run shorter than one save interval still "
    "saves at the end, so this usually means it stopped early."
)
MISSING_MODULE_HINT = (
    "a package is missing from sd-scripts' environment: run `nyx backend install kohya` again (without "
    "--no-deps) or `nyx backend doctor` to see what it lacks."
)

_SEP = re.compile(r"(\r\n|\r|\n)")
_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
# `steps:  50%|█████     | 500/1000 [11:06<11:06,  1.33s/it, avr_loss=0.0123]`; the rate is `?it/s` at first
_TQDM = re.compile(
    r"(?:(?P<desc>[^|\r\n]*?):\s*)?(?P<pct>\d+)%\|[^|]*\|\s*(?P<n>\d+)/(?P<total>\d+)\s*"
    r"\[(?P<elapsed>[\d:]+|\?)(?:<(?P<remaining>[\d:]+|\?))?"
    r"(?:,\s*(?P<rate>[\d.]+|\?)\s*(?P<unit>s/it|it/s))?(?P<post>[^\]]*)\]"
)
_POSTFIX = re.compile(r"(\w+)=([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|nan|inf)")
_EPOCH = re.compile(r"(?:^|\s)epoch (\d+)/(\d+)\s*$")
_SAVING = re.compile(r"saving checkpoint: (?P<path>.+?)(?:\s{2,}\S+\.py:\d+)?\s*$")
_MODEL_SAVED = re.compile(r"(?:^|\s)model saved\.")
_NO_DATA = re.compile(r"No data found")
_CUDA_OOM = re.compile(r"CUDA out of memory|OutOfMemoryError")
_TRACEBACK = "Traceback (most recent call last):"
_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(?:Error|Exception|Interrupt|Exit|Warning)?(?::\s.*)?$")
_LEVEL = re.compile(r"\b(DEBUG|INFO|WARNING|ERROR|CRITICAL)\b")
_STEP_IN_NAME = re.compile(r"-step(\d+)\.|-(\d{6})\.")  # `name-step00000500.safetensors`, `name-000003.`


def parse_clock(text: str | None) -> float | None:
    """tqdm's `[h:]mm:ss` as seconds; None for `?` or nothing."""
    if not text or text == "?":
        return None
    seconds = 0.0
    for part in text.split(":"):
        if not part.isdigit():
            return None
        seconds = seconds * 60 + int(part)
    return seconds


@dataclass
class Bar:
    """One tqdm frame."""

    desc: str
    n: int
    total: int
    elapsed_s: float | None
    remaining_s: float | None
    it_s: float | None
    postfix: dict[str, float]
    end: int = 0  # where the frame ends in the segment: text after it is a line printed over the bar


def parse_bar(line: str) -> Bar | None:
    """A tqdm frame from one `\\r`-separated segment, or None."""
    m = _TQDM.search(line)
    if m is None:
        return None
    it_s: float | None = None
    rate, unit = m.group("rate"), m.group("unit")
    if rate and rate != "?":
        value = float(rate)
        if unit == "it/s":
            it_s = value
        elif value > 0:
            it_s = 1.0 / value
    postfix: dict[str, float] = {}
    for key, value in _POSTFIX.findall(m.group("post") or ""):
        try:
            postfix[key] = float(value)
        except ValueError:
            continue
    return Bar(
        desc=(m.group("desc") or "").strip(),
        n=int(m.group("n")),
        total=int(m.group("total")),
        elapsed_s=parse_clock(m.group("elapsed")),
        remaining_s=parse_clock(m.group("remaining")),
        it_s=it_s,
        postfix=postfix,
        end=m.end(),
    )


@dataclass
class Failure:
    """Why a run failed, in one line, and what to do about it."""

    error: str
    hint: str


@dataclass
class _Stream:
    decoder: Any = field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")(errors="replace"))
    partial: str = ""


class KohyaOutput:
    """Incremental parser of sd-scripts' stdout and stderr.

    `feed(chunk, stream)` takes raw bytes as read (any size, cut anywhere, even inside a UTF-8 character
    or between `\\r` and `\\n`) and returns the events found in the lines completed so far; `close()` ends
    the streams. What it learned stays readable: `step`, `total`, `epoch`, `saved` (checkpoint paths),
    `model_saved`, `no_data`, and `failure()` — the reason a run failed, or None.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._streams: dict[str, _Stream] = {}
        self.step = 0
        self.total = 0
        self.epoch = 0
        self.total_epochs = 0
        self.loss: float | None = None
        self.loss_avg: float | None = None
        self.saved: list[str] = []
        self.model_saved = False
        self.no_data = False
        self.oom = False
        self.exception: str | None = None  # the last line of the last traceback that is not a launcher's
        self.missing_module = False
        self._in_traceback = False
        self._last_step_at = -1e9
        self._last_step_emitted = 0
        self._last_progress_at: dict[str, float] = {}
        self._pending_step: dict[str, Any] | None = None
        self._log_tokens = float(LOG_BURST)
        self._log_at = clock()
        self.dropped_logs = 0

    # ------------------------------------------------------------------ input
    def feed(self, data: bytes, stream: str = "stdout") -> list[Event]:
        s = self._streams.setdefault(stream, _Stream())
        text = s.partial + s.decoder.decode(data)
        parts = _SEP.split(text)
        tail = parts.pop()
        if tail == "" and parts and parts[-1] == "\r":  # maybe the first half of a `\r\n` cut between reads
            parts.pop()
            tail = parts.pop() + "\r"
        out: list[Event] = []
        for segment, sep in zip(parts[0::2], parts[1::2], strict=True):
            out += self._line(segment, redraw=sep == "\r")
        if len(tail) > MAX_LINE:
            out += self._line(tail, redraw=False)
            tail = ""
        s.partial = tail
        # tqdm ends a frame only by starting the next one: a complete-looking training frame is read now,
        # not a step later (the same step read again when its `\r` arrives is not sent twice)
        frame = tail.rstrip("\r")
        if frame.endswith("]") and "steps" in frame:
            bar = parse_bar(_ANSI.sub("", frame))
            if bar is not None and bar.desc == "steps":
                out += self._bar(bar)
        return out

    def close(self) -> list[Event]:
        """End of both streams: the unfinished lines are parsed, and a thinned-out last step is sent."""
        out: list[Event] = []
        for s in self._streams.values():
            rest = (s.partial + s.decoder.decode(b"", final=True)).rstrip("\r")
            s.partial = ""
            if rest:
                out += self._line(rest, redraw=False)
        out += self._flush_step()
        return out

    # ------------------------------------------------------------------ lines
    def _line(self, raw: str, redraw: bool) -> list[Event]:
        line = _ANSI.sub("", raw).rstrip()
        if not line.strip():
            return []
        bar = parse_bar(line)
        if bar is not None:
            # a log line written while the bar is up lands after its last frame, in the same segment
            rest = line[bar.end :]
            return self._bar(bar) + (self._line(rest, redraw) if rest.strip() else [])
        out: list[Event] = []
        if self._in_traceback or line.startswith(_TRACEBACK):
            self._traceback_line(line)
        if _CUDA_OOM.search(line):
            self.oom = True
        if _NO_DATA.search(line):
            self.no_data = True
        if m := _EPOCH.search(line):
            out += self._flush_step()
            self.epoch, self.total_epochs = int(m.group(1)), int(m.group(2))
        if m := _SAVING.search(line):
            out += self._flush_step()
            path = m.group("path").strip()
            self.saved.append(path)
            fields: dict[str, Any] = {"path": path, "what": "lora"}
            step = _step_of(path, self.step, self.epoch)
            if step is not None:
                fields["step"] = step
            out.append(("artifact", fields))
        if _MODEL_SAVED.search(line):
            self.model_saved = True
        out += self._log(line)
        return out

    def _traceback_line(self, line: str) -> None:
        """Follow a traceback to its last line (`ValueError: …`): the frames are indented, the exception
        is not. A launcher (`accelerate launch`) prints its own CalledProcessError after the script's: the
        script's is the one worth showing."""
        if line.startswith(_TRACEBACK):
            self._in_traceback = True
            return
        if line.startswith((" ", "\t")) or line.startswith(("During handling", "The above exception")):
            return
        if _EXCEPTION_LINE.match(line.strip()) or ":" in line:
            self._in_traceback = False
            name = line.split(":", 1)[0]
            if name.endswith("ModuleNotFoundError") or name.endswith("ImportError"):
                self.missing_module = True
            if "CalledProcessError" in name and self.exception is not None:
                return
            self.exception = line.strip()

    def _bar(self, bar: Bar) -> list[Event]:
        now = self.clock()
        if bar.desc != "steps":  # caching latents, loading shards, …: generic progress
            last = self._last_progress_at.get(bar.desc, -1e9)
            if now - last < PROGRESS_EVERY_S and bar.n < bar.total:
                return []
            self._last_progress_at[bar.desc] = now
            fields: dict[str, Any] = {"done": bar.n, "total": bar.total, "unit": "it"}
            if bar.desc:
                fields["message"] = bar.desc
            return [("progress", fields)]
        if bar.n <= 0 or (bar.n == self._last_step_emitted and self._pending_step is None):
            self.total = bar.total
            return []
        self.step, self.total = bar.n, bar.total
        loss_avg = bar.postfix.get("avr_loss", bar.postfix.get("loss"))
        loss = bar.postfix.get("loss", loss_avg)
        if loss is not None:
            self.loss, self.loss_avg = loss, loss_avg
        it_s = bar.it_s
        eta = bar.remaining_s
        if eta is None and it_s:
            eta = (bar.total - bar.n) / it_s
        lrs = [v for k, v in sorted(bar.postfix.items()) if k == "lr" or k.startswith("lr/")]
        step = {
            "step": bar.n,
            "total": bar.total,
            "epoch": max(self.epoch, 1),
            "loss": self.loss if self.loss is not None else float("nan"),
            "loss_avg": self.loss_avg if self.loss_avg is not None else float("nan"),
            "lr": lrs,
            "it_s": round(it_s, 4) if it_s else 0.0,
            "eta_s": round(eta, 1) if eta is not None else 0.0,
        }
        self._pending_step = step
        if now - self._last_step_at >= STEP_EVERY_S or bar.n in (1, bar.total):
            return self._flush_step()
        return []

    def _flush_step(self) -> list[Event]:
        step, self._pending_step = self._pending_step, None
        if step is None:
            return []
        self._last_step_at = self.clock()
        self._last_step_emitted = step["step"]
        if step["loss"] != step["loss"]:  # NaN is not JSON: a bar before the first loss has none
            step = {**step, "loss": None, "loss_avg": None}
        return [("step", step)]

    def _log(self, line: str) -> list[Event]:
        """Every other line is a `log` event, within a budget: a chatty script (a warning per image) must
        not make events.jsonl the size of output.log, which keeps everything anyway."""
        m = _LEVEL.search(line[:60])
        level = {"WARNING": "warning", "ERROR": "error", "CRITICAL": "error", "DEBUG": "debug"}.get(
            m.group(1) if m else "", "info"
        )
        if self._in_traceback or line.startswith(_TRACEBACK):
            level = "error"
        now = self.clock()
        self._log_tokens = min(float(LOG_BURST), self._log_tokens + (now - self._log_at) * LOG_RATE)
        self._log_at = now
        if level in ("info", "debug"):
            if self._log_tokens < 1:
                self.dropped_logs += 1
                return []
            self._log_tokens -= 1
        return [("log", {"level": level, "message": line[:2000]})]

    # ------------------------------------------------------------------ verdict
    def failure(self, exit_code: int | None) -> Failure | None:
        """Why this run failed, judged from its output and exit code; None when it trained and saved.
        sd-scripts exits 0 after "No data found" and can exit 0 having saved nothing, so exit 0 is not
        enough."""
        if self.oom:
            return Failure("CUDA out of memory", CUDA_OOM_HINT)
        if self.no_data and not self.saved:
            return Failure("sd-scripts found no training data (No data found)", NO_DATA_HINT)
        if exit_code not in (0, None) or (self.exception and not self.saved):
            if self.exception:
                hint = MISSING_MODULE_HINT if self.missing_module else TRACEBACK_HINT
                return Failure(self.exception, hint)
            return Failure(f"sd-scripts exited with code {exit_code}", TRACEBACK_HINT)
        if not self.saved:
            return Failure("sd-scripts exited without saving a LoRA", NO_SAVE_HINT)
        return None


def _step_of(path: str, step: int, epoch: int) -> int | None:
    """The step a checkpoint was saved at: sd-scripts names step saves `-step00000500`, epoch saves `-000003`
    (the epoch) and the last one without a number; the bar's current step is the best answer for all."""
    m = _STEP_IN_NAME.search(path)
    if m and m.group(1):
        return int(m.group(1))
    return step or None
