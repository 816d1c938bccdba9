"""The downloads screen, driven through NyxApp with Pilot: rows with percent/speed/ETA from the jobs' progress
events, a Civitai preview before downloading, a confirmed download that runs (a real job against the fake
Hub/Civitai of `hub_fake`), a bad source as a notification, cancel writing the control command."""

from __future__ import annotations

import asyncio
import functools
import json
import os
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest
from hub_fake import CivitaiFile, CivitaiVersion, FakeHub
from textual.pilot import Pilot
from textual.widgets import Input, Label, ListView, ProgressBar, Static

from nyx_tui.app import NyxApp, known_binding_ids
from nyx_tui.jobs.events import EventWriter
from nyx_tui.jobs.jobdir import JobDir, create_job, list_jobs
from nyx_tui.screens.downloads import DownloadItem, DownloadsScreen

SIZE = (120, 40)
LORA = os.urandom(3000)
OTHER = os.urandom(1200)


@pytest.fixture(autouse=True)
def _env(nyx_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NYX_GPU", "none")
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    fake = FakeHub().start()
    fake.add_version(
        CivitaiVersion(
            123,
            model_id=77,
            model_name="Shiny Style",
            base_model="SDXL 1.0",
            files=[
                CivitaiFile("shiny_style.safetensors", LORA),
                CivitaiFile("shiny_style_training_data.zip", OTHER, primary=False, type="Training Data"),
            ],
        )
    )
    for key, value in fake.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "CIVITAI_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    yield fake
    fake.stop()


def run_async(fn: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        asyncio.run(fn(*args, **kwargs))

    return wrapper


async def wait_until(pilot: Pilot[Any], predicate: Callable[[], object], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            await pilot.pause()
            return
        await pilot.pause(0.05)
    raise AssertionError("condition not met in time")


def notes(app: NyxApp) -> list[str]:
    return [f"{n.title or ''}: {n.message}" for n in app._notifications]


def fake_job(state: str, progress: dict[str, Any], name: str = "dl") -> JobDir:
    spec = {"sources": ["civitai:123"], "dest": None, "sha256": None, "file": None}
    job = create_job("download", name, ["-"], extra={"download": spec, "resource": "cpu"})
    job.write_status(state=state)
    with EventWriter(job.events_path) as events:
        events.emit("progress", unit="bytes", **progress)
    return job


def row_texts(item: DownloadItem) -> list[str]:
    """state, name, speed, ETA."""
    return [str(item.query_one(f".dl-{part}", Label).content) for part in ("state", "name", "speed", "eta")]


async def downloads(pilot: Pilot[Any]) -> DownloadsScreen:
    await pilot.press("6")
    await wait_until(pilot, lambda: isinstance(pilot.app.screen, DownloadsScreen))
    screen = pilot.app.screen
    assert isinstance(screen, DownloadsScreen)
    return screen


def test_binding_ids_are_known() -> None:
    ids = known_binding_ids()
    assert {"nyx.mode.downloads", "nyx.downloads.cancel", "nyx.downloads.resume", "nyx.downloads.retry"} <= ids
    assert "nyx.downloads.confirm" in ids


@run_async
async def test_rows_show_percent_speed_eta() -> None:
    done = fake_job(
        "finished",
        {"done": 4096, "total": 4096, "file": "done.safetensors", "speed_bps": 0, "eta_s": None},
        name="first",
    )
    running = fake_job(
        "running",
        {
            "done": 1024 * 1024,
            "total": 4 * 1024 * 1024,
            "file": "big.safetensors",
            "speed_bps": 2 * 1024 * 1024,
            "eta_s": 90,
            "files_done": 0,
            "files_total": 1,
        },
        name="second",
    )
    fd = running.try_lock()  # a live supervisor holds the lock; without it the job reads as lost
    assert fd is not None
    try:
        async with NyxApp(watch_terminal=False).run_test(size=SIZE) as pilot:
            screen = await downloads(pilot)
            await wait_until(pilot, lambda: len(screen.query(DownloadItem)) == 2)
            items = list(screen.query(DownloadItem))
            assert [i.row.id for i in items] == [running.id, done.id]  # newest first
            top, bottom = items
            texts = row_texts(top)
            assert texts[0] == "running" and "big.safetensors" in texts[1]
            assert texts[2] == "2.0 MB/s" and texts[3] == "1m30s"
            assert top.query_one(ProgressBar).percentage == pytest.approx(0.25)
            texts = row_texts(bottom)
            assert texts[0] == "finished" and "done.safetensors" in texts[1] and texts[2:] == ["", ""]
            assert bottom.query_one(ProgressBar).percentage == pytest.approx(1.0)
            # a new progress event shows on the next refresh
            with EventWriter(running.events_path) as events:
                events.emit(
                    "progress",
                    unit="bytes",
                    done=3 * 1024 * 1024,
                    total=4 * 1024 * 1024,
                    speed_bps=1024,
                    eta_s=5,
                    file="big.safetensors",
                )
            await wait_until(pilot, lambda: top.query_one(ProgressBar).percentage == pytest.approx(0.75))
            assert row_texts(top)[2:] == ["1.0 KB/s", "5s"]
    finally:
        os.close(fd)


@run_async
async def test_civitai_preview_then_download_finishes(hub: FakeHub) -> None:
    async with NyxApp(watch_terminal=False).run_test(size=SIZE) as pilot:
        screen = await downloads(pilot)
        await pilot.press("a")
        assert isinstance(pilot.app.focused, Input)
        await pilot.press(*"civitai:123", "enter")
        panel = screen.query_one("#dl-preview")
        await wait_until(pilot, lambda: not panel.has_class("-hidden"))
        text = str(screen.query_one("#dl-preview-text", Static).content)
        for words in ("Shiny Style", "LORA", "SDXL 1.0", "shiny_style.safetensors", "shiny_style_training_data.zip"):
            assert words in text
        assert "2.9 KB" in text  # the size of the chosen file
        assert list_jobs() == []  # nothing starts before the confirm
        await pilot.press("escape")
        assert panel.has_class("-hidden") and list_jobs() == []
        await pilot.press("a", "enter")  # the field kept the source
        await wait_until(pilot, lambda: not panel.has_class("-hidden"))
        await pilot.press("y")
        await wait_until(pilot, lambda: len(list_jobs()) == 1)
        await wait_until(pilot, lambda: [i.row.state for i in screen.query(DownloadItem)] == ["finished"], timeout=60)
        (item,) = screen.query(DownloadItem)
        assert "shiny_style.safetensors" in row_texts(item)[1]
        assert item.query_one(ProgressBar).percentage == pytest.approx(1.0)
        (job,) = list_jobs()
        paths = [e["path"] for e in job.events() if e.get("kind") == "artifact"]
        assert len(paths) == 1 and Path(paths[0]).read_bytes() == LORA


@run_async
async def test_bad_source_and_failed_lookup_are_notifications(hub: FakeHub) -> None:
    async with NyxApp(watch_terminal=False).run_test(size=SIZE) as pilot:
        await downloads(pilot)
        await pilot.press("a", *"civitai:abc", "enter")
        await wait_until(pilot, lambda: any("not a source" in n for n in notes(pilot.app)))
        field = pilot.app.screen.query_one("#dl-source", Input)
        assert pilot.app.focused is field  # the field keeps the focus to fix the source
        field.value = ""
        await pilot.press(*"civitai:999", "enter")  # a well-formed id the server does not know
        await wait_until(pilot, lambda: any("could not look it up" in n for n in notes(pilot.app)))
        text = "\n".join(notes(pilot.app))
        assert "Traceback" not in text and "fix" in text
        assert list_jobs() == []


@run_async
async def test_cancel_writes_the_command_and_resume_needs_a_stopped_job() -> None:
    job = fake_job("running", {"done": 10, "total": 100, "file": "x.safetensors", "speed_bps": 1, "eta_s": 90})
    fd = job.try_lock()
    assert fd is not None
    try:
        async with NyxApp(watch_terminal=False).run_test(size=SIZE) as pilot:
            screen = await downloads(pilot)
            await wait_until(pilot, lambda: len(screen.query(DownloadItem)) == 1)
            screen.query_one(ListView).index = 0
            await pilot.press("r")  # running: nothing to resume
            await wait_until(pilot, lambda: any("nothing to resume" in n for n in notes(pilot.app)))
            await pilot.press("c")
            await wait_until(pilot, lambda: job.control_path.exists())
            (line,) = job.control_path.read_text().splitlines()
            assert json.loads(line)["command"] == "cancel"
            await wait_until(pilot, lambda: any("asked" in n for n in notes(pilot.app)))
    finally:
        os.close(fd)
