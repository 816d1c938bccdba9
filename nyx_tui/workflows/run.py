"""The orchestrator of a workflow or sweep job: `python -m nyx_tui.workflows.run JOB_DIR` (the supervisor
passes `.`). It trains nothing itself: it puts each stage or trial on the normal queue as a training job of
its own (spec `parent` = this job, `stage` = its label), waits for it, and keeps `workflow.json` (the view's
and `nyx workflow show`'s record) up to date. Holding no GPU, it takes no slot (`resource = "none"`).

Workflows run their stages in order. A stage after the first gets the previous stage's result just before it
is queued: `from = "lora"` sets `network.weights` to the previous stage's final LoRA (the engine logs the
file it loads), `from = "state"` sets `training.resume` to its training state. A stage that does not finish
ends the workflow: the stages after it are `skipped`, and the job fails naming the stage and its error.

Sweeps queue every trial at once (the scheduler runs as many side by side as there are GPUs) and rank them
as they end: by validation loss, then final loss (the smoothed training loss of the last step); a trial
that failed ranks last. At the end: the best trial's config as `best.toml`, a grid of each trial's last
sample side by side (`samples.png`) when the trials rendered samples.

Stop and cancel (from `nyx stop` or the dashboard) reach the children: `stop` asks the running stage to
stop (it saves its LoRA) and cancels the waiting ones; `cancel` cancels them all. Exit codes: 0 finished or
stopped on request; 1 a stage failed or the orchestrator itself did; 2 bad usage.
"""

from __future__ import annotations

import contextlib
import json
import signal
import sys
import time
import tomllib
import traceback
from pathlib import Path
from types import FrameType
from typing import Any

from nyx_tui.jobs.control import ControlReader, send
from nyx_tui.jobs.events import EventWriter, read_events
from nyx_tui.jobs.jobdir import TERMINAL, JobDir, atomic_write
from nyx_tui.workflows.plan import Plan, Stage, short_params

PLAN_FILE = "plan.json"
RECORD_FILE = "workflow.json"
POLL_S = 1.0


class StageFailed(Exception):
    """A stage that did not finish: the message names it and why."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint


# ------------------------------------------------------------------------------------ a child's results


def results_of(child: JobDir) -> dict[str, Any]:
    """What the record keeps of an ended child: its artifacts, final and validation loss, last LoRA, state
    folder and last sample image, and (when it did not finish) its error."""
    artifacts: list[dict[str, Any]] = []
    final_loss = val_loss = None
    sample = None
    for e in read_events(child.events_path):
        kind = e.get("kind")
        if kind == "artifact" and e.get("what") != "config":
            artifacts.append({"path": e.get("path"), "what": e.get("what"), "step": e.get("step")})
        elif kind == "step":
            final_loss = e.get("loss_avg", e.get("loss"))
        elif kind == "metric" and e.get("name") == "val_loss":
            val_loss = e.get("value")
        elif kind == "sample" and e.get("images"):
            sample = e["images"][0]
    loras = [a["path"] for a in artifacts if a["what"] == "lora"]
    states = [a["path"] for a in artifacts if a["what"] == "state"]
    status = child.status()
    out: dict[str, Any] = {
        "state": child.effective_state(),
        "artifacts": artifacts,
        "final_loss": final_loss,
        "val_loss": val_loss,
        "lora": loras[-1] if loras else None,
        "state_dir": states[-1] if states else None,
        "sample": sample,
    }
    if status.get("error"):
        out["error"] = status["error"]
    if status.get("hint"):
        out["hint"] = status["hint"]
    return out


def rank(trials: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The comparison table: ended trials by validation loss, then final loss; failed ones (and trials
    without either loss) last, in their own order."""

    def key(t: dict[str, Any]) -> tuple[int, float, float, int]:
        ok = t.get("state") == "finished"
        val, final = t.get("val_loss"), t.get("final_loss")
        val = float(val) if isinstance(val, int | float) else None
        final = float(final) if isinstance(final, int | float) else None
        group = 0 if ok and val is not None else 1 if ok and final is not None else 2
        return (group, val or 0.0, final or 0.0, int(t["index"]))

    ended = [t for t in trials if t.get("state") in TERMINAL]
    table = []
    for i, t in enumerate(sorted(ended, key=key), 1):
        table.append(
            {
                "rank": i,
                "trial": t["name"],
                "params": t.get("params", {}),
                "state": t.get("state"),
                "val_loss": t.get("val_loss"),
                "final_loss": t.get("final_loss"),
                "job": t.get("job"),
                "lora": t.get("lora"),
                "sample": t.get("sample"),
            }
        )
    return table


# ------------------------------------------------------------------------------------------ the runner


class Orchestrator:
    def __init__(self, job: JobDir, events: EventWriter, plan: Plan) -> None:
        self.job = job
        self.events = events
        self.plan = plan
        self.control = ControlReader(job.control_path)
        self.requested: str | None = None  # stop | cancel
        key = "trials" if plan.kind == "sweep" else "stages"
        self.items: list[dict[str, Any]] = [
            {
                "index": i,
                "name": s.name,
                "state": "waiting",
                "job": None,
                "from": s.start_from,
                "set": s.overlay,
                "params": s.params,
                "artifacts": [],
                "final_loss": None,
                "val_loss": None,
            }
            for i, s in enumerate(plan.stages)
        ]
        self.record: dict[str, Any] = {
            "kind": plan.kind,
            "name": plan.name,
            "source": plan.source,
            "state": "running",
            "job": job.id,
            "notes": plan.notes,
            key: self.items,
        }
        if plan.kind == "sweep":
            self.record["params"] = plan.params
            self.record["table"] = []
        self._progress: tuple[int, str] | None = None

    # ---------------------------------------------------------------- record and events
    def save(self) -> None:
        if self.plan.kind == "sweep":
            self.record["table"] = rank(self.items)
        atomic_write(self.job.path / RECORD_FILE, json.dumps(self.record, indent=1, default=str))

    def progress(self, message: str) -> None:
        done = sum(1 for it in self.items if it["state"] in TERMINAL or it["state"] == "skipped")
        if self._progress == (done, message):
            return
        self._progress = (done, message)
        unit = "trials" if self.plan.kind == "sweep" else "stages"
        self.events.emit("progress", done=done, total=len(self.items), unit=unit, message=message)

    # ---------------------------------------------------------------- children
    def _child_config(self, index: int) -> Any:
        """The stage's config, with what it takes from the stage before it."""
        from nyx_tui.config.check import check_config
        from nyx_tui.config.errors import has_errors
        from nyx_tui.config.io import validate_data

        stage: Stage = self.plan.stages[index]
        data = tomllib.loads(stage.config_toml)
        label = self._label(index)
        if stage.start_from != "none":
            prev = self.items[index - 1]
            if stage.start_from == "lora":
                if not prev.get("lora"):
                    raise StageFailed(f"{label}: stage {index} saved no LoRA to continue from")
                data.setdefault("network", {})["weights"] = prev["lora"]
                self.events.log(f"{label} starts from stage {index}'s LoRA: {prev['lora']}")
            else:
                if not prev.get("state_dir"):
                    raise StageFailed(f"{label}: stage {index} saved no training state to resume")
                data.setdefault("training", {})["resume"] = prev["state_dir"]
                self.events.log(f"{label} resumes stage {index}'s training state: {prev['state_dir']}")
        cfg = validate_data(data, source=label)
        problems = check_config(cfg)
        if has_errors(problems):
            text = "; ".join(f"{p.field}: {p.message}" for p in problems if p.is_error)
            fix = next(p.fix for p in problems if p.is_error)
            raise StageFailed(f"{label}: its config cannot run: {text}", fix)
        return cfg

    def _label(self, index: int) -> str:
        name = self.plan.stages[index].name
        if self.plan.kind == "sweep":
            return name
        return f"stage {index + 1} ({name})"

    def queue(self, index: int) -> JobDir:
        from nyx_tui.jobs.queue import enqueue
        from nyx_tui.jobs.store import Store, job_summary
        from nyx_tui.trainers.base import create_training_job

        cfg = self._child_config(index)
        extra: dict[str, object] = {"parent": self.job.id, "stage": self.plan.stages[index].name}
        child = create_training_job(cfg, queue=True, extra=extra)
        enqueue(child)
        with contextlib.suppress(Exception):  # the index is rebuilt from the folders on the next sync
            Store().upsert(job_summary(child))
        item = self.items[index]
        item.update(job=child.id, state="queued")
        self.events.log(f"{self._label(index)}: queued as {child.id}")
        self.save()
        return child

    def poll_control(self) -> None:
        for msg in self.control.poll():
            what = msg.get("command")
            if what in ("stop", "cancel") and (self.requested is None or what == "cancel"):
                self.requested = str(what)
                self.events.emit("log", level="info", message=f"{what} received: passing it to the stages", ack=what)
                self.pass_on(str(what))
            elif what in ("save_now", "sample_now"):
                running = [it["job"] for it in self.items if it["state"] == "running" and it["job"]]
                for job_id in running:
                    send(self._child(job_id).control_path, str(what))
                self.events.emit("log", level="info", message=f"{what} passed to {len(running)} stage(s)", ack=what)

    def _child(self, job_id: str) -> JobDir:
        return JobDir(self.job.path.parent / job_id)

    def pass_on(self, command: str) -> None:
        """`stop`: running children stop (and save); `cancel`: they are cancelled. Queued ones are cancelled."""
        from nyx_tui.jobs.queue import cancel_queued

        for it in self.items:
            if not it["job"] or it["state"] in TERMINAL:
                if it["state"] == "waiting":
                    it["state"] = "skipped"
                continue
            child = self._child(it["job"])
            if child.status().get("state") == "queued" and cancel_queued(
                child, f"the {self.plan.kind} was {command}ped"
            ):
                continue
            try:
                send(child.control_path, command)
            except OSError as e:
                self.events.log(f"could not pass {command} to {child.id}: {e}", level="warning")
        self.save()

    def refresh(self) -> list[int]:
        """Update the items' states from their jobs; the indexes that ended since the last call."""
        ended = []
        for i, it in enumerate(self.items):
            if not it["job"] or it["state"] in TERMINAL:
                continue
            child = self._child(it["job"])
            state = child.effective_state()
            if state in TERMINAL:
                it.update(results_of(child))
                ended.append(i)
                self.say_ended(i)
            elif state != it["state"]:
                it["state"] = state
        if ended:
            self.save()
        return ended

    def say_ended(self, index: int) -> None:
        it = self.items[index]
        label = self._label(index)
        losses = [f"{name} {it[k]:.4f}" for k, name in (("final_loss", "final loss"), ("val_loss", "val loss"))
                  if isinstance(it.get(k), int | float)]  # fmt: skip
        text = f"{label}: {it['state']}" + (f" ({', '.join(losses)})" if losses else "")
        if it.get("error"):
            text += f": {it['error']}"
        level = "info" if it["state"] == "finished" else "warning"
        self.events.log(text, level=level)
        if it.get("lora"):
            self.events.emit("artifact", path=it["lora"], what="lora", step=index + 1)

    def running_message(self) -> str:
        active = [(i, it) for i, it in enumerate(self.items) if it["state"] in ("queued", "starting", "running")]
        if not active:
            return "waiting"
        parts = []
        for i, it in active[:3]:
            step = self._child(it["job"]).last_event("step") if it["state"] == "running" else None
            where = f" step {step['step']}/{step['total']}" if step else ""
            parts.append(f"{self._label(i)} {it['state']}{where}")
        more = f" (+{len(active) - 3})" if len(active) > 3 else ""
        return "; ".join(parts) + more

    def wait(self, indexes: list[int]) -> None:
        """Until every child of `indexes` has ended (or a stop/cancel has been passed on and they ended)."""
        while True:
            self.poll_control()
            self.refresh()
            if all(self.items[i]["state"] in TERMINAL or self.items[i]["state"] == "skipped" for i in indexes):
                return
            self.progress(self.running_message())
            time.sleep(POLL_S)

    # ---------------------------------------------------------------- the two kinds
    def run_workflow(self) -> int:
        for i in range(len(self.items)):
            if self.requested:
                break
            try:
                self.queue(i)
            except StageFailed as e:
                self.items[i].update(state="failed", error=str(e))
                return self.fail(i, str(e), e.hint)
            self.progress(self.running_message())
            self.wait([i])
            it = self.items[i]
            if self.requested:
                break
            if it["state"] != "finished":
                reason = it.get("error") or f"its job ended {it['state']}"
                return self.fail(i, f"{self._label(i)} {it['state']}: {reason}", it.get("hint"))
        return self.close()

    def run_sweep(self) -> int:
        for i in range(len(self.items)):
            if self.requested:
                break
            try:
                self.queue(i)
            except StageFailed as e:
                self.items[i].update(state="failed", error=str(e))
                self.events.log(str(e), level="warning")
        self.save()
        self.wait(list(range(len(self.items))))
        table = rank(self.items)
        best = table[0] if table and table[0]["state"] == "finished" else None
        if best is not None:
            self.best(best)
        if self.requested:
            return self.close()
        if best is None:
            return self.fail(None, "no trial of the sweep finished", "see each trial's error with nyx workflow show")
        return self.close()

    def best(self, best: dict[str, Any]) -> None:
        child = self._child(best["job"])
        path = self.job.path / "best.toml"
        try:
            atomic_write(path, child.config_path.read_text())
            self.events.emit("artifact", path=str(path), what="config")
            self.record["best"] = {
                "trial": best["trial"],
                "job": best["job"],
                "config": str(path),
                "lora": best["lora"],
            }
        except OSError as e:
            self.events.log(f"could not copy the best trial's config: {e}", level="warning")
        losses = ", ".join(
            f"{name} {best[k]:.4f}" for k, name in (("val_loss", "val loss"), ("final_loss", "final loss"))
            if isinstance(best.get(k), int | float)
        )  # fmt: skip
        params = " ".join(f"{k}={v}" for k, v in best["params"].items())
        self.events.log(f"best: {best['trial']} ({params}; {losses}); its config: {path}")
        self.grid()

    def grid(self) -> None:
        """Each trial's last sample side by side, in ranked order (when the trials rendered samples)."""
        rows = [r for r in rank(self.items) if r.get("sample") and Path(str(r["sample"])).is_file()]
        if not rows:
            return
        try:
            from nyx_tui.lora.grid import make_grid, save_png

            labels = [short_params(r["params"]) for r in rows]
            image = make_grid([[Path(str(r["sample"])) for r in rows]], labels, [""])
            path = self.job.path / "samples.png"
            save_png(image, path)
            self.record["grid"] = str(path)
            self.events.emit("artifact", path=str(path), what="image")
        except Exception as e:  # samples of different sizes, an unreadable file: the table stands without it
            self.events.log(f"no sample grid: {type(e).__name__}: {e}", level="warning")

    def fail(self, index: int | None, message: str, hint: str | None) -> int:
        for it in self.items:
            if it["state"] == "waiting":
                it["state"] = "skipped"
        self.record.update(state="failed", error=message)
        self.save()
        fields = {"hint": hint} if hint else {}
        self.events.emit("log", level="error", message=message, error=message, **fields)
        print(message, file=sys.stderr, flush=True)
        return 1

    def close(self) -> int:
        for it in self.items:
            if it["state"] == "waiting":
                it["state"] = "skipped"
        self.record["state"] = {"stop": "stopped", "cancel": "cancelled"}.get(self.requested or "", "finished")
        self.save()
        self.progress(f"{self.plan.kind} {self.record['state']}")
        return 0

    def run(self) -> int:
        self.events.emit("start", job=self.job.id, job_kind=self.plan.kind, total=len(self.items))
        for note in self.plan.notes:
            self.events.log(note)
        self.save()
        try:
            return self.run_sweep() if self.plan.kind == "sweep" else self.run_workflow()
        except KeyboardInterrupt:
            self.requested = self.requested or "cancel"
            self.pass_on("cancel")
            self.close()
            raise


def _sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m nyx_tui.workflows.run JOB_DIR", file=sys.stderr)
        return 2
    job = JobDir(Path(args[0]).resolve())
    signal.signal(signal.SIGTERM, _sigterm)  # the supervisor's ladder: the children are cancelled on the way out
    try:
        plan = Plan.from_json(json.loads((job.path / PLAN_FILE).read_text()))
    except (OSError, ValueError, KeyError) as e:
        print(f"the job's {PLAN_FILE} cannot be read: {e}", file=sys.stderr)
        return 2
    try:
        with EventWriter(job.events_path) as events:
            return Orchestrator(job, events, plan).run()
    except KeyboardInterrupt:
        print("interrupted: the stages were cancelled", file=sys.stderr, flush=True)
        return 130
    except Exception:
        traceback.print_exc()
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
