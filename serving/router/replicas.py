"""One window of a model's traffic from what every router replica publishes
(serving.router.slices): counters add up, histograms add up bucket by bucket, and percentiles
are read from the merged buckets (within one 5% bucket of the exact nearest-rank value). So do
the pinned requests, apart, and each canary's shadow copies, whose worst disagreements are the
worst of the union of every slice's worst.

A window counts the slices that overlap it: its edges are as fine as a slice (1 s).

What a merge cannot see is told in `measured_since`, as a lone router's restart was: the
measurements of the window are complete only from then on.
- A replica that stopped publishing without a final head (killed, hung) lost what it had
  not published yet, and every request it had in flight, at some moment before its last
  publish + STALE_AFTER_SECONDS: a window it overlaps is complete only after that.
- When every replica started after the window did, nobody measured its beginning.
A replica that stopped gracefully published a final head and lost nothing; one that started
while others served (a scale-up) took nothing from them.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from pydantic import BaseModel, Field

from serving.router.buckets import nearest_rank
from serving.router.comparison import Comparison, ShadowStats, ShadowTally
from serving.router.slices import IN_FLIGHT_KEYS, Traffic
from serving.router.windows import ModelStats, Percentiles, Tally

# A replica publishes every second (RouterConfig.publish_interval_s); one whose head is older
# than the window's end by more than this is gone, not late.
STALE_AFTER_SECONDS = 3.0


class SliceCounts(BaseModel):
    start: float
    tally: tuple[int, ...] = Field(min_length=len(Tally.FIELDS), max_length=len(Tally.FIELDS))
    ttft: dict[int, int]
    ttft_sum: float
    ttft_max: float
    latency: dict[int, int]
    latency_sum: float
    latency_max: float


class ShadowSliceCounts(BaseModel):
    start: float
    tally: tuple[int, ...] = Field(min_length=len(ShadowTally.FIELDS),
                                   max_length=len(ShadowTally.FIELDS))  # fmt: skip
    length_ratio_sum: float
    worst: list[Comparison]
    latency: dict[int, int]
    latency_sum: float
    latency_max: float


class Head(BaseModel):
    """What a replica publishes every second (serving.router.slices)."""

    replica: str
    started_at: float
    published_at: float
    # Published as the replica stopped, after its last request: nothing of it is missing.
    final: bool
    slice_seconds: float
    chunk_slices: int
    chunks: list[int]
    # model -> backend -> requests (weighted, pinned) or copies (shadow)
    in_flight: dict[str, dict[str, int]]
    pinned_in_flight: dict[str, dict[str, int]] = Field(default_factory=dict)
    shadow_in_flight: dict[str, dict[str, int]] = Field(default_factory=dict)

    def stopped_unannounced(self, until: float) -> bool:
        return not self.final and self.published_at < until

    def chunks_between(self, since: float, until: float) -> list[int]:
        """The chunks holding slices that overlap [since, until]."""
        span = self.chunk_slices * self.slice_seconds
        return [c for c in self.chunks if c * span < until and (c + 1) * span > since]

    def live_in_flight(self, traffic: Traffic, model: str, until: float) -> dict[str, int]:
        """By backend, what this replica has in flight, unless it stopped unannounced."""
        if self.stopped_unannounced(until):
            return {}
        flying: dict[str, dict[str, int]] = getattr(self, IN_FLIGHT_KEYS[traffic])
        return flying.get(model, {})


class Chunk(BaseModel):
    """model -> backend -> slices, of each kind of traffic (serving.router.slices.Traffic)."""

    models: dict[str, dict[str, list[SliceCounts]]] = Field(default_factory=dict)  # weighted
    pinned: dict[str, dict[str, list[SliceCounts]]] = Field(default_factory=dict)
    shadow: dict[str, dict[str, list[ShadowSliceCounts]]] = Field(default_factory=dict)


class Snapshot(BaseModel):
    """A replica's head and the chunks of it a window needs."""

    head: Head
    chunks: list[Chunk]


class _Histogram:
    def __init__(self) -> None:
        self.counts: dict[int, int] = {}
        self.total = 0.0
        self.max = 0.0

    def add(self, counts: dict[int, int], total: float, maximum: float) -> None:
        for bucket, count in counts.items():
            self.counts[bucket] = self.counts.get(bucket, 0) + count
        self.total += total
        self.max = max(self.max, maximum)

    def percentiles(self) -> Percentiles:
        n = sum(self.counts.values())
        if n == 0:
            return Percentiles(count=0, mean=None, p50=None, p90=None, p99=None, max=None)
        p50, p90, p99 = (nearest_rank(self.counts, p, self.max) for p in (50, 90, 99))
        return Percentiles(count=n, mean=self.total / n, p50=p50, p90=p90, p99=p99, max=self.max)


class _Backend:
    def __init__(self) -> None:
        self.tally = Tally()
        self.ttft = _Histogram()
        self.latency = _Histogram()
        self.in_flight = 0

    def add(self, piece: SliceCounts) -> None:
        self.tally.add(Tally(piece.tally))
        self.ttft.add(piece.ttft, piece.ttft_sum, piece.ttft_max)
        self.latency.add(piece.latency, piece.latency_sum, piece.latency_max)


def merge(snapshots: Iterable[Snapshot], model: str, since: float, until: float,
          traffic: Traffic = Traffic.WEIGHTED) -> ModelStats:  # fmt: skip
    """The model's per-backend stats of attempts (weighted or pinned) started in [since, until]
    (to the slice) on every replica; in-flight counts of the replicas still publishing."""
    relevant = [s for s in snapshots if _overlaps(s.head, since)]
    backends: dict[str, _Backend] = {}
    for head in (snapshot.head for snapshot in relevant):
        for name, count in head.live_in_flight(traffic, model, until).items():
            backends.setdefault(name, _Backend()).in_flight += count
    for name, piece in _pieces(relevant, traffic, model, since, until):
        assert isinstance(piece, SliceCounts)
        backends.setdefault(name, _Backend()).add(piece)
    stats = {name: b.tally.stats(name, b.in_flight, b.ttft.percentiles(), b.latency.percentiles())
             for name, b in sorted(backends.items())}  # fmt: skip
    heads = [snapshot.head for snapshot in relevant]
    return ModelStats(model=model, since=since, until=until,
                      measured_since=measured_since(heads, until), backends=stats)


class _Canary:
    def __init__(self) -> None:
        self.tally = ShadowTally()
        self.latency = _Histogram()
        self.in_flight = 0

    def add(self, piece: ShadowSliceCounts) -> None:
        self.tally.add(ShadowTally(piece.tally, piece.length_ratio_sum, piece.worst))
        self.latency.add(piece.latency, piece.latency_sum, piece.latency_max)


def merge_shadow(snapshots: Iterable[Snapshot], model: str, since: float,
                 until: float) -> dict[str, ShadowStats]:  # fmt: skip
    """Per canary of the model, the shadow copies of requests started in [since, until] (to the
    slice) on every replica, and the copies in flight on the replicas still publishing."""
    relevant = [s for s in snapshots if _overlaps(s.head, since)]
    canaries: dict[str, _Canary] = {}
    for head in (snapshot.head for snapshot in relevant):
        for name, count in head.live_in_flight(Traffic.SHADOW, model, until).items():
            canaries.setdefault(name, _Canary()).in_flight += count
    for name, piece in _pieces(relevant, Traffic.SHADOW, model, since, until):
        assert isinstance(piece, ShadowSliceCounts)
        canaries.setdefault(name, _Canary()).add(piece)
    return {name: c.tally.stats(c.in_flight, c.latency.percentiles())
            for name, c in sorted(canaries.items())}  # fmt: skip


def _pieces(snapshots: list[Snapshot], traffic: Traffic, model: str, since: float,
            until: float) -> Iterator[tuple[str, SliceCounts | ShadowSliceCounts]]:  # fmt: skip
    """(backend, slice) of the slices of `traffic` overlapping [since, until]."""
    for snapshot in snapshots:
        width = snapshot.head.slice_seconds
        for chunk in snapshot.chunks:
            # a Traffic is named as its field of a chunk
            series: dict[str, list[SliceCounts]] | dict[str, list[ShadowSliceCounts]] = getattr(
                chunk, traffic.value).get(model, {})
            for name, slices in series.items():
                for piece in slices:
                    if piece.start + width > since and piece.start < until:
                        yield name, piece


def measured_since(relevant: list[Head], until: float) -> float:
    """From when the window's measurements are complete (see the module's docstring)."""
    if not relevant:
        return until  # no replica measured any of it
    complete_from = min(head.started_at for head in relevant)
    for head in relevant:
        if head.stopped_unannounced(until):
            gone_by = min(head.published_at + STALE_AFTER_SECONDS, until)
            complete_from = max(complete_from, gone_by)
    return complete_from


def _overlaps(head: Head, since: float) -> bool:
    """Whether the replica may have served during a window starting at `since`."""
    if head.final:
        return head.published_at >= since
    return head.published_at + STALE_AFTER_SECONDS >= since
