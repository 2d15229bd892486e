"""Steady chat traffic through the router, for the demo and the tests: a few client threads
sending requests back to back (closed loop: the load follows what the engines can serve), each
request recorded as the client saw it."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import httpx

REQUEST_TIMEOUT_SECONDS = 60.0
WAIT_POLL_SECONDS = 0.05
DEFAULT_PROMPTS = ("say hello world",)


@dataclass
class Result:
    started_at: float
    status: int  # 0: no response at all
    backend: str | None  # the release that answered (the router's x-rollout-backend)
    error: str | None = None  # None only for a 200 with an answer

    @property
    def ok(self) -> bool:
        return self.error is None


class ChatLoad:
    """`workers` threads sending non-streamed chats to `router_url` until stopped, or for at
    most `limit_s` seconds; at `temperature` if given (0: deterministic requests, the ones a
    shadow step judges)."""

    def __init__(self, router_url: str, model: str, *, workers: int,
                 limit_s: float | None = None, prompts: tuple[str, ...] = DEFAULT_PROMPTS,
                 max_tokens: int = 8, temperature: float | None = None) -> None:  # fmt: skip
        self.url = f"{router_url}/v1/chat/completions"
        self.model = model
        self.prompts = prompts
        self.max_tokens = max_tokens
        self.sampling = {} if temperature is None else {"temperature": temperature}
        self.results: list[Result] = []
        self._lock = threading.Lock()  # the workers append while the caller reads
        self._stop = threading.Event()
        self._deadline = time.monotonic() + limit_s if limit_s is not None else float("inf")
        self._threads = [threading.Thread(target=self._work, args=(index,), daemon=True)
                         for index in range(workers)]  # fmt: skip

    def __enter__(self) -> ChatLoad:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(REQUEST_TIMEOUT_SECONDS)

    @property
    def ok(self) -> int:
        with self._lock:
            return sum(result.ok for result in self.results)

    @property
    def failed(self) -> list[Result]:
        with self._lock:
            return [result for result in self.results if not result.ok]

    def since(self, started: float, until: float = float("inf")) -> list[Result]:
        with self._lock:
            return [r for r in self.results if started <= r.started_at < until]

    def wait_for_requests(self, started: float, count: int, timeout: float) -> list[Result]:
        deadline = time.monotonic() + timeout
        while len(self.since(started)) < count and time.monotonic() < deadline:
            time.sleep(WAIT_POLL_SECONDS)
        return self.since(started)

    def _work(self, index: int) -> None:
        sent = index  # each worker starts at another prompt
        with httpx.Client(timeout=REQUEST_TIMEOUT_SECONDS, trust_env=False) as client:
            while not self._stop.is_set() and time.monotonic() < self._deadline:
                result = self._one(client, self.prompts[sent % len(self.prompts)])
                with self._lock:
                    self.results.append(result)
                sent += 1

    def _one(self, client: httpx.Client, prompt: str) -> Result:
        started = time.time()
        body = {"model": self.model, "max_tokens": self.max_tokens, **self.sampling,
                "messages": [{"role": "user", "content": prompt}]}  # fmt: skip
        try:
            response = client.post(self.url, json=body)
        except httpx.HTTPError as exc:
            return Result(started, 0, None, type(exc).__name__)
        backend = response.headers.get("x-rollout-backend")
        if response.status_code != 200:
            return Result(started, response.status_code, backend,
                          f"HTTP {response.status_code}: {response.text[:200]}")  # fmt: skip
        if not response.json()["choices"][0]["message"].get("content"):
            return Result(started, 200, backend, "an empty answer")
        return Result(started, 200, backend)
