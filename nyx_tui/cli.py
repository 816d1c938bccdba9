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
    if result.config is not None:  # a config with file problems still has a size
        _print_vram(console, result.config, full=args.vram)
    if not result.ok:
        return EXIT_USAGE
    console.print(f"[green]ok[/] {args.file}", highlight=False)
    return EXIT_OK


def _print_vram(console: Console, cfg: Any, *, full: bool = False) -> None:
    """The VRAM estimate of a config (`nyx_tui.vram`, torch-free): one line, or the breakdown with `full`.
    Figures are for the full-size model of the family, whatever the file holds."""
    from nyx_tui import vram

    try:
        text = vram.estimate(cfg).describe()
    except Exception as e:  # an estimate must never stop a check or a launch
        console.print(f"[yellow]no VRAM estimate[/]: {type(e).__name__}: {e}", highlight=False)
        return
    console.print(("VRAM estimate " + text) if full else f"VRAM estimate {text.splitlines()[0]}", highlight=False)


def cmd_config_export(args: argparse.Namespace) -> int:
    """`nyx config export --to kohya FILE -o DIR`: sd-scripts' config TOML, dataset TOML, prompts and the
    launch command, written for a user who wants to run (or read) what the kohya backend would run."""
    import shlex

    from nyx_tui.config.errors import ConfigError
    from nyx_tui.config.io import load_config
    from nyx_tui.trainers.kohya.translate import to_kohya, write_export

    console, err = _console(), _console(stderr=True)
    try:
        cfg = load_config(Path(args.file))
    except ConfigError as e:
        _print_problems(err, e.problems, args.file)
        return EXIT_USAGE
    out = Path(args.output)
    export = to_kohya(cfg, custom=args.custom, output_dir=str((out / "output").expanduser().absolute()))
    _print_problems(err, export.problems, args.file)
    if not export.ok:
        return EXIT_USAGE
    sd_scripts, python = args.sd_scripts or cfg.backend.path, args.python
    try:  # default: the checkout and environment `nyx backend install kohya` makes
        from nyx_tui.trainers.kohya.install import install_dir, venv_python

        sd_scripts = sd_scripts or str(install_dir())
        python = python or str(venv_python(Path(sd_scripts)))
    except ImportError:
        sd_scripts, python = sd_scripts or "sd-scripts", python or "python"
    files = write_export(export, out, sd_scripts_dir=sd_scripts, python=python)
    for name, path in files.items():
        console.print(f"{name}: {path}", highlight=False)
    argv = export.launch_argv(sd_scripts, python, None, files["config"], files["dataset"])
    console.print(shlex.join(argv), highlight=False, soft_wrap=True)
    return EXIT_OK


def cmd_config_presets(args: argparse.Namespace) -> int:
    """The presets and user templates: name, built-in/user, families, VRAM, what each is for (`--names`:
    names only, one a line, for scripts)."""
    from nyx_tui.config.presets import list_presets

    if args.names:
        for name in list_presets():
            print(name)
        return EXIT_OK
    from nyx_tui.config.templates import list_templates

    templates = list_templates()
    width = max((len(t.name) for t in templates), default=4)
    for t in templates:
        if t.error:
            print(f"{t.name:<{width}}  {t.source:<8}  (does not load: {t.error})")
            continue
        families = ",".join(t.families)
        print(f"{t.name:<{width}}  {t.source:<8}  {families:<5}  {t.vram_text:<18}  {t.summary}")
    return EXIT_OK


def cmd_config_save_template(args: argparse.Namespace) -> int:
    """`nyx config save-template FILE --name N [--description D]`: keep a config as a user template."""
    from nyx_tui.config.errors import ConfigError
    from nyx_tui.config.io import load_config
    from nyx_tui.config.templates import TemplateError, save_template

    err = _console(stderr=True)
    try:
        cfg = load_config(Path(args.file))
        path = save_template(args.name, cfg, args.description or "", overwrite=args.force)
    except ConfigError as e:
        _print_problems(err, e.problems, args.file)
        return EXIT_USAGE
    except TemplateError as e:
        err.print(f"[red]error[/]: {e.message}\n  [green]fix[/]: {e.fix}", highlight=False)
        return EXIT_USAGE
    err.print(f"saved template {path.stem!r} as {path}; use it with: nyx config new --preset {path.stem}")
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


def cmd_config_import(args: argparse.Namespace) -> int:
    """`nyx config import FILE.toml [--dataset D.toml] -o OUT.toml`: an sd-scripts config as a Nyx config,
    with every setting Nyx cannot represent listed (never dropped in silence). Exit 2 when none was built."""
    from nyx_tui.config.io import save_config
    from nyx_tui.trainers.kohya.importer import read_kohya_files

    err = _console(stderr=True)
    out = Path(args.output)
    if out.exists() and not args.force:
        err.print(f"[red]error[/]: {out} exists; pass --force to overwrite it or choose another -o path")
        return EXIT_USAGE
    result = read_kohya_files(Path(args.file), Path(args.dataset) if args.dataset else None, script=args.script)
    for line in result.unrepresented:
        err.print(f"[yellow]not imported[/] {line}", highlight=False, markup=False)
    _print_problems(err, result.problems, args.file)
    if result.config is None:
        return EXIT_USAGE
    save_config(result.config, out)
    err.print(f"wrote {out} ({len(result.unrepresented)} setting(s) not imported); check it: nyx config check {out}")
    return EXIT_OK


# -------------------------------------------------------------------------------------------------- jobs


def launch_job(job: Any, err: Console, *, queue: bool = False, spawned: bool = False) -> bool:
    """Start a job a command created, the one way: hand it to the scheduler (`queue`) or spawn its
    supervisor (unless `spawned` already), record it in the index, and (not queued) wait until it runs.
    False when it did not start (the reason is printed)."""
    from nyx_tui.jobs.launch import spawn_supervisor, wait_started
    from nyx_tui.jobs.store import Store, job_summary

    if queue:
        from nyx_tui.jobs.queue import enqueue

        enqueue(job)
    elif not spawned:
        spawn_supervisor(job)
    try:
        Store().upsert(job_summary(job))
    except Exception as e:  # the store is an index; the job dir is the truth
        err.print(f"[yellow]warning[/]: could not record the job in the store: {e}")
    if queue:
        return True
    try:
        wait_started(job)
    except TimeoutError as e:
        err.print(f"[red]error[/]: {e}", highlight=False)
        return False
    return True


def run_job(job: Any, *, detach: bool, queue: bool = False, spawned: bool = False, queued_note: str = "") -> int:
    """`launch_job`, then what every job command does next: print the id and return (detached or queued),
    or follow the job to its end (Ctrl+C only detaches). The exit code of the command."""
    err = _console(stderr=True)
    if not launch_job(job, err, queue=queue, spawned=spawned):
        return EXIT_FAILED
    if queue:
        print(job.id)
        err.print(f"queued {job.id}. {queued_note or '`nyx queue` shows the order.'}")
        return EXIT_OK
    if detach:
        print(job.id)
        err.print(f"started {job.id} (detached). Follow it with: nyx attach {job.id}")
        return EXIT_OK
    return _follow(job, _console())


def _start_training(config_file: Path, err: Console, queue: bool = False) -> Any:
    """Validate everything, then create the job and spawn its supervisor (or, with `queue`, hand it to
    the scheduler). Returns the JobDir, or None when the config has problems (they are printed)."""
    from nyx_tui.config.check import check_file
    from nyx_tui.trainers.base import create_training_job

    result = check_file(config_file)
    _print_problems(err, result.problems, str(config_file))
    if not result.ok or result.config is None:
        return None
    _print_vram(err, result.config)
    job = create_training_job(result.config, queue=queue)
    if not launch_job(job, err, queue=queue):
        raise SystemExit(EXIT_FAILED)
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
    job = _start_training(Path(args.file), err, queue=args.queue)
    if job is None:
        return EXIT_USAGE
    if args.queue:
        from nyx_tui.jobs.queue import Queue

        position = next((i for i, e in enumerate(Queue().entries(), 1) if e.id == job.id), None)
        print(job.id)
        where = f"position {position} in the queue" if position else "the queue (already starting)"
        err.print(f"queued {job.id} at {where}. It starts when a GPU is free; `nyx queue` shows the order.")
        return EXIT_OK
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
    if state == "queued":
        from nyx_tui.jobs.queue import cancel_queued

        if cancel_queued(job):
            err.print(f"cancelled {job.id}; it had not started, so there is nothing to save")
            return EXIT_OK
    command = "cancel" if args.cancel else "stop"
    send(job.control_path, command)
    what = "cancel (no save)" if args.cancel else "stop (save, then exit)"
    err.print(f"asked {job.id} to {what}. Follow it with: nyx attach {job.id}")
    return EXIT_OK


def _csv(values: list[str] | None) -> list[str]:
    return [v.strip() for item in values or [] for v in item.split(",") if v.strip()]


def _fmt_duration(seconds: float | None) -> str:
    from nyx_tui.jobs.series import format_duration

    return "" if seconds is None else format_duration(seconds)


def cmd_jobs(args: argparse.Namespace) -> int:
    from nyx_tui.jobs.jobdir import STATES
    from nyx_tui.jobs.store import Store, group_jobs, select

    err = _console(stderr=True)
    states, kinds = _csv(args.state), _csv(args.kind)
    unknown = [s for s in states if s not in STATES]
    if unknown:
        err.print(f"[red]error[/]: unknown state {', '.join(unknown)}; one of {', '.join(STATES)}")
        return EXIT_USAGE
    jobs = select(Store().sync(), states, kinds)
    if any(j["state"] == "queued" for j in jobs):  # after a reboot nothing runs the queue until asked
        from nyx_tui.jobs.queue import Queue
        from nyx_tui.jobs.scheduler import ensure_scheduler

        if Queue().waiting():
            ensure_scheduler()
    if args.limit:
        jobs = jobs[-args.limit :]
    if args.json:
        print(json.dumps(jobs, indent=1))
        return EXIT_OK
    from rich.table import Column, Table

    table = Table("kind", "family", "state", "steps", "loss", "time", "artifacts", box=None, header_style="bold")
    # `└ ` + an id must not wrap; the other columns keep what they need (about 56 characters)
    id_width = max(24, _console().width - 56)
    table.columns.insert(0, Column("id", no_wrap=True, overflow="ellipsis", max_width=id_width))
    for j, depth in group_jobs(jobs):  # a workflow's or sweep's stages right under it, `└ ` before their ids
        loras = [a for a in j.get("artifacts", []) if a.get("what") == "lora"]
        loss = j.get("final_loss")
        table.add_row(
            "  " * (depth - 1) + "└ " + j["id"] if depth else j["id"],
            j["kind"],
            j.get("family") or "",
            j["state"] + ("" if j.get("exit_code") in (None, 0) else f" ({j['exit_code']})"),
            "" if j.get("steps") is None else str(j["steps"]),
            "" if loss is None else f"{loss:.4f}",
            _fmt_duration(j.get("duration")),
            str(len(loras)) + " lora" if loras else "",
        )
    console = _console()
    if not jobs:
        empty = "no jobs yet; start one with `nyx demo` or `nyx train FILE`"
        console.print("no jobs match" if states or kinds else empty)
    else:
        console.print(table)
    return EXIT_OK


def _parse_age(text: str) -> float:
    """`7d`, `12h`, `30m` or a number of days, in seconds."""
    units = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0}
    text = text.strip().lower()
    unit = units.get(text[-1:]) if text else None
    number = text[:-1] if unit else text
    try:
        value = float(number)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an age; write 7d, 12h, 30m or a number of days") from None
    if value < 0:
        raise argparse.ArgumentTypeError("an age cannot be negative")
    return value * (unit or units["d"])


def cmd_jobs_clean(args: argparse.Namespace) -> int:
    """Delete the folders of ended jobs. Never one that runs or waits; never one holding a LoRA or a
    state (inside its folder) unless --with-artifacts says so; never without a yes."""
    import shutil
    import time

    from nyx_tui.jobs.jobdir import TERMINAL, JobDir
    from nyx_tui.jobs.store import Store, select

    err = _console(stderr=True)
    states, kinds = _csv(args.state), _csv(args.kind)
    active = [s for s in states if s not in TERMINAL]
    if active:
        err.print(
            f"[red]error[/]: jobs that are {', '.join(active)} are never cleaned; "
            f"stop them first (`nyx stop JOB`). Cleanable states: {', '.join(sorted(TERMINAL))}"
        )
        return EXIT_USAGE
    cutoff = time.time() - args.older_than
    picked = [
        j
        for j in select(Store().sync(), states or TERMINAL, kinds)
        if (j.get("ended") or j.get("created") or 0) <= cutoff
    ]
    delete: list[tuple[dict[str, Any], list[dict[str, Any]]]] = []
    kept: list[tuple[dict[str, Any], list[dict[str, Any]]]] = []
    for j in picked:
        root = Path(j["dir"]).resolve()
        inside = [a for a in j.get("artifacts", []) if _within(Path(str(a.get("path", ""))), root)]
        (delete if not inside or args.with_artifacts else kept).append((j, inside))
    for j, inside in kept:
        err.print(f"kept {j['id']}: it holds {len(inside)} artifact(s), e.g. {inside[0]['path']}")
    if kept:
        err.print("  (add --with-artifacts to delete those too)")
    if not delete:
        err.print("nothing to clean")
        return EXIT_OK
    size = sum((_du(Path(j["dir"])) for j, _ in delete), 0)
    for j, inside in delete:
        extra = f" and its {len(inside)} artifact(s)" if inside else ""
        err.print(f"{'would delete' if args.dry_run else 'delete'} {j['id']} ({j['state']}){extra}")
    summary = f"{len(delete)} job folder(s), {size / 1e6:.1f} MB"
    if args.dry_run:
        err.print(f"dry run: {summary} would be deleted")
        return EXIT_OK
    if not args.yes:
        if not sys.stdin.isatty():
            err.print(f"[red]error[/]: not deleting {summary} without a yes; add --yes (or --dry-run to look)")
            return EXIT_FAILED
        if input(f"Delete {summary}? [y/N] ").strip().lower() not in ("y", "yes"):
            err.print("nothing deleted")
            return EXIT_OK
    store = Store()
    for j, _ in delete:
        job = JobDir(Path(j["dir"]))
        if job.effective_state() not in TERMINAL:  # restarted or resumed since the listing
            err.print(f"skipped {job.id}: it is {job.effective_state()} now")
            continue
        shutil.rmtree(job.path, ignore_errors=True)
        store.delete(job.id)
    err.print(f"deleted {summary}")
    return EXIT_OK


def _within(path: Path, root: Path) -> bool:
    try:
        return path.resolve().is_relative_to(root) and path.exists()
    except OSError:
        return False


def _du(path: Path) -> int:
    total = 0
    for p in path.rglob("*"):
        try:
            total += p.stat().st_size if p.is_file() else 0
        except OSError:
            continue
    return total


def cmd_queue(args: argparse.Namespace) -> int:
    from nyx_tui.jobs.jobdir import ACTIVE, list_jobs
    from nyx_tui.jobs.queue import Queue
    from nyx_tui.jobs.scheduler import ensure_scheduler, scheduler_running

    queue = Queue()
    queue.rebuild()
    waiting = queue.waiting()
    started = ensure_scheduler() if waiting else None
    running = [j for j in list_jobs() if j.effective_state() in ACTIVE]
    if args.json:
        answer = {
            "waiting": [{"position": i, "id": e.id, "resource": e.resource} for i, (e, _) in enumerate(waiting, 1)],
            "running": [{"id": j.id, "gpu_slot": j.status().get("gpu_slot")} for j in running],
            "scheduler": scheduler_running(),
        }
        print(json.dumps(answer, indent=1))
        return EXIT_OK
    console = _console()
    if not waiting and not running:
        console.print("the queue is empty; add to it with `nyx train FILE --queue`")
        return EXIT_OK
    for j in running:
        slot = j.status().get("gpu_slot")
        console.print(f"[green]running[/] {j.id}" + (f"  (slot {slot})" if slot else ""), highlight=False)
    for i, (entry, job) in enumerate(waiting, 1):
        console.print(f"{i:>3}. {job.id}  [dim]{entry.resource}[/]", highlight=False)
    if started:
        _console(stderr=True).print("(started the scheduler: nothing was running it)")
    return EXIT_OK


def cmd_queue_move(args: argparse.Namespace) -> int:
    from nyx_tui.jobs.queue import Queue, QueueError

    err = _console(stderr=True)
    job = _find(args.job, err)
    if job is None:
        return EXIT_USAGE
    try:
        order = Queue().move(job.id, args.to)
    except QueueError as e:
        err.print(f"[red]error[/]: {e}")
        return EXIT_USAGE
    err.print(f"{job.id} is now number {order.index(job.id) + 1} of {len(order)}")
    return EXIT_OK


def cmd_queue_cancel(args: argparse.Namespace) -> int:
    from nyx_tui.jobs.queue import cancel_queued

    err = _console(stderr=True)
    job = _find(args.job, err)
    if job is None:
        return EXIT_USAGE
    if cancel_queued(job):
        err.print(f"cancelled {job.id}; it never started")
        return EXIT_OK
    err.print(f"{job.id} is {job.effective_state()}, not waiting in the queue; to end it: nyx stop {job.id}")
    return EXIT_FAILED


# -------------------------------------------------------------------------------------------------- demo


def cmd_demo(args: argparse.Namespace) -> int:
    from nyx_tui import demo

    err = _console(stderr=True)
    # with --json the last line of stdout is the JSON answer: the live display goes to stderr
    view = _console(stderr=args.json)
    ws = demo.workspace(args.workspace)
    family = args.family
    name = {"sd15": "SD1.5", "flux": "Flux (dev-style)", "sd3": "SD3"}[family]
    try:
        with err.status(f"building the tiny {name} model and the synthetic dataset…"):
            demo.prepare_workspace(ws, family)
    except demo.DemoError as e:
        err.print(f"[red]error[/]: {e}", markup=True, highlight=False)
        return EXIT_FAILED
    config_file = demo.write_config(ws, steps=args.steps, family=family)
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
        answer = {
            "job": job.id,
            "lora": final,
            "model": str(demo.model_dir(ws, family)),
            "dataset": str(ws / "dataset"),
        }
        sys.stdout.write(json.dumps(answer) + "\n")
    elif family == "sd15":
        err.print(f"\nYour LoRA: {final}\nLoad it in diffusers: pipe.load_lora_weights({str(final)!r})")
    else:
        # diffusers' kohya-Flux converter assumes full-size Flux: a tiny model's file is for Nyx, not a pipeline
        samples = Path(final).parent / "samples" if final else None  # the engine renders beside the LoRA
        where = f"\nSamples (before and after): {samples}" if samples and samples.is_dir() else ""
        err.print(
            f"\nYour {name} LoRA: {final}{where}\nThis box can train {family}; for a real model see docs/flux-sd3.md"
        )
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


KIND_HELP = "only these kinds: train, tag, caption, download, compare, lr-find, workflow, sweep"


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
    new.add_argument("--preset", default="sd15-lora", help="preset or user template (nyx config presets lists them)")
    new.add_argument("-o", "--output", help="file to write (default: stdout)")
    new.add_argument("--force", action="store_true", help="overwrite an existing file")
    new.set_defaults(func=cmd_config_new)
    check = csub.add_parser("check", help="validate a config file without loading any model")
    check.add_argument("file")
    check.add_argument("--vram", action="store_true", help="show the VRAM estimate part by part")
    check.set_defaults(func=cmd_config_check)
    export = csub.add_parser("export", help="write sd-scripts' config, dataset TOML and launch command")
    export.add_argument("file")
    export.add_argument("--to", choices=["kohya"], default="kohya", help="the trainer to export for")
    export.add_argument("-o", "--output", required=True, help="folder to write into")
    export.add_argument("--custom", action="store_true", help="for sd-scripts with custom optimizers/schedulers")
    export.add_argument("--sd-scripts", help="sd-scripts checkout for the launch command (default: backend.path)")
    export.add_argument("--python", help="sd-scripts' Python for the launch command (default: its own venv's)")
    export.set_defaults(func=cmd_config_export)
    presets = csub.add_parser("presets", help="list the presets and your templates (VRAM, families, purpose)")
    presets.add_argument("--names", action="store_true", help="names only, one a line")
    presets.set_defaults(func=cmd_config_presets)
    save_tpl = csub.add_parser("save-template", help="keep a config file as a user template (for --preset)")
    save_tpl.add_argument("file", help="the config TOML to keep")
    save_tpl.add_argument("--name", required=True, help="the template's name (letters, digits, . _ -)")
    save_tpl.add_argument("--description", help="what it is for (shown in the library)")
    save_tpl.add_argument("--force", action="store_true", help="overwrite a user template of that name")
    save_tpl.set_defaults(func=cmd_config_save_template)
    docs = csub.add_parser("docs", help="write the parameter reference (Markdown)")
    docs.add_argument("-o", "--output", default="docs/config.md", help="file, or - for stdout")
    docs.set_defaults(func=cmd_config_docs)
    imp = csub.add_parser("import", help="make a Nyx config from an sd-scripts config TOML (+ dataset TOML)")
    imp.add_argument("file", help="sd-scripts --config_file TOML")
    imp.add_argument("--dataset", help="its --dataset_config TOML (default: the one the config names, if any)")
    imp.add_argument("--script", help="the sd-scripts script it is for, e.g. sdxl_train_network.py (sets the family)")
    imp.add_argument("-o", "--output", required=True, help="the Nyx config to write")
    imp.add_argument("--force", action="store_true", help="overwrite the output file")
    imp.set_defaults(func=cmd_config_import)

    train = sub.add_parser("train", help="validate a config and start a training job")
    train.add_argument("file")
    train.add_argument("--detach", action="store_true", help="return at once; follow later with nyx attach")
    train.add_argument(
        "--queue", action="store_true", help="wait in the queue for a free GPU (starts with no TUI or CLI open)"
    )
    train.set_defaults(func=cmd_train)

    jobs = sub.add_parser("jobs", help="list jobs (history), or clean up old ones")
    filters = argparse.ArgumentParser(add_help=False)
    filters.add_argument("--state", action="append", help="only these states (repeat or comma-separate)")
    filters.add_argument("--kind", action="append", help=KIND_HELP)
    jobs.add_argument("--state", action="append", help="only these states (repeat or comma-separate)")
    jobs.add_argument("--kind", action="append", help=KIND_HELP)
    jobs.add_argument("--limit", type=int, help="only the newest N")
    jobs.add_argument("--json", action="store_true", help="print a JSON array")
    jobs.set_defaults(func=cmd_jobs)
    jsub = jobs.add_subparsers(dest="jobs_command", metavar="ACTION")
    clean = jsub.add_parser(
        "clean",
        parents=[filters],
        help="delete the folders of ended jobs (never a running one; artifacts only with --with-artifacts)",
    )
    clean.add_argument(
        "--older-than", type=_parse_age, default=0.0, metavar="AGE", help="ended at least this long ago: 7d, 12h"
    )
    clean.add_argument(
        "--with-artifacts", action="store_true", help="also delete jobs whose folder holds LoRAs or states"
    )
    clean.add_argument("--dry-run", action="store_true", help="list what would be deleted, delete nothing")
    clean.add_argument("-y", "--yes", action="store_true", help="do not ask")
    clean.set_defaults(func=cmd_jobs_clean)

    queue = sub.add_parser("queue", help="show the queue; move or cancel queued jobs")
    queue.add_argument("--json", action="store_true", help="print {waiting, running, scheduler}")
    queue.set_defaults(func=cmd_queue)
    qsub = queue.add_subparsers(dest="queue_command", metavar="ACTION")
    move = qsub.add_parser("move", help="change a queued job's place")
    move.add_argument("job", help="job id or unique part of it")
    move.add_argument("to", help="top, bottom, up, down, or a position (1 starts next)")
    move.set_defaults(func=cmd_queue_move)
    qcancel = qsub.add_parser("cancel", help="remove a queued job; it never starts")
    qcancel.add_argument("job", help="job id or unique part of it")
    qcancel.set_defaults(func=cmd_queue_cancel)

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
    demo.add_argument("--json", action="store_true", help="print {job, lora, model, dataset} as the last line")
    demo.add_argument(
        "--family",
        choices=("sd15", "flux", "sd3"),
        default="sd15",
        help="the tiny model's family (flux: dev-style; default sd15)",
    )
    demo.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    demo.set_defaults(func=cmd_demo)

    # the dataset side registers its own commands (each module owns its parsers and handlers)
    from nyx_tui.datasets import cli as dataset_cli
    from nyx_tui.downloads import cli as download_cli
    from nyx_tui.tagging import caption_cli, tag_cli

    dataset_cli.register(sub)
    tag_cli.register(sub)
    caption_cli.register(sub)
    download_cli.register(sub)

    from nyx_tui.trainers.kohya import install as backend_cli  # `nyx backend install/list/doctor`

    backend_cli.register(sub)

    from nyx_tui.lora import cli as lora_cli  # `nyx lora inspect|resize|merge|meta|convert|upload|compare`

    lora_cli.register(sub)

    from nyx_tui import doctor, serve  # `nyx doctor`, `nyx serve`
    from nyx_tui.workflows import cli as workflow_cli  # `nyx lr-find` (workflows, sweeps later)

    doctor.register(sub)
    serve.register(sub)
    workflow_cli.register(sub)

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
