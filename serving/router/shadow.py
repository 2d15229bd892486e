"""Shadow traffic: copies of live chat requests sent to a canary, its answers compared with
stable's, then dropped.

A backend whose routing-table entry has `shadow` {percent, max_in_flight} receives a copy of
that share of its model's chat completions answered by another backend. The copy is sent once
the client has the whole answer (the answer is kept as it is relayed: a `Tap`), so it cannot
delay it; the only thing the two share is the router's event loop (bench/shadow.py measures
stable's latency with and without). The copy is never streamed, whatever the client asked: only
its answer matters. The client never sees it.

Costs are bounded: at most `max_in_flight` copies per canary at once; a copy over the cap is
skipped and counted. Copies are counted here, on their own: they never enter the canary's
client-facing measurements (serving.router.measurements), nor its error rate.
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
from serving.router.comparison import Answer, Comparison, ShadowStats, compare, summarise
from serving.router.table import RoutingTable
from serving.router.upstream import UpstreamClient, UpstreamError

logger = logging.getLogger("rollout.router")

# Bounds memory whatever the request rate; beyond it the oldest events go first.
MAX_EVENTS_PER_CANARY = 50_000
# Request fields that make an answer a stream: the copy asks for one whole answer instead.
STREAM_FIELDS = ("stream", "stream_options")


@dataclass(slots=True)
class Tap:
    """Stable's answer, kept as it is relayed to the client (serving.router.proxy)."""

    started_at: float = field(default_factory=time.time)
    chunks: list[bytes] = field(default_factory=list)
    backend: str | None = None  # who answered: None until an answer reached the client whole
    status: int = 0
    streamed: bool = False

    def finish(self, backend: str, status: int, streamed: bool) -> None:
        self.backend, self.status, self.streamed = backend, status, streamed


@dataclass(frozen=True, slots=True)
class _Shadow:
    target: Target
    percent: float
    max_in_flight: int


class _Event(NamedTuple):
    at: float
    comparison: Comparison | None  # None: an error or a skip
    skipped: bool


@dataclass
class _Series:
    events: deque[_Event] = field(default_factory=lambda: deque(maxlen=MAX_EVENTS_PER_CANARY))
    in_flight: int = 0


class Shadower:
    """Decides which requests are copied, sends the copies, keeps their comparisons."""

    def __init__(self, upstream: Callable[[], Awaitable[UpstreamClient]], secrets: list[str],
                 retention_s: float, timeout_s: float) -> None:  # fmt: skip
        self._upstream = upstream
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
                if backend.shadow is None:
                    continue
                target = next(t for t in routes[model].targets if t.name == backend.name)
                shadows[model] = _Shadow(target, backend.shadow.percent,
                                         backend.shadow.max_in_flight)  # fmt: skip
        keys = (b.resolved_api_key() for bs in table.models.values() for b in bs)
        self._mask = _masker([*self._secrets, *(key for key in keys if key)])
        self._shadows = shadows

    def tap(self, model: str, scope: Scope, target: Target) -> Tap | None:
        """A Tap when this request is to be copied: a chat completion of a model with a shadow,
        sent to another backend, within the shadow's share. The share is spread evenly
        (request 100/P, 200/P, ...), not drawn, so a short window gets its share."""
        shadow = self._shadows.get(model)
        if (shadow is None or shadow.target.name == target.name
                or scope["path"] != CHAT_PATH or scope["method"] != "POST"):  # fmt: skip
            return None
        seen = self._seen[model] = self._seen.get(model, 0) + 1
        if int(seen * shadow.percent / 100) == int((seen - 1) * shadow.percent / 100):
            return None
        return Tap()

    def copy(self, model: str, body: bytes, tap: Tap) -> None:
        """Send the copy of a tapped request whose answer the client now has whole."""
        shadow = self._shadows.get(model)
        if shadow is None or tap.status != 200 or tap.backend in (None, shadow.target.name):
            return  # the shadow ended, or there is no answer of stable's to compare with
        try:
            request = json.loads(body)
            stable = Answer.parse(b"".join(tap.chunks), tap.streamed)
        except ValueError:
            return
        series = self._get(model, shadow.target.name)
        if series.in_flight >= shadow.max_in_flight:
            self._add(series, _Event(tap.started_at, None, skipped=True))
            return
        series.in_flight += 1
        task = asyncio.create_task(self._send(series, shadow.target, request, stable, tap))
        self._copies.add(task)
        task.add_done_callback(self._copies.discard)

    async def _send(self, series: _Series, target: Target, request: dict[str, Any],
                    stable: Answer, tap: Tap) -> None:  # fmt: skip
        comparison: Comparison | None = None
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
                canary = Answer.parse(answer, streamed=False)
                comparison = compare(request, stable, canary, at=tap.started_at,
                                     mask=self._mask)  # fmt: skip
        except (UpstreamError, OSError, TimeoutError, ValueError) as exc:
            logger.info("shadow copy to %s failed: %s", target.name, type(exc).__name__)
        finally:
            series.in_flight -= 1
            self._add(series, _Event(tap.started_at, comparison, skipped=False))

    def stats(self, model: str, since: float, until: float) -> dict[str, ShadowStats]:
        """Per canary of the model, its copies of requests started in [since, until]."""
        out: dict[str, ShadowStats] = {}
        for (m, backend), series in self._series.items():
            if m == model:
                window = [e for e in series.events if since <= e.at <= until]
                out[backend] = _summary(window, series.in_flight)
        return out

    async def aclose(self) -> None:
        for task in list(self._copies):
            task.cancel()
        await asyncio.gather(*self._copies, return_exceptions=True)

    def _get(self, model: str, backend: str) -> _Series:
        return self._series.setdefault((model, backend), _Series())

    def _add(self, series: _Series, event: _Event) -> None:
        series.events.append(event)
        horizon = event.at - self._retention_s
        while series.events and series.events[0].at < horizon:
            series.events.popleft()


def _summary(events: Iterable[_Event], in_flight: int) -> ShadowStats:
    comparisons: list[Comparison] = []
    errors = skipped = 0
    for event in events:
        if event.comparison is not None:
            comparisons.append(event.comparison)
        elif event.skipped:
            skipped += 1
        else:
            errors += 1
    return summarise(comparisons, errors, skipped, in_flight)


def _masker(secrets: list[str]) -> Callable[[str], str]:
    """Known secrets (the router's tokens, the backends' keys) and credential-shaped strings."""
    redact = Redactor(secrets)
    return lambda text: mask_credentials(redact(text))
