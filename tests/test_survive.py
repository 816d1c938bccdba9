"""Jobs that survive everything: a dropped terminal, a killed follower, a killed worker, a killed
supervisor, and a stop in the middle of real training.

`nyx attach` runs in a pseudo-terminal that is its controlling terminal (as under sshd); closing the
master side hangs the terminal up, which is what an SSH drop does. The job workers are tiny Python
scripts that write v1 events, so nothing here depends on training speed, except the two native tests
at the end, which train the tiny demo model.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import signal
import subprocess
import sys
import termios
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import nyx_cmd, run_nyx, wait_for
from test_native import loras_of, make_config, steps_of

from nyx_tui.jobs.control import send
from nyx_tui.jobs.jobdir import TERMINAL, JobDir, create_job
from nyx_tui.jobs.launch import spawn_supervisor, wait_started
from nyx_tui.jobs.store import LOST_ERROR, Store
from nyx_tui.jobs.supervisor import OOM_KILL_HINT
from nyx_tui.trainers.base import create_training_job

# ---------------------------------------------------------------------------------------- helpers

# A training-like worker: a start event, 20 steps with a known loss, a LoRA artifact. Halfway it waits
# for a `release` file in the job dir (at most 60 s), so a test decides when the job may end.
STEPS = 20
TRAINER = f"""
    import os, time
    from nyx_tui.jobs.events import EventWriter
    TOTAL = {STEPS}
    with EventWriter("events.jsonl") as w:
        w.emit("start", job=os.path.basename(os.getcwd()), job_kind="train", total_steps=TOTAL)
        print("training", flush=True)
        deadline = time.monotonic() + 60
        for step in range(1, TOTAL + 1):
            loss = 1.0 / step
            w.emit("step", step=step, total=TOTAL, epoch=1, loss=loss, loss_avg=loss, lr=[1e-4], it_s=20.0,
                   eta_s=(TOTAL - step) / 20)
            print(f"step {{step}}/{{TOTAL}} loss {{loss:.4f}}", flush=True)
            if step == TOTAL // 2:
                while not os.path.exists("release") and time.monotonic() < deadline:
                    time.sleep(0.05)
            time.sleep(0.02)
        os.makedirs("output", exist_ok=True)
        with open("output/survivor.safetensors", "wb") as f:
            f.write(b"not really a lora")
        w.emit("artifact", path="output/survivor.safetensors", what="lora", step=TOTAL)
        print("saved output/survivor.safetensors", flush=True)
"""

# Run by the pty's child: take the inherited terminal as the controlling one (an inherited fd does not
# make it so; sshd's child does the same ioctl), set SIGHUP's disposition, then become `nyx ...`.
TAKE_TERMINAL = (
    "import fcntl, os, signal, sys, termios\n"
    "fcntl.ioctl(0, termios.TIOCSCTTY, 0)\n"
    "signal.signal(signal.SIGHUP, signal.SIG_IGN if sys.argv[1] == 'ignore' else signal.SIG_DFL)\n"
    "os.execv(sys.executable, [sys.executable, *sys.argv[2:]])\n"
)
_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[()][0-9A-Za-z]")


def _job(code: str, kind: str = "train", **extra: Any) -> JobDir:
    return create_job(kind, "survive", [sys.executable, "-c", textwrap.dedent(code)], extra=extra or None)


def _start(job: JobDir) -> None:
    spawn_supervisor(job)
    wait_started(job)
    wait_for(lambda: job.status().get("state") == "running", timeout=15)


def _ends(job: JobDir) -> list[dict[str, Any]]:
    return [e for e in job.events() if e["kind"] == "end"]


def _stat(pid: int) -> list[str]:
    """/proc/PID/stat after the command name: state, ppid, pgrp, session, tty_nr, tpgid, …"""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()


def _alive(pid: int) -> bool:
    try:
        return _stat(pid)[0] != "Z"
    except FileNotFoundError:
        return False


class PtyAttach:
    """`nyx attach JOB` in its own session, with a pseudo-terminal as its controlling terminal."""

    def __init__(self, job: JobDir, sighup: str = "default") -> None:
        self.master, slave = os.openpty()
        termios.tcsetwinsize(slave, (40, 200))
        self.tty = os.fstat(slave).st_rdev
        env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "200", "LINES": "40"}
        env.pop("NO_COLOR", None)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", TAKE_TERMINAL, sighup, *nyx_cmd("attach", job.id)[1:]],
                stdin=slave,
                stdout=slave,
                stderr=slave,
                start_new_session=True,
                env=env,
            )
        finally:
            os.close(slave)  # only the follower holds the terminal now
        self.raw = b""
        self.closed = False

    @property
    def text(self) -> str:
        return _ANSI.sub("", self.raw.decode(errors="replace"))

    @property
    def tail(self) -> str:
        """The end of the output, for failure messages (the progress bar redraws a lot)."""
        return self.text[-1500:]

    def read(self, timeout: float = 0.0) -> None:
        while not self.closed:
            ready, _, _ = select.select([self.master], [], [], timeout)
            if not ready:
                return
            try:
                data = os.read(self.master, 65536)
            except OSError:  # EIO: nothing holds the other side any more
                return
            if not data:
                return
            self.raw += data
            timeout = 0.0

    def wait_text(self, text: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.text:
            assert self.proc.poll() is None, f"the follower exited ({self.proc.returncode}):\n{self.tail}"
            assert time.monotonic() < deadline, f"{text!r} not shown within {timeout} s:\n{self.tail}"
            self.read(0.1)

    def wait_exit(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            assert time.monotonic() < deadline, f"the follower still runs after {timeout} s:\n{self.tail}"
            self.read(0.05)
        self.read(0.1)
        return self.proc.returncode

    def hang_up(self) -> None:
        """Close the terminal: the kernel hangs it up and sends SIGHUP to its session's leader."""
        if not self.closed:
            self.closed = True
            os.close(self.master)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.hang_up()


@contextlib.contextmanager
def attached(job: JobDir, sighup: str = "default") -> Iterator[PtyAttach]:
    follower = PtyAttach(job, sighup)
    try:
        yield follower
    finally:
        follower.close()


def _assert_controlling_terminal(follower: PtyAttach) -> None:
    pid = follower.proc.pid
    _state, _ppid, pgrp, session, tty_nr, tpgid = _stat(pid)[:6]
    assert int(session) == pid and int(pgrp) == pid, "the follower leads its own session"
    assert int(tty_nr) == follower.tty, "the pty is the follower's controlling terminal"
    assert int(tpgid) == pid, "the follower is the terminal's foreground process group"


@pytest.fixture
def cleanup() -> Iterator[list[int]]:
    """Process groups to kill at the end (workers orphaned on purpose)."""
    groups: list[int] = []
    yield groups
    for pgid in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)


# ------------------------------------------------------------------------ the terminal goes away


@pytest.mark.parametrize("how", ["hangup", "hangup-ignored", "sigkill"])
def test_the_job_outlives_its_attach_and_a_new_attach_shows_everything(nyx_home: Path, how: str) -> None:
    job = _job(TRAINER)
    _start(job)
    with attached(job, sighup="ignore" if how == "hangup-ignored" else "default") as follower:
        follower.wait_text(" started (train)")
        follower.wait_text(f"{STEPS // 2}/{STEPS} loss")  # halfway, where the worker waits
        _assert_controlling_terminal(follower)
        supervisor = job.status()["supervisor_pid"]
        worker = job.status()["worker_pid"]

        if how == "sigkill":
            follower.proc.kill()
            assert follower.wait_exit(10) == -signal.SIGKILL
            follower.hang_up()
        else:
            follower.hang_up()
            code = follower.wait_exit(10)
            if how == "hangup":
                assert code == -signal.SIGHUP
            else:  # SIGHUP ignored (`nohup`, `trap '' HUP`): the follower sees the hung-up terminal
                assert code == 128 + signal.SIGHUP

    # the follower is gone; the job is not
    time.sleep(0.5)
    assert job.effective_state() == "running" and _alive(supervisor) and _alive(worker)
    assert not _ends(job)
    (job.path / "release").touch()
    wait_for(lambda: job.effective_state() in TERMINAL, timeout=30)
    assert job.effective_state() == "finished"
    (end,) = _ends(job)
    assert end["state"] == "finished" and end["exit_code"] == 0

    again = run_nyx("attach", job.id, home=nyx_home, timeout=60)
    assert again.returncode == 0, again.stdout + again.stderr
    out = again.stdout
    assert f"{job.id} started (train)" in out  # the start line
    assert "saved lora: output/survivor.safetensors" in out  # the artifact, as it happened
    assert f"FINISHED {job.id}" in out  # the end
    assert f"steps {STEPS}/{STEPS}, loss (moving average) 1.0000 → {1 / STEPS:.4f}" in out  # the last step
    assert "lora: output/survivor.safetensors" in out


# ------------------------------------------------------------------------------ the worker is killed

WORKER_KILLED = """
    import subprocess, sys, time
    {child}
    for i in range(5):
        print(f"step {{i}}", flush=True)
    print("allocating a lot of memory", flush=True)
    time.sleep(60)
"""
DATA_LOADER_CHILD = "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])"


@pytest.mark.parametrize("child", ["", DATA_LOADER_CHILD], ids=["alone", "with-a-child"])
def test_a_sigkilled_worker_is_failed_within_2_seconds(nyx_home: Path, child: str) -> None:
    """What the kernel's OOM killer does. With a child (a data loader) in the worker's group, the child
    outlives the worker, holds the output pipe, and once killed stays a zombie until PID 1 reaps it."""
    job = _job(WORKER_KILLED.format(child=child), kind="tag")
    _start(job)
    wait_for(lambda: job.log_path.exists() and "allocating" in job.log_path.read_text(), timeout=15)
    worker = job.status()["worker_pid"]
    killed_at = time.monotonic()
    os.kill(worker, signal.SIGKILL)
    while job.effective_state() not in TERMINAL:
        assert time.monotonic() - killed_at < 10, "the job did not end"
        time.sleep(0.01)
    latency = time.monotonic() - killed_at
    print(f"kill -9 worker → failed in {latency:.3f} s")
    assert latency < 2.0, f"the job took {latency:.2f} s to become failed"
    assert job.effective_state() == "failed"
    (end,) = _ends(job)
    assert end["state"] == "failed" and end["signal"] == "SIGKILL" and "exit_code" not in end
    assert end["error"] == "the worker was killed by SIGKILL" and end["hint"] == OOM_KILL_HINT
    assert end["last_lines"][-6:] == [*(f"step {i}" for i in range(5)), "allocating a lot of memory"]
    status = job.status()
    assert status["state"] == "failed" and status["signal"] == "SIGKILL" and status["exit_code"] is None
    wait_for(lambda: not any(_alive(int(p)) for p in _group(worker)), timeout=5)


def _group(pgid: int) -> list[str]:
    pids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            with contextlib.suppress(OSError, IndexError):
                if int(_stat(int(name))[2]) == pgid:
                    pids.append(name)
    return pids


# -------------------------------------------------------------------------- the supervisor is killed


def test_a_killed_supervisor_ends_a_running_attach_as_lost(nyx_home: Path, cleanup: list[int]) -> None:
    job = _job(TRAINER)  # waits halfway for a release that never comes: it is still working
    _start(job)
    status = job.status()
    cleanup.append(status["worker_pid"])
    with attached(job) as follower:
        follower.wait_text(" started (train)")
        _assert_controlling_terminal(follower)
        wait_for(lambda: len([e for e in job.events() if e["kind"] == "step"]) == STEPS // 2, timeout=15)
        os.kill(status["supervisor_pid"], signal.SIGKILL)
        killed_at = time.monotonic()
        code = follower.wait_exit(10)
        print(f"kill -9 supervisor → attach ended in {time.monotonic() - killed_at:.2f} s")
        assert code == 1, follower.tail
        out = follower.text
        assert f"LOST {job.id}" in out and LOST_ERROR in out
        assert f"its worker (pid {status['worker_pid']}) may still be running" in out
        assert f"step {STEPS // 2}/{STEPS}" in out  # the worker's last lines

    assert job.effective_state() == "lost"
    summary = {s["id"]: s for s in Store().sync()}[job.id]
    assert summary["state"] == "lost" and summary["error"] == LOST_ERROR
    assert [e["state"] for e in _ends(job)] == ["lost"]  # written once, by the follower; sync added none
    assert _alive(status["worker_pid"])  # nobody killed the orphan: its pid might not be ours any more

    again = run_nyx("attach", job.id, home=nyx_home, timeout=60)  # a later attach ends at once, the same way
    assert again.returncode == 1 and f"LOST {job.id}" in again.stdout and LOST_ERROR in again.stdout


# ------------------------------------------------------------------- stop and save_now in real training


# Loads a training state the way a resume will: the same model, adapter, optimizer and schedule,
# registered in the engine's order, then `load_state(strict=False)` (the state holds only the LoRA).
LOAD_STATE = """
import json, sys
import torch
from accelerate import Accelerator
from diffusers.optimization import get_scheduler
from safetensors.torch import load_file
from nyx_tui.config.io import load_config
from nyx_tui.trainers.native import models
from nyx_tui.trainers.native.engine import SeededGenerators, keep_trainable_weights

cfg = load_config(sys.argv[1])
state_dir = sys.argv[2]
model = models.load_sd15(cfg.model.pretrained)
models.freeze(model)
params = models.add_unet_lora(model.unet, cfg.network)
for p in params:
    p.data = p.data.float()
optimizer = torch.optim.AdamW(params, lr=cfg.optimizer.learning_rate)
schedule = get_scheduler(cfg.scheduler.type.value, optimizer, num_warmup_steps=cfg.scheduler.warmup_steps,
                         num_training_steps=cfg.training.max_steps)
accelerator = Accelerator(cpu=True)
unet, optimizer = accelerator.prepare(model.unet, optimizer)
accelerator.register_for_checkpointing(schedule, SeededGenerators(data=torch.Generator(), noise=torch.Generator()))
accelerator.register_save_state_pre_hook(keep_trainable_weights)
accelerator.load_state(state_dir, strict=False)
saved = load_file(state_dir + "/model.safetensors")
named = {n: p for n, p in unet.named_parameters() if p.requires_grad}
print(json.dumps({
    "keys_are_the_lora": sorted(saved) == sorted(named),
    "loaded": all(torch.equal(saved[n], named[n].detach()) for n in named),
    "optimizer_steps": sorted({int(s["step"]) for s in optimizer.state_dict()["state"].values()}),
    "schedule_step": schedule.last_epoch,
}))
"""


def _states(job: JobDir) -> list[dict[str, Any]]:
    return [e for e in job.events() if e["kind"] == "artifact" and e["what"] == "state"]


def _acks(job: JobDir) -> list[str]:
    return [e["ack"] for e in job.events() if e["kind"] == "log" and "ack" in e]


def _check_state(job: JobDir, state: dict[str, Any], lora: dict[str, Any]) -> None:
    folder = Path(state["path"])
    assert folder.parent == job.output_dir and folder.name == Path(lora["path"]).stem + "-state"
    names = {p.name for p in folder.iterdir()}
    assert {"model.safetensors", "optimizer.bin", "random_states_0.pkl", "nyx_state.json"} <= names, names
    assert {"custom_checkpoint_0.pkl", "custom_checkpoint_1.pkl"} <= names  # the schedule, the generators
    info = json.loads((folder / "nyx_state.json").read_text())
    assert info["step"] == state["step"] == lora["step"] and info["lora"] == lora["path"] and info["epoch"] >= 1
    loaded = subprocess.run(
        [sys.executable, "-c", LOAD_STATE, str(job.config_path), str(folder)], capture_output=True, text=True
    )
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    facts = json.loads(loaded.stdout.strip().splitlines()[-1])
    assert facts == {
        "keys_are_the_lora": True,
        "loaded": True,
        "optimizer_steps": [state["step"]],
        "schedule_step": state["step"],
    }


def _train(assets: dict[str, Path], steps: int) -> JobDir:
    cfg = make_config(assets, training={"max_steps": steps}, saving={"every_n_steps": 0})
    job = create_training_job(cfg)
    _start(job)
    wait_for(lambda: len(steps_of(job)) >= 3, timeout=120)
    return job


@pytest.mark.slow
def test_stop_in_real_training_saves_a_lora_and_a_training_state(nyx_home: Path, assets: dict[str, Path]) -> None:
    job = _train(assets, steps=100_000)
    send(job.control_path, "stop")
    wait_for(lambda: job.effective_state() in TERMINAL, timeout=60)
    (end,) = _ends(job)
    assert end["state"] == "cancelled" and end["reason"] == "stopped on request", end
    assert end["exit_code"] == 0 and "signal" not in end  # it obeyed: no signal was needed
    last = steps_of(job)[-1]["step"]
    (lora,) = loras_of(job)
    (state,) = _states(job)
    assert Path(lora["path"]).name == "demo.safetensors" and Path(lora["path"]).is_file()
    assert lora["step"] == state["step"] == last < 100_000
    _check_state(job, state, lora)
    assert _acks(job) == ["stop"]


@pytest.mark.slow
def test_save_now_saves_without_stopping_and_the_run_finishes(nyx_home: Path, assets: dict[str, Path]) -> None:
    total = 150
    job = _train(assets, steps=total)
    send(job.control_path, "save_now")
    wait_for(lambda: job.effective_state() in TERMINAL, timeout=120)
    (end,) = _ends(job)
    assert end["state"] == "finished" and end["exit_code"] == 0, end
    assert [e["step"] for e in steps_of(job)] == list(range(1, total + 1))  # it went on to the end
    (early, final) = loras_of(job)
    (early_state, final_state) = _states(job)
    assert 3 <= early["step"] < total and Path(early["path"]).name == f"demo-step{early['step']:06d}.safetensors"
    assert final["step"] == total and Path(final["path"]).name == "demo.safetensors"
    assert Path(early["path"]).is_file() and Path(final["path"]).is_file()
    assert early_state["step"] == early["step"] and final_state["step"] == total
    _check_state(job, early_state, early)
    assert _acks(job) == ["save_now"]
    (ack,) = [e for e in job.events() if e.get("ack") == "save_now"]
    assert ack["level"] == "info" and f"step {early['step']}" in ack["message"]
