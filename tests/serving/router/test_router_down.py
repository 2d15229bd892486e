"""With no release left to take a request, the router answers 503 with Retry-After at once:
a release whose engine is down (being restarted) must not hang clients or look like a broken
gateway. Real router and FAKE engines as processes on loopback; a release that is down
shares its traffic with the others (test_router.py, killing a weighted backend).
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx
from router_fixtures import RouterProc, backend, chat_body, start_fake_engine

from serving.core.procs import free_port
from serving.router.asgi import RETRY_AFTER_SECONDS

# Refused on loopback takes a millisecond; a second allows for a busy machine, and is far
# below the router's connect (1 s here) and first-byte timeouts a hang would run into.
AT_ONCE_SECONDS = 1.0


def down(name: str, weight: int) -> dict[str, object]:
    """A release whose engine is down: nothing listens on its port."""
    return {"name": name, "url": f"http://127.0.0.1:{free_port()}", "weight": weight}


def ask(router: RouterProc, model: str) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    response = httpx.post(f"{router.url}/v1/chat/completions", json=chat_body(model), timeout=30)
    return response, time.monotonic() - started


def assert_retry_later(response: httpx.Response, seconds: float) -> None:
    assert response.status_code == 503, response.text
    assert response.headers["retry-after"] == str(RETRY_AFTER_SECONDS)
    assert response.json()["error"]["type"] == "unavailable"
    assert seconds < AT_ONCE_SECONDS


def test_the_only_release_down_gets_503_with_retry_after_at_once(router: RouterProc) -> None:
    router.put_route("down", [down("smollm2-135m-down0001", 100), down("idle", 0)])
    assert_retry_later(*ask(router, "down"))


def test_a_release_dying_under_the_request_with_none_left_gets_503_with_retry_after(
    router: RouterProc, log_dir: Path
) -> None:
    victim = start_fake_engine("smollm2-135m-down0002", log_dir, config={"die_after": 0})
    try:
        router.put_route("dying", [backend(victim, 100)])
        assert_retry_later(*ask(router, "dying"))
    finally:
        victim.stop()


def test_no_release_with_weight_gets_503_with_retry_after(router: RouterProc) -> None:
    router.put_route("unweighted", [down("idle", 0)])
    assert_retry_later(*ask(router, "unweighted"))


def test_stats_say_since_when_this_router_measures(router: RouterProc) -> None:
    """A restarted router lost what its predecessor measured: its stats say when it began."""
    started = router.stats("down", since=0)["measured_since"]
    assert 0 < started <= time.time()
    assert router.stats("down", since=0)["measured_since"] == started
