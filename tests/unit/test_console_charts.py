"""The dashboard's SVG bar charts (cmcd/api/console/charts.py) and its buckets' arithmetic: bars
laid out bucket by bucket, heights proportional to counts, nothing drawn for no data, every text
escaped, no style attribute; buckets aligned to local time as the store groups them. No I/O."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from cmcd.api.console.charts import MIN_BAR, Bucket, Layout, Series, bar_chart, y_scale
from cmcd.api.console.dashboard import Span, bucket_start

SVG = "{http://www.w3.org/2000/svg}"
SERIES = [Series("accepted", "Accepted"), Series("delivered", "Delivered"), Series("bounced", "Bounced")]


def _chart(counts: list[tuple[int, ...]], series: list[Series] = SERIES, **kw: object) -> ET.Element:
    buckets = [Bucket(f"{i:02d}:00", f"2026-12-01 {i:02d}:00", c) for i, c in enumerate(counts)]
    svg = str(bar_chart(buckets, series, label="Mail", desc="Bars per hour", **kw))  # type: ignore[arg-type]
    assert "style=" not in svg
    return ET.fromstring(svg)  # well-formed: it goes into the page as it is


def _bars(root: ET.Element) -> list[ET.Element]:
    return [r for r in root.iter(f"{SVG}rect") if "bar" in r.get("class", "").split()]


def _f(el: ET.Element, name: str) -> float:
    return float(el.get(name, "nan"))


@pytest.mark.parametrize(
    ("largest", "top", "step"),
    [
        (0, 1, 1),
        (1, 1, 1),
        (3, 3, 1),
        (4, 4, 1),
        (5, 6, 2),
        (7, 8, 2),
        (10, 10, 5),
        (99, 100, 50),
        (101, 150, 50),
        (10_000, 10_000, 5_000),
        (12_345, 15_000, 5_000),
    ],
    ids=["none", "one", "three", "four", "five", "seven", "ten", "99", "101", "10k", "12k"],
)
def test_y_axis_is_whole_round_steps_at_or_above_the_largest(largest: int, top: int, step: int) -> None:
    assert y_scale(largest, 4) == (top, step)


@pytest.mark.parametrize(
    ("counts", "bars"),
    [
        ([(1, 1, 1)], 3),
        ([(5, 0, 0), (0, 0, 0), (0, 2, 7)], 3),
        ([(0, 0, 0)] * 24, 0),
        ([], 0),
        ([(1, 0, 0)] * 750, 750),
    ],
    ids=["one-bucket-all-series", "zeros-drawn-as-nothing", "a-day-of-nothing", "no-buckets", "the-most-buckets"],
)
def test_one_bar_per_count_that_is_not_zero(counts: list[tuple[int, ...]], bars: int) -> None:
    root = _chart(counts)
    assert len(_bars(root)) == bars
    assert root.get("role") == "img" and root.get("aria-label") == "Mail"
    assert root.find(f"{SVG}title") is not None and root.find(f"{SVG}desc") is not None


def test_buckets_are_laid_out_left_to_right_within_the_plot() -> None:
    lay = Layout()
    counts = [(i + 1, i + 1, i + 1) for i in range(24)]
    bars = _bars(_chart(counts))
    assert len(bars) == 72
    slot = lay.plot_width / 24
    for n, bar in enumerate(bars):
        bucket, series = divmod(n, 3)
        x, w = _f(bar, "x"), _f(bar, "width")
        assert lay.left + bucket * slot <= x and x + w <= lay.left + (bucket + 1) * slot + 0.01  # inside its bucket
        assert bar.get("class") == f"bar bar-{SERIES[series].key}"
        assert _f(bar, "y") + _f(bar, "height") == pytest.approx(lay.top + lay.plot_height, abs=0.01)  # on the axis
    xs = [_f(b, "x") for b in bars]
    assert xs == sorted(xs)


def test_heights_are_proportional_to_counts() -> None:
    lay = Layout()
    bars = _bars(_chart([(10, 5, 0), (0, 0, 20)]))
    heights = {b.get("class"): _f(b, "height") for b in bars}
    top, _ = y_scale(20, lay.y_steps)
    assert heights["bar bar-bounced"] == pytest.approx(20 / top * lay.plot_height, abs=0.01)
    assert heights["bar bar-accepted"] == pytest.approx(2 * heights["bar bar-delivered"], abs=0.02)
    assert heights["bar bar-bounced"] == pytest.approx(2 * heights["bar bar-accepted"], abs=0.02)


def test_a_small_count_beside_a_large_one_stays_visible() -> None:
    bars = _bars(_chart([(10_000, 1, 0)]))
    assert min(_f(b, "height") for b in bars) == MIN_BAR


def test_zero_data_draws_axes_and_no_bars() -> None:
    root = _chart([(0, 0, 0)] * 7)
    assert _bars(root) == []
    labels = [t.text for t in root.iter(f"{SVG}text")]
    assert "0" in labels and "1" in labels  # a y axis from 0 to 1, no division by zero
    assert "00:00" in labels


def test_x_axis_labels_are_thinned_to_a_few() -> None:
    root = _chart([(1, 0, 0)] * 96, layout=Layout(max_x_labels=12))
    x_axis = next(g for g in root.iter(f"{SVG}g") if "x-axis" in g.get("class", ""))
    assert 1 < len(list(x_axis.iter(f"{SVG}text"))) <= 12


def test_every_bar_has_a_hover_title_naming_bucket_series_and_count() -> None:
    bars = _bars(_chart([(3, 0, 1)]))
    titles = [b.find(f"{SVG}title") for b in bars]
    assert [t.text for t in titles if t is not None] == [
        "2026-12-01 00:00 · Accepted: 3",
        "2026-12-01 00:00 · Bounced: 1",
    ]


def test_every_text_is_escaped() -> None:
    evil = '<script>alert("x")</script>'
    svg = str(
        bar_chart(
            [Bucket(evil, evil, (1,))], [Series("accepted", evil)], label=f'{evil}" onload="x', desc=f"{evil}&amp;"
        )
    )
    assert "<script>" not in svg and "style=" not in svg and 'onload="' not in svg
    assert "&lt;script&gt;" in svg and "&amp;amp;" in svg
    root = ET.fromstring(svg)
    assert root.get("aria-label") == f'{evil}" onload="x'  # what a reader hears: the text, not markup
    assert root.findtext(f"{SVG}desc") == f"{evil}&amp;"


@pytest.mark.parametrize(
    ("key", "counts"),
    [
        ('accepted" style="fill:red', (1,)),
        ("Accepted", (1,)),
        ("accepted", (1, 2)),
        ("accepted", (-1,)),
    ],
    ids=["key-breaks-out-of-class", "key-not-lower-case", "counts-not-one-per-series", "negative-count"],
)
def test_bad_input_is_refused(key: str, counts: tuple[int, ...]) -> None:
    with pytest.raises(ValueError):
        bar_chart([Bucket("a", "a", counts)], [Series(key, "x")], label="l", desc="d")


# -- the dashboard's buckets (cmcd/api/console/dashboard.py) --------------------------------------

H, D = 3600, 86400
T0 = 1_796_083_200  # 2026-12-01 00:00 UTC


@pytest.mark.parametrize(
    ("ts", "bucket_s", "offset_s", "start"),
    [
        (T0 + 5400, H, 0, T0 + 3600),
        (T0 + 5400, D, 0, T0),
        (T0 + 5400, D, 9 * H, T0 - 9 * H),  # Tokyo: 10:30 local, the day began 15:00 UTC the day before
        (T0 - 1, D, 9 * H, T0 - 9 * H),
        (T0 + 16 * H, D, 9 * H, T0 + 15 * H),  # 01:00 the next day in Tokyo
        (T0 + 5400, H, 5 * H + 1800, T0 + 5400),  # India: an hour starts at hh:30 UTC
        (T0 + 5399, H, 5 * H + 1800, T0 + 1800),
        (T0 + 5400, D, -5 * H, T0 - 19 * H),  # New York (winter): 20:30 the day before
    ],
    ids=["hour-utc", "day-utc", "day-tokyo", "day-tokyo-just-before", "day-tokyo-next", "hour-india",
         "hour-india-just-before", "day-new-york"],
)  # fmt: skip
def test_buckets_start_at_local_hours_and_midnights(ts: float, bucket_s: int, offset_s: int, start: int) -> None:
    assert bucket_start(ts, bucket_s, offset_s) == start
    # the store groups the same way: CAST((ts + offset) / bucket AS INTEGER) * bucket - offset
    assert int((ts + offset_s) / bucket_s) * bucket_s - offset_s == start


def test_a_span_lists_each_bucket_once_from_the_one_since_is_in() -> None:
    span = Span(T0 + 1800, T0 + 3 * H, H, 0)
    assert span.starts == [T0, T0 + H, T0 + 2 * H]
    week = Span(T0 - 6 * D, T0 + D, D, 0)
    assert len(week.starts) == 7 and week.starts[-1] == T0
