"""The supervisor: one detached process per job that runs the worker and records how it ended.

Run as `python -m nyx_tui.jobs.supervisor JOB_DIR` (normally by `jobs.launch.spawn_supervisor`). It

- holds an exclusive flock on `JOB_DIR/lock` for its whole life, so "is the job alive?" is answered by
  the kernel (which drops the lock when this process dies), not by a pid that can be reused;
- starts the worker from `spec.json` in its own process group, so signals reach the worker and all of
  its children (data loader workers, `accelerate launch` ranks) at once;
- copies the worker's output into `output.log` in fixed-size chunks (sd-scripts redraws tqdm with `\\r`
  only, and asyncio's `readline()` raises after 64 KiB without a newline);
- enforces `stop`/`cancel` from `control.jsonl` with a grace period, then SIGINT, SIGTERM, SIGKILL;
- writes exactly one `end` event and the final status, and keeps the SQLite index up to date (best
  effort: the job directory is the source of truth).

Exit codes: 0 after writing the end; 2 for a bad command line or job directory; 3 when the job is or
was already supervised (the lock is held, or the job is no longer `queued`).
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import os
import re
import signal
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

from nyx_tui.jobs.control import ControlReader
from nyx_tui.jobs.events import EventWriter
from nyx_tui.jobs.jobdir import JobDir

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_ALREADY_SUPERVISED = 3

CHUNK = 64 * 1024  # bytes per read of the worker's output
LAST_LINES = 40  # lines kept for the end event
CONTROL_POLL_S = 0.5
LOCK_WAIT_S = 1.0  # outlasts a view's liveness probe, never a live supervisor
DRAIN_S = 5.0  # after the worker exits, how long its children may keep the pipe open
REDACTED = "<redacted>"

CANCEL_REASONS = {"stop": "stopped on request", "cancel": "cancelled on request"}
OOM_KILL_HINT = (
    "a SIGKILL that Nyx did not send is usually the kernel's out-of-memory killer: the machine ran out of "
    "system RAM (not GPU memory). Lower the batch size or the data loader's num_workers, and enable "
    "caching latents / text-encoder outputs to disk. `dmesg | grep -i oom` confirms it."
)
CUDA_OOM_HINT = (
    "the GPU ran out of memory: lower training.batch_size, enable training.gradient_checkpointing, lower "
    "the resolution, or (Flux/SD3) swap blocks to the CPU; a smaller network dim helps a little."
)
CUDA_OOM_HINT_COMPARE = (
    "the GPU ran out of memory: lower --size, or run it while no training job holds the GPU."
)
CUDA_OOM_HINT_MODEL = (
    "the GPU ran out of memory: lower --batch-size, or run it while no training job holds the GPU."
)
NO_LORA_HINT = (
    "the trainer ended normally but never saved a LoRA; read output.log. sd-scripts exits 0 after "
    "'No data found' when a dataset folder is empty or lacks its `N_name` repeats prefix."
)
_CUDA_OOM = re.compile(r"CUDA out of memory|OutOfMemoryError")
_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
_LINE_SEP = re.compile(r"(\r\n|\r|\n)")


class OutputTail:
    """The last lines of a byte stream, split on both `\\r` and `\\n`.

    A segment ended by a bare `\\r` is a progress-bar frame: the next segment replaces it, so a thousand
    tqdm redraws take one line, not the whole buffer. ANSI escapes are dropped (the lines are shown in
    the TUI and in `nyx attach`, not replayed to a terminal). A line without an end is capped in size.
    """

    MAX_LINE = 4096

    def __init__(self, maxlen: int = LAST_LINES) -> None:
        self.lines: deque[str] = deque(maxlen=maxlen)
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._partial = ""
        self._transient = False

    def feed(self, data: bytes) -> None:
        text = self._partial + self._decoder.decode(data)
        parts = _LINE_SEP.split(text)
        tail = parts.pop()
        if tail == "" and parts and parts[-1] == "\r":  # maybe the first half of a \r\n split across reads
            parts.pop()
            tail = parts.pop() + "\r"
        for segment, sep in zip(parts[0::2], parts[1::2], strict=True):
            self._push(segment, transient=sep == "\r")
        if len(tail) > self.MAX_LINE:
            self._push(tail, transient=False)
            tail = ""
        self._partial = tail

    def close(self) -> None:
        rest = (self._partial + self._decoder.decode(b"", final=True)).rstrip("\r")
        self._partial = ""
        if rest:
            self._push(rest, transient=False)

    def _push(self, segment: str, transient: bool) -> None:
        line = _ANSI.sub("", segment)[: self.MAX_LINE].rstrip()
        if not line.strip():
            return
        if self._transient and self.lines:
            self.lines[-1] = line
        else:
            self.lines.append(line)
        self._transient = transient


def worker_env(spec: dict[str, Any]) -> dict[str, str]:
    """The supervisor's own environment (which is the launcher's: secrets come from there), plus the
    spec's entries that were not redacted, plus unbuffered Python output so lines arrive as printed."""
    env = dict(os.environ)
    for key, value in (spec.get("env") or {}).items():
        if value != REDACTED:
            env[str(key)] = str(value)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def group_alive(pgid: int) -> bool:
    """Whether a process group still has a live member. A child orphaned by the worker's death is
    reparented to PID 1 and, once it dies, stays a zombie until PID 1 reaps it, which a container's init
    may do late or never; `killpg(pgid, 0)` counts zombies, so on Linux /proc is read and they are not.
    Otherwise a worker killed (by the OOM killer) with a child in its group would end only once PID 1
    got round to it: up to the 2 s + 2 s of `_clean_group`."""
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    try:
        pids = [name for name in os.listdir("/proc") if name.isdigit()]
    except OSError:  # no /proc (not Linux): trust killpg
        return True
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue  # exited meanwhile
        if int(fields[2]) == pgid and fields[0] not in (b"Z", b"X"):
            return True
    return False


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class Supervisor:
    """Runs one job's worker to its end. One instance, one `asyncio.run`."""

    def __init__(self, job: JobDir, spec: dict[str, Any]) -> None:
        self.job = job
        self.spec = spec
        self.events = EventWriter(job.events_path)
        self.control = ControlReader(job.control_path)
        self.tail = OutputTail()
        self.proc: asyncio.subprocess.Process | None = None
        self.requested: str | None = None  # "stop" | "cancel"
        self.reason: str | None = None
        self.sent: set[int] = set()  # signals we sent to the worker's group
        self._sigint_at: float | None = None  # loop time the ladder starts
        self._ladder: asyncio.Task[None] | None = None
        self._ended = False
        self.step_s = float(spec.get("signal_step_s", 10))

    # ------------------------------------------------------------------ main flow
    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(sig, self._on_signal, sig)
        self.job.write_status(
            state="starting", supervisor_pid=os.getpid(), started=time.time(), worker_pid=None, ended=None
        )
        self._store()
        self._poll_control()
        if self.requested:  # cancelled while queued or starting: never start the worker
            self._end(state="cancelled", reason=self.reason)
            return
        try:
            await self._supervise()
        except BaseException as e:
            self._kill_group(signal.SIGKILL)
            if not self._ended:
                self._end(state="failed", error=f"the supervisor failed: {e!r}", exit_code=None)
            if not isinstance(e, Exception):
                raise

    async def _supervise(self) -> None:
        argv = [str(a) for a in self.spec.get("argv") or []]
        if not argv:
            self._end(state="failed", error="spec.json has no worker command (argv is empty)")
            return
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
                env=worker_env(self.spec),
                cwd=self.job.path,
            )
        except (OSError, ValueError) as e:
            self._end(state="failed", error=f"could not start the worker {argv[0]!r}: {e}")
            return
        self.proc = proc
        self.job.write_status(state="running", worker_pid=proc.pid)
        self._store()
        if self._sigint_at is not None:  # a request arrived while the worker was being started
            self._schedule_ladder(max(0.0, self._sigint_at - asyncio.get_running_loop().time()))
        assert proc.stdout is not None
        pump = asyncio.create_task(self._pump(proc.stdout))
        watch = asyncio.create_task(self._watch_control())
        returncode = await self._wait_exit(proc)
        watch.cancel()
        self._poll_control()  # a worker that obeyed a stop may exit before the next poll saw it
        if self._ladder is not None:
            self._ladder.cancel()
        # children the worker left behind may hold the pipe open: give the output a moment, end the
        # group, then read what is left (a child that left the group is given up on after DRAIN_S)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(pump), timeout=0.5)
        await self._clean_group(proc.pid)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(pump, timeout=DRAIN_S)
        self.tail.close()
        self._finish(returncode)

    @staticmethod
    async def _wait_exit(proc: asyncio.subprocess.Process) -> int:
        """The worker's exit status. Not `proc.wait()`: that also waits for the output pipe to close,
        which a child the worker left behind can keep open for ever. The return code is set as soon as
        the worker itself is reaped."""
        while proc.returncode is None:
            await asyncio.sleep(0.1)
        return proc.returncode

    async def _pump(self, stream: asyncio.StreamReader) -> None:
        with open(self.job.log_path, "ab") as log:
            while chunk := await stream.read(CHUNK):
                log.write(chunk)
                log.flush()
                self.tail.feed(chunk)

    async def _watch_control(self) -> None:
        while True:
            await asyncio.sleep(CONTROL_POLL_S)
            self._poll_control()

    def _poll_control(self) -> None:
        for message in self.control.poll():
            command = message.get("command")
            if command == "stop":
                self.request("stop", float(self.spec.get("stop_grace_s", 120)))
            elif command == "cancel":
                self.request("cancel", float(self.spec.get("cancel_grace_s", 10)))
            # save_now / sample_now are the worker's to read

    # ------------------------------------------------------------------ stopping
    def request(self, command: str, grace: float, reason: str | None = None) -> None:
        """Record a stop/cancel and (re)schedule the signal ladder if this one is due sooner."""
        first = self.requested is None
        if command == "cancel" or first:
            self.requested = command
            self.reason = reason or CANCEL_REASONS[command]
        if first or command == "cancel":
            self.events.log(f"{command} requested: the worker has {grace:g} s to exit before it is signalled")
        at = asyncio.get_running_loop().time() + grace
        if self._sigint_at is None or at < self._sigint_at:
            self._sigint_at = at
            if self.proc is not None and self.proc.returncode is None:
                self._schedule_ladder(grace)

    def _schedule_ladder(self, delay: float) -> None:
        if self._ladder is not None:
            self._ladder.cancel()
        self._ladder = asyncio.create_task(self._run_ladder(delay))

    async def _run_ladder(self, delay: float) -> None:
        await asyncio.sleep(delay)
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
            if self.proc is None or self.proc.returncode is not None:
                return
            self.events.log(f"the worker is still running: sending {signal_name(sig)}", level="warning")
            self._kill_group(sig)
            if sig != signal.SIGKILL:
                await asyncio.sleep(self.step_s)

    def _kill_group(self, sig: int) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, sig)
            self.sent.add(sig)
        except (ProcessLookupError, PermissionError):
            pass

    async def _clean_group(self, pgid: int) -> None:
        """Children the worker left behind in its group (a data loader, a launcher's ranks) would hold
        the GPU and the pipe: the job is over, so they get SIGTERM, then SIGKILL. The pgid cannot have
        been reused while any member of the group lives."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if not group_alive(pgid):
                return
            try:
                os.killpg(pgid, sig)
            except (ProcessLookupError, PermissionError):
                return
            for _ in range(20):
                await asyncio.sleep(0.1)
                if not group_alive(pgid):
                    return

    def _on_signal(self, sig: int) -> None:
        """A signal to the supervisor is a cancel. The worker cannot read it from control.jsonl, so the
        ladder starts at once (SIGINT, the signal a Python worker treats as Ctrl+C)."""
        name = signal_name(sig)
        self.events.log(f"the supervisor received {name}: cancelling the job", level="warning")
        self.request("cancel", 0.0, reason=f"cancelled: the supervisor received {name}")

    # ------------------------------------------------------------------ the end
    def _finish(self, returncode: int) -> None:
        lines = list(self.tail.lines)
        exit_code = returncode if returncode >= 0 else None
        sig = -returncode if returncode < 0 else None
        fields: dict[str, Any] = {"exit_code": exit_code, "signal": signal_name(sig) if sig else None}
        if self.requested:
            self._end(state="cancelled", reason=self.reason, last_lines=lines, **fields)
            return
        if returncode == 0:
            if self.spec.get("kind") == "train" and not any(a.get("what") == "lora" for a in self.job.artifacts()):
                self._end(
                    state="failed",
                    error="the trainer exited without saving a LoRA",
                    hint=NO_LORA_HINT,
                    last_lines=lines,
                    **fields,
                )
            else:
                self._end(state="finished", last_lines=lines, **fields)
            return
        hint = None
        if sig is not None:
            error = f"the worker was killed by {signal_name(sig)}"
            if sig == signal.SIGKILL and signal.SIGKILL not in self.sent:
                hint = OOM_KILL_HINT
        else:
            error = f"worker exited with code {returncode}"
            said = self._worker_reason()
            if said is not None:  # a worker that knows why it failed (the kohya runner) says it in a log event
                error, hint = said
        if any(_CUDA_OOM.search(line) for line in lines):
            error = "CUDA out of memory"
            kind = self.spec.get("kind", "train")
            hint = {"train": CUDA_OOM_HINT, "lr-find": CUDA_OOM_HINT, "compare": CUDA_OOM_HINT_COMPARE}.get(
                kind, CUDA_OOM_HINT_MODEL
            )
        self._end(state="failed", error=error, hint=hint, last_lines=lines, **fields)

    def _worker_reason(self) -> tuple[str, str | None] | None:
        """The last `log` event that carries an `error` (and maybe a `hint`): the worker's own account of a
        failure, more telling than its exit code."""
        from nyx_tui.jobs.events import read_events

        try:
            found = [e for e in read_events(self.job.events_path) if e.get("kind") == "log" and e.get("error")]
        except Exception:
            return None
        if not found:
            return None
        hint = found[-1].get("hint")
        return str(found[-1]["error"]), str(hint) if hint else None

    def _end(self, state: str, **fields: Any) -> None:
        """Exactly one end: the event first (a follower that sees a terminal status also finds it),
        then the status, then the index."""
        if self._ended:
            return
        self._ended = True
        fields.setdefault("last_lines", list(self.tail.lines))
        self.events.emit("end", state=state, **{k: v for k, v in fields.items() if v is not None})
        status = {k: fields.get(k) for k in ("exit_code", "signal", "error", "hint", "reason")}
        self.job.write_status(state=state, ended=time.time(), **status)
        self._store()

    def _store(self) -> None:
        try:
            from nyx_tui.jobs.store import Store, job_summary

            Store().upsert(job_summary(self.job))
        except Exception as e:  # the index must never fail the job
            print(f"nyx supervisor: could not update the job store: {e!r}", file=sys.stderr, flush=True)


def _fail_early(job: JobDir, error: str) -> None:
    """For a job whose spec cannot be read: record the failure the usual way, without a worker."""
    with EventWriter(job.events_path) as events:
        events.emit("end", state="failed", error=error, last_lines=[])
    job.write_status(state="failed", ended=time.time(), error=error, supervisor_pid=os.getpid())


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m nyx_tui.jobs.supervisor JOB_DIR", file=sys.stderr)
        return EXIT_USAGE
    job = JobDir(Path(args[0]).resolve())
    if not job.spec_path.is_file():
        print(f"nyx supervisor: {job.path} is not a job directory (no spec.json)", file=sys.stderr)
        return EXIT_USAGE
    # detached already; until the loop installs its handlers a hangup must not kill a half-started job
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    lock_fd = job.try_lock(wait_s=LOCK_WAIT_S)
    if lock_fd is None:
        print(f"nyx supervisor: {job.id} is already supervised (its lock is held)", file=sys.stderr)
        return EXIT_ALREADY_SUPERVISED
    # the fd stays open (and locked) until this process exits; os.open fds are not inherited by workers
    state = job.status().get("state")
    if state != "queued":
        print(f"nyx supervisor: {job.id} is {state}, not queued; a job is supervised once", file=sys.stderr)
        return EXIT_ALREADY_SUPERVISED
    try:
        spec = job.spec()
    except (OSError, ValueError) as e:
        _fail_early(job, f"spec.json cannot be read: {e}")
        return EXIT_OK
    asyncio.run(Supervisor(job, spec).run())
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
