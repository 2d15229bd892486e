"""FAKE inference engine for router tests -- not a model, not SGLang.

A tiny OpenAI-compatible HTTP server (``/v1/chat/completions``, ``/v1/completions``, streaming
and not, ``/v1/models``, ``/health``). It exists only to inject faults a real engine cannot
produce on demand: a delay before the first byte, a 5xx rate, dying abruptly after N
requests, slow streams, failing health, a capacity that queues the requests beyond it (a
saturated engine). Its answer is a canned string (`answer`: another one, for a canary whose
answers differ).

Faults are set on the command line and replaced at runtime with ``PUT /fake/config`` (JSON,
a ``FakeConfig``: fields left out are back to their defaults). A request may override the
delay with the ``x-fake-delay-ms`` header. ``GET /fake/requests`` counts the completions that
arrived.

Run: ``python tests/fake_engine.py --port 18001 --name smollm2-135m-aaaa [--api-key-env VAR]``
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import time
import uuid
from collections.abc import AsyncIterator

import uvicorn
from pydantic import BaseModel, ConfigDict, Field
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

ANSWER = "The answer is 4."


class FakeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    delay_s: float = Field(default=0.0, ge=0)  # before the first response byte
    # Requests in their delay at once; the rest wait their turn, so a load above
    # capacity / delay_s grows a queue without bound (a saturated engine).
    capacity: int | None = Field(default=None, ge=1)
    error_rate: float = Field(default=0.0, ge=0, le=1)
    error_status: int = Field(default=500, ge=500, le=599)
    die_after: int | None = Field(default=None, ge=0)  # exit abruptly on request N+1
    stream_chunks: int = Field(default=5, ge=1)
    chunk_interval_s: float = Field(default=0.0, ge=0)
    healthy: bool = True
    answer: str = ANSWER


class FakeEngine:
    def __init__(self, name: str, config: FakeConfig, api_key: str | None) -> None:
        self.name = name
        self.api_key = api_key
        self.requests = 0
        self._use(config)

    def _use(self, config: FakeConfig) -> None:
        self.config = config
        self._slots = asyncio.Semaphore(config.capacity) if config.capacity else None

    def _fails(self, rate: float) -> bool:
        """Errors spread evenly (request 1/rate, 2/rate, ...), not drawn: a random draw can
        leave a short bake without one error, and a canary gate test would then pass a canary
        it must fail."""
        return int(self.requests * rate) > int((self.requests - 1) * rate)

    def authorized(self, request: Request) -> bool:
        return self.api_key is None or (
            request.headers.get("authorization") == f"Bearer {self.api_key}"
        )

    async def completions(self, request: Request) -> Response:
        if not self.authorized(request):
            return JSONResponse({"error": {"message": "bad key"}}, status_code=401)
        self.requests += 1
        cfg = self.config
        if cfg.die_after is not None and self.requests > cfg.die_after:
            os._exit(1)  # abrupt death: no response, connection reset
        body = json.loads(await request.body() or b"{}")
        delay_ms = request.headers.get("x-fake-delay-ms")
        async with self._slots or contextlib.nullcontext():
            await _take_at_least(float(delay_ms) / 1000 if delay_ms else cfg.delay_s)
        if self._fails(cfg.error_rate):
            return JSONResponse({"error": {"message": "injected failure"}},
                                status_code=cfg.error_status)
        chat = request.url.path.endswith("/chat/completions")
        model = body.get("model", "fake")
        # which headers reached the engine, so a test sees what the router forwards
        headers = {"x-fake-engine": self.name,
                   "x-fake-request-headers": ",".join(sorted(request.headers.keys()))}
        if body.get("stream"):
            return StreamingResponse(self._stream(cfg.answer, model, chat),
                                     media_type="text/event-stream", headers=headers)
        return JSONResponse(_completion(cfg.answer, model, chat, self.name), headers=headers)

    async def _stream(self, answer: str, model: str, chat: bool) -> AsyncIterator[bytes]:
        # The pieces keep their spaces: joined, they are the non-streamed answer.
        words = re.findall(r"\S+\s*", answer)
        n = self.config.stream_chunks
        pieces = ["".join(words[i * len(words) // n:(i + 1) * len(words) // n]) for i in range(n)]
        for i, piece in enumerate(pieces):
            if i and self.config.chunk_interval_s:
                await asyncio.sleep(self.config.chunk_interval_s)
            delta = {"delta": {"content": piece}} if chat else {"text": piece}
            finish = "stop" if i == n - 1 else None
            event = {"id": "fake", "object": "chunk", "model": model,
                     "choices": [{"index": 0, **delta, "finish_reason": finish}]}
            yield f"data: {json.dumps(event)}\n\n".encode()
        yield b"data: [DONE]\n\n"

    async def health(self, request: Request) -> Response:
        status = 200 if self.config.healthy else 503
        return JSONResponse({"status": "ok" if status == 200 else "unhealthy"}, status)

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": self.name, "object": "model"}]})

    async def requests_seen(self, request: Request) -> Response:
        """How many completions arrived, counted before their delay: when a request got here."""
        return JSONResponse({"requests": self.requests})

    async def set_config(self, request: Request) -> Response:
        self._use(FakeConfig.model_validate_json(await request.body() or b"{}"))
        return JSONResponse(self.config.model_dump())

    def app(self) -> Starlette:
        return Starlette(routes=[
            Route("/v1/chat/completions", self.completions, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/models", self.models),
            Route("/health", self.health),
            Route("/fake/config", self.set_config, methods=["PUT"]),
            Route("/fake/requests", self.requests_seen),
        ])


async def _take_at_least(seconds: float) -> None:
    """Sleep no less than `seconds`: uvicorn runs on uvloop, whose timers round to whole
    milliseconds against a clock read once per loop turn, so a bare sleep can end up to ~1 ms
    early, and a test bounding the router's latency from below by the delay would see that."""
    deadline = time.perf_counter() + seconds
    while (left := deadline - time.perf_counter()) > 0:
        await asyncio.sleep(left)


def _completion(answer: str, model: str, chat: bool, engine: str) -> dict[str, object]:
    choice: dict[str, object] = (
        {"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": "stop"}
        if chat else {"index": 0, "text": answer, "finish_reason": "stop"}
    )
    return {
        "id": f"fake-{uuid.uuid4().hex[:8]}",
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": engine,
        "choices": [choice],
        "usage": {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description="FAKE OpenAI-compatible engine for tests")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--api-key-env", help="env var holding the key this engine requires")
    parser.add_argument("--config", default="{}", help="FakeConfig as JSON")
    args = parser.parse_args()
    api_key = os.environ.get(args.api_key_env) if args.api_key_env else None
    engine = FakeEngine(args.name, FakeConfig.model_validate_json(args.config), api_key)
    uvicorn.run(engine.app(), host="127.0.0.1", port=args.port, log_level="warning",
                access_log=False)


if __name__ == "__main__":
    main()
