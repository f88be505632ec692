"""How the supervisor puts its workers' answers together (cmcd/daemon/merge.py)."""

from __future__ import annotations

import pytest
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import CollectorRegistry

from cmcd.daemon import merge


@pytest.mark.parametrize(
    ("values", "want"),
    [
        ([1, 2, 3], 6),
        ([0.5, 0.25], 0.75),
        ([{"a": 1, "b": 2}, {"a": 3, "c": 4}], {"a": 4, "b": 2, "c": 4}),
        ([{"d": {"x": 1}}, {"d": {"x": 2}}], {"d": {"x": 3}}),
        (["0.1.0", "0.1.0"], "0.1.0"),
        ([True, False], True),
        ([None, 3], None),
    ],
    ids=["ints", "floats", "dicts", "nested", "text", "flag", "none"],
)
def test_values_add_up_where_they_are_amounts(values: list[object], want: object) -> None:
    assert merge.add(values) == want


def test_status_adds_up_and_lists_each_worker() -> None:
    answers = [
        {"worker": 0, "pid": 10, "accepted": 3, "sessions": 1, "delivery": {"delivered": 2},
         "outcome_commit_ms": {"n": 2, "p50": 1.0, "p99": 4.0, "max": 5.0}},
        {"worker": 1, "pid": 11, "accepted": 4, "sessions": 0, "delivery": {"delivered": 5},
         "outcome_commit_ms": {"n": 3, "p50": 2.0, "p99": 3.0, "max": 9.0}},
    ]  # fmt: skip
    out = merge.status(answers)
    assert out["accepted"] == 7 and out["sessions"] == 1 and out["delivery"] == {"delivered": 7}
    assert out["outcome_commit_ms"] == {"n": 5, "p50": 2.0, "p99": 4.0, "max": 9.0}
    assert [(w["worker"], w["pid"], w["accepted"]) for w in out["workers"]] == [(0, 10, 3), (1, 11, 4)]


def test_a_listing_is_the_first_limit_of_the_shards_in_queue_id_order() -> None:
    pages = [
        {"items": [{"queue_id": "A1"}, {"queue_id": "A4"}], "next": "A4"},
        {"items": [{"queue_id": "A2"}, {"queue_id": "A3"}], "next": None},
    ]
    assert merge.list_page(pages, 3) == {"items": [{"queue_id": q} for q in ("A1", "A2", "A3")], "next": "A3"}
    last = [{"items": [{"queue_id": "A1"}], "next": None}, {"items": [{"queue_id": "A2"}], "next": None}]
    assert merge.list_page(last, 3) == {"items": [{"queue_id": "A1"}, {"queue_id": "A2"}], "next": None}
    assert merge.list_page([{"items": [], "next": None}] * 2, 5) == {"items": [], "next": None}


def test_a_summary_adds_states_totals_and_domains() -> None:
    one = {"states": {"queued": 2, "held": 0}, "buckets_min": [5, 10], "total": [2, 1, 1, 0],
           "domains": [{"domain": "a.test", "counts": [2, 1, 1, 0]}], "more_domains": 0}  # fmt: skip
    two = {"states": {"queued": 1, "held": 1}, "buckets_min": [5, 10], "total": [2, 0, 1, 1],
           "domains": [{"domain": "a.test", "counts": [1, 0, 1, 0]}, {"domain": "b.test", "counts": [1, 0, 0, 1]}],
           "more_domains": 3}  # fmt: skip
    out = merge.summary([one, two], top=1)
    assert out["states"] == {"queued": 3, "held": 1}
    assert out["total"] == [4, 1, 2, 1]
    assert out["domains"] == [{"domain": "a.test", "counts": [3, 1, 2, 0]}]
    assert out["more_domains"] == 1 + 3


def _text(*samples: tuple[str, str, dict[str, str], float]) -> str:
    from prometheus_client.metrics_core import Metric

    registry = CollectorRegistry()

    class One:
        def collect(self):  # type: ignore[no-untyped-def]
            for name, kind, labels, value in samples:
                m = Metric(name, "doc", kind)
                suffix = "_total" if kind == "counter" else ""
                m.add_sample(name + suffix, labels, value)
                yield m

    registry.register(One())  # type: ignore[arg-type]
    return generate_latest(registry).decode()


def test_metrics_add_up_by_name_and_labels_and_moments_take_the_largest() -> None:
    a = _text(
        ("cmcd_messages_accepted", "counter", {}, 3),
        ("cmcd_queue_recipients", "gauge", {"state": "queued"}, 5),
        ("cmcd_directory_version", "gauge", {}, 7),
    )
    b = _text(
        ("cmcd_messages_accepted", "counter", {}, 4),
        ("cmcd_queue_recipients", "gauge", {"state": "queued"}, 1),
        ("cmcd_queue_recipients", "gauge", {"state": "held"}, 2),
        ("cmcd_directory_version", "gauge", {}, 9),
    )
    got = {
        (s.name, tuple(sorted(s.labels.items()))): s.value for family in merge.metrics([a, b]) for s in family.samples
    }
    assert got[("cmcd_messages_accepted_total", ())] == 7
    assert got[("cmcd_queue_recipients", (("state", "queued"),))] == 6
    assert got[("cmcd_queue_recipients", (("state", "held"),))] == 2
    assert got[("cmcd_directory_version", ())] == 9


def test_queue_figures_of_shards_add_up_with_the_oldest_message_of_all() -> None:
    from cmcd.queue.manage import QueueFigures, add_figures

    one = QueueFigures(recipients={"queued": 2}, oldest_received=200.0, spool_bytes=10, outbox={"mail": 1})
    two = QueueFigures(recipients={"queued": 1, "held": 3}, oldest_received=100.0, spool_bytes=5)
    none = QueueFigures()
    got = add_figures([one, two, none])
    assert got == QueueFigures({"queued": 3, "held": 3}, 100.0, 15, {"mail": 1})
    assert add_figures([none]).oldest_received is None


def test_a_restarted_workers_counters_go_on_from_where_they_were() -> None:
    merger = merge.MetricsMerger()

    def accepted(texts: dict[int, str]) -> float:
        families = merger.merge(texts)
        return next(s.value for f in families for s in f.samples if s.name == "cmcd_messages_accepted_total")

    def count(n: float) -> str:
        return _text(("cmcd_messages_accepted", "counter", {}, n))

    assert accepted({0: count(10), 1: count(5)}) == 15
    assert accepted({0: count(12)}) == 17  # worker 1 missed the scrape: its last figure stands
    assert accepted({0: count(13), 1: count(2)}) == 13 + 5 + 2  # worker 1 restarted: it counts from 0 again
    assert accepted({0: count(14), 1: count(3)}) == 14 + 5 + 3


def test_a_reload_keeps_what_only_a_restart_changes() -> None:
    from cmcd.daemon.process import RESTART_ONLY, keep_restart_only, setting

    old = {"server": {"workers": 2, "hostname": "a.test"}, "admin": {"socket": "/run/a.sock"}}
    new = {"server": {"workers": 4, "hostname": "b.test"}, "admin": {}, "spool": {"dir": "/other"}}
    kept = keep_restart_only(old, new)
    assert kept["server"] == {"workers": 2, "hostname": "b.test"}
    assert kept["admin"] == {"socket": "/run/a.sock"}
    assert "dir" not in kept["spool"]  # not set at start: the default stays
    assert {"server.workers", "admin.socket", "spool.dir"} <= set(RESTART_ONLY)
    assert setting(kept, "server.hostname") == "b.test" and setting(kept, "nosuch.key") is None
    assert new["server"]["workers"] == 4, "the file as read is not changed"
