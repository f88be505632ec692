"""How a supervisor puts its workers' answers together: status, queue listings and summaries, and
/metrics; pure functions of the answers, no I/O.

- Numbers add up (accepted, sessions, recipients by state, counters); a dict of numbers adds up key
  by key; anything else is the first worker's.
- A queue listing is ordered by queue id in every shard: the first LIMIT of the merged lists are
  the first LIMIT of the host.
- A metric family adds its samples up across workers by name and labels, except gauges that are a
  moment or a version, not an amount (MAX_GAUGES): those take the largest. What the supervisor
  counts itself (its own metrics listener: the workers hold that listener's door but never serve
  it) takes the place of the workers' samples of the same name and labels.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

#: gauges that are a time or a version: the host's value is the largest worker's
MAX_GAUGES = frozenset(
    {
        "cmcd_backup_last_success_timestamp_seconds",
        "cmcd_directory_version",
        "cmcd_queue_oldest_seconds",
        "cmcd_build_info",
    }
)


def add(values: Sequence[Any]) -> Any:
    """VALUES of one key in every worker's answer, put together."""
    first = values[0]
    if isinstance(first, bool) or first is None:
        return first
    if isinstance(first, int | float) and all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        return sum(values)
    if isinstance(first, dict) and all(isinstance(v, dict) for v in values):
        keys: dict[str, None] = {}
        for v in values:
            keys.update(dict.fromkeys(v))
        return {k: add([v[k] for v in values if k in v]) for k in keys}
    return first


def status(answers: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The host's status: every worker's added up, and each worker's own under "workers"."""
    merged = add(list(answers)) if answers else {}
    timings = [a["outcome_commit_ms"] for a in answers if isinstance(a.get("outcome_commit_ms"), dict)]
    if timings:  # percentiles do not add up: the slowest worker's (an upper bound for the host's)
        merged["outcome_commit_ms"] = {k: max(t.get(k, 0) for t in timings) for k in timings[0]} | {
            "n": sum(t.get("n", 0) for t in timings)
        }
    merged["workers"] = [
        {k: a.get(k) for k in ("worker", "pid", "uptime_s", "sessions", "accepted", "inflight")} for a in answers
    ]
    return dict(merged)


def list_page(pages: Sequence[dict[str, Any]], limit: int) -> dict[str, Any]:
    """queue.list's page for the host from each shard's page (each asked for LIMIT after one cursor)."""
    items = sorted((i for p in pages for i in p.get("items", [])), key=lambda i: str(i.get("queue_id", "")))
    more = len(items) > limit or any(p.get("next") for p in pages)
    items = items[:limit]
    return {"items": items, "next": items[-1]["queue_id"] if more and items else None}


def summary(answers: Sequence[dict[str, Any]], top: int = 50) -> dict[str, Any]:
    """queue.summary for the host: states and totals added up; the domains each shard ranked among
    its TOP added up and ranked again (a domain outside every shard's TOP is only counted in
    more_domains, as at least the largest shard's count of such domains)."""
    if not answers:
        return {}
    first = answers[0]
    domains: dict[str, list[int]] = {}
    sites: dict[str, str] = {}  # where a domain's mail goes, as the first worker that knows says
    for a in answers:
        for d in a.get("domains", []):
            counts = domains.setdefault(d["domain"], [0] * len(d["counts"]))
            for i, n in enumerate(d["counts"]):
                counts[i] += n
            if d.get("site") and not sites.get(d["domain"]):
                sites[d["domain"]] = d["site"]
    ranked = sorted(domains.items(), key=lambda kv: (-kv[1][0], kv[0]))
    out = {
        "states": add([a["states"] for a in answers]),
        "buckets_min": first["buckets_min"],
        "total": [sum(col) for col in zip(*(a["total"] for a in answers), strict=True)],
        "domains": [{"domain": d, "counts": c} | ({"site": sites[d]} if d in sites else {}) for d, c in ranked[:top]],
        "more_domains": max(0, len(ranked) - top) + max(int(a.get("more_domains", 0)) for a in answers),
    }
    if any("sites" in a for a in answers):  # shaped sites are each worker's own: listed side by side
        out["sites"] = [s for a in answers for s in a.get("sites", [])]
    return out


def side_by_side(answers: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """A verb whose state is each worker's own (shaping.status): every worker's entries, in worker order."""
    workers = [w for a in answers for w in a.get("workers", [])]
    return {"workers": sorted(workers, key=lambda w: (w.get("worker") is None, w.get("worker") or 0))}


def metrics(texts: Iterable[str], own: Iterable[Metric] = ()) -> list[Metric]:
    """Metric families for the host from each worker's text exposition, with OWN (the supervisor's
    families) in place of the workers' samples of the same name and labels."""
    return MetricsMerger().merge(dict(enumerate(texts)), own)


_MONOTONIC = frozenset({"counter", "histogram", "summary"})
_Key = tuple[str, tuple[tuple[str, str], ...]]


class MetricsMerger:
    """The host's metrics from every scrape of the workers: a worker that missed a scrape
    (restarting, slow) counts with its last figures, and a counter of a worker that restarted (its
    value fell) goes on from where it was, so a host total never goes down (Prometheus would read
    that as a reset of the whole host's counter)."""

    def __init__(self) -> None:
        self._last: dict[int, str] = {}  # worker -> its last text
        self._raw: dict[int, dict[_Key, float]] = {}  # worker -> counter samples as it last said them
        self._offset: dict[int, dict[_Key, float]] = {}  # worker -> what its earlier processes counted

    def merge(self, texts: dict[int, str], own: Iterable[Metric] = ()) -> list[Metric]:
        self._last.update(texts)
        families: dict[str, Metric] = {}
        values: dict[str, dict[_Key, float]] = {}
        for worker, text in sorted(self._last.items()):
            raw, offset = self._raw.setdefault(worker, {}), self._offset.setdefault(worker, {})
            for family in text_string_to_metric_families(text):
                families.setdefault(family.name, Metric(family.name, family.documentation, family.type))
                samples = values.setdefault(family.name, {})
                largest = family.type == "gauge" and family.name in MAX_GAUGES
                for s in family.samples:
                    key = (s.name, tuple(sorted(s.labels.items())))
                    value = s.value
                    if family.type in _MONOTONIC and not s.name.endswith("_created"):
                        before = raw.get(key)
                        if before is not None and value < before:  # a new process counts from 0
                            offset[key] = offset.get(key, 0.0) + before
                        raw[key] = value
                        value += offset.get(key, 0.0)
                    if key in samples:
                        samples[key] = max(samples[key], value) if largest else samples[key] + value
                    else:
                        samples[key] = value
        for family in own:
            families.setdefault(family.name, Metric(family.name, family.documentation, family.type))
            samples = values.setdefault(family.name, {})
            for s in family.samples:
                samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
        for name, family in families.items():
            family.samples = [Sample(n, dict(labels), v) for (n, labels), v in values[name].items()]
        return list(families.values())
