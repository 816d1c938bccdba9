"""The kohya worker: runs sd-scripts for one job and speaks Nyx's events for it.

sd-scripts writes no events, so this process sits between it and the supervisor: it translates the job's
config (`translate.to_kohya`), writes the export into the job directory (`kohya/`), starts sd-scripts with
the backend's own Python (its venv, never Nyx's packages), reads its stdout and stderr (one pipe, in order)
in chunks (tqdm's `\\r`-only bar would break a line reader) through `KohyaOutput`, copies the raw bytes to
its own stdout (the supervisor keeps them in output.log) and turns `stop`/`cancel` from control.jsonl into
the signals a user's Ctrl+C would send. It exits non-zero with a one-line reason when sd-scripts failed, including the
cases sd-scripts itself ends with 0 ("No data found", nothing saved).

Torch-free: it only starts processes and reads bytes.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nyx_tui.config.errors import Problem
from nyx_tui.config.model import BackendKind, TrainingConfig
from nyx_tui.jobs.control import ControlReader
from nyx_tui.jobs.events import EventWriter
from nyx_tui.jobs.jobdir import JobDir
from nyx_tui.trainers.kohya.progress import Failure, KohyaOutput

CHUNK = 64 * 1024
CONTROL_POLL_S = 0.5
SCRIPTS = ("train_network.py", "sdxl_train_network.py", "flux_train_network.py", "sd3_train_network.py")
# Tests (and users who run one process on a box without accelerate in the backend's venv) start the script
# directly instead of through `accelerate launch`.
DIRECT_ENV = "NYX_KOHYA_DIRECT"
# Environment entries never handed to sd-scripts as arguments: it reads them itself (secrets stay out of
# argv, spec.json and the export).
SECRET_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "CIVITAI_TOKEN", "WANDB_API_KEY")

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_CONFIG = 3


class BackendMissing(RuntimeError):
    """No sd-scripts checkout where the config or `nyx backend install` says it is."""


def default_install_dir() -> Path:
    from nyx_tui.trainers.kohya.install import install_dir

    return install_dir()


def sd_scripts_dir(cfg: TrainingConfig) -> Path:
    """The checkout this config runs: `backend.path`, or the one `nyx backend install kohya` made."""
    return Path(cfg.backend.path).expanduser() if cfg.backend.path else default_install_dir()


def sd_scripts_problem(cfg: TrainingConfig) -> str | None:
    """Why the backend cannot run (no checkout, or no training scripts in it); None when it looks ready."""
    root = sd_scripts_dir(cfg)
    if not root.is_dir():
        where = f"backend.path = {root}" if cfg.backend.path else f"{root}"
        return (
            f"sd-scripts is not installed ({where} does not exist): run `nyx backend install kohya` or set backend.path"
        )
    missing = [s for s in SCRIPTS if not (root / s).is_file()]
    if "train_network.py" in missing:
        return f"{root} is not an sd-scripts checkout (no train_network.py): set backend.path to one"
    return None


def backend_python(root: Path) -> str:
    """The Python that runs sd-scripts: the checkout's own venv (`venv/`, or `.venv/` for a checkout the
    user made with uv), else this interpreter — a user who set backend.path to a checkout they run from
    their own environment."""
    for venv in ("venv", ".venv"):
        python = root / venv / "bin" / "python"
        if python.exists():
            return str(python)
    return sys.executable


def child_env(pythonpath: Sequence[str] = ()) -> dict[str, str]:
    """The environment sd-scripts gets: this one (which holds the secrets the launcher had), unbuffered
    output so a line arrives when printed, and a wide terminal so rich does not wrap log lines at 80.
    `pythonpath` goes first on PYTHONPATH (the scheduler shim, see `scheduler_shim`)."""
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(
            [*pythonpath, *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]]
        )
    env["PYTHONUNBUFFERED"] = "1"
    env["COLUMNS"] = "250"
    env.pop(DIRECT_ENV, None)
    return env


@dataclass
class Launch:
    argv: list[str]
    files: dict[str, Path] = field(default_factory=dict)
    script: str = ""
    pythonpath: list[str] = field(default_factory=list)


def scheduler_shim(out_dir: Path) -> Path:
    """A folder holding only `nyx_tui.trainers.kohya.schedulers` (and empty parent packages), for
    sd-scripts' PYTHONPATH: the custom backend names Nyx's schedulers by dotted path, and sd-scripts' venv
    must import them without seeing Nyx's own packages (whose torch may not be its torch)."""
    from nyx_tui.trainers.kohya import schedulers

    pkg = out_dir / "nyx_tui" / "trainers" / "kohya"
    pkg.mkdir(parents=True, exist_ok=True)
    for folder in (out_dir / "nyx_tui", out_dir / "nyx_tui" / "trainers", pkg):
        (folder / "__init__.py").write_text('"""Only what sd-scripts imports from Nyx by dotted path."""\n')
    (pkg / "schedulers.py").write_text(Path(schedulers.__file__).read_text())
    return out_dir


def prepare(job: JobDir, cfg: TrainingConfig) -> tuple[Launch | None, list[str]]:
    """Translate and write the export; the command to run, or the problems that stop it."""
    from nyx_tui.trainers.kohya.translate import to_kohya, write_export

    # without saving.output_dir a job keeps its LoRAs in its own folder, as a native one does
    export = to_kohya(cfg, custom=cfg.backend.name == BackendKind.KOHYA_CUSTOM, output_dir=str(job.output_dir))
    problems = [_problem_text(p) for p in export.problems if getattr(p, "is_error", True)]
    if problems:
        return None, problems
    job.output_dir.mkdir(parents=True, exist_ok=True)
    root = sd_scripts_dir(cfg)
    python = backend_python(root)
    files = write_export(export, job.path / "kohya", sd_scripts_dir=root, python=python)
    config_path, dataset_path = files["config"], files["dataset"]
    if os.environ.get(DIRECT_ENV) or (cfg.training.num_processes <= 1 and not _has_accelerate(python)):
        argv = [python, str(root / export.script), "--config_file", str(config_path)]
        argv += ["--dataset_config", str(dataset_path)]
    else:
        argv = [str(a) for a in export.launch_argv(root, python, cfg.training.num_processes, config_path, dataset_path)]
    pythonpath = []
    if any(str(v).startswith("nyx_tui.") for v in export.config.values()):
        pythonpath.append(str(scheduler_shim(job.path / "kohya" / "pylib")))
    return Launch(argv=argv, files=files, script=str(export.script), pythonpath=pythonpath), []


def _has_accelerate(python: str) -> bool:
    """Whether `accelerate launch` can run in that environment (a venv holds it as a script or a module)."""
    bindir = Path(python).parent
    if (bindir / "accelerate").exists():
        return True
    return any((p / "accelerate").is_dir() for p in (bindir.parent / "lib").glob("python3*/site-packages"))


def _problem_text(problem: Any) -> str:
    if isinstance(problem, str):
        return problem
    fieldname, message = getattr(problem, "field", ""), getattr(problem, "message", str(problem))
    fix = getattr(problem, "fix", None) or getattr(problem, "hint", None)
    return f"{fieldname}: {message}" + (f" ({fix})" if fix else "")


class Run:
    """One sd-scripts process, its output pumped through the parser until it exits."""

    def __init__(
        self, job: JobDir, events: EventWriter, argv: Sequence[str], out: Any = None, pythonpath: Sequence[str] = ()
    ) -> None:
        self.job, self.events, self.argv, self.pythonpath = job, events, list(argv), list(pythonpath)
        self.parser = KohyaOutput()
        self.out = out if out is not None else sys.stdout.buffer
        self.control = ControlReader(job.control_path)
        self.requested: str | None = None
        self._own_group = False

    def start(self) -> Any:
        import subprocess

        # The supervisor made this worker a process group leader: sd-scripts (and accelerate's ranks) stay in
        # that group, so the supervisor's signals reach them all, and a stop signals the group as Ctrl+C
        # does. Run any other way (a test, a shell), sd-scripts gets a group of its own.
        self._own_group = os.getpgrp() != os.getpid()
        return subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            # one pipe for both, as a terminal shows them: the order of `epoch 2/2` (stdout) and the bar's
            # frames (stderr) is kept, which two pipes read by two threads would not guarantee
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=child_env(self.pythonpath),
            cwd=self.job.path,
            process_group=0 if self._own_group else None,
        )

    def run(self) -> tuple[int, Failure | None]:
        proc = self.start()
        chunks: queue.Queue[tuple[str, bytes | None]] = queue.Queue()

        def reader(name: str, fd: int) -> None:
            try:
                while data := os.read(fd, CHUNK):
                    chunks.put((name, data))
            finally:
                chunks.put((name, None))

        assert proc.stdout is not None
        thread = threading.Thread(target=reader, args=("output", proc.stdout.fileno()), daemon=True)
        thread.start()
        open_streams = 1
        next_poll = 0.0
        while open_streams:
            try:
                name, data = chunks.get(timeout=CONTROL_POLL_S)
            except queue.Empty:
                name, data = "", b""
            if data is None:
                open_streams -= 1
            elif data:
                self.out.write(data)
                self.out.flush()
                self._emit(self.parser.feed(data, name))
            if time.monotonic() >= next_poll:
                next_poll = time.monotonic() + CONTROL_POLL_S
                self._control(proc)
        returncode = proc.wait()
        self._emit(self.parser.close())
        return returncode, self.parser.failure(returncode)

    def _emit(self, events: list[tuple[str, dict[str, Any]]]) -> None:
        for kind, fields in events:
            self.events.emit(kind, **fields)

    def _control(self, proc: Any) -> None:
        for message in self.control.poll():
            command = message.get("command")
            if command == "stop" and self.requested is None:
                self.requested = "stop"
                self._signal(proc, signal.SIGINT)
                self.events.emit(
                    "log",
                    level="info",
                    message="stop received: sent SIGINT to sd-scripts (Ctrl+C); it saves if it handles that",
                    ack="stop",
                )
            elif command == "cancel":
                self.requested = "cancel"
                self._signal(proc, signal.SIGTERM)
                self.events.emit(
                    "log", level="info", message="cancel received: sent SIGTERM to sd-scripts", ack="cancel"
                )
            elif command in ("save_now", "sample_now"):
                self.events.emit(
                    "log",
                    level="warning",
                    message=f"{command}: sd-scripts cannot do this on request; it saves and samples on its schedule",
                    ack=command,
                )

    def _signal(self, proc: Any, sig: int) -> None:
        """To sd-scripts' whole group (accelerate's ranks too). When that group is this worker's, the
        worker ignores the signal itself (see `main`) and keeps reading until sd-scripts exits."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid if self._own_group else os.getpgrp(), sig)


def run_job(job: JobDir, cfg: TrainingConfig, events: EventWriter) -> int:
    """The whole worker: checks, export, run, verdict. Returns the exit code."""

    def say(message: str, level: str = "info", **extra: Any) -> None:
        events.emit("log", level=level, message=message, **extra)
        print(f"[nyx] {message}", flush=True)

    problem = sd_scripts_problem(cfg)
    if problem:
        say(problem, "error")
        return EXIT_CONFIG
    launch, problems = prepare(job, cfg)
    if launch is None:
        for p in problems:
            say(f"cannot run sd-scripts with this config: {p}", "error")
        return EXIT_CONFIG
    for what, path in launch.files.items():
        if what in ("config", "dataset"):
            events.emit("artifact", path=str(path), what="config")
    events.emit("progress", done=0, total=1, unit="stage", message=f"starting sd-scripts ({launch.script})")
    say("running: " + " ".join(launch.argv))
    runner = Run(job, events, launch.argv, pythonpath=launch.pythonpath)
    try:
        returncode, failure = runner.run()
    except OSError as e:
        say(f"could not start sd-scripts ({launch.argv[0]}): {e}", "error")
        return EXIT_FAILED
    if runner.requested:  # the supervisor ends it cancelled whatever the code; say what sd-scripts did
        saved = f"; it saved {runner.parser.saved[-1]}" if runner.parser.saved else "; nothing was saved"
        say(f"sd-scripts exited with code {returncode} after {runner.requested}{saved}")
        return 0 if returncode in (0, -signal.SIGINT, 130) else EXIT_FAILED
    if failure is not None:
        say(f"sd-scripts failed: {failure.error}", "error", error=failure.error, hint=failure.hint)
        print(f"[nyx] hint: {failure.hint}", flush=True)
        print(f"[nyx] {failure.error}", flush=True)  # the last line of output.log and of the end's last_lines
        return EXIT_FAILED
    say(f"sd-scripts finished: {len(runner.parser.saved)} checkpoint(s) saved")
    return 0


def _note_signal(signum: int, frame: object) -> None:
    """The worker outlives the signal it shares with sd-scripts: it ends when sd-scripts' pipes close."""


def main(argv: list[str] | None = None) -> int:
    from nyx_tui.config.io import load_config

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m nyx_tui.trainers.kohya JOB_DIR", file=sys.stderr)
        return EXIT_USAGE
    job = JobDir(Path(args[0]).resolve())
    # sd-scripts shares this worker's process group: the supervisor's SIGINT/SIGTERM (and a stop's SIGINT)
    # reach it directly; the worker stays to read its last words and report them
    # reach it directly; the worker stays to read its last words and report them. A handler, not SIG_IGN:
    # an ignored SIGINT is inherited through exec, and Python then never raises KeyboardInterrupt in sd-scripts
    signal.signal(signal.SIGINT, _note_signal)
    signal.signal(signal.SIGTERM, _note_signal)
    with EventWriter(job.events_path) as events:
        try:
            cfg = load_config(job.config_path)
        except Exception as e:
            events.emit("log", level="error", message=f"the job's config cannot be read: {e}")
            print(f"[nyx] the job's config cannot be read: {e}", flush=True)
            return EXIT_CONFIG
        length = (
            {"total_epochs": cfg.training.max_epochs}
            if cfg.training.max_epochs
            else {"total_steps": cfg.training.max_steps}
        )
        events.emit("start", job=job.id, job_kind="train", backend=cfg.backend.name.value, **length)
        events.emit("artifact", path=str(job.config_path), what="config")
        try:
            return run_job(job, cfg, events)
        except Exception as e:  # a bug or an unwritable job dir: the traceback goes to output.log
            import traceback

            traceback.print_exc()
            events.emit("log", level="error", message=f"the kohya worker failed: {e!r}")
            return EXIT_FAILED


# ------------------------------------------------------------------------------------------- trainers


@dataclass(frozen=True)
class KohyaTrainer:
    """kohya's sd-scripts (`python -m nyx_tui.trainers.kohya JOB_DIR`, which starts sd-scripts itself)."""

    name: str = BackendKind.KOHYA.value
    custom: bool = False

    def argv(self, cfg: TrainingConfig) -> list[str]:
        """The worker, with Nyx's Python; it runs sd-scripts with the backend's (one process, or
        `accelerate launch` with `training.num_processes`)."""
        return [sys.executable, "-m", "nyx_tui.trainers.kohya", "."]

    def problems(self, cfg: TrainingConfig) -> list[Problem]:
        out: list[Problem] = []
        from nyx_tui.trainers.kohya.translate import to_kohya

        # the job's folder stands in for an empty saving.output_dir, as the runner does
        out += to_kohya(cfg, custom=self.custom, output_dir="<job>/output").problems
        problem = sd_scripts_problem(cfg)
        if problem:
            out.append(
                Problem(
                    "backend.path",
                    problem,
                    "run `nyx backend install kohya` or set backend.path to an sd-scripts checkout",
                )
            )
        return out


@dataclass(frozen=True)
class KohyaCustomTrainer(KohyaTrainer):
    """sd-scripts with Derrian's custom optimizers and schedulers (CAME, REX, …) passed by dotted path."""

    name: str = BackendKind.KOHYA_CUSTOM.value
    custom: bool = True
