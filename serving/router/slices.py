"""What one router replica publishes about its traffic, so that the measurements of N replicas
behind one load balancer can be merged exactly (serving.router.replicas).

Attempts are counted in time slices of SLICE_SECONDS by the time they *started* (as a window's
records are), per model and backend: a Tally of counters and fixed-bucket histograms of TTFT
and latency (serving.router.buckets) with their sums and maxima. Everything in a slice adds
up across replicas. A snapshot holds every slice of the retention period, so any window in it
can be answered; a slice is rendered to JSON once and again only after it changed (a long
request changes the slice it started in when it ends), so publishing every second costs the
event loop little more than the slices that moved; the snapshot's bytes are joined off it.
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
    """The slices of one router's attempts. Single event loop, no locks."""

    def __init__(self, retention_s: float, slice_seconds: float = SLICE_SECONDS) -> None:
        self.retention_s = retention_s
        self.slice_seconds = slice_seconds
        self._series: dict[tuple[str, str], dict[int, _Slice]] = {}

    def count(self, model: str, backend: str, record: Record) -> None:
        slices = self._series.setdefault((model, backend), {})
        index = math.floor(record.started_at / self.slice_seconds)
        piece = slices.get(index)
        if piece is None:
            piece = slices[index] = _Slice(index * self.slice_seconds)
        piece.count(record)

    def snapshot(self, *, replica: str, started_at: float, now: float, final: bool,
                 in_flight: Mapping[tuple[str, str], int]) -> SnapshotParts:  # fmt: skip
        """What a snapshot is made of, slices older than the retention dropped first. Only
        the slices that changed are rendered here, on the event loop; the parts are joined
        into a snapshot's JSON elsewhere (`SnapshotParts.encode`, in a worker thread)."""
        horizon = math.floor((now - self.retention_s) / self.slice_seconds)
        series: list[tuple[str, str, int, list[str]]] = []
        for model, backend in sorted(self._series.keys() | in_flight.keys()):
            slices = self._series.get((model, backend), {})
            for index in [i for i in slices if i < horizon]:
                del slices[index]
            rendered = [slices[i].render() for i in sorted(slices)]
            series.append((model, backend, in_flight.get((model, backend), 0), rendered))
        head = {"replica": replica, "started_at": started_at, "published_at": now,
                "final": final, "slice_seconds": self.slice_seconds}  # fmt: skip
        return SnapshotParts(head, series)


@dataclass(frozen=True)
class SnapshotParts:
    head: dict[str, object]
    series: list[tuple[str, str, int, list[str]]]  # model, backend, in flight, slices' JSON

    def encode(self) -> bytes:
        """The JSON of serving.router.replicas.Snapshot."""
        models: dict[str, list[str]] = {}
        for model, backend, in_flight, rendered in self.series:
            models.setdefault(model, []).append(
                f'{json.dumps(backend)}:{{"in_flight":{in_flight},'
                f'"slices":[{",".join(rendered)}]}}'
            )
        body = ",".join(f'{json.dumps(m)}:{{{",".join(bs)}}}' for m, bs in models.items())
        return f'{json.dumps(self.head)[:-1]},"models":{{{body}}}}}'.encode()
