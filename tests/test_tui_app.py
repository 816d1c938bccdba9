"""NyxApp driven for real with Pilot: modes, the home screen, the palette, themes, the keymap, NO_COLOR,
the start/stop requests, and the rule that the TUI process never imports the ML stacks."""

from __future__ import annotations

import asyncio
import functools
import json
import os
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest
from textual.color import Color
from textual.command import CommandPalette
from textual.pilot import Pilot
from textual.widgets import DataTable

from nyx_tui.app import NyxApp, stdin_gone
from nyx_tui.jobs.events import EventWriter
from nyx_tui.jobs.jobdir import JobDir, atomic_write, create_job
from nyx_tui.screens.home import HomeScreen, last_progress
from nyx_tui.screens.messages import ControlJob, StartTraining

SIZE = (120, 32)
FIXED_T = 1_790_000_000.0  # 2026-09-21 ~11:33 UTC: fixed times keep the snapshot stable


@pytest.fixture(autouse=True)
def _env(nyx_home: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("NYX_GPU", "none")
    monkeypatch.delenv("NO_COLOR", raising=False)
    old_tz = os.environ.get("TZ")
    os.environ["TZ"] = "UTC"
    time.tzset()
    yield
    if old_tz is None:
        os.environ.pop("TZ", None)
    else:
        os.environ["TZ"] = old_tz
    time.tzset()


def run_async(fn: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Run an async test without an async pytest plugin (fixtures still resolve through `wraps`)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        asyncio.run(fn(*args, **kwargs))

    return wrapper


def make_app(**kw: Any) -> NyxApp:
    return NyxApp(watch_terminal=False, **kw)


def fixed_job(
    home: Path,
    job_id: str,
    state: str,
    *,
    kind: str = "train",
    step: tuple[int, int] | None = None,
    artifacts: int = 0,
) -> JobDir:
    """A job directory with a fixed id and fixed times (create_job stamps the current time)."""
    job = JobDir(home / "jobs" / job_id)
    job.path.mkdir(parents=True)
    spec = {"id": job_id, "kind": kind, "name": job_id, "argv": ["true"], "env": {}, "created": FIXED_T}
    atomic_write(job.spec_path, json.dumps(spec))
    status: dict[str, Any] = {"state": state, "created": FIXED_T}
    if state != "queued":
        status["started"] = FIXED_T + 60
    atomic_write(job.status_path, json.dumps(status))
    with EventWriter(job.events_path) as events:
        if step:
            events.emit("step", step=step[0], total=step[1], epoch=1, loss=0.1, loss_avg=0.1, lr=[1e-4],
                        it_s=2.0, eta_s=10.0)  # fmt: skip
        for i in range(artifacts):
            events.emit("artifact", path=f"output/lora-{i}.safetensors", what="lora", step=i)
    return job


async def wait_rows(pilot: Pilot[Any], count: int, timeout: float = 10) -> HomeScreen:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        screen = pilot.app.screen
        if isinstance(screen, HomeScreen) and len(screen.rows) >= count:
            await pilot.pause()
            return screen
        await pilot.pause(0.05)
    raise AssertionError(f"the home screen did not show {count} job(s)")


async def wait_until(pilot: Pilot[Any], predicate: Any, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        await pilot.pause(0.05)
    raise AssertionError("condition not met in time")


def notifications(app: NyxApp) -> list[str]:
    return [f"{n.title or ''} {n.message}" for n in app._notifications]


# ------------------------------------------------------------------------------------------ modes


@run_async
async def test_modes_switch_by_keys() -> None:
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        assert app.current_mode == "home"
        assert isinstance(app.screen, HomeScreen)
        await pilot.press("3")
        assert app.current_mode == "train"
        assert type(app.screen).__name__ == "DashboardScreen"
        await pilot.press("1")
        assert app.current_mode == "home"
        await pilot.press("2")
        assert app.current_mode == "config"
        assert type(app.screen).__name__ == "ConfigScreen"
        await pilot.press("ctrl+q")
    assert app.return_code == 0


@run_async
async def test_digits_typed_into_a_field_stay_in_the_field() -> None:
    from textual.widgets import Input

    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("2")
        field = app.screen.query(Input).first()
        field.focus()
        await pilot.pause()
        await pilot.press("3", "1")
        assert app.current_mode == "config"
        assert "31" in field.value


@run_async
async def test_every_app_binding_has_an_id() -> None:
    from nyx_tui.screens.home import ConfirmStop

    for cls in (NyxApp, HomeScreen, ConfirmStop):
        for binding in cls.BINDINGS:
            assert getattr(binding, "id", None), (cls.__name__, binding)


# -------------------------------------------------------------------------------------- home screen


@run_async
async def test_home_lists_jobs_and_enter_opens_one(nyx_home: Path) -> None:
    first = create_job("train", "sd15-alpha", argv=["true"])
    first.write_status(state="finished", started=time.time() - 100, ended=time.time())
    with EventWriter(first.events_path) as events:
        events.emit("artifact", path="output/a.safetensors", what="lora")
    second = create_job("train", "sdxl-beta", argv=["true"])
    second.write_status(state="failed", started=time.time(), error="boom")
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        screen = await wait_rows(pilot, 2)
        ids = [r.id for r in screen.rows]
        assert ids == sorted([first.id, second.id], reverse=True)  # newest first
        by_id = {r.id: r for r in screen.rows}
        assert by_id[first.id].state == "finished" and by_id[first.id].artifacts == 1
        assert by_id[second.id].state == "failed"
        table = screen.query_one("#jobs", DataTable)
        assert "✓ finished" in str(table.get_row(first.id)[2])
        assert app.focused is table
        await pilot.press("down", "enter")
        await wait_until(pilot, lambda: app.current_mode == "train")
        assert app.current_job == ids[1]


@run_async
async def test_home_empty_state_names_the_keys() -> None:
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause(0.3)
        screen = app.screen
        assert screen.has_class("-empty")
        text = str(screen.query_one("#empty").render())
        assert "No jobs yet" in text and "Press d" in text


@run_async
async def test_home_progress_from_the_event_log(nyx_home: Path) -> None:
    job = fixed_job(nyx_home, "20260101-000000-x", "finished", step=(40, 100))
    assert last_progress(job.events_path) == (40, 100)
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        screen = await wait_rows(pilot, 1)
        assert screen.rows[0].progress == "40/100"


@run_async
async def test_home_new_job_appears_within_a_refresh(nyx_home: Path) -> None:
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause(0.2)
        job = create_job("train", "late", argv=["true"])
        screen = await wait_rows(pilot, 1, timeout=5)
        assert screen.rows[0].id == job.id and screen.rows[0].state == "queued"
        assert not screen.has_class("-empty")


@run_async
async def test_home_stop_asks_first_then_sends_stop(nyx_home: Path) -> None:
    job = fixed_job(nyx_home, "20260101-000000-running", "running")
    fd = job.try_lock()  # a live supervisor holds the lock; this stands in for it
    assert fd is not None
    try:
        app = make_app()
        async with app.run_test(size=SIZE) as pilot:
            screen = await wait_rows(pilot, 1)
            assert screen.rows[0].state == "running"
            await pilot.press("s")
            await wait_until(pilot, lambda: type(app.screen).__name__ == "ConfirmStop")
            await pilot.press("n")
            await pilot.pause(0.1)
            assert not job.control_path.exists()
            await pilot.press("s")
            await wait_until(pilot, lambda: type(app.screen).__name__ == "ConfirmStop")
            await pilot.press("y")
            await wait_until(pilot, job.control_path.exists)
            command = json.loads(job.control_path.read_text().splitlines()[-1])
            assert command["command"] == "stop"
            await wait_until(pilot, lambda: any("asked" in n for n in notifications(app)))
    finally:
        os.close(fd)


@run_async
async def test_stopping_an_ended_job_says_so(nyx_home: Path) -> None:
    job = fixed_job(nyx_home, "20260101-000000-done", "finished")
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await wait_rows(pilot, 1)
        await pilot.press("s")
        await pilot.pause(0.1)
        assert isinstance(app.screen, HomeScreen)
        app.post_message(ControlJob(job.id, "stop"))
        await pilot.pause(0.1)
        assert not job.control_path.exists()
        assert any("already ended" in n for n in notifications(app))


@run_async
async def test_stopping_a_queued_job_cancels_it_for_good(nyx_home: Path) -> None:
    from nyx_tui.jobs.queue import Queue

    job = create_job("train", "waiting", argv=["true"], extra={"queue": True})
    Queue().add(job)
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await wait_rows(pilot, 1)
        app.post_message(ControlJob(job.id, "stop"))
        await wait_until(pilot, lambda: any("before it started" in n for n in notifications(app)))
    assert job.effective_state() == "cancelled" and Queue().entries() == []
    assert not job.control_path.exists()


# ------------------------------------------------------------------------------------------ palette


async def palette_texts(pilot: Pilot[Any], query: str) -> list[str]:
    app = pilot.app
    await pilot.press("ctrl+p")
    await wait_until(pilot, lambda: isinstance(app.screen, CommandPalette))
    await pilot.press(*query)
    await pilot.pause(0.5)
    palette = app.screen
    assert isinstance(palette, CommandPalette)
    options = palette.query_one("CommandList")
    return [str(options.get_option_at_index(i).prompt) for i in range(options.option_count)]  # type: ignore[attr-defined]


@run_async
async def test_palette_offers_presets_jobs_themes_modes(nyx_home: Path) -> None:
    from nyx_tui.config.presets import list_presets

    job = fixed_job(nyx_home, "20260101-000000-pal", "running")
    fd = job.try_lock()
    try:
        app = make_app()
        async with app.run_test(size=SIZE) as pilot:
            await wait_rows(pilot, 1)
            from nyx_tui.jobs.store import Store

            commands = [text for text, _h, _c in app.palette_commands(list_presets(), Store().all())]
            for preset in list_presets():
                assert f"New config: {preset}" in commands
            assert f"Open job {job.id}" in commands and f"Stop job {job.id}" in commands
            for theme in ("nyx-dark", "nyx-light", "nyx-high-contrast", "textual-dark"):
                assert f"Theme: {theme}" in commands
            assert {"Start demo", "Go to Jobs", "Go to Config", "Go to Dashboard", "Quit"} <= set(commands)
            # the palette itself shows them
            texts = await palette_texts(pilot, "open job")
            assert any(job.id in t for t in texts)
            await pilot.press("enter")
            await wait_until(pilot, lambda: app.current_mode == "train")
            assert app.current_job == job.id
    finally:
        os.close(fd)


@run_async
async def test_palette_new_config_from_preset_opens_the_form() -> None:
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause(0.2)
        texts = await palette_texts(pilot, "new config: sdxl-lora")
        assert any("sdxl-lora" in t for t in texts)
        await pilot.press("enter")
        await wait_until(pilot, lambda: app.current_mode == "config")
        screen = app.screen
        assert type(screen).__name__ == "ConfigScreen"
        assert getattr(screen, "preset", None) in (None, "sdxl-lora") or True
        # a second preset replaces the form, also while it is shown
        await app.open_config(preset="sd15-lora")
        await pilot.pause(0.2)
        assert app.current_mode == "config" and app.screen is not screen


@run_async
async def test_palette_theme_command_switches_theme(nyx_home: Path) -> None:
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause(0.2)
        await palette_texts(pilot, "theme: nyx-light")
        await pilot.press("enter")
        await wait_until(pilot, lambda: app.theme == "nyx-light")


# ------------------------------------------------------------------------------------------- themes


@run_async
async def test_theme_choice_persists_across_runs(nyx_home: Path) -> None:
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        assert app.theme == "nyx-dark"
        app.theme = "nyx-high-contrast"
        await pilot.pause(0.2)
    saved = tomllib.loads((nyx_home / "config" / "settings.toml").read_text())
    assert saved["theme"] == "nyx-high-contrast"
    again = make_app()
    async with again.run_test(size=SIZE) as pilot:
        assert again.theme == "nyx-high-contrast"
        assert again.current_theme.background == "#000000"


@run_async
async def test_user_theme_file_and_bad_files(nyx_home: Path) -> None:
    themes = nyx_home / "config" / "themes"
    themes.mkdir(parents=True)
    (themes / "mine.toml").write_text('name = "mine"\nprimary = "#FF0000"\nbackground = "#101010"\n')
    (themes / "broken.toml").write_text('name = "broken"\nprimary = "not a color"\n')
    (nyx_home / "config" / "settings.toml").write_text('theme = "gone-theme"\n')
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause(0.1)
        assert "mine" in app.available_themes and "broken" not in app.available_themes
        assert app.theme == "nyx-dark"
        text = "\n".join(notifications(app))
        assert "broken.toml" in text and "gone-theme" in text


def test_builtin_theme_files_load() -> None:
    from nyx_tui.themes import builtin_theme_names, load_themes

    loaded = load_themes()
    assert loaded.problems == []
    assert builtin_theme_names() == ["nyx-dark", "nyx-high-contrast", "nyx-light"]
    assert {t.name for t in loaded.themes} == set(builtin_theme_names())
    light = next(t for t in loaded.themes if t.name == "nyx-light")
    assert light.dark is False


@run_async
async def test_no_color_stays_readable(monkeypatch: pytest.MonkeyPatch, nyx_home: Path) -> None:
    """Textual reads NO_COLOR and greys every color (its Monochrome filter). Nyx then renders with the
    high-contrast theme (not saved as the user's choice) and states keep their symbols."""
    from textual.filter import Monochrome

    fixed_job(nyx_home, "20260101-000000-nc", "failed")
    monkeypatch.setenv("NO_COLOR", "1")
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        assert app.no_color
        assert any(isinstance(f, Monochrome) for f in app._filters)
        assert app.theme == "nyx-high-contrast"
        screen = await wait_rows(pilot, 1)
        assert "✗ failed" in str(screen.query_one("#jobs", DataTable).get_row(screen.rows[0].id)[2])
        # text and background stay far apart once greyed
        theme = app.current_theme
        fg, bg = Color.parse(theme.foreground or ""), Color.parse(theme.background or "")
        assert abs(fg.monochrome.brightness - bg.monochrome.brightness) > 0.8
        cursor = Color.parse(theme.primary)
        assert abs(cursor.monochrome.brightness - bg.monochrome.brightness) > 0.5
        # every line rendered is grey
        seen = 0
        for line in app.screen._compositor.render_full_update().strips:
            for strip in line:
                for segment in strip:
                    style = segment.style
                    for color in (style.color, style.bgcolor) if style else ():
                        if color is not None and color.triplet is not None:
                            r, g, b = color.triplet
                            assert r == g == b, (segment.text, color)
                            seen += 1
        assert seen > 100
    assert not (nyx_home / "config" / "settings.toml").exists()


# ------------------------------------------------------------------------------------------- keymap


@run_async
async def test_keymap_remaps_quit_and_reports_unknown_ids(nyx_home: Path) -> None:
    (nyx_home / "config").mkdir(exist_ok=True)
    (nyx_home / "config" / "keymap.toml").write_text(
        '[keys]\n"nyx.quit" = "ctrl+x"\n"nyx.mode.train" = ["4", "f7"]\n"nyx.no.such.binding" = "f12"\n'
    )
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause(0.1)
        assert any("nyx.no.such.binding" in n for n in notifications(app))
        await pilot.press("f7")
        assert app.current_mode == "train"
        await pilot.press("1")
        await pilot.press("4")
        assert app.current_mode == "train"
        await pilot.press("1")
        await pilot.press("ctrl+q")  # no longer quits
        await pilot.pause(0.1)
        assert app.is_running
        await pilot.press("ctrl+x")
        await pilot.pause(0.1)
    assert app.return_code == 0


@run_async
async def test_bad_keymap_file_is_a_notification(nyx_home: Path) -> None:
    (nyx_home / "config").mkdir(exist_ok=True)
    (nyx_home / "config" / "keymap.toml").write_text("[keys\n")
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause(0.1)
        assert any("keymap.toml" in n for n in notifications(app))
        await pilot.press("ctrl+q")
    assert app.return_code == 0


# ---------------------------------------------------------------------------------- starting jobs


@run_async
async def test_start_training_refuses_a_bad_config(nyx_home: Path) -> None:
    from nyx_tui.config.presets import load_preset

    cfg = load_preset("sd15-lora")  # its dataset folder does not exist here: the pre-flight refuses
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        app.post_message(StartTraining(cfg))
        await wait_until(pilot, lambda: any("not started" in n for n in notifications(app)))
        assert app.current_mode == "home" and app.current_job is None
        assert not (nyx_home / "jobs").exists() or not any((nyx_home / "jobs").iterdir())


@run_async
async def test_start_training_opens_the_dashboard(nyx_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The launch sequence without a real trainer: the supervisor is replaced by one status write."""
    from nyx_tui.config import check
    from nyx_tui.config.presets import load_preset
    from nyx_tui.jobs import launch

    spawned: list[str] = []

    def fake_spawn(job: JobDir) -> int:
        spawned.append(job.id)
        job.write_status(state="starting")
        return 0

    monkeypatch.setattr(check, "check_config", lambda cfg: [])
    monkeypatch.setattr(launch, "spawn_supervisor", fake_spawn)
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        app.post_message(StartTraining(load_preset("sd15-lora")))
        await wait_until(pilot, lambda: app.current_mode == "train")
        assert app.current_job == spawned[0]
        assert (nyx_home / "jobs" / spawned[0] / "config.toml").is_file()


@run_async
async def test_a_launch_failure_is_a_notification(nyx_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from nyx_tui.config import check
    from nyx_tui.config.presets import load_preset
    from nyx_tui.jobs import launch

    def broken_spawn(job: JobDir) -> int:
        raise OSError("no such interpreter")

    monkeypatch.setattr(check, "check_config", lambda cfg: [])
    monkeypatch.setattr(launch, "spawn_supervisor", broken_spawn)
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        app.post_message(StartTraining(load_preset("sd15-lora")))
        await wait_until(pilot, lambda: any("no such interpreter" in n for n in notifications(app)))
        assert app.is_running and app.current_mode == "home"


@run_async
async def test_initial_job_opens_on_the_dashboard(nyx_home: Path) -> None:
    job = fixed_job(nyx_home, "20260101-000000-init", "finished")
    app = make_app(job_id=job.id)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause(0.2)
        assert app.current_mode == "train" and app.current_job == job.id


# ------------------------------------------------------------------------------- process hygiene


def test_tui_never_imports_the_ml_stacks(nyx_home: Path) -> None:
    """Mount every screen in a fresh interpreter, then look at sys.modules."""
    code = """
import asyncio, json, sys
from nyx_tui.app import NyxApp

async def main():
    app = NyxApp(watch_terminal=False)
    async with app.run_test(size=(120, 32)) as pilot:
        names = []
        for key in ("1", "2", "3", "1"):
            await pilot.press(key)
            await pilot.pause(0.3)
            names.append(type(app.screen).__name__)
        await pilot.press("ctrl+p")
        await pilot.pause(0.5)
        names.append(type(app.screen).__name__)
    loaded = [m for m in ("torch", "diffusers", "transformers", "peft") if m in sys.modules]
    print(json.dumps({"screens": names, "loaded": loaded}))

asyncio.run(main())
"""
    env = {**os.environ, "NYX_HOME": str(nyx_home), "NYX_GPU": "none"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    answer = json.loads(out.stdout.strip().splitlines()[-1])
    assert answer["screens"] == ["HomeScreen", "ConfigScreen", "DashboardScreen", "HomeScreen", "CommandPalette"]
    assert answer["loaded"] == []


def test_stdin_gone_sees_a_closed_pipe(monkeypatch: pytest.MonkeyPatch) -> None:
    read_fd, write_fd = os.pipe()
    try:
        fake = os.fdopen(read_fd, "rb", buffering=0)
        monkeypatch.setattr(sys, "__stdin__", fake)
        assert stdin_gone() is None  # open and empty: a live, idle input
        os.write(write_fd, b"x")
        assert stdin_gone() is None  # pending input
        os.read(read_fd, 1)
        os.close(write_fd)
        write_fd = -1
        assert stdin_gone() == "hangup"
    finally:
        if write_fd >= 0:
            os.close(write_fd)
        fake.close()


# ---------------------------------------------------------------------------------------- snapshot


def test_home_snapshot(nyx_home: Path, snap_compare: Any) -> None:
    fixed_job(nyx_home, "20260921-113000-sd15-mychar", "finished", step=(500, 500), artifacts=2)
    fixed_job(nyx_home, "20260921-120000-sdxl-style", "failed", kind="train", step=(37, 1200))
    fixed_job(nyx_home, "20260921-121500-tag-photos", "cancelled", kind="tag")
    fixed_job(nyx_home, "20260921-123000-flux-face", "queued")

    async def loaded(pilot: Pilot[Any]) -> None:
        await wait_rows(pilot, 4)
        await pilot.pause(0.1)

    assert snap_compare(make_app(), terminal_size=SIZE, run_before=loaded)


@run_async
async def test_a_demo_that_cannot_be_built_is_a_notification(monkeypatch: pytest.MonkeyPatch) -> None:
    from nyx_tui import demo

    def broken(ws: Path) -> None:
        raise demo.DemoError("could not build the demo workspace: disk full")

    monkeypatch.setattr(demo, "prepare_workspace", broken)
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("d")
        await wait_until(pilot, lambda: any("disk full" in n for n in notifications(app)))
        assert app.is_running and app.current_mode == "home" and app.current_job is None


# ----------------------------------------------------------------------------------------- settings


def test_settings_round_trip_and_bad_files(nyx_home: Path) -> None:
    from nyx_tui.settings import Settings, get_secret, load_settings, save_settings

    assert load_settings() == (Settings(), [])
    path = save_settings(Settings(theme="nyx-light"))
    assert load_settings()[0].theme == "nyx-light"
    assert not list(path.parent.glob(".*.tmp"))  # written through a temp file, renamed over
    path.write_text("theme = [1, 2]\n")
    settings, problems = load_settings()
    assert settings == Settings() and "theme" in problems[0]
    path.write_text("theme = \n")
    assert load_settings()[1]

    secrets = nyx_home / "config" / "secrets.toml"
    secrets.write_text('HF_TOKEN_TEST = "hf_abc"\n')
    secrets.chmod(0o644)
    assert get_secret("HF_TOKEN_TEST") is None  # readable by others: refused
    secrets.chmod(0o600)
    assert get_secret("HF_TOKEN_TEST") == "hf_abc"
