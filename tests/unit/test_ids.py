"""Queue ids: fixed length, alphabet only, unique, strictly increasing, sortable by time."""

from __future__ import annotations

import threading

import pytest

from cmcd.queue import ids

ALPHABET = set("0123456789BCDFGHJKLMNPQRSTVWXYZ")
LENGTH = 17


def test_alphabet_has_no_vowels_or_ambiguous_letters() -> None:
    assert set(ids._ALPHABET) == ALPHABET
    assert not set("AEIOU") & ALPHABET
    assert list(ids._ALPHABET) == sorted(ids._ALPHABET), "symbol order must match byte order so ids sort by time"


@pytest.mark.parametrize(
    "now_s",
    [None, 0.0, 1.0, 1_700_000_000.123456, 4_102_444_800.0],
    ids=["real-clock", "epoch", "one-second", "2023", "year-2100"],
)
def test_fixed_length_and_alphabet_only(now_s: float | None) -> None:
    gen = ids.QueueIdGenerator()
    for _ in range(100):
        qid = gen.next(now_s)
        assert len(qid) == LENGTH, qid
        assert set(qid) <= ALPHABET, qid


@pytest.mark.parametrize(
    "clock",
    [
        lambda i: None,
        lambda i: 1_700_000_000.0,
        lambda i: 1_700_000_000.0 + i * 1e-6,
        lambda i: 1_700_000_000.0 - i * 0.001,
        lambda i: 1_700_000_000.0 + (i % 7) * 0.5,
    ],
    ids=["real-clock", "frozen-clock", "microsecond-steps", "clock-going-backwards", "clock-jittering"],
)
def test_ten_thousand_ids_unique_and_strictly_increasing(clock) -> None:  # type: ignore[no-untyped-def]
    gen = ids.QueueIdGenerator()
    out = [gen.next(clock(i)) for i in range(10_000)]
    assert len(set(out)) == len(out)
    assert all(a < b for a, b in zip(out, out[1:])), "ids must be strictly increasing"


def test_unique_across_threads() -> None:
    gen = ids.QueueIdGenerator()
    results: list[list[str]] = [[] for _ in range(4)]

    def work(out: list[str]) -> None:
        for _ in range(2_500):
            out.append(gen.next(1_700_000_000.0))

    threads = [threading.Thread(target=work, args=(r,)) for r in results]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    every = [q for r in results for q in r]
    assert len(set(every)) == 10_000
    for r in results:
        assert r == sorted(r)


@pytest.mark.parametrize(
    "times",
    [
        [1.0, 2.0, 3.0],
        [1_700_000_000.0, 1_700_000_000.000001, 1_700_000_000.000002],
        [1_700_000_000.5, 1_700_000_001.0, 1_800_000_000.0],
        [999_999.999999, 1_000_000.0],
    ],
    ids=["seconds", "microseconds", "wide-range", "across-a-digit-carry"],
)
def test_ids_from_different_generators_sort_by_time(times: list[float]) -> None:
    # a fresh generator per id: each has its own random counter start, so only the time orders them
    got = [ids.QueueIdGenerator().next(t) for t in times]
    assert got == sorted(got)
    assert len(set(got)) == len(got)


def test_time_prefix_is_the_same_within_a_microsecond_and_differs_across() -> None:
    a, b = ids.QueueIdGenerator(), ids.QueueIdGenerator()
    t = 1_700_000_000.25
    assert a.next(t)[:11] == b.next(t)[:11]
    assert a.next(t)[:11] < b.next(t + 1e-5)[:11]


@pytest.mark.parametrize("shard", [0, 1, 2, 30, 31, ids.MAX_SHARDS - 1])
def test_an_id_names_its_shard(shard: int) -> None:
    gen = ids.QueueIdGenerator(shard)
    for now in (None, 1_700_000_000.0, 4_102_444_800.0):
        qid = gen.next(now)
        assert len(qid) == LENGTH and set(qid) <= ALPHABET
        assert ids.shard_of(qid) == shard


def test_ids_of_many_shards_sort_by_time_first() -> None:
    t = 1_700_000_000.0
    got = [ids.QueueIdGenerator(shard).next(t + i * 1e-6) for i, shard in enumerate([5, 0, 3, 1])]
    assert got == sorted(got)


def test_an_id_older_than_shards_belongs_to_shard_zero() -> None:
    # the old layout: 11 symbols of time, 6 of a counter started below half its range
    old = ids._encode(1_700_000_000_000_000, 11) + ids._encode(ids._BASE**6 // 2 - 1, 6)
    assert ids.shard_of(old) == 0


@pytest.mark.parametrize("text", ["", "X", "0" * 16, "0" * 18, "a" * 17, "A" * 17, "0000000000000000!"])
def test_text_that_is_no_queue_id_has_no_shard(text: str) -> None:
    assert ids.shard_of(text) is None


def test_a_shard_outside_the_id_space_is_refused() -> None:
    with pytest.raises(ValueError):
        ids.QueueIdGenerator(ids.MAX_SHARDS)
    with pytest.raises(ValueError):
        ids.QueueIdGenerator(-1)
