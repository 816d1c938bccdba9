"""The queue: jobs that wait for a free GPU (or a free slot), in an order the user can change.

A queued job is an ordinary job directory in state `queued` whose spec says `"queue": true` and which
resource it needs (`"resource": "gpu" | "cpu"`). The order lives in SQLite beside the job index (the
`queue` table of `nyx.db`); if that file is lost, `Queue.rebuild()` puts the queued jobs back in the
order they were created. Nothing here starts a job: the scheduler (`jobs.scheduler`) does, and
`enqueue()` makes sure one is running.

Cancelling a queued job takes the job's lock, the same lock a supervisor must hold to start it, so a
cancelled job can never start, whichever of the two comes first.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

from nyx_tui import paths
from nyx_tui.jobs.events import EventWriter
from nyx_tui.jobs.jobdir import JobDir, list_jobs
from nyx_tui.jobs.store import Store

RESOURCES = ("gpu", "cpu", "none")  # none: an orchestrator that only waits on other jobs holds no slot
# kinds that want a GPU of their own by default
GPU_KINDS = frozenset({"train", "tag", "caption", "compare", "lr-find"})
CANCELLED_QUEUED = "cancelled while queued"


def resource_of(spec: dict[str, Any]) -> str:
    """`gpu` for work that wants a GPU to itself (training, tagging), `cpu` for the rest (downloads)."""
    resource = spec.get("resource")
    if resource in RESOURCES:
        return str(resource)
    return "gpu" if spec.get("kind") in GPU_KINDS else "cpu"


@dataclass(frozen=True)
class QueueEntry:
    id: str
    position: float
    resource: str
    added: float


class QueueError(ValueError):
    """A queue operation that cannot be done; the message says why and what to do."""


class Queue:
    """The queue's order in SQLite. Every method is one short transaction."""

    def __init__(self, store: Store | None = None) -> None:
        self.store = store or Store()

    def add(self, job: JobDir) -> QueueEntry:
        spec = job.spec()
        with self.store.connect() as con:
            (last,) = con.execute("SELECT COALESCE(MAX(position), 0) FROM queue").fetchone()
            entry = QueueEntry(job.id, float(last) + 1, resource_of(spec), time.time())
            con.execute(
                "INSERT OR IGNORE INTO queue (id, position, resource, added) VALUES (?, ?, ?, ?)",
                (entry.id, entry.position, entry.resource, entry.added),
            )
        return entry

    def entries(self) -> list[QueueEntry]:
        with self.store.connect() as con:
            rows = con.execute("SELECT id, position, resource, added FROM queue ORDER BY position, added").fetchall()
        return [QueueEntry(str(r[0]), float(r[1]), str(r[2]), float(r[3])) for r in rows]

    def remove(self, job_id: str) -> None:
        with self.store.connect() as con:
            con.execute("DELETE FROM queue WHERE id = ?", (job_id,))

    def move(self, job_id: str, where: str | int) -> list[str]:
        """Move a queued job: `top`, `bottom`, `up`, `down`, or a 1-based position. Returns the new order."""
        with self.store.connect() as con:
            order = [r[0] for r in con.execute("SELECT id FROM queue ORDER BY position, added")]
            if job_id not in order:
                raise QueueError(f"{job_id} is not in the queue; `nyx queue` lists what is")
            index = order.index(job_id)
            order.pop(index)
            if where == "top":
                target = 0
            elif where == "bottom":
                target = len(order)
            elif where == "up":
                target = max(0, index - 1)
            elif where == "down":
                target = min(len(order), index + 1)
            elif isinstance(where, int) or str(where).isdigit():
                target = min(max(0, int(where) - 1), len(order))
            else:
                raise QueueError(f"cannot move to {where!r}; use top, bottom, up, down or a position (1 is next)")
            order.insert(target, job_id)
            con.executemany("UPDATE queue SET position = ? WHERE id = ?", [(i + 1.0, j) for i, j in enumerate(order)])
        return order

    def rebuild(self) -> int:
        """Put back queued jobs the table lacks (a deleted or older `nyx.db`), oldest first; drop rows
        whose job is gone or no longer queued. Returns how many were added."""
        known = {e.id for e in self.entries()}
        added = 0
        for job in list_jobs():
            if job.id in known:
                continue
            try:
                spec = job.spec()
            except (OSError, ValueError):
                continue
            if spec.get("queue") and job.status().get("state") == "queued":
                self.add(job)
                added += 1
        return added

    def waiting(self) -> list[tuple[QueueEntry, JobDir]]:
        """The entries whose job is still queued, in order; rows of jobs that started, ended or vanished
        are removed on the way."""
        out, stale = [], []
        root = paths.jobs_dir()
        for entry in self.entries():
            job = JobDir(root / entry.id)
            if not job.spec_path.is_file() or job.status().get("state") != "queued":
                stale.append(entry.id)
                continue
            out.append((entry, job))
        for job_id in stale:
            self.remove(job_id)
        return out


def cancel_queued(job: JobDir, reason: str = CANCELLED_QUEUED) -> bool:
    """End a job that has not started: `cancelled`, one end event, out of the queue. True if this call
    did it; False if the job is no longer queued (a supervisor has it: send it `cancel` instead)."""
    fd = job.try_lock(wait_s=0.5)
    if fd is None:
        return False
    try:
        if job.status().get("state") != "queued":
            return False
        with EventWriter(job.events_path) as events:
            events.emit("end", state="cancelled", reason=reason, last_lines=[])
        job.write_status(state="cancelled", ended=time.time(), reason=reason)
    finally:
        os.close(fd)
    Queue().remove(job.id)
    try:
        from nyx_tui.jobs.store import job_summary

        Store().upsert(job_summary(job))
    except Exception:  # the index is rebuilt from the directory on the next sync
        pass
    return True


def enqueue(job: JobDir) -> QueueEntry:
    """Add a `queued` job (created with `queue=True` in its spec) and make sure a scheduler runs.

    The order matters: the row is written before the scheduler is looked for, and an exiting scheduler
    looks at the queue once more after it has let go of its lock, so a job is never left waiting alone.
    """
    from nyx_tui.jobs.scheduler import ensure_scheduler

    entry = Queue().add(job)
    ensure_scheduler()
    return entry
