"""The job directory: the source of truth for one job, readable by any view at any time.

| file | who writes |
| `spec.json` | launcher, once: kind, name, argv, env (secrets redacted), created |
| `config.toml` | launcher, once (training jobs) |
| `status.json` | supervisor, atomically replaced (temp file + rename) |
| `events.jsonl` | worker and supervisor, append-only (`jobs.events`) |
| `output.log` | supervisor: the worker's raw stdout and stderr |
| `control.jsonl` | views: commands to the job (`jobs.control`) |
| `lock` | supervisor holds an flock on it while alive; the kernel releases it when it dies |
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nyx_tui import paths
from nyx_tui.jobs.events import EventTail, read_events

STATES = ("queued", "starting", "running", "finished", "failed", "cancelled", "lost")
TERMINAL = frozenset({"finished", "failed", "cancelled", "lost"})
ACTIVE = frozenset({"starting", "running"})  # a supervisor must hold the lock in these states

SECRET_ENV = re.compile(r"(TOKEN|SECRET|PASSWORD|PASSWD|API_KEY|APIKEY|CREDENTIAL)", re.IGNORECASE)


def redact_env(env: dict[str, str]) -> dict[str, str]:
    """Secrets never reach spec.json: their values are replaced, their names kept (so a view can say
    "HF_TOKEN was set")."""
    return {k: ("<redacted>" if SECRET_ENV.search(k) else v) for k, v in env.items()}


def atomic_write(path: Path, data: str | bytes) -> None:
    """Write to a temp file in the same folder, fsync, rename over: readers see the old or the new file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    raw = data.encode() if isinstance(data, str) else data
    with open(tmp, "wb") as f:
        f.write(raw)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _slug(text: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return slug[:40] or "job"


@dataclass(frozen=True, order=True)
class JobDir:
    path: Path

    @property
    def id(self) -> str:
        return self.path.name

    # ---------------------------------------------------------------- files
    @property
    def spec_path(self) -> Path:
        return self.path / "spec.json"

    @property
    def config_path(self) -> Path:
        return self.path / "config.toml"

    @property
    def status_path(self) -> Path:
        return self.path / "status.json"

    @property
    def events_path(self) -> Path:
        return self.path / "events.jsonl"

    @property
    def log_path(self) -> Path:
        return self.path / "output.log"

    @property
    def control_path(self) -> Path:
        return self.path / "control.jsonl"

    @property
    def lock_path(self) -> Path:
        return self.path / "lock"

    @property
    def output_dir(self) -> Path:
        return self.path / "output"

    # ---------------------------------------------------------------- spec and status
    def spec(self) -> dict[str, Any]:
        return json.loads(self.spec_path.read_text())

    def status(self) -> dict[str, Any]:
        """The last status written; a job dir without one is `queued`."""
        try:
            return json.loads(self.status_path.read_text())
        except FileNotFoundError:
            return {"state": "queued"}
        except ValueError:
            # written atomically, so this is a hand-edited or foreign file: say so rather than crash
            return {"state": "lost", "error": "status.json is not valid JSON"}

    def write_status(self, **fields: Any) -> dict[str, Any]:
        """Merge `fields` into status.json and replace it atomically."""
        status = self.status() if self.status_path.exists() else {}
        status.update(fields)
        status["updated"] = time.time()
        atomic_write(self.status_path, json.dumps(status, indent=1, sort_keys=True))
        return status

    def events(self) -> list[dict[str, Any]]:
        return read_events(self.events_path)

    def artifacts(self) -> list[dict[str, Any]]:
        """The artifact events, read in chunks: a million-step log is never held in memory."""
        from nyx_tui.jobs.store import EventScan  # store builds on this module

        return EventScan().read(self.events_path).artifacts

    def first_event(self, kind: str) -> dict[str, Any] | None:
        """The first event of `kind`, reading from the start only as far as needed."""
        needle = f'"kind":"{kind}"'.encode()
        tail = EventTail(self.events_path)
        while True:
            data = tail.read_lines()
            if not data:
                return None
            at = data.find(needle)
            while at >= 0:
                start, end = data.rfind(b"\n", 0, at) + 1, data.find(b"\n", at)
                event = _one(data[start:end])
                if event is not None and event.get("kind") == kind:
                    return event
                at = data.find(needle, end)

    def last_event(self, kind: str) -> dict[str, Any] | None:
        """The last event of `kind`, reading the file backwards in growing windows."""
        needle = f'"kind":"{kind}"'.encode()
        try:
            f = open(self.events_path, "rb")  # noqa: SIM115 (closed by `with` below)
        except FileNotFoundError:
            return None
        with f:
            size = os.fstat(f.fileno()).st_size
            window = 1 << 16
            while True:
                start = max(0, size - window)
                f.seek(start)
                data = f.read(size - start)
                end = data.rfind(b"\n") + 1  # complete lines only
                at = data.rfind(needle, 0, end)
                while at >= 0:
                    line_start = data.rfind(b"\n", 0, at) + 1
                    if line_start > 0 or start == 0:
                        event = _one(data[line_start : data.find(b"\n", at)])
                        if event is not None and event.get("kind") == kind:
                            return event
                    at = data.rfind(needle, 0, line_start)
                if start == 0:
                    return None
                window *= 4

    # ---------------------------------------------------------------- liveness
    def supervisor_alive(self) -> bool:
        """True while some process holds the job's lock. Immune to pid reuse: the kernel drops an flock
        when its holder dies, whatever pid comes next."""
        try:
            fd = os.open(self.lock_path, os.O_RDWR)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        else:
            fcntl.flock(fd, fcntl.LOCK_UN)
            return False
        finally:
            os.close(fd)

    def try_lock(self, wait_s: float = 0.0) -> int | None:
        """Take the job's lock (exclusive flock); return its fd, or None if someone else holds it.

        Retries for `wait_s`: a view probing liveness (`supervisor_alive`) holds the lock for a few
        microseconds, and that must not read as "another supervisor". Closing the fd releases it.
        """
        return flock_file(self.lock_path, wait_s)

    def effective_state(self) -> str:
        """The state a view should show: an active job whose supervisor is gone is `lost`."""
        state = str(self.status().get("state", "queued"))
        if state in ACTIVE and not self.supervisor_alive():
            # re-read: the supervisor may have finished between the two reads
            state = str(self.status().get("state", "queued"))
            if state in ACTIVE:
                return "lost"
        return state


def flock_file(path: Path, wait_s: float = 0.0) -> int | None:
    """An exclusive flock on `path` (created if missing): its fd, or None if another process holds it
    after `wait_s` of retries. Closing the fd (or dying) releases it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() >= deadline:
                os.close(fd)
                return None
            time.sleep(0.05)


def _one(line: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        return None
    return value if isinstance(value, dict) else None


def new_job_id(name: str, root: Path | None = None) -> str:
    root = root or paths.jobs_dir()
    base = f"{time.strftime('%Y%m%d-%H%M%S')}-{_slug(name)}"
    candidate, n = base, 2
    while (root / candidate).exists():
        candidate, n = f"{base}-{n}", n + 1
    return candidate


def create_job(
    kind: str,
    name: str,
    argv: list[str],
    *,
    env: dict[str, str] | None = None,
    config_toml: str | None = None,
    extra: dict[str, Any] | None = None,
    root: Path | None = None,
) -> JobDir:
    """Make a job directory with its spec (and config snapshot) in state `queued`. Starts nothing."""
    root = root or paths.jobs_dir()
    root.mkdir(parents=True, exist_ok=True)
    while True:
        job_id = new_job_id(name, root)
        try:
            (root / job_id).mkdir()
            break
        except FileExistsError:  # another launcher took the same second and name
            continue
    job = JobDir(root / job_id)
    spec: dict[str, Any] = {
        "id": job_id,
        "kind": kind,
        "name": name,
        "argv": argv,
        "env": redact_env(env or {}),
        "created": time.time(),
        **(extra or {}),
    }
    if config_toml is not None:
        atomic_write(job.config_path, config_toml)
        spec["config"] = job.config_path.name
    atomic_write(job.spec_path, json.dumps(spec, indent=1))
    job.write_status(state="queued", created=spec["created"])
    return job


def list_jobs(root: Path | None = None) -> list[JobDir]:
    root = root or paths.jobs_dir()
    if not root.is_dir():
        return []
    return sorted(JobDir(p) for p in root.iterdir() if (p / "spec.json").is_file())


def find_job(ref: str, root: Path | None = None) -> JobDir:
    """A job by full id, unique prefix or unique substring; `last` is the newest. Raises LookupError."""
    jobs = list_jobs(root)
    if not jobs:
        raise LookupError("there are no jobs yet; start one with `nyx train FILE` or `nyx demo`")
    if ref in ("last", "latest", "-"):
        return jobs[-1]
    for pick in (
        [j for j in jobs if j.id == ref],
        [j for j in jobs if j.id.startswith(ref)],
        [j for j in jobs if ref in j.id],
    ):
        if len(pick) == 1:
            return pick[0]
        if len(pick) > 1:
            names = ", ".join(j.id for j in pick[:5])
            raise LookupError(f"{ref!r} matches several jobs ({names}); give more of the id")
    raise LookupError(f"no job matches {ref!r}; `nyx jobs` lists them")
