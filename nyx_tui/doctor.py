"""`nyx doctor`: is this box ready to train, and if not, what to do about it.

A rented GPU box fails in a dozen quiet ways (a CPU torch wheel, a driver that does not match, a 20 GB root
disk with the HF cache on it, a tmux that eats the image protocol). Doctor checks each and prints one row
per check — ok / warn / fail / info, the value it found, and for every problem the fix. `--json` prints the
same as one object for scripts. Exit code 1 when any check fails.

Nothing here imports torch (or onnxruntime) into the `nyx` process: those are measured in child processes
with a timeout, so a broken CUDA install cannot crash or hang doctor. Package versions come from
importlib.metadata. Tokens are reported as "set (where)" or "not set", never their value.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import importlib.metadata as metadata
import importlib.util
import json
import os
import shutil
import stat
import subprocess
import sys
import tomllib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from nyx_tui import __version__, paths

Status = Literal["ok", "warn", "fail", "info"]
STATUSES: tuple[Status, ...] = ("ok", "warn", "fail", "info")

GIB = 2**30
DISK_WARN_BYTES = 20 * GIB  # one SDXL base (7 GB) + a Flux LoRA run's checkpoints and samples
DISK_FAIL_BYTES = 2 * GIB  # not even one full-size checkpoint fits
RAM_WARN_BYTES = 16 * GIB  # SDXL / Flux load their text encoders and model through system RAM first
MIN_COLUMNS, MIN_ROWS = 80, 24
PROBE_TIMEOUT_S = 60.0
BIG_VOLUMES = ("/workspace", "/data", "/mnt/data", "/scratch")  # RunPod / VastAI / lab servers' big disks

# the packages a bug report needs first; every other dependency is checked for presence and range
KEY_PACKAGES = (
    "textual",
    "rich",
    "textual-image",
    "textual-serve",
    "nvidia-ml-py",
    "torch",
    "diffusers",
    "transformers",
    "peft",
    "lycoris-lora",
    "accelerate",
    "safetensors",
    "huggingface_hub",
    "bitsandbytes",
    "onnxruntime",
)
TORCH_FIX = (
    "install a CUDA build of torch matching your driver, e.g. "
    "`pip install --force-reinstall torch --index-url https://download.pytorch.org/whl/cu128`"
)


@dataclass
class Check:
    """One row of the report. `fix` is set for every warn/fail: what the user does about it."""

    group: str
    name: str
    status: Status
    value: str
    detail: str = ""
    fix: str = ""


# ------------------------------------------------------------------------------------------ helpers


def _gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB"


def run_probe(code: str, timeout: float) -> tuple[dict[str, Any] | None, str]:
    """Run `code` in a child Python (this interpreter) that prints one JSON object as its last line.
    Returns (the object, "") or (None, why it failed). Never raises; a crash or a hang is an answer."""
    try:
        done = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        return None, f"did not answer within {timeout:g} s"
    except OSError as e:
        return None, f"could not start {sys.executable}: {e}"
    lines = done.stdout.strip().splitlines()
    if done.returncode == 0 and lines:
        try:
            answer = json.loads(lines[-1])
        except ValueError:
            answer = None
        if isinstance(answer, dict):
            return answer, ""
    err = (done.stderr or done.stdout).strip().splitlines()
    last = err[-1] if err else "no output"
    how = f"signal {-done.returncode}" if done.returncode < 0 else f"exit {done.returncode}"
    return None, f"{last} ({how})"


def _existing(path: Path) -> Path:
    """The path, or its nearest existing parent (a folder Nyx has not created yet lives on that disk)."""
    p = path
    while not p.exists() and p.parent != p:
        p = p.parent
    return p


# ------------------------------------------------------------------------------------------- system


def check_nyx() -> Check:
    return Check("system", "Nyx", "ok", __version__, f"data folder {paths.data_dir()}")


def check_python(version: tuple[int, int, int] | None = None) -> Check:
    v = version or (sys.version_info.major, sys.version_info.minor, sys.version_info.micro)
    text = ".".join(str(x) for x in v)
    venv = sys.prefix != getattr(sys, "base_prefix", sys.prefix)
    detail = f"{sys.executable}" + (" (virtual environment)" if venv else "")
    if v[:2] < (3, 11):
        return Check("system", "Python", "fail", text, detail, "Nyx needs Python 3.11 or newer: make a venv with it")
    return Check("system", "Python", "ok", text, detail)


def read_meminfo(text: str | None = None) -> tuple[int, int] | None:
    """(total, available) bytes from /proc/meminfo, else from sysconf; None when neither answers."""
    try:
        text = text if text is not None else Path("/proc/meminfo").read_text()
        fields = {}
        for line in text.splitlines():
            key, _, rest = line.partition(":")
            parts = rest.split()
            if parts and parts[0].isdigit():
                fields[key.strip()] = int(parts[0]) * 1024  # kB
        if "MemTotal" in fields:
            return fields["MemTotal"], fields.get("MemAvailable", fields.get("MemFree", 0))
    except OSError:
        pass
    try:
        page = os.sysconf("SC_PAGE_SIZE")
        return os.sysconf("SC_PHYS_PAGES") * page, os.sysconf("SC_AVPHYS_PAGES") * page
    except (ValueError, OSError, AttributeError):
        return None


def check_ram(mem: tuple[int, int] | None) -> Check:
    if mem is None:
        return Check("system", "RAM", "info", "unknown", "neither /proc/meminfo nor sysconf answered")
    total, available = mem
    value = f"{_gib(total)} total, {_gib(available)} available"
    if total < RAM_WARN_BYTES:
        return Check(
            "system",
            "RAM",
            "warn",
            value,
            "SDXL, Flux and SD3 load their models through system RAM; under 16 GiB loading can be killed (OOM)",
            "cache latents and text-encoder outputs to disk, use fp8 base weights, or rent a box with 32+ GiB RAM",
        )
    if available < 4 * GIB:
        return Check(
            "system",
            "RAM",
            "warn",
            value,
            "little RAM is free: another process holds most of it",
            "stop what else runs (`top`, sorted by memory) before training",
        )
    return Check("system", "RAM", "ok", value)


# ----------------------------------------------------------------------------------------- packages


def _installed(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def check_packages() -> list[Check]:
    """Key packages with their versions; every other base dependency of nyx-tui only when it is missing
    or out of its range. Metadata only: nothing is imported."""
    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.utils import canonicalize_name

    try:
        requires = metadata.requires("nyx-tui") or []
    except metadata.PackageNotFoundError:
        requires = []
    wanted: dict[str, Any] = {}
    for line in requires:
        try:
            req: Any = Requirement(line)
        except InvalidRequirement:
            continue
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue  # an extra ([test], [dev]) or another platform's
        wanted[canonicalize_name(req.name)] = req
    checks: list[Check] = []
    reinstall = "reinstall Nyx's dependencies: `pip install -e .` in the Nyx checkout (or `pip install -U nyx-tui`)"
    names = list(KEY_PACKAGES) + sorted(n for n in wanted if n not in {canonicalize_name(k) for k in KEY_PACKAGES})
    for name in names:
        req = wanted.get(canonicalize_name(name))
        version = _installed(name)
        key = name in KEY_PACKAGES
        if version is None:
            if req is None and not key:
                continue
            checks.append(Check("packages", name, "fail", "not installed", f"Nyx needs {req or name}", reinstall))
            continue
        if req is not None and req.specifier and not req.specifier.contains(version, prereleases=True):
            checks.append(
                Check(
                    "packages",
                    name,
                    "warn",
                    version,
                    f"Nyx is tested with {req}",
                    f"`pip install '{req}'` (or reinstall Nyx: `pip install -e .`)",
                )
            )
        elif key:
            checks.append(Check("packages", name, "ok", version))
    if not requires:
        checks.append(
            Check(
                "packages",
                "nyx-tui metadata",
                "info",
                "not installed as a package",
                "running from a source tree: dependency ranges were not checked",
                "",
            )
        )
    return checks


# ------------------------------------------------------------------------------------- torch / CUDA

TORCH_PROBE = r"""
import json
out = {}
import torch
out["torch"] = torch.__version__
out["cuda_build"] = torch.version.cuda
out["cuda_available"] = bool(torch.cuda.is_available())
out["cudnn"] = None
out["devices"] = []
out["bf16"] = None
if out["cuda_available"]:
    out["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        out["devices"].append({"name": p.name, "capability": f"{p.major}.{p.minor}", "total": p.total_memory})
    out["bf16"] = bool(torch.cuda.is_bf16_supported())
print(json.dumps(out))
"""


def torch_checks(probe: dict[str, Any] | None, error: str, gpus_seen: int) -> list[Check]:
    """The torch probe's answer as rows: torch, CUDA, cuDNN, bf16. `gpus_seen`: GPUs NVML reported."""
    g = "torch"
    if probe is None:
        return [
            Check(g, "torch", "fail", "does not import", f"`import torch` in a child process: {error}", TORCH_FIX),
            Check(g, "CUDA", "fail", "unknown", "torch does not import", TORCH_FIX),
            Check(g, "cuDNN", "info", "unknown", "torch does not import"),
            Check(g, "bf16", "info", "unknown", "torch does not import"),
        ]
    version = str(probe.get("torch"))
    cuda_build = probe.get("cuda_build")
    rows = [Check(g, "torch", "ok", version + ("" if cuda_build else " (CPU build)"))]
    if probe.get("cuda_available"):
        devices = probe.get("devices") or []
        rows.append(Check(g, "CUDA", "ok", f"CUDA {cuda_build}, {len(devices)} device(s) visible to torch"))
        cudnn = probe.get("cudnn")
        if cudnn:
            rows.append(Check(g, "cuDNN", "ok", str(cudnn)))
        else:
            rows.append(
                Check(g, "cuDNN", "warn", "not available", "the VAE and conv layers run slower", TORCH_FIX)
            )
        if probe.get("bf16"):
            rows.append(Check(g, "bf16", "ok", "supported"))
        else:
            rows.append(
                Check(
                    g,
                    "bf16",
                    "warn",
                    "not supported",
                    "this GPU predates Ampere: bf16 training is emulated or fails",
                    "set training.mixed_precision = \"fp16\" in your config",
                )
            )
        return rows
    na = "n/a without CUDA"
    if not cuda_build:
        if gpus_seen:
            rows.append(
                Check(
                    g,
                    "CUDA",
                    "fail",
                    "CPU build of torch",
                    f"NVML sees {gpus_seen} GPU(s) but this torch was built without CUDA: training runs on the CPU",
                    TORCH_FIX,
                )
            )
        else:
            rows.append(
                Check(
                    g,
                    "CUDA",
                    "warn",
                    "not available (CPU build of torch)",
                    "training runs on the CPU: `nyx demo` works, real SD1.5/SDXL/Flux models need a CUDA GPU",
                    "on a GPU box install a CUDA build of torch (" + TORCH_FIX.split(", e.g. ")[1] + ")",
                )
            )
    else:
        rows.append(
            Check(
                g,
                "CUDA",
                "fail" if gpus_seen else "warn",
                f"not available (torch built for CUDA {cuda_build})",
                "torch cannot reach a GPU: no driver, a driver older than this CUDA, or CUDA_VISIBLE_DEVICES hides it",
                "check `nvidia-smi` (the driver's CUDA version must be ≥ torch's), unset CUDA_VISIBLE_DEVICES, "
                "and in Docker run the container with `--gpus all`",
            )
        )
    rows.append(Check(g, "cuDNN", "info", na))
    rows.append(Check(g, "bf16", "info", na))
    return rows


# --------------------------------------------------------------------------------------------- GPUs


def nvml_facts() -> tuple[list[dict[str, Any]], str | None, dict[str, str]]:
    """(gpus, error, versions) from NVML via nyx_tui.gpu (which honours NYX_GPU=none). Never raises."""
    from nyx_tui import gpu

    report = gpu.sample()
    gpus = [
        {"index": g.index, "name": g.name, "total_mb": g.mem_total_mb, "used_mb": g.mem_used_mb} for g in report.gpus
    ]
    versions: dict[str, str] = {}
    if gpus:
        try:
            import pynvml

            versions["driver"] = str(pynvml.nvmlSystemGetDriverVersion())
            cuda = int(pynvml.nvmlSystemGetCudaDriverVersion())
            versions["cuda"] = f"{cuda // 1000}.{cuda % 1000 // 10}"
        except Exception:  # an old driver without these calls: the GPUs are still there
            pass
    return gpus, report.error, versions


def gpu_checks(gpus: list[dict[str, Any]], error: str | None, versions: dict[str, str]) -> list[Check]:
    g = "GPU"
    if not gpus:
        reason = error or "no NVIDIA GPU"
        nvml_installed = importlib.util.find_spec("pynvml") is not None
        nvml = (
            Check(g, "NVML", "info", "unavailable", reason)
            if nvml_installed
            else Check(g, "NVML", "warn", "nvidia-ml-py not installed", reason, "`pip install nvidia-ml-py`")
        )
        return [
            nvml,
            Check(
                g,
                "GPU",
                "warn",
                "no NVIDIA GPU",
                "training runs on the CPU: `nyx demo` works, real SD1.5/SDXL/Flux/SD3 models need a CUDA GPU; "
                "the dashboard's GPU panel stays empty",
                "on a GPU box: check that `nvidia-smi` lists the GPU; in Docker start the container with `--gpus all`",
            ),
        ]
    driver = versions.get("driver", "unknown")
    rows = [Check(g, "NVML", "ok", f"driver {driver}" + (f", CUDA {versions['cuda']}" if "cuda" in versions else ""))]
    for info in gpus:
        total, used = info.get("total_mb"), info.get("used_mb")
        name = f"GPU {info['index']}"
        if total is None or used is None:
            rows.append(Check(g, name, "ok", f"{info['name']}, memory unknown", f"driver {driver}"))
            continue
        free = total - used
        value = f"{info['name']}, {total / 1024:.1f} GiB total, {free / 1024:.1f} GiB free"
        if used > max(1024, total * 0.1):
            rows.append(
                Check(
                    g,
                    name,
                    "warn",
                    value,
                    f"other processes hold {used / 1024:.1f} GiB of this GPU's memory (driver {driver})",
                    "`nvidia-smi` shows who; stop them, or train on another GPU (CUDA_VISIBLE_DEVICES)",
                )
            )
        else:
            rows.append(Check(g, name, "ok", value, f"driver {driver}"))
    return rows


# --------------------------------------------------------------------------------------------- disk


def _big_volume_hint(free_here: int) -> str:
    for candidate in BIG_VOLUMES:
        try:
            usage = shutil.disk_usage(candidate)
        except OSError:
            continue
        if usage.free > max(free_here * 2, DISK_WARN_BYTES):
            return f"{candidate} has {_gib(usage.free)} free"
    return ""


def disk_check(name: str, path: Path, free: int, total: int, env: str, hint: str = "") -> Check:
    """One folder's free space against the thresholds (pure: tests give it made-up numbers)."""
    value = f"{_gib(free)} free of {_gib(total)}"
    where = str(path) + ("" if path.exists() else " (not created yet)")
    if free >= DISK_WARN_BYTES:
        return Check("disk", name, "ok", value, where)
    target = hint.split(" has ")[0] if hint else "/workspace"
    fix = (
        f"move it to a big volume: `export {env}={target}/{'nyx' if env == 'NYX_HOME' else 'hf'}` "
        f"(in your shell profile), then move the folder's contents there"
        + (f"; {hint}" if hint else "")
    )
    if free < DISK_FAIL_BYTES:
        return Check("disk", name, "fail", value, f"{where}: not even one full-size checkpoint fits", fix)
    return Check(
        "disk",
        name,
        "warn",
        value,
        f"{where}: under {_gib(DISK_WARN_BYTES)}; SDXL/Flux models and checkpoints fill it",
        fix,
    )


def disk_checks() -> list[Check]:
    from huggingface_hub import constants as hf

    folders = [
        ("data folder", paths.data_dir(), "NYX_HOME"),
        ("jobs folder", paths.jobs_dir(), "NYX_HOME"),
        ("HF cache", Path(hf.HF_HUB_CACHE), "HF_HOME"),
    ]
    rows = []
    for name, path, env in folders:
        try:
            usage = shutil.disk_usage(_existing(path))
        except OSError as e:
            rows.append(Check("disk", name, "warn", "unknown", f"{path}: {e}", f"check that {path} is readable"))
            continue
        hint = _big_volume_hint(usage.free) if usage.free < DISK_WARN_BYTES else ""
        rows.append(disk_check(name, path, usage.free, usage.total, env, hint))
    return rows


# ----------------------------------------------------------------------------------------- backends


def kohya_check(timeout: float) -> Check:
    from nyx_tui.trainers.kohya import install

    root = install.install_dir()
    name = "kohya, kohya-custom"
    if not root.exists():
        return Check(
            "backends",
            name,
            "info",
            "not installed",
            "optional: sd-scripts as a backend (the native engine needs none)",
            "",
        )
    record = install.read_record(root) or {}
    ref = f"{record.get('ref', '?')} @ {str(record.get('commit', ''))[:10]}" if record else "no install record"
    checks = install.doctor(root, timeout=timeout)
    bad = [c for c in checks if not c.ok]
    if bad:
        first = bad[0]
        return Check(
            "backends",
            name,
            "warn",
            f"installed, does not run ({ref})",
            f"{root}: {first.name}: {first.detail}",
            "`nyx backend doctor` for every check; `nyx backend install kohya` repairs the install",
        )
    python = next((c.detail for c in checks if c.name == "python"), "")
    torch = next((c.detail for c in checks if c.name == "import torch"), "")
    return Check("backends", name, "ok", f"installed, runs ({ref})", f"{root}; {python}, torch {torch}")


# ------------------------------------------------------------------------------------- onnxruntime

ORT_PROBE = "import json, onnxruntime as o; print(json.dumps({'providers': o.get_available_providers()}))"


def onnx_check(probe: dict[str, Any] | None, error: str, gpus_seen: int) -> Check:
    g, name = "tagging", "onnxruntime"
    both = _installed("onnxruntime") and _installed("onnxruntime-gpu")
    clash = (
        "onnxruntime and onnxruntime-gpu are both installed and overwrite each other's files",
        "`pip uninstall -y onnxruntime onnxruntime-gpu`, then install one: onnxruntime-gpu on a GPU box",
    )
    if probe is None:
        if not _installed("onnxruntime") and not _installed("onnxruntime-gpu"):
            return Check(g, name, "warn", "not installed", "WD14 tagging is unavailable", "`pip install onnxruntime`")
        return Check(g, name, "warn", "does not import", error, clash[1] if both else "reinstall it: " + clash[1])
    providers = [str(p) for p in probe.get("providers", [])]
    value = ", ".join(providers) or "no providers"
    if both:
        return Check(g, name, "warn", value, clash[0], clash[1])
    if gpus_seen and "CUDAExecutionProvider" not in providers:
        return Check(
            g,
            name,
            "warn",
            value,
            "a GPU is here but onnxruntime is the CPU build: WD14 tagging runs on the CPU (slower)",
            "`pip uninstall -y onnxruntime && pip install onnxruntime-gpu`",
        )
    detail = "WD14 tagging on the GPU" if "CUDAExecutionProvider" in providers else "WD14 tagging on the CPU"
    return Check(g, name, "ok", value, detail)


# ----------------------------------------------------------------------------------------- terminal


def check_truecolor(env: dict[str, str]) -> Check:
    colorterm = env.get("COLORTERM", "")
    forced = env.get("TEXTUAL_COLOR_SYSTEM", "")
    if colorterm.lower() in ("truecolor", "24bit"):
        return Check("terminal", "truecolor", "ok", f"COLORTERM={colorterm}")
    if forced.lower() == "truecolor":
        return Check("terminal", "truecolor", "ok", "TEXTUAL_COLOR_SYSTEM=truecolor (forced)")
    return Check(
        "terminal",
        "truecolor",
        "warn",
        f"COLORTERM={colorterm or '(unset)'}",
        "Textual falls back to 256 colours: themes and the loss chart look coarser (SSH does not forward COLORTERM)",
        "if your terminal has truecolor: `export COLORTERM=truecolor` (or TEXTUAL_COLOR_SYSTEM=truecolor) on this box",
    )


def graphics_protocol() -> tuple[str, str]:
    """What textual-image would draw images with here (the same detection the TUI runs before starting):
    (protocol, how it was decided)."""
    stdout = sys.__stdout__
    if stdout is None or not stdout.isatty():
        return "unicode blocks", "stdout is not a terminal: run `nyx doctor` in the terminal itself to probe it"
    try:
        import textual_image.renderable as renderable
    except Exception as e:  # a terminal that answers oddly, a stdin that is not a tty
        return "halfblock", f"textual-image could not probe the terminal ({type(e).__name__}: {e})"
    names = {
        "TGPImage": "kitty (terminal graphics protocol)",
        "SixelImage": "sixel",
        "HalfcellImage": "halfblock",
        "UnicodeImage": "unicode blocks",
    }
    return names.get(renderable.Image.__name__, renderable.Image.__name__), "textual-image's terminal probe"


def check_graphics(protocol: str, how: str, in_tmux: bool) -> Check:
    if protocol.startswith(("kitty", "sixel")):
        return Check("terminal", "images", "ok", protocol, "sample images at full resolution")
    if protocol == "halfblock":
        fix = (
            "in tmux, `tmux set -g allow-passthrough on`; otherwise a kitty- or sixel-capable terminal "
            "(kitty, WezTerm, foot, iTerm2, Windows Terminal) shows full-resolution samples"
        )
        if not in_tmux:
            fix = fix.split("; otherwise ")[1].replace("a kitty-", "use a kitty-")
        return Check("terminal", "images", "warn", protocol, f"{how}: samples drawn with half-block characters", fix)
    return Check("terminal", "images", "info", protocol, how)


def tmux_passthrough(env: dict[str, str], timeout: float = 5.0) -> tuple[str | None, str]:
    """tmux's allow-passthrough (on / off / all) for the server $TMUX names; (None, why) when unknown."""
    try:
        done = subprocess.run(
            ["tmux", "show", "-gv", "allow-passthrough"],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env=env,
            stdin=subprocess.DEVNULL,
        )
    except FileNotFoundError:
        return None, "$TMUX is set but the tmux command is not on PATH"
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"tmux did not answer: {e}"
    if done.returncode != 0:
        return None, (done.stderr.strip() or f"exit {done.returncode}")
    return done.stdout.strip(), ""


def check_tmux(env: dict[str, str]) -> Check:
    if not env.get("TMUX"):
        return Check(
            "terminal",
            "tmux",
            "info",
            "not inside tmux",
            "jobs survive a dropped SSH anyway; inside tmux the TUI itself stays open too",
        )
    value, why = tmux_passthrough(env)
    fix = "`tmux set -g allow-passthrough on`, and add `set -g allow-passthrough on` to ~/.tmux.conf"
    if value is None:
        if "invalid option" in why or "unknown option" in why:
            return Check(
                "terminal",
                "tmux",
                "warn",
                "inside tmux, no allow-passthrough",
                f"this tmux is older than 3.3 ({why}): images fall back to half blocks",
                "upgrade tmux to 3.3 or newer",
            )
        return Check("terminal", "tmux", "warn", "inside tmux, passthrough unknown", why, fix)
    if value in ("on", "all"):
        return Check("terminal", "tmux", "ok", f"inside tmux, allow-passthrough {value}", "images pass through tmux")
    return Check(
        "terminal",
        "tmux",
        "warn",
        f"inside tmux, allow-passthrough {value or 'off'}",
        "tmux swallows the image protocol: samples fall back to half blocks",
        fix,
    )


def check_term(env: dict[str, str]) -> Check:
    term = env.get("TERM", "")
    if not term or term == "dumb":
        return Check(
            "terminal",
            "TERM",
            "warn",
            term or "(unset)",
            "the TUI cannot draw in a dumb terminal",
            "run nyx in a real terminal (or `export TERM=xterm-256color`)",
        )
    if term == "linux" or ("256" not in term and not any(k in term for k in ("kitty", "ghostty", "alacritty", "foot"))):
        return Check(
            "terminal",
            "TERM",
            "warn",
            term,
            "Rich and Textual assume 16 colours for this terminal type",
            "`export TERM=xterm-256color` (or tmux-256color inside tmux)",
        )
    return Check("terminal", "TERM", "ok", term)


def terminal_size() -> tuple[int, int] | None:
    for stream in (sys.__stdout__, sys.__stderr__, sys.__stdin__):
        try:
            if stream is not None and stream.isatty():
                size = os.get_terminal_size(stream.fileno())
                return size.columns, size.lines
        except (OSError, ValueError):
            continue
    return None


def check_size(size: tuple[int, int] | None) -> Check:
    if size is None:
        return Check("terminal", "terminal size", "info", "not a terminal", "stdout, stderr and stdin are not a tty")
    cols, rows = size
    value = f"{cols}×{rows}"
    if cols < MIN_COLUMNS or rows < MIN_ROWS:
        return Check(
            "terminal",
            "terminal size",
            "warn",
            value,
            f"the dashboard needs at least {MIN_COLUMNS}×{MIN_ROWS}",
            "enlarge the window or lower the font size",
        )
    return Check("terminal", "terminal size", "ok", value)


# ------------------------------------------------------------------------------------------ secrets


def _secrets_file_state(name: str, path: Path) -> str:
    """"set", "exposed" (present but readable by others, so Nyx ignores it), or "" (absent)."""
    try:
        mode = path.stat().st_mode
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return ""
    if not (isinstance(data.get(name), str) and data[name]):
        return ""
    return "exposed" if mode & (stat.S_IRWXG | stat.S_IRWXO) else "set"


def token_check(label: str, names: tuple[str, ...], env: dict[str, str], hf_file: Path | None, how: str) -> Check:
    """Where a token comes from; never its value."""
    from nyx_tui.settings import secrets_path

    for var in names:
        if env.get(var):
            return Check("secrets", label, "ok", f"set (env {var})")
    secrets = secrets_path()
    state = _secrets_file_state(names[0], secrets)
    if state == "set":
        return Check("secrets", label, "ok", f"set ({secrets})")
    if state == "exposed":
        return Check(
            "secrets",
            label,
            "warn",
            "ignored",
            f"{secrets} holds {names[0]} but others can read it, so Nyx does not use it",
            f"`chmod 600 {secrets}`",
        )
    if hf_file is not None and hf_file.is_file() and hf_file.stat().st_size > 0:
        return Check("secrets", label, "ok", f"set ({hf_file}, from `hf auth login`)")
    return Check("secrets", label, "info", "not set", how)


# ------------------------------------------------------------------------------------------- report


def _guard(group: str, name: str, fn: Callable[[], Any]) -> list[Check]:
    """A check that raises becomes a failed row with the reason, never a traceback."""
    try:
        result = fn()
    except Exception as e:
        return [Check(group, name, "fail", "check crashed", f"{type(e).__name__}: {e}", "report this as a Nyx bug")]
    return result if isinstance(result, list) else [result]


def collect(
    timeout: float = PROBE_TIMEOUT_S, env: dict[str, str] | None = None, graphics: tuple[str, str] | None = None
) -> list[Check]:
    """Every check, in report order. The slow ones (torch, onnxruntime, an installed sd-scripts) run at
    the same time in child processes. `graphics`: `graphics_protocol()`'s answer, when the caller probed
    the terminal already (before drawing a spinner on it)."""
    env = dict(os.environ if env is None else env)
    graphics = graphics or graphics_protocol()
    with concurrent.futures.ThreadPoolExecutor(max_workers=3) as pool:
        torch_future = pool.submit(run_probe, TORCH_PROBE, timeout)
        ort_future = pool.submit(run_probe, ORT_PROBE, timeout)
        kohya_future = pool.submit(_guard, "backends", "kohya, kohya-custom", lambda: kohya_check(timeout))

        checks = [check_nyx(), *_guard("system", "Python", check_python)]
        checks += _guard("system", "RAM", lambda: check_ram(read_meminfo()))
        checks += _guard("packages", "packages", check_packages)
        facts: tuple[list[dict[str, Any]], str | None, dict[str, str]] = ([], "NVML check crashed", {})
        try:
            facts = nvml_facts()
        except Exception as e:
            facts = ([], f"no NVIDIA GPU (NVML check crashed: {e})", {})
        gpus_seen = len(facts[0])
        torch_probe, torch_error = torch_future.result()
        checks += _guard("torch", "torch", lambda: torch_checks(torch_probe, torch_error, gpus_seen))
        checks += _guard("GPU", "GPU", lambda: gpu_checks(*facts))
        checks += _guard("disk", "disk", disk_checks)
        checks.append(Check("backends", "native", "ok", "built in", "diffusers + peft/lycoris in Nyx's environment"))
        checks += kohya_future.result()
        ort_probe, ort_error = ort_future.result()
        checks += _guard("tagging", "onnxruntime", lambda: onnx_check(ort_probe, ort_error, gpus_seen))

    in_tmux = bool(env.get("TMUX"))
    checks += _guard("terminal", "truecolor", lambda: check_truecolor(env))
    checks += _guard("terminal", "images", lambda: check_graphics(*graphics, in_tmux))
    checks += _guard("terminal", "tmux", lambda: check_tmux(env))
    checks += _guard("terminal", "TERM", lambda: check_term(env))
    checks += _guard("terminal", "terminal size", lambda: check_size(terminal_size()))

    def hf_token() -> Check:
        from huggingface_hub import constants as hf

        return token_check(
            "HF token",
            ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"),
            env,
            Path(hf.HF_TOKEN_PATH),
            "needed for gated models (Flux.1 dev, SD3) and uploads: `export HF_TOKEN=…` or `hf auth login`",
        )

    checks += _guard("secrets", "HF token", hf_token)
    checks += _guard(
        "secrets",
        "Civitai token",
        lambda: token_check(
            "Civitai token",
            ("CIVITAI_TOKEN",),
            env,
            None,
            "some Civitai downloads need one: `export CIVITAI_TOKEN=…` (civitai.com → account settings → API keys)",
        ),
    )
    return checks


def summary(checks: list[Check]) -> dict[str, Any]:
    counts: dict[str, int] = {s: sum(1 for c in checks if c.status == s) for s in STATUSES}
    worst = "fail" if counts["fail"] else "warn" if counts["warn"] else "ok"
    return {**counts, "status": worst}


def report(checks: list[Check]) -> dict[str, Any]:
    return {"nyx_version": __version__, "checks": [asdict(c) for c in checks], "summary": summary(checks)}


STYLE = {"ok": ("✓", "green"), "warn": ("!", "yellow"), "fail": ("✗", "bold red"), "info": ("·", "cyan")}


def print_report(checks: list[Check]) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = Console(highlight=False)
    table = Table(box=None, header_style="bold", show_edge=False, pad_edge=False)
    table.add_column("", no_wrap=True)
    table.add_column("check", no_wrap=True)
    table.add_column("value", overflow="fold")
    table.add_column("detail", style="dim", overflow="fold")
    group = None
    for c in checks:
        if c.group != group:
            group = c.group
            table.add_row("", Text(group, style="bold magenta"), "", "")
        mark, style = STYLE[c.status]
        table.add_row(Text(mark, style=style), c.name, Text(c.value, style=style if c.status != "ok" else ""), c.detail)
    console.print(table)
    problems = [c for c in checks if c.status in ("fail", "warn") and c.fix]
    if problems:
        console.print()
        console.print(Text("What to do", style="bold"))
        for c in problems:
            mark, style = STYLE[c.status]
            line = Text.assemble((f"{mark} ", style), (c.name, "bold"), ": ", c.fix)
            console.print(line)
    s = summary(checks)
    verdict = {"ok": "[green]ready[/]", "warn": "[yellow]usable, with warnings[/]", "fail": "[bold red]not ready[/]"}
    console.print(
        f"\n{s['ok']} ok, {s['warn']} warning(s), {s['fail']} failure(s), {s['info']} info: {verdict[s['status']]}"
    )


def cmd_doctor(args: argparse.Namespace) -> int:
    graphics = graphics_protocol()  # it talks to the terminal: before anything else draws there
    if args.json:
        checks = collect(timeout=args.timeout, graphics=graphics)
        print(json.dumps(report(checks), indent=1))
    else:
        from rich.console import Console

        with Console(stderr=True).status("checking (torch and CUDA load in a child process)…"):
            checks = collect(timeout=args.timeout, graphics=graphics)
        print_report(checks)
    return 1 if any(c.status == "fail" for c in checks) else 0


def register(sub: Any) -> None:
    doc = sub.add_parser(
        "doctor",
        help="check this box: Python, packages, torch/CUDA, GPUs, disk, RAM, backends, terminal",
        description="Check that this machine can run Nyx and train, and say how to fix what is missing. "
        "Exit code 1 when a check fails.",
    )
    doc.add_argument("--json", action="store_true", help="print one JSON object {nyx_version, checks, summary}")
    doc.add_argument(
        "--timeout",
        type=float,
        default=PROBE_TIMEOUT_S,
        metavar="S",
        help=f"seconds to wait for torch / onnxruntime to load in a child process (default {PROBE_TIMEOUT_S:g})",
    )
    doc.set_defaults(func=cmd_doctor)
