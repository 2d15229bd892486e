"""The merge of router replicas' published measurements (serving.router.replicas): counters add
up to what one router would count of the same attempts, percentiles from merged buckets stay
within one bucket of the exact nearest-rank value, and a replica that vanished is told."""

from __future__ import annotations

import random

from serving.router.buckets import bucket_of
from serving.router.measurements import Measurements
from serving.router.replicas import STALE_AFTER_SECONDS, Chunk, Head, Snapshot, merge
from serving.router.windows import ErrorKind, Record

MODEL = "m"
BACKENDS = ("canary", "stable")
T0 = 1_000_000.0
SPAN_SECONDS = 60.0
ATTEMPTS = 3000


def _attempt(rng: random.Random) -> Record:
    error = rng.choice([None] * 12 + list(ErrorKind))
    ttft = None if error else rng.lognormvariate(-2.0, 1.0)
    status = 502 if error is ErrorKind.HTTP_5XX else (0 if error else rng.choice([200] * 9 + [429]))
    return Record(
        started_at=T0 + rng.uniform(0, SPAN_SECONDS), ttft_s=ttft,
        latency_s=(ttft or 0.0) + rng.lognormvariate(0.0, 1.5), status=status, error=error,
        retried=bool(error) and rng.random() < 0.5, is_retry=rng.random() < 0.05,
        client_disconnected=rng.random() < 0.02,
    )  # fmt: skip


def _record(measurements: Measurements, backend: str, record: Record) -> None:
    measurements.started(MODEL, backend)
    measurements.finished(MODEL, backend, record)


def _snapshot(measurements: Measurements, replica: str, *, final: bool = False,
              published_at: float | None = None) -> Snapshot:  # fmt: skip
    """Everything the replica publishes from its start: its head and every chunk it wrote."""
    published = measurements.publication(replica, final=final).encode()
    head = Head.model_validate_json(published.head)
    if published_at is not None:
        head.published_at = published_at
    chunks = [Chunk.model_validate_json(data) for data in published.chunks.values()]
    return Snapshot(head=head, chunks=chunks)


def _traffic(replicas: int) -> tuple[Measurements, list[Measurements]]:
    """The same attempts seen by one router, and split at random among `replicas`."""
    rng = random.Random(11)
    one = Measurements(retention_s=1e10)  # the attempts are dated in the past
    split = [Measurements(retention_s=1e10) for _ in range(replicas)]
    for _ in range(ATTEMPTS):
        backend, record = rng.choice(BACKENDS), _attempt(rng)
        _record(one, backend, record)
        _record(rng.choice(split), backend, record)
    for m in (one, *split):
        m.started_at = T0 - 1
    return one, split


def test_counters_add_up_to_what_one_router_counts() -> None:
    one, split = _traffic(replicas=3)
    since, until = T0 + 10, T0 + 40  # whole slices: the windows must agree to the attempt
    exact = one.stats(MODEL, since, until)
    snapshots = [_snapshot(m, f"r{i}", published_at=until + 1) for i, m in enumerate(split)]
    merged = merge(snapshots, MODEL, since, until)

    assert set(merged.backends) == set(BACKENDS)
    for name in BACKENDS:
        ours, theirs = merged.backends[name], exact.backends[name]
        assert theirs.requests > 500 and theirs.errors.total > 50
        ignored = {"ttft_s", "latency_s"}
        assert ours.model_dump(exclude=ignored) == theirs.model_dump(exclude=ignored)
        assert ours.ttft_s.count == theirs.ttft_s.count
        assert ours.latency_s.max == theirs.latency_s.max


def test_percentiles_from_merged_buckets_are_within_one_bucket_of_the_exact_ones() -> None:
    one, split = _traffic(replicas=2)
    since, until = T0, T0 + SPAN_SECONDS
    exact = one.stats(MODEL, since, until)
    merged = merge([_snapshot(m, f"r{i}", published_at=until) for i, m in enumerate(split)],
                   MODEL, since, until)  # fmt: skip
    for name in BACKENDS:
        for field in ("ttft_s", "latency_s"):
            ours = getattr(merged.backends[name], field)
            theirs = getattr(exact.backends[name], field)
            assert abs(ours.mean - theirs.mean) < 1e-9 * theirs.mean
            for p in ("p50", "p90", "p99"):
                estimate, value = getattr(ours, p), getattr(theirs, p)
                assert bucket_of(estimate) - bucket_of(value) in (0, 1), (name, field, p)
                assert abs(estimate - value) <= 0.05 * value, (name, field, p)


def test_a_window_counts_only_the_slices_it_overlaps() -> None:
    measurements = Measurements(retention_s=1e10)
    measurements.started_at = T0
    for second in range(10):
        _record(measurements, "stable", Record(T0 + second + 0.5, 0.01, 0.02, 200, None,
                                               False, False, False))  # fmt: skip
    snapshot = _snapshot(measurements, "r0", published_at=T0 + 20)
    merged = merge([snapshot], MODEL, T0 + 3.2, T0 + 6.9)
    assert merged.backends["stable"].requests == 4  # the slices of seconds 3, 4, 5 and 6


def test_in_flight_adds_up_over_the_replicas_still_publishing() -> None:
    replicas = [Measurements(), Measurements()]
    for m in replicas:
        m.started("m", "canary")
    now = replicas[0].started_at + 1
    snapshots = [_snapshot(m, f"r{i}", published_at=now) for i, m in enumerate(replicas)]
    assert merge(snapshots, MODEL, now - 1, now).backends["canary"].in_flight == 2
    snapshots[1].head.published_at = now - STALE_AFTER_SECONDS - 1  # it died: so did its count
    assert merge(snapshots, MODEL, now - 1, now).backends["canary"].in_flight == 1


def _replica(started_at: float, published_at: float, *, final: bool = False) -> Snapshot:
    head = Head(replica=f"r{started_at}", started_at=started_at, published_at=published_at,
                final=final, slice_seconds=1.0, chunk_slices=60, chunks=[], in_flight={})
    return Snapshot(head=head, chunks=[])


def test_a_replica_that_vanished_in_the_window_makes_it_incomplete() -> None:
    since, until = T0 + 100, T0 + 200
    alive = _replica(T0, until + 0.5)
    killed = _replica(T0, T0 + 150)
    merged = merge([alive, killed], MODEL, since, until)
    assert merged.measured_since == T0 + 150 + STALE_AFTER_SECONDS > since


def test_a_replica_gone_before_the_window_or_stopped_gracefully_loses_nothing() -> None:
    since, until = T0 + 100, T0 + 200
    alive = _replica(T0, until + 0.5)
    long_gone = _replica(T0, since - STALE_AFTER_SECONDS - 1)
    stopped = _replica(T0, T0 + 150, final=True)
    scaled_up = _replica(T0 + 120, until + 0.1)
    merged = merge([alive, long_gone, stopped, scaled_up], MODEL, since, until)
    assert merged.measured_since == T0 <= since


def test_replicas_that_all_started_after_the_window_did_missed_its_beginning() -> None:
    since, until = T0 + 100, T0 + 200
    restarted = [_replica(T0 + 130, until + 0.5), _replica(T0 + 131, until + 0.5)]
    assert merge(restarted, MODEL, since, until).measured_since == T0 + 130


def test_a_publication_carries_the_changed_chunks_and_names_those_too_old_to_keep() -> None:
    measurements = Measurements(retention_s=120)
    now = measurements.started_at

    def attempt(age: float) -> None:
        _record(measurements, "stable", Record(now - age, 0.01, 0.02, 200, None,
                                               False, False, False))  # fmt: skip

    attempt(100)
    first = measurements.publication("r0").encode()
    attempt(1)
    second = measurements.publication("r0").encode()
    assert len(first.chunks) == len(Head.model_validate_json(first.head).chunks) >= 1
    assert len(second.chunks) == 1 and not second.gone  # only the chunk that changed
    measurements.slices.retention_s = 30  # time passes: the first attempt's chunk is too old
    third = measurements.publication("r0").encode()
    head = Head.model_validate_json(third.head)
    assert not third.chunks and third.gone and not set(third.gone) & set(head.chunks)
