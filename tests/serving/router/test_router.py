"""Router tests over real HTTP: router and FAKE engines run as processes on loopback.

Each test uses its own model name so the router's per-model measurements never mix.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from router_fixtures import (
    Proc,
    Result,
    RouterProc,
    backend,
    chat_body,
    configure_engine,
    new_secret,
    run_load,
    start_fake_engine,
    start_router,
    wait_until,
    write_state_file,
)

# fixtures are used by name; importing them is how pytest finds them outside conftest.py

# 10/90 over 1000 draws: sd of the 10% share is ~0.95 pp, so +-3.5 pp is > 3.5 sigma.
WEIGHT_SHARE_TOLERANCE = 0.035
STAGE_SECONDS = 0.6
RAMP = (0, 10, 50, 100, 0)


def _reset(engines: list[Proc]) -> None:
    for engine in engines:
        configure_engine(engine)


def _by_backend(results: list[Result]) -> dict[str | None, list[Result]]:
    out: dict[str | None, list[Result]] = {}
    for r in results:
        out.setdefault(r.backend, []).append(r)
    return out


def _nearest_rank(values: list[float], p: int) -> float:
    ordered = sorted(values)
    return ordered[max(0, -(-p * len(ordered) // 100) - 1)]


def test_weights_are_honored_statistically(router: RouterProc, engines: list[Proc]) -> None:
    _reset(engines)
    canary, stable = engines[0], engines[1]
    router.put_route("weights", [backend(canary, 10), backend(stable, 90)])
    since = time.time()
    results = asyncio.run(run_load(router.url, "weights", requests=1000, concurrency=32,
                                   max_seconds=30))
    assert len(results) == 1000
    assert all(r.status == 200 for r in results)
    served = _by_backend(results)
    share = len(served.get(canary.name, [])) / len(results)
    assert abs(share - 0.10) <= WEIGHT_SHARE_TOLERANCE, share
    stats = router.stats("weights", since)["backends"]
    assert stats[canary.name]["requests"] == len(served[canary.name])
    assert stats[stable.name]["requests"] == len(served[stable.name])
    assert stats[canary.name]["weight"] == 10


def test_weight_ramp_under_load_has_zero_failures(router: RouterProc,
                                                  engines: list[Proc]) -> None:
    _reset(engines)
    stable, canary = engines[0], engines[1]
    router.put_route("ramp", [backend(stable, 100), backend(canary, 0)])
    since = time.time()

    async def scenario() -> tuple[list[Result], list[tuple[int, float]]]:
        stop = asyncio.Event()
        installs: list[tuple[int, float]] = []  # (canary weight, router's install time)

        async def ramp() -> None:
            async with httpx.AsyncClient(headers=router.admin_headers(), timeout=5) as admin:
                await asyncio.sleep(0.3)
                for w in RAMP:
                    response = await admin.put(
                        f"{router.url}/admin/routes/ramp",
                        json=[backend(stable, 100 - w), backend(canary, w)])
                    response.raise_for_status()
                    installs.append((w, response.json()["updated_at"]))
                    await asyncio.sleep(STAGE_SECONDS)
            stop.set()

        load = run_load(router.url, "ramp", requests=20_000, concurrency=8, max_seconds=15,
                        stop=stop)
        results, _ = await asyncio.gather(load, ramp())
        return results, installs

    results, installs = asyncio.run(scenario())
    assert len(results) > 200
    failed = [r for r in results if r.status != 200]
    assert failed == []
    whole_run = router.stats("ramp", since)["backends"]
    assert sum(b["requests"] for b in whole_run.values()) == len(results)
    # Count each stage at the router, between its install and the next: the router picks a
    # backend and stamps the request in one step, so no request straddles an install. Client
    # send times cannot do this: the load and the ramp share one (possibly lagging) loop.
    ends = [at for _, at in installs[1:]] + [time.time()]
    for (weight, applied), ended in zip(installs, ends, strict=True):
        stage = router.stats("ramp", applied, ended)["backends"]
        to_canary = stage.get(canary.name, {}).get("requests", 0)
        total = sum(b["requests"] for b in stage.values())
        assert total > 0, weight
        if weight == 0:
            assert to_canary == 0, (weight, stage)
        elif weight == 100:
            assert to_canary == total, (weight, stage)
        else:
            assert 0 < to_canary < total, (weight, to_canary, total)


def test_killing_a_weighted_backend_costs_no_client_request(
        router: RouterProc, engines: list[Proc], log_dir: Path) -> None:
    _reset(engines)
    survivor = engines[2]
    victim = start_fake_engine("smollm2-135m-dead0000", log_dir, config={"delay_s": 0.02})
    configure_engine(survivor, delay_s=0.02)
    try:
        router.put_route("kill", [backend(victim, 50), backend(survivor, 50)])
        since = time.time()

        async def scenario() -> list[Result]:
            async def killer() -> None:
                await asyncio.sleep(1.0)
                victim.kill()

            results, _ = await asyncio.gather(
                run_load(router.url, "kill", requests=1500, concurrency=16, max_seconds=2.5),
                killer())
            return results

        results = asyncio.run(scenario())
    finally:
        if victim.alive():
            victim.kill()
    assert [r for r in results if r.status != 200] == []
    served = _by_backend(results)
    assert served.get(victim.name) and served.get(survivor.name)
    stats = router.stats("kill", since)["backends"]
    dead, alive = stats[victim.name], stats[survivor.name]
    assert dead["errors"]["total"] >= 1
    assert dead["errors"]["retried"] == dead["errors"]["total"]  # all hidden from clients
    assert dead["client_errors"] == 0
    assert alive["retries_served"] == dead["errors"]["retried"]
    # a retried request: one error on the victim, one normal request on the survivor
    assert alive["requests"] == len(served[survivor.name])
    assert dead["in_flight"] == 0 and alive["in_flight"] == 0


def test_weight_change_does_not_cut_an_inflight_stream(router: RouterProc,
                                                       engines: list[Proc]) -> None:
    _reset(engines)
    canary, stable = engines[0], engines[1]
    chunks = 10
    configure_engine(canary, stream_chunks=chunks, chunk_interval_s=0.1)
    router.put_route("stream", [backend(canary, 100), backend(stable, 0)])

    async def scenario() -> tuple[list[bytes], str | None, float, float]:
        async with httpx.AsyncClient(timeout=10) as client:
            t0 = time.perf_counter()
            async with client.stream("POST", f"{router.url}/v1/chat/completions",
                                     json=chat_body("stream", stream=True)) as response:
                assert response.status_code == 200
                assert response.headers["content-type"].startswith("text/event-stream")
                lines = response.aiter_lines()
                events = [(await anext(lines)).encode()]
                ttft = time.perf_counter() - t0
                router.put_route("stream", [backend(canary, 0), backend(stable, 100)])
                router.put_route("stream", [backend(stable, 100)])  # canary removed entirely
                after = await client.post(f"{router.url}/v1/chat/completions",
                                          json=chat_body("stream"))
                events += [line.encode() async for line in lines if line]
                total = time.perf_counter() - t0
        return events, after.headers.get("x-rollout-backend"), ttft, total

    events, new_backend, ttft, total = asyncio.run(scenario())
    assert new_backend == stable.name
    assert len(events) == chunks + 1
    assert events[-1] == b"data: [DONE]"
    content = "".join(json.loads(e[len(b"data: "):])["choices"][0]["delta"]["content"] + " "
                      for e in events[:-1])
    assert content.split() == ["The", "answer", "is", "4."]
    # streamed chunk by chunk, not buffered: first event long before the end
    assert ttft < total - 0.5
    canary_stats = router.stats("stream", time.time() - 60)["backends"][canary.name]
    assert canary_stats["requests"] == 1 and canary_stats["errors"]["total"] == 0
    assert canary_stats["weight"] is None  # no longer in the table
    assert canary_stats["ttft_s"]["p50"] < canary_stats["latency_s"]["p50"] - 0.5


def test_a_client_leaving_a_stream_stops_its_relay(router: RouterProc,
                                                  engines: list[Proc]) -> None:
    _reset(engines)
    talker = engines[0]
    configure_engine(talker, stream_chunks=20, chunk_interval_s=0.2)  # a 4 s answer
    router.put_route("leave", [backend(talker, 100)])
    since = time.time()

    async def read_one_event_and_leave() -> None:
        async with httpx.AsyncClient(timeout=10) as client, client.stream(
            "POST", f"{router.url}/v1/chat/completions", json=chat_body("leave", stream=True),
        ) as response:
            assert (await anext(response.aiter_lines())).startswith("data: ")

    t0 = time.perf_counter()
    asyncio.run(read_one_event_and_leave())

    def relay_ended() -> bool:
        talked = router.stats("leave", since)["backends"][talker.name]
        return bool(talked["in_flight"] == 0 and talked["client_disconnects"] == 1)

    wait_until(relay_ended, 3.0, "the relay of the abandoned stream ended")
    # long before the backend would have finished its answer
    assert time.perf_counter() - t0 < 2.5
    configure_engine(talker)


def test_admin_api_requires_the_admin_token(router: RouterProc) -> None:
    url = f"{router.url}/admin/routes"
    assert httpx.get(url).status_code == 401
    assert httpx.get(url, headers={"authorization": "Bearer wrong"}).status_code == 401
    token = router.admin_token
    assert httpx.get(url, headers={"authorization": f"Bearer {token}x"}).status_code == 401
    assert httpx.get(url, headers={"authorization": f"Basic {token}"}).status_code == 401
    assert httpx.put(f"{url}/x", json=[]).status_code == 401
    assert httpx.get(f"{router.url}/admin/stats").status_code == 401
    assert httpx.get(url, headers=router.admin_headers()).status_code == 200


def test_admin_rejects_invalid_routes_without_echoing_keys(router: RouterProc,
                                                           engines: list[Proc]) -> None:
    url = f"{router.url}/admin/routes/invalid"
    key = new_secret()
    bad_bodies: list[Any] = [
        [backend(engines[0], 101)],
        [backend(engines[0], -1)],
        [backend(engines[0], 10), backend(engines[0], 20)],  # duplicate names
        [{"name": "x", "url": "ftp://nope", "weight": 5, "api_key": key}],
        [],
        "not a list",
    ]
    for body in bad_bodies:
        response = httpx.put(url, json=body, headers=router.admin_headers())
        assert response.status_code == 422, body
        assert key not in response.text
    good = router.put_route("invalid", [backend(engines[0], 5, api_key=key)]).json()
    assert good["models"]["invalid"][0]["has_api_key"] is True
    routes = httpx.get(f"{router.url}/admin/routes", headers=router.admin_headers())
    assert key not in routes.text


def test_retry_on_503_counts_an_error_on_the_first_backend(router: RouterProc,
                                                          engines: list[Proc]) -> None:
    _reset(engines)
    broken, healthy = engines[0], engines[1]
    configure_engine(broken, error_rate=1.0, error_status=503)
    router.put_route("retry", [backend(broken, 50), backend(healthy, 50)])
    since = time.time()
    results = asyncio.run(run_load(router.url, "retry", requests=100, concurrency=4,
                                   max_seconds=15))
    assert len(results) == 100
    assert all(r.status == 200 and r.backend == healthy.name for r in results)
    stats = router.stats("retry", since)["backends"]
    first, second = stats[broken.name], stats[healthy.name]
    assert first["requests"] > 20
    assert first["errors"]["http_5xx"] == first["requests"] == first["errors"]["retried"]
    assert first["client_errors"] == 0
    assert second["requests"] == 100
    assert second["retries_served"] == first["requests"]
    assert second["errors"]["total"] == 0

    # with nowhere to retry, the backend's own 503 reaches the client and counts as seen
    router.put_route("retry", [backend(broken, 50), backend(healthy, 0)])
    response = httpx.post(f"{router.url}/v1/chat/completions", json=chat_body("retry"))
    assert response.status_code == 503
    assert response.headers["x-rollout-backend"] == broken.name
    assert router.stats("retry", since)["backends"][broken.name]["client_errors"] == 1


def test_first_byte_timeout_is_retried_elsewhere(router: RouterProc,
                                                 engines: list[Proc]) -> None:
    _reset(engines)
    slow, fast = engines[0], engines[1]
    configure_engine(slow, delay_s=3.0)  # > the router's 1.5 s first-byte timeout
    router.put_route("slow", [backend(slow, 100)])
    since = time.time()
    t0 = time.perf_counter()
    response = httpx.post(f"{router.url}/v1/chat/completions", json=chat_body("slow"),
                          timeout=10)
    assert response.status_code == 504
    assert 1.4 < time.perf_counter() - t0 < 2.9
    router.put_route("slow", [backend(slow, 100), backend(fast, 1)])

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=10) as client:
            return list(await asyncio.gather(*(
                client.post(f"{router.url}/v1/chat/completions", json=chat_body("slow"))
                for _ in range(4))))

    responses = asyncio.run(burst())
    assert [r.status_code for r in responses] == [200] * 4
    stats = router.stats("slow", since)["backends"]
    assert stats[slow.name]["errors"]["timeout"] >= 1
    retried = sum(r.headers.get("x-rollout-retried") == "1" for r in responses)
    assert stats[slow.name]["errors"]["retried"] == retried
    configure_engine(slow)


# Timers of two processes read the same clock, at slightly different moments.
CLOCK_SLACK_SECONDS = 0.002


def test_measurements_match_what_the_load_generator_saw(router: RouterProc,
                                                        engines: list[Proc]) -> None:
    _reset(engines)
    flaky, steady = engines[0], engines[1]
    configure_engine(flaky, error_rate=0.1, error_status=501)  # not retried: the client sees it
    router.put_route("measure", [backend(flaky, 50), backend(steady, 50)])
    rng = random.Random(7)
    n = 300
    delays = [{"x-fake-delay-ms": str(rng.uniform(5, 80))} for _ in range(n)]
    since = time.time()
    results = asyncio.run(run_load(router.url, "measure", requests=n, concurrency=8,
                                   max_seconds=30, per_request_headers=delays))
    assert len(results) == n
    stats = router.stats("measure", since)["backends"]
    saw_errors = 0
    for name, seen in _by_backend(results).items():
        assert name is not None
        measured = stats[name]
        errors = sum(r.status == 501 for r in seen)
        saw_errors += errors
        assert measured["requests"] == len(seen)
        assert measured["errors"]["http_5xx"] == errors == measured["client_errors"]
        assert measured["successes"] == len(seen) - errors
        ok = [r for r in seen if r.status == 200]
        for p in (50, 90):
            # The router's view lies between what the backend was told to take and what the
            # client saw (which adds the router hop and the client's own overhead). A busy
            # machine widens that bracket; it never moves the router outside it.
            backend_floor = _nearest_rank(
                [float(delays[r.index]["x-fake-delay-ms"]) / 1000 for r in ok], p
            )
            client_view = _nearest_rank([r.latency_s for r in ok], p)
            router_view = measured["latency_s"][f"p{p}"]
            assert backend_floor <= router_view <= client_view + CLOCK_SLACK_SECONDS, (
                name, p, backend_floor, router_view, client_view)
    assert saw_errors > 0


def test_metrics_parse_as_prometheus_text(router: RouterProc, engines: list[Proc]) -> None:
    _reset(engines)
    router.put_route("metrics", [backend(engines[2], 100)])
    n = 25
    results = asyncio.run(run_load(router.url, "metrics", requests=n, concurrency=5,
                                   max_seconds=15))
    assert [r.status for r in results] == [200] * n
    text = httpx.get(f"{router.url}/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    requests = [s for s in families["rollout_router_requests"].samples
                if s.labels["model"] == "metrics" and s.name.endswith("_total")]
    assert sum(s.value for s in requests) == n
    assert {s.labels["code"] for s in requests} == {"200"}
    ttft = families["rollout_router_ttft_seconds"].samples
    counts = [s for s in ttft if s.name.endswith("_count") and s.labels["model"] == "metrics"]
    assert [s.value for s in counts] == [n]
    inf_bucket = [s for s in ttft if s.name.endswith("_bucket")
                  and s.labels["model"] == "metrics" and s.labels["le"] == "+Inf"]
    assert [s.value for s in inf_bucket] == [n]


def test_admin_health_probes_backends(router: RouterProc, engines: list[Proc]) -> None:
    _reset(engines)
    configure_engine(engines[1], healthy=False)
    router.put_route("health", [backend(engines[0], 100), backend(engines[1], 0)])
    report = httpx.get(f"{router.url}/admin/health", headers=router.admin_headers()).json()
    by_name = {b["name"]: b for b in report["models"]["health"]}
    assert by_name[engines[0].name]["healthy"] is True
    assert by_name[engines[1].name]["healthy"] is False
    assert by_name[engines[1].name]["status"] == 503
    router.put_route("health", [backend(engines[0], 0), backend(engines[1], 100)])
    report = httpx.get(f"{router.url}/admin/health", headers=router.admin_headers()).json()
    assert report["healthy"] is False  # a backend taking traffic is unhealthy
    configure_engine(engines[1])
    assert httpx.get(f"{router.url}/health").json()["status"] == "ok"


def test_client_key_state_file_and_backend_key(log_dir: Path, engines: list[Proc],
                                               tmp_path: Path) -> None:
    """Client key enforced, backend called with its own key, routes polled from a file."""
    client_key, backend_key = new_secret(), new_secret()
    keyed = start_fake_engine("smollm2-135m-keyd4444", log_dir, api_key=backend_key)
    state = tmp_path / "routes.json"
    write_state_file(state, {"models": {"keyed": [
        backend(keyed, 100, api_key_env="KEYED_BACKEND_KEY")]}})
    r = start_router(log_dir, client_key=client_key, state_file=state,
                     env={"KEYED_BACKEND_KEY": backend_key})
    try:
        url = f"{r.url}/v1/chat/completions"
        models_url = f"{r.url}/v1/models"
        wait_until(lambda: httpx.get(models_url, headers=r.client_headers()).status_code == 200
                   and len(httpx.get(models_url, headers=r.client_headers()).json()["data"]) == 1,
                   5, "state file applied")
        assert httpx.post(url, json=chat_body("keyed")).status_code == 401
        assert httpx.post(url, json=chat_body("keyed"),
                          headers={"authorization": "Bearer nope"}).status_code == 401
        assert httpx.get(models_url).status_code == 401
        ok = httpx.post(url, json=chat_body("keyed"), headers=r.client_headers())
        # the fake engine answers 401 unless it got *its* key, not the client's
        assert ok.status_code == 200, ok.text
        assert ok.headers["x-rollout-backend"] == keyed.name
        no_model = httpx.post(url, json={"messages": []}, headers=r.client_headers())
        assert no_model.status_code == 200  # the single configured model takes it
        # admin API disabled without a token
        assert httpx.get(f"{r.url}/admin/routes").status_code == 404

        write_state_file(state, {"models": {
            "keyed": [backend(keyed, 100, api_key_env="KEYED_BACKEND_KEY")],
            "second": [backend(engines[0], 100)]}})
        wait_until(lambda: len(httpx.get(models_url, headers=r.client_headers())
                               .json()["data"]) == 2, 5, "state file update")
        second = httpx.post(url, json=chat_body("second"), headers=r.client_headers())
        assert second.headers["x-rollout-backend"] == engines[0].name
        unknown = httpx.post(url, json=chat_body("nope"), headers=r.client_headers())
        assert unknown.status_code == 404  # two models: no default any more
    finally:
        r.proc.stop()
        keyed.stop()
    log = r.proc.log()
    assert "routing table" in log  # the log exists and records changes...
    assert client_key not in log and backend_key not in log  # ...but never secrets


def test_admin_ask_sends_one_backend_its_key_and_is_not_measured(
        router: RouterProc, engines: list[Proc], log_dir: Path) -> None:
    """Golden prompts: the orchestrator asks canary and stable by name, holding neither key."""
    key = new_secret()
    keyed = start_fake_engine("smollm2-135m-gold5555", log_dir, api_key=key)
    try:
        router.put_route("ask", [backend(engines[0], 100), backend(keyed, 0, api_key=key)])
        since = time.time()
        ask = f"{router.url}/admin/ask/{keyed.name}"
        answer = httpx.post(ask, json=chat_body("ask"), headers=router.admin_headers())
        # the fake engine answers 401 unless it got its own key
        assert answer.status_code == 200, answer.text
        assert answer.headers["x-rollout-backend"] == keyed.name  # even at weight 0
        assert answer.json()["choices"][0]["message"]["content"]
        assert httpx.post(ask, json=chat_body("ask")).status_code == 401  # admin only
        unknown = httpx.post(f"{router.url}/admin/ask/nope", json=chat_body("ask"),
                             headers=router.admin_headers())
        assert unknown.status_code == 404
        assert router.stats("ask", since)["backends"] == {}  # not client traffic
    finally:
        keyed.stop()


def test_no_secret_in_router_log(router: RouterProc) -> None:
    # runs last in this module: the shared router has served every test above by now
    httpx.get(f"{router.url}/admin/routes", headers={"authorization": "Bearer leaked?"})
    log = router.proc.log()
    assert "routing table" in log
    assert router.admin_token is not None and router.admin_token not in log


@pytest.fixture(autouse=True)
def _engines_alive(request: pytest.FixtureRequest) -> None:
    """Fail loudly if a shared engine died in an earlier test instead of timing out later."""
    if "engines" in request.fixturenames:
        for engine in request.getfixturevalue("engines"):
            assert engine.alive(), engine.log()


def test_a_stale_table_never_replaces_a_newer_one(log_dir: Path, engines: list[Proc],
                                                  tmp_path: Path) -> None:
    """The race of a poll that read the store just before a change: the push of the newer
    generation wins, and the older table, from a poll or a push, is never installed."""
    state = tmp_path / "routes.json"
    old = {"generation": 1, "models": {"gen": [backend(engines[0], 100)]}}
    write_state_file(state, old)
    r = start_router(log_dir, admin_token=new_secret(), state_file=state)
    try:
        routes_url = f"{r.url}/admin/routes"

        def routes() -> dict[str, Any]:
            return dict(httpx.get(routes_url, headers=r.admin_headers(), timeout=5).json())

        wait_until(lambda: routes()["generation"] == 1, 5, "state file applied")
        newer = {"generation": 2, "models": {"gen": [backend(engines[1], 100)]}}
        pushed = httpx.put(routes_url, json=newer, headers=r.admin_headers(), timeout=5)
        assert pushed.status_code == 200, pushed.text
        # The poll still reads generation 1, now with a change so the router looks at it.
        write_state_file(state, {"generation": 1, "models": {"gen": [
            backend(engines[0], 50), backend(engines[1], 50)]}})
        time.sleep(1.0)  # five poll intervals
        assert routes()["generation"] == 2
        assert {b["name"]: b["weight"] for b in routes()["models"]["gen"]} == {
            engines[1].name: 100}
        stale = httpx.put(routes_url, json=old, headers=r.admin_headers(), timeout=5)
        assert stale.status_code == 409 and stale.json()["generation"] == 2
        # The store moving past the push is installed as usual.
        write_state_file(state, {"generation": 3, "models": {"gen": [backend(engines[0], 100)]}})
        wait_until(lambda: routes()["generation"] == 3, 5, "newer state file applied")
    finally:
        r.proc.stop()
