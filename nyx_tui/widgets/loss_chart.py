"""A small loss chart: raw loss as braille dots, the smoothed loss as a line of `•`, y-axis labels on the
left and step labels underneath. Pure rendering (`render_chart`) is separate from the widget for tests."""

from __future__ import annotations

from collections.abc import Sequence

from rich.text import Text
from textual.widget import Widget

from nyx_tui.jobs.series import LossPoint

# braille dot bits for (x in 0..1, y in 0..3 from the top)
_DOTS = ((0x01, 0x02, 0x04, 0x40), (0x08, 0x10, 0x20, 0x80))
_BRAILLE = 0x2800


def _fmt(value: float) -> str:
    if value == 0:
        return "0"
    a = abs(value)
    if a >= 1000 or a < 0.001:
        return f"{value:.1e}"
    if a >= 100:
        return f"{value:.0f}"
    if a >= 10:
        return f"{value:.1f}"
    if a >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def _fmt_step(step: int) -> str:
    if step >= 1_000_000:
        return f"{step / 1_000_000:.1f}M"
    if step >= 10_000:
        return f"{step / 1000:.0f}k"
    return str(step)


def render_chart(points: Sequence[LossPoint], width: int, height: int) -> Text:
    """The chart as text of exactly `height` lines (or fewer when there is nothing to plot)."""
    if height < 3 or width < 16:
        return Text("loss chart: too small", style="dim")
    if not points:
        return Text("no loss yet: waiting for the first step", style="dim")
    label_w = 7
    plot_w = width - label_w - 1
    plot_h = height - 1  # last line: step labels
    values = [p.loss for p in points] + [p.loss_avg for p in points]
    lo, hi = min(values), max(values)
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5 * (abs(lo) or 1), hi + 0.5 * (abs(hi) or 1)
    span = hi - lo
    first, last = points[0].step, points[-1].step
    xs = max(1, last - first)
    px_w, px_h = plot_w * 2, plot_h * 4
    cells = [[0] * plot_w for _ in range(plot_h)]
    smooth: list[int | None] = [None] * plot_w  # row of the smoothed line per column

    def x_of(step: int) -> int:
        return 0 if last == first else min(px_w - 1, int((step - first) / xs * (px_w - 1) + 0.5))

    def y_of(value: float) -> int:  # pixel row from the top
        return min(px_h - 1, max(0, int((hi - value) / span * (px_h - 1) + 0.5)))

    for p in points:
        x, y = x_of(p.step), y_of(p.loss)
        cells[y // 4][x // 2] |= _DOTS[x % 2][y % 4]
        col = x // 2
        smooth[col] = y_of(p.loss_avg) // 4
    # fill gaps in the smoothed line so it reads as a line
    prev: int | None = None
    for c in range(plot_w):
        if smooth[c] is None and prev is not None and any(s is not None for s in smooth[c:]):
            smooth[c] = prev
        prev = smooth[c] if smooth[c] is not None else prev

    text = Text(no_wrap=True, overflow="crop")
    mid = (plot_h - 1) // 2
    for r in range(plot_h):
        if r == 0:
            label = _fmt(hi)
        elif r == plot_h - 1:
            label = _fmt(lo)
        elif r == mid and plot_h >= 5:
            label = _fmt((hi + lo) / 2)
        else:
            label = ""
        text.append(label.rjust(label_w - 1)[: label_w - 1] + " ", style="dim")
        text.append("┤" if label else "│", style="dim")
        for c in range(plot_w):
            if smooth[c] == r:
                text.append("•", style="bold")
            elif cells[r][c]:
                text.append(chr(_BRAILLE + cells[r][c]), style="cyan")
            else:
                text.append(" ")
        text.append("\n")
    # x axis: step labels at the left, middle and right of the plot
    axis = [" "] * plot_w
    for frac in (0.0, 0.5, 1.0):
        label = _fmt_step(round(first + (last - first) * frac))
        start = round((plot_w - 1) * frac) - (len(label) // 2 if 0 < frac < 1 else (len(label) - 1 if frac else 0))
        start = max(0, min(plot_w - len(label), start))
        if all(ch == " " for ch in axis[max(0, start - 1) : start + len(label) + 1]):
            axis[start : start + len(label)] = list(label)
    text.append("step".rjust(label_w - 1) + " └", style="dim")
    text.append("".join(axis), style="dim")
    return text


class LossChart(Widget):
    """Raw (braille, `⣿`) and smoothed (`•`) loss against the step."""

    DEFAULT_CSS = """
    LossChart { height: 1fr; min-height: 4; }
    """

    def __init__(self, *, id: str | None = None, classes: str | None = None) -> None:
        super().__init__(id=id, classes=classes)
        self._points: list[LossPoint] = []

    def set_points(self, points: Sequence[LossPoint]) -> None:
        self._points = list(points)
        self.refresh()

    def render(self) -> Text:
        return render_chart(self._points, self.size.width, self.size.height)
