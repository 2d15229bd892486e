"""Per-backend request measurements for the canary router.

Three views of the same events:

* a sliding window of per-request records (bounded deque, pruned by age) from which
  the orchestrator's questions -- "error rate and TTFT p99 of the canary since the bake
  started" -- are computed on demand;
* cumulative counters and histogram buckets exported as Prometheus text, because
  Prometheus wants monotonic counters, not windows;
* time slices of counters and fixed buckets (``slices``), which this router publishes so that
  the windows of N replicas merge exactly (``replicas``).

Accounting choice for retries: an attempt that failed on backend A before any byte reached
the client and was retried on backend B is recorded as one *error* on A (flagged
``retried``, i.e. hidden from the client) and as one normal request on B (flagged
``retry``). Per-backend error rates therefore reflect the health of each release, which is
what the promotion gate needs, while ``client_errors`` counts only what clients saw.
"""

from __future__ import annotations

import bisect
import math
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.registry import Collector

from serving.router.slices import Publication, Series, Slices, Traffic
from serving.router.windows import (
    BackendStats,
    ErrorKind,
    ModelStats,
    Record,
    Tally,
    percentiles,
)

# Bounds memory even at high request rates: at 1000 req/s a 15 min window would need
# 900k records per backend; beyond this cap the oldest records go first.
MAX_RECORDS_PER_BACKEND = 200_000
DEFAULT_RETENTION_S = 15 * 60.0
# Latency buckets (seconds) spanning sub-ms proxying to multi-minute generations.
HISTOGRAM_BUCKETS_S: tuple[float, ...] = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
)


@dataclass
class _Histogram:
    counts: list[int] = field(default_factory=lambda: [0] * (len(HISTOGRAM_BUCKETS_S) + 1))
    total: float = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(HISTOGRAM_BUCKETS_S, value)] += 1
        self.total += value

    def cumulative(self) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        running = 0
        for bound, count in zip((*HISTOGRAM_BUCKETS_S, math.inf), self.counts, strict=True):
            running += count
            out.append(("+Inf" if bound == math.inf else repr(bound), running))
        return out


@dataclass
class _BackendSeries:
    records: deque[Record] = field(
        default_factory=lambda: deque(maxlen=MAX_RECORDS_PER_BACKEND)
    )
    in_flight: int = 0
    # cumulative, for Prometheus
    by_status: dict[int, int] = field(default_factory=dict)
    by_error: dict[str, int] = field(default_factory=dict)
    ttft: _Histogram = field(default_factory=_Histogram)
    latency: _Histogram = field(default_factory=_Histogram)


class InFlight(Protocol):
    def in_flight(self) -> dict[Series, int]:
        """What is in flight now, by series."""
        ...


class Measurements:
    """All per-(model, backend) measurements of one kind of a router's traffic. Single event
    loop, no locks. Its slices (serving.router.slices) may be shared with the router's other
    kinds of traffic, to be published together."""

    def __init__(self, retention_s: float = DEFAULT_RETENTION_S, *, slices: Slices | None = None,
                 traffic: Traffic = Traffic.WEIGHTED) -> None:  # fmt: skip
        self.retention_s = retention_s
        self.started_at = time.time()
        self.traffic = traffic
        self.slices = Slices(retention_s) if slices is None else slices
        self._series: dict[tuple[str, str], _BackendSeries] = {}
        self._retries_total: dict[str, int] = {}

    def _get(self, model: str, backend: str) -> _BackendSeries:
        key = (model, backend)
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = _BackendSeries()
        return series

    def started(self, model: str, backend: str) -> None:
        self._get(model, backend).in_flight += 1

    def finished(self, model: str, backend: str, record: Record) -> None:
        series = self._get(model, backend)
        series.in_flight -= 1
        series.records.append(record)
        series.by_status[record.status] = series.by_status.get(record.status, 0) + 1
        if record.error is not None:
            series.by_error[record.error] = series.by_error.get(record.error, 0) + 1
        if record.ttft_s is not None:
            series.ttft.observe(record.ttft_s)
        series.latency.observe(record.latency_s)
        self.slices.count(self.traffic, model, backend, record)
        if record.is_retry:
            self._retries_total[model] = self._retries_total.get(model, 0) + 1
        self._prune(series.records, record.started_at)

    def _prune(self, records: deque[Record], now: float) -> None:
        horizon = now - self.retention_s
        while records and records[0].started_at < horizon:
            records.popleft()

    def models(self) -> list[str]:
        return sorted({model for model, _ in self._series})

    def stats(self, model: str, since: float, until: float | None = None) -> ModelStats:
        """Per-backend stats of requests *started* in [since, until]."""
        until = time.time() if until is None else until
        backends: dict[str, BackendStats] = {}
        for (m, name), series in self._series.items():
            if m != model:
                continue
            window = [r for r in series.records if since <= r.started_at <= until]
            backends[name] = _backend_stats(name, window, series.in_flight)
        return ModelStats(model=model, since=since, until=until,
                          measured_since=self.started_at, backends=backends)

    def in_flight(self) -> dict[Series, int]:
        return {(self.traffic, model, backend): series.in_flight
                for (model, backend), series in self._series.items()}  # fmt: skip

    def publication(self, replica: str, *, final: bool = False,
                    also: Iterable[InFlight] = ()) -> Publication:  # fmt: skip
        """What this router publishes now for the merge of every replica's measurements
        (serving.router.slices): the slices, and the in-flight counts of these measurements
        and of the others (`also`) that count into the same slices."""
        in_flight = self.in_flight()
        for other in also:
            in_flight.update(other.in_flight())
        return self.slices.publication(
            replica=replica, started_at=self.started_at, now=time.time(), final=final,
            in_flight=in_flight,
        )

    def unpublished(self, publication: Publication) -> None:
        self.slices.unpublished(publication)

    def collector(self) -> Collector:
        return _PrometheusCollector(self)

    def _iter_series(self) -> Iterator[tuple[str, str, _BackendSeries]]:
        for (model, backend), series in list(self._series.items()):
            yield model, backend, series


def _backend_stats(name: str, window: Iterable[Record], in_flight: int) -> BackendStats:
    tally = Tally()
    ttfts: list[float] = []
    latencies: list[float] = []
    for r in window:
        tally.count(r)
        if r.error is None:
            # latency of failures would mix "fast refusal" with "real work"; keep them out
            latencies.append(r.latency_s)
            if r.ttft_s is not None:
                ttfts.append(r.ttft_s)
    return tally.stats(name, in_flight, percentiles(ttfts), percentiles(latencies))


class _PrometheusCollector(Collector):
    """Renders the cumulative counters at scrape time; the hot path only bumps ints."""

    def __init__(self, measurements: Measurements) -> None:
        self._m = measurements

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily | HistogramMetricFamily]:
        labels = ["model", "backend"]
        requests = CounterMetricFamily(
            "rollout_router_requests", "Attempts forwarded to a backend, by HTTP status "
            "(code 0: no response)", labels=[*labels, "code"],
        )
        errors = CounterMetricFamily(
            "rollout_router_errors", "Failed attempts by kind", labels=[*labels, "kind"]
        )
        in_flight = GaugeMetricFamily(
            "rollout_router_in_flight", "Attempts currently in flight", labels=labels
        )
        ttft = HistogramMetricFamily(
            "rollout_router_ttft_seconds", "Time to first response body byte", labels=labels
        )
        latency = HistogramMetricFamily(
            "rollout_router_request_duration_seconds", "End-to-end attempt latency",
            labels=labels,
        )
        retries = CounterMetricFamily(
            "rollout_router_retries", "Requests retried on another backend", labels=["model"]
        )
        for model, backend, s in self._m._iter_series():
            for code, count in sorted(s.by_status.items()):
                requests.add_metric([model, backend, str(code)], count)
            for kind in ErrorKind:
                errors.add_metric([model, backend, kind.value], s.by_error.get(kind, 0))
            in_flight.add_metric([model, backend], s.in_flight)
            ttft.add_metric([model, backend], s.ttft.cumulative(), s.ttft.total)
            latency.add_metric([model, backend], s.latency.cumulative(), s.latency.total)
        for model, count in sorted(self._m._retries_total.items()):
            retries.add_metric([model], count)
        yield from (requests, errors, in_flight, ttft, latency, retries)
