"""The shapes of a measurement window, shared by one router's records (measurements.py) and
the merge of every replica's published slices (replicas.py): what GET /admin/stats answers and
what the orchestrator's gates read."""

from __future__ import annotations

import math
from enum import StrEnum
from typing import NamedTuple

from pydantic import BaseModel


class ErrorKind(StrEnum):
    """Why an attempt failed. Counted separately because they mean different things."""

    HTTP_5XX = "http_5xx"  # backend answered with a 5xx status
    CONNECT = "connect"  # could not connect (refused, reset, connect timeout)
    TIMEOUT = "timeout"  # first-byte, idle or total deadline exceeded
    PROTOCOL = "protocol"  # backend closed before headers or mid-body


class Record(NamedTuple):
    """One attempt on one backend. Tuples keep the hot path cheap."""

    started_at: float  # unix time, for "since" queries
    ttft_s: float | None  # None if no body byte ever arrived
    latency_s: float
    status: int  # HTTP status returned (0 if none)
    error: ErrorKind | None
    retried: bool  # failed here, then retried on another backend (client did not see it)
    is_retry: bool  # this attempt is the retry of a failure elsewhere
    client_disconnected: bool


class Percentiles(BaseModel):
    count: int
    mean: float | None
    p50: float | None
    p90: float | None
    p99: float | None
    max: float | None


def percentiles(values: list[float]) -> Percentiles:
    """Nearest-rank percentiles: exact sample values, no interpolation surprises."""
    if not values:
        return Percentiles(count=0, mean=None, p50=None, p90=None, p99=None, max=None)
    ordered = sorted(values)
    n = len(ordered)

    def rank(p: int) -> float:
        return ordered[max(0, math.ceil(p / 100 * n) - 1)]

    return Percentiles(
        count=n,
        mean=sum(ordered) / n,
        p50=rank(50),
        p90=rank(90),
        p99=rank(99),
        max=ordered[-1],
    )


class ErrorCounts(BaseModel):
    total: int
    http_5xx: int
    connect: int
    timeout: int
    protocol: int
    # errors hidden from the client by a successful retry on another backend
    retried: int


class BackendStats(BaseModel):
    name: str
    requests: int
    successes: int
    errors: ErrorCounts
    error_rate: float
    client_errors: int  # errors the client actually received (not retried away)
    status_4xx: int
    retries_served: int  # requests this backend served as the retry of another's failure
    client_disconnects: int
    in_flight: int
    ttft_s: Percentiles
    latency_s: Percentiles


class ModelStats(BaseModel):
    model: str
    since: float
    until: float
    # When this router's measurements begin (it started then): a window starting earlier has
    # lost its first part with the router that measured it.
    measured_since: float
    backends: dict[str, BackendStats]


class Tally:
    """The counters of a set of attempts: one window of one router, or one time slice that
    replicas publish and the orchestrator adds up. Counters add, so tallies merge exactly."""

    FIELDS = ("requests", "successes", "http_5xx", "connect", "timeout", "protocol", "retried",
              "status_4xx", "retries_served", "client_disconnects")  # fmt: skip
    __slots__ = FIELDS

    def __init__(self, values: tuple[int, ...] | None = None) -> None:
        for name, value in zip(self.FIELDS, values or (0,) * len(self.FIELDS), strict=True):
            setattr(self, name, value)

    def count(self, record: Record) -> None:
        self.requests += 1
        if record.error is None:
            self.successes += 1
        else:
            setattr(self, record.error, getattr(self, record.error) + 1)
            self.retried += record.retried
        self.status_4xx += 400 <= record.status < 500
        self.retries_served += record.is_retry
        self.client_disconnects += record.client_disconnected

    def add(self, other: Tally) -> None:
        for name in self.FIELDS:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def values(self) -> tuple[int, ...]:
        return tuple(getattr(self, name) for name in self.FIELDS)

    def stats(self, name: str, in_flight: int, ttft: Percentiles,
              latency: Percentiles) -> BackendStats:  # fmt: skip
        errors = self.http_5xx + self.connect + self.timeout + self.protocol
        return BackendStats(
            name=name,
            requests=self.requests,
            successes=self.successes,
            errors=ErrorCounts(total=errors, http_5xx=self.http_5xx, connect=self.connect,
                               timeout=self.timeout, protocol=self.protocol,
                               retried=self.retried),
            error_rate=errors / self.requests if self.requests else 0.0,
            client_errors=errors - self.retried,
            status_4xx=self.status_4xx,
            retries_served=self.retries_served,
            client_disconnects=self.client_disconnects,
            in_flight=in_flight,
            ttft_s=ttft,
            latency_s=latency,
        )
