"""The router's streaming data path in one process: the upstream pipe over real loopback
sockets against a scripted raw-asyncio backend, and driving an ASGI send outside a task."""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager

import pytest

from serving.router.asgi import Message, send_now
from serving.router.upstream import PoolLimits, UpstreamClient, UpstreamReadTimeout

# Script of one answer: (seconds to wait, body piece) per HTTP chunk.
Script = list[tuple[float, bytes]]

READ_TIMEOUT_S = 0.4
SHORT_GAP_S = 0.05  # well inside the read timeout, even with a busy core
STALL_S = 2.0
BURSTS = 3
BURST = 10
BURST_GAP_S = 0.05


@asynccontextmanager
async def scripted_backend(script: Script) -> AsyncIterator[str]:
    """Answers every request with ``script`` as a chunked event stream."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                     b"transfer-encoding: chunked\r\n\r\n")
        try:
            for delay, piece in script:
                if delay:
                    await writer.drain()
                    await asyncio.sleep(delay)
                writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            writer.write(b"0\r\n\r\n")
            await writer.drain()
        except (asyncio.CancelledError, ConnectionError):
            writer.close()  # the test ended, or the client hung up, mid-answer

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()


def _client() -> UpstreamClient:
    limits = PoolLimits(max_connections=4, max_keepalive=4, keepalive_expiry_s=60,
                        connect_timeout_s=1)
    return UpstreamClient(limits, READ_TIMEOUT_S, ssl.create_default_context())


def test_a_blocked_sink_pauses_the_pipe_and_loses_or_reorders_nothing() -> None:
    pieces = [b"data: %d\n\n" % i for i in range(BURSTS * BURST)]
    # each burst is written at once, so one read holds several pieces
    script = [(BURST_GAP_S if i % BURST == 0 else 0, p) for i, p in enumerate(pieces)]

    async def scenario() -> tuple[list[bytes], list[int]]:
        received: list[bytes] = []
        calls_while_blocked: list[int] = []
        blocked: list[asyncio.Future[None]] = []

        def sink(piece: bytes) -> Awaitable[None] | None:
            if blocked and not blocked[-1].done():
                calls_while_blocked.append(len(received))
            received.append(piece)
            if len(received) in (1, BURST + 2):  # the consumer must wait, mid-burst
                waiter = asyncio.get_running_loop().create_future()
                asyncio.get_running_loop().call_later(0.05, waiter.set_result, None)
                blocked.append(waiter)
                return waiter
            return None

        async with scripted_backend(script) as url:
            client = _client()
            response = await client.request("POST", url, "/v1/chat/completions", [], b"{}")
            await response.pipe(sink)
            response.close()
            await client.aclose()
        return received, calls_while_blocked

    received, calls_while_blocked = asyncio.run(scenario())
    assert b"".join(received) == b"".join(pieces)
    assert calls_while_blocked == []
    assert len(received) > BURSTS + 2  # piped piece by piece, not read whole


def test_the_read_timeout_bounds_each_gap_not_the_whole_stream() -> None:
    lively: Script = [(SHORT_GAP_S, b"data: tok\n\n")] * int(2 * READ_TIMEOUT_S / SHORT_GAP_S)
    stalled: Script = [(0, b"data: tok\n\n"), (STALL_S, b"data: late\n\n")]

    async def pipe(script: Script) -> tuple[bytes, float]:
        received: list[bytes] = []

        def sink(piece: bytes) -> None:
            received.append(piece)

        async with scripted_backend(script) as url:
            client = _client()
            t0 = time.perf_counter()
            response = await client.request("POST", url, "/v1/chat/completions", [], b"{}")
            try:
                await response.pipe(sink)
            finally:
                response.close()
                await client.aclose()
        return b"".join(received), time.perf_counter() - t0

    body, took = asyncio.run(pipe(lively))
    assert body == b"data: tok\n\n" * len(lively)
    assert took > READ_TIMEOUT_S  # longer than one timeout, yet never cut
    t0 = time.perf_counter()
    with pytest.raises(UpstreamReadTimeout):
        asyncio.run(pipe(stalled))
    assert READ_TIMEOUT_S <= time.perf_counter() - t0 < STALL_S


def test_send_now_finishes_at_once_or_hands_back_what_is_left() -> None:
    async def scenario() -> None:
        sent: list[Message] = []
        writable = asyncio.Event()
        cancelled: list[bool] = []

        async def send(message: Message) -> None:
            if message.get("wait"):  # like uvicorn while the client's socket is full
                try:
                    await writable.wait()
                except asyncio.CancelledError:
                    cancelled.append(True)
                    raise
            if message.get("fail"):
                raise RuntimeError("send refused")
            sent.append(message)

        assert send_now(send, {"n": 1}) is None
        assert sent == [{"n": 1}]

        rest = send_now(send, {"n": 2, "wait": True})
        assert rest is not None and len(sent) == 1
        asyncio.get_running_loop().call_later(0.01, writable.set)
        await rest
        assert sent[-1] == {"n": 2, "wait": True}

        failing = send_now(send, {"fail": True})
        assert failing is not None
        with pytest.raises(RuntimeError, match="send refused"):
            await failing

        writable.clear()
        waiting = send_now(send, {"n": 3, "wait": True})
        assert waiting is not None
        task = asyncio.ensure_future(waiting)
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert cancelled == [True] and len(sent) == 2

    asyncio.run(scenario())
