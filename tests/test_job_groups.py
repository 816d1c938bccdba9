"""A workflow or sweep in the job list: its stages (jobs whose spec names a `parent`) carry `parent` and `stage`
in the index and `nyx jobs --json`, an index written before those columns gains them (filled in from the
specs), and both `nyx jobs` and the home screen list each stage right under its orchestrator job, in the
order the stages were created, while selection, Enter and stop still act on the stage's own job."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import run_nyx
from textual.pilot import Pilot
from textual.widgets import DataTable

from nyx_tui.app import NyxApp
from nyx_tui.jobs.events import EventWriter
from nyx_tui.jobs.jobdir import JobDir, create_job
from nyx_tui.jobs.store import Store, group_jobs, job_summary
from nyx_tui.screens.home import HomeScreen

SIZE = (140, 32)
GONE = "19990101-000000-gone-sweep"


def make_jobs() -> dict[str, JobDir]:
    """Six real job dirs, created in this order (their ids sort the same way: the slugs rise too): a job of
    its own, a workflow, another job of its own, the workflow's two stages, and a stage whose sweep is gone."""
    jobs = {"base": create_job("train", "a-base", ["true"])}
    jobs["flow"] = create_job("workflow", "b-flow", ["true"])
    jobs["solo"] = create_job("train", "c-solo", ["true"])
    for key, name, stage in (("one", "d-stage-one", "1 low-res"), ("two", "e-stage-two", "2 hi-res")):
        jobs[key] = create_job("train", name, ["true"], extra={"parent": jobs["flow"].id, "stage": stage})
    jobs["orphan"] = create_job("train", "f-orphan", ["true"], extra={"parent": GONE, "stage": "trial 9"})
    now = time.time()
    for key, job in jobs.items():
        job.write_status(state="failed" if key == "solo" else "finished", started=now - 10, ended=now)
    assert [j.id for j in jobs.values()] == sorted(j.id for j in jobs.values())
    return jobs


# ------------------------------------------------------------------------------------------- the index


def test_summary_and_index_carry_parent_and_stage(nyx_home: Path) -> None:
    jobs = make_jobs()
    one = job_summary(jobs["one"])
    assert (one["parent"], one["stage"]) == (jobs["flow"].id, "1 low-res")
    assert (job_summary(jobs["flow"])["parent"], job_summary(jobs["flow"])["stage"]) == (None, None)
    rows = {r["id"]: r for r in Store().sync()}
    assert (rows[jobs["two"].id]["parent"], rows[jobs["two"].id]["stage"]) == (jobs["flow"].id, "2 hi-res")
    assert (rows[jobs["orphan"].id]["parent"], rows[jobs["orphan"].id]["stage"]) == (GONE, "trial 9")
    assert rows[jobs["base"].id]["parent"] is None and rows[jobs["base"].id]["stage"] is None
    stored = Store().get(jobs["one"].id)
    assert stored is not None and stored["stage"] == "1 low-res"

    proc = run_nyx("jobs", "--json", home=nyx_home)
    assert proc.returncode == 0, proc.stderr
    listed = {j["id"]: j for j in json.loads(proc.stdout)}
    assert {k: (listed[j.id]["parent"], listed[j.id]["stage"]) for k, j in jobs.items()} == {
        "base": (None, None),
        "flow": (None, None),
        "solo": (None, None),
        "one": (jobs["flow"].id, "1 low-res"),
        "two": (jobs["flow"].id, "2 hi-res"),
        "orphan": (GONE, "trial 9"),
    }


# The `jobs` table as Nyx wrote it before it knew of workflows.
OLD_SCHEMA = (
    "CREATE TABLE jobs (id TEXT PRIMARY KEY, kind TEXT NOT NULL, name TEXT NOT NULL, dir TEXT NOT NULL,"
    " state TEXT NOT NULL, created REAL, started REAL, ended REAL, exit_code INTEGER, signal TEXT, error TEXT,"
    " hint TEXT, artifacts TEXT NOT NULL DEFAULT '[]', family TEXT, backend TEXT, config_hash TEXT, steps INTEGER,"
    " final_loss REAL, duration REAL, scan_offset INTEGER NOT NULL DEFAULT 0)"
)


def test_an_index_from_before_workflows_gains_parent_and_stage(nyx_home: Path) -> None:
    flow = create_job("workflow", "b-flow", ["true"])
    one = create_job("train", "d-stage-one", ["true"], extra={"parent": flow.id, "stage": "1 low-res"})
    for job in (flow, one):
        job.write_status(state="finished", started=1.0, ended=2.0)
    lora = [{"path": "/x/lora.safetensors", "what": "lora", "step": 7}]
    with sqlite3.connect(nyx_home / "nyx.db") as con:
        con.execute(OLD_SCHEMA)
        insert = "INSERT INTO jobs (id, kind, name, dir, state, steps, final_loss, artifacts) VALUES (?,?,?,?,?,?,?,?)"
        # what the old index held; the folders' events are empty, so these values can only come from the db
        con.execute(insert, (flow.id, "workflow", "b-flow", str(flow.path), "finished", None, None, "[]"))
        con.execute(insert, (one.id, "train", "d-stage-one", str(one.path), "finished", 7, 0.5, json.dumps(lora)))
        con.execute(insert, ("20200101-000000-gone", "train", "gone", "/nowhere/gone", "finished", 1, 1.0, "[]"))
    con.close()

    store = Store()
    row = store.get(one.id)  # the first connection migrates
    assert row is not None
    assert (row["parent"], row["stage"]) == (flow.id, "1 low-res")  # filled from the spec: ended rows are not re-read
    assert (row["steps"], row["final_loss"], row["artifacts"]) == (7, 0.5, lora)  # the old row's facts are kept
    with sqlite3.connect(nyx_home / "nyx.db") as con:
        columns = [r[1] for r in con.execute("PRAGMA table_info(jobs)")]
    con.close()
    assert columns.count("parent") == 1 and columns.count("stage") == 1

    listed = Store().sync()  # a second connection: nothing left to migrate, and the gone folder's row is dropped
    assert [r["id"] for r in listed] == [flow.id, one.id]
    assert [(j["id"], depth) for j, depth in group_jobs(listed)] == [(flow.id, 0), (one.id, 1)]
    proc = run_nyx("jobs", "--json", home=nyx_home)
    assert proc.returncode == 0, proc.stderr
    assert [(j["id"], j["parent"], j["stage"]) for j in json.loads(proc.stdout)] == [
        (flow.id, None, None),
        (one.id, flow.id, "1 low-res"),
    ]


def test_grouping_keeps_every_job_even_with_odd_parents() -> None:
    jobs: list[dict[str, Any]] = [
        {"id": "5", "parent": "2", "created": 5.0},
        {"id": "4", "parent": "2", "created": 4.0},
        {"id": "3", "parent": "3"},  # its own parent: a job of its own
        {"id": "2"},
        {"id": "1", "parent": "0"},  # a loop: 1 under 0, 0 under 1
        {"id": "0", "parent": "1"},
    ]
    grouped = [(j["id"], depth) for j, depth in group_jobs(jobs)]
    assert grouped == [("3", 0), ("2", 0), ("4", 1), ("5", 1), ("1", 0), ("0", 1)]


# -------------------------------------------------------------------------------------------- nyx jobs


def table_lines(stdout: str, ids: dict[str, str]) -> list[tuple[str, bool]]:
    """(key of the job on the line, whether its id is prefixed with `└ `) for each job line of the table."""
    found = []
    for line in stdout.splitlines():
        keys = [key for key, job_id in ids.items() if job_id in line]
        if keys:
            assert len(keys) == 1, line
            found.append((keys[0], line.strip().startswith(f"└ {ids[keys[0]]}")))
    return found


def test_nyx_jobs_lists_stages_under_their_workflow(nyx_home: Path) -> None:
    jobs = make_jobs()
    ids = {key: job.id for key, job in jobs.items()}
    proc = run_nyx("jobs", home=nyx_home)
    assert proc.returncode == 0, proc.stderr
    assert table_lines(proc.stdout, ids) == [
        ("base", False),
        ("flow", False),
        ("one", True),
        ("two", True),
        ("solo", False),
        ("orphan", False),  # its sweep is gone: a job of its own
    ]
    # without the workflow in the list (a filter), its stages are jobs of their own again
    proc = run_nyx("jobs", "--kind", "train", home=nyx_home)
    assert proc.returncode == 0, proc.stderr
    assert table_lines(proc.stdout, ids) == [(k, False) for k in ("base", "solo", "one", "two", "orphan")]


# --------------------------------------------------------------------------------------------- the TUI


async def wait_until(pilot: Pilot[Any], predicate: Any, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        await pilot.pause(0.05)
    raise AssertionError("condition not met in time")


async def home_rows(pilot: Pilot[Any], count: int) -> HomeScreen:
    app = pilot.app
    await wait_until(pilot, lambda: isinstance(app.screen, HomeScreen) and len(app.screen.rows) >= count)
    await pilot.pause()
    screen = app.screen
    assert isinstance(screen, HomeScreen)
    return screen


def test_home_lists_stages_under_their_workflow_and_acts_on_them(
    nyx_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NYX_GPU", "none")  # the dashboard Enter opens must not probe for a GPU
    jobs = make_jobs()
    two = jobs["two"]
    two.write_status(state="running", ended=None)
    fd = two.try_lock()  # a live supervisor holds a running job's lock; this stands in for it
    assert fd is not None

    async def run() -> None:
        app = NyxApp(watch_terminal=False)
        async with app.run_test(size=SIZE) as pilot:
            screen = await home_rows(pilot, len(jobs))
            order = ["orphan", "solo", "flow", "one", "two", "base"]  # newest first; stages oldest first under it
            assert [r.id for r in screen.rows] == [jobs[k].id for k in order]
            table = screen.query_one("#jobs", DataTable)
            labels = [str(table.get_row_at(i)[0]) for i in range(table.row_count)]
            assert labels == [
                jobs["orphan"].id,
                jobs["solo"].id,
                jobs["flow"].id,
                "└ 1 low-res  d-stage-one",
                "└ 2 hi-res  e-stage-two",
                jobs["base"].id,
            ]
            assert "▶ running" in str(table.get_row(two.id)[2])

            # stop on a stage's row asks that stage's job
            table.move_cursor(row=order.index("two"), animate=False)
            await pilot.pause()
            assert screen.selected_job_id() == two.id
            await pilot.press("s")
            await wait_until(pilot, lambda: type(app.screen).__name__ == "ConfirmStop")
            await pilot.press("y")
            await wait_until(pilot, two.control_path.exists)
            assert json.loads(two.control_path.read_text().splitlines()[-1])["command"] == "stop"

            # a refresh keeps the selection on the stage; Enter opens the stage's own dashboard
            with EventWriter(two.events_path) as events:
                events.emit("step", step=3, total=10, epoch=1, loss=0.1, loss_avg=0.1, lr=[1e-4], it_s=1.0, eta_s=7.0)
            await wait_until(pilot, lambda: screen.rows[order.index("two")].progress == "3/10")
            await pilot.pause(0.1)
            assert screen.selected_job_id() == two.id
            table.move_cursor(row=order.index("one"), animate=False)
            await pilot.pause()
            await pilot.press("enter")
            await wait_until(pilot, lambda: app.current_mode == "train")
            assert app.current_job == jobs["one"].id

    try:
        asyncio.run(run())
    finally:
        os.close(fd)
