"""The LoRA screen driven for real with Pilot in NyxApp: open a real kohya-format LoRA file (written with
safetensors), see its family, rank and tags; edit its metadata (the tensors' bytes stay identical); a broken
file shows its error; a finished job's dashboard opens its LoRA here; the resize tool runs `nyx lora resize`
as a subprocess; the command lines the tools build; and a snapshot."""

from __future__ import annotations

import asyncio
import functools
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file
from textual.pilot import Pilot
from textual.widgets import DataTable, Input, OptionList, Select, TabbedContent

from nyx_tui.app import NyxApp
from nyx_tui.jobs.events import EventWriter
from nyx_tui.jobs.jobdir import JobDir, atomic_write
from nyx_tui.screens.lora import (
    LoraScreen,
    compare_command,
    compare_job_id,
    convert_command,
    resize_command,
    upload_command,
)

SIZE = (130, 40)
RANK, ALPHA = 4, 2
TAGS = {"10_mychar": {"mychar": 12, "smile": 3, "1girl": 10}, "5_extra": {"mychar": 5, "outdoors": 2}}
# kohya names for SD1.5: diffusers module paths with "." → "_"
UNET_MODULES = {
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": (32, 32),
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k": (32, 32),
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_v": (32, 64),
    "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_ff_net_2": (32, 128),
}
TE_MODULES = {"lora_te_text_model_encoder_layers_0_self_attn_q_proj": (32, 32)}


@pytest.fixture(autouse=True)
def _env(nyx_home: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("NYX_GPU", "none")
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    yield


def run_async(fn: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        asyncio.run(fn(*args, **kwargs))

    return wrapper


def make_lora(path: Path, *, title: str = "My character") -> Path:
    """A small SD1.5 LoRA in kohya's layout with the metadata sd-scripts writes."""
    rng = np.random.default_rng(0)
    tensors: dict[str, np.ndarray] = {}
    for name, (out_f, in_f) in {**UNET_MODULES, **TE_MODULES}.items():
        tensors[f"{name}.lora_down.weight"] = rng.standard_normal((RANK, in_f)).astype(np.float16)
        tensors[f"{name}.lora_up.weight"] = (0.01 * rng.standard_normal((out_f, RANK))).astype(np.float16)
        tensors[f"{name}.alpha"] = np.array(ALPHA, dtype=np.float16)
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(RANK),
        "ss_network_alpha": str(ALPHA),
        "ss_base_model_version": "sd_v1",
        "ss_learning_rate": "0.0001",
        "ss_unet_lr": "0.0001",
        "ss_text_encoder_lr": "5e-05",
        "ss_num_train_images": "15",
        "ss_num_epochs": "10",
        "ss_max_train_steps": "1500",
        "ss_resolution": "(512, 512)",
        "ss_optimizer": "torch.optim.AdamW",
        "ss_lr_scheduler": "cosine",
        "ss_mixed_precision": "fp16",
        "ss_output_name": "mychar",
        "ss_tag_frequency": json.dumps(TAGS),
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": "stable-diffusion-v1/lora",
        "modelspec.implementation": "diffusers",
        "modelspec.title": title,
        "modelspec.resolution": "512x512",
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)
    return path


def tensor_bytes(path: Path) -> bytes:
    """The file's data section (everything after the JSON header)."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return raw[8 + n :]


def file_metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="numpy") as f:
        return dict(f.metadata() or {})


def make_app(**kw: Any) -> NyxApp:
    return NyxApp(watch_terminal=False, **kw)


async def wait_until(pilot: Pilot[Any], predicate: Callable[[], object], timeout: float = 15, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            await pilot.pause()
            return
        await pilot.pause(0.05)
    raise AssertionError(f"not met in {timeout} s: {what or predicate}")


def lora_screen(app: NyxApp) -> LoraScreen:
    screen = app.screen
    assert isinstance(screen, LoraScreen), type(screen).__name__
    return screen


async def open_typed(pilot: Pilot[Any], path: Path | str) -> LoraScreen:
    """Switch to the LoRA mode by its key, type the path, press enter."""
    app = pilot.app
    assert isinstance(app, NyxApp)
    await pilot.press("7")
    await pilot.pause()
    screen = lora_screen(app)
    field = screen.query_one("#lora-path", Input)
    field.focus()
    field.value = str(path)
    await pilot.press("enter")
    return screen


def table_rows(screen: LoraScreen, selector: str) -> list[list[str]]:
    table = screen.query_one(selector, DataTable)
    return [[str(c) for c in table.get_row_at(i)] for i in range(table.row_count)]


# ---------------------------------------------------------------------------------------------- inspect


@run_async
async def test_open_by_key_and_path_shows_family_rank_and_tags(tmp_path: Path) -> None:
    lora = make_lora(tmp_path / "mychar.safetensors")
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_typed(pilot, lora)
        assert app.current_mode == "lora"
        await wait_until(pilot, lambda: screen.info is not None, what="the file inspected")
        assert screen.path == lora and screen.error is None
        summary = str(screen.query_one("#lora-summary").render())
        assert "mychar.safetensors" in summary
        assert "Family: sd15" in summary and "Kind: lora" in summary and "Keys: kohya" in summary
        assert f"Rank: {RANK}\n" in summary and f"Alpha: {ALPHA}\n" in summary
        modules = table_rows(screen, "#lora-modules")
        assert len(modules) == len(UNET_MODULES) + len(TE_MODULES)
        assert all(row[1] == str(RANK) for row in modules), modules
        assert all(float(row[2]) == ALPHA for row in modules), modules
        tags = table_rows(screen, "#lora-tags")
        assert tags[0] == ["mychar", "17"]  # summed over the two folders, most frequent first
        assert ["1girl", "10"] in tags and ["outdoors", "2"] in tags
        training = dict((r[0], r[1]) for r in table_rows(screen, "#lora-training"))
        assert any("0.0001" in v or "1e-04" in v for v in training.values()), training
        # the form holds the file's metadata
        assert screen.query_one("#meta-modelspec_title", Input).value == "My character"
        # and the file is now a recent one in the list
        await wait_until(pilot, lambda: any(f.path == lora.resolve() for f in screen.files), what="listed")


@run_async
async def test_a_broken_file_shows_its_error_not_a_traceback(tmp_path: Path) -> None:
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    missing = tmp_path / "nope.safetensors"
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_typed(pilot, broken)
        await wait_until(pilot, lambda: screen.error is not None, what="an error shown")
        error = str(screen.query_one("#lora-error").render())
        assert "broken.safetensors" in error and "Traceback" not in error
        assert screen.query_one("#lora-error").display and screen.path is None
        # a good file clears it; a missing one says so
        good = make_lora(tmp_path / "good.safetensors")
        screen.open_path(good)
        await wait_until(pilot, lambda: screen.info is not None and screen.error is None, what="error cleared")
        screen.open_path(missing)
        await wait_until(pilot, lambda: screen.error is not None, what="missing file error")
        assert "nope.safetensors" in str(screen.query_one("#lora-error").render())
        assert app.is_running


# ---------------------------------------------------------------------------------------------- metadata


@run_async
async def test_edit_title_and_save_changes_metadata_not_tensors(tmp_path: Path) -> None:
    lora = make_lora(tmp_path / "mychar.safetensors")
    before = tensor_bytes(lora)
    old_meta = file_metadata(lora)
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_typed(pilot, lora)
        await wait_until(pilot, lambda: screen.info is not None, what="inspected")
        await pilot.press("f3")
        assert screen.query_one("#lora-tabs", TabbedContent).active == "tab-meta"
        field = screen.query_one("#meta-modelspec_title", Input)
        field.focus()
        field.value = ""
        await pilot.press(*"Night owl v2")
        await pilot.press("ctrl+s")
        await wait_until(
            pilot,
            lambda: "saved, tensors unchanged" in str(screen.query_one("#meta-status").render()),
            what="saved",
        )
        await wait_until(pilot, lambda: screen.metadata.get("modelspec.title") == "Night owl v2", what="re-read")
    after = file_metadata(lora)
    assert after["modelspec.title"] == "Night owl v2"
    assert {k: v for k, v in after.items() if k != "modelspec.title"}.items() >= {
        k: v for k, v in old_meta.items() if k != "modelspec.title"
    }.items()
    assert tensor_bytes(lora) == before
    with safe_open(str(lora), framework="numpy") as f:
        assert len(list(f.keys())) == 3 * (len(UNET_MODULES) + len(TE_MODULES))


# ---------------------------------------------------------------------------------------------- from the dashboard


def finished_job_with_lora(home: Path, source: Path) -> tuple[JobDir, Path]:
    """A finished training job's folder written by hand: spec, status, events with a lora artifact."""
    job_id = "20261128-120000-mychar"
    job = JobDir(home / "jobs" / job_id)
    (job.path / "output").mkdir(parents=True)
    target = job.path / "output" / "mychar.safetensors"
    shutil.copyfile(source, target)
    spec = {"id": job_id, "kind": "train", "name": "mychar", "argv": ["true"], "env": {}, "created": 1.79e9}
    atomic_write(job.spec_path, json.dumps(spec))
    atomic_write(job.status_path, json.dumps({"state": "finished", "created": 1.79e9, "started": 1.79e9 + 5}))
    with EventWriter(job.events_path) as events:
        events.emit("start", job=job_id, job_kind="train", total_steps=10)
        events.emit("step", step=10, total=10, loss=0.1, loss_avg=0.1, lr=[1e-4], it_s=2.0, eta_s=0.0)
        events.emit("artifact", path="output/mychar-000005.safetensors", what="lora", step=5)
        events.emit("artifact", path="output/mychar.safetensors", what="lora", step=10)
        events.emit("end", state="finished", exit_code=0)
    return job, target


@run_async
async def test_dashboard_key_opens_the_finished_runs_lora(tmp_path: Path, nyx_home: Path) -> None:
    job, target = finished_job_with_lora(nyx_home, make_lora(tmp_path / "src.safetensors"))
    app = make_app(job_id=job.id)
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: getattr(app.screen, "replayed", False), what="dashboard replayed")
        assert app.current_mode == "train"
        await pilot.press("t")
        await wait_until(pilot, lambda: isinstance(app.screen, LoraScreen), what="the LoRA screen")
        screen = lora_screen(app)
        await wait_until(pilot, lambda: screen.info is not None, what="inspected")
        assert screen.path == target
        assert screen.query_one("#lora-path", Input).value == str(target)
        # both of the job's files are listed once: the final one (opened, so a recent file) first
        await wait_until(pilot, lambda: any(f.source == "job" for f in screen.files), what="job files listed")
        assert [(f.path.name, f.source) for f in screen.files] == [
            ("mychar.safetensors", "recent"),
            ("mychar-000005.safetensors", "job"),
        ]
        assert screen.files[1].label.startswith(f"{job.id}: mychar-000005.safetensors")


# ---------------------------------------------------------------------------------------------- tools


def test_tool_command_lines() -> None:
    lora = Path("/data/loras/mychar.safetensors")
    py = [sys.executable, "-m", "nyx_tui", "lora"]
    argv, out = resize_command(lora, method="rank", value=" 8 ", output="")
    assert out == Path("/data/loras/mychar-r8.safetensors")
    assert argv == [*py, "resize", str(lora), "-o", str(out), "--rank", "8", "--json"]
    argv, out = resize_command(lora, method="sv_fro", value="0.9", output="/tmp/x.safetensors")
    assert argv == [*py, "resize", str(lora), "-o", "/tmp/x.safetensors", "--dynamic", "sv_fro", "--param", "0.9",
                    "--json"]  # fmt: skip
    with pytest.raises(ValueError, match="whole number"):
        resize_command(lora, method="rank", value="eight")
    with pytest.raises(ValueError, match="at least 1"):
        resize_command(lora, method="rank", value="0")
    with pytest.raises(ValueError, match="is the input"):
        resize_command(lora, method="rank", value="4", output=str(lora))
    argv, out = convert_command(lora, target="diffusers")
    assert argv == [*py, "convert", str(lora), "-o", "/data/loras/mychar-diffusers.safetensors", "--to", "diffusers"]
    with pytest.raises(ValueError, match="unknown format"):
        convert_command(lora, target="peft")
    argv, out = compare_command(lora, model="/m/sd15", prompt="a photo of mychar", strengths="0, 0.5 ,1")
    assert argv == [*py, "compare", str(lora), "--model", "/m/sd15", "--prompt", "a photo of mychar",
                    "--strength", "0,0.5,1", "-o", "/data/loras/mychar-compare.png", "--detach"]  # fmt: skip
    with pytest.raises(ValueError, match="not a number"):
        compare_command(lora, model="/m", prompt="p", strengths="0,half")
    with pytest.raises(ValueError, match="base model"):
        compare_command(lora, model=" ", prompt="p", strengths="1")
    assert upload_command(lora, repo="me/my-lora", private=True) == [
        *py, "upload", str(lora), "--repo", "me/my-lora", "--private",
    ]  # fmt: skip
    assert "--private" not in upload_command(lora, repo="me/my-lora", private=False)
    assert upload_command(lora, repo="my-lora", private=False)[-2:] == ["--repo", "my-lora"]  # under the user
    for bad in ("a/b/c", "me/my lora", ""):
        with pytest.raises(ValueError, match="OWNER/NAME"):
            upload_command(lora, repo=bad, private=False)


def resize_cli_exists() -> bool:
    out = subprocess.run([sys.executable, "-m", "nyx_tui", "lora", "resize", "--help"], capture_output=True, text=True)
    return out.returncode == 0 and "--rank" in out.stdout


@run_async
async def test_resize_runs_the_cli_and_the_new_file_appears(tmp_path: Path) -> None:
    assert resize_cli_exists(), "`nyx lora resize` is not available"
    lora = make_lora(tmp_path / "mychar.safetensors")
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_typed(pilot, lora)
        await wait_until(pilot, lambda: screen.info is not None, what="inspected")
        await pilot.press("f4")
        screen.query_one("#resize-method", Select).value = "rank"
        screen.query_one("#resize-value", Input).value = "2"
        status = await run_tool(pilot, screen, "#resize-run", timeout=120)
        out = tmp_path / "mychar-r2.safetensors"
        assert screen.last_command == resize_command(lora, method="rank", value="2")[0]
        assert "done" in status and str(out) in status, status
        assert out.exists()
        with safe_open(str(out), framework="numpy") as f:
            downs = [k for k in f.keys() if k.endswith("lora_down.weight")]  # noqa: SIM118
            assert downs and all(f.get_slice(k).get_shape()[0] == 2 for k in downs)
        await wait_until(pilot, lambda: any(f.path == out.resolve() for f in screen.files), what="new file listed")


async def run_tool(pilot: Pilot[Any], screen: LoraScreen, button: str, timeout: float = 90) -> str:
    """Press a tool's button on the Tools tab, wait for its subprocess to end; the status text."""
    widget = screen.query_one(button)
    widget.scroll_visible(animate=False)
    await pilot.pause()
    done = screen.tools_done
    widget.press()  # type: ignore[attr-defined]
    await wait_until(pilot, lambda: screen.tools_done > done, timeout=timeout, what=f"{button} finished")
    return str(screen.query_one("#action-status").render())


@run_async
async def test_convert_to_diffusers_writes_a_new_file_and_opens_it_from_the_list(tmp_path: Path) -> None:
    lora = make_lora(tmp_path / "mychar.safetensors")
    before = lora.read_bytes()
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_typed(pilot, lora)
        await wait_until(pilot, lambda: screen.info is not None, what="inspected")
        await pilot.press("f4")
        screen.query_one("#convert-to", Select).value = "diffusers"
        status = await run_tool(pilot, screen, "#convert-run")
        out = tmp_path / "mychar-diffusers.safetensors"
        assert "convert: done" in status and str(out) in status, status
        with safe_open(str(out), framework="numpy") as f:
            keys = list(f.keys())
        assert keys and all(k.startswith(("unet.", "text_encoder.")) for k in keys), keys[:4]
        assert lora.read_bytes() == before  # the input is never touched
        # the new file heads the list; picking it there opens it
        await wait_until(pilot, lambda: screen.files and screen.files[0].path == out.resolve(), what="listed first")
        await pilot.press("f2")
        files = screen.query_one("#lora-files", OptionList)
        files.focus()
        files.highlighted = 0
        await pilot.press("enter")
        await wait_until(pilot, lambda: screen.path == out.resolve() and screen.info is not None, what="opened")
        summary = str(screen.query_one("#lora-summary").render())
        assert "Keys: peft" in summary and "Family: sd15" in summary, summary  # diffusers' (peft) key names


@run_async
async def test_upload_takes_the_token_from_settings_and_says_how_to_set_it(tmp_path: Path) -> None:
    """No token anywhere: the CLI refuses before any network; the screen shows its fix. The token is never
    a field: the form has the repo and the private box only."""
    lora = make_lora(tmp_path / "mychar.safetensors")
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_typed(pilot, lora)
        await wait_until(pilot, lambda: screen.info is not None, what="inspected")
        await pilot.press("f4")
        assert "no token" in str(screen.query_one("#upload-token").render())
        assert not [i for i in screen.query(Input) if "token" in (i.id or "") or i.password]
        screen.query_one("#upload-repo", Input).value = "me/my-lora"
        status = await run_tool(pilot, screen, "#upload-run")
        assert screen.last_command == upload_command(lora, repo="me/my-lora", private=True)
        assert "upload failed" in status and "HF_TOKEN" in status, status
        assert "Traceback" not in status


@run_async
async def test_compare_errors_are_shown_and_a_started_job_opens_the_dashboard(tmp_path: Path, nyx_home: Path) -> None:
    lora = make_lora(tmp_path / "mychar.safetensors")
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_typed(pilot, lora)
        await wait_until(pilot, lambda: screen.info is not None, what="inspected")
        await pilot.press("f4")
        screen.query_one("#compare-model", Input).value = str(tmp_path / "no-such-model")
        screen.query_one("#compare-prompt", Input).value = "a photo of mychar"
        status = await run_tool(pilot, screen, "#compare-run")
        assert "compare failed" in status and "no-such-model" in status, status
        assert app.current_mode == "lora"
        # a detached compare prints its job id last on stdout; the screen then opens the dashboard on it
        job_id = "20261128-120000-compare-mychar"
        assert compare_job_id(f"note\n{job_id}\n") == job_id and compare_job_id("no id here") is None
        (nyx_home / "jobs" / job_id).mkdir(parents=True)
        screen.post_message(LoraScreen.ToolDone("compare", True, "", None, job_id))
        await wait_until(pilot, lambda: app.current_mode == "train", what="the dashboard")
        assert app.current_job == job_id


# ---------------------------------------------------------------------------------------------- process hygiene


def test_the_lora_screen_never_imports_torch(nyx_home: Path, tmp_path: Path) -> None:
    """Open a file on the LoRA screen in a fresh interpreter, then look at sys.modules."""
    lora = make_lora(tmp_path / "mychar.safetensors")
    code = f"""
import asyncio, json, sys
from nyx_tui.app import NyxApp

async def main():
    app = NyxApp(watch_terminal=False)
    async with app.run_test(size=(120, 32)) as pilot:
        await pilot.press("7")
        await pilot.pause(0.3)
        screen = app.screen
        screen.open_path(__import__("pathlib").Path({str(lora)!r}))
        for _ in range(100):
            await pilot.pause(0.05)
            if screen.info is not None or screen.error:
                break
        name, ok = type(screen).__name__, screen.info is not None
    loaded = [m for m in ("torch", "diffusers", "transformers", "peft") if m in sys.modules]
    print(json.dumps({{"screen": name, "ok": ok, "loaded": loaded}}))

asyncio.run(main())
"""
    env = {**os.environ, "NYX_HOME": str(nyx_home), "NYX_GPU": "none"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    answer = json.loads(out.stdout.strip().splitlines()[-1])
    assert answer == {"screen": "LoraScreen", "ok": True, "loaded": []}


# ---------------------------------------------------------------------------------------------- snapshot


def test_snapshot_lora_screen(snap_compare: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file opened by a relative path (the snapshot must not show the temp folder's name)."""
    monkeypatch.chdir(tmp_path)
    make_lora(tmp_path / "mychar.safetensors")

    async def opened(pilot: Pilot[Any]) -> None:
        screen = await open_typed(pilot, "mychar.safetensors")
        await wait_until(pilot, lambda: screen.info is not None and len(screen.files) == 1, what="inspected")
        await wait_until(
            pilot, lambda: all(w.is_finished for w in pilot.app.workers if w.node is screen), what="workers done"
        )
        screen.set_focus(None)  # no blinking cursor in the path field: stable pixels
        await pilot.pause(0.2)

    assert snap_compare(make_app(), terminal_size=SIZE, run_before=opened)


def test_every_lora_binding_has_an_id_and_the_keymap_knows_them() -> None:
    from textual.binding import Binding

    from nyx_tui.app import known_binding_ids
    from nyx_tui.screens.dashboard import DashboardScreen

    ids = known_binding_ids()
    for binding in LoraScreen.BINDINGS:
        assert isinstance(binding, Binding) and binding.id and binding.id in ids, binding
    assert {"nyx.mode.lora", "nyx.dashboard.lora_tools"} <= ids
    keys = {b.key: b.id for b in DashboardScreen.BINDINGS if isinstance(b, Binding)}
    assert keys["t"] == "nyx.dashboard.lora_tools" and keys["l"] == "nyx.dashboard.toggle_output"
