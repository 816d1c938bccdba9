"""The queue and its scheduler, the history in the store, and `nyx jobs` filters and clean-up.

Queued jobs are tiny `python -c` workers that record when they ran and which GPU they were given. They
are queued from a short-lived subprocess, so the scheduler that runs them has no TUI or CLI behind it.
"""

from __future__ import annotations

import itertools
import json
import os
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import run_nyx, wait_for

from nyx_tui.jobs.events import EventWriter
from nyx_tui.jobs.jobdir import TERMINAL, JobDir, create_job, list_jobs
from nyx_tui.jobs.queue import Queue, cancel_queued
from nyx_tui.jobs.scheduler import Scheduler, scheduler_running
from nyx_tui.jobs.store import COLUMNS, Store, job_summary, select

WORKER = textwrap.dedent(
    """
    import json, os, sys, time
    out, name, secs = sys.argv[1], sys.argv[2], float(sys.argv[3])
    t0 = time.time()
    time.sleep(secs)
    with open(os.path.join(out, name + ".json"), "w") as f:
        json.dump({"start": t0, "end": time.time(), "cvd": os.environ.get("CUDA_VISIBLE_DEVICES")}, f)
    """
)


def _queue_jobs(home: Path, marks: Path, jobs: list[tuple[str, float, str]], gpus: str = "none") -> list[str]:
    """Create and enqueue jobs from a subprocess that exits at once; return their ids in queue order."""
    code = textwrap.dedent(
        f"""
        import json, sys
        from nyx_tui.jobs.jobdir import create_job
        from nyx_tui.jobs.queue import enqueue
        ids = []
        for name, secs, resource in {jobs!r}:
            argv = [sys.executable, "-c", {WORKER!r}, {str(marks)!r}, name, str(secs)]
            job = create_job("tag", name, argv, extra={{"queue": True, "resource": resource}})
            enqueue(job)
            ids.append(job.id)
        print(json.dumps(ids))
        """
    )
    env = {**os.environ, "NYX_HOME": str(home), "NYX_GPUS": gpus}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return list(json.loads(out.stdout.strip().splitlines()[-1]))


def _marks(marks: Path) -> dict[str, dict[str, Any]]:
    return {p.stem: json.loads(p.read_text()) for p in marks.glob("*.json")}


def _ended(ids: list[str], timeout: float = 60) -> list[JobDir]:
    jobs = [j for j in list_jobs() if j.id in ids]
    wait_for(lambda: all(j.effective_state() in TERMINAL for j in jobs), timeout=timeout)
    return jobs


@pytest.fixture
def marks(tmp_path: Path) -> Path:
    path = tmp_path / "marks"
    path.mkdir()
    return path


def test_three_queued_jobs_run_one_after_another_with_nobody_watching(nyx_home: Path, marks: Path) -> None:
    ids = _queue_jobs(nyx_home, marks, [("a", 1.0, "gpu"), ("b", 1.0, "gpu"), ("c", 1.0, "gpu")])
    jobs = _ended(ids)
    assert [j.effective_state() for j in jobs] == ["finished"] * 3
    runs = _marks(marks)
    order = sorted(runs, key=lambda n: runs[n]["start"])
    assert order == ["a", "b", "c"]
    for first, second in itertools.pairwise(order):
        assert runs[second]["start"] >= runs[first]["end"], "two GPU jobs shared the only slot"
    assert all(r["cvd"] is None for r in runs.values())  # a CPU box: nothing to assign
    assert all(j.status().get("gpu_slot") == "cpu" for j in jobs)
    assert any("started from the queue" in str(e.get("message")) for e in jobs[0].events())
    wait_for(lambda: not scheduler_running(), timeout=10)  # idle: it exits
    assert Queue().entries() == []


def test_a_cancelled_queued_job_never_starts_and_moves_reorder(nyx_home: Path, marks: Path) -> None:
    ids = _queue_jobs(nyx_home, marks, [("a", 2.0, "gpu"), ("b", 0.2, "gpu"), ("c", 0.2, "gpu"), ("d", 0.2, "gpu")])
    a, b, c, d = (JobDir(nyx_home / "jobs" / i) for i in ids)
    wait_for(lambda: a.status().get("state") in ("starting", "running"), timeout=20)
    cancelled = run_nyx("queue", "cancel", b.id, home=nyx_home)
    assert cancelled.returncode == 0, cancelled.stderr
    moved = run_nyx("queue", "move", d.id, "top", home=nyx_home)
    assert moved.returncode == 0 and "number 1 of 2" in moved.stderr, moved.stderr
    listing = json.loads(run_nyx("queue", "--json", home=nyx_home).stdout)
    assert [w["id"] for w in listing["waiting"]] == [d.id, c.id]
    assert [r["id"] for r in listing["running"]] == [a.id]
    _ended(ids)
    runs = _marks(marks)
    assert "b" not in runs, "a cancelled queued job started"
    assert b.effective_state() == "cancelled"
    assert [e["state"] for e in b.events() if e["kind"] == "end"] == ["cancelled"]
    assert runs["d"]["start"] < runs["c"]["start"]
    assert b.status().get("started") is None  # no supervisor ever took it


def test_gpu_jobs_get_a_gpu_each_and_cpu_jobs_run_beside(nyx_home: Path, marks: Path) -> None:
    ids = _queue_jobs(
        nyx_home,
        marks,
        [("g1", 1.5, "gpu"), ("g2", 1.5, "gpu"), ("g3", 0.5, "gpu"), ("dl", 0.5, "cpu")],
        gpus="0,1",
    )
    _ended(ids)
    runs = _marks(marks)
    assert {runs["g1"]["cvd"], runs["g2"]["cvd"]} == {"0", "1"}
    assert runs["g1"]["start"] < runs["g2"]["end"] and runs["g2"]["start"] < runs["g1"]["end"]  # together
    assert runs["g3"]["start"] >= min(runs["g1"]["end"], runs["g2"]["end"])  # waited for a free GPU
    assert runs["dl"]["cvd"] is None and runs["dl"]["start"] < runs["g1"]["end"]  # beside them


def test_a_directly_started_gpu_job_holds_a_slot(nyx_home: Path) -> None:
    job = create_job("train", "direct", [sys.executable, "-c", "pass"], extra={"resource": "gpu"})
    fd = job.try_lock()
    assert fd is not None
    try:
        job.write_status(state="running")
        assert Scheduler(slots=["0", "1"], cpu_limit=1).occupancy() == (["1"], 0)
        job.write_status(gpu_slot="1")
        assert Scheduler(slots=["0", "1"], cpu_limit=1).occupancy() == (["0"], 0)
    finally:
        os.close(fd)


def test_a_multi_gpu_job_waits_for_enough_gpus_and_holds_them_all(
    nyx_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`gpus: 2` (training.num_processes = 2): not started while one GPU is busy; started on both once they
    are free, and then counted as holding both."""
    busy = create_job("train", "busy", [sys.executable, "-c", "pass"], extra={"resource": "gpu"})
    fd = busy.try_lock()
    assert fd is not None
    busy.write_status(state="running", gpu_slot="0")
    two = create_job("train", "two", [sys.executable, "-c", "pass"], extra={"queue": True, "gpus": 2})
    Queue().add(two)
    started: list[tuple[str, str | None]] = []
    monkeypatch.setattr(Scheduler, "_start", lambda self, job, slot: started.append((job.id, slot)) or True)
    sched = Scheduler(slots=["0", "1"], cpu_limit=1)
    try:
        assert sched.occupancy() == (["1"], 0)
        sched.tick()
        assert started == []  # one free GPU is not enough
    finally:
        busy.write_status(state="finished")
        os.close(fd)
    sched.tick()
    assert started == [(two.id, "0,1")]
    two_fd = two.try_lock()
    assert two_fd is not None
    try:
        two.write_status(state="running", gpu_slot="0,1")
        assert Scheduler(slots=["0", "1", "2"], cpu_limit=1).occupancy() == (["2"], 0)
    finally:
        os.close(two_fd)


def test_cancel_queued_refuses_a_job_a_supervisor_holds(nyx_home: Path) -> None:
    job = create_job("tag", "held", [sys.executable, "-c", "pass"], extra={"queue": True})
    Queue().add(job)
    fd = job.try_lock()
    try:
        assert cancel_queued(job) is False
    finally:
        assert fd is not None
        os.close(fd)
    assert cancel_queued(job) is True
    assert job.status()["state"] == "cancelled" and Queue().entries() == []
    assert cancel_queued(job) is False  # once


def test_stop_on_a_queued_job_cancels_it(nyx_home: Path) -> None:
    job = create_job("tag", "waiting", [sys.executable, "-c", "pass"], extra={"queue": True})
    Queue().add(job)
    out = run_nyx("stop", job.id, home=nyx_home)
    assert out.returncode == 0 and "had not started" in out.stderr, out.stderr
    assert job.effective_state() == "cancelled"


def test_the_queue_is_rebuilt_from_the_job_folders(nyx_home: Path) -> None:
    first = create_job("tag", "one", [sys.executable, "-c", "pass"], extra={"queue": True})
    second = create_job("download", "two", [sys.executable, "-c", "pass"], extra={"queue": True})
    create_job("tag", "not-queued", [sys.executable, "-c", "pass"])
    assert Queue().rebuild() == 2
    entries = Queue().entries()
    assert [(e.id, e.resource) for e in entries] == [(first.id, "gpu"), (second.id, "cpu")]
    with pytest.raises(ValueError, match="top, bottom"):
        Queue().move(first.id, "sideways")


def _fake_run(job: JobDir, steps: int, lora: Path | None = None) -> None:
    """Events and status as a finished training run leaves them (no supervisor needed)."""
    with EventWriter(job.events_path) as ev:
        ev.emit("start", job=job.id, job_kind="train", total_steps=steps)
        for i in range(1, steps + 1):
            ev.emit("step", step=i, total=steps, epoch=1, loss=1.0 / i, loss_avg=2.0 / i, lr=[1e-4], it_s=1.0, eta_s=0)
        if lora is not None:
            lora.parent.mkdir(parents=True, exist_ok=True)
            lora.write_bytes(b"x")
            ev.emit("artifact", path=str(lora), what="lora", step=steps)
        ev.emit("end", state="finished")
    job.write_status(state="finished", started=100.0, ended=160.5, exit_code=0)


def test_history_keeps_family_backend_hash_steps_loss_duration(nyx_home: Path) -> None:
    toml = '[model]\nfamily = "sdxl"\npretrained = "x"\n'
    job = create_job("train", "hist", ["true"], config_toml=toml, extra={"backend": "native"})
    _fake_run(job, 2000, job.output_dir / "a.safetensors")
    summary = job_summary(job)
    assert set(COLUMNS) <= set(summary)
    assert summary["family"] == "sdxl" and summary["backend"] == "native"
    assert summary["config_hash"] and len(summary["config_hash"]) == 16
    assert summary["steps"] == 2000 and summary["final_loss"] == pytest.approx(2.0 / 2000)
    assert summary["duration"] == pytest.approx(60.5)
    assert summary["scan_offset"] == job.events_path.stat().st_size
    assert [a["what"] for a in summary["artifacts"]] == ["lora"]
    [row] = Store().sync()
    assert row["steps"] == 2000 and row["family"] == "sdxl" and row["artifacts"] == summary["artifacts"]


def test_store_scans_a_running_log_incrementally(nyx_home: Path) -> None:
    job = create_job("train", "grow", ["true"])
    job.write_status(state="running")
    fd = job.try_lock()  # a live supervisor
    try:
        with EventWriter(job.events_path) as ev:
            ev.emit("step", step=1, total=9, epoch=1, loss=0.5, loss_avg=0.5, lr=[1], it_s=1, eta_s=1)
            ev.emit("artifact", path="/x/a.safetensors", what="lora", step=1)
        first = Store().sync()[0]
        assert first["steps"] == 1 and len(first["artifacts"]) == 1
        with open(job.events_path, "ab") as f:  # a torn line: not read until complete
            f.write(b'{"v":1,"t":1,"kind":"step","step":2,"total":9,"epoch":1,"loss":0.4,"loss_avg":0.4')
        second = Store().sync()[0]
        assert second["steps"] == 1 and second["scan_offset"] == first["scan_offset"]
        with open(job.events_path, "ab") as f:
            f.write(b',"lr":[1],"it_s":1,"eta_s":1}\n')
        with EventWriter(job.events_path) as ev:
            ev.emit("artifact", path="/x/b.safetensors", what="lora", step=2)
        third = Store().sync()[0]
        assert third["steps"] == 2 and [a["path"] for a in third["artifacts"]] == [
            "/x/a.safetensors",
            "/x/b.safetensors",
        ]
    finally:
        assert fd is not None
        os.close(fd)


def test_an_older_index_gains_the_new_columns(nyx_home: Path) -> None:
    db = nyx_home / "nyx.db"
    with sqlite3.connect(db) as con:
        con.execute(
            "CREATE TABLE jobs (id TEXT PRIMARY KEY, kind TEXT NOT NULL, name TEXT NOT NULL, dir TEXT NOT NULL,"
            " state TEXT NOT NULL, created REAL, started REAL, ended REAL, exit_code INTEGER, signal TEXT,"
            " error TEXT, hint TEXT, artifacts TEXT NOT NULL DEFAULT '[]')"
        )
        con.execute(
            "INSERT INTO jobs (id, kind, name, dir, state) VALUES ('old', 'train', 'old', '/nowhere', 'finished')"
        )
    job = create_job("train", "new", ["true"])
    _fake_run(job, 3)
    rows = Store().sync()
    assert [r["id"] for r in rows] == [job.id]  # the old row's folder is gone: dropped
    assert rows[0]["steps"] == 3


def test_select_filters_by_state_and_kind() -> None:
    jobs = [
        {"state": "failed", "kind": "train"},
        {"state": "finished", "kind": "train"},
        {"state": "failed", "kind": "tag"},
    ]
    assert select(jobs, ["failed"], ["train"]) == [jobs[0]]
    assert select(jobs, [], ["tag"]) == [jobs[2]]
    assert select(jobs) == jobs


def _ended_job(
    name: str, state: str, kind: str = "train", lora_inside: bool = False, lora_outside: Path | None = None
) -> JobDir:
    job = create_job(kind, name, ["true"])
    with EventWriter(job.events_path) as ev:
        if lora_inside:
            path = job.output_dir / "x.safetensors"
            path.parent.mkdir()
            path.write_bytes(b"x")
            ev.emit("artifact", path=str(path), what="lora")
        if lora_outside is not None:
            lora_outside.write_bytes(b"x")
            ev.emit("artifact", path=str(lora_outside), what="lora")
        ev.emit("end", state=state)
    job.write_status(state=state, ended=time.time() - 3 * 86400)
    return job


def test_jobs_filters_and_clean_never_touches_running_jobs_or_artifacts_unasked(nyx_home: Path, tmp_path: Path) -> None:
    failed = _ended_job("failed", "failed")
    kept = _ended_job("with-lora", "finished", lora_inside=True)
    outside = tmp_path / "mine.safetensors"
    elsewhere = _ended_job("lora-elsewhere", "finished", lora_outside=outside)
    tagged = _ended_job("tagger", "failed", kind="tag")
    running = create_job("train", "running", ["true"])
    running.write_status(state="running")
    fd = running.try_lock()
    try:
        listed = json.loads(run_nyx("jobs", "--json", "--state", "failed", "--kind", "train", home=nyx_home).stdout)
        assert [j["id"] for j in listed] == [failed.id]
        bad = run_nyx("jobs", "--state", "sleeping", home=nyx_home)
        assert bad.returncode == 2 and "unknown state sleeping" in bad.stderr
        refused = run_nyx("jobs", "clean", "--state", "running", home=nyx_home)
        assert refused.returncode == 2 and "never cleaned" in refused.stderr
        no_yes = run_nyx("jobs", "clean", home=nyx_home, stdin=subprocess.DEVNULL)
        assert no_yes.returncode == 1 and "without a yes" in no_yes.stderr
        assert failed.path.exists()
        young = run_nyx("jobs", "clean", "--older-than", "7d", "--yes", home=nyx_home)
        assert "nothing to clean" in young.stderr and failed.path.exists()
        dry = run_nyx("jobs", "clean", "--dry-run", home=nyx_home)
        assert "would delete" in dry.stderr and failed.path.exists()
        done = run_nyx("jobs", "clean", "--older-than", "2d", "--kind", "train", "--yes", home=nyx_home)
        assert done.returncode == 0, done.stderr
        assert f"kept {kept.id}" in done.stderr and "--with-artifacts" in done.stderr
        assert not failed.path.exists() and not elsewhere.path.exists()
        assert outside.exists(), "a LoRA outside the job folder must survive its job's clean-up"
        assert kept.path.exists() and tagged.path.exists() and running.path.exists()
        both = run_nyx("jobs", "clean", "--with-artifacts", "--yes", home=nyx_home)
        assert both.returncode == 0 and not kept.path.exists() and not tagged.path.exists()
        assert running.path.exists()
        assert {j["id"] for j in Store().all()} == {running.id}
    finally:
        assert fd is not None
        os.close(fd)
