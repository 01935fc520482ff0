"""Charts drawn on the server as SVG geometry (no script, no charting library to ship): the page's
template turns these shapes into ``<rect>`` and ``<text>`` elements."""

from __future__ import annotations

from dataclasses import dataclass

# Colour-blind-safe (Okabe-Ito), one per series in turn.
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000")


@dataclass(frozen=True)
class Bar:
    x: float
    y: float
    width: float
    height: float
    color: str
    title: str


@dataclass(frozen=True)
class Tick:
    position: float
    label: str


@dataclass(frozen=True)
class StackedBars:
    """Bars per column (e.g. a day), stacked by series (e.g. a model), in a ``width`` × ``height`` box."""

    width: int
    height: int
    bars: list[Bar]
    x_ticks: list[Tick]
    y_ticks: list[Tick]
    legend: list[tuple[str, str]]  # (series, colour)
    top: int  # the value the top of the plot stands for


LEFT, BOTTOM, TOP = 56, 24, 8  # room for the y labels, the x labels, and above the tallest bar


def nice_top(value: int) -> int:
    """The smallest 1, 2 or 5 × 10^k at or above ``value`` (at least 1)."""
    step = 1
    while True:
        for factor in (1, 2, 5):
            if factor * step >= value:
                return factor * step
        step *= 10


def stacked_bars(columns: list[str], series: dict[str, dict[str, int]], width: int = 720, height: int = 240,
                 unit: str = "tokens") -> StackedBars:
    """``series``: ``{name: {column: value}}``; columns in order, left to right."""
    totals = [sum(values.get(column, 0) for values in series.values()) for column in columns]
    top = nice_top(max(totals, default=0))
    plot_w, plot_h = width - LEFT, height - BOTTOM - TOP
    slot = plot_w / max(1, len(columns))
    bars: list[Bar] = []
    legend = [(name, PALETTE[i % len(PALETTE)]) for i, name in enumerate(series)]
    for i, column in enumerate(columns):
        base = height - BOTTOM
        for (name, color), values in zip(legend, series.values(), strict=True):
            value = values.get(column, 0)
            if value <= 0:
                continue
            h = plot_h * value / top
            base -= h
            title = f"{column} {name}: {value} {unit}"
            bars.append(Bar(LEFT + i * slot + slot * 0.15, base, slot * 0.7, h, color, title))
    every = max(1, len(columns) // 6)
    x_ticks = [Tick(LEFT + (i + 0.5) * slot, column[5:]) for i, column in enumerate(columns) if i % every == 0]
    y_ticks = [Tick(height - BOTTOM - plot_h * f, f"{round(top * f):,}") for f in (0, 0.5, 1)]
    return StackedBars(width, height, bars, x_ticks, y_ticks, legend, top)
