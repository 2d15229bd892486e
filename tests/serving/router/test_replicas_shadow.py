"""The merge of what router replicas publish beyond weighted requests (serving.router.replicas):
each canary's shadow copies add up to the summary one router makes of the same copies, its
worst disagreements are the worst of all of them, and header-pinned requests are merged apart
from weighted ones."""

from __future__ import annotations

import random

from serving.router.buckets import bucket_of
from serving.router.comparison import Answer, Comparison, ShadowStats, ShadowTally, compare
from serving.router.measurements import Measurements
from serving.router.replicas import Chunk, Head, Snapshot, merge, merge_shadow
from serving.router.slices import Slices, Traffic
from serving.router.windows import Record, percentiles

MODEL = "m"
CANARY = "canary"
T0 = 1_000_000.0
SPAN_SECONDS = 60.0
COPIES = 1500
WORDS = ("the", "cat", "sat", "on", "a", "mat", "today", ".")


class _Copy:
    """One shadow copy as a Shadower records it: compared, failed or skipped."""

    def __init__(self, rng: random.Random) -> None:
        self.at = T0 + rng.uniform(0, SPAN_SECONDS)
        fate = rng.random()
        self.skipped = fate < 0.05
        self.comparison: Comparison | None = None
        self.latency_s: float | None = None
        if fate >= 0.1:  # the rest failed
            self.comparison = _comparison(rng, self.at)
            self.latency_s = rng.lognormvariate(-1.0, 1.0)


def _comparison(rng: random.Random, at: float) -> Comparison:
    stable = " ".join(rng.choices(WORDS, k=rng.randint(1, 12)))
    canary = stable if rng.random() < 0.8 else " ".join(rng.choices(WORDS, k=rng.randint(1, 12)))
    tools = [("get_weather", '{"city": "Paris"}')] if rng.random() < 0.1 else []
    request: dict[str, object] = {"messages": [{"role": "user", "content": stable}]}
    if rng.random() < 0.7:
        request["temperature"] = 0
    if rng.random() < 0.1:
        request["response_format"] = {"type": "json_object"}
    finish = "length" if rng.random() < 0.05 else "stop"
    return compare(request, Answer(text=stable, tool_calls=tools, finish_reason="stop"),
                   Answer(text=canary, tool_calls=tools, finish_reason=finish), at=at,
                   mask=str)  # fmt: skip


def _one_router(copies: list[_Copy]) -> ShadowStats:
    """What a lone router's Shadower answers for these copies: exact latency percentiles."""
    tally = ShadowTally()
    for copy in copies:
        tally.note(copy.comparison, copy.skipped)
    latencies = [c.latency_s for c in copies if c.latency_s is not None]
    return tally.stats(in_flight=0, latency=percentiles(latencies))


def _snapshot(slices: Slices, replica: str, in_flight: int = 0) -> Snapshot:
    published = slices.publication(
        replica=replica, started_at=T0 - 1, now=T0 + SPAN_SECONDS + 1, final=False,
        in_flight={(Traffic.SHADOW, MODEL, CANARY): in_flight},
    ).encode()
    chunks = [Chunk.model_validate_json(data) for data in published.chunks.values()]
    return Snapshot(head=Head.model_validate_json(published.head), chunks=chunks)


def test_shadow_copies_of_replicas_merge_to_what_one_router_summarises() -> None:
    rng = random.Random(12)
    copies = [_Copy(rng) for _ in range(COPIES)]
    replicas = [Slices(retention_s=1e10) for _ in range(3)]
    for copy in copies:
        rng.choice(replicas).count_copy(MODEL, CANARY, copy.at, copy.comparison, copy.skipped,
                                        copy.latency_s)  # fmt: skip
    snapshots = [_snapshot(s, f"r{i}", in_flight=i) for i, s in enumerate(replicas)]
    merged = merge_shadow(snapshots, MODEL, T0, T0 + SPAN_SECONDS)[CANARY]
    alone = _one_router(copies)

    assert alone.deterministic > 500 and 0 < alone.agreement < 1  # type: ignore[operator]
    assert alone.errors > 0 and alone.skipped > 0 and alone.tool_calls and alone.json_requests
    exact = {"latency_s", "length_ratio_mean", "in_flight"}
    assert merged.model_dump(exclude=exact) == alone.model_dump(exclude=exact)
    assert len(merged.worst) == 3 and all(not c.agree for c in merged.worst)
    assert abs(merged.length_ratio_mean - alone.length_ratio_mean) < 1e-9  # type: ignore[operator]
    assert merged.in_flight == 0 + 1 + 2
    ours, theirs = merged.latency_s, alone.latency_s
    assert (ours.count, ours.max) == (theirs.count, theirs.max)
    for p in ("p50", "p90", "p99"):
        assert bucket_of(getattr(ours, p)) - bucket_of(getattr(theirs, p)) in (0, 1)


def test_a_window_of_copies_counts_only_the_slices_it_overlaps() -> None:
    slices = Slices(retention_s=1e10)
    rng = random.Random(3)
    for second in range(10):
        slices.count_copy(MODEL, CANARY, T0 + second + 0.5, _comparison(rng, T0 + second + 0.5),
                          False, 0.1)  # fmt: skip
    merged = merge_shadow([_snapshot(slices, "r0")], MODEL, T0 + 3.2, T0 + 6.9)
    assert merged[CANARY].compared == 4  # the slices of seconds 3, 4, 5 and 6


def test_pinned_requests_are_merged_apart_from_weighted_ones() -> None:
    weighted = [Measurements(retention_s=1e10) for _ in range(2)]
    pinned = [Measurements(retention_s=1e10, slices=w.slices, traffic=Traffic.PINNED)
              for w in weighted]  # fmt: skip
    for i, (w, p) in enumerate(zip(weighted, pinned, strict=True)):
        for second in range(5 + i):
            record = Record(T0 + second, 0.01, 0.02, 200, None, False, False, False)
            w.started(MODEL, "stable")
            w.finished(MODEL, "stable", record)
            p.started(MODEL, CANARY)
            p.finished(MODEL, CANARY, record)
        p.started(MODEL, CANARY)  # one pinned request still in flight on each
    snapshots = []
    for i, (w, p) in enumerate(zip(weighted, pinned, strict=True)):
        published = w.publication(f"r{i}", also=[p]).encode()
        snapshots.append(Snapshot(head=Head.model_validate_json(published.head),
                                  chunks=[Chunk.model_validate_json(c)
                                          for c in published.chunks.values()]))  # fmt: skip
    until = T0 + SPAN_SECONDS
    for s in snapshots:
        s.head.published_at = until
    by_weight = merge(snapshots, MODEL, T0, until).backends
    by_pin = merge(snapshots, MODEL, T0, until, Traffic.PINNED).backends
    assert set(by_weight) == {"stable"} and by_weight["stable"].requests == 11
    assert set(by_pin) == {CANARY} and by_pin[CANARY].requests == 11
    assert (by_pin[CANARY].in_flight, by_weight["stable"].in_flight) == (2, 0)
