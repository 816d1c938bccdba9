"""Jobs: the event log, the supervisor's endings, stopping, detaching, losing a supervisor, the store.

Workers are tiny `python -c` scripts; every test has its own NYX_HOME (the `nyx_home` fixture).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import wait_for

from nyx_tui.jobs.control import send
from nyx_tui.jobs.events import EventTail, EventWriter, read_events
from nyx_tui.jobs.jobdir import TERMINAL, JobDir, create_job
from nyx_tui.jobs.launch import spawn_supervisor, supervisor_env, wait_started
from nyx_tui.jobs.store import COLUMNS, LOST_ERROR, Store, job_summary
from nyx_tui.jobs.supervisor import CUDA_OOM_HINT, CUDA_OOM_HINT_MODEL, OOM_KILL_HINT, OutputTail


def _job(code: str, kind: str = "tag", **extra: Any) -> JobDir:
    return create_job(kind, "test", [sys.executable, "-c", textwrap.dedent(code)], extra=extra or None)


def _run(job: JobDir, timeout: float = 30) -> dict[str, Any]:
    """Start the job detached, wait for its end, return the (single) end event."""
    spawn_supervisor(job)
    wait_started(job)
    wait_for(lambda: job.effective_state() in TERMINAL, timeout=timeout)
    ends = [e for e in job.events() if e["kind"] == "end"]
    assert len(ends) == 1, ends
    return ends[0]


def _running(job: JobDir) -> None:
    wait_for(lambda: job.status().get("state") == "running", timeout=15)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _parent_pid(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


# ---------------------------------------------------------------------------------------- events


def test_event_writer_reader_and_tail_skip_a_torn_last_line(nyx_home: Path) -> None:
    path = nyx_home / "events.jsonl"
    tail = EventTail(path)
    assert tail.poll() == [] and read_events(path) == []
    with EventWriter(path) as w:
        w.emit("start", job="j", job_kind="train", total_steps=10)
        w.emit("step", step=1, total=10, epoch=0, loss=0.5, loss_avg=0.5, lr=[1e-4], it_s=2.0, eta_s=4.5)
    with open(path, "ab") as f:
        f.write(b'{"v":1,"t":1.0,"kind":"log","level":"info","mes')  # a writer killed mid-line
    assert [e["kind"] for e in read_events(path)] == ["start", "step"]
    assert [e["kind"] for e in tail.poll()] == ["start", "step"]
    assert tail.poll() == []
    with open(path, "ab") as f:
        f.write(b'sage":"done"}\n')
    assert [(e["kind"], e["message"]) for e in tail.poll()] == [("log", "done")]
    assert [e["kind"] for e in read_events(path)] == ["start", "step", "log"]
    assert all(e["v"] == 1 and isinstance(e["t"], float) for e in read_events(path))


def test_output_tail_collapses_progress_redraws_and_survives_split_reads() -> None:
    tail = OutputTail(maxlen=5)
    data = "loading\r\n" + "".join(f"\rsteps {i}%" for i in range(100)) + "\nsaved é\n\x1b[31mred\x1b[0m\nlast"
    raw = data.encode()
    for i in range(0, len(raw), 3):  # splits \r\n pairs and the two bytes of é
        tail.feed(raw[i : i + 3])
    tail.close()
    assert list(tail.lines) == ["loading", "steps 99%", "saved é", "red", "last"]


# ---------------------------------------------------------------------------------------- endings


def test_exit_0_finishes(nyx_home: Path) -> None:
    job = _job("print('hello')")
    end = _run(job)
    assert end["state"] == "finished" and end["exit_code"] == 0
    assert end["last_lines"] == ["hello"]
    status = job.status()
    assert status["state"] == "finished" and status["exit_code"] == 0 and status["error"] is None
    assert status["supervisor_pid"] and status["worker_pid"] and status["started"] <= status["ended"]
    assert job.log_path.read_text() == "hello\n"


def test_exit_3_fails_with_the_last_lines(nyx_home: Path) -> None:
    job = _job("""
        import sys
        for i in range(60):
            print(f"line {i}")
        print("boom", file=sys.stderr)
        sys.exit(3)
    """)
    end = _run(job)
    assert end["state"] == "failed" and end["exit_code"] == 3
    assert end["error"] == "worker exited with code 3"
    assert len(end["last_lines"]) == 40 and end["last_lines"][-1] == "boom"
    assert end["last_lines"][-2] == "line 59"
    assert job.status()["error"] == "worker exited with code 3"


def test_an_unexpected_sigkill_fails_with_the_oom_killer_hint(nyx_home: Path) -> None:
    job = _job("import os; print('allocating', flush=True); os.kill(os.getpid(), 9)")
    end = _run(job)
    assert end["state"] == "failed" and end["signal"] == "SIGKILL" and "exit_code" not in end
    assert "SIGKILL" in end["error"] and end["hint"] == OOM_KILL_HINT
    assert job.status()["signal"] == "SIGKILL"


@pytest.mark.parametrize(("kind", "hint"), [("train", CUDA_OOM_HINT), ("tag", CUDA_OOM_HINT_MODEL)])
def test_cuda_oom_gets_its_hint(nyx_home: Path, kind: str, hint: str) -> None:
    """Training gets the training advice (batch, checkpointing, resolution); a tagger or captioner its own."""
    job = _job(
        """
        import sys
        print("Traceback (most recent call last):")
        print("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB")
        sys.exit(1)
    """,
        kind=kind,
    )
    end = _run(job)
    assert end["state"] == "failed" and end["exit_code"] == 1
    assert end["error"] == "CUDA out of memory" and end["hint"] == hint


def test_a_missing_executable_fails_with_that_message(nyx_home: Path) -> None:
    job = create_job("tag", "test", ["/nonexistent/nyx-worker", "--x"])
    end = _run(job)
    assert end["state"] == "failed" and "/nonexistent/nyx-worker" in end["error"]


def test_a_train_job_without_a_lora_fails_and_with_one_finishes(nyx_home: Path) -> None:
    job = _job("print('No data found. Please verify arguments')", kind="train")
    end = _run(job)
    assert end["state"] == "failed" and end["error"] == "the trainer exited without saving a LoRA"

    saves = _job(
        """
        import json, time
        with open("events.jsonl", "a") as f:
            f.write(json.dumps({"v": 1, "t": time.time(), "kind": "artifact", "path": "out/a.safetensors",
                                "what": "lora", "step": 10}) + "\\n")
        """,
        kind="train",
    )
    assert _run(saves)["state"] == "finished"
    assert saves.artifacts() == [{"path": "out/a.safetensors", "what": "lora", "step": 10}]


def test_megabytes_of_carriage_returns_without_a_newline(nyx_home: Path) -> None:
    job = _job("""
        import sys
        for i in range(20000):
            sys.stdout.write(f"\\rsteps: {i:6d}/20000 [loss=0.1234]")
        sys.stdout.write("\\ndone\\n")
    """)
    end = _run(job)
    assert end["state"] == "finished"
    assert end["last_lines"] == ["steps:  19999/20000 [loss=0.1234]", "done"]
    assert job.log_path.stat().st_size > 64 * 1024 * 10


def test_children_left_behind_by_the_worker_are_ended(nyx_home: Path) -> None:
    job = _job("""
        import subprocess, sys
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        print(child.pid, flush=True)
    """)
    started = time.monotonic()
    end = _run(job)
    assert end["state"] == "finished"
    assert time.monotonic() - started < 5
    assert not _alive(int(end["last_lines"][0]))


def test_wait_started_fails_clearly(nyx_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    never = _job("pass")
    with pytest.raises(TimeoutError, match="did not start it within"):
        wait_started(never, timeout=0.3)
    broken = _job("pass")
    monkeypatch.setattr(sys, "executable", "/bin/false")  # the supervisor exits 1 at once
    spawn_supervisor(broken)
    with pytest.raises(TimeoutError, match="exited with code 1"):
        wait_started(broken, timeout=10)


# ---------------------------------------------------------------------------------------- stopping

OBEYING_WORKER = """
    import json, sys, time
    print("training", flush=True)
    while True:
        try:
            lines = open("control.jsonl").read().splitlines()
        except FileNotFoundError:
            lines = []
        if any(json.loads(line)["command"] == "stop" for line in lines):
            print("saving and exiting", flush=True)
            sys.exit(0)
        time.sleep(0.1)
"""


def test_stop_with_a_worker_that_obeys_is_cancelled(nyx_home: Path) -> None:
    job = _job(OBEYING_WORKER)
    spawn_supervisor(job)
    _running(job)
    send(job.control_path, "stop")
    wait_for(lambda: job.effective_state() in TERMINAL, timeout=15)
    (end,) = [e for e in job.events() if e["kind"] == "end"]
    assert end["state"] == "cancelled" and end["reason"] == "stopped on request"
    assert end["exit_code"] == 0 and "signal" not in end
    assert end["last_lines"][-1] == "saving and exiting"


@pytest.mark.parametrize(
    ("command", "code", "signal_name"),
    [
        # a plain Python worker dies of the first rung, SIGINT (KeyboardInterrupt)
        ("stop", "import time\nprint('busy', flush=True)\ntime.sleep(60)", "SIGINT"),
        # one that ignores SIGINT and SIGTERM needs the whole ladder
        (
            "cancel",
            "import signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\n"
            "signal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint('deaf', flush=True)\ntime.sleep(60)",
            "SIGKILL",
        ),
    ],
    ids=["stop-sleeping-worker", "cancel-deaf-worker"],
)
def test_a_worker_that_ignores_the_request_is_signalled(
    nyx_home: Path, command: str, code: str, signal_name: str
) -> None:
    job = _job(code, stop_grace_s=0.5, cancel_grace_s=0.5, signal_step_s=0.5)
    spawn_supervisor(job)
    _running(job)
    wait_for(lambda: job.log_path.exists() and job.log_path.read_text(), timeout=10)
    worker = job.status()["worker_pid"]
    send(job.control_path, command)
    wait_for(lambda: job.effective_state() in TERMINAL, timeout=15)
    (end,) = [e for e in job.events() if e["kind"] == "end"]
    assert end["state"] == "cancelled"
    assert end["reason"] == ("stopped on request" if command == "stop" else "cancelled on request")
    assert end["signal"] == signal_name and "hint" not in end
    assert not _alive(worker)


def test_sigterm_to_the_supervisor_cancels_the_job(nyx_home: Path) -> None:
    job = _job("import time\nprint('busy', flush=True)\ntime.sleep(60)")
    spawn_supervisor(job)
    _running(job)
    os.kill(job.status()["supervisor_pid"], signal.SIGTERM)
    wait_for(lambda: job.effective_state() in TERMINAL, timeout=15)
    (end,) = [e for e in job.events() if e["kind"] == "end"]
    assert end["state"] == "cancelled" and "SIGTERM" in end["reason"]


def test_a_job_cancelled_while_queued_never_starts_its_worker(nyx_home: Path) -> None:
    marker = nyx_home / "ran"
    job = _job(f"open({str(marker)!r}, 'w').close()")
    send(job.control_path, "cancel")
    end = _run(job)
    assert end["state"] == "cancelled" and not marker.exists()
    assert job.status().get("worker_pid") is None


# ---------------------------------------------------------------------------------------- detached


def test_the_job_outlives_its_launcher(nyx_home: Path) -> None:
    job = _job("import time\ntime.sleep(1.5)\nprint('done')")
    launcher = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys\nfrom pathlib import Path\nfrom nyx_tui.jobs.jobdir import JobDir\n"
            "from nyx_tui.jobs.launch import spawn_supervisor\n"
            "import os\nprint(os.getpid(), spawn_supervisor(JobDir(Path(sys.argv[1]))))",
            str(job.path),
        ],
        env=supervisor_env(),
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    launcher_pid, sup_pid = map(int, launcher.stdout.split())
    wait_started(job)
    assert job.effective_state() not in TERMINAL and job.supervisor_alive()
    assert os.getsid(sup_pid) == sup_pid  # its own session: no terminal, no SIGHUP
    assert _parent_pid(sup_pid) != launcher_pid and _parent_pid(sup_pid) != os.getpid()
    wait_for(lambda: job.effective_state() in TERMINAL, timeout=15)
    assert job.effective_state() == "finished"
    assert job.status()["supervisor_pid"] == sup_pid


def test_a_killed_supervisor_makes_the_job_lost_and_sync_ends_it_once(nyx_home: Path) -> None:
    job = _job("import time\nprint('working', flush=True)\ntime.sleep(60)")
    spawn_supervisor(job)
    _running(job)
    status = job.status()
    try:
        os.kill(status["supervisor_pid"], signal.SIGKILL)
        wait_for(lambda: job.effective_state() == "lost", timeout=10)
        assert job.status()["state"] == "running"  # nothing wrote it yet: the lock said so
        store = Store()
        first = {s["id"]: s for s in store.sync()}[job.id]
        again = {s["id"]: s for s in store.sync()}[job.id]
        assert first["state"] == again["state"] == "lost"
        assert first["error"] == LOST_ERROR
        ends = [e for e in job.events() if e["kind"] == "end"]
        assert len(ends) == 1 and ends[0]["state"] == "lost" and ends[0]["error"] == LOST_ERROR
        assert job.status()["state"] == "lost"
        # a supervisor started late does not revive it
        late = subprocess.run(
            [sys.executable, "-m", "nyx_tui.jobs.supervisor", str(job.path)], env=supervisor_env(), timeout=30
        )
        assert late.returncode == 3 and job.status()["state"] == "lost"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(status["worker_pid"], signal.SIGKILL)  # the orphaned worker


def test_a_second_supervisor_exits_3_without_touching_the_job(nyx_home: Path) -> None:
    job = _job("import time\ntime.sleep(60)", cancel_grace_s=0.2)
    spawn_supervisor(job)
    _running(job)
    before = job.status_path.read_bytes()
    second = subprocess.run(
        [sys.executable, "-m", "nyx_tui.jobs.supervisor", str(job.path)],
        env=supervisor_env(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert second.returncode == 3, second.stderr
    assert "already supervised" in second.stderr
    assert job.status_path.read_bytes() == before and job.effective_state() == "running"
    send(job.control_path, "cancel")
    wait_for(lambda: job.effective_state() in TERMINAL, timeout=20)


# ---------------------------------------------------------------------------------------- secrets, store


def test_secrets_are_redacted_in_the_spec_but_reach_the_worker(nyx_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "hf_s3cr3t_do_not_log"
    monkeypatch.setenv("HF_TOKEN", secret)
    digest = hashlib.sha256(secret.encode()).hexdigest()  # the worker's argv must not hold the secret
    code = (
        "import hashlib, os, sys\n"
        "token = os.environ.get('HF_TOKEN', '').encode()\n"
        f"ok = hashlib.sha256(token).hexdigest() == {digest!r} and os.environ.get('NYX_TEST_PLAIN') == 'visible'\n"
        "print('token ok' if ok else 'token missing')\nsys.exit(0 if ok else 5)"
    )
    job = create_job(
        "download", "secret", [sys.executable, "-c", code], env={"HF_TOKEN": secret, "NYX_TEST_PLAIN": "visible"}
    )
    spec = json.loads(job.spec_path.read_text())
    assert spec["env"] == {"HF_TOKEN": "<redacted>", "NYX_TEST_PLAIN": "visible"}
    end = _run(job)
    assert end["state"] == "finished", end
    for path in (job.spec_path, job.status_path, job.events_path, job.log_path, Store().path):
        assert secret not in path.read_text(errors="replace"), path


def test_store_summary_keys_artifacts_get_and_deleted_dirs(nyx_home: Path) -> None:
    job = _job(
        """
        from nyx_tui.jobs.events import EventWriter
        with EventWriter("events.jsonl") as w:
            w.emit("artifact", path="output/x.safetensors", what="lora", step=5)
            w.emit("artifact", path="output/config.toml", what="config")
        """,
        kind="train",
    )
    queued = job_summary(job)
    assert set(COLUMNS) - {"hint"} <= set(queued) and queued["state"] == "queued"
    end = _run(job)
    assert end["state"] == "finished"
    summary = job_summary(job)
    required = [
        "id",
        "kind",
        "name",
        "state",
        "dir",
        "created",
        "started",
        "ended",
        "exit_code",
        "signal",
        "error",
        "artifacts",
    ]
    assert set(required) <= set(summary)
    assert summary["artifacts"] == [
        {"path": "output/x.safetensors", "what": "lora", "step": 5},
        {"path": "output/config.toml", "what": "config"},
    ]
    store = Store()
    assert store.path == nyx_home / "nyx.db"
    row = store.get(job.id)  # the supervisor recorded it
    assert row is not None and row["state"] == "finished" and row["artifacts"] == summary["artifacts"]
    # a stale non-terminal summary never overwrites an ended row
    store.upsert({**summary, "state": "running"})
    assert store.get(job.id)["state"] == "finished"  # type: ignore[index]

    other = _job("pass")  # queued, never started
    listed = store.sync()
    assert [s["id"] for s in listed] == sorted([job.id, other.id])
    assert {s["id"]: s["state"] for s in listed} == {job.id: "finished", other.id: "queued"}
    for f in other.path.iterdir():
        f.unlink()
    other.path.rmdir()
    assert [s["id"] for s in store.sync()] == [job.id]
    assert store.get(other.id) is None


def test_first_last_event_and_artifacts_read_only_what_they_need(nyx_home: Path) -> None:
    job = create_job("train", "long", ["true"])
    assert job.last_event("end") is None and job.first_event("step") is None and job.artifacts() == []
    with EventWriter(job.events_path) as ev:
        ev.emit("start", job=job.id, job_kind="train")
        for i in range(1, 20001):
            ev.emit("step", step=i, total=20000, epoch=1, loss=1.0, loss_avg=1.0 / i, lr=[1], it_s=1, eta_s=0)
            if i == 3:
                ev.emit("artifact", path="/a.safetensors", what="lora", step=3)
        ev.emit("end", state="finished")
        for _ in range(5000):  # > the first 64 KiB window: the search must widen
            ev.log("x" * 50)
    with open(job.events_path, "ab") as f:
        f.write(b'{"v":1,"t":1,"kind":"end","state":"torn')  # an incomplete last line is not an event
    first, last, end = job.first_event("step"), job.last_event("step"), job.last_event("end")
    assert first is not None and last is not None and end is not None
    assert (first["step"], last["step"], end["state"]) == (1, 20000, "finished")
    assert job.artifacts() == [{"path": "/a.safetensors", "what": "lora", "step": 3}]
