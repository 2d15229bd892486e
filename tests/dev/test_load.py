"""dev/load.py's clients: with the SDK's retries on (the chaos run), a request whose first
attempt failed and whose retry was answered is a success that still names its retried attempt;
with retries off (demo, tests), the same first attempt is the request's failure."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator

import pytest

from dev.load import ChatLoad
from tests.threaded_http import QuietHandler, http_peer

MODEL = "m"
REQUESTS = 2
WAIT_SECONDS = 30.0
ANSWER = {
    "id": "c", "object": "chat.completion", "created": 0, "model": MODEL,
    "choices": [{"index": 0, "finish_reason": "stop",
                 "message": {"role": "assistant", "content": "hi"}}],
}  # fmt: skip


class EveryOtherUnavailable(QuietHandler):
    """Answers 503 + Retry-After to every odd request, as the router does when the one serving
    release is down, and a chat completion to every even one."""

    served = 0
    lock = threading.Lock()

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        with self.lock:
            type(self).served += 1
            unavailable = self.served % 2 == 1
        json_type = {"Content-Type": "application/json"}
        if unavailable:
            self.answer(503, b"{}", {"Retry-After": "0.1", **json_type})
        else:
            self.answer(200, json.dumps(ANSWER).encode(), json_type)


@pytest.fixture
def flaky_router() -> Iterator[str]:
    EveryOtherUnavailable.served = 0
    with http_peer(EveryOtherUnavailable) as url:
        yield url


def test_a_retried_attempt_is_kept_with_the_request_it_did_not_fail(flaky_router: str) -> None:
    with ChatLoad(flaky_router, MODEL, workers=1, max_retries=2) as load:
        results = load.wait_for_requests(0.0, REQUESTS, WAIT_SECONDS)
    assert all(result.ok for result in results[:REQUESTS]), results
    assert [r.retried for r in results[:REQUESTS]] == [("HTTP 503+Retry-After",)] * REQUESTS


def test_without_retries_the_failed_attempt_is_the_failed_request(flaky_router: str) -> None:
    with ChatLoad(flaky_router, MODEL, workers=1) as load:
        results = load.wait_for_requests(0.0, REQUESTS, WAIT_SECONDS)
    first, second = results[:REQUESTS]
    assert (first.status, first.retry_after, first.retried) == (503, "0.1", ())
    assert second.ok and second.retried == ()
