"""Dashboard tests: Pilot behaviour and snapshots. Deterministic: fixed job ids, fixed event times,
fixed terminal sizes, `NYX_GPU=none` (or a fixed fake GPU report), the halfcell image renderer, and a
sample image drawn by code."""

from __future__ import annotations

import asyncio
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from textual.app import App
from textual.message import Message
from textual.pilot import Pilot
from textual.reactive import reactive

from nyx_tui import gpu
from nyx_tui.jobs import jobdir
from nyx_tui.jobs.events import EventWriter
from nyx_tui.jobs.jobdir import JobDir, create_job
from nyx_tui.screens.dashboard import ConfirmScreen, DashboardScreen, JobPickerScreen
from nyx_tui.screens.messages import ControlJob, OpenJob, StartDemo
from nyx_tui.widgets.log_view import LogTail


@pytest.fixture(autouse=True)
def _env(nyx_home: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("NYX_GPU", "none")
    monkeypatch.setenv("NYX_IMAGE_RENDERER", "halfcell")
    yield


FAKE_GPU = gpu.GpuReport(
    gpus=[
        gpu.GpuInfo(
            index=0,
            name="NVIDIA H100 80GB HBM3",
            util_pct=97,
            mem_used_mb=61_440,
            mem_total_mb=81_559,
            temp_c=64,
            power_w=612.4,
            power_limit_w=700.0,
        )
    ]
)


def write_sample_png(job: JobDir, rel: str) -> None:
    """A deterministic 64×64 gradient standing in for a sample image."""
    from PIL import Image

    path = job.path / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.new("RGB", (64, 64))
    im.putdata([(x * 4, y * 4, 128) for y in range(64) for x in range(64)])
    im.save(path)


class HostApp(App[None]):
    """Stands in for NyxApp: owns `current_job`, pushes the dashboard, records messages."""

    current_job: reactive[str | None] = reactive(None)

    def __init__(self, job_id: str | None = None) -> None:
        super().__init__()
        self.job_id = job_id
        self.messages: list[Message] = []
        self.copied: list[str] = []

    def on_mount(self) -> None:
        self.current_job = self.job_id
        self.push_screen(DashboardScreen(self.job_id))

    def on_control_job(self, message: ControlJob) -> None:
        self.messages.append(message)

    def on_open_job(self, message: OpenJob) -> None:
        self.messages.append(message)
        self.current_job = message.job_id

    def on_start_demo(self, message: StartDemo) -> None:
        self.messages.append(message)

    def copy_to_clipboard(self, text: str) -> None:
        self.copied.append(text)


class T:
    """A fixed clock for event times."""

    def __init__(self) -> None:
        self.t = 1_795_846_583.0

    def __call__(self) -> float:
        self.t += 0.5
        return self.t


def make_job(monkeypatch: pytest.MonkeyPatch, name: str, *, running: bool) -> tuple[JobDir, EventWriter, int | None]:
    monkeypatch.setattr(jobdir, "new_job_id", lambda n, root=None: f"20261128-120000-{n}")
    job = create_job("train", name, ["true"])
    fd = None
    if running:
        fd = job.try_lock()
        assert fd is not None
        job.write_status(state="running")
    return job, EventWriter(job.events_path), fd


def emit(w: EventWriter, clock: T, kind: str, **fields: Any) -> None:
    """Like EventWriter.emit with a fixed `t`."""
    import json

    event = {"v": 1, "t": clock(), "kind": kind, **fields}
    os.write(w._fd, (json.dumps(event) + "\n").encode())


def emit_steps(w: EventWriter, clock: T, first: int, last: int, total: int = 400) -> None:
    for i in range(first, last + 1):
        loss = 0.12 + 0.08 * math.exp(-i / 80) + 0.02 * math.sin(i * 1.7)
        avg = 0.12 + 0.08 * math.exp(-i / 80)
        emit(
            w,
            clock,
            "step",
            step=i,
            total=total,
            epoch=1 + (i - 1) // 100,
            loss=round(loss, 5),
            loss_avg=round(avg, 5),
            lr=[1e-4],
            it_s=2.5,
            eta_s=(total - i) / 2.5,
        )


def running_history(w: EventWriter, clock: T, upto: int = 250) -> None:
    emit(w, clock, "start", job="j", job_kind="train", total_steps=400, total_epochs=4)
    job_path = Path(w.path).parent
    write_sample_png(JobDir(job_path), f"output/samples/{upto // 2:06d}-0.png")
    emit(w, clock, "log", level="info", message="loading model")
    emit(w, clock, "log", level="warning", message="xformers not available, using sdpa")
    emit_steps(w, clock, 1, upto // 2)
    emit(w, clock, "artifact", path=f"output/mychar-{upto // 2:06d}.safetensors", what="lora", step=upto // 2)
    emit(
        w,
        clock,
        "sample",
        step=upto // 2,
        images=[f"output/samples/{upto // 2:06d}-0.png"],
        prompts=["a photo of mychar"],
    )
    emit(w, clock, "log", level="info", message=f"saved output/mychar-{upto // 2:06d}.safetensors")
    emit_steps(w, clock, upto // 2 + 1, upto)


async def settle(pilot: Pilot[Any], until: Any = None, timeout: float = 5.0) -> DashboardScreen:
    screen = pilot.app.screen
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        await pilot.pause(0.05)
        screen = pilot.app.screen
        if isinstance(screen, DashboardScreen) and screen.replayed and (until is None or until(screen)):
            await pilot.pause()
            return screen
    raise AssertionError("dashboard did not settle")


def header(screen: DashboardScreen) -> str:
    return str(screen.query_one("#header").render())


# ---------------------------------------------------------------------------- Pilot tests
def test_replay_shows_step_and_loss(monkeypatch: pytest.MonkeyPatch) -> None:
    job, w, fd = make_job(monkeypatch, "replay", running=True)
    running_history(w, T())

    async def run() -> None:
        app = HostApp(job.id)
        async with app.run_test(size=(120, 36)) as pilot:
            screen = await settle(pilot)
            text = header(screen)
            assert "step 250/400" in text and "▶ running" in text and "loss 0." in text
            assert screen.series.final_lora() == "output/mychar-000125.safetensors"
            assert len(screen.series.history()) == 250

    asyncio.run(run())
    os.close(fd or -1)


def test_header_shows_the_latest_validation_loss(monkeypatch: pytest.MonkeyPatch) -> None:
    job, w, fd = make_job(monkeypatch, "val", running=True)
    clock = T()
    emit(w, clock, "start", job="j", job_kind="train", total_steps=400)
    emit_steps(w, clock, 1, 20)
    emit(w, clock, "metric", name="val_loss", value=0.2345, step=10)
    emit(w, clock, "metric", name="val_loss", value=0.1234, step=20)

    async def run() -> None:
        app = HostApp(job.id)
        async with app.run_test(size=(140, 36)) as pilot:
            screen = await settle(pilot)
            assert "val 0.1234@20" in header(screen)

    asyncio.run(run())
    os.close(fd or -1)


def test_live_follow_and_end(monkeypatch: pytest.MonkeyPatch) -> None:
    job, w, fd = make_job(monkeypatch, "live", running=True)
    clock = T()
    running_history(w, clock, upto=10)

    async def run() -> None:
        app = HostApp(job.id)
        async with app.run_test(size=(120, 36)) as pilot:
            screen = await settle(pilot)
            assert "step 10/400" in header(screen)
            emit_steps(w, clock, 11, 42)
            await settle(pilot, lambda s: "step 42/400" in header(s))
            emit(w, clock, "artifact", path="output/live.safetensors", what="lora", step=42)
            emit(w, clock, "end", state="finished", exit_code=0)
            job.write_status(state="finished")
            screen = await settle(pilot, lambda s: "✔ finished" in header(s))
            assert "output/live.safetensors" in str(screen.query_one("#endinfo").render())
            await pilot.press("o")
            assert app.copied == [str(job.path / "output/live.safetensors")]

    asyncio.run(run())
    os.close(fd or -1)


def test_replay_in_small_chunks_with_a_torn_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """Replay reads the log in chunks; lines split across chunks and a line still being written when
    the dashboard opened are neither lost nor read twice."""
    from nyx_tui.screens import dashboard

    monkeypatch.setattr(dashboard, "REPLAY_CHUNK", 997)
    job, w, fd = make_job(monkeypatch, "chunks", running=True)
    clock = T()
    running_history(w, clock, upto=100)
    os.write(w._fd, b'{"v":1,"t":1795846999.0,"kind":"step","step":101,"total":400,')  # torn: no newline yet

    async def run() -> None:
        app = HostApp(job.id)
        async with app.run_test(size=(120, 36)) as pilot:
            screen = await settle(pilot)
            assert "step 100/400" in header(screen)
            os.write(w._fd, b'"epoch":2,"loss":0.1,"loss_avg":0.1,"lr":[1e-4],"it_s":2.5,"eta_s":1}\n')
            screen = await settle(pilot, lambda s: "step 101/400" in header(s))
            assert screen.series.events_seen == 100 + 6 + 1  # steps, start/logs/artifact/sample, the torn one
            assert [p.step for p in screen.series.history()] == list(range(1, 102))

    asyncio.run(run())
    os.close(fd or -1)


def test_stop_confirms_then_posts(monkeypatch: pytest.MonkeyPatch) -> None:
    job, w, fd = make_job(monkeypatch, "stop", running=True)
    running_history(w, T(), upto=20)

    async def run() -> None:
        app = HostApp(job.id)
        async with app.run_test(size=(120, 36)) as pilot:
            await settle(pilot)
            await pilot.press("s")
            await pilot.pause()
            assert isinstance(app.screen, ConfirmScreen)
            await pilot.press("n")
            await pilot.pause()
            assert not [m for m in app.messages if isinstance(m, ControlJob)]
            await pilot.press("s")
            await pilot.pause()
            await pilot.press("y")
            await pilot.pause()
            sent = [(m.job_id, m.command) for m in app.messages if isinstance(m, ControlJob)]
            assert sent == [(job.id, "stop")]
            await pilot.press("x", "y")
            await pilot.pause()
            await pilot.press("v", "p")
            await pilot.pause()
            sent = [(m.job_id, m.command) for m in app.messages if isinstance(m, ControlJob)]
            assert sent == [(job.id, c) for c in ("stop", "cancel", "save_now", "sample_now")]

    asyncio.run(run())
    os.close(fd or -1)


def test_save_now_refused_on_ended_job(monkeypatch: pytest.MonkeyPatch) -> None:
    job, w, _ = make_job(monkeypatch, "ended", running=False)
    clock = T()
    running_history(w, clock, upto=20)
    emit(w, clock, "end", state="cancelled", reason="stopped on request", exit_code=0)
    job.write_status(state="cancelled")

    async def run() -> None:
        app = HostApp(job.id)
        async with app.run_test(size=(120, 36)) as pilot:
            screen = await settle(pilot)
            assert "■ cancelled" in header(screen)
            await pilot.press("v", "s")
            await pilot.pause()
            assert not isinstance(app.screen, ConfirmScreen)
            assert not app.messages

    asyncio.run(run())


def test_empty_state_and_cycle(monkeypatch: pytest.MonkeyPatch) -> None:
    a, wa, fa = make_job(monkeypatch, "a", running=True)
    b, wb, fb = make_job(monkeypatch, "b", running=True)
    running_history(wa, T(), upto=5)
    running_history(wb, T(), upto=7)

    async def run() -> None:
        app = HostApp(None)
        async with app.run_test(size=(100, 30)) as pilot:
            await pilot.pause(0.2)
            first = app.screen
            assert isinstance(first, DashboardScreen)
            assert first.query_one("#empty").display
            await pilot.press("right_square_bracket")
            screen = await settle(pilot, lambda s: s.job is not None and s.job.id == a.id)
            assert "step 5/400" in header(screen)
            await pilot.press("right_square_bracket")
            screen = await settle(pilot, lambda s: s.job is not None and s.job.id == b.id and "step 7/" in header(s))
            assert [m.job_id for m in app.messages if isinstance(m, OpenJob)] == [a.id, b.id]

    asyncio.run(run())
    os.close(fa or -1)
    os.close(fb or -1)


def test_pick_any_job(monkeypatch: pytest.MonkeyPatch) -> None:
    a, wa, fa = make_job(monkeypatch, "run-a", running=True)
    running_history(wa, T(), upto=5)
    b, wb, _ = make_job(monkeypatch, "done-b", running=False)
    clock = T()
    running_history(wb, clock, upto=9)
    emit(wb, clock, "end", state="finished", exit_code=0)
    b.write_status(state="finished")

    async def run() -> None:
        app = HostApp(a.id)
        async with app.run_test(size=(100, 30)) as pilot:
            await settle(pilot)
            await pilot.press("j")
            await pilot.pause(0.2)
            assert isinstance(app.screen, JobPickerScreen)
            picker = app.screen.query_one("OptionList")
            labels = [str(picker.get_option_at_index(i).prompt) for i in range(picker.option_count)]  # type: ignore[attr-defined]
            assert any("finished" in x and b.id in x for x in labels) and any("running" in x for x in labels)
            # newest id first: run-a sorts after done-b; the current job is highlighted
            await pilot.press("down", "enter")
            screen = await settle(pilot, lambda s: s.job is not None and s.job.id == b.id and "✔ finished" in header(s))
            assert "step 9/400" in header(screen)
            assert [m.job_id for m in app.messages if isinstance(m, OpenJob)] == [b.id]

    asyncio.run(run())
    os.close(fa or -1)


def test_empty_state_offers_demo(monkeypatch: pytest.MonkeyPatch) -> None:
    async def run() -> None:
        app = HostApp(None)
        async with app.run_test(size=(100, 30)) as pilot:
            await pilot.pause(0.1)
            assert "d  start the demo" in str(app.screen.query_one("#empty-text").render())
            await pilot.press("d")
            await pilot.pause(0.1)
            assert [type(m) for m in app.messages] == [StartDemo]

    asyncio.run(run())


def frame(i: int, total: int = 100_000) -> str:
    return (
        f"steps: {i * 100 // total:3d}%|{'#' * (i * 20 // total):20}| {i}/{total} [00:10<00:20, 1.33it/s, avr_loss=0.1]"
    )


def tqdm_frames(first: int, last: int) -> bytes:
    """sd-scripts' progress bar: each redraw starts with a bare \\r and ends with nothing."""
    return "".join(f"\r{frame(i)}" for i in range(first, last + 1)).encode()


def test_output_log_tail_collapses_redraws_and_reads_only_what_is_new(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from nyx_tui.widgets import log_view

    reads: list[int] = []
    real_open = open

    class Counting:
        def __init__(self, path: Path, mode: str) -> None:
            self.f = real_open(path, mode)

        def __enter__(self) -> Counting:
            return self

        def __exit__(self, *exc: object) -> None:
            self.f.close()

        def fileno(self) -> int:
            return self.f.fileno()

        def seek(self, n: int) -> int:
            return self.f.seek(n)

        def read(self, n: int = -1) -> bytes:
            data = self.f.read(n)
            reads.append(len(data))
            return data

    monkeypatch.setattr(log_view, "open", Counting, raising=False)
    path = tmp_path / "output.log"
    path.write_bytes(b"\x1b[1mloading model\x1b[0m\nepoch 1/10\n" + tqdm_frames(1, 40_000))  # ~4 MB, no newline
    tail = log_view.OutputLogTail(path, start_bytes=64 << 10)
    assert tail.poll()
    assert reads == [64 << 10]  # opening reads the end of the file only
    # the lines before the bar were further back than that; the bar is one line: the frame before the last
    # (the last one has no end yet)
    assert tail.lines == [frame(39_999)]
    with open(path, "ab") as f:
        f.write(tqdm_frames(40_001, 40_500))
    assert tail.poll() and tail.lines == [frame(40_499)]
    assert reads[-1] == len(tqdm_frames(40_001, 40_500))  # only what was appended
    assert not tail.poll() and reads[-1] == 0
    with open(path, "ab") as f:
        f.write(b"\nsaving checkpoint: output/a.safetensors\n")
    assert tail.poll() and tail.lines == [frame(40_500), "saving checkpoint: output/a.safetensors"]

    # a small log from the start: every line; a flood larger than max_bytes skips ahead
    small = tmp_path / "small.log"
    small.write_bytes(b"a\nb\n" + tqdm_frames(1, 3) + b"\n")
    t2 = log_view.OutputLogTail(small, max_bytes=100_000)
    assert t2.poll() and t2.lines == ["a", "b", frame(3)]
    with open(small, "ab") as f:
        f.write(b"half a line" + tqdm_frames(4, 9_000) + b"\ndone\n")
    reads.clear()
    assert t2.poll() and reads == [100_000]
    assert t2.lines == ["a", "b", frame(3), frame(9_000), "done"]  # "half a line…" was skipped


def test_output_view_toggles_and_shows_a_progress_bar_as_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    job, w, fd = make_job(monkeypatch, "raw", running=True)
    clock = T()
    running_history(w, clock, upto=20)
    job.log_path.write_bytes(b"loading model\n" + tqdm_frames(1, 500))  # ~45 KB: all of it is read

    async def run() -> None:
        app = HostApp(job.id)
        async with app.run_test(size=(120, 36)) as pilot:
            screen = await settle(pilot)
            log = screen.query_one("#log", LogTail)
            assert any("xformers" in line for line in log.lines)
            await pilot.press("l")
            await settle(pilot, lambda s: log.lines == ["loading model", frame(499)])
            assert log.lines[0] == "loading model" and log.border_title
            with open(job.log_path, "ab") as f:
                f.write(tqdm_frames(501, 5_000))
            await settle(pilot, lambda s: log.lines[-1] == frame(4_999))
            assert len(log.lines) == 2  # redrawn in place, not a flood
            await pilot.press("l")
            await settle(pilot, lambda s: any("xformers" in line for line in log.lines))
            assert not any("steps:" in line for line in log.lines) and not log.border_title

    asyncio.run(run())
    os.close(fd or -1)


# ---------------------------------------------------------------------------- snapshots
def _snap_running(monkeypatch: pytest.MonkeyPatch) -> tuple[HostApp, int | None]:
    job, w, fd = make_job(monkeypatch, "mychar", running=True)
    running_history(w, T())
    return HostApp(job.id), fd


async def settle_with_image(pilot: Pilot[Any]) -> None:
    """Settled, the sample thumbnail and the first GPU reading (both from thread workers) are on screen."""
    await settle(
        pilot, lambda s: s.query_one("#samples").shown_path is not None and s.query_one("#gpu").report is not None
    )


def test_snapshot_running(snap_compare: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gpu, "sample", lambda: FAKE_GPU)
    app, fd = _snap_running(monkeypatch)
    assert snap_compare(app, terminal_size=(120, 36), run_before=settle_with_image)
    os.close(fd or -1)


def test_snapshot_no_gpu(snap_compare: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    app, fd = _snap_running(monkeypatch)
    assert snap_compare(app, terminal_size=(120, 36), run_before=settle_with_image)
    os.close(fd or -1)


def test_snapshot_empty(snap_compare: Any) -> None:
    async def ready(pilot: Pilot[Any]) -> None:
        await pilot.pause(0.2)

    assert snap_compare(HostApp(None), terminal_size=(100, 30), run_before=ready)


def test_snapshot_running_80x24(snap_compare: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    app, fd = _snap_running(monkeypatch)
    assert snap_compare(app, terminal_size=(80, 24), run_before=settle_with_image)
    os.close(fd or -1)


def test_snapshot_finished(snap_compare: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    job, w, _ = make_job(monkeypatch, "mychar", running=False)
    clock = T()
    running_history(w, clock, upto=400)
    emit(w, clock, "artifact", path="output/mychar.safetensors", what="lora", step=400)
    emit(w, clock, "log", level="info", message="saved output/mychar.safetensors")
    emit(w, clock, "end", state="finished", exit_code=0)
    job.write_status(state="finished")
    assert snap_compare(HostApp(job.id), terminal_size=(120, 36), run_before=settle_with_image)


def test_snapshot_failed(snap_compare: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    job, w, _ = make_job(monkeypatch, "mychar", running=False)
    clock = T()
    running_history(w, clock, upto=60)
    emit(w, clock, "log", level="error", message="torch.OutOfMemoryError: CUDA out of memory")
    emit(
        w,
        clock,
        "end",
        state="failed",
        exit_code=1,
        error="CUDA out of memory",
        hint="the GPU ran out of memory: lower training.batch_size, enable gradient checkpointing or lower "
        "the resolution",
        last_lines=[
            "step 60/400",
            "Traceback (most recent call last):",
            '  File "train.py", line 412',
            "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB",
        ],
    )
    job.write_status(state="failed")
    assert snap_compare(HostApp(job.id), terminal_size=(120, 36), run_before=settle_with_image)
