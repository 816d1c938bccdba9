"""Requests from screens to the App, which owns state (the current job, the theme) and starts jobs.

Screens post these (`self.post_message(OpenJob(job_id))`); they bubble from the screen to the App. The
App answers by changing its reactive `current_job` (the dashboard watches it) or by notifying.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from textual.message import Message

if TYPE_CHECKING:  # the model costs ~60 ms of pydantic schema building: not on the first frame's path
    from nyx_tui.config.model import TrainingConfig


class OpenJob(Message):
    """Show this job on the dashboard (switches to the train mode)."""

    def __init__(self, job_id: str) -> None:
        super().__init__()
        self.job_id = job_id


class StartTraining(Message):
    """Create and start a training job from a config that passed the pre-flight check; the App opens
    the dashboard on it. `source` is the TOML file it came from, if any."""

    def __init__(self, config: TrainingConfig, source: Path | None = None, queue: bool = False) -> None:
        super().__init__()
        self.config = config
        self.source = source
        self.queue = queue  # wait in the queue for a free GPU instead of starting now


class StartDemo(Message):
    """Build the demo workspace if needed and start the demo training job."""


class ControlJob(Message):
    """Send a control command (stop, cancel, save_now, sample_now) to a job."""

    def __init__(self, job_id: str, command: str) -> None:
        super().__init__()
        self.job_id = job_id
        self.command = command
