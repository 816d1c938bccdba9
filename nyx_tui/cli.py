"""`nyx`: every action of the TUI is also a subcommand.

Imports stay light at module level (no torch, no Textual): `nyx jobs` must answer in a blink on a box
that is busy training. Exit codes: 0 ok, 1 the job or action failed, 2 bad input (nothing was created).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from rich.console import Console

from nyx_tui import __version__

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _console(stderr: bool = False) -> Console:
    return Console(stderr=stderr, highlight=False)


def _print_problems(console: Console, problems: list[Any], source: str) -> None:
    errors = [p for p in problems if p.severity == "error"]
    warnings = [p for p in problems if p.severity != "error"]
    for p in errors:
        console.print(f"[bold red]error[/] [bold]{p.field}[/]: {p.message}", highlight=False)
        console.print(f"  [green]fix[/]: {p.fix}", highlight=False)
    for p in warnings:
        console.print(f"[yellow]warning[/] [bold]{p.field}[/]: {p.message}", highlight=False)
        console.print(f"  [green]fix[/]: {p.fix}", highlight=False)
    if errors:
        console.print(f"{source}: {len(errors)} error(s); nothing was started.", highlight=False)


# ------------------------------------------------------------------------------------------------ config


def cmd_config_new(args: argparse.Namespace) -> int:
    from nyx_tui.config.errors import ConfigError
    from nyx_tui.config.io import dumps_config
    from nyx_tui.config.presets import load_preset

    err = _console(stderr=True)
    try:
        cfg = load_preset(args.preset)
    except ConfigError as e:
        _print_problems(err, e.problems, f"preset {args.preset}")
        return EXIT_USAGE
    text = f"# Nyx training config, from preset {args.preset!r}. Check it with: nyx config check FILE\n"
    text += dumps_config(cfg)
    if not args.output:
        sys.stdout.write(text)
        return EXIT_OK
    out = Path(args.output)
    if out.exists() and not args.force:
        err.print(f"[red]error[/]: {out} exists; pass --force to overwrite it or choose another -o path")
        return EXIT_USAGE
    from nyx_tui.jobs.jobdir import atomic_write

    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, text)
    err.print(f"wrote {out} (preset {args.preset}); edit it, then: nyx config check {out}")
    return EXIT_OK


def cmd_config_check(args: argparse.Namespace) -> int:
    from nyx_tui.config.check import check_file

    console = _console()
    result = check_file(Path(args.file))
    _print_problems(console, result.problems, args.file)
    if not result.ok:
        return EXIT_USAGE
    console.print(f"[green]ok[/] {args.file}", highlight=False)
    return EXIT_OK


def cmd_config_presets(args: argparse.Namespace) -> int:
    from nyx_tui.config.presets import list_presets

    for name in list_presets():
        print(name)
    return EXIT_OK


def cmd_config_docs(args: argparse.Namespace) -> int:
    from nyx_tui.config.docs import parameters_markdown
    from nyx_tui.jobs.jobdir import atomic_write

    text = parameters_markdown()
    if args.output == "-":
        sys.stdout.write(text)
    else:
        atomic_write(Path(args.output), text)
        _console(stderr=True).print(f"wrote {args.output}")
    return EXIT_OK


# -------------------------------------------------------------------------------------------------- jobs


def _start_training(config_file: Path, err: Console) -> Any:
    """Validate everything, then create and spawn the job. Returns the JobDir or None (problems printed)."""
    from nyx_tui.config.check import check_file
    from nyx_tui.jobs.launch import spawn_supervisor, wait_started
    from nyx_tui.jobs.store import Store, job_summary
    from nyx_tui.trainers.base import create_training_job

    result = check_file(config_file)
    _print_problems(err, result.problems, str(config_file))
    if not result.ok or result.config is None:
        return None
    job = create_training_job(result.config)
    spawn_supervisor(job)
    try:
        Store().upsert(job_summary(job))
    except Exception as e:  # the store is an index; the job dir is the truth
        err.print(f"[yellow]warning[/]: could not record the job in the store: {e}")
    try:
        wait_started(job)
    except TimeoutError as e:
        err.print(f"[red]error[/]: {e}", highlight=False)
        raise SystemExit(EXIT_FAILED) from None
    return job


def _follow(job: Any, console: Console) -> int:
    from nyx_tui.follow import JobFollower, print_end

    try:
        end = JobFollower(job, console).run()
    except KeyboardInterrupt:
        console.print(f"\ndetached; the job goes on. Re-attach with: nyx attach {job.id}")
        return EXIT_OK
    print_end(console, job, end)
    return EXIT_OK if end.get("state") == "finished" else EXIT_FAILED


def cmd_train(args: argparse.Namespace) -> int:
    err = _console(stderr=True)
    job = _start_training(Path(args.file), err)
    if job is None:
        return EXIT_USAGE
    if args.detach:
        print(job.id)
        err.print(f"started {job.id} (detached). Follow it with: nyx attach {job.id}")
        return EXIT_OK
    return _follow(job, _console())


def _find(ref: str, err: Console) -> Any:
    from nyx_tui.jobs.jobdir import find_job

    try:
        return find_job(ref)
    except LookupError as e:
        err.print(f"[red]error[/]: {e}")
        return None


def cmd_attach(args: argparse.Namespace) -> int:
    job = _find(args.job, _console(stderr=True))
    return EXIT_USAGE if job is None else _follow(job, _console())


def cmd_stop(args: argparse.Namespace) -> int:
    from nyx_tui.jobs.control import send
    from nyx_tui.jobs.jobdir import TERMINAL

    err = _console(stderr=True)
    job = _find(args.job, err)
    if job is None:
        return EXIT_USAGE
    state = job.effective_state()
    if state in TERMINAL:
        err.print(f"{job.id} has already ended ({state}); nothing to stop")
        return EXIT_FAILED
    command = "cancel" if args.cancel else "stop"
    send(job.control_path, command)
    what = "cancel (no save)" if args.cancel else "stop (save, then exit)"
    err.print(f"asked {job.id} to {what}. Follow it with: nyx attach {job.id}")
    return EXIT_OK


def cmd_jobs(args: argparse.Namespace) -> int:
    from nyx_tui.jobs.store import Store

    jobs = Store().sync()
    if args.json:
        print(json.dumps(jobs, indent=1))
        return EXIT_OK
    from rich.table import Table

    table = Table("id", "kind", "state", "exit", "artifacts", box=None, header_style="bold")
    for j in jobs:
        loras = [a for a in j.get("artifacts", []) if a.get("what") == "lora"]
        table.add_row(
            j["id"],
            j["kind"],
            j["state"],
            "" if j.get("exit_code") is None else str(j["exit_code"]),
            str(len(loras)) + " lora" if loras else "",
        )
    console = _console()
    if not jobs:
        console.print("no jobs yet; start one with `nyx demo` or `nyx train FILE`")
    else:
        console.print(table)
    return EXIT_OK


# -------------------------------------------------------------------------------------------------- demo


def cmd_demo(args: argparse.Namespace) -> int:
    from nyx_tui import demo

    err = _console(stderr=True)
    # with --json the last line of stdout is the JSON answer: the live display goes to stderr
    view = _console(stderr=args.json)
    ws = demo.workspace(args.workspace)
    try:
        with err.status("building the tiny SD1.5 model and the synthetic dataset…"):
            demo.prepare_workspace(ws)
    except demo.DemoError as e:
        err.print(f"[red]error[/]: {e}", markup=True, highlight=False)
        return EXIT_FAILED
    config_file = demo.write_config(ws, steps=args.steps)
    job = _start_training(config_file, err)
    if job is None:
        return EXIT_USAGE
    if not args.headless and not args.json:
        if _interactive():
            return _run_tui(job.id)
        err.print("(not a terminal: following the job here; --headless says so explicitly)")
    rc = _follow(job, view)
    if rc != EXIT_OK:
        return rc
    loras = [a["path"] for a in job.artifacts() if a.get("what") == "lora"]
    final = loras[-1] if loras else None
    if args.json:
        answer = {"job": job.id, "lora": final, "model": str(ws / "model"), "dataset": str(ws / "dataset")}
        sys.stdout.write(json.dumps(answer) + "\n")
    else:
        err.print(f"\nYour LoRA: {final}\nLoad it in diffusers: pipe.load_lora_weights({str(final)!r})")
    return EXIT_OK


# --------------------------------------------------------------------------------------------------- tui


def _interactive() -> bool:
    return sys.stdin.isatty() and sys.stdout.isatty()


def _run_tui(job_id: str | None = None) -> int:
    """The Textual app (imported here: `nyx jobs` must not pay for Textual). Closing it leaves jobs running."""
    from nyx_tui.app import run

    return run(job_id)


def cmd_tui(args: argparse.Namespace) -> int:
    job_id = None
    if args.job:
        job = _find(args.job, _console(stderr=True))
        if job is None:
            return EXIT_USAGE
        job_id = job.id
    return _run_tui(job_id)


# -------------------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nyx",
        description="Nyx: train LoRAs for diffusion models from the terminal. Jobs run detached; "
        "every view (this CLI, the TUI) re-attaches from the files in the data folder "
        "(NYX_HOME overrides it).",
    )
    p.add_argument("--version", action="version", version=f"nyx {__version__}")
    p.epilog = "Without a command, nyx opens the terminal UI (jobs, config form, live dashboard)."
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    cfg = sub.add_parser("config", help="create and check training configs")
    csub = cfg.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    new = csub.add_parser("new", help="write a complete config from a preset")
    new.add_argument("--preset", default="sd15-lora", help="preset name (nyx config presets lists them)")
    new.add_argument("-o", "--output", help="file to write (default: stdout)")
    new.add_argument("--force", action="store_true", help="overwrite an existing file")
    new.set_defaults(func=cmd_config_new)
    check = csub.add_parser("check", help="validate a config file without loading any model")
    check.add_argument("file")
    check.set_defaults(func=cmd_config_check)
    csub.add_parser("presets", help="list the presets").set_defaults(func=cmd_config_presets)
    docs = csub.add_parser("docs", help="write the parameter reference (Markdown)")
    docs.add_argument("-o", "--output", default="docs/config.md", help="file, or - for stdout")
    docs.set_defaults(func=cmd_config_docs)

    train = sub.add_parser("train", help="validate a config and start a training job")
    train.add_argument("file")
    train.add_argument("--detach", action="store_true", help="return at once; follow later with nyx attach")
    train.set_defaults(func=cmd_train)

    jobs = sub.add_parser("jobs", help="list jobs")
    jobs.add_argument("--json", action="store_true", help="print a JSON array")
    jobs.set_defaults(func=cmd_jobs)

    attach = sub.add_parser("attach", help="follow a job's progress (Ctrl+C detaches; the job goes on)")
    attach.add_argument("job", help="job id, unique part of it, or 'last'")
    attach.set_defaults(func=cmd_attach)

    stop = sub.add_parser("stop", help="ask a job to save and stop")
    stop.add_argument("job", help="job id, unique part of it, or 'last'")
    stop.add_argument("--cancel", action="store_true", help="stop without saving")
    stop.set_defaults(func=cmd_stop)

    demo = sub.add_parser("demo", help="train a tiny LoRA on the CPU: no download, no GPU, about a minute")
    demo.add_argument("--headless", action="store_true", help="Rich progress on the terminal, no TUI")
    demo.add_argument("--workspace", help="folder for the demo model, dataset and config")
    demo.add_argument(
        "--json", action="store_true", help="print {job, lora, model, dataset} as the last line"
    )
    demo.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    demo.set_defaults(func=cmd_demo)

    tui = sub.add_parser("tui", help="open the terminal UI (the same as `nyx` with no command)")
    tui.add_argument("--job", help="open the dashboard on this job (id, unique part of it, or 'last')")
    tui.set_defaults(func=cmd_tui)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        if _interactive():
            return _run_tui()
        parser.print_help()  # piped or scripted: a TUI would only spin on a closed stdin
        return EXIT_OK
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `nyx jobs --json | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
