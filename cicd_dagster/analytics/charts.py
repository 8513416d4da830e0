"""Charts of the analytics assets, rendered with matplotlib's Agg backend (no display, safe
in any thread of a run): one function per kind returns PNG bytes; `save_chart` writes one
under home/reports/analytics and `markdown_image` embeds one in Markdown metadata."""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

_SIZE = (8, 3.5)  # inches; at 100 dpi a chart fits the UI's metadata panel
_DPI = 100


def time_series_png(series: Mapping[str, pd.Series], *, title: str, ylabel: str) -> bytes:
    """One line per named series (index: dates or times, values: numbers)."""
    figure = Figure(figsize=_SIZE, dpi=_DPI)
    axes = figure.subplots()
    for name, values in series.items():
        axes.plot(values.index, values.to_numpy(dtype=float), marker="o", markersize=3, label=name)
    axes.set_title(title)
    axes.set_ylabel(ylabel)
    axes.grid(alpha=0.3)
    if series:
        axes.legend(loc="upper left", fontsize="small")
    figure.autofmt_xdate()
    return _png(figure)


def bar_chart_png(values: Mapping[str, float | None], *, title: str, ylabel: str) -> bytes:
    """One bar per name; a None value (no data) leaves an empty, labelled slot."""
    figure = Figure(figsize=_SIZE, dpi=_DPI)
    axes = figure.subplots()
    names = list(values)
    heights = [0.0 if value is None else value for value in values.values()]
    bars = axes.bar(names, heights)
    axes.bar_label(bars, labels=["no data" if v is None else f"{v:.3g}" for v in values.values()])
    axes.set_title(title)
    axes.set_ylabel(ylabel)
    axes.grid(axis="y", alpha=0.3)
    return _png(figure)


def save_chart(directory: Path, name: str, png: bytes) -> Path:
    """Write the chart as directory/name.png (replacing the previous one) and return it."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.png"
    partial = path.with_suffix(".png.partial")
    partial.write_bytes(png)
    partial.replace(path)  # a reader never sees half a file
    return path


def markdown_image(png: bytes, alt: str) -> str:
    """Markdown showing the PNG inline (a data: URI, as the Dagster UI renders it)."""
    return f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode('ascii')})"


def _png(figure: Figure) -> bytes:
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()
