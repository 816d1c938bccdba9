"""Worker entry point: `python -m nyx_tui.trainers.native JOB_DIR` (the supervisor passes `.`).

The `start` event and the first progress event are written before the heavy imports (about 12 s on a
small CPU box), so a dashboard shows the job as loading at once. Exit codes: 0 for a finished, stopped
or cancelled run; 1 for any error (the traceback goes to stderr, which the supervisor keeps in
output.log); 2 for a bad command line; 130 when interrupted by SIGINT (the supervisor's escalation).
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from pathlib import Path

from nyx_tui.config.io import load_config
from nyx_tui.jobs.events import EventWriter
from nyx_tui.jobs.jobdir import JobDir
from nyx_tui.trainers.native import LOAD_STAGES


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m nyx_tui.trainers.native JOB_DIR", file=sys.stderr)
        return 2
    job = JobDir(Path(args[0]).resolve())
    main_process = os.environ.get("RANK", "0") == "0"  # under `accelerate launch`, one process reports
    try:
        with EventWriter(job.events_path) as events:
            cfg = load_config(job.config_path)
            if main_process:
                # the run's length: its steps, or (when epochs decide) its epochs: the steps follow from the data
                tr = cfg.training
                length = {"total_epochs": tr.max_epochs} if tr.max_epochs else {"total_steps": tr.max_steps}
                events.emit("start", job=job.id, job_kind="train", **length)
                events.emit("artifact", path=str(job.config_path), what="config")
                events.emit("progress", done=0, total=len(LOAD_STAGES), unit="stage", message=LOAD_STAGES[0])
                print(f"{LOAD_STAGES[0]}…", flush=True)
            # bitsandbytes warns on import, on CPUs with AVX512-BF16, that an optional 4-bit kernel package is
            # missing: nothing a LoRA run uses, and it reads like an error in output.log
            logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
            from nyx_tui.trainers.native.engine import train

            return train(job, cfg, events)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        return 130
    except Exception:
        traceback.print_exc()
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
