"""GPU panel: samples NVML (`nyx_tui.gpu.sample`) about once a second in a thread worker."""

from __future__ import annotations

import time

from rich.text import Text
from textual.widgets import Static
from textual.worker import get_current_worker

from nyx_tui import gpu


def _bar(fraction: float, width: int = 10) -> str:
    filled = max(0, min(width, round(fraction * width)))
    return "█" * filled + "░" * (width - filled)


def format_report(report: gpu.GpuReport) -> Text:
    if not report.gpus:
        return Text(f"GPU: {report.error or 'no NVIDIA GPU'}", style="dim")
    text = Text(no_wrap=True, overflow="ellipsis")
    for i, g in enumerate(report.gpus):
        if i:
            text.append("\n")
        text.append(f"GPU{g.index} {g.name}\n", style="bold")
        parts = []
        if g.util_pct is not None:
            parts.append(f"util {_bar(g.util_pct / 100)} {g.util_pct:3d}%")
        if g.mem_used_mb is not None and g.mem_total_mb:
            used, total = g.mem_used_mb / 1024, g.mem_total_mb / 1024
            parts.append(f"VRAM {_bar(used / total)} {used:.1f}/{total:.1f} GiB")
        tail = []
        if g.temp_c is not None:
            tail.append(f"{g.temp_c}°C")
        if g.power_w is not None:
            tail.append(f"{g.power_w:.0f} W" + (f"/{g.power_limit_w:.0f}" if g.power_limit_w else ""))
        if tail:
            parts.append(" ".join(tail))
        text.append("\n".join(parts))
    return text


class GpuPanel(Static):
    DEFAULT_CSS = """
    GpuPanel { height: auto; }
    """

    def __init__(self, interval: float = 1.0, *, id: str | None = None, classes: str | None = None) -> None:
        super().__init__("GPU: …", id=id, classes=classes)
        self.interval = interval
        self.report: gpu.GpuReport | None = None

    def on_mount(self) -> None:
        self.run_worker(self._poll, thread=True, exclusive=True, group="gpu", name="gpu-poll")

    def _poll(self) -> None:
        worker = get_current_worker()
        last: gpu.GpuReport | None = None
        while not worker.is_cancelled:
            report = gpu.sample()
            if report != last:
                last = report
                self.app.call_from_thread(self._show, report)
            if not report.gpus and report.error and "NYX_GPU" in report.error:
                return  # forced off: nothing will change
            deadline = time.monotonic() + self.interval
            while time.monotonic() < deadline and not worker.is_cancelled:
                time.sleep(0.05)

    def _show(self, report: gpu.GpuReport) -> None:
        self.report = report
        self.update(format_report(report))
