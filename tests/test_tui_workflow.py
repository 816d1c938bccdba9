"""The workflow/sweep view in the real app: opened instead of the dashboard for workflow and sweep jobs, it
shows the stages (or trials and the ranked table) from a hand-written workflow.json, follows the file as it
changes, and opens a child job's dashboard on Enter."""

from __future__ import annotations

import asyncio
import functools
import json
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest
from textual.pilot import Pilot
from textual.widgets import DataTable, Static

from nyx_tui.app import NyxApp
from nyx_tui.jobs.events import EventWriter
from nyx_tui.jobs.jobdir import JobDir, atomic_write
from nyx_tui.screens.home import HomeScreen
from nyx_tui.screens.workflow import WorkflowScreen

SIZE = (120, 32)
FIXED_T = 1_790_000_000.0


@pytest.fixture(autouse=True)
def _env(nyx_home: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("NYX_GPU", "none")
    monkeypatch.delenv("NO_COLOR", raising=False)
    yield


def run_async(fn: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        asyncio.run(fn(*args, **kwargs))

    return wrapper


def make_job(home: Path, job_id: str, kind: str, state: str, *, step: tuple[int, int] | None = None) -> JobDir:
    job = JobDir(home / "jobs" / job_id)
    job.path.mkdir(parents=True)
    spec = {"id": job_id, "kind": kind, "name": job_id, "argv": ["true"], "env": {}, "created": FIXED_T}
    atomic_write(job.spec_path, json.dumps(spec))
    atomic_write(job.status_path, json.dumps({"state": state, "created": FIXED_T, "started": FIXED_T + 60}))
    with EventWriter(job.events_path) as events:
        if step:
            events.emit("step", step=step[0], total=step[1], epoch=1, loss=0.1, loss_avg=0.1, lr=[1e-4],
                        it_s=2.0, eta_s=10.0)  # fmt: skip
    return job


def write_workflow(job: JobDir, data: dict[str, Any]) -> None:
    atomic_write(job.path / "workflow.json", json.dumps(data, indent=1))


def workflow_data(home: Path, second_state: str = "running") -> dict[str, Any]:
    return {
        "kind": "workflow",
        "name": "caption-then-train",
        "state": "running",
        "stages": [
            {
                "name": "caption",
                "job": "20260921-110000-caption",
                "state": "finished",
                "from": None,
                "set": {"captioner": "wd14"},
                "artifacts": [{"path": str(home / "x" / "captions.json"), "what": "captions", "step": None}],
                "final_loss": None,
                "val_loss": None,
            },
            {
                "name": "train",
                "job": "20260921-111000-train",
                "state": second_state,
                "from": "caption",
                "set": {"network.dim": 16},
                "artifacts": [
                    {"path": "output/lora-000500.safetensors", "what": "lora", "step": 500},
                    {"path": "output/lora.safetensors", "what": "lora", "step": 1000},
                ],
                "final_loss": 0.0812,
                "val_loss": 0.0934,
            },
        ],
    }


def trial(i: int, state: str, lr: str, dim: int, final: float | None, val: float | None) -> dict[str, Any]:
    return {"name": f"trial-{i}", "job": f"20260921-12000{i}-trial", "state": state, "from": None,
            "set": {}, "params": {"optimizer.learning_rate": lr, "network.dim": dim}, "artifacts": [],
            "final_loss": final, "val_loss": val}  # fmt: skip


def sweep_data(order: list[int], vals: dict[int, float]) -> dict[str, Any]:
    params = {1: ("1e-4", 8), 2: ("1e-4", 16), 3: ("3e-4", 8), 4: ("3e-4", 16)}
    trials = [trial(i, "finished", *params[i], vals[i] - 0.01, vals[i]) for i in range(1, 5)]
    table = [
        {"rank": rank + 1, "params": {"optimizer.learning_rate": params[i][0], "network.dim": params[i][1]},
         "val_loss": vals[i], "final_loss": vals[i] - 0.01, "job": f"20260921-12000{i}-trial",
         "lora": f"/jobs/20260921-12000{i}-trial/output/lora.safetensors",
         "sample": f"/jobs/20260921-12000{i}-trial/output/samples/s-{i}.png"}
        for rank, i in enumerate(order)
    ]  # fmt: skip
    return {"kind": "sweep", "name": "lr-x-dim", "state": "finished", "trials": trials, "table": table}


def rows(screen: WorkflowScreen, table_id: str) -> list[list[str]]:
    table = screen.query_one(f"#{table_id}", DataTable)
    return [[str(c) for c in table.get_row_at(i)] for i in range(table.row_count)]


async def wait_until(pilot: Pilot[Any], predicate: Callable[[], object], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        await pilot.pause(0.05)
    raise AssertionError("condition not met in time")


async def open_from_home(pilot: Pilot[Any], job_id: str) -> WorkflowScreen:
    app = pilot.app
    await wait_until(pilot, lambda: isinstance(app.screen, HomeScreen) and any(r.id == job_id for r in app.screen.rows))
    home = app.screen
    assert isinstance(home, HomeScreen)
    home.table.move_cursor(row=[r.id for r in home.rows].index(job_id), animate=False)
    await pilot.pause()
    await pilot.press("enter")
    await wait_until(pilot, lambda: isinstance(app.screen, WorkflowScreen) and app.screen.data)
    screen = app.screen
    assert isinstance(screen, WorkflowScreen)
    await pilot.pause()
    return screen


@run_async
async def test_a_workflow_opens_as_one_unit_and_enter_opens_a_stage(nyx_home: Path) -> None:
    wf = make_job(nyx_home, "20260921-105900-caption-then-train", "workflow", "running")
    make_job(nyx_home, "20260921-110000-caption", "caption", "finished")
    make_job(nyx_home, "20260921-111000-train", "train", "running", step=(600, 1000))
    write_workflow(wf, workflow_data(nyx_home))
    app = NyxApp(watch_terminal=False)
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_from_home(pilot, wf.id)
        assert app.current_mode == "workflow" and app.current_job is None  # not the training dashboard
        title = str(screen.query_one("#wf-title", Static).render())
        assert "workflow caption-then-train" in title and "running" in title
        stages = rows(screen, "wf-stages")
        assert len(stages) == 2
        assert stages[0][1:4] == ["caption", "✓ finished", "20260921-110000-caption"]
        assert stages[1][1:5] == ["train", "▶ running", "20260921-111000-train", "caption"]
        assert stages[1][5:] == ["dim=16", "2", "0.0812", "0.0934"]
        assert not screen.query_one("#wf-table").display  # a workflow has no comparison table

        table = screen.query_one("#wf-stages", DataTable)
        table.focus()
        table.move_cursor(row=1, animate=False)
        await pilot.pause()
        details = str(screen.query_one("#wf-details", Static).render())
        assert "lora (step 1000): output/lora.safetensors" in details and "dim=16" in details

        write_workflow(wf, workflow_data(nyx_home, second_state="finished"))  # the orchestrator moves on
        await wait_until(pilot, lambda: rows(screen, "wf-stages")[1][2] == "✓ finished", timeout=5)
        assert table.cursor_row == 1  # the selection survives a refresh

        await pilot.press("enter")
        await wait_until(pilot, lambda: app.current_mode == "train")
        assert app.current_job == "20260921-111000-train"


@run_async
async def test_a_sweep_shows_its_ranked_table_and_follows_the_file(nyx_home: Path) -> None:
    sweep = make_job(nyx_home, "20260921-115900-lr-x-dim", "sweep", "running")
    for i in range(1, 5):
        make_job(nyx_home, f"20260921-12000{i}-trial", "train", "finished", step=(100, 100))
    write_workflow(sweep, sweep_data([2, 4, 1, 3], {1: 0.12, 2: 0.09, 3: 0.15, 4: 0.10}))
    app = NyxApp(watch_terminal=False)
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_from_home(pilot, sweep.id)
        assert screen.query_one("#wf-table").display
        ranked = rows(screen, "wf-table")
        assert len(ranked) == 4
        assert ranked[0] == ["1", "learning_rate=1e-4 dim=16", "0.0900", "0.0800",
                             "20260921-120002-trial", "lora.safetensors", "s-2.png"]  # fmt: skip
        assert [r[4][-7:] for r in ranked] == ["2-trial", "4-trial", "1-trial", "3-trial"]
        trials = rows(screen, "wf-stages")
        assert [t[1] for t in trials] == ["trial-1", "trial-2", "trial-3", "trial-4"]
        assert "4/4 trials done" in str(screen.query_one("#wf-title", Static).render())

        # a re-ranking written by the orchestrator shows within a poll or two
        write_workflow(sweep, sweep_data([3, 2, 4, 1], {1: 0.12, 2: 0.09, 3: 0.05, 4: 0.10}))
        await wait_until(pilot, lambda: rows(screen, "wf-table")[0][4] == "20260921-120003-trial", timeout=5)
        assert rows(screen, "wf-table")[0][2] == "0.0500"

        # a half-written file keeps the last good view and says so
        (sweep.path / "workflow.json").write_text('{"kind": "sweep", "tab')
        note = screen.query_one("#wf-note", Static)
        await wait_until(pilot, lambda: "could not be read" in str(note.render()), timeout=5)
        assert len(rows(screen, "wf-table")) == 4
        write_workflow(sweep, sweep_data([3, 2, 4, 1], {1: 0.12, 2: 0.09, 3: 0.05, 4: 0.10}))
        await wait_until(pilot, lambda: not note.display, timeout=5)

        ranked_table = screen.query_one("#wf-table", DataTable)
        ranked_table.focus()
        ranked_table.move_cursor(row=0, animate=False)
        await pilot.pause()
        await pilot.press("enter")
        await wait_until(pilot, lambda: app.current_mode == "train")
        assert app.current_job == "20260921-120003-trial"

        # the workflow view stays a mode of its own: back to it, escape goes to the jobs
        await app.switch_mode("workflow")
        await pilot.pause()
        assert isinstance(app.screen, WorkflowScreen)
        await pilot.press("escape")
        await wait_until(pilot, lambda: app.current_mode == "home")


@run_async
async def test_a_workflow_without_its_file_yet_and_stages_without_jobs(nyx_home: Path) -> None:
    wf = make_job(nyx_home, "20260921-130000-pending", "workflow", "queued")
    app = NyxApp(watch_terminal=False)
    async with app.run_test(size=SIZE) as pilot:
        app.open_job(wf.id)
        await wait_until(pilot, lambda: isinstance(app.screen, WorkflowScreen))
        screen = app.screen
        assert isinstance(screen, WorkflowScreen)
        await pilot.pause()
        assert "waiting for workflow.json" in str(screen.query_one("#wf-note", Static).render())
        data = workflow_data(nyx_home)
        data["stages"][1].update(job=None, state="queued", artifacts=[])
        write_workflow(wf, data)
        await wait_until(pilot, lambda: len(rows(screen, "wf-stages")) == 2, timeout=5)
        table = screen.query_one("#wf-stages", DataTable)
        table.focus()
        table.move_cursor(row=1, animate=False)
        await pilot.press("enter")
        await pilot.pause()
        assert app.current_mode == "workflow"
        assert any("has no job yet" in n.message for n in app._notifications)


def test_sweep_snapshot(nyx_home: Path, snap_compare: Any) -> None:
    sweep = make_job(nyx_home, "20260921-115900-lr-x-dim", "sweep", "finished")
    write_workflow(sweep, sweep_data([2, 4, 1, 3], {1: 0.12, 2: 0.09, 3: 0.15, 4: 0.10}))

    async def opened(pilot: Pilot[Any]) -> None:
        pilot.app.open_job(sweep.id)
        await wait_until(pilot, lambda: isinstance(pilot.app.screen, WorkflowScreen) and pilot.app.screen.data)
        await pilot.pause(0.1)

    assert snap_compare(NyxApp(watch_terminal=False), terminal_size=SIZE, run_before=opened)
