"""Shadow traffic: copies of live chat requests sent to a canary, its answers compared with
stable's, then dropped.

A backend whose routing-table entry has `shadow` {percent, max_in_flight, send} receives a
copy of that share of its model's chat completions answered by another backend. Stable's answer
is kept as it is relayed to the client (a `Tap`); the copy is sent as `send` says:

    after      once the client has stable's whole answer, so it cannot delay it; only then
               is it known whether there is an answer to compare with
    parallel   with stable's request, before stable is asked: the canary answers while stable
               does, and the comparison waits for stable's answer to be whole

Either way the two share only the router's event loop (bench/shadow.py measures stable's latency
without copies and with each mode). The copy is never streamed, whatever the client asked: only
its answer matters. The client never sees it.

Costs are bounded: at most `max_in_flight` copies per canary at once, in either mode, counted
from the send to the canary's answer; a copy over the cap is skipped and counted. Copies are
counted here, on their own: they never enter the canary's client-facing measurements
(serving.router.measurements), nor its error rate. The copies' own latency is kept too. Each
copy is also counted into the router's published slices (serving.router.slices), for the merge
of every replica's copies.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from serving.core.redaction import Redactor, mask_credentials
from serving.router.asgi import JSON_CT, Scope
from serving.router.balancing import CHAT_PATH, ModelRoute, Target
from serving.router.comparison import Answer, Comparison, ShadowStats, ShadowTally, compare
from serving.router.slices import Series, Slices, Traffic
from serving.router.table import RoutingTable, ShadowSend
from serving.router.upstream import UpstreamClient, UpstreamError
from serving.router.windows import percentiles

logger = logging.getLogger("rollout.router")

# Bounds memory whatever the request rate; beyond it the oldest events go first.
MAX_EVENTS_PER_CANARY = 50_000
# Request fields that make an answer a stream: the copy asks for one whole answer instead.
STREAM_FIELDS = ("stream", "stream_options")


@dataclass(frozen=True, slots=True)
class _Shadow:
    target: Target
    percent: float
    max_in_flight: int
    send: ShadowSend


@dataclass(slots=True)
class Tap:
    """A request to be copied: stable's answer, kept as it is relayed to the client
    (serving.router.proxy), and the moment it is settled (whole, or never to be)."""

    model: str
    shadow: _Shadow
    body: bytes
    started_at: float = field(default_factory=time.time)
    chunks: list[bytes] = field(default_factory=list)
    backend: str | None = None  # who answered: None until an answer reached the client whole
    status: int = 0
    streamed: bool = False
    settled: asyncio.Event = field(default_factory=asyncio.Event)

    def finish(self, backend: str, status: int, streamed: bool) -> None:
        self.backend, self.status, self.streamed = backend, status, streamed

    def whole(self) -> bool:
        """Stable's answer reached the client whole (not the canary's, after a retry)."""
        return self.status == 200 and self.backend not in (None, self.shadow.target.name)

    def answer(self) -> Answer | None:
        """Stable's answer to compare with, if it has one."""
        if not self.whole():
            return None
        try:
            return Answer.parse(b"".join(self.chunks), self.streamed)
        except ValueError:
            return None


class _Event(NamedTuple):
    at: float
    comparison: Comparison | None  # None: an error or a skip
    skipped: bool
    latency_s: float | None = None  # a compared copy's, from its send to the canary's answer


@dataclass
class _Series:
    events: deque[_Event] = field(default_factory=lambda: deque(maxlen=MAX_EVENTS_PER_CANARY))
    in_flight: int = 0


class Shadower:
    """Decides which requests are copied, sends the copies, keeps their comparisons."""

    def __init__(self, upstream: Callable[[], Awaitable[UpstreamClient]], secrets: list[str],
                 retention_s: float, timeout_s: float, slices: Slices) -> None:  # fmt: skip
        self._upstream = upstream
        self._slices = slices
        self._secrets = secrets
        self._mask = _masker(secrets)
        self._retention_s = retention_s
        self._timeout_s = timeout_s
        self._shadows: dict[str, _Shadow] = {}
        self._seen: dict[str, int] = {}  # per model: requests that could have been copied
        self._series: dict[tuple[str, str], _Series] = {}
        self._copies: set[asyncio.Task[None]] = set()

    def install(self, table: RoutingTable, routes: Mapping[str, ModelRoute]) -> None:
        """The shadows of a new routing table (at most one canary per model)."""
        shadows: dict[str, _Shadow] = {}
        for model, backends in table.models.items():
            for backend in backends:
                if (copies := backend.shadow) is None:
                    continue
                target = next(t for t in routes[model].targets if t.name == backend.name)
                shadows[model] = _Shadow(target, copies.percent, copies.max_in_flight,
                                         copies.send)  # fmt: skip
        keys = (b.resolved_api_key() for bs in table.models.values() for b in bs)
        self._mask = _masker([*self._secrets, *(key for key in keys if key)])
        self._shadows = shadows

    def tap(self, model: str, scope: Scope, target: Target, body: bytes) -> Tap | None:
        """A Tap when this request is to be copied: a chat completion of a model with a shadow,
        sent to another backend, within the shadow's share. The share is spread evenly
        (request 100/P, 200/P, ...), not drawn, so a short window gets its share. A copy sent
        in parallel leaves now, before stable is asked."""
        shadow = self._shadows.get(model)
        if (shadow is None or shadow.target.name == target.name
                or scope["path"] != CHAT_PATH or scope["method"] != "POST"):  # fmt: skip
            return None
        seen = self._seen[model] = self._seen.get(model, 0) + 1
        if int(seen * shadow.percent / 100) == int((seen - 1) * shadow.percent / 100):
            return None
        tap = Tap(model, shadow, body)
        if shadow.send == "parallel":
            self._start(tap)
        return tap

    def settle(self, tap: Tap) -> None:
        """Stable's answer is whole, or will never be (called whatever became of the request).
        A copy in parallel now compares; a copy after the answer leaves now, if there is an
        answer to compare with and the shadow still runs."""
        tap.settled.set()
        current = self._shadows.get(tap.model)
        if (tap.shadow.send == "after" and tap.whole() and current is not None
                and current.target.name == tap.shadow.target.name):  # fmt: skip
            self._start(tap)

    def _start(self, tap: Tap) -> None:
        series = self._get(tap.model, tap.shadow.target.name)
        if series.in_flight >= tap.shadow.max_in_flight:
            self._add(tap, series, _Event(tap.started_at, None, skipped=True))
            return
        series.in_flight += 1
        task = asyncio.create_task(self._send(series, tap))
        self._copies.add(task)
        task.add_done_callback(self._copies.discard)

    async def _send(self, series: _Series, tap: Tap) -> None:
        """Ask the canary, then compare once stable's answer is settled. Only the canary's
        part counts as in flight: that is the cost the cap bounds."""
        request = _json_object(tap.body)
        sent = time.perf_counter()
        try:
            canary = None if request is None else await self._ask(tap.shadow.target, request)
        finally:
            series.in_flight -= 1
        if request is None:
            return  # not a chat request stable could answer: nothing to compare
        if canary is None:
            self._add(tap, series, _Event(tap.started_at, None, skipped=False))
            return
        latency_s = time.perf_counter() - sent
        await tap.settled.wait()
        stable = tap.answer()
        if stable is None:
            return  # stable's answer never came whole: the copy is dropped uncompared
        comparison = compare(request, stable, canary, at=tap.started_at, mask=self._mask)
        self._add(tap, series, _Event(tap.started_at, comparison, False, latency_s))

    async def _ask(self, target: Target, request: dict[str, Any]) -> Answer | None:
        """The canary's whole answer to the copy; None when the copy failed."""
        try:
            whole = {k: v for k, v in request.items() if k not in STREAM_FIELDS}
            headers = [JSON_CT] + ([(b"authorization", target.auth)] if target.auth else [])
            client = await self._upstream()
            async with asyncio.timeout(self._timeout_s):
                response = await client.request("POST", target.url, CHAT_PATH, headers,
                                                json.dumps(whole).encode())  # fmt: skip
                try:
                    answer = await response.read()
                finally:
                    response.close()
            if response.status == 200:
                return Answer.parse(answer, streamed=False)
        except (UpstreamError, OSError, TimeoutError, ValueError) as exc:
            logger.info("shadow copy to %s failed: %s", target.name, type(exc).__name__)
        return None

    def stats(self, model: str, since: float, until: float) -> dict[str, ShadowStats]:
        """Per canary of the model, its copies of requests started in [since, until]."""
        out: dict[str, ShadowStats] = {}
        for (m, backend), series in self._series.items():
            if m == model:
                window = [e for e in series.events if since <= e.at <= until]
                out[backend] = _summary(window, series.in_flight)
        return out

    def in_flight(self) -> dict[Series, int]:
        return {(Traffic.SHADOW, model, canary): series.in_flight
                for (model, canary), series in self._series.items()}  # fmt: skip

    async def aclose(self) -> None:
        for task in list(self._copies):
            task.cancel()
        await asyncio.gather(*self._copies, return_exceptions=True)

    def _get(self, model: str, backend: str) -> _Series:
        return self._series.setdefault((model, backend), _Series())

    def _add(self, tap: Tap, series: _Series, event: _Event) -> None:
        self._slices.count_copy(tap.model, tap.shadow.target.name, event.at, event.comparison,
                                event.skipped, event.latency_s)  # fmt: skip
        series.events.append(event)
        horizon = event.at - self._retention_s
        while series.events and series.events[0].at < horizon:
            series.events.popleft()


def _summary(events: Iterable[_Event], in_flight: int) -> ShadowStats:
    tally = ShadowTally()
    latencies: list[float] = []
    for event in events:
        tally.note(event.comparison, event.skipped)
        latencies += [event.latency_s] if event.latency_s is not None else []
    return tally.stats(in_flight, percentiles(latencies))


def _json_object(body: bytes) -> dict[str, Any] | None:
    try:
        parsed = json.loads(body)
    except ValueError:
        return None
    return parsed if isinstance(parsed, dict) else None


def _masker(secrets: list[str]) -> Callable[[str], str]:
    """Known secrets (the router's tokens, the backends' keys) and credential-shaped strings."""
    redact = Redactor(secrets)
    return lambda text: mask_credentials(redact(text))
