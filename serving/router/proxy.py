"""The data path: forward a request to its backend, retry once elsewhere, relay the answer.

* responses stream back chunk by chunk (SSE or not) through a lean keep-alive HTTP/1.1
  client (``serving.router.upstream``; with httpx the router spent ~9x the CPU per request);
* an attempt that fails before its first response byte is retried ONCE on another backend,
  so a dying canary costs clients nothing; never after bytes reached the client;
* every attempt is measured per backend (``serving.router.measurements``) for the
  orchestrator's promote/rollback gate.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import certifi

from serving.router.asgi import Receive, Scope, Send, send_error, send_now, send_unavailable
from serving.router.balancing import Target
from serving.router.config import RouterConfig
from serving.router.measurements import ErrorKind, Measurements, Record
from serving.router.pinning import PINNING_HEADERS
from serving.router.shadow import Tap
from serving.router.upstream import (
    PoolLimits,
    UpstreamClient,
    UpstreamConnectError,
    UpstreamError,
    UpstreamReadTimeout,
    UpstreamResponse,
)

logger = logging.getLogger("rollout.router")

# An idle upstream connection is dropped before the backend drops it: SGLang's server
# (SGLANG_TIMEOUT_KEEP_ALIVE) and uvicorn (the local engines) close one idle for 5 s, and a
# request written into a connection the backend is closing fails after it was sent.
KEEPALIVE_EXPIRY_S = 4.0
# Any 5xx before the first byte is retried once elsewhere: chat completions have no side
# effects, and a failing canary must cost clients nothing. 501 says the request itself is
# unsupported; another backend would answer the same.
NOT_RETRYABLE_5XX = frozenset({501})
RETRIED_HEADER = b"x-rollout-retried"
# Never forwarded between hops (RFC 9110 7.6.1) or recomputed by the next hop.
_HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te",
    b"trailer", b"transfer-encoding", b"upgrade", b"host", b"content-length",
})
# expect: uvicorn already answered the client's 100-continue; the body is read in full.
# The pinning headers carry the router's admin token: no backend may see it.
_REQUEST_DROP = _HOP_BY_HOP | PINNING_HEADERS | {b"authorization", b"expect"}
# content-length is kept on responses: the de-chunked body is relayed byte for byte.
_RESPONSE_DROP = (_HOP_BY_HOP - {b"content-length"}) | {b"server", b"date"}

# (model, failed backend) -> another backend of that model in the current table, if any
Reroute = Callable[[str, str], Target | None]


def open_client(config: RouterConfig) -> UpstreamClient:
    # No env proxy, no redirects. Waiting for a free connection slot is bounded by the
    # total deadline.
    limits = PoolLimits(
        max_connections=config.max_connections,
        max_keepalive=config.max_keepalive_connections,
        keepalive_expiry_s=KEEPALIVE_EXPIRY_S,
        connect_timeout_s=config.connect_timeout_s,
    )
    tls = ssl.create_default_context(cafile=certifi.where())
    return UpstreamClient(limits, config.first_byte_timeout_s, tls)


class UpstreamBrokenError(Exception):
    """A backend failed after bytes were sent to the client: abort the client connection."""


@dataclass(slots=True)
class _Progress:
    """Whether the client response has started: after that, no retry and no error page."""

    response_started: bool = False
    tap: Tap | None = None  # keeps the answer for a shadow copy (serving.router.shadow)


@dataclass(slots=True)
class _Relayed:
    """What the relay of one answer saw, kept when it fails midway."""

    t0: float
    ttft_s: float | None = None
    client_left: bool = False

    def first_byte(self) -> None:
        if self.ttft_s is None:
            self.ttft_s = time.perf_counter() - self.t0


@dataclass(slots=True)
class _Failure:
    """An attempt that failed before any byte reached the client (hence retryable)."""

    kind: ErrorKind
    status: int
    response: UpstreamResponse | None  # a 5xx we may still relay if no retry
    ttft_s: float | None


@dataclass(frozen=True, slots=True)
class _UpstreamRequest:
    method: str
    path_qs: str
    headers: list[tuple[bytes, bytes]]
    body: bytes

    @classmethod
    def from_scope(cls, scope: Scope, body: bytes) -> _UpstreamRequest:
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
        query: bytes = scope.get("query_string", b"")
        path_qs = raw_path.decode("latin-1") + ("?" + query.decode("latin-1") if query else "")
        headers = [(k, v) for k, v in scope["headers"] if k not in _REQUEST_DROP]
        return cls(scope["method"], path_qs, headers, body)


class Forwarder:
    """Sends client requests to backends over one upstream client and measures each attempt."""

    def __init__(self, client: UpstreamClient, measurements: Measurements,
                 total_timeout_s: float, reroute: Reroute) -> None:
        self.client = client
        self._measurements = measurements
        self._total_timeout_s = total_timeout_s
        self._reroute = reroute

    async def forward(self, model: str, target: Target, scope: Scope, body: bytes,
                      receive: Receive, send: Send, tap: Tap | None = None) -> None:
        request = _UpstreamRequest.from_scope(scope, body)
        progress = _Progress(tap=tap)
        try:
            async with asyncio.timeout(self._total_timeout_s):
                started, t0 = time.time(), time.perf_counter()
                failure = await self._attempt(target, request, model, started, t0, progress,
                                              receive, send, is_retry=False)
                if failure is not None:
                    await self._retry(model, target, failure, started, t0, request, progress,
                                      receive, send)
        except TimeoutError:
            if progress.response_started:
                raise UpstreamBrokenError("total request timeout mid-response") from None
            await send_error(send, 504, "total request timeout", "timeout")

    async def _retry(self, model: str, target: Target, failure: _Failure, started: float,
                     t0: float, request: _UpstreamRequest, progress: _Progress,
                     receive: Receive, send: Send) -> None:
        # Re-read the table: weights may have moved while the first attempt ran.
        alternative = self._reroute(model, target.name)
        self._record_failure(model, target.name, started, t0, failure, retried=bool(alternative))
        if alternative is None:
            await self._give_up(failure, target, progress, send)
            return
        if failure.response is not None:
            failure.response.close()
        logger.info("retrying %s request from %s on %s after %s", model, target.name,
                    alternative.name, failure.kind.value)
        started, t0 = time.time(), time.perf_counter()
        second = await self._attempt(alternative, request, model, started, t0, progress,
                                     receive, send, is_retry=True)
        if second is not None:
            self._record_failure(model, alternative.name, started, t0, second, retried=False,
                                 is_retry=True)
            await self._give_up(second, alternative, progress, send)

    async def _attempt(self, target: Target, request: _UpstreamRequest, model: str,
                       started: float, t0: float, progress: _Progress, receive: Receive,
                       send: Send, is_retry: bool) -> _Failure | None:
        """Send one attempt. Returns a _Failure if nothing reached the client, else None.

        The caller records failures (it alone knows whether a retry follows); successes and
        cancellations are recorded here so in_flight can never leak.
        """
        headers = request.headers
        if target.auth is not None:
            headers = [*headers, (b"authorization", target.auth)]
        self._measurements.started(model, target.name)
        try:
            response = await self.client.request(request.method, target.url, request.path_qs,
                                                 headers, request.body)
        except (UpstreamError, OSError) as exc:
            return _Failure(_classify(exc), 0, None, None)
        except BaseException:  # total deadline (cancellation) or shutdown
            self._record_failure(model, target.name, started, t0,
                                 _Failure(ErrorKind.TIMEOUT, 0, None, None), retried=False,
                                 is_retry=is_retry)
            raise
        if response.status >= 500 and response.status not in NOT_RETRYABLE_5XX:
            return _Failure(ErrorKind.HTTP_5XX, response.status, response, None)
        if not _is_event_stream(response):
            # A non-streamed answer is read whole before anything reaches the client, so a
            # backend dying mid-body is retried elsewhere instead of cutting the client off.
            try:
                await response.prefetch()
            except (UpstreamError, OSError) as exc:
                response.close()
                return _Failure(_classify(exc), 0, None, None)
        await self._relay(response, target, model, started, t0, progress, receive, send,
                          is_retry)
        return None

    async def _relay(self, response: UpstreamResponse, target: Target, model: str,
                     started: float, t0: float, progress: _Progress, receive: Receive,
                     send: Send, is_retry: bool) -> None:
        """Stream the backend response to the client and record the attempt."""
        status = response.status
        error: ErrorKind | None = ErrorKind.HTTP_5XX if status >= 500 else None
        relayed = _Relayed(t0)
        headers = [(k, v) for k, v in response.headers if k.lower() not in _RESPONSE_DROP]
        headers.append(target.backend_header)
        if is_retry:
            headers.append((RETRIED_HEADER, b"1"))
        broken: Exception | None = None
        tap = progress.tap
        try:
            progress.response_started = True
            await send({"type": "http.response.start", "status": status, "headers": headers})
            streamed = _is_event_stream(response)
            if streamed:
                await _pipe_stream(response, relayed, receive, send, tap)
            else:
                await _relay_body(response, relayed, send, tap)
            if tap is not None and not relayed.client_left:
                tap.finish(target.name, status, streamed=streamed)
        except (UpstreamError, OSError) as exc:
            error = _classify(exc)
            broken = exc
        except BaseException:  # cancelled by the total deadline or shutdown
            error = ErrorKind.TIMEOUT
            raise
        finally:
            response.close()
            self._measurements.finished(model, target.name, Record(
                started, relayed.ttft_s, time.perf_counter() - t0, status, error, False,
                is_retry, relayed.client_left,
            ))
        if broken is not None:
            raise UpstreamBrokenError(
                f"backend {target.name} failed mid-response ({error})"
            ) from None

    def _record_failure(self, model: str, backend: str, started: float, t0: float,
                        failure: _Failure, retried: bool, is_retry: bool = False) -> None:
        self._measurements.finished(model, backend, Record(
            started, failure.ttft_s, time.perf_counter() - t0, failure.status, failure.kind,
            retried, is_retry, False,
        ))

    async def _give_up(self, failure: _Failure, target: Target, progress: _Progress,
                       send: Send) -> None:
        """No retry possible: relay the backend's own 5xx if we have one, else synthesize."""
        if failure.response is not None:
            response = failure.response
            try:
                body = await response.read()
            except UpstreamError:
                body = b""
            finally:
                response.close()
            headers = [(k, v) for k, v in response.headers
                       if k.lower() not in _RESPONSE_DROP and k.lower() != b"content-length"]
            headers += [(b"content-length", str(len(body)).encode()), target.backend_header]
            progress.response_started = True
            await send({"type": "http.response.start", "status": failure.status,
                        "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        if failure.kind is ErrorKind.TIMEOUT:
            await send_error(send, 504, "backend timed out", "timeout")
        else:
            # Refused or dropped before an answer: the backend is down (its engine is being
            # restarted, most likely), and no other one could take the request.
            await send_unavailable(send, "backend unavailable")


async def _relay_body(response: UpstreamResponse, relayed: _Relayed, send: Send,
                      tap: Tap | None) -> None:  # fmt: skip
    """Relay a body that is not an event stream (and keep it for a shadow copy's tap)."""
    more = True
    while more and (chunk := await response.next_chunk()) is not None:
        relayed.first_byte()
        if tap is not None:
            tap.chunks.append(chunk)
        # a fully buffered body (the common non-streamed case) goes in one message
        more = not response.complete
        await send({"type": "http.response.body", "body": chunk, "more_body": more})
    if more:
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _pipe_stream(response: UpstreamResponse, relayed: _Relayed, receive: Receive,
                       send: Send, tap: Tap | None) -> None:
    """Relay an event stream token by token, straight from the backend socket's callbacks
    (no task switch per token). A stream may run for minutes: once the client left, the
    backend is no longer read.
    """

    def push(chunk: bytes) -> Awaitable[None] | None:
        relayed.first_byte()
        if tap is not None:
            tap.chunks.append(chunk)
        return send_now(send, {"type": "http.response.body", "body": chunk, "more_body": True})

    def client_left(_: asyncio.Task[None]) -> None:
        response.stop()

    watcher = asyncio.create_task(_wait_disconnect(receive))
    watcher.add_done_callback(client_left)
    try:
        await response.pipe(push)
    finally:
        watcher.remove_done_callback(client_left)
        watcher.cancel()
    relayed.client_left = watcher.done() and not watcher.cancelled()
    await send({"type": "http.response.body", "body": b"", "more_body": False})


def _is_event_stream(response: UpstreamResponse) -> bool:
    return (response.header(b"content-type") or b"").startswith(b"text/event-stream")


def _classify(exc: Exception) -> ErrorKind:
    if isinstance(exc, UpstreamConnectError):
        return ErrorKind.CONNECT
    if isinstance(exc, UpstreamReadTimeout | TimeoutError):
        return ErrorKind.TIMEOUT
    return ErrorKind.PROTOCOL


async def _wait_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
