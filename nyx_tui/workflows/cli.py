"""`nyx lr-find CONFIG`, `nyx workflow run|check|show`, `nyx sweep FILE`: jobs that run or plan other runs.

The LR range test is a job of kind "lr-find" (worker `nyx_tui.workflows.lr_find`); its config is checked
first, like `nyx train`, and the job carries the resolved snapshot, so the test runs on exactly the data,
model and network the training would. Workflows and sweeps are checked whole before anything starts
(`workflows.plan`: every stage's or trial's full config through the pre-flight), then one orchestrator job
(kind "workflow" / "sweep", worker `nyx_tui.workflows.run`) queues their training jobs (docs/workflows.md).
Torch-free at import (the CLI imports this at start-up).
"""

from __future__ import annotations

import argparse
import contextlib
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


# ------------------------------------------------------------------------------------- workflows, sweeps

ORCHESTRATOR_STOP_GRACE_S = 900  # a stop lets the running stage save before the orchestrator is signalled


def load_plan(path: Path, kind: str | None = None) -> Any:
    """The checked plan of a workflow or sweep file (`kind` None: whichever table the file has)."""
    import tomllib

    from nyx_tui.workflows.plan import load_sweep, load_workflow

    if kind is None:
        try:
            kind = "sweep" if "sweep" in tomllib.loads(Path(path).expanduser().read_text()) else "workflow"
        except (OSError, ValueError):
            kind = "workflow"  # load_workflow says what is wrong with the file
    return load_sweep(path) if kind == "sweep" else load_workflow(path)


def create_orchestrator_job(plan: Any) -> Any:
    """The orchestrator's job (not started): its plan in plan.json, the file it came from copied beside it."""
    from nyx_tui.jobs.jobdir import atomic_write, create_job
    from nyx_tui.workflows.run import PLAN_FILE

    argv = [sys.executable, "-m", "nyx_tui.workflows.run", "."]
    extra = {"resource": "none", "stop_grace_s": ORCHESTRATOR_STOP_GRACE_S, "source": plan.source}
    job = create_job(plan.kind, plan.name, argv=argv, extra=extra)
    atomic_write(job.path / PLAN_FILE, json.dumps(plan.to_json(), indent=1))
    with contextlib.suppress(OSError):  # the plan holds everything the run needs; the copy is for the user
        atomic_write(job.path / Path(plan.source).name, Path(plan.source).read_bytes())
    return job


def _plan_or_problems(path: str, kind: str | None) -> Any:
    from nyx_tui.cli import _console, _print_problems
    from nyx_tui.workflows.plan import PlanError

    try:
        return load_plan(Path(path), kind)
    except PlanError as e:
        _print_problems(_console(stderr=True), e.problems, path)
        return None


def _print_plan(plan: Any) -> None:
    from rich.table import Table

    from nyx_tui.cli import _console

    console = _console()
    table = Table(title=f"{plan.kind} {plan.name}: {len(plan.stages)} {'trials' if plan.kind == 'sweep' else 'stages'}")
    table.add_column("#", justify="right")
    table.add_column("trial" if plan.kind == "sweep" else "stage")
    if plan.kind == "workflow":
        table.add_column("from")
    table.add_column("params" if plan.kind == "sweep" else "set")
    for i, st in enumerate(plan.stages, 1):
        values = " ".join(f"{k}={v}" for k, v in (st.params if plan.kind == "sweep" else st.overlay).items())
        row = [str(i), st.name] + ([st.start_from] if plan.kind == "workflow" else []) + [values]
        table.add_row(*row)
    console.print(table)
    for note in plan.notes:
        console.print(f"note: {note}", highlight=False)


def _run_plan(args: argparse.Namespace, kind: str | None) -> int:
    from nyx_tui.cli import run_job

    plan = _plan_or_problems(args.file, kind)
    if plan is None:
        return EXIT_USAGE
    _print_plan(plan)
    if getattr(args, "dry_run", False):
        return EXIT_OK
    job = create_orchestrator_job(plan)
    return run_job(job, detach=args.detach)


def cmd_workflow_run(args: argparse.Namespace) -> int:
    return _run_plan(args, "workflow")


def cmd_sweep(args: argparse.Namespace) -> int:
    return _run_plan(args, "sweep")


def cmd_workflow_check(args: argparse.Namespace) -> int:
    plan = _plan_or_problems(args.file, None)
    if plan is None:
        return EXIT_USAGE
    _print_plan(plan)
    print(f"ok: every {'trial' if plan.kind == 'sweep' else 'stage'} passes the checks")
    return EXIT_OK


def _loss(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, int | float) and not isinstance(value, bool) else ""


def _name(path: Any) -> str:
    return Path(str(path)).name if path else ""


def cmd_workflow_show(args: argparse.Namespace) -> int:
    from rich.table import Table

    from nyx_tui.cli import _console, _find
    from nyx_tui.workflows.plan import short_params
    from nyx_tui.workflows.run import RECORD_FILE

    err = _console(stderr=True)
    job = _find(args.job, err)
    if job is None:
        return EXIT_USAGE
    try:
        record = json.loads((Path(job.path) / RECORD_FILE).read_text())
    except FileNotFoundError:
        err.print(f"[red]error[/]: {job.id} has no {RECORD_FILE}: it is not a workflow or sweep job, or it has not "
                  "started yet", highlight=False)  # fmt: skip
        return EXIT_USAGE
    except (OSError, ValueError) as e:
        err.print(f"[red]error[/]: {RECORD_FILE} of {job.id} cannot be read: {e}", highlight=False)
        return EXIT_FAILED
    if args.json:
        print(json.dumps(record, indent=1))
        return EXIT_OK
    console = _console()
    sweep = record.get("kind") == "sweep"
    console.print(f"{record.get('kind')} {record.get('name')} · {record.get('state')} · job {job.id}", highlight=False)
    if record.get("error"):
        console.print(f"[red]error[/]: {record['error']}", highlight=False)
    items = [it for it in record.get("trials" if sweep else "stages") or [] if isinstance(it, dict)]
    if sweep:
        ranked = Table(title="trials ranked by validation loss, then final loss")
        for col in ("rank", "trial", "params", "val loss", "final loss", "state", "LoRA"):
            ranked.add_column(col, overflow="fold")
        for r in record.get("table") or []:
            ranked.add_row(str(r["rank"]), str(r.get("trial")), short_params(r.get("params")), _loss(r.get("val_loss")),
                           _loss(r.get("final_loss")), str(r.get("state")), _name(r.get("lora")))  # fmt: skip
        console.print(ranked)
        pending = [it for it in items if it.get("state") not in ("finished", "failed", "cancelled", "lost", "skipped")]
        if pending:
            console.print(f"{len(pending)} trial(s) not ended: " + ", ".join(f"{it['name']} {it.get('state')}"
                          for it in pending), highlight=False)  # fmt: skip
        best = record.get("best")
        if isinstance(best, dict):
            console.print(f"best: {best.get('trial')}; its LoRA: {best.get('lora')}", highlight=False)
            console.print(f"its config: {best.get('config')}", highlight=False)
        if record.get("grid"):
            console.print(f"sample grid: {record['grid']}", highlight=False)
        return EXIT_OK
    table = Table(title="stages")
    for col in ("#", "stage", "state", "from", "final loss", "val loss", "job", "LoRA"):
        table.add_column(col, overflow="fold")
    for i, it in enumerate(items, 1):
        table.add_row(str(i), str(it.get("name")), str(it.get("state")), str(it.get("from")),
                      _loss(it.get("final_loss")), _loss(it.get("val_loss")), str(it.get("job") or ""),
                      _name(it.get("lora")))  # fmt: skip
    console.print(table)
    for it in items:
        if it.get("error"):
            console.print(f"{it['name']}: {it['error']}", highlight=False)
        elif it.get("lora"):
            console.print(f"{it['name']}: {it['lora']}", highlight=False)
    return EXIT_OK


def register(sub: Any) -> None:
    wf = sub.add_parser(
        "workflow",
        help="multi-stage runs: stages that overlay one base config, each continuing the last (docs/workflows.md)",
    )
    wsub = wf.add_subparsers(dest="workflow_command", required=True, metavar="{run,check,show}")
    run = wsub.add_parser(
        "run",
        help="check every stage, then run them in order as queued jobs",
        description="Checks the whole workflow first (every stage's full config, as nyx train would), then starts "
        "an orchestrator job that queues each stage as a training job once the one before it has finished; "
        "a stage that fails stops the rest. Follow it like any job (Ctrl+C only detaches).",
    )
    run.add_argument("file", help="workflow file (TOML with [workflow] and [[stage]] tables)")
    run.add_argument("--detach", action="store_true", help="return at once; follow later with nyx attach")
    run.add_argument("--dry-run", action="store_true", help="check and list the stages; start nothing")
    run.set_defaults(func=cmd_workflow_run)
    check = wsub.add_parser("check", help="check a workflow or sweep file and list its stages or trials")
    check.add_argument("file", help="workflow or sweep file")
    check.set_defaults(func=cmd_workflow_check)
    show = wsub.add_parser("show", help="a workflow or sweep job's stages or trials, and a sweep's ranked table")
    show.add_argument("job", help="job id, unique part of it, or `last`")
    show.add_argument("--json", action="store_true", help="print the record (workflow.json)")
    show.set_defaults(func=cmd_workflow_show)

    sw = sub.add_parser(
        "sweep",
        help="a grid or random search over config fields, ranked by validation loss (docs/workflows.md)",
        description="Checks every trial's config, then starts an orchestrator job that queues all trials at once "
        "(they run side by side when there are several GPUs) with the same short budget, and ranks them by "
        "validation loss, then final loss. `nyx workflow show JOB` prints the table.",
    )
    sw.add_argument("file", help="sweep file (TOML with a [sweep] table)")
    sw.add_argument("--detach", action="store_true", help="return at once; follow later with nyx attach")
    sw.add_argument("--dry-run", action="store_true", help="check and list the trials; start nothing")
    sw.set_defaults(func=cmd_sweep)

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
