"""The download worker: `python -m nyx_tui.downloads.job JOB_DIR`, run by the supervisor.

The job's spec.json holds `download: {sources, dest, sha256, file, concurrency}` — never a token: the worker
reads HF_TOKEN / CIVITAI_TOKEN (or the token files) itself, from the environment the supervisor passes on.

Events: `start` (job_kind "download", the sources), a `log` per resolved source (title, files, size, where
they go), `progress` {done, total, unit: "bytes", message: file name, file, speed_bps, eta_s, files_done,
files_total} at most ~4 times a second, an `artifact` {path, what: "download", source, sha256?} per
finished file, `log` warnings and errors. `stop` and `cancel` from control.jsonl both mean: stop now and
keep the `.part` files (a later `nyx downloads resume JOB` goes on from them); the worker acknowledges with
a `log` event carrying `ack`.

Exit codes: 0 done (or stopped on request: the supervisor records the cancel), 1 a download failed (a
`DownloadError`'s message and fix as an `error` log and on stderr, no traceback; anything unexpected with
its traceback), 2 a bad command line, 130 interrupted by SIGINT.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nyx_tui.downloads.model import DownloadCancelled, DownloadError, Progress, RemoteFile, Resolved
from nyx_tui.jobs.control import ControlReader
from nyx_tui.jobs.events import EventWriter
from nyx_tui.jobs.jobdir import JobDir

PROGRESS_EVERY_S = 0.25  # at most ~4 progress events a second
CONTROL_POLL_S = 0.2
DEFAULT_CONCURRENCY = 4


@dataclass
class _Tally:
    """Progress over all files of the job, from the engine's per-file reports."""

    sizes: dict[str, int | None]  # key → expected size
    done: dict[str, int] = field(default_factory=dict)
    speed: dict[str, float] = field(default_factory=dict)
    finished: set[str] = field(default_factory=set)
    last_file: str = ""

    @property
    def total(self) -> int | None:
        if any(v is None for v in self.sizes.values()):
            known = [self.done.get(k, 0) if v is None else v for k, v in self.sizes.items()]
            return None if not self.finished.issuperset(k for k, v in self.sizes.items() if v is None) else sum(known)
        return sum(v for v in self.sizes.values() if v is not None)

    def snapshot(self) -> dict[str, Any]:
        done = sum(self.done.values())
        speed = sum(v for k, v in self.speed.items() if k not in self.finished)
        total = self.total
        eta = (total - done) / speed if total is not None and speed > 0 else None
        return {
            "done": done,
            "total": total,
            "unit": "bytes",
            "message": self.last_file,
            "file": self.last_file,
            "speed_bps": round(speed, 1),
            "eta_s": None if eta is None else round(max(0.0, eta), 1),
            "files_done": len(self.finished),
            "files_total": len(self.sizes),
        }


class DownloadWorker:
    def __init__(self, job: JobDir, events: EventWriter) -> None:
        self.job = job
        self.events = events
        self.control = ControlReader(job.control_path)
        self.cancel = asyncio.Event()
        self.requested: str | None = None
        self._last_emit = 0.0
        self.client: Any = None  # one httpx client for the job's files (engine.make_client)

    # ------------------------------------------------------------------ control
    def poll_control(self) -> None:
        for cmd in self.control.poll():
            what = str(cmd.get("command"))
            if what in ("stop", "cancel"):
                if self.requested is None:
                    self.requested = what
                    self.events.emit(
                        "log",
                        level="info",
                        message=f"{what} received: stopping the downloads now; the .part files stay, "
                        "so `nyx downloads resume JOB` goes on from them",
                        ack=what,
                    )
                    self.cancel.set()
            else:
                self.events.emit("log", level="info", message=f"{what} means nothing to a download job", ack=what)

    async def _watch_control(self) -> None:
        while not self.cancel.is_set():
            self.poll_control()
            await asyncio.sleep(CONTROL_POLL_S)

    # ------------------------------------------------------------------ progress
    def _progress(self, tally: _Tally, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_emit < PROGRESS_EVERY_S:
            return
        self._last_emit = now
        self.events.emit("progress", **tally.snapshot())

    def _on_progress(self, tally: _Tally, key: str, name: str, p: Progress) -> None:
        tally.done[key] = p.done
        tally.speed[key] = p.speed_bps
        tally.last_file = name
        if p.total is not None and tally.sizes.get(key) is None and key not in tally.finished:
            tally.sizes[key] = p.total
        self._progress(tally)

    # ------------------------------------------------------------------ the work
    async def run(self) -> int:
        spec: dict[str, Any] = self.job.spec()
        d: dict[str, Any] = spec.get("download") or {}
        sources = [str(s) for s in d.get("sources") or []]
        dest = Path(d["dest"]) if d.get("dest") else None
        concurrency = max(1, int(d.get("concurrency") or DEFAULT_CONCURRENCY))
        self.events.emit("start", job=self.job.id, job_kind="download", sources=sources, dest=d.get("dest"))
        watcher = asyncio.create_task(self._watch_control())
        from nyx_tui.downloads.engine import make_client

        self.client = make_client()
        try:
            return await self._download(sources, dest, d.get("sha256"), d.get("file"), concurrency)
        finally:
            await self.client.aclose()
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher

    async def _download(
        self, sources: list[str], dest: Path | None, sha256: str | None, file: str | None, concurrency: int
    ) -> int:
        from nyx_tui.downloads import sources as src_mod

        resolved: list[Resolved] = []
        for text in sources:
            self.events.emit("progress", done=0, total=None, unit="bytes", message=f"resolving {text}")
            r = await asyncio.to_thread(src_mod.resolve, text, dest=dest, file=file, sha256=sha256)
            if self.cancel.is_set():
                return self._stopped()
            resolved.append(r)
            size = sum(f.size or 0 for f in r.files)
            unknown = any(f.size is None for f in r.files)
            self.events.emit(
                "log",
                level="info",
                message=f"{text}: {r.title}, {len(r.files)} file(s), "
                f"{_fmt_bytes(size)}{'+' if unknown else ''} → {r.meta.get('dest_dir')}",
                source=text,
                title=r.title,
                meta=_public_meta(r.meta),
            )
            print(
                f"{text}: {r.title} ({len(r.files)} file(s), {_fmt_bytes(size)}) → {r.meta.get('dest_dir')}", flush=True
            )
            for w in r.meta.get("warnings") or []:
                self.events.emit("log", level="warning", message=w)
                print(f"warning: {w}", flush=True)
        jobs: list[tuple[str, Resolved, RemoteFile]] = []
        for i, r in enumerate(resolved):
            for j, f in enumerate(r.files):
                jobs.append((f"{i}:{j}", r, f))
        tally = _Tally(sizes={key: f.size for key, _, f in jobs})
        tally.last_file = display_name(jobs[0][1], jobs[0][2]) if jobs else ""
        self._progress(tally, force=True)
        semaphore = asyncio.Semaphore(concurrency)
        failures: list[tuple[RemoteFile, DownloadError]] = []

        async def one(key: str, r: Resolved, f: RemoteFile) -> None:
            async with semaphore:
                if self.cancel.is_set():
                    return
                try:
                    path = await self._fetch_one(key, r, f, tally)
                except DownloadError as e:
                    if not self.cancel.is_set():
                        failures.append((f, e))
                        if len(jobs) > 1:  # one file's error is the job's error: `main` reports it once
                            self.events.emit(
                                "log", level="error", message=f"{f.filename}: {e.message}", fix=e.fix, source=f.source
                            )
                    return
                if path is None:
                    return
                tally.finished.add(key)
                if f.size is not None:
                    tally.done[key] = f.size
                fields: dict[str, Any] = {"source": f.source}
                if f.sha256:
                    fields["sha256"] = f.sha256
                self.events.emit("artifact", path=str(path), what="download", **fields)
                print(f"done: {path}", flush=True)
                self._progress(tally, force=True)

        await asyncio.gather(*(one(key, r, f) for key, r, f in jobs))
        if self.cancel.is_set():
            return self._stopped()
        self._progress(tally, force=True)
        if len(failures) == 1 and len(jobs) == 1:
            raise failures[0][1]
        if failures:
            first_file, first = failures[0]
            retry = "`nyx downloads retry JOB` fetches the missing files (finished ones are kept; parts resume)"
            raise DownloadError(
                f"{len(failures)} of {len(jobs)} file(s) failed; first: {first_file.filename}: {first.message}",
                f"{first.fix}; then {retry}" if first.fix else retry,
                retryable=all(e.retryable for _, e in failures),
            )
        self.events.emit("log", level="info", message=f"{len(jobs)} file(s) downloaded")
        return 0

    async def _fetch_one(self, key: str, r: Resolved, f: RemoteFile, tally: _Tally) -> Path | None:
        """The file's final path, or None when a stop/cancel interrupted it (its part stays)."""
        from nyx_tui.downloads import engine
        from nyx_tui.downloads.sources import finish_file

        dest_dir = Path(str(r.meta["dest_dir"]))
        name = display_name(r, f)
        try:
            fetched = await engine.fetch(
                f,
                dest_dir,
                client=self.client,
                on_progress=lambda p: self._on_progress(tally, key, name, p),
                cancel=self.cancel,
            )
        except DownloadCancelled:
            return None
        return await asyncio.to_thread(finish_file, r, f, Path(fetched))

    def _stopped(self) -> int:
        what = self.requested or "cancel"
        self.events.emit("log", level="info", message=f"{what}: downloads stopped; .part files kept for a resume")
        print(f"{what}: stopped; the .part files stay for `nyx downloads resume`", flush=True)
        return 0


def display_name(r: Resolved, f: RemoteFile) -> str:
    """The name a view shows for a file: its repo path for a Hugging Face cache blob, else subdir/filename."""
    cache = r.meta.get("hf_cache")
    if cache:
        for link in cache.get("links", []):
            if link.get("blob") == f.filename:
                return str(link["path"])
    return f"{f.subdir}/{f.filename}" if f.subdir else f.filename


def _public_meta(meta: dict[str, Any]) -> dict[str, Any]:
    """What of a source's meta is shown in views: no endpoints with credentials (there are none), no
    per-link bookkeeping."""
    return {k: v for k, v in meta.items() if k not in ("hf_cache", "warnings")}


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"  # pragma: no cover


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m nyx_tui.downloads.job JOB_DIR", file=sys.stderr)
        return 2
    job = JobDir(Path(args[0]).resolve())
    try:
        with EventWriter(job.events_path) as events:
            try:
                return asyncio.run(DownloadWorker(job, events).run())
            except DownloadError as e:
                events.emit("log", level="error", message=e.message, fix=e.fix, retryable=e.retryable)
                print(f"error: {e.message}", file=sys.stderr, flush=True)
                if e.fix:
                    print(f"  fix: {e.fix}", file=sys.stderr, flush=True)
                return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        return 130
    except Exception:
        traceback.print_exc()
        return 1


if __name__ == "__main__":
    sys.exit(main())
