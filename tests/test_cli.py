"""The `nyx` command end to end: the demo, detached training, attach, stop, bad configs, `nyx jobs`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from conftest import nyx_cmd, run_nyx, wait_for
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nyx_tui.jobs.events import read_events
from nyx_tui.jobs.jobdir import TERMINAL, JobDir


def test_cli_import_does_not_load_ml_stacks() -> None:
    code = (
        "import sys, nyx_tui.cli\n"
        "print(','.join(m for m in ('torch', 'diffusers', 'transformers', 'peft', 'textual') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_help_lists_commands(tmp_path: Path) -> None:
    proc = run_nyx("--help", home=tmp_path)
    assert proc.returncode == 0
    for command in ("config", "train", "jobs", "attach", "stop", "demo"):
        assert command in proc.stdout


# ---------------------------------------------------------------------------------------- the demo


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One real demo run, shared by the tests that inspect its results."""
    home = tmp_path_factory.mktemp("home")
    ws = tmp_path_factory.mktemp("ws")
    proc = run_nyx("demo", "--headless", "--workspace", str(ws), "--json", home=home, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    answer = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"home": home, "ws": ws, "answer": answer, "proc": proc}


@pytest.mark.slow
def test_demo_json_names_job_lora_model_dataset(demo: dict[str, Any]) -> None:
    answer = demo["answer"]
    assert set(answer) == {"job", "lora", "model", "dataset"}
    assert Path(answer["lora"]).is_file()
    assert Path(answer["model"], "model_index.json").is_file()
    assert Path(answer["model"]) == demo["ws"] / "model"
    assert any(Path(answer["dataset"]).glob("*.txt"))


@pytest.mark.slow
def test_demo_lora_loads_in_diffusers_and_changes_the_unet(demo: dict[str, Any]) -> None:
    import torch
    from diffusers import StableDiffusionPipeline

    answer = demo["answer"]
    pipe = StableDiffusionPipeline.from_pretrained(answer["model"], safety_checker=None)
    unet = pipe.unet
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(1, unet.config.in_channels, 8, 8, generator=gen)
    hidden = torch.randn(1, 77, unet.config.cross_attention_dim, generator=gen)
    with torch.no_grad():
        before = unet(sample, 500, encoder_hidden_states=hidden).sample
        pipe.load_lora_weights(answer["lora"])
        after = pipe.unet(sample, 500, encoder_hidden_states=hidden).sample
    assert torch.isfinite(after).all()
    assert (after - before).abs().max().item() > 1e-4


@pytest.mark.slow
def test_demo_lora_metadata(demo: dict[str, Any]) -> None:
    from safetensors import safe_open

    with safe_open(demo["answer"]["lora"], framework="numpy") as f:
        meta = f.metadata()
        keys = list(f.keys())
    assert meta["ss_network_module"] == "networks.lora"
    assert meta["ss_base_model_version"] == "sd_v1"
    cfg = JobDir(demo["home"] / "jobs" / demo["answer"]["job"]).config_path.read_text()
    assert f"dim = {meta['ss_network_dim']}" in cfg
    assert float(meta["ss_network_alpha"]) > 0
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert all(k.startswith("lora_unet_") for k in keys)


@pytest.mark.slow
def test_demo_loss_goes_down(demo: dict[str, Any]) -> None:
    events = read_events(demo["home"] / "jobs" / demo["answer"]["job"] / "events.jsonl")
    losses = [e["loss"] for e in events if e["kind"] == "step"]
    assert len(losses) >= 50
    k = len(losses) // 5
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    assert last < first * 0.9, (first, last)
    assert events[-1]["kind"] == "end" and events[-1]["state"] == "finished"


@pytest.mark.slow
def test_jobs_json_lists_the_demo_job(demo: dict[str, Any]) -> None:
    proc = run_nyx("jobs", "--json", home=demo["home"])
    assert proc.returncode == 0, proc.stderr
    jobs = json.loads(proc.stdout)
    assert isinstance(jobs, list) and len(jobs) == 1
    job = jobs[0]
    for key in ("id", "kind", "state", "dir", "started", "ended", "exit_code", "artifacts"):
        assert key in job
    assert job["id"] == demo["answer"]["job"]
    assert job["kind"] == "train" and job["state"] == "finished" and job["exit_code"] == 0
    assert job["started"] <= job["ended"]
    assert {"path": demo["answer"]["lora"], "what": "lora"}.items() <= next(
        a for a in job["artifacts"] if a["path"] == demo["answer"]["lora"]
    ).items()
    table = run_nyx("jobs", home=demo["home"])
    assert demo["answer"]["job"] in table.stdout and "finished" in table.stdout


# ------------------------------------------------------------------------ detached training, attach, stop


def _short_config(ws: Path, steps: int, **training: Any) -> Path:
    from nyx_tui.config.presets import preset_data

    data = preset_data("demo-tiny-cpu")
    data.setdefault("training", {}).update({"max_steps": steps, **training})
    data.setdefault("scheduler", {})["warmup_steps"] = 0
    data.setdefault("saving", {})["every_n_steps"] = 0
    path = ws / f"short-{steps}.toml"
    path.write_text(tomli_w.dumps(data))
    return path


def _job(home: Path, job_id: str) -> JobDir:
    return JobDir(home / "jobs" / job_id)


def _steps(job: JobDir) -> int:
    return sum(1 for e in job.events() if e["kind"] == "step")


@pytest.mark.slow
def test_detached_train_finishes_alone_and_a_killed_attach_does_not_touch_it(
    demo: dict[str, Any], tmp_path: Path
) -> None:
    home = tmp_path / "home"
    config = _short_config(demo["ws"], steps=400)
    proc = run_nyx("train", str(config), "--detach", home=home, timeout=60)
    assert proc.returncode == 0, proc.stderr
    job = _job(home, proc.stdout.strip())
    # `nyx train --detach` has exited; the job has not finished yet (model loading alone takes seconds)
    assert job.effective_state() not in TERMINAL
    sup_pid = job.status()["supervisor_pid"]
    # nobody waits on the supervisor: it leads its own session and its parent is not this test
    assert os.getsid(sup_pid) == sup_pid
    assert _parent_pid(sup_pid) != os.getpid()
    assert job.supervisor_alive()

    env = {**os.environ, "NYX_HOME": str(home)}
    attach = subprocess.Popen(
        nyx_cmd("attach", job.id),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    wait_for(lambda: _steps(job) >= 5, timeout=120)
    attach.send_signal(signal.SIGKILL)
    attach.wait(timeout=10)
    assert job.effective_state() == "running"
    wait_for(lambda: job.effective_state() in TERMINAL, timeout=180)
    assert job.effective_state() == "finished"
    assert _steps(job) == 400


def _parent_pid(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


@pytest.mark.slow
def test_attach_follows_to_the_end_and_ctrl_c_only_detaches(demo: dict[str, Any], tmp_path: Path) -> None:
    home = tmp_path / "home"
    config = _short_config(demo["ws"], steps=300)
    proc = run_nyx("train", str(config), "--detach", home=home, timeout=60)
    job = _job(home, proc.stdout.strip())
    env = {**os.environ, "NYX_HOME": str(home)}
    first = subprocess.Popen(
        nyx_cmd("attach", "last"), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    wait_for(lambda: _steps(job) >= 3, timeout=120)
    first.send_signal(signal.SIGINT)
    out, _ = first.communicate(timeout=10)
    assert first.returncode == 0 and "detached" in out
    second = run_nyx("attach", job.id, home=home, timeout=300)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "FINISHED" in second.stdout
    assert job.effective_state() == "finished"


@pytest.mark.slow
def test_stop_saves_and_ends_cancelled(demo: dict[str, Any], tmp_path: Path) -> None:
    home = tmp_path / "home"
    config = _short_config(demo["ws"], steps=5000)
    proc = run_nyx("train", str(config), "--detach", home=home, timeout=60)
    job = _job(home, proc.stdout.strip())
    wait_for(lambda: _steps(job) >= 3, timeout=120)
    stop = run_nyx("stop", job.id, home=home)
    assert stop.returncode == 0, stop.stderr
    wait_for(lambda: job.effective_state() in TERMINAL, timeout=120)
    assert job.effective_state() == "cancelled"
    loras = [a for a in job.artifacts() if a["what"] == "lora"]
    assert loras and Path(loras[-1]["path"]).is_file()
    assert _steps(job) < 5000
    again = run_nyx("stop", job.id, home=home)
    assert again.returncode == 1 and "already ended" in again.stderr


# ------------------------------------------------------------------------------------------ bad configs


@pytest.fixture
def good_config(tmp_path: Path) -> dict[str, Any]:
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (64, 64), "red").save(images / "a.png")
    (images / "a.txt").write_text("a red square")
    model = tmp_path / "model"
    (model / "unet").mkdir(parents=True)
    (model / "model_index.json").write_text("{}")
    return {
        "model": {"pretrained": str(model)},
        "dataset": {"resolution": 64, "subsets": [{"image_dir": str(images)}]},
        "network": {"dim": 4, "alpha": 2.0},
        "training": {"max_steps": 10},
    }


@pytest.mark.parametrize(
    ("mutate", "field", "fix"),
    [
        (lambda d: d["dataset"]["subsets"][0].update(image_dir="/nonexistent/imgs"), "image_dir", "fix"),
        (lambda d: d["network"].update(dim=0), "network.dim", "fix"),
        (lambda d: d["network"].update(dimm=8), "network.dimm", "network.dim"),
    ],
    ids=["missing-dataset", "dim-zero", "misspelled-key"],
)
def test_bad_config_fails_before_anything_is_created(
    good_config: dict[str, Any], tmp_path: Path, mutate: Any, field: str, fix: str
) -> None:
    home = tmp_path / "home"
    mutate(good_config)
    path = tmp_path / "bad.toml"
    path.write_text(tomli_w.dumps(good_config))
    proc = run_nyx("train", str(path), home=home, timeout=60)
    assert proc.returncode == 2
    text = proc.stdout + proc.stderr
    assert field in text and fix in text
    assert "Traceback" not in text
    assert not (home / "jobs").exists() or not any((home / "jobs").iterdir())


def test_good_config_checks_ok(good_config: dict[str, Any], tmp_path: Path) -> None:
    path = tmp_path / "good.toml"
    path.write_text(tomli_w.dumps(good_config))
    proc = run_nyx("config", "check", str(path), home=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_config_new_writes_a_complete_config_and_never_overwrites(tmp_path: Path) -> None:
    out = tmp_path / "mine.toml"
    proc = run_nyx("config", "new", "--preset", "sd15-lora", "-o", str(out), home=tmp_path)
    assert proc.returncode == 0, proc.stderr
    text = out.read_text()
    assert "[network]" in text and "learning_rate" in text
    again = run_nyx("config", "new", "--preset", "sdxl-lora", "-o", str(out), home=tmp_path)
    assert again.returncode == 2 and out.read_text() == text
    # the preset's image folder does not exist here: check names it and exits 2
    check = run_nyx("config", "check", str(out), home=tmp_path)
    assert check.returncode == 2 and "image_dir" in check.stdout
    unknown = run_nyx("config", "new", "--preset", "sd15-lorra", home=tmp_path)
    assert unknown.returncode == 2 and "sd15-lora" in unknown.stderr


_keys = st.sampled_from(
    [
        "model",
        "dataset",
        "network",
        "dim",
        "alpha",
        "subsets",
        "image_dir",
        "training",
        "max_steps",
        "optimizer",
        "type",
        "learning_rate",
        "saving",
        "family",
        "zz",
        "kind",
        "betas",
        "args",
    ]
) | st.text(min_size=1, max_size=8)
_scalars = (
    st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=True)
    | st.text(max_size=12)
    | st.booleans()
    | st.dates()
    | st.datetimes()
)
_toml = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_keys, inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=st.dictionaries(_keys, _toml, max_size=5))
def test_config_check_never_shows_a_traceback(
    doc: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from nyx_tui.cli import main

    path = tmp_path / "any.toml"
    try:
        path.write_text(tomli_w.dumps(doc))
    except (TypeError, ValueError):
        path.write_text(repr(doc))  # not representable as TOML: then it is arbitrary text, also fine
    rc = main(["config", "check", str(path)])
    out = capsys.readouterr()
    assert rc in (0, 2)
    assert "Traceback" not in out.out + out.err
    if rc == 2:
        assert "error" in out.out
