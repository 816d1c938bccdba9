"""The whole product path, keys only: open Nyx, pick the demo preset, start, watch the dashboard reach
`finished`, and copy the LoRA path. Real job, real supervisor, real (tiny) training."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from textual.widgets import Select

from nyx_tui import demo
from nyx_tui.app import NyxApp
from nyx_tui.jobs.jobdir import JobDir, find_job


async def _until(pilot: object, predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        await pilot.pause(0.2)  # type: ignore[attr-defined]
    raise AssertionError(f"timed out after {timeout} s waiting for: {what}")


@pytest.mark.slow
def test_keys_only_from_preset_to_finished_lora(nyx_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NYX_GPU", "none")

    async def flow() -> None:
        app = NyxApp(watch_terminal=False)
        async with app.run_test(size=(120, 40)) as pilot:
            await pilot.pause()
            await pilot.press("2")  # config mode
            await _until(pilot, lambda: app.screen.query("#preset"), 10, "the config screen")
            await pilot.press("f4", "enter")  # focus the preset picker and open it
            preset = app.screen.query_one("#preset", Select)
            options = [value for _, value in preset._options]
            target = options.index(demo.PRESET)
            current = options.index(preset.value) if preset.value in options else 0
            await pilot.press(*(["down"] * (target - current) if target >= current else ["up"] * (current - target)))
            await pilot.press("enter")
            await _until(pilot, lambda: preset.value == demo.PRESET, 5, "the demo preset picked")
            await _until(pilot, lambda: demo.is_ready(demo.workspace()), 120, "the demo workspace")
            await pilot.pause(0.5)
            await pilot.press("f5")  # start
            await _until(pilot, lambda: app.current_job is not None, 60, "the job to start")
            assert app.current_mode == "train"
            job: JobDir = find_job(str(app.current_job))
            screen = app.screen
            await _until(
                pilot,
                lambda: screen.series.ended and screen.series.state == "finished",
                300,
                "the dashboard to show finished",
            )
            assert job.effective_state() == "finished"
            await pilot.press("o")  # open (copy) the LoRA path
            await pilot.pause()
            final = [a["path"] for a in job.artifacts() if a["what"] == "lora"][-1]
            assert app.clipboard == final
            assert Path(final).is_file()

    asyncio.run(flow())
