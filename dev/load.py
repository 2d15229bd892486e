"""Steady chat traffic through the router, for the demo, the chaos run and the tests: a few
client threads sending requests back to back with the `openai` SDK, as real clients do (closed
loop: the load follows what the engines can serve), each request recorded as the client saw it.

By default the SDK's own retries are off: each failed attempt is a failed request, so a 503 the
SDK would have retried after its Retry-After still counts, with that header kept. With
`max_retries` (the chaos run: clients as users run them, with the SDK's default retries) a
request fails only if its last attempt did, and every attempt the SDK retried is kept with the
request, by cause: a retried attempt is hidden from the user, never from the report."""

from __future__ import annotations

import dataclasses
import threading
import time
from dataclasses import dataclass

import httpx
import openai

REQUEST_TIMEOUT_SECONDS = 60.0
WAIT_POLL_SECONDS = 0.05
DEFAULT_PROMPTS = ("say hello world",)
# The router needs no key of its clients here; the SDK insists on one.
NO_KEY = "unused"


@dataclass
class Result:
    started_at: float
    status: int  # 0: no response at all
    backend: str | None  # the release that answered (the router's x-rollout-backend)
    error: str | None = None  # None only for a 200 with an answer
    retry_after: str | None = None  # the Retry-After header of a failed answer
    retried: tuple[str, ...] = ()  # causes of the failed attempts the SDK retried before this

    @property
    def ok(self) -> bool:
        return self.error is None


class AttemptLog(httpx.HTTPTransport):
    """The worker's transport, noting how each attempt ended: the SDK retries above it, so only
    here is every attempt seen. One per worker thread, cleared before each request."""

    def __init__(self) -> None:
        super().__init__()
        self.outcomes: list[str] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        try:
            response = super().handle_request(request)
        except httpx.TransportError as exc:
            self.outcomes.append(type(exc).__name__)
            raise
        retry_after = "+Retry-After" if "retry-after" in response.headers else ""
        self.outcomes.append(f"HTTP {response.status_code}{retry_after}")
        return response


class ChatLoad:
    """`workers` threads sending non-streamed chats to `router_url` until stopped, or for at
    most `limit_s` seconds, each waiting `pause_s` between its requests (engines that answer
    at once would otherwise be driven as fast as the CPU allows); at `temperature` if given
    (0: deterministic requests, the ones a shadow step judges)."""

    def __init__(self, router_url: str, model: str, *, workers: int,
                 limit_s: float | None = None, prompts: tuple[str, ...] = DEFAULT_PROMPTS,
                 max_tokens: int = 8, pause_s: float = 0.0,
                 temperature: float | None = None, max_retries: int = 0) -> None:  # fmt: skip
        self.base_url = f"{router_url}/v1"
        self.model = model
        self.prompts = prompts
        self.max_tokens = max_tokens
        self.pause_s = pause_s
        self.sampling = {} if temperature is None else {"temperature": temperature}
        self.max_retries = max_retries
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
        attempts = AttemptLog()
        http = httpx.Client(timeout=REQUEST_TIMEOUT_SECONDS, trust_env=False, transport=attempts)
        with openai.OpenAI(base_url=self.base_url, api_key=NO_KEY, max_retries=self.max_retries,
                           http_client=http) as client:  # fmt: skip
            while not self._stop.is_set() and time.monotonic() < self._deadline:
                attempts.outcomes.clear()
                result = self._one(client, self.prompts[sent % len(self.prompts)])
                # The SDK tries again only after a failure: every attempt but the last failed.
                result = dataclasses.replace(result, retried=tuple(attempts.outcomes[:-1]))
                with self._lock:
                    self.results.append(result)
                sent += 1
                self._stop.wait(self.pause_s)

    def _one(self, client: openai.OpenAI, prompt: str) -> Result:
        started = time.time()
        try:
            raw = client.chat.completions.with_raw_response.create(
                model=self.model, max_tokens=self.max_tokens, **self.sampling,
                messages=[{"role": "user", "content": prompt}],
            )  # fmt: skip
        except openai.APIStatusError as exc:
            headers = exc.response.headers
            return Result(started, exc.status_code, headers.get("x-rollout-backend"),
                          f"HTTP {exc.status_code}: {exc.response.text[:200]}",
                          headers.get("retry-after"))  # fmt: skip
        except openai.APIConnectionError as exc:  # timeouts included: no answer at all
            return Result(started, 0, None, type(exc.__cause__ or exc).__name__)
        backend = raw.headers.get("x-rollout-backend")
        if not raw.parse().choices[0].message.content:
            return Result(started, 200, backend, "an empty answer")
        return Result(started, 200, backend)
