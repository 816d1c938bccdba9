"""Caption quality: a score per image (100 = nothing to say, 0 = no caption) with the reasons, worst first, so
the captions worth a look come first in a dataset of thousands.

Reasons (and the score each costs):
- `empty` (→ 0): no caption file, or an empty one; the image trains unconditioned (or on its class token).
- `short` (-30): fewer than `min_tags` tags (comma-separated captions) or `min_words` words (prose).
- `duplicate` (-10 each): the same tag twice after normalisation (case, `_` vs space, `\\(` escapes);
  it weighs that concept double and wastes tokens.
- `unknown` (-5 each, at most -40): a tag not in the vocabulary (a WD14 `selected_tags.csv`:
  `tag_id,name,category,count`) — usually a typo or a tag the base model never saw. Only checked for tag
  captions, and not for the first `keep_tokens` tags (trigger words are unknown on purpose).
- `conflict` (-25 each): two tags that cannot both be true of one picture (`CONFLICTS`: hair lengths,
  open/closed mouth, smile/frown, day/night, indoors/outdoors, colourful/greyscale, solo/several people,
  framing). Tags that only look alike but coexist (`1girl` + `1boy`, `long hair` + `very long hair`) are
  not listed.

- `clip` (-20): the caption is far from its image by CLIP similarity, relative to this dataset: below
  median − max(2 × 1.4826 × MAD, 0.02) of the captioned images' similarities (a robust "two standard
  deviations below typical"; at least 3 similarities are needed). Raw CLIP similarities depend on the model
  (0.2–0.35 is typical for a matching pair with OpenAI's CLIPs), so only the dataset's own spread is used.
  This module never loads a model (the TUI imports it): the similarities come from
  `nyx_tui.tagging.clip_score.clip_similarities` and are passed in (`check_captions(clip=...)` or `apply_clip`).
"""

from __future__ import annotations

import csv
import re
import statistics
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nyx_tui.datasets.captions import caption_path, read_caption
from nyx_tui.datasets.dedupe import rel_of
from nyx_tui.datasets.images import iter_images

DEFAULT_MIN_TAGS = 3
DEFAULT_MIN_WORDS = 4
CLIP_PENALTY = 20
CLIP_MAD_FACTOR = 2.0
CLIP_MIN_MARGIN = 0.02
CLIP_MIN_IMAGES = 3

# Kaomoji keep their underscores (WD14's `selected_tags.csv` spells them so, and `^ ^` means nothing).
KAOMOJI = frozenset(
    {"0_0", "(o)_(o)", "+_+", "+_-", "._.", "<o>_<o>", "<|>_<|>", "=_=", ">_<", "3_3", "6_9", ">_o", "@_@",
     "^_^", "o_o", "u_u", "x_x", "|_|", "||_||", ";_;", "t_t", "-_-"}
)  # fmt: skip

_HAIR = ("very short hair", "short hair", "medium hair", "long hair", "very long hair", "absurdly long hair")
_PEOPLE = ("2girls", "3girls", "4girls", "5girls", "6+girls", "multiple girls",
           "2boys", "3boys", "4boys", "5boys", "6+boys", "multiple boys", "group")  # fmt: skip


def _hair_conflicts() -> list[tuple[str, str]]:
    """Hair lengths two or more steps apart (neighbours coexist: taggers mark both `long` and `very long`)."""
    return [(a, b) for i, a in enumerate(_HAIR) for b in _HAIR[i + 2 :]] + [(a, "bald") for a in _HAIR]


CONFLICTS: tuple[tuple[str, str], ...] = (
    *_hair_conflicts(),
    ("open mouth", "closed mouth"),
    ("smile", "frown"),
    ("closed eyes", "open eyes"),
    ("one eye closed", "closed eyes"),
    ("day", "night"),
    ("indoors", "outdoors"),
    ("monochrome", "colorful"),
    ("greyscale", "colorful"),
    *(("solo", p) for p in _PEOPLE),
    ("full body", "upper body"),
    ("full body", "portrait"),
    ("full body", "close-up"),
    ("full body", "cowboy shot"),
    ("upper body", "lower body"),
)


def normalize_tag(tag: str) -> str:
    """The comparable spelling: lower case, `\\(` → `(`, underscores → spaces (kaomoji kept), single spaces."""
    t = tag.strip().lower().replace("\\(", "(").replace("\\)", ")")
    if t not in KAOMOJI:
        t = t.replace("_", " ")
    return re.sub(r"\s+", " ", t).strip()


def load_vocabulary(path: Path) -> set[str]:
    """The tag names of a WD14 `selected_tags.csv` (`tag_id,name,category,count`), normalised.
    Raises ValueError when the file has no `name` column."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or "name" not in reader.fieldnames:
            raise ValueError(f"{path} has no `name` column: expected a WD14 selected_tags.csv (tag_id,name,...)")
        return {normalize_tag(row["name"]) for row in reader if row.get("name")}


def is_tag_caption(text: str) -> bool:
    """A tag list (`1girl, smile, ...`) rather than a sentence: it has commas and its parts are short."""
    parts = [p for p in text.split(",") if p.strip()]
    return len(parts) >= 2 and sum(len(p.split()) for p in parts) / len(parts) <= 4


@dataclass
class CaptionReport:
    """One image's caption score (0..100) and reasons; `tags` is the caption as normalised tags."""

    path: Path
    rel: str
    caption: str | None
    score: int = 100
    reasons: list[str] = field(default_factory=list)
    codes: list[str] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    clip: float | None = None  # CLIP image–caption similarity, when one was computed

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"path": self.rel, "score": self.score, "codes": self.codes, "reasons": self.reasons}
        if self.clip is not None:
            out["clip"] = round(self.clip, 4)
        return out


def judge_caption(
    text: str | None,
    *,
    vocab: set[str] | None = None,
    conflicts: Iterable[tuple[str, str]] = CONFLICTS,
    min_tags: int = DEFAULT_MIN_TAGS,
    min_words: int = DEFAULT_MIN_WORDS,
    keep_tokens: int = 0,
) -> tuple[int, list[str], list[str], list[str]]:
    """(score, codes, reasons, normalised tags) of one caption; `text` None = no caption file."""
    if text is None or not text.strip():
        why = "no caption file" if text is None else "the caption is empty"
        return 0, ["empty"], [f"empty: {why}"], []
    codes: list[str] = []
    reasons: list[str] = []
    score = 100
    as_tags = is_tag_caption(text) or "," in text
    tags = [normalize_tag(t) for t in text.split(",") if t.strip()] if as_tags else [normalize_tag(text)]
    if as_tags and len(tags) < min_tags:
        score -= 30
        codes.append("short")
        reasons.append(f"short: {len(tags)} tag{'s' if len(tags) != 1 else ''} (< {min_tags})")
    words = len(text.split())
    if not as_tags and words < min_words:
        score -= 30
        codes.append("short")
        reasons.append(f"short: {words} word{'s' if words != 1 else ''} (< {min_words})")
    if as_tags:
        dupes = sorted(t for t, n in Counter(tags).items() if n > 1)
        if dupes:
            score -= 10 * len(dupes)
            codes.append("duplicate")
            reasons.append("duplicate tags: " + ", ".join(dupes))
        if vocab is not None:
            unknown = sorted({t for t in tags[keep_tokens:] if t not in vocab})
            if unknown:
                score -= min(40, 5 * len(unknown))
                codes.append("unknown")
                shown = ", ".join(unknown[:8]) + (f" and {len(unknown) - 8} more" if len(unknown) > 8 else "")
                reasons.append(f"not in the vocabulary: {shown}")
    present = set(tags)
    found = [(a, b) for a, b in conflicts if normalize_tag(a) in present and normalize_tag(b) in present]
    if found:
        score -= 25 * len(found)
        codes.append("conflict")
        reasons.append("conflicting tags: " + "; ".join(f"{a} / {b}" for a, b in found))
    return max(0, score), codes, reasons, tags


def clip_threshold(similarities: Iterable[float]) -> tuple[float, float] | None:
    """(median, threshold) of a dataset's CLIP similarities: below the threshold is `clip`-flagged;
    None when there are fewer than `CLIP_MIN_IMAGES` (too few to say what is typical)."""
    values = [float(v) for v in similarities if v == v]  # NaN-free
    if len(values) < CLIP_MIN_IMAGES:
        return None
    median = statistics.median(values)
    mad = statistics.median(abs(v - median) for v in values)
    return median, median - max(CLIP_MAD_FACTOR * 1.4826 * mad, CLIP_MIN_MARGIN)


def apply_clip(reports: list[CaptionReport], clip: dict[Path, float]) -> list[CaptionReport]:
    """Record each report's CLIP similarity (`clip`, keyed by the report's `path`), add the `clip` reason to
    those far below the dataset's typical one, and re-sort worst first. Images without a caption are never
    `clip`-flagged (they already score 0). Returns `reports`, changed in place."""
    for r in reports:
        if r.path in clip:
            r.clip = float(clip[r.path])
    cut = clip_threshold(r.clip for r in reports if r.clip is not None and "empty" not in r.codes)
    if cut is not None:
        median, threshold = cut
        for r in reports:
            if r.clip is not None and "empty" not in r.codes and r.clip < threshold and "clip" not in r.codes:
                r.score = max(0, r.score - CLIP_PENALTY)
                r.codes.append("clip")
                r.reasons.append(f"far from the image (CLIP similarity {r.clip:.2f}, dataset median {median:.2f})")
    reports.sort(key=lambda r: (r.score, r.rel))
    return reports


def check_captions(
    root: Path,
    *,
    caption_ext: str = ".txt",
    vocab: set[str] | None = None,
    min_tags: int = DEFAULT_MIN_TAGS,
    min_words: int = DEFAULT_MIN_WORDS,
    keep_tokens: int = 0,
    recursive: bool = True,
    clip: dict[Path, float] | None = None,
) -> list[CaptionReport]:
    """Every image's caption report under `root`, worst first (then by path). `clip`: CLIP similarities by
    image path (absolute, as `iter_images` yields them under `root`), see `apply_clip`.
    Raises FileNotFoundError / NotADirectoryError for a bad `root`."""
    root = Path(root).expanduser().absolute()
    if not root.exists():
        raise FileNotFoundError(f"{root} does not exist")
    if not root.is_dir():
        raise NotADirectoryError(f"{root} is not a folder")
    if not caption_ext.startswith("."):
        caption_ext = "." + caption_ext
    out: list[CaptionReport] = []
    for image in iter_images(root, recursive=recursive):
        cap = caption_path(image, caption_ext)
        text: str | None = read_caption(cap)[0] if cap.is_file() else None
        score, codes, reasons, tags = judge_caption(
            text, vocab=vocab, min_tags=min_tags, min_words=min_words, keep_tokens=keep_tokens
        )
        out.append(CaptionReport(image, rel_of(image, root), text, score, reasons, codes, tags))
    if clip is not None:
        return apply_clip(out, clip)
    out.sort(key=lambda r: (r.score, r.rel))
    return out


__all__ = [
    "CONFLICTS",
    "KAOMOJI",
    "CaptionReport",
    "apply_clip",
    "check_captions",
    "clip_threshold",
    "is_tag_caption",
    "judge_caption",
    "load_vocabulary",
    "normalize_tag",
]
