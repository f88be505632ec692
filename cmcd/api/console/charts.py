"""Bar charts as inline SVG for the console's dashboard, built from counts and texts; no I/O.

A chart is a row of buckets (spans of time), each a group of bars, one bar per series (a mail-log
event) whose count is not zero, its height proportional to the count against a rounded top of the
y axis. Each bar has a <title> (the hover text: bucket, series, count); the chart is one image to
assistive technology (role="img", aria-label, <title> and <desc>), and the page puts the same
numbers in a table for everyone who does not see it.

Every text that goes in is escaped here and every number is formatted here, so the result is safe
to put in a page as it is (a markupsafe.Markup). Colours come from the style sheet's classes
(`.chart .bar-<series key>`), never from a style attribute: the console's CSP forbids inline styles.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from markupsafe import Markup, escape

#: a series key becomes part of a class name: nothing else may get into the attribute
_KEY = re.compile(r"[a-z][a-z0-9-]{0,31}")
#: the smallest height a bar with a count other than zero is drawn with (else a 1 beside a 10,000 vanishes)
MIN_BAR = 1.0


@dataclass(frozen=True)
class Series:
    """One kind of bar: KEY names its class (bar-KEY), LABEL is what people read."""

    key: str
    label: str


@dataclass(frozen=True)
class Bucket:
    """One group of bars: LABEL on the x axis ("" for none), TITLE the span in full (hover text),
    COUNTS one per series, in the chart's series order."""

    label: str
    title: str
    counts: tuple[int, ...]


@dataclass(frozen=True)
class Layout:
    """The drawing's size in SVG units (the style sheet scales it to the page) and its margins."""

    width: float = 960.0
    height: float = 300.0
    left: float = 56.0  # the y axis's labels
    right: float = 8.0
    top: float = 12.0
    bottom: float = 28.0  # the x axis's labels
    #: at most this many bucket labels on the x axis (every k-th bucket's)
    max_x_labels: int = 12
    #: about this many steps on the y axis
    y_steps: int = 4
    #: the share of a bucket's width its bars take (the rest is the gap between groups)
    group_share: float = 0.8
    #: the widest a bar gets (a few buckets would make slabs of them)
    max_bar: float = 28.0

    @property
    def plot_width(self) -> float:
        return self.width - self.left - self.right

    @property
    def plot_height(self) -> float:
        return self.height - self.top - self.bottom


def y_scale(largest: int, steps: int = 4) -> tuple[int, int]:
    """(the top of the y axis, its step): a step of 1, 2 or 5 times a power of ten, whole numbers
    only, and a top that is a multiple of it at or above LARGEST (at least one step: 1 for none)."""
    rough = max(1.0, largest / max(1, steps))
    power = 10 ** math.floor(math.log10(rough))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= rough)
    top = max(step, step * math.ceil(largest / step))
    return int(top), int(step)


def _num(value: float) -> str:
    """A coordinate: at most two decimals, no trailing zeros."""
    text = f"{value:.2f}".rstrip("0").rstrip(".")
    return "0" if text in ("", "-0") else text


def _text(value: str) -> str:
    return str(escape(value))


def bar_chart(
    buckets: Sequence[Bucket], series: Sequence[Series], *, label: str, desc: str, layout: Layout = Layout()
) -> Markup:
    """The SVG of BUCKETS' counts in SERIES as grouped bars; LABEL names the image (aria-label and
    <title>), DESC says what it shows (<desc>). Raises ValueError for a series key that is no
    class name or a bucket whose counts do not match SERIES."""
    for s in series:
        if not _KEY.fullmatch(s.key):
            raise ValueError(f"series key {s.key!r} is not a class name (a-z, 0-9, -)")
    for b in buckets:
        if len(b.counts) != len(series) or any(n < 0 for n in b.counts):
            raise ValueError(f"bucket {b.title!r}: {len(b.counts)} counts for {len(series)} series, none negative")
    lay = layout
    largest = max((n for b in buckets for n in b.counts), default=0)
    top, step = y_scale(largest, lay.y_steps)
    plot_w, plot_h = lay.plot_width, lay.plot_height
    base = lay.top + plot_h  # the y of a count of 0
    slot = plot_w / max(1, len(buckets))
    bar_w = min(lay.max_bar, slot * lay.group_share / max(1, len(series)))
    pad = (slot - bar_w * len(series)) / 2  # the group in the middle of its bucket
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" role="img" aria-label="{_text(label)}" '
        f'viewBox="0 0 {_num(lay.width)} {_num(lay.height)}" width="{_num(lay.width)}" height="{_num(lay.height)}">',
        f"<title>{_text(label)}</title>",
        f"<desc>{_text(desc)}</desc>",
        '<g class="grid">',
    ]
    for value in range(0, top + 1, step):
        y = base - value / top * plot_h
        out.append(f'<line x1="{_num(lay.left)}" x2="{_num(lay.left + plot_w)}" y1="{_num(y)}" y2="{_num(y)}"/>')
    out.append("</g>")
    out.append('<g class="axis y-axis">')
    for value in range(0, top + 1, step):
        y = base - value / top * plot_h
        out.append(f'<text x="{_num(lay.left - 6)}" y="{_num(y + 4)}" text-anchor="end">{value}</text>')
    out.append("</g>")
    out.append('<g class="bars">')
    for i, b in enumerate(buckets):
        for j, (s, n) in enumerate(zip(series, b.counts, strict=True)):
            if n == 0:
                continue
            h = max(MIN_BAR, n / top * plot_h)
            x = lay.left + i * slot + pad + j * bar_w
            out.append(
                f'<rect class="bar bar-{s.key}" x="{_num(x)}" y="{_num(base - h)}" width="{_num(bar_w)}" '
                f'height="{_num(h)}"><title>{_text(b.title)} · {_text(s.label)}: {n}</title></rect>'
            )
    out.append("</g>")
    out.append('<g class="axis x-axis">')
    out.append(f'<line x1="{_num(lay.left)}" x2="{_num(lay.left + plot_w)}" y1="{_num(base)}" y2="{_num(base)}"/>')
    every = max(1, math.ceil(len(buckets) / max(1, lay.max_x_labels)))
    for i, b in enumerate(buckets):
        if i % every or not b.label:
            continue
        x = lay.left + i * slot + slot / 2
        out.append(f'<text x="{_num(x)}" y="{_num(base + 18)}" text-anchor="middle">{_text(b.label)}</text>')
    out.append("</g>")
    out.append("</svg>")
    return Markup("\n".join(out))
