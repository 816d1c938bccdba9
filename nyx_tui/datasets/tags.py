"""Tag operations on captions (comma-separated tags), applied to a selection of images or a whole dataset,
written conflict-safely and recorded for undo.

An operation is a plain function `list[str] -> list[str]` on one caption's tags (`add_tags(["mychar"])`,
`replace_tag("kitty", "cat")`, …). `plan` runs it over images and keeps the captions whose tags change;
`apply_edits` writes them with `captions.write_caption` (atomic; a caption changed on disk since it was read
is not overwritten but reported as a conflict) and records the batch in the undo journal
(`datasets.undo`). A caption whose tags do not change is left byte for byte as it is; one that changes is
written as the tags joined with ", ".

Tags are split on commas (and line breaks) and stripped; empty ones are dropped. Matching is exact and
case-sensitive.

Rules file (aliases and implications), `.txt` or any other extension, one rule a line, `#` comments:

    kitty -> cat                      # alias: kitty is rewritten to cat (also `→`)
    cat ears => animal ears           # implication: cat ears present ⇒ animal ears added (also `⇒`)
    cat ears => animal ears, ears     # several implied tags

or TOML (`.toml`): `[aliases]` with `kitty = "cat"`, `[implications]` with `"cat ears" = ["animal ears"]`.
"""

from __future__ import annotations

import fnmatch
import re
import tomllib
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nyx_tui.datasets.captions import CaptionConflict, CaptionStamp, read_caption_bytes, write_caption

TagOp = Callable[[list[str]], list[str]]

_SPLIT = re.compile(r"[,\n\r]")


# --------------------------------------------------------------------------------------------- parsing


def split_tags(text: str) -> list[str]:
    """`"a, b,,c\\n"` → `["a", "b", "c"]`: split on commas and line breaks, strip, drop empty tags."""
    return [t.strip() for t in _SPLIT.split(text) if t.strip()]


def join_tags(tags: Sequence[str]) -> str:
    return ", ".join(tags)


def tag_frequencies(captions: Iterable[Any]) -> Counter[str]:
    """How many captions hold each tag (a tag twice in one caption counts once). Accepts `ImageEntry`s
    (their `caption`; images without a caption count for nothing) or plain caption strings."""
    counts: Counter[str] = Counter()
    for c in captions:
        text = c if isinstance(c, str) else getattr(c, "caption", None)
        if text:
            counts.update(set(split_tags(text)))
    return counts


def _dedupe(tags: Iterable[str], only: set[str] | None = None) -> list[str]:
    """Drop repeated tags, keeping the first; with `only`, drop repeats of those tags alone."""
    seen: set[str] = set()
    out: list[str] = []
    for t in tags:
        if t in seen and (only is None or t in only):
            continue
        seen.add(t)
        out.append(t)
    return out


# ----------------------------------------------------------------------------------------- operations


def _clean(tags: Iterable[str]) -> list[str]:
    out = [t.strip() for t in tags]
    bad = [t for t in out if not t or "," in t]
    if bad:
        raise ValueError(f"{bad[0]!r} is not a tag: a tag is non-empty and has no comma (pass tags separately)")
    return out


def add_tags(tags: Sequence[str], *, front: bool = False) -> TagOp:
    """Add each tag not already present: at the end, or (`front`) at the start in the given order. A tag
    already present stays where it is (`move_to_front` moves it)."""
    new = _dedupe(_clean(tags))

    def op(current: list[str]) -> list[str]:
        missing = [t for t in new if t not in current]
        return missing + current if front else current + missing

    return op


def remove_tags(tags: Sequence[str]) -> TagOp:
    """Remove every occurrence of the tags."""
    drop = set(_clean(tags))

    def op(current: list[str]) -> list[str]:
        return [t for t in current if t not in drop]

    return op


def replace_tag(old: str, new: str) -> TagOp:
    """Rename `old` to `new` where it stands (an empty `new` removes it); if `new` is then there twice, the
    first stays."""
    (old,) = _clean([old])
    new = new.strip()
    if "," in new:
        raise ValueError(f"{new!r} is not a tag: a tag has no comma")

    def op(current: list[str]) -> list[str]:
        if old not in current:
            return current
        if not new:
            return [t for t in current if t != old]
        return _dedupe((new if t == old else t for t in current), only={new})

    return op


def prune_tags(frequencies: Mapping[str, int], below: int, *, keep_tokens: int = 0) -> TagOp:
    """Remove tags held by fewer than `below` captions (by `frequencies`, usually the whole dataset's),
    except the first `keep_tokens` tags of each caption."""

    def op(current: list[str]) -> list[str]:
        kept = current[:keep_tokens]
        return kept + [t for t in current[keep_tokens:] if frequencies.get(t, 0) >= below]

    return op


def move_to_front(tags: Sequence[str]) -> TagOp:
    """Move the tags that are present to the start, in the given order."""
    first = _dedupe(_clean(tags))

    def op(current: list[str]) -> list[str]:
        present = [t for t in first if t in current]
        return present + [t for t in current if t not in present]

    return op


def dedupe_tags() -> TagOp:
    """Drop repeated tags within a caption, keeping the first."""

    def op(current: list[str]) -> list[str]:
        return _dedupe(current)

    return op


def sort_tags(by: str = "alpha", *, keep_tokens: int = 0, frequencies: Mapping[str, int] | None = None) -> TagOp:
    """Sort the tags after the first `keep_tokens`: `alpha` (case-insensitive), or `frequency` (most
    common in `frequencies` first, ties alphabetical)."""
    if by not in ("alpha", "frequency"):
        raise ValueError(f"cannot sort by {by!r}: use alpha or frequency")
    if by == "frequency" and frequencies is None:
        raise ValueError("sorting by frequency needs the tag frequencies")
    freq = frequencies or {}

    def key(t: str) -> tuple[int, str, str]:
        return (-freq.get(t, 0) if by == "frequency" else 0, t.casefold(), t)

    def op(current: list[str]) -> list[str]:
        return current[:keep_tokens] + sorted(current[keep_tokens:], key=key)

    return op


def apply_aliases(aliases: Mapping[str, str]) -> TagOp:
    """Rewrite each aliased tag to its target where it stands; a target then present twice keeps the first."""
    targets = set(aliases.values())

    def op(current: list[str]) -> list[str]:
        if not any(t in aliases for t in current):
            return current
        return _dedupe((aliases.get(t, t) for t in current), only=targets)

    return op


def apply_implications(implications: Mapping[str, Sequence[str]]) -> TagOp:
    """Add, at the end, every tag implied by a present tag (and what those imply in turn), unless present."""

    def op(current: list[str]) -> list[str]:
        out = list(current)
        have = set(out)
        queue = [t for t in out if t in implications]
        while queue:
            for implied in implications.get(queue.pop(0), ()):
                if implied not in have:
                    have.add(implied)
                    out.append(implied)
                    queue.append(implied)
        return out

    return op


# --------------------------------------------------------------------------------------- rules files


class RulesError(ValueError):
    """A bad alias/implication rule, with where it is."""


@dataclass
class TagRules:
    """Aliases (`kitty` → `cat`, resolved through chains) and implications (`cat ears` ⇒ [`animal ears`])."""

    aliases: dict[str, str] = field(default_factory=dict)
    implications: dict[str, list[str]] = field(default_factory=dict)


_ALIAS_ARROWS = ("->", "→")
_IMPLY_ARROWS = ("=>", "⇒")
_COMMENT = re.compile(r"(^|\s)#.*$")  # `#` starts a comment at a line's start or after a space


def _resolve_aliases(raw: dict[str, str], source: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for start in raw:
        seen = [start]
        target = raw[start]
        while target in raw:
            if target in seen:
                chain = " -> ".join([*seen, target])
                raise RulesError(f"{source}: aliases loop ({chain}): remove one of these rules")
            seen.append(target)
            target = raw[target]
        if target != start:
            out[start] = target
    return out


def parse_rules(text: str, source: str = "<rules>", *, toml: bool = False) -> TagRules:
    """Read aliases and implications from the text format or (`toml`) TOML; raises RulesError."""
    aliases: dict[str, str] = {}
    implications: dict[str, list[str]] = {}
    if toml:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise RulesError(f"{source}: not valid TOML ({e})") from e
        unknown = sorted(set(data) - {"aliases", "implications"})
        if unknown:
            raise RulesError(f"{source}: unknown table [{unknown[0]}]: use [aliases] and [implications]")
        for k, v in dict(data.get("aliases", {})).items():
            if not isinstance(v, str) or not v.strip() or not k.strip():
                raise RulesError(f'{source}: aliases.{k} must be a tag (a non-empty string), e.g. kitty = "cat"')
            aliases[k.strip()] = v.strip()
        for k, v in dict(data.get("implications", {})).items():
            values = [v] if isinstance(v, str) else v
            if not isinstance(values, list) or not all(isinstance(x, str) and x.strip() for x in values):
                raise RulesError(
                    f'{source}: implications.{k} must be a tag or a list of tags, e.g. "cat ears" = ["animal ears"]'
                )
            implications.setdefault(k.strip(), []).extend(x.strip() for x in values)
    else:
        for n, raw_line in enumerate(text.splitlines(), 1):
            line = _COMMENT.sub("", raw_line).strip()
            if not line:
                continue
            where = f"{source}:{n}"
            arrow = next((a for a in (*_IMPLY_ARROWS, *_ALIAS_ARROWS) if a in line), None)
            if arrow is None:
                raise RulesError(f"{where}: {line!r} is not a rule: write `old -> new` or `tag => implied`")
            left, right = (s.strip() for s in line.split(arrow, 1))
            if arrow in _ALIAS_ARROWS:
                if not left or not right or "," in left or "," in right:
                    raise RulesError(f"{where}: an alias is one tag -> one tag, e.g. `kitty -> cat`")
                if left in aliases and aliases[left] != right:
                    raise RulesError(f"{where}: {left!r} is already an alias of {aliases[left]!r}: keep one rule")
                aliases[left] = right
            else:
                implied = split_tags(right)
                if not left or "," in left or not implied:
                    raise RulesError(f"{where}: an implication is `tag => implied, …`, e.g. `cat ears => animal ears`")
                implications.setdefault(left, []).extend(implied)
    aliases = _resolve_aliases(aliases, source)
    # an implication written with an alias applies to its target too, and implies the target
    resolved: dict[str, list[str]] = {}
    for k, vs in implications.items():
        key = aliases.get(k, k)
        for v in vs:
            v = aliases.get(v, v)
            if v != key and v not in resolved.setdefault(key, []):
                resolved[key].append(v)
    return TagRules(aliases, {k: v for k, v in resolved.items() if v})


def load_rules(path: Path) -> TagRules:
    """Read a rules file (`.toml` as TOML, anything else as the text format). Raises RulesError (also
    for a file that cannot be read)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise RulesError(f"cannot read {path}: {e.strerror or e}") from e
    except UnicodeDecodeError as e:
        raise RulesError(f"{path} is not UTF-8 text") from e
    return parse_rules(text, str(path), toml=path.suffix.lower() == ".toml")


# ------------------------------------------------------------------------------------------ selection


def select(entries: Iterable[Any], only: Sequence[str] = (), has: Sequence[str] = ()) -> list[Any]:
    """The images matching any `only` pattern (a glob on the path relative to the dataset, on the file
    name, or a folder: `10_mychar`, `10_mychar/*`, `*.webp`) and holding every tag in `has`. Empty
    `only`/`has`: no filter."""
    out = []
    for e in entries:
        rel: str = e.rel
        if only and not any(_matches(rel, p) for p in only):
            continue
        if has and not set(has) <= set(split_tags(e.caption or "")):
            continue
        out.append(e)
    return out


def _matches(rel: str, pattern: str) -> bool:
    pattern = pattern.strip().strip("/") or "*"
    name = rel.rsplit("/", 1)[-1]
    # a glob on the whole path, on the name, or a folder (its images and its subfolders')
    return any(fnmatch.fnmatchcase(s, p) for s, p in ((rel, pattern), (name, pattern), (rel, pattern + "/*")))


# ------------------------------------------------------------------------------------- batch editing


@dataclass(frozen=True)
class Edit:
    """One caption to change: where, its text and stamp when read, and the new text."""

    image: Path
    caption_path: Path
    before: str | None  # None: no caption file yet (it will be created)
    after: str
    stamp: CaptionStamp

    @property
    def added(self) -> list[str]:
        old = set(split_tags(self.before or ""))
        return [t for t in _dedupe(split_tags(self.after)) if t not in old]

    @property
    def removed(self) -> list[str]:
        new = set(split_tags(self.after))
        return [t for t in _dedupe(split_tags(self.before or "")) if t not in new]


@dataclass
class BatchResult:
    """What a batch did: the edits planned, those written, and those refused because the caption changed
    on disk since it was read (`conflicts`) or could not be written (`errors`). `journal` is the undo
    record (None on a dry run or when nothing was written)."""

    action: str
    edits: list[Edit]
    written: list[Edit] = field(default_factory=list)
    conflicts: list[Path] = field(default_factory=list)
    errors: list[tuple[Path, str]] = field(default_factory=list)
    journal: Path | None = None
    batch_id: int | None = None
    dry_run: bool = False

    @property
    def ok(self) -> bool:
        return not self.conflicts and not self.errors


def plan(entries: Iterable[Any], op: TagOp, *, create_missing: bool = True) -> list[Edit]:
    """The captions `op` changes among `entries` (`ImageEntry`s, as scanned). An image without a caption
    file counts as having no tags; `create_missing=False` leaves those alone. A caption file shared by
    two images is edited once."""
    edits: list[Edit] = []
    seen: set[Path] = set()
    for e in entries:
        if e.caption_path in seen or (e.caption is None and not create_missing):
            continue
        seen.add(e.caption_path)
        tags = split_tags(e.caption or "")
        new = op(list(tags))
        if new != tags:
            edits.append(Edit(e.path, e.caption_path, e.caption, join_tags(new), e.stamp))
    return edits


def apply_edits(root: Path, edits: Sequence[Edit], action: str, *, dry_run: bool = False) -> BatchResult:
    """Write `edits` (unless `dry_run`) and record them in `root`'s undo journal. A caption that changed on
    disk since it was read is left as it is and listed in `conflicts`; the others are written."""
    from nyx_tui.datasets import undo

    result = BatchResult(action, list(edits), dry_run=dry_run)
    if dry_run or not edits:
        return result
    # read each caption's exact bytes now: what undo puts back, and a first conflict check
    pending: list[tuple[Edit, bytes | None]] = []
    for edit in edits:
        try:
            data, stamp = read_caption_bytes(edit.caption_path)
        except OSError as e:
            result.errors.append((edit.caption_path, e.strerror or str(e)))
            continue
        if stamp != edit.stamp:
            result.conflicts.append(edit.caption_path)
            continue
        pending.append((edit, data))
    if not pending:
        return result
    # the journal is written before the captions: a crash halfway leaves an undo that restores what changed
    journal = undo.Journal(root)
    record = journal.begin(action, [(e.caption_path, data, e.after.strip().encode("utf-8")) for e, data in pending])
    written: list[Path] = []
    for edit, _ in pending:
        try:
            write_caption(edit.caption_path, edit.after, edit.stamp)
        except CaptionConflict:
            result.conflicts.append(edit.caption_path)
        except OSError as e:
            result.errors.append((edit.caption_path, e.strerror or str(e)))
        else:
            result.written.append(edit)
            written.append(edit.caption_path)
    if written:
        journal.commit(record, written)
        result.journal, result.batch_id = record.path, record.id
    else:
        journal.discard(record)
    return result


def edit_captions(
    dataset: Any,
    op: TagOp,
    action: str,
    *,
    selection: Iterable[Any] | None = None,
    dry_run: bool = False,
    create_missing: bool = True,
) -> BatchResult:
    """Plan `op` over `selection` (default: every image of `dataset`) and apply it: the one call a view
    needs. `action` describes the batch in the undo journal (`add "mychar" at front`)."""
    entries = dataset.images if selection is None else selection
    edits = plan(entries, op, create_missing=create_missing)
    return apply_edits(dataset.root, edits, action, dry_run=dry_run)


__all__ = [
    "BatchResult",
    "Edit",
    "RulesError",
    "TagOp",
    "TagRules",
    "add_tags",
    "apply_aliases",
    "apply_edits",
    "apply_implications",
    "dedupe_tags",
    "edit_captions",
    "join_tags",
    "load_rules",
    "move_to_front",
    "parse_rules",
    "plan",
    "prune_tags",
    "remove_tags",
    "replace_tag",
    "select",
    "sort_tags",
    "split_tags",
    "tag_frequencies",
]
