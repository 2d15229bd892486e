"""The router's upstream connections against the keep-alive of the servers it fronts: a
connection the backend may already be closing is never reused, since a request written into
it fails after it was sent (retried elsewhere, or a 502 when one release serves)."""

from __future__ import annotations

import asyncio
import inspect
import ssl

import uvicorn

from serving.router.proxy import KEEPALIVE_EXPIRY_S
from serving.router.upstream import PoolLimits, UpstreamClient

TEST_EXPIRY_S = 1.0
# Well past the expiry, and a reuse at once well inside it, even with a busy core.
IDLE_PAST_EXPIRY_S = 2 * TEST_EXPIRY_S
ANSWER = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"


def test_idle_connections_expire_before_the_backends_close_them() -> None:
    # The local engines run on uvicorn's default keep-alive; SGLang's server sets the same
    # 5 s (SGLANG_TIMEOUT_KEEP_ALIVE).
    uvicorn_keep_alive = inspect.signature(uvicorn.Config).parameters["timeout_keep_alive"]
    assert uvicorn_keep_alive.default > KEEPALIVE_EXPIRY_S


def test_a_connection_idle_past_the_expiry_is_not_reused() -> None:
    async def scenario() -> int:
        accepted = 0

        async def answer_forever(reader: asyncio.StreamReader,
                                 writer: asyncio.StreamWriter) -> None:  # fmt: skip
            nonlocal accepted
            accepted += 1
            try:
                while True:  # never closes an idle connection: only the expiry can
                    await reader.readuntil(b"\r\n\r\n")
                    writer.write(ANSWER)
            except (asyncio.IncompleteReadError, ConnectionError):
                writer.close()

        server = await asyncio.start_server(answer_forever, "127.0.0.1", 0)
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        limits = PoolLimits(max_connections=1, max_keepalive=1,
                            keepalive_expiry_s=TEST_EXPIRY_S, connect_timeout_s=1)  # fmt: skip
        client = UpstreamClient(limits, 5.0, ssl.create_default_context())
        try:
            for pause in (0.0, 0.0, IDLE_PAST_EXPIRY_S):  # reused, reused, expired
                await asyncio.sleep(pause)
                response = await client.request("GET", url, "/", [], b"")
                assert await response.read() == b"ok"
                response.close()
        finally:
            await client.aclose()
            server.close()
        return accepted

    assert asyncio.run(scenario()) == 2
