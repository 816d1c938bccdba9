"""The undo journal of caption edits: one JSON file per batch in the dataset folder,
`<dataset>/.nyx/undo/NNNN.json`, holding each changed caption's exact bytes before and after.

    {"v": 1, "id": 3, "t": 1767000000.0, "action": "replace \\"kitty\\" with \\"cat\\"", "complete": true,
     "files": [{"path": "10_mychar/a.txt", "before": "kitty, smile", "after": "cat, smile",
                "before_sha256": "…", "after_sha256": "…"}],
     "undone": null}

`before` is null for a caption the batch created (undo deletes it again); bytes that are not UTF-8 are kept
as `before_b64`. The journal is written before the captions (`complete: false`), then rewritten with the
files actually written: a batch cut short by a crash can still be undone.

Undo puts back `before` only where the caption still holds the batch's `after`: a caption edited since the
batch is left alone and reported as a conflict; one already back at `before` counts as unchanged. The batch
is then marked `undone` (it is not undone twice; there is no redo) — unless a file could not be written
(permissions, a full disk): then it stays undoable, and undoing it again finishes the job.
"""

from __future__ import annotations

import base64
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nyx_tui.datasets.captions import CaptionConflict, CaptionStamp, read_caption_bytes, restore_caption

JOURNAL_DIR = Path(".nyx") / "undo"
VERSION = 1


class NothingToUndo(LookupError):
    """No batch left to undo (or the one asked for does not exist or was undone already)."""


@dataclass
class FileChange:
    """One caption file of a batch: its exact bytes before (None: it did not exist) and after."""

    path: Path
    before: bytes | None
    after: bytes

    @property
    def before_stamp(self) -> CaptionStamp:
        return CaptionStamp.of_bytes(self.before)

    @property
    def after_stamp(self) -> CaptionStamp:
        return CaptionStamp.of_bytes(self.after)


@dataclass
class Batch:
    """One recorded batch of caption edits."""

    id: int
    path: Path
    t: float
    action: str
    files: list[FileChange]
    complete: bool = True
    undone: dict[str, Any] | None = None

    @property
    def undoable(self) -> bool:
        return self.undone is None


@dataclass
class UndoResult:
    """What an undo did: captions put back, already back (`unchanged`), edited since the batch and left
    alone (`conflicts`), or not writable (`errors`)."""

    batch: Batch
    restored: list[Path] = field(default_factory=list)
    unchanged: list[Path] = field(default_factory=list)
    conflicts: list[Path] = field(default_factory=list)
    errors: list[tuple[Path, str]] = field(default_factory=list)
    dry_run: bool = False

    @property
    def ok(self) -> bool:
        return not self.conflicts and not self.errors


def _encode(data: bytes | None, key: str) -> dict[str, Any]:
    if data is None:
        return {key: None}
    try:
        return {key: data.decode("utf-8")}
    except UnicodeDecodeError:
        return {key + "_b64": base64.b64encode(data).decode("ascii")}


def _decode(obj: dict[str, Any], key: str) -> bytes | None:
    if obj.get(key + "_b64") is not None:
        return base64.b64decode(obj[key + "_b64"])
    value = obj.get(key)
    return None if value is None else str(value).encode("utf-8")


class Journal:
    """The undo journal of one dataset folder."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).absolute()
        self.dir = self.root / JOURNAL_DIR

    # ------------------------------------------------------------------------------------------- files

    def _rel(self, path: Path) -> str:
        try:
            return Path(path).absolute().relative_to(self.root).as_posix()
        except ValueError:
            return str(Path(path).absolute())

    def _to_json(self, batch: Batch) -> dict[str, Any]:
        files = []
        for f in batch.files:
            entry: dict[str, Any] = {"path": self._rel(f.path)}
            entry |= _encode(f.before, "before")
            entry |= _encode(f.after, "after")
            entry["before_sha256"] = f.before_stamp.sha256
            entry["after_sha256"] = f.after_stamp.sha256
            files.append(entry)
        return {
            "v": VERSION,
            "id": batch.id,
            "t": batch.t,
            "action": batch.action,
            "complete": batch.complete,
            "files": files,
            "undone": batch.undone,
        }

    def _from_json(self, path: Path, data: dict[str, Any]) -> Batch:
        files = [
            FileChange(self.root / f["path"], _decode(f, "before"), _decode(f, "after") or b"")
            for f in data.get("files", [])
        ]
        return Batch(
            int(data["id"]),
            path,
            float(data.get("t", 0.0)),
            str(data.get("action", "")),
            files,
            bool(data.get("complete", True)),
            data.get("undone"),
        )

    def _write(self, batch: Batch, *, create: bool = False) -> None:
        """Write the batch's file atomically; with `create`, fail (FileExistsError) if it already exists."""
        self.dir.mkdir(parents=True, exist_ok=True)
        text = json.dumps(self._to_json(batch), ensure_ascii=False, indent=1)
        fd, tmp = tempfile.mkstemp(prefix=".batch.", suffix=".tmp", dir=self.dir)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            if create:
                os.link(tmp, batch.path)  # fails if another process took this number
                os.unlink(tmp)
            else:
                os.replace(tmp, batch.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def _ids(self) -> list[int]:
        if not self.dir.is_dir():
            return []
        return sorted(int(p.stem) for p in self.dir.glob("*.json") if p.stem.isdigit())

    # ------------------------------------------------------------------------------------------ record

    def begin(self, action: str, files: list[tuple[Path, bytes | None, bytes]]) -> Batch:
        """Record a batch about to be written: (caption path, bytes before or None, bytes after) each."""
        changes = [FileChange(Path(p).absolute(), before, after) for p, before, after in files]
        while True:
            n = (self._ids() or [0])[-1] + 1
            batch = Batch(n, self.dir / f"{n:04d}.json", time.time(), action, changes, complete=False)
            try:
                self._write(batch, create=True)
            except FileExistsError:
                continue
            return batch

    def commit(self, batch: Batch, written: list[Path]) -> None:
        """Keep only the files actually written, and mark the batch complete."""
        keep = {Path(p).absolute() for p in written}
        batch.files = [f for f in batch.files if f.path in keep]
        batch.complete = True
        self._write(batch)

    def discard(self, batch: Batch) -> None:
        batch.path.unlink(missing_ok=True)

    # ------------------------------------------------------------------------------------------- read

    def batches(self) -> list[Batch]:
        """Every recorded batch, oldest first (unreadable journal files are skipped)."""
        out = []
        for n in self._ids():
            path = self.dir / f"{n:04d}.json"
            try:
                out.append(self._from_json(path, json.loads(path.read_text(encoding="utf-8"))))
            except (OSError, ValueError, KeyError, TypeError):
                continue
        return out

    def last(self) -> Batch | None:
        """The newest batch not undone yet."""
        return next((b for b in reversed(self.batches()) if b.undoable), None)

    # ------------------------------------------------------------------------------------------- undo

    def undo(self, batch_id: int | None = None, *, dry_run: bool = False) -> UndoResult:
        """Undo the newest batch not undone (or batch `batch_id`). Raises NothingToUndo."""
        if batch_id is None:
            batch = self.last()
            if batch is None:
                why = "every recorded batch was undone already" if self.batches() else "no caption edits are recorded"
                raise NothingToUndo(f"nothing to undo in {self.root}: {why}")
        else:
            batch = next((b for b in self.batches() if b.id == batch_id), None)
            if batch is None:
                raise NothingToUndo(f"there is no batch {batch_id} in {self.dir}")
            if not batch.undoable:
                raise NothingToUndo(f"batch {batch_id} ({batch.action}) was undone already")
        result = UndoResult(batch, dry_run=dry_run)
        for f in batch.files:
            try:
                _, stamp = read_caption_bytes(f.path)
            except OSError as e:
                result.errors.append((f.path, e.strerror or str(e)))
                continue
            if stamp == f.before_stamp:
                result.unchanged.append(f.path)
                continue
            if stamp != f.after_stamp:
                result.conflicts.append(f.path)
                continue
            if dry_run:
                result.restored.append(f.path)
                continue
            try:
                restore_caption(f.path, f.before, f.after_stamp)
            except CaptionConflict:
                result.conflicts.append(f.path)
            except OSError as e:
                result.errors.append((f.path, e.strerror or str(e)))
            else:
                result.restored.append(f.path)
        if not dry_run and not result.errors:  # with errors it stays undoable: fix them, undo again
            batch.undone = {
                "t": time.time(),
                "restored": [self._rel(p) for p in result.restored],
                "conflicts": [self._rel(p) for p in result.conflicts],
            }
            self._write(batch)
        return result


def history(root: Path) -> list[Batch]:
    """The recorded batches of a dataset folder, oldest first."""
    return Journal(root).batches()


def undo(root: Path, batch_id: int | None = None, *, dry_run: bool = False) -> UndoResult:
    """Undo the newest batch of caption edits in `root` (or batch `batch_id`). Raises NothingToUndo."""
    return Journal(root).undo(batch_id, dry_run=dry_run)


__all__ = ["JOURNAL_DIR", "Batch", "FileChange", "Journal", "NothingToUndo", "UndoResult", "history", "undo"]
