"""What the HTML reports (release/report.py, quality.py) share: the Jinja2 templates in
cicd_dagster/templates, autoescaped, so that a commit message, test name or finding can never
become markup; bar charts drawn as inline SVG; markdown rendered without raw HTML; and the
writing of one self-contained file (CSS inline, no script, nothing fetched).
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pandas as pd
from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape
from markdown_it import MarkdownIt
from markupsafe import Markup
from rich.filesize import decimal

# "commonmark" with html off: raw HTML in the text is shown as text, and markdown-it
# refuses javascript:, vbscript: and data: links.
_MARKDOWN = MarkdownIt("commonmark", {"html": False})


def markdown(text: str | None, top_heading: int = 1) -> Markup:
    """Markdown as HTML, its headings moved so that the biggest is <h{top_heading}> (a
    changelog's "## Features" must not outrank the report's own sections)."""
    tokens = _MARKDOWN.parse(text or "")
    levels = [int(token.tag[1]) for token in tokens if token.type == "heading_open"]
    shift = top_heading - min(levels, default=top_heading)
    for token in tokens:
        if token.type in ("heading_open", "heading_close"):
            token.tag = f"h{min(int(token.tag[1]) + shift, 6)}"
    # Safe to mark as markup: markdown-it escaped every character of the text.
    return Markup(_MARKDOWN.renderer.render(tokens, _MARKDOWN.options, {}))  # noqa: S704


def duration(seconds: object) -> str:
    """0.012 -> "12 ms", 1.234 -> "1.2 s", 754 -> "12 min 34 s"; "" for no value."""
    value = finite(seconds)
    if value is None:
        return ""
    if value < 1:
        return f"{value * 1000:.0f} ms"
    if value < 60:
        return f"{value:.1f} s" if value < 10 else f"{value:.0f} s"
    minutes, rest = divmod(round(value), 60)
    if minutes < 60:
        return f"{minutes} min {rest} s"
    return f"{minutes // 60} h {minutes % 60} min"


def percent(ratio: object) -> str:
    """0.987 -> "98.7 %"; "" for no value."""
    value = finite(ratio)
    return "" if value is None else f"{value * 100:.1f} %"


def number(count: object) -> str:
    """A count, "" for none (NaN from a NULL)."""
    value = finite(count)
    return "" if value is None else str(int(value))


def when(moment: object) -> str:
    """A timestamp as "2026-11-26 07:45 UTC" (naive ones taken as UTC); "" for none."""
    if not isinstance(moment, datetime) or moment is pd.NaT:
        return ""
    stamp = pd.Timestamp(moment)
    stamp = stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")
    return f"{stamp:%Y-%m-%d %H:%M} UTC"


def finite(value: object) -> float | None:
    """A finite number as a float (numpy's too); None for anything else, NaN included."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    result = float(value)
    return result if math.isfinite(result) else None


# The colour of a status, decision or severity (classes of base.html.j2).
_CSS_CLASSES = {
    "success": "ok",
    "deployed": "ok",
    "approved": "ok",
    "passed": "ok",
    "failed": "bad",
    "error": "bad",
    "refused": "bad",
    "critical": "bad",
    "high": "bad",
    "rolled_back": "warn",
    "medium": "warn",
    "low": "info",
}


def css_class(status: str) -> str:
    return _CSS_CLASSES.get(status, "muted")


_TEMPLATES = Environment(
    loader=PackageLoader("cicd_dagster", "templates"),
    autoescape=select_autoescape(["j2"], default=True),
    undefined=StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
_TEMPLATES.filters.update(
    markdown=markdown,
    duration=duration,
    percent=percent,
    when=when,
    number=number,
    size=lambda value: decimal(int(value)),
    short=lambda sha: sha[:12] if isinstance(sha, str) else "",
    css_class=css_class,
)


def render(template: str, context: Mapping[str, Any], output: Path) -> Path:
    """Render `template` into `output` (written whole, replacing any older report)."""
    html = _TEMPLATES.get_template(template).render(context)
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(f".{output.name}.{os.getpid()}.tmp")
    partial.write_text(html, encoding="utf-8")
    partial.replace(output)
    return output


# --- bar charts ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Segment:
    value: float
    css: str
    """The CSS class that colours it (see base.html.j2: ok, bad, warn, info, muted)."""
    title: str
    """The tooltip."""


@dataclass(frozen=True)
class Bar:
    label: str
    segments: Sequence[Segment]

    @property
    def total(self) -> float:
        return sum(segment.value for segment in self.segments)


@dataclass(frozen=True)
class Rect:
    x: float
    y: float
    width: float
    height: float
    css: str
    title: str


@dataclass(frozen=True)
class Label:
    x: float
    y: float
    text: str


@dataclass(frozen=True)
class Chart:
    """The geometry of a bar chart, for the bar_chart macro to draw."""

    title: str
    width: int
    height: int
    rects: list[Rect]
    labels: list[Label]
    axis_max: str


_PLOT_HEIGHT = 120
_LABEL_SPACE = 18
_MAX_LABELS = 12


def bar_chart(
    title: str, bars: Sequence[Bar], *, max_value: float | None = None, unit: str = ""
) -> Chart | None:
    """Stacked vertical bars, one per item of `bars` in order; None when there is nothing
    to draw. Labels are thinned out so that at most a dozen show."""
    if not bars:
        return None
    top = max_value if max_value is not None else max((bar.total for bar in bars), default=0)
    top = top or 1.0
    step = max(8.0, min(40.0, 640 / len(bars)))
    every = math.ceil(len(bars) / _MAX_LABELS)
    rects, labels = [], []
    for index, bar in enumerate(bars):
        x = index * step
        base = float(_PLOT_HEIGHT)
        for segment in bar.segments:
            height = _PLOT_HEIGHT * min(segment.value, top) / top
            base -= height
            if height > 0:
                rects.append(Rect(x + 1, base, step - 2, height, segment.css, segment.title))
        if index % every == 0:
            labels.append(Label(x + step / 2, _PLOT_HEIGHT + 13, bar.label))
    axis_max = f"{top:.3g}{unit}"
    return Chart(
        title, math.ceil(step * len(bars)), _PLOT_HEIGHT + _LABEL_SPACE, rects, labels, axis_max
    )
