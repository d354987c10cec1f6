"""Small pictures for people, drawn with PIL only: a loss curve and a labelled contact sheet."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

_BACKGROUND = (255, 255, 255)
_AXES = (90, 90, 90)
_RAW = (170, 200, 235)
_SMOOTH = (20, 80, 170)


def loss_curve(losses: Sequence[float], size: tuple[int, int] = (640, 320), title: str = "training loss") -> Image.Image:
    """Per-step losses (light) and their running mean (dark) on a log axis; an RGB PIL image (width, height)."""
    width, height = size
    image = Image.new("RGB", size, _BACKGROUND)
    draw = ImageDraw.Draw(image)
    left, right, top, bottom = 56, width - 12, 24, height - 28
    draw.rectangle((left, top, right, bottom), outline=_AXES)
    values = np.asarray([v for v in losses if math.isfinite(v) and v > 0], dtype=np.float64)
    if values.size == 0:
        draw.text((left + 8, top + 8), f"{title}: no steps yet", fill=_AXES)
        return image
    window = max(1, values.size // 50)
    smooth = np.convolve(values, np.ones(window) / window, mode="valid")
    logs = np.log10(values)
    lo, hi = float(logs.min()), float(logs.max())
    if hi - lo < 1e-6:
        lo, hi = lo - 0.5, hi + 0.5

    def points(series: np.ndarray, offset: int) -> list[tuple[float, float]]:
        steps = np.arange(series.size) + offset
        x = left + (right - left) * steps / max(values.size - 1, 1)
        y = bottom - (bottom - top) * (np.log10(series) - lo) / (hi - lo)
        return list(zip(x.tolist(), y.tolist()))

    for series, offset, colour in ((values, 0, _RAW), (smooth, window - 1, _SMOOTH)):
        line = points(series, offset)
        if len(line) == 1:
            line = line * 2
        draw.line(line, fill=colour, width=1 if colour == _RAW else 2)
    draw.text((left, 4), f"{title} (log scale), {values.size} steps, last mean {smooth[-1]:.4g}", fill=_AXES)
    draw.text((4, top), f"{10 ** hi:.3g}", fill=_AXES)
    draw.text((4, bottom - 10), f"{10 ** lo:.3g}", fill=_AXES)
    draw.text((left, bottom + 6), "step 1", fill=_AXES)
    draw.text((right - 60, bottom + 6), f"step {values.size}", fill=_AXES)
    return image


def _font(size: int):
    """PIL's built-in font at `size` px (scalable since Pillow 10.1), else its small bitmap font."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # older Pillow: one fixed size
        return ImageFont.load_default()


def contact_sheet(rows: Sequence[Sequence[Image.Image]], row_labels: Sequence[str] = (),
                  column_labels: Sequence[str] = (), cell: int = 128, gap: int = 4,
                  font_size: int = 15) -> Image.Image:
    """A grid of images (each resized to cell x cell, `gap` px apart) with optional row and column labels.

    Labels may hold several lines ("\\n"); a column label is wrapped to its cell's width.
    """
    font = _font(font_size)
    line = font_size + 4
    wrap = lambda text: _wrap(text, font, cell - 4)  # noqa: E731
    column_lines = [wrap(t) for t in column_labels]
    label_w = (max(int(font.getlength(part)) for t in row_labels for part in t.split("\n")) + 12) if row_labels else 0
    label_h = (max(len(c) for c in column_lines) * line + 6) if column_lines else 0
    columns = max((len(r) for r in rows), default=0)
    sheet = Image.new("RGB", (label_w + columns * (cell + gap), label_h + len(rows) * (cell + gap)), _BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    for j, parts in enumerate(column_lines):
        for k, part in enumerate(parts):
            draw.text((label_w + j * (cell + gap) + 2, 3 + k * line), part, fill=_AXES, font=font)
    for i, row in enumerate(rows):
        y = label_h + i * (cell + gap)
        if i < len(row_labels):
            parts = row_labels[i].split("\n")
            for k, part in enumerate(parts):
                draw.text((4, y + cell // 2 - len(parts) * line // 2 + k * line), part, fill=_AXES, font=font)
        for j, picture in enumerate(row):
            sheet.paste(picture.convert("RGB").resize((cell, cell), Image.Resampling.BICUBIC),
                        (label_w + j * (cell + gap), y))
    return sheet


def _wrap(text: str, font, width: int) -> list[str]:
    lines, current = [], ""
    for word in text.split():
        candidate = f"{current} {word}".strip()
        if current and font.getlength(candidate) > width:
            lines.append(current)
            current = word
        else:
            current = candidate
    return lines + [current] if current else lines
