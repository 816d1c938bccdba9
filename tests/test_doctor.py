"""`nyx doctor`: the real command on this machine (no GPU, CPU torch), the JSON contract, and the logic
of each check fed with values this box cannot produce (a GPU, a full disk, a bf16-less card)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path

import pytest
from conftest import wait_for

from nyx_tui import doctor
from nyx_tui.doctor import GIB

EXPECTED = {
    "Nyx",
    "Python",
    "RAM",
    "textual",
    "torch",
    "diffusers",
    "nvidia-ml-py",
    "CUDA",
    "cuDNN",
    "bf16",
    "NVML",
    "data folder",
    "jobs folder",
    "HF cache",
    "native",
    "kohya, kohya-custom",
    "onnxruntime",
    "truecolor",
    "images",
    "tmux",
    "TERM",
    "terminal size",
    "HF token",
    "Civitai token",
}
SECRET_HF = "hf_doctorSecretValue0123456789"
SECRET_CIVITAI = "civitaiSecretValue9876543210"


def nvml_sees_a_gpu() -> bool:
    """Whether this machine has an NVIDIA driver and GPU: what doctor must report differs."""
    try:
        import pynvml

        pynvml.nvmlInit()
        return int(pynvml.nvmlDeviceGetCount()) > 0
    except Exception:
        return False


def isolated_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "CIVITAI_TOKEN")}
    env.pop("TMUX", None)
    env.pop("NYX_GPU", None)
    env.update({"NYX_HOME": str(tmp_path / "home"), "HF_HOME": str(tmp_path / "hf"), "COLUMNS": "160"})
    env.update(extra)
    return env


def run_doctor(*args: str, env: dict[str, str], timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nyx_tui", "doctor", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def by_name(answer: dict[str, object]) -> dict[str, dict[str, str]]:
    checks = answer["checks"]
    assert isinstance(checks, list)
    return {c["name"]: c for c in checks}


# ------------------------------------------------------------------------------- the real command


def test_doctor_json_on_this_machine(tmp_path: Path) -> None:
    secrets = tmp_path / "home" / "config" / "secrets.toml"
    secrets.parent.mkdir(parents=True)
    secrets.write_text(f'HF_TOKEN = "{SECRET_HF}"\nCIVITAI_TOKEN = "{SECRET_CIVITAI}"\n')
    secrets.chmod(0o644)  # readable by others: Nyx ignores it and doctor must say so
    done = run_doctor("--json", env=isolated_env(tmp_path))
    assert "Traceback" not in done.stderr + done.stdout
    answer = json.loads(done.stdout)
    assert set(answer) == {"nyx_version", "checks", "summary"}
    checks = by_name(answer)
    assert set(checks) >= EXPECTED, EXPECTED - set(checks)
    for c in answer["checks"]:
        assert set(c) >= {"name", "status", "value", "detail", "fix"}
        assert c["status"] in ("ok", "warn", "fail", "info")
        if c["status"] in ("warn", "fail"):
            assert c["fix"], f"{c['name']} is a problem without a fix"
    summary = answer["summary"]
    for status in ("ok", "warn", "fail", "info"):
        assert summary[status] == sum(1 for c in answer["checks"] if c["status"] == status)
    assert done.returncode == (1 if summary["fail"] else 0)
    assert SECRET_HF not in done.stdout + done.stderr and SECRET_CIVITAI not in done.stdout + done.stderr

    # torch was measured in a child process: its real version, and this box's CUDA answer
    assert checks["torch"]["value"].startswith(version("torch").split("+")[0])
    if nvml_sees_a_gpu():
        assert checks["NVML"]["status"] == "ok" and "GPU 0" in checks
    else:
        assert checks["GPU"]["value"] == "no NVIDIA GPU" and checks["GPU"]["status"] == "warn"
        assert "no NVIDIA GPU" in checks["NVML"]["detail"]
        assert checks["CUDA"]["status"] in ("warn", "fail") and "CPU" in checks["CUDA"]["detail"]
    assert checks["kohya, kohya-custom"]["value"] == "not installed"
    assert checks["native"]["status"] == "ok"
    assert "CPUExecutionProvider" in checks["onnxruntime"]["value"]
    assert checks["tmux"]["value"] == "not inside tmux"
    assert checks["terminal size"]["value"] == "not a terminal"  # every stream is a pipe here

    # free space is measured where the folders will be (tmp_path's disk), and the HF cache follows HF_HOME
    free = shutil.disk_usage(tmp_path).free / GIB
    for name in ("data folder", "jobs folder", "HF cache"):
        reported = float(checks[name]["value"].split(" GiB")[0])
        assert abs(reported - free) < 1.0, (name, reported, free)
    assert str(tmp_path / "hf" / "hub") in checks["HF cache"]["detail"]

    # a secrets file others can read is ignored, and doctor says how to fix it; the token's value never shows
    assert checks["HF token"]["status"] == "warn" and checks["HF token"]["value"] == "ignored"
    assert f"chmod 600 {secrets}" in checks["HF token"]["fix"]


def test_doctor_table_reports_tokens_by_source_only(tmp_path: Path) -> None:
    env = isolated_env(tmp_path, HF_TOKEN=SECRET_HF, CIVITAI_TOKEN=SECRET_CIVITAI)
    done = run_doctor(env=env)
    out = done.stdout + done.stderr
    assert "Traceback" not in out
    assert done.returncode == 0, out  # on this box nothing fails: no GPU and a CPU torch are warnings
    assert "set (env HF_TOKEN)" in out and "set (env CIVITAI_TOKEN)" in out
    assert SECRET_HF not in out and SECRET_CIVITAI not in out
    if not nvml_sees_a_gpu():
        assert "no NVIDIA GPU" in out
    assert "What to do" in out  # the warnings come with their fixes
    assert re.search(r"\d+ ok, \d+ warning\(s\), 0 failure\(s\)", out)


def test_a_failing_check_gives_exit_code_1(tmp_path: Path) -> None:
    """torch that does not answer in time is a failure (a hung CUDA init looks the same), not a hang."""
    done = run_doctor("--json", "--timeout", "0.01", env=isolated_env(tmp_path))
    assert done.returncode == 1
    checks = by_name(json.loads(done.stdout))
    assert checks["torch"]["status"] == "fail"
    assert "did not answer within" in checks["torch"]["detail"]
    assert "pip install" in checks["torch"]["fix"]


def test_doctor_keeps_torch_out_of_the_nyx_process(tmp_path: Path) -> None:
    code = (
        "import sys; from nyx_tui import doctor; checks = doctor.collect(); "
        "assert len(checks) > 20; "
        "heavy = [m for m in ('torch', 'onnxruntime', 'diffusers', 'transformers') if m in sys.modules]; "
        "print(heavy)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env=isolated_env(tmp_path), capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


# ------------------------------------------------------------------------------------ tmux, for real


class Tmux:
    """A private tmux server (its own socket in tmp): a developer's sessions are never touched."""

    def __init__(self, socket: Path) -> None:
        self.socket = socket

    def __call__(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["tmux", "-S", str(self.socket), *args], capture_output=True, text=True, timeout=20)

    def env_value(self) -> str:
        """What $TMUX holds inside one of its panes: socket,server pid,session."""
        pid = self("display-message", "-p", "#{pid}").stdout.strip()
        return f"{self.socket},{pid},0"


@pytest.fixture
def tmux(tmp_path: Path) -> Iterator[Tmux]:
    assert shutil.which("tmux"), "tmux is part of this project's test environment"
    t = Tmux(tmp_path / "tmux.sock")
    started = t("-f", "/dev/null", "new-session", "-d", "-s", "doctor", "sleep 120")
    assert started.returncode == 0, started.stderr
    yield t
    t("kill-server")


def test_tmux_passthrough_off_then_on(tmux: Tmux, tmp_path: Path) -> None:
    assert tmux("set", "-g", "allow-passthrough", "off").returncode == 0
    env = isolated_env(tmp_path, TMUX=tmux.env_value())
    done = run_doctor("--json", env=env)
    check = by_name(json.loads(done.stdout))["tmux"]
    assert check["status"] == "warn"
    assert check["value"] == "inside tmux, allow-passthrough off"
    assert "set -g allow-passthrough on" in check["fix"]

    assert tmux("set", "-g", "allow-passthrough", "on").returncode == 0
    wait_for(lambda: tmux("show", "-gv", "allow-passthrough").stdout.strip() == "on", timeout=10)
    check_on = doctor.check_tmux(env)
    assert check_on.status == "ok" and check_on.value == "inside tmux, allow-passthrough on"


def test_tmux_that_is_gone_is_a_warning_not_a_crash(tmp_path: Path) -> None:
    env = isolated_env(tmp_path, TMUX=f"{tmp_path / 'no-such.sock'},1,0")
    check = doctor.check_tmux(env)
    assert check.status == "warn" and check.value == "inside tmux, passthrough unknown"
    assert check.detail  # tmux's own words on why


# ------------------------------------------------------------------------- the logic, fed made-up values


@pytest.mark.parametrize(
    ("free", "status"),
    [(50 * GIB, "ok"), (20 * GIB, "ok"), (20 * GIB - 1, "warn"), (10 * GIB, "warn"), (GIB, "fail")],
)
def test_disk_threshold(free: int, status: str, tmp_path: Path) -> None:
    check = doctor.disk_check("data folder", tmp_path, free, 100 * GIB, "NYX_HOME")
    assert check.status == status
    assert check.value.startswith(f"{free / GIB:.1f} GiB free of 100.0 GiB")
    if status == "ok":
        assert check.fix == ""
    else:
        assert "export NYX_HOME=/workspace/nyx" in check.fix


def test_low_disk_fix_names_a_bigger_volume_and_the_right_variable(tmp_path: Path) -> None:
    check = doctor.disk_check(
        "HF cache", tmp_path / "missing", 5 * GIB, 30 * GIB, "HF_HOME", hint="/data has 900.0 GiB free"
    )
    assert check.status == "warn"
    assert "export HF_HOME=/data/hf" in check.fix and "900.0 GiB free" in check.fix
    assert "(not created yet)" in check.detail


def test_torch_checks_on_a_gpu_box() -> None:
    probe = {
        "torch": "2.7.1+cu128",
        "cuda_build": "12.8",
        "cuda_available": True,
        "cudnn": 90701,
        "devices": [{"name": "Tesla T4", "capability": "7.5", "total": 16 * GIB}],
        "bf16": False,
    }
    rows = {c.name: c for c in doctor.torch_checks(probe, "", gpus_seen=1)}
    assert rows["torch"].status == "ok" and rows["torch"].value == "2.7.1+cu128"
    assert rows["CUDA"].status == "ok" and "CUDA 12.8, 1 device" in rows["CUDA"].value
    assert rows["cuDNN"].value == "90701"
    assert rows["bf16"].status == "warn" and 'mixed_precision = "fp16"' in rows["bf16"].fix


def test_torch_checks_cpu_build_beside_a_gpu_fails() -> None:
    probe = {"torch": "2.13.0+cpu", "cuda_build": None, "cuda_available": False}
    rows = {c.name: c for c in doctor.torch_checks(probe, "", gpus_seen=2)}
    assert rows["CUDA"].status == "fail" and "2 GPU(s)" in rows["CUDA"].detail
    assert "download.pytorch.org" in rows["CUDA"].fix
    rows = {c.name: c for c in doctor.torch_checks(probe, "", gpus_seen=0)}
    assert rows["CUDA"].status == "warn"


def test_torch_checks_when_torch_is_broken() -> None:
    rows = {c.name: c for c in doctor.torch_checks(None, "ImportError: libcudart.so.12 (exit 1)", 0)}
    assert rows["torch"].status == "fail" and "libcudart" in rows["torch"].detail


def test_run_probe_answers_for_a_hang_a_crash_and_a_good_child() -> None:
    answer, why = doctor.run_probe("import time; time.sleep(30)", timeout=0.5)
    assert answer is None and "within 0.5 s" in why
    answer, why = doctor.run_probe("import os; os.abort()", timeout=30)
    assert answer is None and "signal 6" in why
    answer, why = doctor.run_probe("raise ImportError('no module named torch')", timeout=30)
    assert answer is None and "no module named torch" in why and "exit 1" in why
    answer, why = doctor.run_probe("print('noise'); print('{\"a\": 1}')", timeout=30)
    assert answer == {"a": 1} and why == ""


def test_gpu_rows_with_a_busy_gpu() -> None:
    gpus = [
        {"index": 0, "name": "NVIDIA H100 80GB HBM3", "total_mb": 81559, "used_mb": 500},
        {"index": 1, "name": "NVIDIA H100 80GB HBM3", "total_mb": 81559, "used_mb": 40000},
    ]
    rows = {c.name: c for c in doctor.gpu_checks(gpus, None, {"driver": "570.86.15", "cuda": "12.8"})}
    assert rows["NVML"].value == "driver 570.86.15, CUDA 12.8"
    assert rows["GPU 0"].status == "ok" and "79.6 GiB total, 79.2 GiB free" in rows["GPU 0"].value
    assert rows["GPU 1"].status == "warn" and "CUDA_VISIBLE_DEVICES" in rows["GPU 1"].fix


def test_onnxruntime_without_cuda_beside_a_gpu() -> None:
    check = doctor.onnx_check({"providers": ["CPUExecutionProvider"]}, "", gpus_seen=1)
    assert check.status == "warn" and "onnxruntime-gpu" in check.fix
    check = doctor.onnx_check({"providers": ["CUDAExecutionProvider", "CPUExecutionProvider"]}, "", gpus_seen=1)
    assert check.status == "ok" and "GPU" in check.detail


def test_ram_from_meminfo() -> None:
    text = "MemTotal:        8000000 kB\nMemFree:   100 kB\nMemAvailable:    6000000 kB\n"
    mem = doctor.read_meminfo(text)
    assert mem == (8000000 * 1024, 6000000 * 1024)
    assert doctor.check_ram(mem).status == "warn"
    assert doctor.check_ram((64 * GIB, 60 * GIB)).status == "ok"


def test_terminal_checks() -> None:
    assert doctor.check_truecolor({"COLORTERM": "truecolor"}).status == "ok"
    assert doctor.check_truecolor({"TEXTUAL_COLOR_SYSTEM": "truecolor"}).status == "ok"
    warn = doctor.check_truecolor({})
    assert warn.status == "warn" and "COLORTERM=truecolor" in warn.fix
    assert doctor.check_term({"TERM": "dumb"}).status == "warn"
    assert doctor.check_term({"TERM": "tmux-256color"}).status == "ok"
    assert doctor.check_size((60, 20)).status == "warn"
    assert doctor.check_size((200, 50)).status == "ok"
    in_tmux = doctor.check_graphics("halfblock", "textual-image's terminal probe", in_tmux=True)
    assert in_tmux.status == "warn" and "allow-passthrough on" in in_tmux.fix
    assert doctor.check_graphics("kitty (terminal graphics protocol)", "", in_tmux=False).status == "ok"
