"""A SQLite cache of what is slow to learn about an image file: its sha256, its perceptual hashes, its size in
pixels, its blur score.

Decoding dominates duplicate finding and blur scoring (10k JPEGs take tens of seconds even at reduced size),
so every value is kept by (absolute path, byte size, mtime_ns): a second run over an unchanged folder reads
no image, and a file that was touched or rewritten gets a new stat and is read again. The file lives in the
user cache folder (`paths.cache_dir()/image-hashes.sqlite`, under `NYX_HOME` when set) rather than inside
the dataset, so a read-only or shared dataset folder works, the dataset stays free of tool files, and one
cache serves every dataset. Copying a dataset elsewhere changes its absolute paths: it is hashed again once.

Each value is a nullable column: a run that needs only sha256 (exact duplicates) does not pay for a decode,
and a later run fills in the rest. Bumping `SCHEMA` (a change in how a value is computed) drops the table.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

SCHEMA = "3"  # phash via imagehash on a drafted, EXIF-transposed grayscale; blur on a 512 px grayscale

FIELDS = ("sha256", "phash", "phash_flip", "width", "height", "blur")


@dataclass(frozen=True)
class Stat:
    """What identifies one version of a file: its absolute path, its byte size, its mtime in nanoseconds."""

    path: str
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, path: Path) -> Stat:
        st = os.stat(path)
        return cls(str(Path(path).absolute()), st.st_size, st.st_mtime_ns)


@dataclass(frozen=True)
class Entry:
    """The cached values of one file version; None where not computed yet. Hashes are 16 hex digits."""

    sha256: str | None = None
    phash: str | None = None
    phash_flip: str | None = None
    width: int | None = None
    height: int | None = None
    blur: float | None = None

    def merged(self, other: Entry) -> Entry:
        """This entry with every value `other` has filled in."""
        return replace(self, **{f: getattr(other, f) for f in FIELDS if getattr(other, f) is not None})


@dataclass(frozen=True)
class Snapshot:
    """The cache's entries under one folder, read at once: path → (size, mtime_ns, entry)."""

    rows: dict[str, tuple[int, int, Entry]]

    def get(self, stat: Stat) -> Entry | None:
        """The entry of exactly this file version, or None."""
        row = self.rows.get(stat.path)
        if row is None or row[0] != stat.size or row[1] != stat.mtime_ns:
            return None
        return row[2]


def default_path() -> Path:
    from nyx_tui.paths import cache_dir

    return cache_dir() / "image-hashes.sqlite"


class HashCache:
    """The cache file, opened once per run. Thread-safe (one connection behind a lock): hashing runs in a pool,
    but the writes are tiny next to the decodes. Several processes may share the file (WAL, a busy timeout)."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = Path(path) if path is not None else default_path()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, timeout=30, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
        row = self._db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
        if row is None or row[0] != SCHEMA:
            self._db.execute("DROP TABLE IF EXISTS images")
            self._db.execute("INSERT OR REPLACE INTO meta VALUES ('schema', ?)", (SCHEMA,))
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS images (path TEXT PRIMARY KEY, size INTEGER NOT NULL, "
            "mtime_ns INTEGER NOT NULL, sha256 TEXT, phash TEXT, phash_flip TEXT, width INTEGER, height INTEGER, "
            "blur REAL)"
        )

    def get(self, stat: Stat) -> Entry | None:
        """The entry of exactly this file version, or None (unknown, or the file changed since)."""
        with self._lock:
            row = self._db.execute(
                f"SELECT size, mtime_ns, {', '.join(FIELDS)} FROM images WHERE path=?", (stat.path,)
            ).fetchone()
        if row is None or row[0] != stat.size or row[1] != stat.mtime_ns:
            return None
        return Entry(*row[2:])

    def load_under(self, folder: Path) -> Snapshot:
        """Every entry under `folder` in one query (a query per image costs more than a warm run's stat)."""
        prefix = str(Path(folder).absolute()).rstrip(os.sep) + os.sep
        with self._lock:
            rows = self._db.execute(
                f"SELECT path, size, mtime_ns, {', '.join(FIELDS)} FROM images WHERE substr(path, 1, ?) = ?",
                (len(prefix), prefix),
            ).fetchall()
        return Snapshot({r[0]: (r[1], r[2], Entry(*r[3:])) for r in rows})

    def put(self, stat: Stat, entry: Entry) -> None:
        """Store `entry` for this file version (replacing whatever an older version of the file had)."""
        self.put_many([(stat, entry)])

    def put_many(self, items: Iterable[tuple[Stat, Entry]]) -> None:
        """Store several entries in one transaction: a commit per image costs more than hashing it."""
        rows = [(st.path, st.size, st.mtime_ns, *(getattr(e, f) for f in FIELDS)) for st, e in items]
        if not rows:
            return
        with self._lock:
            self._db.execute("BEGIN")
            try:
                self._db.executemany(
                    f"INSERT OR REPLACE INTO images (path, size, mtime_ns, {', '.join(FIELDS)}) "
                    f"VALUES (?, ?, ?, {', '.join('?' * len(FIELDS))})",
                    rows,
                )
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def prune(self, folder: Path, keep: Iterable[str]) -> int:
        """Forget the files under `folder` that are not in `keep` (deleted or moved away); returns how many."""
        prefix = str(Path(folder).absolute()).rstrip(os.sep) + os.sep
        keep_set = set(keep)
        with self._lock:
            rows = self._db.execute(
                "SELECT path FROM images WHERE substr(path, 1, ?) = ?", (len(prefix), prefix)
            ).fetchall()
            gone = [(r[0],) for r in rows if r[0] not in keep_set]
            if gone:
                self._db.executemany("DELETE FROM images WHERE path=?", gone)
        return len(gone)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> HashCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["FIELDS", "SCHEMA", "Entry", "HashCache", "Snapshot", "Stat", "default_path"]
