"""The job index in SQLite (`paths.db_path()`): fast listing and history without reading every job dir.

It is an index, never the truth: every row can be rebuilt from its job directory (`job_summary`), and
`Store.sync()` does exactly that for rows that may have changed. Connections are short-lived (one per
call) so the supervisor, the CLI and the TUI can all write; WAL and a busy timeout keep them from
tripping over each other.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sqlite3
import time
import tomllib
from collections.abc import Iterable, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nyx_tui import paths
from nyx_tui.jobs.events import EventWriter
from nyx_tui.jobs.jobdir import ACTIVE, TERMINAL, JobDir, list_jobs

BUSY_TIMEOUT_S = 10.0
LOST_ERROR = "the supervisor is gone without recording an end"
COLUMNS = (
    "id",
    "kind",
    "name",
    "dir",
    "state",
    "created",
    "started",
    "ended",
    "exit_code",
    "signal",
    "error",
    "hint",
    "artifacts",
    # history: what a user compares runs by
    "family",
    "backend",
    "config_hash",
    "steps",
    "final_loss",
    "duration",
    # a workflow's or sweep's stage: the orchestrator job that queued it, and the stage's or trial's name
    "parent",
    "stage",
    # how far the events were read for `artifacts`, `steps` and `final_loss` (a byte offset)
    "scan_offset",
)
_TYPES = {
    "kind": "TEXT NOT NULL",
    "name": "TEXT NOT NULL",
    "dir": "TEXT NOT NULL",
    "state": "TEXT NOT NULL",
    "created": "REAL",
    "started": "REAL",
    "ended": "REAL",
    "exit_code": "INTEGER",
    "signal": "TEXT",
    "error": "TEXT",
    "hint": "TEXT",
    "artifacts": "TEXT NOT NULL DEFAULT '[]'",
    "family": "TEXT",
    "backend": "TEXT",
    "config_hash": "TEXT",
    "steps": "INTEGER",
    "final_loss": "REAL",
    "duration": "REAL",
    "parent": "TEXT",
    "stage": "TEXT",
    "scan_offset": "INTEGER NOT NULL DEFAULT 0",
}
_TERMINAL_SQL = ", ".join(f"'{s}'" for s in sorted(TERMINAL))
_SCHEMA = "CREATE TABLE IF NOT EXISTS jobs (id TEXT PRIMARY KEY, {})".format(
    ", ".join(f"{c} {_TYPES[c]}" for c in COLUMNS[1:])
)
_QUEUE_SCHEMA = """
CREATE TABLE IF NOT EXISTS queue (
    id TEXT PRIMARY KEY,
    position REAL NOT NULL,
    resource TEXT NOT NULL,
    added REAL NOT NULL
)
"""
# columns copied from spec.json as they are: an index that gains one fills it in from each job's spec, since
# ended jobs are never re-read by `Store.sync`
SPEC_COLUMNS = ("parent", "stage")
SCAN_CHUNK = 1 << 20  # bytes of events.jsonl read at a time when summarising a job


@dataclass
class EventScan:
    """What the index keeps from a job's events, read once, incrementally, from `offset` on."""

    offset: int = 0
    artifacts: list[dict[str, Any]] = field(default_factory=list)
    steps: int | None = None
    final_loss: float | None = None

    def read(self, path: Path) -> EventScan:
        """Continue from `offset` to the last complete line. Only `artifact` lines and the last `step`
        line of each chunk are parsed, so a million-step log costs one pass of `bytes.find`, not a
        million `json.loads`."""
        try:
            f = open(path, "rb")  # noqa: SIM115 (closed by the `with` below; a missing file is no error)
        except FileNotFoundError:
            return self
        with f:
            f.seek(self.offset)
            while chunk := f.read(SCAN_CHUNK):
                end = chunk.rfind(b"\n")
                if end < 0:
                    if len(chunk) < SCAN_CHUNK:
                        break  # a line still being written
                    self.offset += len(chunk)  # a line longer than a chunk is not an event we index
                    continue
                self._lines(chunk[: end + 1])
                self.offset += end + 1
                f.seek(self.offset)
        return self

    def _lines(self, data: bytes) -> None:
        at = data.find(b'"artifact"')
        while at >= 0:
            start, end = data.rfind(b"\n", 0, at) + 1, data.find(b"\n", at)
            event = _json_line(data[start:end])
            if event and event.get("kind") == "artifact" and "path" in event:
                self.artifacts.append({k: event[k] for k in ("path", "what", "step") if k in event})
            at = data.find(b'"artifact"', end)
        at = data.rfind(b'"kind":"step"')
        if at >= 0:
            event = _json_line(data[data.rfind(b"\n", 0, at) + 1 : data.find(b"\n", at)])
            if event and event.get("kind") == "step":
                step, loss = event.get("step"), event.get("loss_avg", event.get("loss"))
                if isinstance(step, int):
                    self.steps = step
                if isinstance(loss, int | float) and math.isfinite(loss):
                    self.final_loss = float(loss)


def _json_line(line: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        return None
    return value if isinstance(value, dict) else None


def _config_facts(job: JobDir) -> tuple[str | None, str | None]:
    """(model family, short sha256) of a training job's config snapshot; (None, None) without one."""
    try:
        raw = job.config_path.read_bytes()
    except OSError:
        return None, None
    digest = hashlib.sha256(raw).hexdigest()[:16]
    try:
        model = tomllib.loads(raw.decode()).get("model", {})
    except (UnicodeDecodeError, tomllib.TOMLDecodeError):
        return None, digest
    family = model.get("family") if isinstance(model, dict) else None
    return (str(family) if family else None), digest


def job_summary(job: JobDir, scan: EventScan | None = None) -> dict[str, Any]:
    """One job as the index (and `nyx jobs --json`) shows it, read from its directory. `scan` carries on
    an earlier summary's reading of the events (the index keeps it), so a long log is read once."""
    try:
        spec = job.spec()
    except (OSError, ValueError):
        spec = {}
    status = job.status()
    scan = (scan or EventScan()).read(job.events_path)
    family, config_hash = _config_facts(job)
    started, ended = status.get("started"), status.get("ended")
    duration = ended - started if isinstance(started, int | float) and isinstance(ended, int | float) else None
    return {
        "id": job.id,
        "kind": str(spec.get("kind", "?")),
        "name": str(spec.get("name", job.id)),
        "dir": str(job.path),
        "state": job.effective_state(),
        "created": spec.get("created", status.get("created")),
        "started": started,
        "ended": ended,
        "exit_code": status.get("exit_code"),
        "signal": status.get("signal"),
        "error": status.get("error"),
        "hint": status.get("hint"),
        "artifacts": scan.artifacts,
        "family": family,
        "backend": spec.get("backend"),
        "config_hash": config_hash,
        "steps": scan.steps,
        "final_loss": scan.final_loss,
        "duration": duration,
        **{column: _spec_text(spec, column) for column in SPEC_COLUMNS},
        "scan_offset": scan.offset,
    }


def _spec_text(spec: dict[str, Any], key: str) -> str | None:
    value = spec.get(key)
    return None if value is None else str(value)


def _backfill_spec_columns(con: sqlite3.Connection, columns: list[str]) -> None:
    """Fill `columns` (just added to an older index) from each indexed job's spec.json."""
    rows = con.execute("SELECT id, dir FROM jobs").fetchall()
    for job_id, job_dir in rows:
        try:
            spec = json.loads((Path(job_dir) / "spec.json").read_text())
        except (OSError, ValueError):
            continue  # a folder gone or broken: `sync` drops or re-reads it
        if isinstance(spec, dict):
            values = [_spec_text(spec, c) for c in columns]
            con.execute(f"UPDATE jobs SET {', '.join(f'{c} = ?' for c in columns)} WHERE id = ?", [*values, job_id])


def _creation_order(job: dict[str, Any]) -> tuple[float, str]:
    created = job.get("created")
    return (float(created) if isinstance(created, int | float) else 0.0), str(job["id"])


def group_jobs(jobs: Iterable[dict[str, Any]]) -> list[tuple[dict[str, Any], int]]:
    """`jobs` (in the caller's order) as (job, depth): each job whose `parent` is in the list follows its
    parent (depth one more than the parent's), in the order the children were created; its own place in
    the caller's order is ignored. A job whose parent is not in the list keeps its place at depth 0."""
    jobs = list(jobs)
    ids = {str(j["id"]) for j in jobs}
    children: dict[str, list[dict[str, Any]]] = {}
    roots = []
    for job in jobs:
        parent = job.get("parent")
        if parent is not None and str(parent) in ids and parent != job["id"]:
            children.setdefault(str(parent), []).append(job)
        else:
            roots.append(job)
    for kids in children.values():
        kids.sort(key=_creation_order)
    out: list[tuple[dict[str, Any], int]] = []
    seen: set[str] = set()

    def walk(job: dict[str, Any], depth: int) -> None:
        if str(job["id"]) in seen:
            return
        seen.add(str(job["id"]))
        out.append((job, depth))
        for kid in children.get(str(job["id"]), []):
            walk(kid, depth + 1)

    for job in roots:
        walk(job, 0)
    for job in jobs:  # parents that form a loop (hand-edited specs): shown rather than lost
        walk(job, 0)
    return out


def _output_tail(job: JobDir, limit: int = 16384) -> list[str]:
    from nyx_tui.jobs.supervisor import OutputTail

    try:
        with open(job.log_path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - limit))
            data = f.read()
    except OSError:
        return []
    tail = OutputTail()
    tail.feed(data)
    tail.close()
    return list(tail.lines)


def mark_lost(job: JobDir) -> bool:
    """Record the end of a job whose supervisor died without writing one. True if this call wrote it.

    Done while holding the job's lock, so a supervisor cannot start (or still be alive) meanwhile, and
    only for a job whose status is still active, so two views syncing at once write one end. A
    supervisor killed between its end event and its status gets its own end copied into the status.
    """
    fd = job.try_lock(wait_s=0.2)
    if fd is None:
        return False
    try:
        status = job.status()
        if status.get("state") not in ACTIVE:
            return False
        end = job.last_event("end")
        if end is not None:
            fields = {k: end.get(k) for k in ("exit_code", "signal", "error", "hint", "reason")}
            job.write_status(state=end["state"], ended=end.get("t", time.time()), **fields)
            return True
        pid = status.get("worker_pid")
        hint = "the supervisor was killed (kill -9, the out-of-memory killer, a reboot)" + (
            f"; its worker (pid {pid}) may still be running" if pid else ""
        )
        with EventWriter(job.events_path) as events:
            events.emit("end", state="lost", error=LOST_ERROR, hint=hint, last_lines=_output_tail(job))
        job.write_status(state="lost", ended=time.time(), error=LOST_ERROR, hint=hint)
        return True
    finally:
        os.close(fd)  # releases the lock


class Store:
    """The SQLite index of jobs (and the queue's order, `jobs.queue`). Cheap to construct: it connects
    per call."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = Path(path) if path is not None else paths.db_path()

    @contextmanager
    def connect(self) -> Iterator[sqlite3.Connection]:
        """One connection, one transaction (committed on success), the schema brought up to date."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with closing(sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S)) as con:
            con.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
            con.execute("PRAGMA journal_mode = WAL")
            with con:
                con.execute(_SCHEMA)
                con.execute(_QUEUE_SCHEMA)
                have = {row[1] for row in con.execute("PRAGMA table_info(jobs)")}
                added = []
                for column in COLUMNS:  # an index written by an older Nyx gains the new columns
                    if column in have:
                        continue
                    try:
                        con.execute(f"ALTER TABLE jobs ADD COLUMN {column} {_TYPES[column]}")
                    except sqlite3.OperationalError as e:  # another process added it a moment ago
                        if "duplicate column" not in str(e):
                            raise
                    else:
                        added.append(column)
                if backfill := [c for c in SPEC_COLUMNS if c in added]:
                    _backfill_spec_columns(con, backfill)
            with con:  # one transaction, committed on success
                yield con

    @staticmethod
    def _row(row: tuple[Any, ...]) -> dict[str, Any]:
        record = dict(zip(COLUMNS, row, strict=True))
        try:
            record["artifacts"] = json.loads(record["artifacts"] or "[]")
        except ValueError:
            record["artifacts"] = []
        return record

    @staticmethod
    def _upsert(con: sqlite3.Connection, summary: dict[str, Any]) -> None:
        values = [summary.get(c) for c in COLUMNS]
        values[COLUMNS.index("artifacts")] = json.dumps(summary.get("artifacts") or [])
        values[COLUMNS.index("scan_offset")] = int(summary.get("scan_offset") or 0)
        updates = ", ".join(f"{c} = excluded.{c}" for c in COLUMNS[1:])
        # terminal states are final on disk: a non-terminal summary arriving after one is stale
        con.execute(
            f"INSERT INTO jobs ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))}) "
            f"ON CONFLICT(id) DO UPDATE SET {updates} "
            f"WHERE jobs.state NOT IN ({_TERMINAL_SQL}) OR excluded.state IN ({_TERMINAL_SQL})",
            values,
        )

    def upsert(self, summary: dict[str, Any]) -> None:
        with self.connect() as con:
            self._upsert(con, summary)

    def get(self, job_id: str) -> dict[str, Any] | None:
        with self.connect() as con:
            row = con.execute(f"SELECT {', '.join(COLUMNS)} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return self._row(row) if row else None

    def all(self) -> list[dict[str, Any]]:
        with self.connect() as con:
            rows = con.execute(f"SELECT {', '.join(COLUMNS)} FROM jobs ORDER BY id").fetchall()
        return [self._row(r) for r in rows]

    def delete(self, job_id: str) -> None:
        with self.connect() as con:
            con.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
            con.execute("DELETE FROM queue WHERE id = ?", (job_id,))

    def sync(self) -> list[dict[str, Any]]:
        """Bring the index in line with the job directories and return every job, ordered by id.

        New jobs and jobs not yet ended are re-read (their events from where the last sync stopped);
        jobs found `lost` get their end recorded (`mark_lost`); rows whose directory is gone are
        dropped. Ended jobs are not re-read.
        """
        with self.connect() as con:
            known = {
                row[0]: (row[1], EventScan(int(row[2] or 0), json.loads(row[3] or "[]"), row[4], row[5]))
                for row in con.execute("SELECT id, state, scan_offset, artifacts, steps, final_loss FROM jobs")
            }
        summaries = []
        for job in list_jobs():
            state, scan = known.get(job.id, (None, None))
            if state in TERMINAL and not (state == "lost" and job.status().get("state") in ACTIVE):
                continue
            try:
                summary = job_summary(job, scan)
                if summary["state"] == "lost" and mark_lost(job):
                    summary = job_summary(job, scan)
            except OSError:
                continue  # a directory being created or deleted right now; the next sync sees it
            summaries.append(summary)
        with self.connect() as con:
            for summary in summaries:
                self._upsert(con, summary)
            gone = [
                job_id
                for job_id, job_dir in con.execute("SELECT id, dir FROM jobs").fetchall()
                if not (Path(job_dir) / "spec.json").is_file()
            ]
            con.executemany("DELETE FROM jobs WHERE id = ?", [(g,) for g in gone])
        return self.all()


def select(
    jobs: list[dict[str, Any]], states: Iterable[str] = (), kinds: Iterable[str] = ()
) -> list[dict[str, Any]]:
    """The jobs whose state is one of `states` and kind one of `kinds` (an empty filter admits all)."""
    states, kinds = set(states), set(kinds)
    return [j for j in jobs if (not states or j["state"] in states) and (not kinds or j["kind"] in kinds)]
