"""The scheduler: starts queued jobs as their resource frees up, with no TUI or CLI open.

One per data folder: it holds an flock on `<data>/scheduler.lock` (so the kernel, not a pid file, says
whether one runs). `enqueue()` starts it on demand as a detached process (`python -m
nyx_tui.jobs.scheduler`, its own session, stderr in `<data>/scheduler.log`), and it exits once the queue
is empty. Running jobs never need it: each has its own supervisor.

Slots. A GPU job gets one GPU to itself: its worker sees only that one (`CUDA_VISIBLE_DEVICES`), and
status.json records it (`gpu_slot`). The GPUs are `NYX_GPUS` (`0,1`; `none` for a CPU box), else the
scheduler's own `CUDA_VISIBLE_DEVICES`, else every GPU NVML reports; without any there is one slot, so
jobs still run one at a time. A GPU job started directly (`nyx train` without `--queue`) holds a slot
too. A training run with several processes (`training.num_processes`) waits for that many free GPUs and
gets them all (`CUDA_VISIBLE_DEVICES=0,1`). CPU jobs (downloads) run beside them, up to
`Settings.queue_cpu_jobs` at once.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from nyx_tui import paths
from nyx_tui.jobs.events import EventWriter
from nyx_tui.jobs.jobdir import ACTIVE, TERMINAL, JobDir, flock_file, list_jobs
from nyx_tui.jobs.launch import spawn_supervisor, supervisor_env, wait_started
from nyx_tui.jobs.queue import Queue, resource_of

POLL_S = 0.5
CPU_SLOT = "cpu"  # the one slot of a machine without GPUs
EXIT_OK, EXIT_ALREADY_RUNNING = 0, 3


def lock_path() -> Path:
    return paths.data_dir() / "scheduler.lock"


def log_path() -> Path:
    return paths.data_dir() / "scheduler.log"


def _lock(wait_s: float = 0.0) -> int | None:
    path = lock_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    return flock_file(path, wait_s)


def scheduler_running() -> bool:
    fd = _lock()
    if fd is None:
        return True
    os.close(fd)
    return False


def ensure_scheduler() -> int | None:
    """Start a detached scheduler unless one runs; its pid, or None. Two callers racing start two, and
    the one that loses the lock exits at once."""
    if scheduler_running():
        return None
    path = log_path()
    with open(path, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "nyx_tui.jobs.scheduler"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log,
            cwd=path.parent,
            env=supervisor_env(),
            start_new_session=True,
            close_fds=True,
        )
    threading.Thread(target=proc.wait, name=f"nyx-reap-{proc.pid}", daemon=True).start()
    return proc.pid


def gpu_slots() -> list[str]:
    """The GPU ids jobs are spread over (see the module doc); `[CPU_SLOT]` when there are none."""
    chosen = os.environ.get("NYX_GPUS", "").strip()
    if chosen:
        ids = [] if chosen.lower() in ("none", "cpu") else [s.strip() for s in chosen.split(",") if s.strip()]
    elif "CUDA_VISIBLE_DEVICES" in os.environ:
        ids = [s.strip() for s in os.environ["CUDA_VISIBLE_DEVICES"].split(",") if s.strip() and s.strip() != "-1"]
    else:
        from nyx_tui.gpu import sample

        ids = [str(g.index) for g in sample().gpus]
    return ids or [CPU_SLOT]


def gpus_of(spec: dict[str, Any]) -> int:
    """How many GPUs a job wants at once: a training run with several processes (`training.num_processes`,
    recorded as `gpus` in its spec) one per process; everything else one."""
    try:
        return max(1, int(spec.get("gpus", 1)))
    except (TypeError, ValueError):
        return 1


def _say(message: str) -> None:
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} nyx scheduler: {message}", file=sys.stderr, flush=True)


class Scheduler:
    def __init__(self, slots: list[str] | None = None, cpu_limit: int | None = None) -> None:
        self.slots = slots or gpu_slots()
        if cpu_limit is None:
            from nyx_tui.settings import load_settings

            cpu_limit = load_settings()[0].queue_cpu_jobs
        self.cpu_limit = max(1, cpu_limit)
        self.queue = Queue()
        self._ended: set[str] = set()  # ids known to be over: not read again
        self._specs: dict[str, dict[str, Any]] = {}

    def _spec(self, job: JobDir) -> dict[str, Any]:
        if job.id not in self._specs:
            try:
                self._specs[job.id] = job.spec()
            except (OSError, ValueError):
                self._specs[job.id] = {}
        return self._specs[job.id]

    def occupancy(self) -> tuple[list[str], int]:
        """(free GPU slots in order, running CPU jobs), from the job directories."""
        taken: list[str | None] = []
        cpu = 0
        for job in list_jobs():
            if job.id in self._ended:
                continue
            status = job.status()
            state = status.get("state")
            if state in TERMINAL:
                self._ended.add(job.id)
                continue
            if state not in ACTIVE or not job.supervisor_alive():
                continue  # queued, or lost (the next `nyx jobs` records it)
            resource = resource_of(self._spec(job))
            if resource == "none":
                continue
            if resource == "gpu":
                slot = status.get("gpu_slot")
                if isinstance(slot, str) and slot:
                    taken.extend(slot.split(","))  # a multi-GPU job holds several: "0,1"
                else:
                    taken.extend([None] * gpus_of(self._spec(job)))
            else:
                cpu += 1
        free = [s for s in self.slots if s not in taken]
        for _ in range(sum(1 for s in taken if s not in self.slots)):  # started directly: hold any slot
            if free:
                free.pop(0)
        return free, cpu

    def tick(self) -> bool:
        """Start what can start now. False when nothing is waiting."""
        waiting = self.queue.waiting()
        if not waiting:
            return False
        free, cpu = self.occupancy()
        for entry, job in waiting:
            if entry.resource == "gpu":
                want = min(gpus_of(self._spec(job)), len(self.slots))  # never more than the machine has
                if len(free) >= want and self._start(job, ",".join(free[:want])):
                    del free[:want]
            elif entry.resource == "none":
                self._start(job, None)
            elif cpu < self.cpu_limit and self._start(job, None):
                cpu += 1
        return True

    def _start(self, job: JobDir, slot: str | None) -> bool:
        fd = job.try_lock(wait_s=0.2)
        if fd is None:
            return False
        try:
            if job.status().get("state") != "queued":
                return False  # cancelled (or started) a moment ago
            job.write_status(gpu_slot=slot)
        finally:
            os.close(fd)
        env = {"CUDA_VISIBLE_DEVICES": slot} if slot not in (None, CPU_SLOT) else {}
        gpus = "GPUs" if slot and "," in slot else "GPU"
        where = f"{gpus} {slot} (CUDA_VISIBLE_DEVICES={slot})" if env else ("the CPU slot" if slot else "a CPU slot")
        with EventWriter(job.events_path) as events:
            events.log(f"started from the queue on {where}")
        spawn_supervisor(job, env)
        try:
            wait_started(job, timeout=30)
        except TimeoutError as e:
            _say(f"{job.id}: {e}")
            self._fail(job, str(e))
        self.queue.remove(job.id)
        _say(f"started {job.id} on {where}")
        return True

    @staticmethod
    def _fail(job: JobDir, error: str) -> None:
        fd = job.try_lock(wait_s=1.0)
        if fd is None:
            return  # a supervisor has it after all
        try:
            if job.status().get("state") == "queued":
                with EventWriter(job.events_path) as events:
                    events.emit("end", state="failed", error=error, last_lines=[])
                job.write_status(state="failed", ended=time.time(), error=error)
        finally:
            os.close(fd)

    def run(self, poll_s: float = POLL_S) -> int:
        fd = _lock()
        if fd is None:
            return EXIT_ALREADY_RUNNING
        added = self.queue.rebuild()
        _say(f"running (pid {os.getpid()}, GPU slots {', '.join(self.slots)}, {added} job(s) recovered)")
        try:
            while True:
                if self.tick():
                    time.sleep(poll_s)
                    continue
                # idle: let go of the lock, then look once more, since an `enqueue` that saw the lock
                # held a moment ago relies on this scheduler to start its job
                os.close(fd)
                fd = -1
                if not self.queue.waiting():
                    _say("the queue is empty: exiting")
                    return EXIT_OK
                again = _lock()
                if again is None:
                    return EXIT_OK  # another scheduler took over
                fd = again
        finally:
            if fd >= 0:
                os.close(fd)


def main() -> int:
    return Scheduler().run()


if __name__ == "__main__":
    sys.exit(main())
