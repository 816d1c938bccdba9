"""The config screen: the generated form, validation, filtering, presets, save/load, Start."""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
from textual.app import App, ComposeResult
from textual.widgets import Button, Input, Select, Static

from nyx_tui import demo
from nyx_tui.config.fields import Family, iter_params
from nyx_tui.config.model import TrainingConfig
from nyx_tui.screens.config import ConfigScreen
from nyx_tui.screens.config_dialogs import ConfirmDialog, PathDialog, TextDialog
from nyx_tui.screens.messages import StartTraining
from nyx_tui.widgets.config_form import SubsetBox


def sync(fn: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Run an async test without an async pytest plugin (fixtures still resolve through `wraps`)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        asyncio.run(fn(*args, **kwargs))

    return wrapper


MINIMAL_PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d49484452000000010000000108060000001f15c489"
    "0000000d49444154789c6360000002000154a24f5d0000000049454e44ae426082"
)


@pytest.fixture(autouse=True)
def _home(nyx_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return nyx_home


class Host(App[None]):
    """Pushes the config screen and records what it posts."""

    def __init__(self, screen: ConfigScreen | None = None) -> None:
        super().__init__()
        self._screen = screen or ConfigScreen()
        self.started: list[StartTraining] = []

    def compose(self) -> ComposeResult:
        yield Static("host")

    def on_mount(self) -> None:
        self.push_screen(self._screen)

    def on_start_training(self, message: StartTraining) -> None:
        self.started.append(message)


def screen_of(app: App[Any]) -> ConfigScreen:
    assert isinstance(app.screen, ConfigScreen)
    return app.screen


async def set_input(app: App[Any], path: str, text: str, index: int | None = None) -> None:
    screen = screen_of(app)
    row = screen.form.row(path, index)
    editor = row.editor
    assert isinstance(editor, Input)
    editor.value = text
    await app.workers.wait_for_complete()


async def settle(pilot: Any) -> None:
    await pilot.pause()
    await pilot.app.workers.wait_for_complete()
    await pilot.pause()


def make_dataset_and_model(tmp: Path) -> tuple[Path, Path]:
    data = tmp / "images"
    data.mkdir()
    (data / "a.png").write_bytes(MINIMAL_PNG)
    (data / "a.txt").write_text("a photo", encoding="utf-8")
    model = tmp / "model"
    (model / "unet").mkdir(parents=True)
    (model / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return data, model


# --------------------------------------------------------------------------------------------- form


@sync
async def test_every_param_has_a_row() -> None:
    app = Host(ConfigScreen(preset="sd15-lora"))
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(pilot)
        form = screen_of(app).form
        for p in iter_params(TrainingConfig):
            if p.path == "dataset.subsets":
                assert form.query_one("#subsets-editor")
            elif p.path.startswith("dataset.subsets[]."):
                assert form.row(p.path, 0).param.path == p.path  # the preset has one subset
            else:
                assert form.row(p.path).param.path == p.path
        kinds = {r.param.path: type(r.editor).__name__ for r in form.top_rows()}
        assert kinds["dataset.shuffle_caption"] == "Checkbox"
        assert kinds["model.family"] == "Select"
        assert kinds["network.dim"] == "Input"
        assert form.row("network.dim").editor.type == "integer"  # type: ignore[attr-defined]
        assert form.row("optimizer.betas").editor.value == "0.9, 0.999"  # type: ignore[attr-defined]


@sync
async def test_filter_and_advanced_toggle() -> None:
    app = Host()
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(pilot)
        screen = screen_of(app)
        form = screen.form
        assert "network.dim" in form.visible_paths()
        assert "network.dropout" not in form.visible_paths()  # advanced: hidden by default
        await pilot.press("f2")
        await pilot.pause()
        assert "network.dropout" in form.visible_paths()
        await pilot.press("f2")
        await pilot.pause()
        assert "network.dropout" not in form.visible_paths()

        await pilot.press("ctrl+f")
        assert app.focused is screen.query_one("#filter")
        await pilot.press(*"learning_rate")
        await pilot.pause()
        assert form.visible_paths() == ["network.text_encoder_lr", "optimizer.learning_rate"]  # key or help text
        screen.query_one("#filter", Input).value = "network.d"  # by dotted key
        await pilot.pause()
        assert set(form.visible_paths()) == {"network.dim", "network.dropout"}
        screen.query_one("#filter", Input).value = "warmup"  # by help text too
        await pilot.pause()
        assert "scheduler.warmup_steps" in form.visible_paths()
        screen.query_one("#filter", Input).value = "zzzz-nothing"
        await pilot.pause()
        assert form.visible_paths() == []
        assert form.query_one("#empty-note").display


@sync
async def test_family_hides_params() -> None:
    app = Host()
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(pilot)
        form = screen_of(app).form
        flux_only = [
            p.path for p in iter_params(TrainingConfig) if p.meta.families == (Family.FLUX,) and not p.meta.advanced
        ]
        assert flux_only
        assert not set(flux_only) & set(form.visible_paths())
        family = form.row("model.family").editor
        assert isinstance(family, Select)
        family.value = "flux"
        await pilot.pause()
        assert set(flux_only) <= set(form.visible_paths())
        status = str(screen_of(app).query_one("#status", Static).render())
        assert "VRAM ≈" in status and "Flux.1 dev" in status  # the estimate follows the family
        assert "network.target_modules" not in form.visible_paths()  # unet families only (and advanced)
        family.value = "sd15"
        await pilot.pause()
        assert not set(flux_only) & set(form.visible_paths())


@sync
async def test_resolution_follows_the_family_unless_typed() -> None:
    app = Host()
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(pilot)
        form = screen_of(app).form
        family = form.row("model.family").editor
        assert isinstance(family, Select)
        assert form.row("dataset.resolution").get_value() == 512
        family.value = "sdxl"
        await pilot.pause()
        assert form.row("dataset.resolution").get_value() == 1024
        assert form.data()["dataset"]["resolution"] == 1024
        await set_input(app, "dataset.resolution", "768")
        family.value = "sd15"
        await pilot.pause()
        assert form.row("dataset.resolution").get_value() == 768  # typed by the user: kept


@sync
async def test_inline_validation_blocks_start() -> None:
    app = Host()
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(pilot)
        screen = screen_of(app)
        await set_input(app, "network.dim", "0")
        await pilot.pause()
        problem = screen.form.row("network.dim").query_one(".problem", Static)
        shown = str(problem.render())
        assert problem.display
        assert "✗ error" in shown and "must be greater than 0" in shown and "fix:" in shown
        await pilot.press("f5")
        await settle(pilot)
        assert app.started == []
        assert "Start is blocked" in str(screen.query_one("#status", Static).render())
        await set_input(app, "network.dim", "8")
        await pilot.pause()
        assert not screen.form.row("network.dim").query_one(".problem", Static).display


@sync
async def test_help_pane_follows_focus() -> None:
    app = Host()
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(pilot)
        screen = screen_of(app)
        screen.form.row("network.dim").editor.focus()
        await pilot.pause()
        help_text = str(screen.query_one("#help", Static).render())
        for part in ("network.dim", "network_dim", "rank", "default: 16", "families: all"):
            assert part in help_text


@sync
async def test_subsets_add_edit_remove() -> None:
    app = Host()
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(pilot)
        screen = screen_of(app)
        assert screen.form.data()["dataset"]["subsets"] == []
        await pilot.press("f6")
        await pilot.press("f6")
        await settle(pilot)
        assert len(screen.form.query(SubsetBox)) == 2
        await set_input(app, "dataset.subsets[].image_dir", "/data/a", 0)
        await set_input(app, "dataset.subsets[].num_repeats", "3", 0)
        await set_input(app, "dataset.subsets[].image_dir", "/data/b", 1)
        await set_input(app, "dataset.subsets[].caption_extension", "txt", 1)
        await pilot.pause()
        row = screen.form.row("dataset.subsets[].caption_extension", 1)
        assert "starting with a dot" in str(row.query_one(".problem", Static).render())
        await set_input(app, "dataset.subsets[].caption_extension", ".cap", 1)
        subsets = screen.form.data()["dataset"]["subsets"]
        assert subsets == [
            {"image_dir": "/data/a", "num_repeats": 3, "is_reg": False},
            {"image_dir": "/data/b", "is_reg": False, "caption_extension": ".cap"},  # repeats: from the name
        ]
        screen.form.query_one("#remove-subset-0", Button).press()
        await settle(pilot)
        assert screen.form.data()["dataset"]["subsets"] == [
            {"image_dir": "/data/b", "is_reg": False, "caption_extension": ".cap"}
        ]
        assert screen.config is not None and screen.config.dataset.subsets[0].image_dir == "/data/b"


# ------------------------------------------------------------------------------ presets, diff, files


@sync
async def test_preset_fills_values_and_diff() -> None:
    app = Host()
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(pilot)
        screen = screen_of(app)
        screen.query_one("#preset", Select).value = "sdxl-lora"
        await settle(pilot)
        form = screen.form
        assert form.row("network.dim").editor.value == "32"  # type: ignore[attr-defined]
        assert form.row("model.family").get_value() == "sdxl"
        assert form.row("training.gradient_checkpointing").get_value() is True
        assert form.row("dataset.subsets[].image_dir", 0).get_value() == "./images"
        await set_input(app, "network.dim", "64")
        await pilot.press("f3")
        await pilot.pause()
        assert isinstance(app.screen, TextDialog)
        body = str(app.screen.query_one("#dialog-body", Static).render())
        assert "network.dim: 32 → 64" in body
        assert body.count("→") == 1
        await pilot.press("escape")
        await pilot.pause()
        assert isinstance(app.screen, ConfigScreen)


@sync
async def test_save_then_load_round_trips(tmp_path: Path) -> None:
    target = tmp_path / "out" / "mine.toml"
    app = Host(ConfigScreen(preset="sd15-lora"))
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(pilot)
        screen = screen_of(app)
        await set_input(app, "network.dim", "24")
        await set_input(app, "optimizer.args", "decouple=true, d0=1e-6")
        await set_input(app, "sampling.prompts", "a cat, a dog")
        await pilot.pause()
        expected = screen.config
        assert expected is not None and expected.optimizer.args == {"decouple": True, "d0": 1e-6}
        await pilot.press("ctrl+s")
        await pilot.pause()
        assert isinstance(app.screen, PathDialog)
        app.screen.query_one("#path-input", Input).value = str(target)
        await pilot.press("enter")
        await settle(pilot)
        assert target.is_file()

        await pilot.press("ctrl+s")  # same path again: asks before overwriting
        await pilot.pause()
        await pilot.press("enter")
        await pilot.pause()
        assert isinstance(app.screen, ConfirmDialog)
        await pilot.press("n")
        await pilot.pause()

        await set_input(app, "network.dim", "99")
        await pilot.press("ctrl+o")
        await pilot.pause()
        assert isinstance(app.screen, PathDialog)
        app.screen.query_one("#path-input", Input).value = str(target)
        await pilot.press("enter")
        await settle(pilot)
        assert screen.source == target
        assert screen.config is not None
        got = screen.config
        assert got.network.dim == 24
        assert got.optimizer.args == expected.optimizer.args
        assert got.sampling.prompts == ["a cat", "a dog"]
        assert got.dataset.subsets[0].image_dir == str(target.parent / "images")  # resolved on load


@sync
async def test_load_errors_are_shown_not_raised(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[network]\ndim = 'x'\n[nope]\n", encoding="utf-8")
    app = Host(ConfigScreen(path=bad))
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(pilot)
        assert isinstance(app.screen, TextDialog)
        body = str(app.screen.query_one("#dialog-body", Static).render())
        assert "network.dim" in body and "fix:" in body and "Traceback" not in body


# -------------------------------------------------------------------------------------------- start


@sync
async def test_start_valid_config_posts_start_training(tmp_path: Path) -> None:
    data, model = make_dataset_and_model(tmp_path)
    app = Host(ConfigScreen(preset="sd15-lora"))
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(pilot)
        await set_input(app, "model.pretrained", str(model))
        await set_input(app, "dataset.subsets[].image_dir", "images", 0)  # relative: against the cwd
        await pilot.press("f5")
        await settle(pilot)
        assert len(app.started) == 1, screen_of(app).problems
        cfg = app.started[0].config
        assert cfg.model.pretrained == str(model)
        assert cfg.dataset.subsets[0].image_dir == str(data)
        assert cfg.network.dim == 16
        assert app.started[0].queue is False


@sync
async def test_queue_key_posts_a_queued_start(tmp_path: Path) -> None:
    _data, model = make_dataset_and_model(tmp_path)
    app = Host(ConfigScreen(preset="sd15-lora"))
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(pilot)
        await set_input(app, "model.pretrained", str(model))
        await set_input(app, "dataset.subsets[].image_dir", "images", 0)
        await pilot.press("f8")
        await settle(pilot)
        assert [m.queue for m in app.started] == [True], screen_of(app).problems


@sync
async def test_check_alone_reports_and_never_starts(tmp_path: Path) -> None:
    data, model = make_dataset_and_model(tmp_path)
    app = Host(ConfigScreen(preset="sd15-lora"))
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(pilot)
        await set_input(app, "model.pretrained", str(model))
        await set_input(app, "dataset.subsets[].image_dir", str(tmp_path / "nowhere"), 0)
        await pilot.press("f7")
        await settle(pilot)
        assert isinstance(app.screen, TextDialog)
        body = str(app.screen.query_one("#dialog-body", Static).render())
        assert "image_dir" in body and "fix:" in body
        await pilot.press("escape")
        await set_input(app, "dataset.subsets[].image_dir", str(data), 0)
        await pilot.press("f7")
        await settle(pilot)
        assert not isinstance(app.screen, TextDialog)
        assert app.started == []


@sync
async def test_start_missing_dataset_shows_preflight_errors(tmp_path: Path) -> None:
    _, model = make_dataset_and_model(tmp_path)
    app = Host(ConfigScreen(preset="sd15-lora"))
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(pilot)
        await set_input(app, "model.pretrained", str(model))
        await set_input(app, "dataset.subsets[].image_dir", str(tmp_path / "nowhere"), 0)
        await pilot.press("f5")
        await settle(pilot)
        assert app.started == []
        assert isinstance(app.screen, TextDialog)
        await pilot.press("escape")
        await pilot.pause()
        row = screen_of(app).form.row("dataset.subsets[].image_dir", 0)
        assert row.query_one(".problem", Static).display


@sync
async def test_demo_preset_start(nyx_home: Path) -> None:
    app = Host()
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(pilot)
        screen = screen_of(app)
        screen.query_one("#preset", Select).value = demo.PRESET
        await settle(pilot)  # builds the workspace in a worker
        assert demo.is_ready(demo.workspace())
        await pilot.press("f5")
        await settle(pilot)
        assert len(app.started) == 1, screen.problems
        cfg = app.started[0].config
        assert cfg.model.pretrained == str(demo.workspace() / "model")
        assert cfg.dataset.subsets[0].image_dir == str(demo.workspace() / "dataset")


# ----------------------------------------------------------------------------------------- snapshots


class SnapHost(App[None]):
    def on_mount(self) -> None:
        self.push_screen(ConfigScreen(preset="sd15-lora"))


@pytest.mark.parametrize("size", [(120, 40), (80, 24)])
def test_snapshot(snap_compare: Any, size: tuple[int, int]) -> None:
    async def focus_dim(pilot: Any) -> None:
        await pilot.pause(0.3)  # the screen's own initial focus first, so it cannot take the focus back later
        screen = pilot.app.screen
        row = screen.form.row("network.dim")
        row.editor.cursor_blink = False  # a blinking cursor is caught on or off by chance: a flaky snapshot
        row.editor.focus()
        row.scroll_visible(animate=False)
        await pilot.pause(0.1)
        assert row.editor.has_focus

    assert snap_compare(SnapHost(), terminal_size=size, run_before=focus_dim)


def test_list_items_may_hold_commas_and_dict_items_need_equals() -> None:
    from nyx_tui.config.model import OptimizerSection, SamplingSection
    from nyx_tui.widgets.config_form import format_value, parse_text

    prompts_type = SamplingSection.model_fields["prompts"].annotation
    prompts = ["a photo of sks, smiling", 'a "quoted" cat', "a dog"]
    text = format_value(prompts_type, prompts)
    assert parse_text(prompts_type, text) == prompts
    args_type = OptimizerSection.model_fields["args"].annotation
    assert parse_text(args_type, "d_coef=2, safeguard_warmup=true") == {"d_coef": 2, "safeguard_warmup": True}
    # an item without `=` is not silently turned into an empty value: validation gets the text and names the field
    from nyx_tui.config.errors import ConfigError
    from nyx_tui.config.io import validate_data

    with pytest.raises(ConfigError) as err:
        validate_data({"optimizer": {"args": parse_text(args_type, "d_coef=2, oops")}})
    assert any(p.field == "optimizer.args" for p in err.value.problems)
