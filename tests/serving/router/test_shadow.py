"""Shadow traffic through the real router process: copies of stable's chat requests go to a
canary at 0% weight, the client always gets stable's answer, the router compares the two.
Router and engines are processes on loopback; the engines are the FAKE engine, whose `answer`
knob makes a canary that answers differently, and whose delay makes a stable that is still
answering when a copy sent in parallel reaches the canary. Each test uses its own model name."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from router_fixtures import Proc, RouterProc, backend, configure_engine, wait_until

from serving.config.profile import Shadow
from serving.control.routes import release_backend
from serving.domain.release import Release
from serving.router.table import DEFAULT_SHADOW_SEND

# Room for every copy of a test's requests at once: which copies overlap depends on the machine.
SHADOW_ALL = {"percent": 100, "max_in_flight": 16}
COPIES_SETTLE_S = 15.0
SENDS = ["after", "parallel"]
# How long stable takes to answer in the send-mode test: a floor (a sleep is never shorter), so a
# copy seen by the canary before it was sent before stable's answer.
STABLE_DELAY_S = 1.0
POLL_S = 0.02


def _chat(model: str, prompt: str, *, stream: bool = False) -> dict[str, Any]:
    return {"model": model, "stream": stream, "temperature": 0, "max_tokens": 8,
            "messages": [{"role": "user", "content": prompt}]}  # fmt: skip


async def _send(router: RouterProc, bodies: list[dict[str, Any]]) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=30, trust_env=False) as client:
        return await asyncio.gather(*(
            client.post(f"{router.url}/v1/chat/completions", json=body) for body in bodies
        ))  # fmt: skip


def _shadow(router: RouterProc, model: str, since: float, canary: Proc,
            settled: int) -> dict[str, Any]:  # fmt: skip
    """The canary's shadow stats once `settled` copies are compared, failed or skipped."""

    def done() -> bool:
        shadow = router.stats(model, since)["shadow"].get(canary.name, {})
        return shadow.get("copies", 0) + shadow.get("skipped", 0) >= settled

    wait_until(done, COPIES_SETTLE_S, f"{settled} shadow copies of {model}")
    return dict(router.stats(model, since)["shadow"][canary.name])


def _setup(
    router: RouterProc, engines: list[Proc], model: str, shadow: dict[str, Any] = SHADOW_ALL,
    **canary_faults: Any,
) -> tuple[Proc, Proc]:
    stable, canary = engines[0], engines[1]
    configure_engine(stable)
    configure_engine(canary, **canary_faults)
    router.put_route(model, [backend(stable, 100), backend(canary, 0, shadow=shadow)])
    return stable, canary


def test_identical_canary_agrees_and_serves_no_client(router: RouterProc,
                                                      engines: list[Proc]) -> None:
    stable, canary = _setup(router, engines, "shadow-same")
    since = time.time()
    bodies = [_chat("shadow-same", f"question {i}", stream=i % 2 == 1) for i in range(12)]
    responses = asyncio.run(_send(router, bodies))
    assert {r.headers["x-rollout-backend"] for r in responses} == {stable.name}
    shadow = _shadow(router, "shadow-same", since, canary, settled=12)
    assert (shadow["compared"], shadow["deterministic"], shadow["errors"]) == (12, 12, 0), shadow
    assert shadow["agreement"] == 1.0 and shadow["worst"] == []
    # Copies are not client traffic: the canary's client-facing measurements never saw them.
    backends = router.stats("shadow-same", since)["backends"]
    assert backends.get(canary.name, {}).get("requests", 0) == 0


def test_different_canary_disagrees_with_its_worst_answers_shown(
    router: RouterProc, engines: list[Proc]
) -> None:
    _, canary = _setup(router, engines, "shadow-diff", answer="The answer is 5.")
    since = time.time()
    bodies = [_chat("shadow-diff", f"question {i}") for i in range(6)]
    responses = asyncio.run(_send(router, bodies))
    assert all(r.json()["choices"][0]["message"]["content"] == "The answer is 4."
               for r in responses)  # fmt: skip
    shadow = _shadow(router, "shadow-diff", since, canary, settled=6)
    assert shadow["agreement"] == 0.0 and shadow["deterministic"] == 6
    assert len(shadow["worst"]) == 3
    worst = shadow["worst"][0]
    assert worst["prompt"].startswith("question ")
    assert (worst["stable"], worst["canary"]) == ("The answer is 4.", "The answer is 5.")
    assert worst["first_difference"] == 3  # The · answer · is · 4


def test_sampled_requests_are_compared_but_not_judged(router: RouterProc,
                                                      engines: list[Proc]) -> None:
    _, canary = _setup(router, engines, "shadow-sampled", answer="Four.")
    since = time.time()
    bodies = [{**_chat("shadow-sampled", "q"), "temperature": 0.7} for _ in range(4)]
    asyncio.run(_send(router, bodies))
    shadow = _shadow(router, "shadow-sampled", since, canary, settled=4)
    assert (shadow["compared"], shadow["deterministic"], shadow["agreement"]) == (4, 0, None)
    assert 0 < shadow["length_ratio_mean"] < 0.5


@pytest.mark.parametrize("send", SENDS)
def test_copies_over_the_cap_are_skipped_and_failed_copies_counted_on_their_own(
    router: RouterProc, engines: list[Proc], send: str
) -> None:
    # A slow, always failing canary and one copy in flight at most, in either mode.
    model = f"shadow-cap-{send}"
    _, canary = _setup(router, engines, model, {"percent": 100, "max_in_flight": 1, "send": send},
                       delay_s=0.5, error_rate=1.0)  # fmt: skip
    since = time.time()
    responses = asyncio.run(_send(router, [_chat(model, "q")] * 8))
    assert [r.status_code for r in responses] == [200] * 8
    shadow = _shadow(router, model, since, canary, settled=8)
    assert shadow["skipped"] >= 1 and shadow["copies"] == shadow["errors"] >= 1
    assert shadow["copies"] + shadow["skipped"] == 8 and shadow["compared"] == 0
    canary_stats = router.stats(model, since)["backends"].get(canary.name, {})
    assert canary_stats.get("requests", 0) == 0  # no client-facing error either


def _requests_seen(engine: Proc) -> int:
    return int(httpx.get(f"{engine.url}/fake/requests", timeout=5).json()["requests"])


@pytest.mark.parametrize("send", SENDS)
def test_a_copy_in_parallel_reaches_the_canary_while_stable_still_answers(
    router: RouterProc, engines: list[Proc], send: str
) -> None:
    model = f"shadow-send-{send}"
    stable, canary = _setup(router, engines, model, {**SHADOW_ALL, "send": send},
                            answer="The answer is 5.")  # fmt: skip
    before, since = _requests_seen(canary), time.time()
    slow = {"x-fake-delay-ms": str(int(STABLE_DELAY_S * 1000))}  # only the client's request
    with ThreadPoolExecutor(1) as pool:
        t0 = time.monotonic()
        pending = pool.submit(httpx.post, f"{router.url}/v1/chat/completions",
                              json=_chat(model, "q"), headers=slow, timeout=30)  # fmt: skip
        deadline = t0 + COPIES_SETTLE_S
        while _requests_seen(canary) == before and time.monotonic() < deadline:
            time.sleep(POLL_S)
        reached_s, stable_pending = time.monotonic() - t0, not pending.done()
        response = pending.result()
    assert (reached_s < STABLE_DELAY_S and stable_pending) == (send == "parallel"), reached_s
    assert reached_s < COPIES_SETTLE_S
    # The client gets stable's answer alone; the comparison is the same in either mode.
    assert response.headers["x-rollout-backend"] == stable.name
    assert response.json()["choices"][0]["message"]["content"] == "The answer is 4."
    shadow = _shadow(router, model, since, canary, settled=1)
    assert (shadow["compared"], shadow["deterministic"], shadow["agreement"]) == (1, 1, 0.0)
    worst = shadow["worst"][0]
    assert (worst["stable"], worst["canary"], worst["first_difference"]) == (
        "The answer is 4.", "The answer is 5.", 3)  # fmt: skip
    assert shadow["latency_s"]["count"] == 1
    assert router.stats(model, since)["backends"].get(canary.name, {}).get("requests", 0) == 0


def test_secrets_in_prompts_are_masked(router: RouterProc, engines: list[Proc]) -> None:
    _, canary = _setup(router, engines, "shadow-secret", answer="other")
    since = time.time()
    token = router.admin_token
    assert token is not None
    prompt = f"use {token} and sk-{'x' * 24} please"
    asyncio.run(_send(router, [_chat("shadow-secret", prompt)]))
    shown = _shadow(router, "shadow-secret", since, canary, settled=1)["worst"][0]["prompt"]
    assert token not in shown and "sk-xxxx" not in shown
    assert shown == "use [REDACTED] and [REDACTED] please"


def test_the_shadow_is_in_the_routing_table_view(router: RouterProc,
                                                 engines: list[Proc]) -> None:
    stable, canary = _setup(router, engines, "shadow-view")
    view = httpx.get(f"{router.url}/admin/routes", headers=router.admin_headers(), timeout=5)
    entries = {b["name"]: b["shadow"] for b in view.json()["models"]["shadow-view"]}
    assert entries == {stable.name: None, canary.name: {**SHADOW_ALL, "send": DEFAULT_SHADOW_SEND}}


@pytest.mark.parametrize("send", SENDS)
def test_the_profiles_shadow_step_reaches_the_routing_table_whole(send: str) -> None:
    release = Release(model="m", revision="r", id="m-canary", url="http://127.0.0.1:1",
                      deployed_at=datetime.now(UTC))  # fmt: skip
    step = Shadow.model_validate({"percent": 10, "seconds": 60, "max_in_flight": 3, "send": send})
    shadow = release_backend(release, 0, None, step).shadow
    assert shadow is not None
    assert shadow.model_dump() == {"percent": 10, "max_in_flight": 3, "send": send}
