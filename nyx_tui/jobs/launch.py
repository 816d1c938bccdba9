"""Starting a job's supervisor so that it outlives whoever started it.

The supervisor runs in a new session (`start_new_session=True`): it has no controlling terminal, so a
closing terminal or a dropped SSH connection sends it no SIGHUP, and Ctrl+C in the caller's terminal
reaches only the caller's process group. Its stdio is /dev/null (stderr goes to `supervisor.log`), so a
vanished terminal cannot make its writes fail either.

Zombies: while the caller lives it is the supervisor's parent and must reap it. We use a daemon thread
blocked in `Popen.wait()` rather than a double fork: `os.fork()` in a threaded caller (the Textual app
runs threads) can deadlock the child, and an intermediate interpreter would cost a Python start-up on
every launch. The thread costs nothing while it waits, dies with the caller, and once the caller is gone
the supervisor is re-parented to init (or the nearest subreaper), which reaps it.
"""

from __future__ import annotations

import os
import site
import subprocess
import sys
import threading
import time
from pathlib import Path

import nyx_tui
from nyx_tui.jobs.jobdir import JobDir

SUPERVISOR_LOG = "supervisor.log"

# supervisor exit codes seen by the reaper threads, keyed by job dir, so wait_started can fail early
_exit_codes: dict[Path, int] = {}


def _package_root() -> Path:
    return Path(nyx_tui.__file__).resolve().parent.parent


def supervisor_env() -> dict[str, str]:
    """The caller's environment (secrets such as HF_TOKEN reach the worker this way, never through
    spec.json). When Nyx runs from a source checkout that is not installed, its root goes on PYTHONPATH:
    the supervisor and the worker start in the job directory, where `-m nyx_tui…` would not be found.
    An installed Nyx (site-packages) adds nothing, so a foreign worker interpreter sees no extra path."""
    env = dict(os.environ)
    root = _package_root()
    site_dirs = {Path(p).resolve() for p in [*site.getsitepackages(), site.getusersitepackages()]}
    if root not in site_dirs:
        parts = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        if str(root) not in parts:
            env["PYTHONPATH"] = os.pathsep.join([str(root), *parts])
    return env


def spawn_supervisor(job: JobDir, extra_env: dict[str, str] | None = None) -> int:
    """Start `python -m nyx_tui.jobs.supervisor JOB_DIR` detached and return its pid at once.
    `extra_env` reaches the supervisor and its worker (the scheduler's `CUDA_VISIBLE_DEVICES`)."""
    with open(job.path / SUPERVISOR_LOG, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "nyx_tui.jobs.supervisor", str(job.path)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log,
            cwd=job.path,
            env={**supervisor_env(), **(extra_env or {})},
            start_new_session=True,
            close_fds=True,
        )
    threading.Thread(target=_reap, args=(proc, job.path), name=f"nyx-reap-{proc.pid}", daemon=True).start()
    return proc.pid


def _reap(proc: subprocess.Popen[bytes], path: Path) -> None:
    _exit_codes[path] = proc.wait()


def _log_tail(job: JobDir, limit: int = 2000) -> str:
    try:
        text = (job.path / SUPERVISOR_LOG).read_text(errors="replace")
    except OSError:
        return ""
    return text[-limit:].strip()


def wait_started(job: JobDir, timeout: float = 10) -> None:
    """Return once the supervisor has taken the job (it writes `starting` only while holding the lock)
    or the job has ended. Raises TimeoutError otherwise, also early when this process saw its supervisor
    exit without taking the job: callers handle one exception for "the job did not start"."""
    deadline = time.monotonic() + timeout
    while True:
        if job.status().get("state", "queued") != "queued":
            return
        code = _exit_codes.get(job.path)
        # 3 = another supervisor holds the job: it will move it on, so keep waiting for that
        if code is not None and code != 3:
            raise TimeoutError(
                f"the supervisor of job {job.id} exited with code {code} before starting it"
                + (f":\n{_log_tail(job)}" if _log_tail(job) else f" (see {job.path / SUPERVISOR_LOG})")
            )
        if time.monotonic() >= deadline:
            tail = _log_tail(job)
            raise TimeoutError(
                f"the supervisor of job {job.id} did not start it within {timeout:g} s; "
                + (f"its log says:\n{tail}" if tail else f"see {job.path / SUPERVISOR_LOG}")
            )
        time.sleep(0.1)
