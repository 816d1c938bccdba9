"""A labelled image grid (Pillow): column labels on top, row labels on the left, tiles pasted unscaled.

The layout is computed first (`layout`) so a caller (or a test) knows where each tile lands: the grid is
`left + cols × tile_w` wide and `top + rows × tile_h` tall, where `left` and `top` are the label bands (0 when
there are no labels of that kind). Tiles are pasted pixel for pixel, never resized; a missing tile (a job
stopped halfway) stays a grey square. Torch-free.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

FONT_SIZE = 13
PAD = 4
LEFT_MIN, LEFT_MAX = 96, 240  # the row-label band's width range (px)
BACKGROUND = (255, 255, 255)
MISSING = (128, 128, 128)
INK = (20, 20, 20)


@dataclass(frozen=True)
class Layout:
    cols: int
    rows: int
    tile_w: int
    tile_h: int
    left: int  # width of the row-label band
    top: int  # height of the column-label band
    col_lines: tuple[tuple[str, ...], ...]
    row_lines: tuple[tuple[str, ...], ...]
    line_h: int

    @property
    def size(self) -> tuple[int, int]:
        return self.left + self.cols * self.tile_w, self.top + self.rows * self.tile_h

    def box(self, row: int, col: int) -> tuple[int, int, int, int]:
        """The tile's (left, top, right, bottom) in the grid."""
        x, y = self.left + col * self.tile_w, self.top + row * self.tile_h
        return x, y, x + self.tile_w, y + self.tile_h


def font() -> Any:
    try:
        return ImageFont.load_default(size=FONT_SIZE)
    except (TypeError, OSError):  # Pillow without FreeType: the bitmap font
        return ImageFont.load_default()


def _width(text: str, f: Any) -> float:
    return float(f.getlength(text))


def wrap(text: str, width: int, f: Any, max_lines: int = 4) -> tuple[str, ...]:
    """Words on lines no wider than `width` px (a word too long is cut), at most `max_lines` (the last
    ends in an ellipsis when text was left out)."""
    lines: list[str] = []
    current = ""
    for word in text.split():
        candidate = f"{current} {word}".strip()
        if _width(candidate, f) <= width or not current:
            current = candidate
        else:
            lines.append(current)
            current = word
        while _width(current, f) > width and len(current) > 1:
            # a single word wider than the band: cut it where it fits
            cut = len(current)
            while cut > 1 and _width(current[:cut], f) > width:
                cut -= 1
            lines.append(current[:cut])
            current = current[cut:]
    if current:
        lines.append(current)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        last = lines[-1]
        while last and _width(last + "…", f) > width:
            last = last[:-1]
        lines[-1] = last + "…"
    return tuple(lines) or ("",)


def layout(tile_w: int, tile_h: int, col_labels: list[str], row_labels: list[str]) -> Layout:
    f = font()
    ascent, descent = f.getmetrics() if hasattr(f, "getmetrics") else (FONT_SIZE, 2)
    line_h = int(ascent + descent + 1)
    has_rows = any(label.strip() for label in row_labels)
    left = 0
    row_lines: tuple[tuple[str, ...], ...] = tuple(() for _ in row_labels)
    if has_rows:
        widest = max(_width(label, f) for label in row_labels) + 2 * PAD
        left = int(min(LEFT_MAX, max(LEFT_MIN, widest)))
        max_lines = max(1, (tile_h - 2 * PAD) // line_h)
        row_lines = tuple(wrap(label, left - 2 * PAD, f, max_lines) for label in row_labels)
    has_cols = any(label.strip() for label in col_labels)
    col_lines: tuple[tuple[str, ...], ...] = tuple(() for _ in col_labels)
    top = 0
    if has_cols:
        col_lines = tuple(wrap(label, tile_w - 2 * PAD, f, 3) for label in col_labels)
        top = max(len(lines) for lines in col_lines) * line_h + 2 * PAD
    return Layout(len(col_labels), len(row_labels), tile_w, tile_h, left, top, col_lines, row_lines, line_h)


def make_grid(tiles: list[list[Path | None]], col_labels: list[str], row_labels: list[str]) -> Image.Image:
    """The grid of `tiles[row][col]` (image paths; None: missing). Every tile must have the first one's size."""
    first = next((p for row in tiles for p in row if p is not None), None)
    if first is None:
        raise ValueError("no tile to put in a grid")
    with Image.open(first) as im:
        tile_w, tile_h = im.size
    lay = layout(tile_w, tile_h, col_labels, row_labels)
    grid = Image.new("RGB", lay.size, BACKGROUND)
    draw = ImageDraw.Draw(grid)
    f = font()
    for c, lines in enumerate(lay.col_lines):
        x0 = lay.left + c * tile_w
        for i, line in enumerate(lines):
            x = x0 + (tile_w - _width(line, f)) / 2
            draw.text((x, PAD + i * lay.line_h), line, fill=INK, font=f)
    for r, lines in enumerate(lay.row_lines):
        y0 = lay.top + r * tile_h + (tile_h - len(lines) * lay.line_h) / 2
        for i, line in enumerate(lines):
            draw.text((PAD, y0 + i * lay.line_h), line, fill=INK, font=f)
    for r, row in enumerate(tiles):
        for c, path in enumerate(row):
            box = lay.box(r, c)
            if path is None:
                draw.rectangle((box[0], box[1], box[2] - 1, box[3] - 1), fill=MISSING)
                continue
            with Image.open(path) as im:
                if im.size != (tile_w, tile_h):
                    raise ValueError(f"{path} is {im.size[0]}x{im.size[1]}, the grid's tiles are {tile_w}x{tile_h}")
                grid.paste(im.convert("RGB"), box[:2])
    return grid


def save_png(image: Image.Image, path: Path) -> Path:
    """Write atomically (temp file + rename): a viewer never reads half a grid, a crash keeps the old one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)
    return path
