"""What one router replica publishes about its traffic, so that the measurements of N replicas
behind one load balancer can be merged exactly (serving.router.replicas).

Attempts are counted in time slices of SLICE_SECONDS by the time they *started* (as a window's
records are), per kind of traffic, model and backend: a Tally of counters and fixed-bucket
histograms of TTFT and latency (serving.router.buckets) with their sums and maxima. Weighted
and header-pinned requests are counted apart (serving.router.pinning), and so are the shadow
copies sent to a canary (serving.router.shadow), by the time the copied request started: a
ShadowTally of counts, the slice's worst disagreements, and the copies' latency in the same
buckets. Everything in a slice adds up across replicas.

A replica publishes a small head every second (when it started, when it published, whether it
stopped, its requests in flight, which chunks it holds) and the chunks that changed: a chunk is
CHUNK_SLICES slices of every backend. So a publication is about the size of the current
minute's slices, not of the whole retention (a long request changes the chunk it started in
when it ends, and that chunk is published again); chunks older than the retention are deleted.
Slices are rendered to JSON on the event loop only when they changed; a publication's bytes are
joined off it (`Publication.encode`, in a worker thread).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

from serving.router.buckets import bucket_of
from serving.router.comparison import Comparison, ShadowTally
from serving.router.windows import Record, Tally

# The window resolution: a window starting inside a slice counts that whole slice.
SLICE_SECONDS = 1.0
# Slices per published chunk: a minute.
CHUNK_SLICES = 60


class Traffic(StrEnum):
    """What a series counts, named as its key in a published chunk (weighted requests keep
    the key they had before the other kinds were published)."""

    WEIGHTED = "models"
    PINNED = "pinned"
    SHADOW = "shadow"


# The head's key for each kind's in-flight counts, model -> backend -> count.
IN_FLIGHT_KEYS = {Traffic.WEIGHTED: "in_flight", Traffic.PINNED: "pinned_in_flight",
                  Traffic.SHADOW: "shadow_in_flight"}  # fmt: skip


class _Latency:
    """A fixed-bucket histogram with its sum and maximum, as published."""

    __slots__ = ("buckets", "max", "sum")

    def __init__(self) -> None:
        self.buckets: dict[int, int] = {}
        self.sum = self.max = 0.0

    def observe(self, seconds: float) -> None:
        bucket = bucket_of(seconds)
        self.buckets[bucket] = self.buckets.get(bucket, 0) + 1
        self.sum += seconds
        self.max = max(self.max, seconds)


class _Slice:
    """A slice of requests (weighted or pinned) of one backend."""

    __slots__ = ("latency", "rendered", "start", "tally", "ttft")

    def __init__(self, start: float) -> None:
        self.start = start
        self.tally = Tally()
        self.ttft = _Latency()
        self.latency = _Latency()
        self.rendered: str | None = None

    def count(self, record: Record) -> None:
        self.tally.count(record)
        self.rendered = None
        if record.error is not None:
            return  # as in a window: latency of failures mixes refusals with real work
        self.latency.observe(record.latency_s)
        if record.ttft_s is not None:
            self.ttft.observe(record.ttft_s)

    def render(self) -> str:
        if self.rendered is None:
            ttft, latency = self.ttft, self.latency
            self.rendered = json.dumps({
                "start": self.start, "tally": self.tally.values(),
                "ttft": ttft.buckets, "ttft_sum": ttft.sum, "ttft_max": ttft.max,
                "latency": latency.buckets, "latency_sum": latency.sum,
                "latency_max": latency.max,
            }, separators=(",", ":"))  # fmt: skip
        return self.rendered


class _ShadowSlice:
    """A slice of the shadow copies sent to one canary."""

    __slots__ = ("latency", "rendered", "start", "tally")

    def __init__(self, start: float) -> None:
        self.start = start
        self.tally = ShadowTally()
        self.latency = _Latency()
        self.rendered: str | None = None

    def count(self, comparison: Comparison | None, skipped: bool, latency_s: float | None) -> None:
        self.tally.note(comparison, skipped)
        self.rendered = None
        if latency_s is not None:
            self.latency.observe(latency_s)

    def render(self) -> str:
        if self.rendered is None:
            tally, latency = self.tally, self.latency
            self.rendered = json.dumps({
                "start": self.start, "tally": tally.values(),
                "length_ratio_sum": tally.length_ratio_sum,
                "worst": [c.model_dump(mode="json") for c in tally.worst],
                "latency": latency.buckets, "latency_sum": latency.sum,
                "latency_max": latency.max,
            }, separators=(",", ":"))  # fmt: skip
        return self.rendered


_Piece = _Slice | _ShadowSlice
# (traffic, model, backend): the series a slice belongs to
Series = tuple[Traffic, str, str]


class Slices:
    """The slices of one router's traffic, by chunk: its weighted and pinned requests and its
    shadow copies. Single event loop, no locks."""

    def __init__(self, retention_s: float, slice_seconds: float = SLICE_SECONDS) -> None:
        self.retention_s = retention_s
        self.slice_seconds = slice_seconds
        # chunk -> series -> slice index -> slice
        self._chunks: dict[int, dict[Series, dict[int, _Piece]]] = {}
        self._changed: set[int] = set()
        self._gone: set[int] = set()  # dropped here, still to delete where they were published

    def count(self, traffic: Traffic, model: str, backend: str, record: Record) -> None:
        piece = self._piece((traffic, model, backend), record.started_at, _Slice)
        assert isinstance(piece, _Slice)
        piece.count(record)

    def count_copy(self, model: str, canary: str, at: float, comparison: Comparison | None,
                   skipped: bool, latency_s: float | None) -> None:  # fmt: skip
        """A shadow copy of a request that started `at`: compared, failed or skipped."""
        piece = self._piece((Traffic.SHADOW, model, canary), at, _ShadowSlice)
        assert isinstance(piece, _ShadowSlice)
        piece.count(comparison, skipped, latency_s)

    def _piece(self, series: Series, at: float, kind: type[_Piece]) -> _Piece:
        index = math.floor(at / self.slice_seconds)
        chunk = index // CHUNK_SLICES
        slices = self._chunks.setdefault(chunk, {}).setdefault(series, {})
        piece = slices.get(index)
        if piece is None:
            piece = slices[index] = kind(index * self.slice_seconds)
        self._changed.add(chunk)
        return piece

    def publication(self, *, replica: str, started_at: float, now: float, final: bool,
                    in_flight: Mapping[Series, int]) -> Publication:  # fmt: skip
        """The head and the chunks changed since the last publication, chunks wholly older
        than the retention dropped (and named to delete). Only changed slices are rendered
        here. Until `unpublished` is called with it, it counts as published."""
        horizon = math.floor((now - self.retention_s) / self.slice_seconds)
        for chunk in [c for c in self._chunks if (c + 1) * CHUNK_SLICES <= horizon]:
            del self._chunks[chunk]
            self._gone.add(chunk)
        self._changed &= self._chunks.keys()
        changed = {chunk: [(*series, [s.render() for _, s in sorted(slices.items())])
                           for series, slices in sorted(self._chunks[chunk].items())]
                   for chunk in sorted(self._changed)}  # fmt: skip
        flying: dict[str, dict[str, dict[str, int]]] = {key: {} for key in IN_FLIGHT_KEYS.values()}
        for (traffic, model, backend), count in sorted(in_flight.items()):
            flying[IN_FLIGHT_KEYS[traffic]].setdefault(model, {})[backend] = count
        head = {"replica": replica, "started_at": started_at, "published_at": now,
                "final": final, "slice_seconds": self.slice_seconds,
                "chunk_slices": CHUNK_SLICES, "chunks": sorted(self._chunks), **flying}  # fmt: skip
        publication = Publication(replica, head, changed, sorted(self._gone))
        self._changed.clear()
        self._gone.clear()
        return publication

    def unpublished(self, publication: Publication) -> None:
        """A publication that did not reach the store: its chunks go with the next one."""
        self._changed |= publication.changed.keys() & self._chunks.keys()
        self._gone |= set(publication.gone)


@dataclass(frozen=True)
class Published:
    """What the platform's stats_publish stores: the chunks first, then the head that names
    them (a reader of the head finds chunks at least as new), and the chunks to delete."""

    replica: str
    head: bytes
    chunks: dict[int, bytes]
    gone: list[int]


@dataclass(frozen=True)
class Publication:
    replica: str
    head: dict[str, object]
    # chunk -> (traffic, model, backend, its slices' JSON)
    changed: dict[int, list[tuple[Traffic, str, str, list[str]]]]
    gone: list[int]

    def encode(self) -> Published:
        """serving.router.replicas.Head and .Chunk, as JSON: the slices already rendered are
        joined, not parsed again."""
        chunks = {}
        for chunk, series in self.changed.items():
            kinds: dict[str, dict[str, list[str]]] = {}
            for traffic, model, backend, rendered in series:
                backends = kinds.setdefault(traffic.value, {}).setdefault(model, [])
                backends.append(f'{json.dumps(backend)}:[{",".join(rendered)}]')
            chunks[chunk] = _object({json.dumps(kind): _object({json.dumps(model): _object(backends)
                                                    for model, backends in models.items()})
                                     for kind, models in kinds.items()}).encode()  # fmt: skip
        return Published(self.replica, json.dumps(self.head).encode(), chunks, self.gone)


def _object(members: Mapping[str, str] | list[str]) -> str:
    """A JSON object of members already rendered ("key":value), or of keys and values."""
    if isinstance(members, Mapping):
        members = [f"{key}:{value}" for key, value in members.items()]
    return f'{{{",".join(members)}}}'
