"""Commands from the views to a running job, through `control.jsonl` (append-only, like events).

A view appends `{"v": 1, "t": ..., "command": "stop"}`; the worker and the supervisor each read the file
with their own offset (`ControlReader.poll`) and act on what is theirs. The worker acknowledges a command
with a `log` event; the supervisor enforces `stop`/`cancel` with signals if the worker does not comply.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

COMMANDS = ("stop", "cancel", "save_now", "sample_now")


class ControlError(ValueError):
    pass


def send(control_path: Path, command: str, **args: Any) -> dict[str, Any]:
    if command not in COMMANDS:
        raise ControlError(f"unknown command {command!r}; one of {', '.join(COMMANDS)}")
    message = {"v": 1, "t": round(time.time(), 3), "command": command, **args}
    fd = os.open(control_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(message) + "\n").encode())
    finally:
        os.close(fd)
    return message


class ControlReader:
    """New commands since the last poll; unreadable lines are skipped."""

    def __init__(self, control_path: Path) -> None:
        self.path = Path(control_path)
        self.offset = 0
        self._partial = b""

    def poll(self) -> list[dict[str, Any]]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                chunk = f.read()
        except FileNotFoundError:
            return []
        self.offset += len(chunk)
        *lines, self._partial = (self._partial + chunk).split(b"\n")
        out = []
        for line in lines:
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if isinstance(msg, dict) and msg.get("command") in COMMANDS:
                out.append(msg)
        return out
