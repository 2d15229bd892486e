"""Serving the double on free loopback ports, in a thread with its own event loop: the gRPC
API, and the HTTP block URLs volume reads download from and v2 uploads PUT to."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import grpclib.server
from aiohttp import web
from modal.volume import BLOCK_SIZE

from tests.modal_double.servicer import ModalDouble

READY_TIMEOUT_SECONDS = 10.0
BLOCKS_ROUTE = "/blocks/"


def _listener() -> socket.socket:
    # Bound here, so the port is known before the server starts and no other test takes it.
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    return listener


def _blocks_app(double: ModalDouble) -> web.Application:
    async def block(request: web.Request) -> web.Response:
        data = double.blocks.get(request.match_info["digest"])
        if data is None:
            raise web.HTTPNotFound()
        return web.Response(body=data)

    async def put_block(request: web.Request) -> web.Response:
        receipt = double.put_block(request.match_info["digest"], await request.read())
        if receipt is None:
            raise web.HTTPBadRequest(text="the block does not match its sha256")
        return web.Response(body=receipt)

    # A v2 upload PUTs whole blocks: aiohttp refuses bodies over 1 MiB unless told.
    app = web.Application(client_max_size=BLOCK_SIZE)
    app.router.add_get(BLOCKS_ROUTE + "{digest}", block)
    app.router.add_put(BLOCKS_ROUTE + "{digest}", put_block)
    return app


@contextmanager
def serve(double: ModalDouble) -> Iterator[int]:
    """The double served until the block ends; yields the gRPC port."""
    grpc_listener, http_listener = _listener(), _listener()
    double.block_url = f"http://127.0.0.1:{http_listener.getsockname()[1]}{BLOCKS_ROUTE}"
    loop = asyncio.new_event_loop()
    started = threading.Event()
    stop = asyncio.Event()

    async def run() -> None:
        # grpclib binds a server to the loop it is created on: create it on this thread's.
        server = grpclib.server.Server([double])
        await server.start(sock=grpc_listener)
        runner = web.AppRunner(_blocks_app(double))
        await runner.setup()
        await web.SockSite(runner, http_listener).start()
        started.set()
        await stop.wait()
        server.close()
        await server.wait_closed()
        await runner.cleanup()

    thread = threading.Thread(target=loop.run_until_complete, args=(run(),), daemon=True)
    thread.start()
    if not started.wait(READY_TIMEOUT_SECONDS):
        raise RuntimeError("the Modal double did not start")
    try:
        yield grpc_listener.getsockname()[1]
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(READY_TIMEOUT_SECONDS)
        loop.close()
