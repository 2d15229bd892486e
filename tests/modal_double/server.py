"""Serving a ModalClient servicer on a free loopback port, in a thread with its own loop."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import grpclib.server
from modal_proto import api_grpc

READY_TIMEOUT_SECONDS = 10.0


@contextmanager
def serve(servicer: api_grpc.ModalClientBase) -> Iterator[int]:
    """The servicer served on 127.0.0.1 until the block ends; yields the port."""
    # Bound here, so the port is known before the server starts and no other test takes it.
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    loop = asyncio.new_event_loop()
    started = threading.Event()
    servers: list[grpclib.server.Server] = []

    async def run() -> None:
        # grpclib binds a server to the loop it is created on: create it on this thread's.
        server = grpclib.server.Server([servicer])
        await server.start(sock=listener)
        servers.append(server)
        started.set()
        await server.wait_closed()

    thread = threading.Thread(target=loop.run_until_complete, args=(run(),), daemon=True)
    thread.start()
    if not started.wait(READY_TIMEOUT_SECONDS):
        raise RuntimeError("the Modal double did not start")
    try:
        yield port
    finally:
        loop.call_soon_threadsafe(servers[0].close)
        thread.join(READY_TIMEOUT_SECONDS)
        loop.close()
