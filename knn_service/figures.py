"""Figures drawn with PIL only: the retrieval grid and the training curves.

- :func:`retrieval_grid`: one row per query, the query image then its nearest training
  images, best first (the paper's retrieval figure, Wu et al. 2018 Fig. 4). Each image sits
  in a coloured frame: blue for the query, green for a neighbour of the query's label, red
  for one of another label (grey when a label is unknown); the caption under a neighbour is
  its cosine similarity, under the query its class.
- :func:`training_curves`: two panels by epoch, the training loss and the kNN top-1
  accuracy (bank and recomputed features as separate series), with axes, ticks and labels.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageDraw, ImageFont

__all__ = [
    "Tile",
    "nice_ticks",
    "retrieval_grid",
    "retrieval_grid_size",
    "training_curves",
]

BORDER = 3
PAD = 6
GAP = 14  # extra space between the query column and its neighbours
CAPTION = 16
HEADER = 36  # the title line and the legend line above the grid
MIN_WIDTH = 360  # room for the legend however few neighbours
TITLE = "Nearest training images of each query (cosine similarity), best first"
WHITE = (255, 255, 255)
BLACK = (0, 0, 0)
QUERY_COLOR = (40, 90, 200)
SAME_COLOR = (40, 160, 60)
OTHER_COLOR = (220, 30, 30)
UNKNOWN_COLOR = (150, 150, 150)
LEGEND = (
    ("query", QUERY_COLOR),
    ("same label", SAME_COLOR),
    ("other label", OTHER_COLOR),
    ("label unknown", UNKNOWN_COLOR),
)
CELL_BACKGROUND = (235, 235, 235)
SERIES_COLORS = {
    "loss": (31, 119, 180),
    "bank": (31, 119, 180),
    "recomputed": (255, 127, 14),
    "other": (44, 160, 44),
}


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ValueError, OSError):  # Pillow without FreeType: the bitmap font
        return ImageFont.load_default()


# --------------------------------------------------------------------------- retrieval grid


@dataclass(frozen=True)
class Tile:
    """One image of the grid: the picture, its label (``-1`` unknown) and its caption."""

    image: Image.Image
    label: int
    caption: str


def retrieval_grid_size(num_queries: int, k: int, cell: int) -> tuple[int, int]:
    """``(width, height)`` in pixels of :func:`retrieval_grid`'s image."""
    box = cell + 2 * BORDER
    width = max(MIN_WIDTH, PAD + box + GAP + k * (box + PAD))
    return width, HEADER + PAD + num_queries * (box + CAPTION + PAD)


def _fit(image: Image.Image, cell: int) -> Image.Image:
    """``image`` scaled to fit ``cell x cell`` keeping its aspect (pixel-sharp when enlarged)."""
    width, height = image.size
    scale = min(cell / width, cell / height)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    method = Image.Resampling.NEAREST if scale >= 2 else Image.Resampling.LANCZOS
    return image.convert("RGB").resize(size, method)


def retrieval_grid(
    queries: Sequence[Tile], neighbours: Sequence[Sequence[Tile]], cell: int = 64
) -> Image.Image:
    """Draw queries (rows) and their neighbours (columns, best first).

    Args:
        queries: ``Q`` query tiles.
        neighbours: ``Q`` rows of ``k`` neighbour tiles each.
        cell: side of each image's square in pixels.

    Returns:
        An RGB image of :func:`retrieval_grid_size` ``(Q, k, cell)``.

    Raises:
        ValueError: no queries, rows of different lengths, or ``cell < 8``.
    """
    if not queries or len(neighbours) != len(queries):
        raise ValueError(
            f"need >= 1 query and one neighbour row per query, got {len(queries)} queries "
            f"and {len(neighbours)} rows"
        )
    k = len(neighbours[0])
    if any(len(row) != k for row in neighbours):
        raise ValueError("every query needs the same number of neighbours")
    if cell < 8:
        raise ValueError(f"cell must be >= 8 pixels, got {cell}")
    canvas = Image.new("RGB", retrieval_grid_size(len(queries), k, cell), WHITE)
    draw = ImageDraw.Draw(canvas)
    font = _font(11)
    box = cell + 2 * BORDER
    _legend(draw, font)
    for r, (query, row) in enumerate(zip(queries, neighbours)):
        y = HEADER + PAD + r * (box + CAPTION + PAD)
        _tile(canvas, draw, font, query, PAD, y, cell, QUERY_COLOR)
        for j, tile in enumerate(row):
            x = PAD + box + GAP + j * (box + PAD)
            if tile.label < 0 or query.label < 0:
                color = UNKNOWN_COLOR
            else:
                color = SAME_COLOR if tile.label == query.label else OTHER_COLOR
            _tile(canvas, draw, font, tile, x, y, cell, color)
    return canvas


def _legend(draw: ImageDraw.ImageDraw, font: Any) -> None:
    """The title, then a swatch and a word for each frame colour."""
    draw.text((PAD, 4), TITLE, fill=BLACK, font=font)
    x = PAD
    for word, color in LEGEND:
        draw.rectangle([x, 21, x + 10, 31], fill=color)
        draw.text((x + 14, 20), word, fill=BLACK, font=font)
        x += 14 + int(draw.textlength(word, font=font)) + 12


def _tile(
    canvas: Image.Image,
    draw: ImageDraw.ImageDraw,
    font: Any,
    tile: Tile,
    x: int,
    y: int,
    cell: int,
    color: tuple[int, int, int],
) -> None:
    box = cell + 2 * BORDER
    draw.rectangle([x, y, x + box - 1, y + box - 1], fill=color)
    draw.rectangle([x + BORDER, y + BORDER, x + BORDER + cell - 1, y + BORDER + cell - 1],
                   fill=CELL_BACKGROUND)  # fmt: skip
    picture = _fit(tile.image, cell)
    canvas.paste(
        picture,
        (x + BORDER + (cell - picture.width) // 2, y + BORDER + (cell - picture.height) // 2),
    )
    text = _clip_text(draw, tile.caption, font, box)
    width = draw.textlength(text, font=font)
    draw.text((x + (box - width) / 2, y + box + 2), text, fill=BLACK, font=font)


def _clip_text(draw: ImageDraw.ImageDraw, text: str, font: Any, width: int) -> str:
    while text and draw.textlength(text, font=font) > width:
        text = text[:-2] + "…" if len(text) > 2 else text[:-1]
    return text


# --------------------------------------------------------------------------- curves


def nice_ticks(lo: float, hi: float, max_ticks: int = 6) -> list[float]:
    """Round tick values (steps 1, 2, 2.5 or 5 x 10^n) from ``<= lo`` to ``>= hi``."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"tick range must be finite, got [{lo}, {hi}]")
    if hi < lo:
        lo, hi = hi, lo
    if hi - lo < 1e-9 * max(1.0, abs(lo), abs(hi)):  # one value: a unit range around it
        lo, hi = lo - 0.5, hi + 0.5
    raw = (hi - lo) / max(1, max_ticks - 1)
    exponent = math.floor(math.log10(raw))
    step = next(m * 10.0**exponent for m in (1, 2, 2.5, 5, 10) if m * 10.0**exponent >= raw)
    first = math.floor(lo / step + 1e-9)
    last = max(math.ceil(hi / step - 1e-9), first + 1)
    digits = 3 - exponent  # enough for 2.5 x 10^exponent, drops float noise
    return [round(i * step, digits) for i in range(first, last + 1)]


def _tick_label(value: float, step: float, percent: bool) -> str:
    if percent:
        value, step = value * 100, step * 100
    decimals = max(0, -math.floor(math.log10(step) + 1e-9)) if step > 0 else 0
    if step * 10**decimals % 1 > 1e-6:  # 2.5 x 10^n needs one more digit
        decimals += 1
    return f"{value:.{decimals}f}" + ("%" if percent else "")


@dataclass
class _Series:
    name: str
    points: list[tuple[float, float]]
    color: tuple[int, int, int]
    joined: bool = True  # False: separate measurements (markers only, no line between)


def _panel(
    canvas: Image.Image,
    box: tuple[int, int, int, int],
    title: str,
    ylabel: str,
    series: list[_Series],
    percent: bool,
) -> None:
    """One plot: axes, ticks, labels, lines with markers and a legend inside ``box``."""
    draw = ImageDraw.Draw(canvas)
    font, title_font = _font(12), _font(14)
    left, top, right, bottom = box
    px0, py0, px1, py1 = left + 62, top + 30, right - 12, bottom - 42  # plot area
    title_w = draw.textlength(title, font=title_font)
    draw.text(((px0 + px1 - title_w) / 2, top + 6), title, fill=BLACK, font=title_font)
    points = [p for s in series for p in s.points]
    if not points:
        draw.rectangle([px0, py0, px1, py1], outline=BLACK)
        message = "no data"
        w = draw.textlength(message, font=font)
        draw.text(((px0 + px1 - w) / 2, (py0 + py1) / 2 - 6), message, fill=BLACK, font=font)
        return
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    xticks = nice_ticks(min(xs), max(xs), 8)
    if xticks[1] - xticks[0] < 1:  # epochs are whole numbers
        xticks = nice_ticks(math.floor(min(xs)), max(math.ceil(max(xs)), math.floor(min(xs)) + 1))
        xticks = [t for t in xticks if float(t).is_integer()] or xticks
    y_lo, y_hi = min(ys), max(ys)
    margin = 0.05 * (y_hi - y_lo) if y_hi > y_lo else 0.05 * max(1e-3, abs(y_hi))
    lo, hi = y_lo - margin, y_hi + margin
    if percent:  # accuracies: stay inside [0, 100 %]
        lo, hi = max(0.0, lo), min(1.0, hi)
    yticks = nice_ticks(lo, hi, 6)
    x_min, x_max = xticks[0], xticks[-1]
    y_min, y_max = yticks[0], yticks[-1]
    x_span = (x_max - x_min) or 1.0
    y_span = (y_max - y_min) or 1.0

    def to_px(x: float, y: float) -> tuple[float, float]:
        return (px0 + (x - x_min) / x_span * (px1 - px0), py1 - (y - y_min) / y_span * (py1 - py0))

    grid = (225, 225, 225)
    y_step = yticks[1] - yticks[0] if len(yticks) > 1 else 1.0
    for t in yticks:
        _, y = to_px(x_min, t)
        draw.line([px0, y, px1, y], fill=grid)
        draw.line([px0 - 5, y, px0, y], fill=BLACK)
        label = _tick_label(t, y_step, percent)
        w = draw.textlength(label, font=font)
        draw.text((px0 - 8 - w, y - 7), label, fill=BLACK, font=font)
    x_step = xticks[1] - xticks[0] if len(xticks) > 1 else 1.0
    for t in xticks:
        x, _ = to_px(t, y_min)
        draw.line([x, py0, x, py1], fill=grid)
        draw.line([x, py1, x, py1 + 5], fill=BLACK)
        label = _tick_label(t, x_step, False)
        w = draw.textlength(label, font=font)
        draw.text((x - w / 2, py1 + 8), label, fill=BLACK, font=font)
    draw.rectangle([px0, py0, px1, py1], outline=BLACK)
    xlabel = "epoch"
    w = draw.textlength(xlabel, font=font)
    draw.text(((px0 + px1 - w) / 2, bottom - 20), xlabel, fill=BLACK, font=font)
    _vertical_text(canvas, ylabel, font, left + 4, (py0 + py1) // 2)

    for s in series:
        pts = [to_px(x, y) for x, y in sorted(s.points)]
        if len(pts) > 1 and s.joined:
            draw.line(pts, fill=s.color, width=3, joint="curve")
        r = 3 if s.joined else 6
        for x, y in pts:
            draw.ellipse([x - r, y - r, x + r, y + r], fill=s.color)
    named = [s for s in series if s.points]
    if len(named) > 1:  # legend, bottom right inside the plot (empty for rising curves)
        width = int(max(draw.textlength(s.name, font=font) for s in named)) + 30
        lx, ly = px1 - width - 6, py1 - 18 * len(named) - 10
        draw.rectangle([lx, ly, lx + width, ly + 18 * len(named) + 4], fill=WHITE, outline=grid)
        for i, s in enumerate(named):
            yy = ly + 4 + 18 * i
            if s.joined:
                draw.line([lx + 5, yy + 7, lx + 20, yy + 7], fill=s.color, width=2)
            else:
                draw.ellipse([lx + 8, yy + 3, lx + 16, yy + 11], fill=s.color)
            draw.text((lx + 25, yy), s.name, fill=BLACK, font=font)


def _vertical_text(canvas: Image.Image, text: str, font: Any, x: int, center_y: int) -> None:
    probe = ImageDraw.Draw(canvas)
    width = int(probe.textlength(text, font=font)) + 4
    strip = Image.new("RGB", (width, 16), WHITE)
    ImageDraw.Draw(strip).text((2, 1), text, fill=BLACK, font=font)
    rotated = strip.rotate(90, expand=True)
    canvas.paste(rotated, (x, center_y - rotated.height // 2))


def training_curves(
    records: Sequence[Mapping[str, Any]], width: int = 1000, height: int = 420
) -> Image.Image:
    """Two panels by epoch: training loss, and kNN top-1 per ``features`` kind.

    Args:
        records: ``metrics.jsonl`` records (keys ``epoch``, ``loss`` (may be ``None``),
            ``knn_top1``, ``features``); records lacking a value are left out of that panel.
        width, height: image size in pixels.

    Returns:
        An RGB image ``width x height``.

    Raises:
        ValueError: a size too small for two panels.
    """
    if width < 400 or height < 200:
        raise ValueError(f"curves need at least 400 x 200 pixels, got {width} x {height}")
    loss: list[tuple[float, float]] = []
    top1: dict[str, list[tuple[float, float]]] = {}
    for record in records:
        epoch = _number(record.get("epoch"))
        if epoch is None:
            continue
        value = _number(record.get("loss"))
        if value is not None:
            loss.append((epoch, value))
        value = _number(record.get("knn_top1"))
        if value is not None:
            top1.setdefault(str(record.get("features") or "bank"), []).append((epoch, value))
    canvas = Image.new("RGB", (width, height), WHITE)
    half = width // 2
    _panel(
        canvas,
        (0, 0, half, height),
        "training loss",
        "loss",
        [_Series("loss", loss, SERIES_COLORS["loss"])],
        percent=False,
    )
    # Recomputed features are measured at a few epochs only (before the first step and at
    # the end): markers, not a line that would invent the epochs between.
    series = [
        _Series(
            f"{name} features",
            points,
            SERIES_COLORS.get(name, SERIES_COLORS["other"]),
            joined=name != "recomputed",
        )
        for name, points in sorted(top1.items())
    ]
    _panel(canvas, (half, 0, width, height), "kNN top-1", "top-1 accuracy", series, percent=True)
    return canvas


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None
