"""`nyx backend install/list/doctor`: an sd-scripts checkout with its own virtual environment.

sd-scripts pins its own torch, diffusers and transformers; installing them beside Nyx's would break one of
the two. So a backend lives in Nyx's data folder (`backends/sd-scripts`) with a venv inside it
(`venv/`), and the kohya worker runs sd-scripts with that venv's Python. What was installed (source, ref,
commit, whether its packages were installed) is recorded in `nyx-backend.json` beside it, so `list` and
`doctor` answer without guessing. Everything here shells out (git, python -m venv, pip): no torch.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nyx_tui.paths import data_dir

DEFAULT_SOURCE = "https://github.com/kohya-ss/sd-scripts.git"
DEFAULT_REF = "main"
RECORD = "nyx-backend.json"
SCRIPTS = ("train_network.py", "sdxl_train_network.py", "flux_train_network.py", "sd3_train_network.py")
BACKENDS = ("kohya",)


class InstallError(RuntimeError):
    """A step of the install failed; the message says which and what to do."""


def backends_dir() -> Path:
    return data_dir() / "backends"


def install_dir() -> Path:
    """Where `nyx backend install kohya` puts sd-scripts (both kohya backends use it)."""
    return backends_dir() / "sd-scripts"


def venv_python(root: Path) -> Path:
    return root / "venv" / "bin" / "python"


def _run(argv: list[str], what: str, cwd: Path | None = None, timeout: float | None = None) -> str:
    try:
        done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)
    except FileNotFoundError as e:
        raise InstallError(f"{what}: {argv[0]} is not installed ({e})") from e
    except subprocess.TimeoutExpired as e:
        raise InstallError(f"{what}: timed out after {timeout} s") from e
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-8:])
        raise InstallError(f"{what} failed (exit {done.returncode}):\n{tail}")
    return done.stdout


@dataclass
class InstallResult:
    path: Path
    record: dict[str, Any]
    messages: list[str] = field(default_factory=list)
    pip_failed: str | None = None


def install(
    source: str = DEFAULT_SOURCE,
    ref: str = DEFAULT_REF,
    target: Path | None = None,
    deps: bool = True,
    say: Callable[[str], None] = print,
) -> InstallResult:
    """Clone (or update) sd-scripts at `ref`, make its venv, install its requirements unless `deps` is
    false. A failed pip leaves the checkout and the venv in place (and says so): the user can fix the
    environment by hand, and `doctor` tells what is still missing."""
    root = target or install_dir()
    root.parent.mkdir(parents=True, exist_ok=True)
    if (root / ".git").is_dir():
        say(f"updating {root} from {source}")
        _run(["git", "fetch", "--tags", source, ref], "git fetch", cwd=root)
        _run(["git", "checkout", "--detach", "FETCH_HEAD"], f"git checkout {ref}", cwd=root)
    else:
        if root.exists() and any(root.iterdir()):
            raise InstallError(f"{root} exists and is not a git checkout: move it away or pass another target")
        say(f"cloning {source} into {root}")
        _run(["git", "clone", "--quiet", source, str(root)], "git clone")
        _run(["git", "checkout", "--quiet", "--detach", ref], f"git checkout {ref}", cwd=root)
    commit = _run(["git", "rev-parse", "HEAD"], "git rev-parse", cwd=root).strip()
    missing = [s for s in SCRIPTS if not (root / s).is_file()]
    if "train_network.py" in missing:
        raise InstallError(f"{source} at {ref} has no train_network.py: not an sd-scripts checkout")
    python = venv_python(root)
    if not python.exists():
        say(f"creating its virtual environment in {root / 'venv'}")
        _run([sys.executable, "-m", "venv", str(root / "venv")], "python -m venv")
    result = InstallResult(path=root, record={})
    packages = "skipped (--no-deps)"
    if deps:
        requirements = root / "requirements.txt"
        if not requirements.is_file():
            packages = "no requirements.txt"
        else:
            say("installing its requirements (pip install -r requirements.txt; this takes a while)")
            try:
                # requirements.txt ends in `-e .` (sd-scripts' `library` package): pip must run in the checkout
                _run([str(python), "-m", "pip", "install", "-r", "requirements.txt"], "pip install", cwd=root)
                packages = "installed"
            except InstallError as e:
                packages = "pip failed"
                result.pip_failed = str(e)
                say(f"{e}\nthe checkout is in place; install its packages by hand or run this again")
    record = {
        "backend": "kohya",
        "source": source,
        "ref": ref,
        "commit": commit,
        "path": str(root),
        "python": str(python),
        "packages": packages,
        "missing_scripts": missing,
        "installed_at": round(time.time(), 3),
    }
    (root / RECORD).write_text(json.dumps(record, indent=2) + "\n")
    result.record = record
    return result


def read_record(root: Path | None = None) -> dict[str, Any] | None:
    try:
        data = json.loads(((root or install_dir()) / RECORD).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def list_backends(configured: Path | None = None) -> list[dict[str, Any]]:
    """One row per backend Nyx knows: the native engine, and sd-scripts where it is installed (or where
    `configured`, a backend.path, points)."""
    rows: list[dict[str, Any]] = [{"name": "native", "path": "(built in)", "state": "ready", "detail": ""}]
    for root in [install_dir(), *([configured] if configured else [])]:
        record = read_record(root)
        if not root.exists():
            rows.append({"name": "kohya", "path": str(root), "state": "not installed", "detail": ""})
            continue
        detail = ""
        if record:
            detail = f"{record.get('ref')} @ {str(record.get('commit', ''))[:10]}, packages {record.get('packages')}"
        rows.append({"name": "kohya, kohya-custom", "path": str(root), "state": "installed", "detail": detail})
    return rows


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


def doctor(root: Path | None = None, timeout: float = 120) -> list[Check]:
    """Whether the backend can run, one check at a time; each failure says what to do. Never raises."""
    root = root or install_dir()
    checks = [
        Check(
            "checkout",
            root.is_dir(),
            str(root) if root.is_dir() else f"{root} does not exist: run `nyx backend install kohya`",
        )
    ]
    if not root.is_dir():
        return checks
    for script in SCRIPTS:
        present = (root / script).is_file()
        checks.append(Check(script, present, "present" if present else "missing (an old sd-scripts? update its ref)"))
    python = venv_python(root)
    if not python.exists():
        checks.append(Check("python", False, f"{python} is missing: run `nyx backend install kohya` again"))
        return checks
    try:
        done = subprocess.run([str(python), "--version"], capture_output=True, text=True, timeout=timeout, check=False)
        checks.append(Check("python", done.returncode == 0, (done.stdout or done.stderr).strip()))
    except (OSError, subprocess.TimeoutExpired) as e:
        checks.append(Check("python", False, f"{python} does not run: {e}"))
        return checks
    for module in ("torch", "accelerate"):
        code = f"import {module}; print({module}.__version__)"
        try:
            done = subprocess.run(
                [str(python), "-c", code], capture_output=True, text=True, timeout=timeout, check=False
            )
            ok = done.returncode == 0
            detail = done.stdout.strip() if ok else (done.stderr.strip().splitlines() or ["fails to import"])[-1]
        except (OSError, subprocess.TimeoutExpired) as e:
            ok, detail = False, str(e)
        if not ok:
            detail += " — run `nyx backend install kohya` (without --no-deps)"
        checks.append(Check(f"import {module}", ok, detail))
    return checks


def remove(root: Path | None = None) -> None:
    shutil.rmtree(root or install_dir())


# ------------------------------------------------------------------------------------------- the CLI
# `nyx backend …` is registered from here (cli.py calls `register`), as the dataset side registers its own.


def register(sub: Any) -> None:
    backend = sub.add_parser("backend", help="install, list and check trainer backends (kohya sd-scripts)")
    bsub = backend.add_subparsers(dest="backend_command", metavar="COMMAND")
    backend.set_defaults(func=lambda args: (backend.print_help(), 0)[1])
    inst = bsub.add_parser("install", help="clone sd-scripts into Nyx's data folder with its own venv")
    inst.add_argument("name", choices=BACKENDS, help="the backend (kohya serves kohya and kohya-custom)")
    inst.add_argument("--ref", default=DEFAULT_REF, help=f"branch, tag or commit (default {DEFAULT_REF})")
    inst.add_argument("--source", default=DEFAULT_SOURCE, help="git URL or local path to clone from")
    inst.add_argument("--path", type=Path, help=f"where to install (default {install_dir()})")
    inst.add_argument("--no-deps", action="store_true", help="skip `pip install -r requirements.txt`")
    inst.set_defaults(func=cmd_backend_install)
    lst = bsub.add_parser("list", help="the backends and where they are installed")
    lst.add_argument("--json", action="store_true", help="machine-readable output")
    lst.set_defaults(func=cmd_backend_list)
    doc = bsub.add_parser("doctor", help="check that an installed backend runs (scripts, python, torch)")
    doc.add_argument("--path", type=Path, help="an sd-scripts checkout (default: the installed one)")
    doc.set_defaults(func=cmd_backend_doctor)


def cmd_backend_install(args: Any) -> int:
    try:
        result = install(source=args.source, ref=args.ref, target=args.path, deps=not args.no_deps)
    except InstallError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    record = result.record
    print(f"sd-scripts {record['ref']} ({record['commit'][:10]}) installed in {result.path}")
    print(f"python: {record['python']}; packages: {record['packages']}")
    if record["missing_scripts"]:
        print(f"warning: this checkout lacks {', '.join(record['missing_scripts'])}")
    if result.pip_failed:
        print("error: pip failed; the backend will not run until its packages are installed", file=sys.stderr)
        return 1
    if args.path:
        print(f'set backend.path = "{result.path}" in your config to use it')
    return 0


def cmd_backend_list(args: Any) -> int:
    rows = list_backends()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        detail = f"  ({row['detail']})" if row["detail"] else ""
        print(f"{row['name']:<22} {row['state']:<14} {row['path']}{detail}")
    return 0


def cmd_backend_doctor(args: Any) -> int:
    checks = doctor(args.path)
    for c in checks:
        print(f"{'ok  ' if c.ok else 'FAIL'} {c.name:<24} {c.detail}")
    bad = [c for c in checks if not c.ok]
    print("the backend is ready" if not bad else f"{len(bad)} problem(s): the kohya backends will not run")
    return 0 if not bad else 1
