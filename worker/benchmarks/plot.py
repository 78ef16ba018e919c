"""A scatter plot of end-to-end latency over a benchmark run, drawn with Pillow.

Pillow is already a dependency for decoding images, so plots need no plotting library.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

WIDTH, HEIGHT = 960, 540
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 80, 30, 60, 60
POINT_COLOR = (31, 119, 180)
MEDIAN_COLOR = (214, 39, 40)
GRID_COLOR = (225, 225, 225)
TEXT_COLOR = (20, 20, 20)


def nice_step(span: float, ticks: int = 6) -> float:
    """Return a tick step of 1, 2 or 5 times a power of ten that cuts `span` into about `ticks` parts."""
    if span <= 0:
        return 1.0
    raw = span / ticks
    power = 10 ** math.floor(math.log10(raw))
    for factor in (1, 2, 5, 10):
        if raw <= factor * power:
            return factor * power
    return 10 * power


def tick_values(maximum: float) -> list[float]:
    step = nice_step(maximum)
    return [i * step for i in range(math.ceil(maximum / step - 1e-9) + 1)]


def load_font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        # Pillow built without FreeType has only the fixed-size bitmap font.
        return ImageFont.load_default()


def write_latency_plot(path: Path, points: Sequence[tuple[float, float]], report: dict[str, Any]) -> None:
    """Draw one dot per caption at (seconds since the first event, end-to-end latency) and save a PNG."""
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    font, small = load_font(18), load_font(14)

    max_x = max((x for x, _ in points), default=1.0) or 1.0
    max_y = max((y for _, y in points), default=1.0) or 1.0
    x_ticks, y_ticks = tick_values(max_x), tick_values(max_y)
    max_x, max_y = max(max_x, x_ticks[-1]), max(max_y, y_ticks[-1])
    plot_width = WIDTH - MARGIN_LEFT - MARGIN_RIGHT
    plot_height = HEIGHT - MARGIN_TOP - MARGIN_BOTTOM

    def to_pixel(x: float, y: float) -> tuple[float, float]:
        return MARGIN_LEFT + x / max_x * plot_width, HEIGHT - MARGIN_BOTTOM - y / max_y * plot_height

    for value in x_ticks:
        px, _ = to_pixel(value, 0)
        draw.line([(px, MARGIN_TOP), (px, HEIGHT - MARGIN_BOTTOM)], fill=GRID_COLOR)
        draw.text((px, HEIGHT - MARGIN_BOTTOM + 6), f"{value:g}", fill=TEXT_COLOR, font=small, anchor="mt")
    for value in y_ticks:
        _, py = to_pixel(0, value)
        draw.line([(MARGIN_LEFT, py), (WIDTH - MARGIN_RIGHT, py)], fill=GRID_COLOR)
        draw.text((MARGIN_LEFT - 8, py), f"{value:g}", fill=TEXT_COLOR, font=small, anchor="rm")
    draw.rectangle([MARGIN_LEFT, MARGIN_TOP, WIDTH - MARGIN_RIGHT, HEIGHT - MARGIN_BOTTOM], outline=TEXT_COLOR)

    for x, y in points:
        px, py = to_pixel(x, y)
        draw.ellipse([px - 1.5, py - 1.5, px + 1.5, py + 1.5], fill=POINT_COLOR)
    median = report.get("latency_p50_seconds")
    if median is not None:
        _, py = to_pixel(0, median)
        draw.line([(MARGIN_LEFT, py), (WIDTH - MARGIN_RIGHT, py)], fill=MEDIAN_COLOR, width=2)
        label_position = (WIDTH - MARGIN_RIGHT - 4, py - 4)
        label_text = f"p50 {median:.2f} s"
        draw.rectangle(draw.textbbox(label_position, label_text, font=small, anchor="rb"), fill="white")
        draw.text(label_position, label_text, fill=MEDIAN_COLOR, font=small, anchor="rb")

    title = (
        f"caption-worker bench stream: end-to-end latency per caption, {report.get('events')} events, "
        f"{report.get('max_new_tokens')} new tokens"
    )
    draw.text((WIDTH / 2, 20), title, fill=TEXT_COLOR, font=font, anchor="mt")
    draw.text((WIDTH / 2, HEIGHT - 18), "seconds since the first event", fill=TEXT_COLOR, font=small, anchor="mb")
    label = Image.new("RGB", (plot_height, 24), "white")
    ImageDraw.Draw(label).text((plot_height / 2, 12), "latency, seconds", fill=TEXT_COLOR, font=small, anchor="mm")
    image.paste(label.rotate(90, expand=True), (8, MARGIN_TOP))

    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG", optimize=True)
