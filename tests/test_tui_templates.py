"""The templates library screen, driven with Pilot from the config screen: filter, load, save, delete."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
from textual.app import App, ComposeResult
from textual.pilot import Pilot
from textual.widgets import DataTable, Input, Select, Static

from nyx_tui.config.presets import builtin_presets, load_preset
from nyx_tui.config.templates import get_template, save_template, templates_dir
from nyx_tui.screens.config import ConfigScreen
from nyx_tui.screens.config_dialogs import ConfirmDialog
from nyx_tui.screens.templates import SaveTemplateDialog, TemplatesScreen


def sync(fn: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        asyncio.run(fn(*args, **kwargs))

    return wrapper


@pytest.fixture(autouse=True)
def _home(nyx_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return nyx_home


class Host(App[None]):
    def __init__(self, screen: Any = None) -> None:
        super().__init__()
        self._screen = screen or ConfigScreen()

    def compose(self) -> ComposeResult:
        yield Static("host")

    def on_mount(self) -> None:
        self.push_screen(self._screen)


async def settle(pilot: Pilot[Any]) -> None:
    await pilot.pause()
    await pilot.app.workers.wait_for_complete()
    await pilot.pause()


async def wait_for_screen(pilot: Pilot[Any], cls: type, timeout: float = 5) -> Any:
    for _ in range(int(timeout / 0.05)):
        if isinstance(pilot.app.screen, cls):
            await pilot.pause()
            return pilot.app.screen
        await pilot.pause(0.05)
    raise AssertionError(f"{cls.__name__} was not shown (got {type(pilot.app.screen).__name__})")


def names_in_table(screen: TemplatesScreen) -> list[str]:
    table = screen.query_one("#templates", DataTable)
    return [str(table.get_row_at(i)[0]) for i in range(table.row_count)]


def move_to(screen: TemplatesScreen, name: str) -> None:
    table = screen.query_one("#templates", DataTable)
    table.move_cursor(row=names_in_table(screen).index(name), animate=False)


@sync
async def test_open_filter_and_load_a_template_into_the_form() -> None:
    app = Host()
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(pilot)
        config = app.screen
        assert isinstance(config, ConfigScreen)
        assert config.form.row("dataset.resolution").get_value() != 768
        await pilot.press("f9")
        lib = await wait_for_screen(pilot, TemplatesScreen)
        assert names_in_table(lib) == builtin_presets()

        lib.query_one("#family", Select).value = "flux"
        await pilot.pause()
        assert names_in_table(lib) == ["flux-lora-12gb", "flux-lora-16gb", "flux-lora-24gb"]
        table = lib.query_one("#templates", DataTable)
        row = table.get_row_at(0)
        assert "768 px for a 12 GB card" in str(row[1]) and row[2] == "flux" and "GiB" in row[3]
        assert row[4] == "built-in"
        details = str(lib.query_one("#details", Static).render())
        assert "fp8" in details and "blocks to swap: 16" in details  # the description and key settings

        lib.query_one("#family", Select).value = "sdxl"
        await pilot.pause()
        assert names_in_table(lib) == ["sdxl-lora"]
        lib.query_one("#family", Select).value = "all"
        await pilot.pause()
        move_to(lib, "flux-lora-12gb")
        await pilot.pause()
        await pilot.press("enter")
        await wait_for_screen(pilot, ConfigScreen)
        await settle(pilot)
        assert config.form.row("dataset.resolution").get_value() == 768
        assert config.form.row("model.family").get_value() == "flux"
        assert config.preset == "flux-lora-12gb"
        assert config.query_one("#preset", Select).value == "flux-lora-12gb"


@sync
async def test_save_the_form_as_a_user_template_then_delete_it() -> None:
    app = Host(ConfigScreen(preset="sd15-lora"))
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(pilot)
        config = app.screen
        assert isinstance(config, ConfigScreen)
        editor = config.form.row("network.dim").editor
        assert isinstance(editor, Input)
        editor.value = "48"
        await settle(pilot)
        await pilot.press("f9")
        lib = await wait_for_screen(pilot, TemplatesScreen)
        await pilot.press("ctrl+s")
        dialog = await wait_for_screen(pilot, SaveTemplateDialog)
        await pilot.press(*"bad name")
        await pilot.press("enter")
        await pilot.press(*"Big SD1.5 LoRA. Rank 48.")
        await pilot.press("enter")
        await wait_for_screen(pilot, TemplatesScreen)
        assert not templates_dir().exists() or not list(templates_dir().glob("*.toml"))  # refused: a space
        assert any("not a valid template name" in n.message for n in app._notifications)

        await pilot.press("ctrl+s")
        dialog = await wait_for_screen(pilot, SaveTemplateDialog)
        dialog.query_one("#template-name", Input).value = "big-sd15"
        dialog.query_one("#template-desc", Input).value = "Big SD1.5 LoRA. Rank 48."
        dialog.query_one("#template-desc", Input).focus()
        await pilot.press("enter")
        await wait_for_screen(pilot, TemplatesScreen)
        path = templates_dir() / "big-sd15.toml"
        assert path.is_file()
        assert get_template("big-sd15").settings["network"].startswith("lora rank 48")
        assert "big-sd15" in names_in_table(lib)
        row = lib.query_one("#templates", DataTable).get_row_at(names_in_table(lib).index("big-sd15"))
        assert row[1] == "Big SD1.5 LoRA" and row[2] == "sd15" and row[4] == "user"

        move_to(lib, "sd15-lora")  # built-in: not deletable
        await pilot.press("delete")
        await pilot.pause()
        assert isinstance(app.screen, TemplatesScreen)
        move_to(lib, "big-sd15")
        await pilot.press("delete")
        await wait_for_screen(pilot, ConfirmDialog)
        await pilot.press("n")
        await wait_for_screen(pilot, TemplatesScreen)
        assert path.exists()
        await pilot.press("delete")
        await wait_for_screen(pilot, ConfirmDialog)
        await pilot.press("y")
        await wait_for_screen(pilot, TemplatesScreen)
        assert not path.exists() and "big-sd15" not in names_in_table(lib)
        await pilot.press("escape")
        await wait_for_screen(pilot, ConfigScreen)


@sync
async def test_a_user_template_loads_through_the_preset_menu_too() -> None:
    save_template("wide-sdxl", load_preset("sdxl-lora").model_copy(), "Wide SDXL.")
    app = Host()
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(pilot)
        config = app.screen
        assert isinstance(config, ConfigScreen)
        config.query_one("#preset", Select).value = "wide-sdxl"
        await settle(pilot)
        assert config.form.row("model.family").get_value() == "sdxl"
        await pilot.press("f9")
        lib = await wait_for_screen(pilot, TemplatesScreen)
        assert names_in_table(lib)[-1] == "wide-sdxl"
        await pilot.press("escape")
        await wait_for_screen(pilot, ConfigScreen)
        assert config.preset == "wide-sdxl"


# ----------------------------------------------------------------------------------------- snapshot


class SnapHost(App[None]):
    def on_mount(self) -> None:
        save_template("my-flux-faces", load_preset("flux-lora-16gb"), "Flux faces at 1024 px. Team setting.")
        self.push_screen(TemplatesScreen(load_preset("sd15-lora")))


def test_library_snapshot(snap_compare: Any) -> None:
    async def pick(pilot: Pilot[Any]) -> None:
        await pilot.pause()
        screen = pilot.app.screen
        assert isinstance(screen, TemplatesScreen)
        move_to(screen, "flux-lora-16gb")
        await pilot.pause()

    assert snap_compare(SnapHost(), terminal_size=(120, 32), run_before=pick)


@sync
async def test_the_palette_opens_the_library_over_the_config_form(monkeypatch: pytest.MonkeyPatch) -> None:
    from nyx_tui.app import NyxApp

    monkeypatch.setenv("NYX_GPU", "none")
    app = NyxApp(watch_terminal=False)
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.pause()
        commands = {text: callback for text, _help, callback in app.palette_commands([], [])}
        assert app.current_mode == "home"
        await commands["Templates library"]()
        lib = await wait_for_screen(pilot, TemplatesScreen)
        assert app.current_mode == "config" and names_in_table(lib) == builtin_presets()
        move_to(lib, "sdxl-lora")
        await pilot.press("enter")
        config = await wait_for_screen(pilot, ConfigScreen)
        await settle(pilot)
        assert config.form.row("model.family").get_value() == "sdxl"
