"""`nyx lr-find CONFIG`: the LR range test as a job (kind "lr-find"; worker `nyx_tui.workflows.lr_find`).

Torch-free at import (the CLI imports this at start-up): the worker does the heavy lifting in its own
process. The config is checked first, like `nyx train`; the job carries the resolved config snapshot, so
the test runs on exactly the data, model and network the training would.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def lr_find_argv(start: float, end: float, steps: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "nyx_tui.workflows.lr_find",
        ".",
        "--start",
        repr(start),
        "--end",
        repr(end),
        "--steps",
        str(steps),
    ]


def create_lr_find_job(cfg: Any, start: float, end: float, steps: int) -> Any:
    """A queued job of kind "lr-find" for a checked config (nothing runs until its supervisor starts)."""
    from nyx_tui.config.io import dumps_config
    from nyx_tui.jobs.jobdir import create_job

    name = f"lrfind-{cfg.model.family.value}-{cfg.saving.output_name}"
    extra = {"resource": "gpu", "gpus": 1, "backend": "native"}
    return create_job("lr-find", name, argv=lr_find_argv(start, end, steps), config_toml=dumps_config(cfg), extra=extra)


def suggestion_of(job: Any) -> dict[str, Any] | None:
    """The finished test's report (report.json in the job folder), or None."""
    try:
        data = json.loads((Path(job.path) / "report.json").read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and "suggestion" in data else None


def cmd_lr_find(args: argparse.Namespace) -> int:
    from nyx_tui.cli import _console, _print_problems, run_job
    from nyx_tui.config.check import check_file
    from nyx_tui.workflows.lr_find import range_problem

    err = _console(stderr=True)
    problem = range_problem(args.start, args.end, args.steps)
    if problem:
        err.print(f"[red]error[/]: {problem}", highlight=False)
        return EXIT_USAGE
    result = check_file(Path(args.file))
    _print_problems(err, result.problems, args.file)
    if not result.ok or result.config is None:
        return EXIT_USAGE
    cfg = result.config
    if cfg.backend.name.value != "native":
        err.print(f"note: the range test runs in the native engine (this config trains with {cfg.backend.name.value})")
    job = create_lr_find_job(cfg, args.start, args.end, args.steps)
    rc = run_job(job, detach=args.detach, queue=args.queue)
    if args.detach or args.queue:
        return rc
    report = suggestion_of(job)
    if report is None:
        return rc if rc != EXIT_OK else EXIT_FAILED
    lr = float(report["suggestion"])
    print(f"suggested learning rate: {lr:.3g}  ({report['rule']})")
    print(f"set it with: optimizer.learning_rate = {lr:.3g}   (curve: {Path(job.path) / 'report.json'})")
    return rc


def register(sub: Any) -> None:
    p = sub.add_parser(
        "lr-find",
        help="LR range test: a short run with a rising learning rate; suggests one (docs/quality.md)",
        description="Runs the config's model, network and optimizer for --steps steps with the learning rate "
        "rising exponentially from --start to --end, stops early when the loss explodes, and suggests the "
        "learning rate where the smoothed loss falls fastest. Nothing is saved but the curve (report.json).",
    )
    p.add_argument("file", help="training config (TOML)")
    p.add_argument("--start", type=float, default=1e-7, help="first learning rate (default 1e-7)")
    p.add_argument("--end", type=float, default=1.0, help="last learning rate (default 1)")
    p.add_argument("--steps", type=int, default=100, help="steps of the sweep (default 100)")
    p.add_argument("--detach", action="store_true", help="return at once; follow later with nyx attach")
    p.add_argument("--queue", action="store_true", help="wait in the queue for a free GPU")
    p.set_defaults(func=cmd_lr_find)
