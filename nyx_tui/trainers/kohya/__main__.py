"""Worker entry point: `python -m nyx_tui.trainers.kohya JOB_DIR` (the supervisor passes `.`).

Exit codes: 0 when sd-scripts trained and saved (or obeyed a stop); 1 when it failed — including its own
exit 0 after "No data found" or without saving —; 2 for a bad command line; 3 when the config cannot run
on sd-scripts (not installed, or options it lacks).
"""

from __future__ import annotations

from nyx_tui.trainers.kohya.runner import main

if __name__ == "__main__":
    raise SystemExit(main())
