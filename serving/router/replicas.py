"""One window of a model's traffic from what every router replica publishes
(serving.router.slices): counters add up, histograms add up bucket by bucket, and percentiles
are read from the merged buckets (within one 5% bucket of the exact nearest-rank value).

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

from collections.abc import Iterable

from pydantic import BaseModel, Field

from serving.router.buckets import nearest_rank
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
    in_flight: dict[str, dict[str, int]]  # model -> backend -> requests

    def stopped_unannounced(self, until: float) -> bool:
        return not self.final and self.published_at < until

    def chunks_between(self, since: float, until: float) -> list[int]:
        """The chunks holding slices that overlap [since, until]."""
        span = self.chunk_slices * self.slice_seconds
        return [c for c in self.chunks if c * span < until and (c + 1) * span > since]


class Chunk(BaseModel):
    models: dict[str, dict[str, list[SliceCounts]]]  # model -> backend -> slices


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


def merge(snapshots: Iterable[Snapshot], model: str, since: float, until: float) -> ModelStats:
    """The model's per-backend stats of attempts started in [since, until] (to the slice) on
    every replica; in-flight counts of the replicas still publishing."""
    relevant = [s for s in snapshots if _overlaps(s.head, since)]
    backends: dict[str, _Backend] = {}
    for snapshot in relevant:
        head = snapshot.head
        if not head.stopped_unannounced(until):
            for name, count in head.in_flight.get(model, {}).items():
                backends.setdefault(name, _Backend()).in_flight += count
        width = head.slice_seconds
        for chunk in snapshot.chunks:
            for name, slices in chunk.models.get(model, {}).items():
                backend = backends.setdefault(name, _Backend())
                for piece in slices:
                    if piece.start + width > since and piece.start < until:
                        backend.add(piece)
    stats = {name: b.tally.stats(name, b.in_flight, b.ttft.percentiles(), b.latency.percentiles())
             for name, b in sorted(backends.items())}  # fmt: skip
    heads = [snapshot.head for snapshot in relevant]
    return ModelStats(model=model, since=since, until=until,
                      measured_since=measured_since(heads, until), backends=stats)


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
