"""Small raw-ASGI helpers shared by the router's data path and its admin API."""

from __future__ import annotations

import asyncio
import hmac
import json
from collections.abc import Awaitable, Callable, Coroutine, MutableMapping
from types import CoroutineType
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

JSON_CT = (b"content-type", b"application/json")
# What a 503 tells clients when no backend can serve: a release being restarted is back within
# seconds, and the openai SDK waits this long before its retry.
RETRY_AFTER_SECONDS = 2


class ClientGone(Exception):
    """The client disconnected before the request body was complete."""


async def read_body(receive: Receive) -> bytes:
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


def send_now(send: Send, message: Message) -> Awaitable[None] | None:
    """Run ``send(message)`` here and now, outside any task: None when it finished without
    waiting, else an awaitable that finishes it.

    uvicorn writes a body message to the socket at once and waits only while the client's
    socket is full, so a stream relayed from a socket callback skips a task switch per chunk.
    """
    step = send(message)
    if type(step) is not CoroutineType:  # an awaitable of another kind: awaited as usual
        return step
    try:
        waits_on = step.send(None)
    except StopIteration:
        return None
    except Exception as exc:  # raised where the caller awaits, as from a plain await
        return _raise(exc)
    return _finish(step, waits_on)


async def _finish(step: Coroutine[Any, Any, None], waits_on: Any) -> None:
    """Drive a coroutine that suspended outside any task, as a task would: wait until what
    it yielded (a future, or None for a bare yield) is done, then resume it; a cancellation
    of this wait is passed into it."""
    while True:
        try:
            if waits_on is None:
                await asyncio.sleep(0)
            else:  # not awaited itself: the coroutine's own await of it is still pending
                await asyncio.wait([waits_on])
        except BaseException as exc:
            try:
                waits_on = step.throw(exc)
            except StopIteration:
                return
            continue
        try:
            waits_on = step.send(None)
        except StopIteration:
            return


async def _raise(exc: Exception) -> None:
    raise exc


async def send_json(send: Send, status: int, payload: Any,
                    extra_headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
    body = json.dumps(payload).encode()
    headers = [JSON_CT, (b"content-length", str(len(body)).encode()), *extra_headers]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def send_error(send: Send, status: int, message: str, code: str) -> None:
    await send_json(send, status, {"error": {"message": message, "type": code, "code": status}})


async def send_unavailable(send: Send, message: str) -> None:
    """503 with Retry-After, at once: nothing can serve the request now, and waiting on a
    backend that is down would only hang the client."""
    await send_json(send, 503, {"error": {"message": message, "type": "unavailable", "code": 503}},
                    ((b"retry-after", str(RETRY_AFTER_SECONDS).encode()),))


def bearer(key: str | None) -> bytes | None:
    """The Authorization header value for a key, or None without one."""
    return f"Bearer {key}".encode() if key else None


def bearer_matches(scope: Scope, expected: bytes) -> bool:
    supplied = _header(scope, b"authorization") or b""
    # constant-time compare: the token must not leak through timing
    return hmac.compare_digest(supplied, expected)


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return value
    return None
