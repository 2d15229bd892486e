"""Lean HTTP/1.1 upstream client for the canary router.

Replaces httpx on the proxy hot path, where httpx/httpcore/h11/anyio cost most of the
router's CPU per request. One ``asyncio.Protocol`` per connection parses responses with
``httptools`` (the C parser uvicorn uses); each backend origin has a LIFO keep-alive pool.
A pooled connection closed by the backend is noticed by the event loop (``connection_lost``)
and never handed out, so there is no per-request liveness syscall.

Supported: content-length, chunked and read-until-close bodies, streaming with
backpressure (reading pauses while the consumer lags), TLS, a connect timeout, and a read
timeout bounding the wait for the response head and every gap between body chunks.
A body is read either by a task (``next_chunk``) or piped (``pipe``): each piece is handed
to a sink straight from the socket's read callback, so a token stream costs no task switch
per token.
Not supported (not needed in front of OpenAI-compatible engines): HTTP/2, proxies,
redirects, 1xx interim responses, request bodies streamed from the client.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

import httptools

# Pause reading a connection while this many body bytes wait for the consumer.
HIGH_WATER_BYTES = 256 * 1024

# Passes a body piece on: None when done, or an awaitable when the consumer must wait first.
Sink = Callable[[bytes], Awaitable[None] | None]


class UpstreamError(Exception):
    """Base of every failure of an upstream request."""


class UpstreamConnectError(UpstreamError):
    """Could not open a connection (refused, unreachable, TLS handshake failed)."""


class UpstreamConnectTimeout(UpstreamConnectError):
    """Opening the connection took longer than the connect timeout."""


class UpstreamReadTimeout(UpstreamError):
    """No response head, or no next body chunk, within the read timeout."""


class UpstreamProtocolError(UpstreamError):
    """The backend closed the connection early or sent an unparsable response."""


class _Connection(asyncio.Protocol):
    """One keep-alive connection; carries at most one request at a time."""

    __slots__ = (
        "_blocked",
        "_buffered",
        "_chunks",
        "_closed",
        "_complete",
        "_error",
        "_headers",
        "_headers_done",
        "_keep_alive",
        "_loop",
        "_parser",
        "_paused",
        "_sink",
        "_status",
        "_timeout",
        "_timer",
        "_transport",
        "_until_close",
        "_wait_due",
        "_waiter",
        "idle_since",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._waiter: asyncio.Future[None] | None = None
        self._timeout = 0.0
        self._wait_due = 0.0  # loop time at which the current wait times out
        self._timer: asyncio.TimerHandle | None = None
        self._sink: Sink | None = None  # set while a pipe waits
        self._blocked: Awaitable[None] | None = None  # what the sink must finish first
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._paused = False
        self._status = 0
        self._headers: list[tuple[bytes, bytes]] = []
        self._headers_done = False
        self._complete = False
        self._closed = False
        self._error: UpstreamError | None = None
        self._until_close = False  # body delimited by connection close
        self._keep_alive = False
        self.idle_since = 0.0

    # -- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(UpstreamProtocolError(f"invalid response: {exc}"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._stop_timer()
        if self._headers_done and self._until_close and not self._complete:
            self._complete = True
            self._wake()
        elif not self._complete:
            self._fail(UpstreamProtocolError("backend closed the connection"))

    # -- httptools callbacks --------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        self._status = self._parser.get_status_code()
        # asked now: llhttp forgets the answer once the message is complete
        self._keep_alive = self._parser.should_keep_alive()
        self._headers_done = True
        self._until_close = not any(
            k.lower() in (b"content-length", b"transfer-encoding") for k, _ in self._headers
        ) and self._status not in (204, 304)
        self._wake()

    def on_body(self, body: bytes) -> None:
        sink = self._sink
        if sink is not None:
            self._wait_due = self._loop.time() + self._timeout
            blocked = sink(body)
            if blocked is not None:  # the rest waits in the buffer, reading paused
                self._sink = None
                self._blocked = blocked
                self._pause_reading()
                self._wake()
            return
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > HIGH_WATER_BYTES:
            self._pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        self._complete = True
        self._wake()

    # -- used by UpstreamResponse / _OriginPool --------------------------------------------

    def _pause_reading(self) -> None:
        if not self._paused and self._transport is not None:
            self._paused = True
            self._transport.pause_reading()

    def _resume_reading(self) -> None:
        if self._paused and self._transport is not None:
            self._paused = False
            self._transport.resume_reading()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, error: UpstreamError) -> None:
        if self._error is None:
            self._error = error
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)

    @property
    def reusable(self) -> bool:
        return self._keep_alive and not self._closed and self._error is None

    def send(self, request: bytes) -> None:
        assert self._transport is not None
        self._status = 0
        self._headers = []
        self._headers_done = self._complete = self._until_close = self._keep_alive = False
        self._transport.write(request)

    async def wait(self, timeout: float) -> None:
        """Wait for the next parser event, or fail after ``timeout`` seconds.

        A stream waits once per token: rather than a timer per wait, one timer per
        connection checks, when it fires, how long the current wait has lasted.
        """
        if self._error is not None:
            raise self._error
        self._timeout = timeout
        self._wait_due = due = self._loop.time() + timeout
        timer = self._timer
        if timer is None or timer.when() > due:
            if timer is not None:
                timer.cancel()
            self._timer = self._loop.call_at(due, self._check_wait)
        waiter = self._waiter = self._loop.create_future()
        try:
            await waiter
        finally:
            self._waiter = None

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _check_wait(self) -> None:
        self._timer = None
        waiter = self._waiter
        if waiter is None or waiter.done():
            return  # nobody waits: the next wait arms the timer again
        if self._loop.time() >= self._wait_due:
            self._fail(UpstreamReadTimeout("upstream read timeout"))
        else:
            self._timer = self._loop.call_at(self._wait_due, self._check_wait)

    def take_chunk(self) -> bytes | None:
        if not self._chunks:
            return None
        if len(self._chunks) == 1:
            chunk = self._chunks.popleft()
        else:
            chunk = b"".join(self._chunks)
            self._chunks.clear()
        self._buffered = 0
        self._resume_reading()
        return chunk

    def close(self) -> None:
        self._closed = True
        self._stop_timer()
        if self._transport is not None:
            self._transport.close()


class UpstreamResponse:
    """A response whose head has arrived; the body is read with ``next_chunk`` or ``pipe``."""

    __slots__ = ("_conn", "_pool", "_read_timeout", "_released", "_stopped", "headers",
                 "status")

    def __init__(self, conn: _Connection, pool: _OriginPool, read_timeout: float) -> None:
        self.status = conn._status
        self.headers = conn._headers
        self._conn = conn
        self._pool = pool
        self._read_timeout = read_timeout
        self._released = False
        self._stopped = False

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None

    @property
    def complete(self) -> bool:
        """The whole body has arrived (the remaining chunks are buffered)."""
        return self._conn._complete

    async def next_chunk(self) -> bytes | None:
        """Next piece of the (de-chunked) body; None at its end."""
        conn = self._conn
        while True:
            chunk = conn.take_chunk()
            if chunk is not None:
                return chunk
            if conn._complete:
                return None
            await conn.wait(self._read_timeout)

    async def pipe(self, sink: Sink) -> None:
        """Hand the rest of the body to ``sink`` piece by piece as it arrives; return at its
        end, or early once ``stop`` was called. Raises as ``next_chunk`` does."""
        conn = self._conn
        while True:
            chunk = conn.take_chunk()  # what arrived before, or while the sink was blocked
            blocked = sink(chunk) if chunk is not None else None
            if blocked is not None:
                await blocked
                continue
            if conn._complete or self._stopped:
                return
            conn._sink = sink
            try:
                await conn.wait(self._read_timeout)  # the end, a failure, a block or a stop
            finally:
                conn._sink = None
            blocked, conn._blocked = conn._blocked, None
            if blocked is not None:
                await blocked
                conn._resume_reading()

    def stop(self) -> None:
        """End a pipe early (the client left); the connection is then dropped, not reused."""
        self._stopped = True
        self._conn._wake()

    async def prefetch(self) -> None:
        """Read ahead until the whole body has arrived or the buffer reached its high-water
        mark; what was read stays buffered for ``next_chunk``."""
        conn = self._conn
        while not conn._complete and not conn._paused:
            await conn.wait(self._read_timeout)

    async def read(self) -> bytes:
        parts: list[bytes] = []
        while (chunk := await self.next_chunk()) is not None:
            parts.append(chunk)
        return b"".join(parts)

    def close(self) -> None:
        """Return the connection to the pool if the body was fully read, else drop it."""
        if self._released:
            return
        self._released = True
        conn = self._conn
        if conn._complete and not conn._chunks and conn.reusable:
            self._pool.release(conn)
        else:
            conn.close()
            self._pool.discard()


@dataclass(frozen=True, slots=True)
class PoolLimits:
    max_connections: int  # per origin
    max_keepalive: int  # idle connections kept per origin
    keepalive_expiry_s: float
    connect_timeout_s: float


class _OriginPool:
    """Keep-alive connections to one backend base URL, most recently used first."""

    def __init__(self, url: str, tls: ssl.SSLContext, limits: PoolLimits) -> None:
        parts = urlsplit(url)
        self.https = parts.scheme == "https"
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or (443 if self.https else 80)
        self.host_header = parts.netloc.rpartition("@")[2].encode("idna")  # as in the URL
        self.path_prefix = parts.path.rstrip("/")
        self._tls = tls if self.https else None
        self._limits = limits
        self._idle: list[_Connection] = []
        self._slots = asyncio.Semaphore(limits.max_connections)

    async def acquire(self) -> _Connection:
        await self._slots.acquire()
        try:
            return self._reuse() or await self._connect()
        except BaseException:
            self._slots.release()
            raise

    def _reuse(self) -> _Connection | None:
        expired_before = time.monotonic() - self._limits.keepalive_expiry_s
        while self._idle:
            conn = self._idle.pop()
            if conn.reusable and conn.idle_since >= expired_before:
                return conn
            conn.close()
        return None

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._limits.connect_timeout_s):
                _, conn = await loop.create_connection(
                    lambda: _Connection(loop), self.host, self.port, ssl=self._tls,
                    server_hostname=self.host if self._tls else None,
                )
        except TimeoutError:
            raise UpstreamConnectTimeout(f"connect timeout to {self.host}:{self.port}") from None
        except OSError as exc:
            raise UpstreamConnectError(f"cannot connect to {self.host}:{self.port}: "
                                       f"{type(exc).__name__}") from None
        return conn

    def release(self, conn: _Connection) -> None:
        if len(self._idle) < self._limits.max_keepalive:
            conn.idle_since = time.monotonic()
            self._idle.append(conn)
        else:
            conn.close()
        self._slots.release()

    def discard(self) -> None:
        self._slots.release()

    def close(self) -> None:
        for conn in self._idle:
            conn.close()
        self._idle.clear()


class UpstreamClient:
    """Per-origin keep-alive pools; one instance per router."""

    def __init__(self, limits: PoolLimits, read_timeout_s: float,
                 tls: ssl.SSLContext) -> None:
        self._limits = limits
        self._read_timeout = read_timeout_s
        self._tls = tls
        self._pools: dict[str, _OriginPool] = {}

    def _pool(self, base_url: str) -> _OriginPool:
        pool = self._pools.get(base_url)
        if pool is None:
            pool = self._pools[base_url] = _OriginPool(base_url, self._tls, self._limits)
        return pool

    async def request(self, method: str, base_url: str, path_qs: str,
                      headers: list[tuple[bytes, bytes]], body: bytes) -> UpstreamResponse:
        """Send a request and return once the response head arrived.

        ``base_url`` is scheme://host[:port][/prefix]; ``headers`` must not contain
        host, content-length or transfer-encoding, which are set here.
        """
        pool = self._pool(base_url)
        timeout = self._read_timeout
        target = pool.path_prefix + path_qs
        head = [f"{method} {target} HTTP/1.1\r\nhost: ".encode("latin-1"), pool.host_header,
                b"\r\ncontent-length: ", str(len(body)).encode()]
        for name, value in headers:
            head += (b"\r\n", name, b": ", value)
        head += (b"\r\n\r\n", body)
        conn = await pool.acquire()
        try:
            conn.send(b"".join(head))
            while not conn._headers_done:
                await conn.wait(timeout)
        except BaseException:
            conn.close()
            pool.discard()
            raise
        if method == "HEAD":  # no body follows whatever content-length says: do not reuse
            conn._complete = conn._closed = True
        return UpstreamResponse(conn, pool, timeout)

    async def aclose(self) -> None:
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()
