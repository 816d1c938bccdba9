"""The job index in SQLite (`paths.db_path()`): fast listing and history without reading every job dir.

It is an index, never the truth: every row can be rebuilt from its job directory (`job_summary`), and
`Store.sync()` does exactly that for rows that may have changed. Connections are short-lived (one per
call) so the supervisor, the CLI and the TUI can all write; WAL and a busy timeout keep them from
tripping over each other.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
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
)
_TERMINAL_SQL = ", ".join(f"'{s}'" for s in sorted(TERMINAL))
_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    name TEXT NOT NULL,
    dir TEXT NOT NULL,
    state TEXT NOT NULL,
    created REAL,
    started REAL,
    ended REAL,
    exit_code INTEGER,
    signal TEXT,
    error TEXT,
    hint TEXT,
    artifacts TEXT NOT NULL DEFAULT '[]'
)
"""


def job_summary(job: JobDir) -> dict[str, Any]:
    """One job as the index (and `nyx jobs --json`) shows it, read from its directory."""
    try:
        spec = job.spec()
    except (OSError, ValueError):
        spec = {}
    status = job.status()
    return {
        "id": job.id,
        "kind": str(spec.get("kind", "?")),
        "name": str(spec.get("name", job.id)),
        "dir": str(job.path),
        "state": job.effective_state(),
        "created": spec.get("created", status.get("created")),
        "started": status.get("started"),
        "ended": status.get("ended"),
        "exit_code": status.get("exit_code"),
        "signal": status.get("signal"),
        "error": status.get("error"),
        "hint": status.get("hint"),
        "artifacts": job.artifacts(),
    }


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
        end = next((e for e in reversed(job.events()) if e.get("kind") == "end"), None)
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
    """The SQLite index of jobs. Cheap to construct: it connects per call."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = Path(path) if path is not None else paths.db_path()

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with closing(sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S)) as con:
            con.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
            con.execute("PRAGMA journal_mode = WAL")
            con.execute(_SCHEMA)
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
        updates = ", ".join(f"{c} = excluded.{c}" for c in COLUMNS[1:])
        # terminal states are final on disk: a non-terminal summary arriving after one is stale
        con.execute(
            f"INSERT INTO jobs ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))}) "
            f"ON CONFLICT(id) DO UPDATE SET {updates} "
            f"WHERE jobs.state NOT IN ({_TERMINAL_SQL}) OR excluded.state IN ({_TERMINAL_SQL})",
            values,
        )

    def upsert(self, summary: dict[str, Any]) -> None:
        with self._connect() as con:
            self._upsert(con, summary)

    def get(self, job_id: str) -> dict[str, Any] | None:
        with self._connect() as con:
            row = con.execute(f"SELECT {', '.join(COLUMNS)} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return self._row(row) if row else None

    def all(self) -> list[dict[str, Any]]:
        with self._connect() as con:
            rows = con.execute(f"SELECT {', '.join(COLUMNS)} FROM jobs ORDER BY id").fetchall()
        return [self._row(r) for r in rows]

    def sync(self) -> list[dict[str, Any]]:
        """Bring the index in line with the job directories and return every job, ordered by id.

        New jobs and jobs not yet ended are re-read; jobs found `lost` get their end recorded
        (`mark_lost`); rows whose directory is gone are dropped. Ended jobs are not re-read.
        """
        with self._connect() as con:
            known = dict(con.execute("SELECT id, state FROM jobs").fetchall())
        summaries = []
        for job in list_jobs():
            state = known.get(job.id)
            if state in TERMINAL and not (state == "lost" and job.status().get("state") in ACTIVE):
                continue
            try:
                summary = job_summary(job)
                if summary["state"] == "lost" and mark_lost(job):
                    summary = job_summary(job)
            except OSError:
                continue  # a directory being created or deleted right now; the next sync sees it
            summaries.append(summary)
        with self._connect() as con:
            for summary in summaries:
                self._upsert(con, summary)
            gone = [
                job_id
                for job_id, job_dir in con.execute("SELECT id, dir FROM jobs").fetchall()
                if not (Path(job_dir) / "spec.json").is_file()
            ]
            con.executemany("DELETE FROM jobs WHERE id = ?", [(g,) for g in gone])
        return self.all()
