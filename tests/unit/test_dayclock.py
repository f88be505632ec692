"""DayClock names the quota day in the server's zone, including across midnight and DST changes."""

from __future__ import annotations

import datetime
from zoneinfo import ZoneInfo

import pytest

from cmcd.queue.spool import DayClock


def ts(zone: str, *fields: int) -> float:
    return datetime.datetime(*fields, tzinfo=ZoneInfo(zone)).timestamp()  # type: ignore[misc]


@pytest.mark.parametrize(
    ("zone", "instant", "day"),
    [
        ("UTC", (2026, 11, 26, 23, 59, 59), "2026-11-26"),
        ("UTC", (2026, 11, 27, 0, 0, 0), "2026-11-27"),
        ("Asia/Tokyo", (2026, 11, 27, 0, 0, 1), "2026-11-27"),
        ("America/New_York", (2026, 3, 8, 23, 59, 59), "2026-03-08"),  # the 23-hour day
        ("America/New_York", (2026, 3, 9, 0, 0, 0), "2026-03-09"),
        ("America/New_York", (2026, 11, 1, 23, 59, 59), "2026-11-01"),  # the 25-hour day
    ],
    ids=["utc-last-second", "utc-midnight", "tokyo", "dst-spring-last", "dst-spring-next", "dst-fall-last"],
)
def test_day_in_zone(zone: str, instant: tuple[int, ...], day: str) -> None:
    assert DayClock(ZoneInfo(zone)).day(ts(zone, *instant)) == day


def test_cached_day_changes_exactly_at_local_midnight() -> None:
    clock = DayClock(ZoneInfo("Asia/Tokyo"))
    before = ts("Asia/Tokyo", 2026, 11, 26, 23, 59, 59)
    assert clock.day(before - 3600) == "2026-11-26"
    assert clock.day(before) == "2026-11-26"
    assert clock.day(before + 1) == "2026-11-27"
    assert clock.day(before - 7200) == "2026-11-26"  # going back in time is handled too
