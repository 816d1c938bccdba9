"""`nyx download SRC…` and `nyx downloads [cancel|resume|retry JOB]`. Module-level imports stay light.

Sources are checked for syntax before anything is created (exit 2 with the fix, nothing started); what the
servers say (a gated file, a wrong id) is the job's to find out, as an `error` log and a failed job. A
download is a job of kind `download` (`python -m nyx_tui.downloads.job .`, resource `cpu`: it runs beside
GPU jobs, also from the queue). `nyx download` follows it like `nyx train` (Ctrl+C detaches; the job goes
on) unless `--detach` or `--queue`.

Tokens never travel through here: the worker reads HF_TOKEN / CIVITAI_TOKEN itself (the supervisor passes
the environment on), so spec.json holds the sources, the destination and the hash override only.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
RESUMABLE = ("cancelled", "failed", "lost")


def register(sub: Any) -> None:
    """Add `download` and `downloads` to the `nyx` subparsers."""
    dl = sub.add_parser(
        "download",
        help="download models from Hugging Face, Civitai or a URL (a job; resumable)",
        description="Download files as a job: resumable (.part files), verified (size, SHA-256), retried. "
        "Sources: hf:owner/repo/path/file, hf:owner/repo[@rev] (the whole repo), civitai:VERSION_ID, "
        "Hugging Face and Civitai page URLs, any https:// URL. Without --dest, Hugging Face files go into "
        "the HF cache (diffusers finds them there) and the rest into Nyx's downloads folder. Tokens come "
        "from HF_TOKEN / CIVITAI_TOKEN (or their 0600 files), never from the command line.",
    )
    dl.add_argument("sources", nargs="+", metavar="SRC", help="what to download (several allowed)")
    dl.add_argument("--dest", metavar="DIR", help="put the files in this folder (a repo's files keep their paths)")
    dl.add_argument("--sha256", metavar="HEX", help="the expected SHA-256 of the (one) file: checked before it is kept")
    dl.add_argument("--file", metavar="NAME", help="Civitai: this file of the version instead of the primary one")
    dl.add_argument("--detach", action="store_true", help="return at once; follow later with nyx attach")
    dl.add_argument("--queue", action="store_true", help="start from the queue (downloads run beside GPU jobs)")
    dl.set_defaults(func=cmd_download)

    dls = sub.add_parser("downloads", help="list download jobs; cancel, resume or retry one")
    dls.add_argument("--json", action="store_true", help="print a JSON array")
    dls.set_defaults(func=cmd_downloads)
    dsub = dls.add_subparsers(dest="downloads_command", metavar="ACTION")
    cancel = dsub.add_parser("cancel", help="stop a download now; its .part files stay for a resume")
    cancel.add_argument("job", help="job id, unique part of it, or 'last'")
    cancel.set_defaults(func=cmd_downloads_cancel)
    for name, text in (
        ("resume", "start a stopped download again; it goes on from its .part files"),
        ("retry", "start a failed download again (the same as resume)"),
    ):
        p = dsub.add_parser(name, help=text)
        p.add_argument("job", help="job id, unique part of it, or 'last'")
        p.add_argument("--detach", action="store_true", help="return at once; follow later with nyx attach")
        p.set_defaults(func=cmd_downloads_resume)


# --------------------------------------------------------------------------------------------------- helpers


def _err() -> Any:
    from rich.console import Console

    return Console(stderr=True, highlight=False)


def _fail(message: str, fix: str = "", code: int = EXIT_USAGE, started: bool = False) -> int:
    err = _err()
    err.print(f"[bold red]error[/]: {message}", markup=True, highlight=False)
    if fix:
        err.print(f"  [green]fix[/]: {fix}", highlight=False)
    if code == EXIT_USAGE and not started:
        err.print("nothing was started.")
    return code


def _slug_source(text: str) -> str:
    from nyx_tui.downloads.sources import parse_source

    try:
        s = parse_source(text)
    except Exception:
        return "download"
    if s.kind == "hf":
        return s.repo.split("/")[-1] + ("-" + Path(s.path).stem if s.path else "")
    if s.kind == "civitai":
        return f"civitai-{s.version_id or s.model_id}"
    return Path(s.url.split("?")[0]).name or "url"


def _find_download(ref: str) -> Any:
    from nyx_tui.jobs.jobdir import find_job

    try:
        job = find_job(ref)
    except LookupError as e:
        _fail(str(e), "`nyx downloads` lists the download jobs")
        return None
    try:
        kind = job.spec().get("kind")
    except (OSError, ValueError):
        kind = None
    if kind != "download":
        _fail(f"{job.id} is a {kind} job, not a download", "`nyx downloads` lists the download jobs")
        return None
    return job


def _start(spec: dict[str, Any], *, queue: bool, detach: bool) -> int:
    from nyx_tui.cli import run_job
    from nyx_tui.jobs.jobdir import create_job

    argv = [sys.executable, "-m", "nyx_tui.downloads.job", "."]
    name = "download-" + _slug_source(spec["sources"][0])
    extra: dict[str, Any] = {"download": spec, "resource": "cpu"}
    if queue:
        extra["queue"] = True
    job = create_job("download", name, argv, extra=extra)
    note = "downloads run beside GPU jobs. `nyx downloads` shows it."
    return run_job(job, detach=detach, queue=queue, queued_note=note)


# -------------------------------------------------------------------------------------------------- commands


def cmd_download(args: argparse.Namespace) -> int:
    from nyx_tui.downloads.model import DownloadError
    from nyx_tui.downloads.sources import check_sha256, parse_source

    parsed = []
    for text in args.sources:
        try:
            parsed.append(parse_source(text))
        except DownloadError as e:
            return _fail(e.message, e.fix)
    sha256 = None
    if args.sha256:
        try:
            sha256 = check_sha256(args.sha256)
        except DownloadError as e:
            return _fail(e.message, e.fix)
        if len(parsed) != 1 or not parsed[0].single_file:
            return _fail(
                "--sha256 is the hash of one file, but the sources stand for several",
                "give one source that names one file (hf:owner/repo/file, civitai:ID, a URL), or drop --sha256",
            )
    if args.file and not any(s.kind == "civitai" for s in parsed):
        return _fail("--file picks a file of a Civitai version, and no source is one", "drop --file")
    dest = None
    if args.dest:
        dest_path = Path(args.dest).expanduser()
        if dest_path.exists() and not dest_path.is_dir():
            return _fail(f"--dest {args.dest} is a file", "give a folder (it is created if missing)")
        dest = str(dest_path.resolve())  # the worker runs in the job folder
    spec = {"sources": [s.text.strip() for s in parsed], "dest": dest, "sha256": sha256, "file": args.file}
    return _start(spec, queue=args.queue, detach=args.detach)


def _fmt_bytes(n: float | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"  # pragma: no cover


def download_rows() -> list[dict[str, Any]]:
    """One row per download job, oldest first: what `nyx downloads` (and the TUI) shows."""
    from nyx_tui.jobs.jobdir import ACTIVE, list_jobs

    rows: list[dict[str, Any]] = []
    for job in list_jobs():
        try:
            spec = job.spec()
        except (OSError, ValueError):
            continue
        if spec.get("kind") != "download":
            continue
        state = job.effective_state()
        d = spec.get("download") or {}
        last = job.last_event("progress") or {}
        artifacts = [a for a in job.artifacts() if a.get("what") == "download"]
        status = job.status()
        row: dict[str, Any] = {
            "id": job.id,
            "state": state,
            "sources": d.get("sources") or [],
            "dest": d.get("dest"),
            "files_done": len(artifacts),
            "files_total": last.get("files_total"),
            "done": last.get("done"),
            "total": last.get("total"),
            "speed_bps": last.get("speed_bps") if state in ACTIVE else None,
            "eta_s": last.get("eta_s") if state in ACTIVE else None,
            "paths": [a.get("path") for a in artifacts],
            "error": status.get("error") if state not in ACTIVE else None,
            "dir": str(job.path),
        }
        if state in ("failed", "lost"):
            err = _last_error(job)
            if err:
                row["error"] = err
        rows.append(row)
    return rows


def _last_error(job: Any) -> str | None:
    """The worker's own error message (more telling than the supervisor's exit code)."""
    for e in reversed(job.events()):
        if e.get("kind") == "log" and e.get("level") == "error":
            return str(e.get("message"))
    return None


def cmd_downloads(args: argparse.Namespace) -> int:
    from nyx_tui.cli import _console, _fmt_duration

    rows = download_rows()
    if args.json:
        print(json.dumps(rows, indent=1))
        return EXIT_OK
    console = _console()
    if not rows:
        console.print("no downloads yet; start one with `nyx download hf:owner/repo/file` or `nyx download civitai:ID`")
        return EXIT_OK
    from rich.table import Table

    table = Table("id", "state", "source", "files", "bytes", "speed", "ETA", box=None, header_style="bold")
    for r in rows:
        files = f"{r['files_done']}/{r['files_total']}" if r["files_total"] is not None else str(r["files_done"])
        done, total = r["done"], r["total"]
        size = "" if done is None else f"{_fmt_bytes(done)} / {_fmt_bytes(total)}"
        speed = "" if not r["speed_bps"] else f"{_fmt_bytes(r['speed_bps'])}/s"
        eta = _fmt_duration(r["eta_s"]) if r["eta_s"] is not None else ""
        sources = ", ".join(r["sources"])
        table.add_row(r["id"], r["state"], sources, files, size, speed, eta)
    console.print(table)
    for r in rows:
        if r.get("error") and r["state"] in ("failed", "lost"):
            console.print(f"[red]{r['id']}[/]: {r['error']}  (retry: nyx downloads retry {r['id']})", highlight=False)
    return EXIT_OK


def cmd_downloads_cancel(args: argparse.Namespace) -> int:
    from nyx_tui.jobs.control import send
    from nyx_tui.jobs.jobdir import TERMINAL

    job = _find_download(args.job)
    if job is None:
        return EXIT_USAGE
    state = job.effective_state()
    err = _err()
    if state in TERMINAL:
        err.print(f"{job.id} has already ended ({state}); nothing to cancel")
        return EXIT_FAILED
    if state == "queued":
        from nyx_tui.jobs.queue import cancel_queued

        if cancel_queued(job):
            err.print(f"cancelled {job.id}; it had not started")
            return EXIT_OK
    send(job.control_path, "cancel")
    err.print(f"asked {job.id} to stop; its .part files stay. Go on later with: nyx downloads resume {job.id}")
    return EXIT_OK


def cmd_downloads_resume(args: argparse.Namespace) -> int:
    job = _find_download(args.job)
    if job is None:
        return EXIT_USAGE
    state = job.effective_state()
    if state == "finished":
        return _fail(
            f"{job.id} finished; there is nothing to resume",
            "to download again, start a new one: nyx download "
            + " ".join((job.spec().get("download") or {}).get("sources", [])),
            code=EXIT_FAILED,
        )
    if state not in RESUMABLE:
        return _fail(
            f"{job.id} is {state}",
            f"it is still going: follow it with `nyx attach {job.id}`, or stop it with `nyx downloads cancel {job.id}`",
            code=EXIT_FAILED,
        )
    spec = dict(job.spec().get("download") or {})
    if not spec.get("sources"):
        return _fail(
            f"{job.id}'s spec names no sources", "start a new download with `nyx download SRC`", code=EXIT_FAILED
        )
    _err().print(f"resuming {job.id} as a new job (the same sources; it goes on from the .part files)")
    return _start(spec, queue=False, detach=args.detach)


__all__ = ["download_rows", "register"]
