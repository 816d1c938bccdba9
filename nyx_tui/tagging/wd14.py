"""WD14 tagging (SmilingWolf's v2 and v3 ONNX taggers) with onnxruntime.

The pieces, each usable alone (the job worker `tag_job`, the tests and `bench/tagging.py` combine them):

- `resolve_model`: a Hugging Face repo id (fetched into the HF cache with `hf_hub_download`) or a local
  folder, to the two files a WD14 model is: `model.onnx` and `selected_tags.csv`.
- `Tagger`: one onnxruntime session; its input name, input size and whether the batch dim is fixed are
  read from the session, never assumed (v2 exports are fixed at 1, v3 ones are dynamic).
- `preprocess`: exactly what the models were trained on: alpha onto white, padded to a white square
  (centered), bicubic resize, RGB→BGR, float32 0–255, NHWC.
- `select_tags` / `format_caption` / `merge_caption`: thresholds or MCut, character tags first, rating,
  undesired tags, underscores (kaomoji kept), append/overwrite/skip.
- `tag_images`: the loop. Images are decoded by a thread pool a few batches ahead while the session
  runs the current batch (Pillow and onnxruntime both release the GIL), and every caption is written
  through `datasets.captions` so an edit made meanwhile is never overwritten.

Only job processes import this module (it imports numpy and Pillow at module level, onnxruntime lazily).
"""

from __future__ import annotations

import csv
import re
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image, ImageOps

from nyx_tui.datasets.captions import CaptionConflict, CaptionStamp, caption_path, read_caption, write_caption

MODEL_FILE = "model.onnx"
TAGS_FILE = "selected_tags.csv"
DEFAULT_MODEL = "SmilingWolf/wd-vit-tagger-v3"
DEFAULT_THRESHOLD = 0.35
DEFAULT_CHARACTER_THRESHOLD = 0.85
# With MCut, a character tag still needs at least this probability: with few confident characters the
# largest gap can fall very low among near-zero probabilities (SmilingWolf's own demo uses 0.15).
DEFAULT_MCUT_CHARACTER_FLOOR = 0.15
DEFAULT_BATCH_SIZE = 8

CATEGORY_GENERAL, CATEGORY_CHARACTER, CATEGORY_RATING = 0, 4, 9

Mode = Literal["append", "overwrite", "skip"]
MODES: tuple[str, ...] = ("append", "overwrite", "skip")

# Tags whose underscores are part of the face they draw: replacing them would turn `^_^` into `^ ^`.
# The list used by SmilingWolf's demo and the common taggers (kohya, a1111's tagger extension).
KAOMOJI: frozenset[str] = frozenset(
    {
        "0_0",
        "(o)_(o)",
        "+_+",
        "+_-",
        "._.",
        "<o>_<o>",
        "<|>_<|>",
        "=_=",
        ">_<",
        "3_3",
        "6_9",
        ">_o",
        "@_@",
        "^_^",
        "o_o",
        "u_u",
        "x_x",
        "|_|",
        "||_||",
    }
)


class ModelError(RuntimeError):
    """The model cannot be used (missing files, not in the cache, not a WD14 model). The message names the
    model and the fix; the CLI shows it as is and the worker prints it without a traceback."""


# --------------------------------------------------------------------------------------------- model files


@dataclass(frozen=True)
class ModelFiles:
    onnx: Path
    tags: Path
    source: str  # what the user named: the repo id or the folder


def looks_like_repo_id(text: str) -> bool:
    """`owner/name` with the characters the Hub allows: how a repo id is told from a mistyped folder."""
    return re.fullmatch(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}", text) is not None


def local_model_problem(folder: Path) -> str | None:
    """Why `folder` is not a usable WD14 model folder, or None when it holds both files."""
    missing = [name for name in (MODEL_FILE, TAGS_FILE) if not (folder / name).is_file()]
    if not missing:
        return None
    return f"{folder} lacks {' and '.join(missing)}; a WD14 model folder holds {MODEL_FILE} and {TAGS_FILE}"


def resolve_model(model: str, cache_dir: Path | None = None) -> ModelFiles:
    """The two files of `model`: a local folder (used as is) or a Hub repo id (taken from the HF cache when
    there, without asking the Hub; else downloaded into it). Raises ModelError naming the repo and the fix."""
    folder = Path(model).expanduser()
    if folder.is_dir():
        problem = local_model_problem(folder)
        if problem:
            raise ModelError(problem)
        return ModelFiles(folder / MODEL_FILE, folder / TAGS_FILE, str(folder))
    if not looks_like_repo_id(model):
        raise ModelError(
            f"{model!r} is neither a folder nor a Hugging Face repo id (owner/name); "
            f"pass e.g. --model {DEFAULT_MODEL} or a folder holding {MODEL_FILE} and {TAGS_FILE}"
        )
    from huggingface_hub import constants, hf_hub_download

    paths: list[Path] = []
    for name in (MODEL_FILE, TAGS_FILE):
        try:  # the cache first: no request at all (a box without network would spend ~20 s in retries)
            paths.append(Path(hf_hub_download(model, name, cache_dir=cache_dir, local_files_only=True)))
            continue
        except Exception:
            pass
        try:
            paths.append(Path(hf_hub_download(model, name, cache_dir=cache_dir)))
        except Exception as e:  # offline, not cached, no such repo, no network: one answer with the fix
            raise ModelError(
                f"the tagger {model} is not in the Hugging Face cache ({cache_dir or constants.HF_HUB_CACHE}) "
                f"and cannot be downloaded: {_download_failure(e)}. Fix: on a machine with network run "
                f"`hf download {model} {MODEL_FILE} {TAGS_FILE}` (it fills that cache), or put those two files "
                f"in a folder and pass --model FOLDER"
            ) from e
    return ModelFiles(paths[0], paths[1], model)


def _download_failure(e: Exception) -> str:
    """Why the Hub gave no file, in a few words: huggingface_hub's own messages run to several lines."""
    from huggingface_hub import constants

    kind = type(e).__name__
    if kind in ("RepositoryNotFoundError", "GatedRepoError"):
        return "the Hub has no such repository, or it is gated or private (set HF_TOKEN)"
    if kind == "EntryNotFoundError":
        return "that repository has no such file (is it a WD14 tagger?)"
    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    if kind == "LocalEntryNotFoundError":
        return "the Hub is not reachable from here"
    first = str(e).splitlines()[0] if str(e) else ""
    return f"{kind}: {first[:160]}"


# ------------------------------------------------------------------------------------------------- labels


@dataclass(frozen=True)
class Labels:
    """`selected_tags.csv`: one row per model output, in output order."""

    names: tuple[str, ...]
    categories: np.ndarray  # int, one per output

    @classmethod
    def load(cls, path: Path) -> Labels:
        names: list[str] = []
        categories: list[int] = []
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or not {"name", "category"} <= set(reader.fieldnames):
                raise ModelError(f"{path} is not a WD14 selected_tags.csv: it needs the columns name and category")
            for row in reader:
                names.append(row["name"])
                categories.append(int(row["category"]))
        if not names:
            raise ModelError(f"{path} lists no tags")
        return cls(tuple(names), np.asarray(categories, dtype=np.int64))

    def indices(self, category: int) -> np.ndarray:
        return np.flatnonzero(self.categories == category)


# --------------------------------------------------------------------------------------------- the tagger


@dataclass
class TaggerStats:
    """Counters the bench and the tests read: how the work was batched and where the time went."""

    runs: int = 0
    batch_sizes: list[int] = field(default_factory=list)
    infer_s: float = 0.0
    decode_wait_s: float = 0.0  # time the loop waited for decoded images (0 when decoding fully overlaps)


class Tagger:
    """One WD14 model in an onnxruntime session. Everything about the model's interface comes from the
    session: input and output names, the square input size, and whether the batch dim is fixed."""

    def __init__(
        self, onnx_path: Path, labels: Labels, providers: Sequence[str] | None = None, threads: int = 0
    ) -> None:
        import onnxruntime as ort

        # the GPU build logs a CUDA load error on a box without one unless told to keep quiet first
        ort.set_default_logger_severity(3)
        available = ort.get_available_providers()
        wanted = providers or ("CUDAExecutionProvider", "CPUExecutionProvider")
        chosen = [p for p in wanted if p in available] or ["CPUExecutionProvider"]
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(onnx_path), sess_options=options, providers=chosen)
        except Exception as e:
            raise ModelError(f"onnxruntime cannot load {onnx_path}: {e}") from e
        self.providers: list[str] = list(self.session.get_providers())
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or not outputs:
            raise ModelError(
                f"{onnx_path} is not a WD14 tagger: it has {len(inputs)} inputs (one image batch expected)"
            )
        shape = list(inputs[0].shape)
        if len(shape) != 4 or shape[3] != 3 or not isinstance(shape[1], int) or shape[1] != shape[2]:
            raise ModelError(
                f"{onnx_path} is not a WD14 tagger: its input has shape {shape}, not [batch, size, size, 3] (NHWC)"
            )
        self.input_name: str = inputs[0].name
        self.output_name: str = outputs[0].name
        self.size: int = int(shape[1])
        self.fixed_batch: int | None = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None
        n_out = outputs[0].shape[-1]
        if isinstance(n_out, int) and n_out != len(labels.names):
            raise ModelError(
                f"{onnx_path} has {n_out} outputs but its selected_tags.csv lists {len(labels.names)} tags: "
                "the two files come from different models"
            )
        self.labels = labels
        self.stats = TaggerStats()

    @classmethod
    def load(cls, model: str, providers: Sequence[str] | None = None, threads: int = 0) -> Tagger:
        files = resolve_model(model)
        return cls(files.onnx, Labels.load(files.tags), providers, threads)

    def batch_size(self, requested: int) -> int:
        """A fixed batch dim wins over the request (a v2 export fixed at 1 takes one image a run)."""
        return self.fixed_batch if self.fixed_batch is not None else max(1, requested)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """Probabilities [n, tags] for a preprocessed batch [n, size, size, 3] (already sigmoid)."""
        start = time.perf_counter()
        (probs,) = self.session.run([self.output_name], {self.input_name: batch})
        self.stats.infer_s += time.perf_counter() - start
        self.stats.runs += 1
        self.stats.batch_sizes.append(int(batch.shape[0]))
        return np.asarray(probs, dtype=np.float32)


# ---------------------------------------------------------------------------------------------- preprocess


def preprocess(image: Image.Image, size: int) -> np.ndarray:
    """One image as the WD14 models saw in training: [size, size, 3] float32, BGR, 0–255.

    Transparency becomes white (not black, which is what dropping alpha would give), the image is padded
    to a square with white and centered (never stretched or cropped), then resized with bicubic."""
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        rgb = Image.alpha_composite(white, rgba).convert("RGB")
    else:  # opaque: compositing would change nothing and costs a third of the preprocessing
        rgb = image.convert("RGB")
    side = max(rgb.size)
    square = Image.new("RGB", (side, side), (255, 255, 255))
    square.paste(rgb, ((side - rgb.width) // 2, (side - rgb.height) // 2))
    if side != size:
        square = square.resize((size, size), Image.Resampling.BICUBIC)
    array = np.asarray(square, dtype=np.float32)
    return np.ascontiguousarray(array[:, :, ::-1])  # RGB → BGR


def load_image(path: Path, size: int) -> np.ndarray:
    """Decode and preprocess one file (EXIF orientation applied; the first frame of an animation)."""
    with Image.open(path) as img:
        img.load()
        return preprocess(ImageOps.exif_transpose(img) or img, size)


# ------------------------------------------------------------------------------------------ postprocess


def mcut_threshold(probs: np.ndarray) -> float | None:
    """Maximum Cut Thresholding (Largeron et al., 2012): sort the probabilities, find the largest gap between
    neighbours, and cut in its middle. None with fewer than two probabilities (no gap to cut)."""
    if probs.size < 2:
        return None
    ordered = np.sort(probs)[::-1]
    gaps = ordered[:-1] - ordered[1:]
    t = int(np.argmax(gaps))
    return float((ordered[t] + ordered[t + 1]) / 2)


@dataclass(frozen=True)
class TagOptions:
    """How probabilities become a caption. Thresholds keep a tag whose probability is >= the threshold."""

    threshold: float = DEFAULT_THRESHOLD
    character_threshold: float = DEFAULT_CHARACTER_THRESHOLD
    mcut: bool = False  # MCut for general and character tags instead of the fixed thresholds
    mcut_character_floor: float = DEFAULT_MCUT_CHARACTER_FLOOR
    rating: bool = False  # put the most likely rating tag first
    undesired: tuple[str, ...] = ()
    replace_underscores: bool = True
    escape_parens: bool = False
    mode: Mode = "append"
    caption_ext: str = ".txt"
    batch_size: int = DEFAULT_BATCH_SIZE

    def to_json(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TagOptions:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        if "undesired" in known:
            known["undesired"] = tuple(known["undesired"])
        return cls(**known)


@dataclass(frozen=True)
class Prediction:
    """The tags kept for one image, in caption order, each with its probability."""

    rating: tuple[str, float] | None
    characters: list[tuple[str, float]]
    general: list[tuple[str, float]]

    @property
    def tags(self) -> list[str]:
        head = [self.rating[0]] if self.rating else []
        return head + [n for n, _ in self.characters] + [n for n, _ in self.general]


def _display(name: str, options: TagOptions) -> str:
    text = name.replace("_", " ") if options.replace_underscores and name not in KAOMOJI else name
    if options.escape_parens:
        text = text.replace("(", "\\(").replace(")", "\\)")
    return text


def _key(tag: str) -> str:
    """The form two tags are compared in: `long_hair`, `long hair` and `Long Hair` are one tag; an
    escaped `\\(` equals `(`."""
    tag = tag.strip().replace("\\(", "(").replace("\\)", ")").lower()
    return tag if tag in KAOMOJI else tag.replace("_", " ")


def select_tags(probs: np.ndarray, labels: Labels, options: TagOptions) -> Prediction:
    """Probabilities of one image → the tags to write, in order: rating (if asked), characters, general,
    each group by descending probability. Undesired tags are dropped whatever their probability."""
    undesired = {_key(t) for t in options.undesired}

    def kept(category: int, fixed: float, use_mcut: bool, floor: float) -> list[tuple[str, float]]:
        idx = labels.indices(category)
        p = probs[idx]
        threshold = fixed
        if use_mcut:
            cut = mcut_threshold(p)
            threshold = fixed if cut is None else max(floor, cut)
        chosen = [(labels.names[i], float(probs[i])) for i in idx if probs[i] >= threshold]
        chosen = [(_display(n, options), q) for n, q in chosen if _key(n) not in undesired]
        return sorted(chosen, key=lambda item: -item[1])

    general = kept(CATEGORY_GENERAL, options.threshold, options.mcut, 0.0)
    characters = kept(CATEGORY_CHARACTER, options.character_threshold, options.mcut, options.mcut_character_floor)
    rating: tuple[str, float] | None = None
    ratings = labels.indices(CATEGORY_RATING)
    if options.rating and ratings.size:
        best = int(ratings[int(np.argmax(probs[ratings]))])
        if _key(labels.names[best]) not in undesired:
            rating = (_display(labels.names[best], options), float(probs[best]))
    return Prediction(rating, characters, general)


def split_caption(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def merge_caption(existing: str, tags: Sequence[str], mode: Mode) -> str | None:
    """The caption to write, or None when the file should stay as it is.

    append: the existing caption, then the new tags it does not already hold (compared ignoring case,
    underscores vs spaces and escaped parentheses), so running the tagger twice changes nothing.
    overwrite: the new tags. skip: the new tags only when there is no caption yet."""
    new = ", ".join(tags)
    if mode == "overwrite":
        return None if new == existing else new
    if mode == "skip":
        return None if existing else new
    have = split_caption(existing)
    seen = {_key(t) for t in have}
    added: list[str] = []
    for tag in tags:
        if _key(tag) not in seen:
            seen.add(_key(tag))
            added.append(tag)
    if not added:
        return None
    return ", ".join([*have, *added])


# --------------------------------------------------------------------------------------------- the loop


@dataclass
class TagSummary:
    total: int = 0
    written: int = 0
    unchanged: int = 0
    skipped: int = 0  # skip mode: a caption was there
    failed: int = 0  # unreadable images and captions that could not be written
    conflicts: int = 0
    stopped: bool = False

    @property
    def done(self) -> int:
        return self.written + self.unchanged + self.skipped + self.failed + self.conflicts

    def describe(self) -> str:
        parts = [f"{self.written} caption(s) written", f"{self.unchanged} unchanged"]
        if self.skipped:
            parts.append(f"{self.skipped} skipped (already captioned)")
        if self.failed:
            parts.append(f"{self.failed} failed")
        if self.conflicts:
            parts.append(f"{self.conflicts} left alone (edited meanwhile)")
        head = f"stopped after {self.done} of {self.total} images" if self.stopped else f"tagged {self.total} images"
        return f"{head}: {', '.join(parts)}"


@dataclass
class _Item:
    """One image, read ahead: its pixels (None when skipped or unreadable) and its caption as it was read."""

    image: Path
    caption: Path
    text: str
    stamp: CaptionStamp
    pixels: np.ndarray | None = None
    error: str | None = None
    skip: bool = False


def _read_item(image: Path, size: int, options: TagOptions) -> _Item:
    cap = caption_path(image, options.caption_ext)
    text, stamp = read_caption(cap)
    item = _Item(image, cap, text, stamp)
    if options.mode == "skip" and text:
        item.skip = True  # no decode: the caption is kept whatever the tagger would say
        return item
    try:
        item.pixels = load_image(image, size)
    except Exception as e:  # a broken file is reported and passed over, never fatal to the run
        item.error = f"{type(e).__name__}: {e}"
    return item


Warn = Callable[[str], None]
Progress = Callable[[int, int], None]


def _batches(items: Sequence[Path], size: int) -> list[Sequence[Path]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def tag_images(
    tagger: Tagger,
    images: Iterable[Path],
    options: TagOptions,
    *,
    progress: Progress | None = None,
    warn: Warn | None = None,
    should_stop: Callable[[], bool] | None = None,
    decode_workers: int = 2,
    prefetch_batches: int = 2,
) -> TagSummary:
    """Tag `images` and write their captions. Returns what happened; never raises for one bad file.

    `prefetch_batches` batches are decoded ahead by `decode_workers` threads while the session runs (0 with
    `decode_workers=0` decodes in the loop, no overlap: the baseline of bench/tagging.py). `should_stop`
    is asked between batches; captions already written stay. `progress(done, total)` follows each batch."""
    paths = list(images)
    summary = TagSummary(total=len(paths))
    say = warn or (lambda _msg: None)
    batches = _batches(paths, tagger.batch_size(options.batch_size))
    pool = ThreadPoolExecutor(max_workers=decode_workers, thread_name_prefix="nyx-decode") if decode_workers else None
    pending: deque[list[Future[_Item]]] = deque()

    def submit(batch: Sequence[Path]) -> list[Future[_Item]]:
        assert pool is not None
        return [pool.submit(_read_item, p, tagger.size, options) for p in batch]

    try:
        ahead = iter(batches)
        if pool is not None:
            for batch in ahead:
                pending.append(submit(batch))
                if len(pending) > prefetch_batches:
                    break
        for batch in batches:
            if should_stop is not None and should_stop():
                summary.stopped = True
                break
            waited = time.perf_counter()
            if pool is not None:
                items = [f.result() for f in pending.popleft()]
                nxt = next(ahead, None)
                if nxt is not None:
                    pending.append(submit(nxt))
            else:
                items = [_read_item(p, tagger.size, options) for p in batch]
            tagger.stats.decode_wait_s += time.perf_counter() - waited
            _tag_batch(tagger, items, options, summary, say)
            if progress is not None:
                progress(summary.done, summary.total)
    finally:
        if pool is not None:
            for futures in pending:
                for f in futures:
                    f.cancel()
            pool.shutdown(wait=True)
    return summary


def _tag_batch(tagger: Tagger, items: list[_Item], options: TagOptions, summary: TagSummary, say: Warn) -> None:
    for item in items:
        if item.skip:
            summary.skipped += 1
        elif item.error is not None:
            summary.failed += 1
            say(f"cannot read {item.image}: {item.error}; skipped")
    todo = [item for item in items if item.pixels is not None]
    if not todo:
        return
    batch = np.stack([item.pixels for item in todo if item.pixels is not None])
    want = tagger.batch_size(options.batch_size)
    if tagger.fixed_batch is not None and batch.shape[0] < want:  # a fixed dim needs a full batch: pad it
        pad = np.full((want - batch.shape[0], *batch.shape[1:]), 255.0, dtype=np.float32)
        batch = np.concatenate([batch, pad])
    probs = tagger.predict(batch)
    for item, row in zip(todo, probs, strict=False):
        tags = select_tags(row, tagger.labels, options).tags
        text = merge_caption(item.text, tags, options.mode)
        if text is None:
            summary.unchanged += 1
            continue
        try:
            write_caption(item.caption, text, item.stamp)
        except CaptionConflict:
            summary.conflicts += 1
            say(f"{item.caption} changed on disk while it was being tagged; left as it is (run again to tag it)")
            continue
        except OSError as e:
            summary.failed += 1
            say(f"cannot write {item.caption}: {e}")
            continue
        summary.written += 1


__all__ = [
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_CHARACTER_THRESHOLD",
    "DEFAULT_MODEL",
    "DEFAULT_THRESHOLD",
    "KAOMOJI",
    "MODES",
    "Labels",
    "ModelError",
    "ModelFiles",
    "Prediction",
    "TagOptions",
    "TagSummary",
    "Tagger",
    "load_image",
    "local_model_problem",
    "looks_like_repo_id",
    "mcut_threshold",
    "merge_caption",
    "preprocess",
    "resolve_model",
    "select_tags",
    "tag_images",
]
