"""Open-loop chat traffic for the benches: one request every 1/rate seconds whatever the answers
take, each timed from its scheduled moment (a slow server cannot slow the load down and hide
its own queue), and each answer labelled with the release that gave it (x-rollout-backend).

dev/load.py is closed loop (it follows what the engines can serve), which is right for a demo
and wrong for measuring latency under a fixed load.
"""

from __future__ import annotations

import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx

REQUEST_TIMEOUT_SECONDS = 120.0
# Requests in flight at once; past it, requests wait in the client and their wait counts.
MAX_IN_FLIGHT = 64
BACKEND_HEADER = "x-rollout-backend"


@dataclass(frozen=True)
class Answer:
    scheduled: float  # unix time the request was due
    seconds: float  # from `scheduled` to the whole answer
    status: int  # 0: no response at all
    backend: str | None


class OpenLoop:
    """Sends chats to `router_url` at `rate` per second between `start()` and `stop()`."""

    def __init__(self, router_url: str, model: str, rate: float, max_tokens: int = 8) -> None:
        self.url = f"{router_url}/v1/chat/completions"
        self.body = {"model": model, "max_tokens": max_tokens,
                     "messages": [{"role": "user", "content": "say hello world"}]}  # fmt: skip
        self.interval = 1.0 / rate
        self.answers: list[Answer] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(MAX_IN_FLIGHT, thread_name_prefix="openloop")
        self._http = httpx.Client(timeout=REQUEST_TIMEOUT_SECONDS, trust_env=False,
                                  limits=httpx.Limits(max_connections=MAX_IN_FLIGHT))  # fmt: skip
        self._clock = threading.Thread(target=self._schedule, daemon=True)

    def __enter__(self) -> OpenLoop:
        self._clock.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._clock.join()
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._http.close()

    def since(self, started: float, until: float = float("inf")) -> list[Answer]:
        with self._lock:
            return [a for a in self.answers if started <= a.scheduled < until]

    def first_from(self, backend: str, after: float) -> Answer | None:
        """The earliest-scheduled answer `backend` gave to a request due after `after`."""
        given = [a for a in self.since(after) if a.backend == backend and a.status == 200]
        return min(given, key=lambda a: a.scheduled, default=None)

    def _schedule(self) -> None:
        due = time.time()
        while not self._stop.is_set():
            self._pool.submit(self._send, due)
            due += self.interval
            self._stop.wait(max(0.0, due - time.time()))

    def _send(self, scheduled: float) -> None:
        try:
            response = self._http.post(self.url, json=self.body)
            status, backend = response.status_code, response.headers.get(BACKEND_HEADER)
        except httpx.HTTPError:
            status, backend = 0, None
        answer = Answer(scheduled, time.time() - scheduled, status, backend)
        with self._lock:
            self.answers.append(answer)


def percentile(values: list[float], fraction: float) -> float:
    """The nearest-rank percentile (p99 of 20 values is the largest: no interpolation)."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * fraction // 1))
    return ordered[int(rank) - 1]


def p50_p99(values: list[float]) -> tuple[float, float]:
    return statistics.median(values), percentile(values, 0.99)
