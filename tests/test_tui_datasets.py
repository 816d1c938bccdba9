"""The datasets and tags screens, driven for real through NyxApp with Pilot: scanning, the layout problems,
the tags editor (save, conflicts), bulk edits with undo, the preview renderer, snapshots, and a WD14 job
started from the screen with a stand-in ONNX tagger.

Deterministic: images drawn by code, the working directory is the tmp folder (so the folder shows as `ds`,
never an absolute tmp path), `NYX_GPU=none`, the halfcell image renderer."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from textual.pilot import Pilot
from textual.widgets import DataTable, Input, ProgressBar, Static, TextArea

from nyx_tui.app import NyxApp
from nyx_tui.screens.datasets import DatasetsScreen, JobDialog, session_of
from nyx_tui.screens.tags import BulkPrompt, TagsScreen
from nyx_tui.widgets.tag_chips import TagChips
from nyx_tui.widgets.thumbs import Thumb

SIZE = (120, 40)
CAPTIONS = {
    "10_mychar/a.txt": "mychar, smile, red hair",
    "10_mychar/b.txt": "mychar, green",
    "5_style/d.txt": "style, smile",
}


@pytest.fixture(autouse=True)
def _env(nyx_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NYX_GPU", "none")
    monkeypatch.setenv("NYX_IMAGE_RENDERER", "halfcell")
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.chdir(tmp_path)


def make_dataset(root: Path) -> Path:
    """Two kohya folders (one image without a caption) and a stray image in the root (a layout problem)."""

    def image(rel: str, size: tuple[int, int], color: tuple[int, int, int]) -> None:
        im = Image.new("RGB", size, color)
        im.putdata([(color[0], (x * 4) % 256, (y * 4) % 256) for y in range(size[1]) for x in range(size[0])])
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        im.save(root / rel)

    image("10_mychar/a.png", (64, 64), (200, 40, 40))
    image("10_mychar/b.png", (96, 64), (40, 200, 40))
    image("10_mychar/c.png", (64, 96), (40, 40, 200))
    image("5_style/d.png", (64, 64), (200, 200, 40))
    image("loose.png", (64, 64), (90, 90, 90))
    for rel, text in CAPTIONS.items():
        (root / rel).write_text(text)
    return root


@pytest.fixture
def ds(tmp_path: Path) -> Path:
    return make_dataset(tmp_path / "ds")


def run_async(fn: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        asyncio.run(fn(*args, **kwargs))

    return wrapper


def make_app() -> NyxApp:
    return NyxApp(watch_terminal=False)


async def wait_until(pilot: Pilot[Any], predicate: Callable[[], object], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            await pilot.pause()
            return
        await pilot.pause(0.05)
    raise AssertionError("condition not met in time")


def text_of(screen: Any, selector: str) -> str:
    return str(screen.query_one(selector, Static).content)


def notes(app: NyxApp) -> list[str]:
    return [f"{n.title or ''}: {n.message}" for n in app._notifications]


async def scanned(pilot: Pilot[Any], folder: str = "ds") -> DatasetsScreen:
    """Switch to the datasets mode, type the folder, press enter, wait for the scan and the thumbnail."""
    app = pilot.app
    await pilot.press("4")
    screen = app.screen
    assert isinstance(screen, DatasetsScreen)
    field = screen.query_one("#folder", Input)
    field.value = folder
    field.focus()
    await pilot.press("enter")
    await wait_until(pilot, lambda: session_of(app).dataset is not None and screen.stats is not None)
    await wait_until(pilot, lambda: screen.query_one(Thumb).shown_path is not None)
    return screen


async def to_tags(pilot: Pilot[Any], row: int) -> TagsScreen:
    screen = pilot.app.screen
    assert isinstance(screen, DatasetsScreen)
    table = screen.query_one("#images", DataTable)
    table.focus()
    table.move_cursor(row=row)
    await pilot.pause()
    await pilot.press("e")
    await wait_until(pilot, lambda: isinstance(pilot.app.screen, TagsScreen))
    tags = pilot.app.screen
    assert isinstance(tags, TagsScreen)
    await wait_until(pilot, lambda: tags.query_one("#tag-image", Thumb).shown_path is not None)
    return tags


# ------------------------------------------------------------------------------------------ datasets


@run_async
async def test_scan_shows_counts_folders_and_problems(ds: Path, nyx_home: Path) -> None:
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        screen = await scanned(pilot)
        assert "ds: 5 images, 3 captioned, 2 kohya folders" in text_of(screen, "#ds-status")
        folders = screen.query_one("#folders", DataTable)
        assert [folders.get_row_at(i) for i in range(folders.row_count)] == [
            ["./", "", "5"],
            ["  10_mychar/", "×10", "3"],
            ["  5_style/", "×5", "1"],
        ]
        images = screen.query_one("#images", DataTable)
        assert images.row_count == 5
        assert str(images.get_row_at(3)[2]) == "— no caption"
        stats = text_of(screen, "#stats")
        assert "Images 5  readable 5  per epoch 35" in stats
        assert "Captions 3  missing 2  empty 0" in stats
        assert "smile" in stats.split("Top tags")[1]
        problems = text_of(screen, "#problems")
        assert "1 image directly in the dataset folder is not trained on" in problems
        assert "fix: move it into a `N_name` folder" in problems
        assert "`10_mychar/c.png`" in problems
        # picking a folder lists only its images
        folders.focus()
        folders.move_cursor(row=2)
        await pilot.pause()
        assert [images.get_row_at(i)[0] for i in range(images.row_count)] == ["5_style/d.png"]
        # a bucket resolution recomputes the buckets
        field = screen.query_one("#resolution", Input)
        field.value = "512"
        field.focus()
        await pilot.press("enter")
        await wait_until(pilot, lambda: screen.stats is not None and screen.stats.settings.resolution == 512)
    # the folder is remembered for next time
    assert (nyx_home / "config" / "datasets.json").read_text().count(str(ds)) == 1


@run_async
async def test_preview_uses_the_halfcell_renderer_and_follows_the_cursor(ds: Path) -> None:
    from textual_image.widget import HalfcellImage

    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        screen = await scanned(pilot)
        thumb = screen.query_one(Thumb)
        assert isinstance(thumb.query_one(".thumb-image"), HalfcellImage)
        assert thumb.shown_path == ds / "loose.png"
        screen.query_one("#images", DataTable).focus()
        await pilot.press("down")
        await wait_until(pilot, lambda: thumb.shown_path == ds / "10_mychar" / "a.png")
        assert session_of(app).current == "10_mychar/a.png"


@run_async
async def test_a_missing_folder_is_reported_not_raised(tmp_path: Path) -> None:
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("4")
        screen = app.screen
        field = screen.query_one("#folder", Input)
        field.value = "nope"
        field.focus()
        await pilot.press("enter")
        await wait_until(pilot, lambda: "not scanned" in text_of(screen, "#ds-status"))
        assert "does not exist" in text_of(screen, "#ds-status")
        assert session_of(app).dataset is None


# ------------------------------------------------------------------------------------------ tags


@run_async
async def test_tags_shows_the_caption_and_saves_an_edit(ds: Path) -> None:
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await scanned(pilot)
        tags = await to_tags(pilot, 2)
        assert app.current_mode == "tags"
        area = tags.query_one("#caption", TextArea)
        assert area.text == "mychar, green"
        assert tags.query_one("#chips", TagChips).tags == ["mychar", "green"]
        assert "ds/10_mychar/b.png (3/5)" in text_of(tags, "#tags-title")
        # add a tag with the input (completion comes from the dataset's tags), remove one with its chip
        add = tags.query_one("#add-tag", Input)
        add.focus()
        await pilot.press("s", "m")
        assert add._suggestion == "smile"
        await pilot.press("right", "enter")
        assert area.text == "mychar, green, smile"
        chip = next(c for c in tags.query_one("#chips", TagChips).chips if c.tag == "green")
        await pilot.click(chip)
        await pilot.pause()
        assert area.text == "mychar, smile"
        assert tags.query_one("#chips", TagChips).tags == ["mychar", "smile"]
        await pilot.press("ctrl+s")
        await wait_until(pilot, lambda: (ds / "10_mychar/b.txt").read_text() == "mychar, smile")
        assert any("saved b.png" in n for n in notes(app))
        # the datasets screen shows the new caption when it comes back (escape goes back to it)
        await pilot.press("escape")
        assert app.current_mode == "datasets"
        images = app.screen.query_one("#images", DataTable)
        assert str(images.get_row_at(2)[2]) == "mychar, smile"


@run_async
async def test_a_caption_changed_on_disk_is_not_overwritten(ds: Path) -> None:
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await scanned(pilot)
        tags = await to_tags(pilot, 1)
        area = tags.query_one("#caption", TextArea)
        assert area.text == "mychar, smile, red hair"
        area.focus()
        await pilot.press("end", "comma", "space", "b", "o", "w")
        assert area.text == "mychar, smile, red hair, bow"
        (ds / "10_mychar/a.txt").write_text("edited elsewhere")
        await pilot.press("ctrl+s")
        await wait_until(pilot, lambda: any("not overwritten" in n for n in notes(app)))
        note = next(n for n in notes(app) if "not overwritten" in n)
        assert "NOT saved" in note and "mychar, smile, red hair, bow" in note
        assert (ds / "10_mychar/a.txt").read_text() == "edited elsewhere"
        assert area.text == "edited elsewhere"
        # saving again now works from what is on disk
        await pilot.press("end", "exclamation_mark")
        await pilot.press("ctrl+s")
        await wait_until(pilot, lambda: (ds / "10_mychar/a.txt").read_text() == "edited elsewhere!")


@run_async
async def test_drafts_survive_moving_between_images(ds: Path) -> None:
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await scanned(pilot)
        tags = await to_tags(pilot, 1)
        area = tags.query_one("#caption", TextArea)
        area.focus()
        await pilot.press("end", "x")
        await pilot.press("ctrl+down")
        assert tags.open_rel == "10_mychar/b.png" and area.text == "mychar, green"
        assert "1 unsaved" in text_of(tags, "#tags-title")
        await pilot.press("ctrl+up")
        assert area.text == "mychar, smile, red hairx"
        assert (ds / "10_mychar/a.txt").read_text() == CAPTIONS["10_mychar/a.txt"]


@run_async
async def test_bulk_add_to_a_selection_then_undo(ds: Path) -> None:
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await scanned(pilot)
        tags = await to_tags(pilot, 2)  # b.png
        tags.query_one("#tag-list", DataTable).focus()
        await pilot.press("space", "space")  # marks b, then c (no caption yet); the cursor moves on
        assert tags.marked == {"10_mychar/b.png", "10_mychar/c.png"}
        await pilot.press("plus")
        await wait_until(pilot, lambda: isinstance(app.screen, BulkPrompt))
        assert "2 marked images" in str(app.screen.query_one(".title", Static).content)
        await pilot.press(*"newtag", "enter")
        await wait_until(pilot, lambda: any("written" in n for n in notes(app)))
        assert (ds / "10_mychar/b.txt").read_text() == "mychar, green, newtag"
        assert (ds / "10_mychar/c.txt").read_text() == "newtag"
        assert (ds / "10_mychar/a.txt").read_text() == CAPTIONS["10_mychar/a.txt"]
        assert any("add 'newtag'" in n and "2 written" in n for n in notes(app))
        entry = session_of(app).entry("10_mychar/c.png")
        assert entry is not None and entry.caption == "newtag"
        await pilot.press("u")
        await wait_until(pilot, lambda: any("undo" in n and "2 restored" in n for n in notes(app)))
        assert (ds / "10_mychar/b.txt").read_text() == "mychar, green"
        assert not (ds / "10_mychar/c.txt").exists()
        entry = session_of(app).entry("10_mychar/c.png")
        assert entry is not None and entry.caption is None
        # replace over everything (nothing marked after clearing the marks)
        await pilot.press("a", "a")
        assert tags.marked == set()
        await pilot.press("asterisk")
        await wait_until(pilot, lambda: isinstance(app.screen, BulkPrompt))
        assert "ALL 5 images" in str(app.screen.query_one(".title", Static).content)
        await pilot.press(*"smile", "enter", *"grin", "enter")
        await wait_until(pilot, lambda: (ds / "5_style/d.txt").read_text() == "style, grin")
        assert (ds / "10_mychar/a.txt").read_text() == "mychar, grin, red hair"


@run_async
async def test_tags_without_a_dataset_says_what_to_do() -> None:
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("5")
        assert isinstance(app.screen, TagsScreen)
        assert app.screen.has_class("-empty")
        assert "scan a folder" in text_of(app.screen, "#tags-empty")


# ------------------------------------------------------------------------------------------ snapshots


def test_snapshot_datasets(snap_compare: Any, ds: Path) -> None:
    async def ready(pilot: Pilot[Any]) -> None:
        await scanned(pilot)
        pilot.app.screen.query_one("#images", DataTable).focus()
        await pilot.pause(0.1)

    assert snap_compare(make_app(), terminal_size=SIZE, run_before=ready)


def test_snapshot_tags(snap_compare: Any, ds: Path) -> None:
    async def ready(pilot: Pilot[Any]) -> None:
        await scanned(pilot)
        tags = await to_tags(pilot, 1)
        tags.query_one("#tag-list", DataTable).focus()
        await pilot.press("space")  # marks a.png, opens b.png
        await wait_until(pilot, lambda: tags.query_one("#tag-image", Thumb).shown_path == ds / "10_mychar/b.png")
        await pilot.pause(0.1)

    assert snap_compare(make_app(), terminal_size=SIZE, run_before=ready)


# ------------------------------------------------------------------------------------------ a WD14 job


def make_tagger(path: Path) -> Path:
    """A stand-in WD14 tagger (see NOTES.md and tests/test_wd14.py): the same probabilities for any image."""
    import numpy as np

    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper

    tags = [("general", 9, 0.9), ("sensitive", 9, 0.05), ("questionable", 9, 0.03), ("explicit", 9, 0.02),
            ("1girl", 0, 0.95), ("outdoors", 0, 0.6), ("hat", 0, 0.1)]  # fmt: skip
    p = np.array([t[2] for t in tags], dtype=np.float64)
    bias = np.log(p / (1 - p)).astype(np.float32)
    nodes = [
        helper.make_node("Transpose", ["input_1"], ["nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("GlobalAveragePool", ["nchw"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"]),
        helper.make_node("Gemm", ["flat", "W", "b"], ["logits"]),
        helper.make_node("Sigmoid", ["logits"], ["predictions_sigmoid"]),
    ]
    x = helper.make_tensor_value_info("input_1", TensorProto.FLOAT, ["batch", 32, 32, 3])
    y = helper.make_tensor_value_info("predictions_sigmoid", TensorProto.FLOAT, ["batch", len(tags)])
    inits = [
        helper.make_tensor("W", TensorProto.FLOAT, [3, len(tags)], [0.0] * (3 * len(tags))),
        helper.make_tensor("b", TensorProto.FLOAT, [len(tags)], bias.tolist()),
    ]
    model = helper.make_model(
        helper.make_graph(nodes, "wd14-stand-in", [x], [y], inits), opset_imports=[helper.make_opsetid("", 13)]
    )
    model.ir_version = 8
    path.mkdir(parents=True)
    onnx.save(model, str(path / "model.onnx"))
    rows = ["tag_id,name,category,count"] + [f"{i},{n},{c},{100 - i}" for i, (n, c, _) in enumerate(tags)]
    (path / "selected_tags.csv").write_text("\n".join(rows) + "\n")
    return path


@pytest.mark.slow
@run_async
async def test_wd14_job_from_the_screen(ds: Path, tmp_path: Path) -> None:
    model = make_tagger(tmp_path / "tagger")
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        screen = await scanned(pilot)
        version = session_of(app).version
        screen.query_one("#images", DataTable).focus()
        await pilot.press("w")
        await wait_until(pilot, lambda: isinstance(app.screen, JobDialog))
        app.screen.query_one("#model", Input).value = str(model)
        await pilot.press("ctrl+s")
        await wait_until(pilot, lambda: screen.job_id is not None)
        assert not screen.query_one("#job-bars").has_class("-idle")
        await wait_until(pilot, lambda: screen.job_state is not None, timeout=60)
        assert screen.job_state == "finished", notes(app)
        bar = screen.query_one("#job-bar", ProgressBar)
        assert (bar.progress, bar.total) == (5, 5)
        await wait_until(pilot, lambda: session_of(app).version > version + 0 and not screen.scanning, timeout=20)
        entry = session_of(app).entry("10_mychar/c.png")
        assert entry is not None and entry.caption == "1girl, outdoors"
    assert (ds / "10_mychar/a.txt").read_text() == "mychar, smile, red hair, 1girl, outdoors"
    assert (ds / "10_mychar/c.txt").read_text() == "1girl, outdoors"


@run_async
async def test_a_caption_job_that_cannot_run_is_refused_with_the_reason(ds: Path) -> None:
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        screen = await scanned(pilot)
        screen.query_one("#images", DataTable).focus()
        await pilot.press("c")
        await wait_until(pilot, lambda: isinstance(app.screen, JobDialog))
        app.screen.query_one("#model", Input).value = str(ds / "no-such-model")
        await pilot.press("ctrl+s")
        await wait_until(pilot, lambda: any("did not start" in n for n in notes(app)))
        assert screen.job_id is None
        assert not list((Path.cwd() / "nyx-home" / "jobs").glob("*"))


def test_the_new_bindings_can_be_remapped() -> None:
    from nyx_tui.app import MODE_TITLES, NyxApp, known_binding_ids

    ids = known_binding_ids()
    assert {"nyx.mode.datasets", "nyx.mode.tags", "nyx.datasets.wd14", "nyx.tags.save", "nyx.tags.undo"} <= ids
    assert {"datasets", "tags"} <= set(MODE_TITLES) <= set(NyxApp.MODES)


def test_the_dataset_screens_never_import_the_ml_stacks(ds: Path, nyx_home: Path) -> None:
    """Scan, open the tags editor and the job dialog in a fresh interpreter, then look at sys.modules."""
    import json
    import os
    import subprocess
    import sys

    code = """
import asyncio, json, sys
from nyx_tui.app import NyxApp

async def main():
    app = NyxApp(watch_terminal=False)
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.press("4")
        app.screen.query_one("#folder").value = "ds"
        app.screen.query_one("#folder").focus()
        await pilot.press("enter")
        for _ in range(100):
            await pilot.pause(0.05)
            if app.screen.stats is not None:
                break
        app.screen.query_one("#images").focus()
        await pilot.press("w")
        await pilot.pause(0.3)
        await pilot.press("escape", "c")
        await pilot.pause(0.3)
        await pilot.press("escape", "e")
        await pilot.pause(0.5)
        screens = [type(app.screen).__name__]
    loaded = [m for m in ("torch", "diffusers", "transformers", "onnxruntime") if m in sys.modules]
    print(json.dumps({"screens": screens, "loaded": loaded}))

asyncio.run(main())
"""
    env = {**os.environ, "NYX_HOME": str(nyx_home), "NYX_GPU": "none"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    answer = json.loads(out.stdout.strip().splitlines()[-1])
    assert answer == {"screens": ["TagsScreen"], "loaded": []}
