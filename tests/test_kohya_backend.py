"""The kohya backends as Nyx jobs: sd-scripts' output parsed into events, the worker under the real
supervisor with a fake sd-scripts tree (tests/fake_sd_scripts.py), and `nyx backend install/list/doctor`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import wait_for
from fake_sd_scripts import make_fake_sd_scripts

from nyx_tui.config.model import TrainingConfig
from nyx_tui.jobs.control import send
from nyx_tui.jobs.jobdir import TERMINAL, JobDir
from nyx_tui.jobs.launch import spawn_supervisor, wait_started
from nyx_tui.trainers.base import TRAINERS, backend_problems, create_training_job
from nyx_tui.trainers.kohya import install as kinstall
from nyx_tui.trainers.kohya.progress import KohyaOutput, parse_bar, parse_clock

# ------------------------------------------------------------------------------------------- parser


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _kinds(events: list[tuple[str, dict[str, Any]]], kind: str) -> list[dict[str, Any]]:
    return [f for k, f in events if k == kind]


BAR = "steps:  50%|█████     | 500/1000 [11:06<11:06,  1.33s/it, avr_loss=0.0123]"


def test_a_tqdm_frame_gives_step_total_loss_rate_and_eta() -> None:
    bar = parse_bar(BAR)
    assert bar is not None
    assert (bar.desc, bar.n, bar.total) == ("steps", 500, 1000)
    assert bar.postfix == {"avr_loss": 0.0123}
    assert bar.it_s == pytest.approx(1 / 1.33)
    assert bar.remaining_s == 666
    fast = parse_bar("steps:   1%|          | 10/1000 [00:04<06:36,  2.50it/s, avr_loss=0.2]")
    assert fast is not None and fast.it_s == 2.5
    first = parse_bar("steps:   0%|          | 0/1000 [00:00<?, ?it/s]")
    assert first is not None and first.it_s is None and first.remaining_s is None
    assert parse_clock("1:02:03") == 3723 and parse_clock("?") is None
    assert parse_bar("epoch 1/10") is None


def test_step_events_use_the_native_field_names() -> None:
    out = KohyaOutput(clock=Clock())
    events = out.feed(("\r" + BAR).encode(), "stderr") + out.feed(b"\r", "stderr")
    (step,) = _kinds(events, "step")
    assert set(step) == {"step", "total", "epoch", "loss", "loss_avg", "lr", "it_s", "eta_s"}
    assert step["step"] == 500 and step["total"] == 1000
    assert step["loss"] == step["loss_avg"] == 0.0123
    assert step["it_s"] == pytest.approx(0.7519, abs=1e-4) and step["eta_s"] == 666.0
    assert not _kinds(events, "log")  # a bar is never a log line


def test_chunks_cut_anywhere_and_a_huge_carriage_return_stream() -> None:
    clock = Clock()
    out = KohyaOutput(clock=clock)
    frames = "".join(
        f"\rsteps: {i // 10:3d}%|#         | {i}/1000 [00:{i % 60:02d}<01:00,  2.00it/s, avr_loss={1 / i:.4f}]"
        for i in range(1, 1001)
    ).encode()
    assert len(frames) > 64 * 1024 and b"\n" not in frames
    events = []
    for start in range(0, len(frames), 777):  # cuts through frames and through multi-byte characters
        clock.now += 0.1
        events += out.feed(frames[start : start + 777], "stderr")
    events += out.close()
    steps = _kinds(events, "step")
    assert steps[0]["step"] == 1 and steps[-1]["step"] == 1000
    assert 10 < len(steps) < 200  # thinned (about 4 a second of the fake clock), the last one kept
    assert [s["step"] for s in steps] == sorted(s["step"] for s in steps)
    assert not _kinds(events, "log")
    # a UTF-8 character cut in two
    out2 = KohyaOutput(clock=Clock())
    data = ("\r" + BAR + "\r").encode()
    cut = data.index("█".encode()) + 1
    assert _kinds(out2.feed(data[:cut], "stderr") + out2.feed(data[cut:], "stderr"), "step")


def test_epoch_saving_model_saved_and_logs() -> None:
    out = KohyaOutput(clock=Clock())
    text = (
        "2026-11-28 16:00:00 INFO     prepare tokenizer      train_util.py:4321\n"
        "\nepoch 3/10\n"
        "2026-11-28 16:10:00 INFO     saving checkpoint: /out/mychar-step00000500.safetensors    "
        "train_network.py:1040\n"
        "saving checkpoint: /out/mychar.safetensors\n"
        "model saved.\n"
        "2026-11-28 16:10:01 WARNING  something odd      train_util.py:1\n"
    )
    events = out.feed(text.encode(), "stdout")
    arts = _kinds(events, "artifact")
    assert arts[0] == {"path": "/out/mychar-step00000500.safetensors", "what": "lora", "step": 500}
    assert arts[1]["path"] == "/out/mychar.safetensors" and arts[1]["what"] == "lora"
    assert out.epoch == 3 and out.total_epochs == 10 and out.model_saved
    levels = [e["level"] for e in _kinds(events, "log")]
    assert "warning" in levels and "info" in levels
    assert out.failure(0) is None


def test_a_line_logged_over_the_bar_is_still_read() -> None:
    out = KohyaOutput(clock=Clock())
    text = "\r" + BAR + "2026-11-28 16:10:00 INFO     saving checkpoint: /out/x.safetensors   train_network.py:1\n"
    events = out.feed(text.encode(), "stderr")
    assert _kinds(events, "step") and _kinds(events, "artifact")[0]["path"] == "/out/x.safetensors"


def test_log_lines_are_rate_limited() -> None:
    out = KohyaOutput(clock=Clock())
    events = out.feed(b"".join(b"caching image %d\n" % i for i in range(1000)), "stdout")
    assert 0 < len(_kinds(events, "log")) <= 50 and out.dropped_logs > 900


@pytest.mark.parametrize(
    ("text", "code", "error", "hint"),
    [
        ("No data found. Please verify arguments\n", 0, "No data found", "no images"),
        (
            'Traceback (most recent call last):\n  File "x.py", line 1, in <module>\n    f()\n'
            "ValueError: bad value\n"
            'Traceback (most recent call last):\n  File "accelerate", line 9\n'
            "subprocess.CalledProcessError: Command '[...]' returned non-zero exit status 1.\n",
            1,
            "ValueError: bad value",
            "traceback",
        ),
        ("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB\n", 1, "CUDA out of memory", "GPU"),
        (
            'Traceback (most recent call last):\n  File "t.py", line 1\n'
            "ModuleNotFoundError: No module named 'toml'\n",
            1,
            "ModuleNotFoundError",
            "backend install",
        ),
        ("all done\n", 0, "without saving", "saves"),
    ],
)
def test_failures_have_a_reason_and_a_hint(text: str, code: int, error: str, hint: str) -> None:
    out = KohyaOutput(clock=Clock())
    out.feed(text.encode(), "stderr")
    out.close()
    failure = out.failure(code)
    assert failure is not None and error in failure.error and hint in failure.hint


# ------------------------------------------------------------------------------------------- jobs


@pytest.fixture
def fake_tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, nyx_home: Path) -> Path:
    monkeypatch.setenv("NYX_KOHYA_DIRECT", "1")  # the fake script directly, not through accelerate launch
    return make_fake_sd_scripts(tmp_path / "sd-scripts")


def _config(tree: Path, tmp_path: Path, **training: Any) -> TrainingConfig:
    images = tmp_path / "images"
    images.mkdir(exist_ok=True)
    return TrainingConfig.model_validate(
        {
            "backend": {"name": "kohya", "path": str(tree)},
            "model": {"pretrained": str(tmp_path / "model.safetensors")},
            "dataset": {"subsets": [{"image_dir": str(images)}]},
            "training": {"max_steps": 30, **training},
            "saving": {"output_name": "mychar"},
        }
    )


def _run(job: JobDir, timeout: float = 60) -> dict[str, Any]:
    spawn_supervisor(job)
    wait_started(job)
    wait_for(lambda: job.effective_state() in TERMINAL, timeout=timeout)
    (end,) = [e for e in job.events() if e["kind"] == "end"]
    return end


@pytest.mark.parametrize("launcher", ["direct", "accelerate"])
def test_a_kohya_job_runs_under_the_supervisor(
    fake_tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, launcher: str
) -> None:
    if launcher == "accelerate":  # `accelerate launch` of a plain script, one process on the CPU
        pytest.importorskip("accelerate")
        monkeypatch.delenv("NYX_KOHYA_DIRECT")
    cfg = _config(fake_tree, tmp_path)
    assert backend_problems(cfg) == []
    job = create_training_job(cfg)
    end = _run(job)
    assert end["state"] == "finished", end
    events = job.events()
    start = next(e for e in events if e["kind"] == "start")
    assert start["backend"] == "kohya" and start["total_steps"] == 30
    steps = [e for e in events if e["kind"] == "step"]
    assert steps and steps[-1]["step"] == 30 and all(s["total"] == 30 for s in steps)
    assert steps[-1]["loss_avg"] == pytest.approx(0.5 / 30, abs=1e-4) and steps[-1]["epoch"] == 2
    loras = [e for e in events if e["kind"] == "artifact" and e["what"] == "lora"]
    assert [Path(a["path"]) for a in loras] == [job.output_dir / "mychar.safetensors"]
    assert (job.output_dir / "mychar.safetensors").read_bytes() == b"fake lora"
    assert (job.path / "kohya" / "config.toml").is_file() and (job.path / "kohya" / "dataset.toml").is_file()
    log = job.log_path.read_bytes()
    assert log.count(b"\r") > 1000 and b"model saved." in log  # the raw output is kept
    running = next(e["message"] for e in events if e["kind"] == "log" and e["message"].startswith("running:"))
    assert ("accelerate.commands.launch" in running) == (launcher == "accelerate")


@pytest.mark.parametrize(
    ("mode", "error", "hint"),
    [
        ("traceback", "ValueError: fake failure in the model loader", "traceback"),
        ("nodata", "No data found", "no images"),
        ("oom", "CUDA out of memory", "batch"),
        ("nosave", "without saving", "saves"),
    ],
)
def test_failures_end_failed_with_the_reason(
    fake_tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str, error: str, hint: str
) -> None:
    monkeypatch.setenv("FAKE_SD_MODE", mode)
    job = create_training_job(_config(fake_tree, tmp_path))
    end = _run(job)
    assert end["state"] == "failed" and end["exit_code"] == 1
    assert error in end["last_lines"][-1]  # the worker's verdict is the last line of the output
    assert error in end["error"] and hint in end["hint"]  # the end event carries the worker's reason and hint
    (verdict,) = [e for e in job.events() if e["kind"] == "log" and "hint" in e]
    assert error in verdict["error"] and hint in verdict["hint"] and verdict["level"] == "error"


@pytest.mark.parametrize("launcher", ["direct", "accelerate"])
def test_stop_sends_sigint_and_sd_scripts_saves(
    fake_tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, launcher: str
) -> None:
    if launcher == "accelerate":
        pytest.importorskip("accelerate")
        monkeypatch.delenv("NYX_KOHYA_DIRECT")
    monkeypatch.setenv("FAKE_SD_MODE", "slow")
    job = create_training_job(_config(fake_tree, tmp_path))
    spawn_supervisor(job)
    wait_started(job)
    wait_for(lambda: any(e["kind"] == "step" for e in job.events()), timeout=30)
    send(job.control_path, "stop")
    wait_for(lambda: job.effective_state() in TERMINAL, timeout=30)
    events = job.events()
    (end,) = [e for e in events if e["kind"] == "end"]
    assert end["state"] == "cancelled" and end["reason"] == "stopped on request" and end["exit_code"] == 0
    assert any(e["kind"] == "log" and e.get("ack") == "stop" for e in events)
    saved = job.output_dir / "mychar-interrupted.safetensors"
    assert saved.is_file()
    assert any(e["kind"] == "artifact" and e["path"] == str(saved) for e in events)


def test_the_custom_backend_gives_sd_scripts_nyx_s_rex_scheduler(fake_tree: Path, tmp_path: Path) -> None:
    pytest.importorskip("torch")
    cfg = _config(fake_tree, tmp_path)
    cfg = TrainingConfig.model_validate(
        {**cfg.model_dump(), "backend": {"name": "kohya-custom", "path": str(fake_tree)}, "scheduler": {"type": "rex"}}
    )
    assert backend_problems(cfg) == []
    job = create_training_job(cfg)
    end = _run(job, timeout=120)
    assert end["state"] == "finished", end
    shim = job.path / "kohya" / "pylib"
    assert f"custom scheduler RexLR from {shim}" in job.log_path.read_text()
    assert not (shim / "nyx_tui" / "jobs").exists()  # only the scheduler module, none of Nyx's others


def test_a_missing_backend_is_a_problem(tmp_path: Path, nyx_home: Path) -> None:
    cfg = _config(tmp_path / "nowhere", tmp_path)
    problems = backend_problems(cfg)
    assert any(p.field == "backend.path" and "nyx backend install kohya" in p.message for p in problems)
    assert {"kohya", "kohya-custom"} <= set(TRAINERS)
    custom = cfg.model_copy(update={"backend": cfg.backend.model_copy(update={"name": "kohya-custom"})})
    assert TRAINERS["kohya-custom"].argv(custom)[1:] == ["-m", "nyx_tui.trainers.kohya", "."]


# ------------------------------------------------------------------------------------------- install


def _nyx(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "nyx_tui", *args], capture_output=True, text=True, timeout=300)


def test_install_list_and_doctor_from_a_local_repository(tmp_path: Path, nyx_home: Path) -> None:
    repo = make_fake_sd_scripts(tmp_path / "upstream", git=True)
    done = _nyx("backend", "install", "kohya", "--source", str(repo), "--ref", "main", "--no-deps")
    assert done.returncode == 0, done.stderr
    root = kinstall.install_dir()
    assert str(root) in done.stdout and "skipped (--no-deps)" in done.stdout
    assert (root / "train_network.py").is_file() and kinstall.venv_python(root).exists()
    record = json.loads((root / kinstall.RECORD).read_text())
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    assert record["commit"] == head and record["ref"] == "main" and record["missing_scripts"] == []

    listed = _nyx("backend", "list", "--json")
    rows = json.loads(listed.stdout)
    (kohya,) = [r for r in rows if r["path"] == str(root)]
    assert kohya["state"] == "installed" and head[:10] in kohya["detail"]

    doctor = _nyx("backend", "doctor")
    assert "ok   checkout" in doctor.stdout and "ok   flux_train_network.py" in doctor.stdout
    assert "FAIL import torch" in doctor.stdout  # the venv holds nothing: said, not crashed
    assert doctor.returncode == 1

    again = _nyx("backend", "install", "kohya", "--source", str(repo), "--no-deps")  # an update, not an error
    assert again.returncode == 0, again.stderr


def test_doctor_without_an_install_says_how(nyx_home: Path) -> None:
    done = _nyx("backend", "doctor")
    assert done.returncode == 1 and "nyx backend install kohya" in done.stdout
    listed = _nyx("backend", "list")
    assert "not installed" in listed.stdout and "native" in listed.stdout


def test_rex_scheduler_matches_the_native_formula() -> None:
    torch = pytest.importorskip("torch")
    from nyx_tui.config.model import SchedulerKind, SchedulerSection
    from nyx_tui.trainers.kohya.schedulers import RexLR
    from nyx_tui.trainers.native.optim import schedule_factor

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = RexLR(opt, max_lr=2.0, min_lr=0.0, num_steps=20, num_warmup_steps=4)
    native = SchedulerSection(type=SchedulerKind.REX, warmup_steps=4)
    for step in range(21):
        assert opt.param_groups[0]["lr"] == pytest.approx(2.0 * schedule_factor(native, step, 20))
        opt.step()
        sched.step()
    # as the export passes it: lr_scheduler_args = ["total_steps=…", "warmup_steps=…", "min_lr_ratio=…"]
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = RexLR(opt, total_steps=10, warmup_steps=2, min_lr_ratio=0.1)
    native = SchedulerSection(type=SchedulerKind.REX, warmup_steps=2, min_lr_ratio=0.1)
    for step in range(11):
        assert opt.param_groups[0]["lr"] == pytest.approx(schedule_factor(native, step, 10))
        opt.step()
        sched.step()
