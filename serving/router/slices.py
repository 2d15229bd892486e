"""What one router replica publishes about its traffic, so that the measurements of N replicas
behind one load balancer can be merged exactly (serving.router.replicas).

Attempts are counted in time slices of SLICE_SECONDS by the time they *started* (as a window's
records are), per model and backend: a Tally of counters and fixed-bucket histograms of TTFT
and latency (serving.router.buckets) with their sums and maxima. Everything in a slice adds
up across replicas.

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

from serving.router.buckets import bucket_of
from serving.router.windows import Record, Tally

# The window resolution: a window starting inside a slice counts that whole slice.
SLICE_SECONDS = 1.0
# Slices per published chunk: a minute.
CHUNK_SLICES = 60


class _Slice:
    __slots__ = ("latency", "latency_max", "latency_sum", "rendered", "start", "tally", "ttft",
                 "ttft_max", "ttft_sum")  # fmt: skip

    def __init__(self, start: float) -> None:
        self.start = start
        self.tally = Tally()
        self.ttft: dict[int, int] = {}
        self.ttft_sum = self.ttft_max = 0.0
        self.latency: dict[int, int] = {}
        self.latency_sum = self.latency_max = 0.0
        self.rendered: str | None = None

    def count(self, record: Record) -> None:
        self.tally.count(record)
        self.rendered = None
        if record.error is not None:
            return  # as in a window: latency of failures mixes refusals with real work
        bucket = bucket_of(record.latency_s)
        self.latency[bucket] = self.latency.get(bucket, 0) + 1
        self.latency_sum += record.latency_s
        self.latency_max = max(self.latency_max, record.latency_s)
        if record.ttft_s is not None:
            bucket = bucket_of(record.ttft_s)
            self.ttft[bucket] = self.ttft.get(bucket, 0) + 1
            self.ttft_sum += record.ttft_s
            self.ttft_max = max(self.ttft_max, record.ttft_s)

    def render(self) -> str:
        if self.rendered is None:
            self.rendered = json.dumps({
                "start": self.start, "tally": self.tally.values(),
                "ttft": self.ttft, "ttft_sum": self.ttft_sum, "ttft_max": self.ttft_max,
                "latency": self.latency, "latency_sum": self.latency_sum,
                "latency_max": self.latency_max,
            }, separators=(",", ":"))  # fmt: skip
        return self.rendered


class Slices:
    """The slices of one router's attempts, by chunk. Single event loop, no locks."""

    def __init__(self, retention_s: float, slice_seconds: float = SLICE_SECONDS) -> None:
        self.retention_s = retention_s
        self.slice_seconds = slice_seconds
        # chunk -> (model, backend) -> slice index -> slice
        self._chunks: dict[int, dict[tuple[str, str], dict[int, _Slice]]] = {}
        self._changed: set[int] = set()
        self._gone: set[int] = set()  # dropped here, still to delete where they were published

    def count(self, model: str, backend: str, record: Record) -> None:
        index = math.floor(record.started_at / self.slice_seconds)
        chunk = index // CHUNK_SLICES
        slices = self._chunks.setdefault(chunk, {}).setdefault((model, backend), {})
        piece = slices.get(index)
        if piece is None:
            piece = slices[index] = _Slice(index * self.slice_seconds)
        piece.count(record)
        self._changed.add(chunk)

    def publication(self, *, replica: str, started_at: float, now: float, final: bool,
                    in_flight: Mapping[tuple[str, str], int]) -> Publication:  # fmt: skip
        """The head and the chunks changed since the last publication, chunks wholly older
        than the retention dropped (and named to delete). Only changed slices are rendered
        here. Until `unpublished` is called with it, it counts as published."""
        horizon = math.floor((now - self.retention_s) / self.slice_seconds)
        for chunk in [c for c in self._chunks if (c + 1) * CHUNK_SLICES <= horizon]:
            del self._chunks[chunk]
            self._gone.add(chunk)
        self._changed &= self._chunks.keys()
        changed = {chunk: [(model, backend, [s.render() for _, s in sorted(slices.items())])
                           for (model, backend), slices in sorted(self._chunks[chunk].items())]
                   for chunk in sorted(self._changed)}  # fmt: skip
        flying: dict[str, dict[str, int]] = {}
        for (model, backend), count in sorted(in_flight.items()):
            flying.setdefault(model, {})[backend] = count
        head = {"replica": replica, "started_at": started_at, "published_at": now,
                "final": final, "slice_seconds": self.slice_seconds,
                "chunk_slices": CHUNK_SLICES, "chunks": sorted(self._chunks),
                "in_flight": flying}  # fmt: skip
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
    # chunk -> (model, backend, its slices' JSON)
    changed: dict[int, list[tuple[str, str, list[str]]]]
    gone: list[int]

    def encode(self) -> Published:
        """serving.router.replicas.Head and .Chunk, as JSON."""
        chunks = {}
        for chunk, series in self.changed.items():
            models: dict[str, list[str]] = {}
            for model, backend, rendered in series:
                models.setdefault(model, []).append(f'{json.dumps(backend)}:[{",".join(rendered)}]')
            body = ",".join(f'{json.dumps(m)}:{{{",".join(bs)}}}' for m, bs in models.items())
            chunks[chunk] = f'{{"models":{{{body}}}}}'.encode()
        return Published(self.replica, json.dumps(self.head).encode(), chunks, self.gone)
