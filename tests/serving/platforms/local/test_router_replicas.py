"""Two router processes on one socket (the local keeper's stand-in for Modal's load balancing),
clients split across them: the merged window of their published measurements equals what the
clients saw, to the request, and the gates decide on it as on one router's window of the same
traffic; the shadow copies both sent are merged into what the canary received, and the
header-pinned requests through both are all counted. One of two routers SIGKILLed: the other
serves every request meanwhile, the keeper starts it again, and the merged window says it may
have lost measurements (inconclusive) until the dead replica is stale. Real keeper, routers
and HTTP in front of FAKE engines (tests/fake_engine.py)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from serving.config.profile import Gates
from serving.core.procs import free_port, stop_process, wait_for
from serving.domain.analysis import Analysis, Window, analyse
from serving.domain.interruptions import router_restart_finding
from serving.platforms.local.inventory import Inventory, Owner
from serving.platforms.local.router_process import ROUTER_RECORD, LocalRouter
from serving.router.replicas import STALE_AFTER_SECONDS
from serving.router.slices import Traffic
from tests.router_fixtures import (
    Proc,
    backend,
    chat_body,
    configure_engine,
    served_by_replica,
    start_fake_engine,
    write_state_file,
)

MODEL = "replicas-model"
REQUESTS = 48
CONCURRENCY = 8
GONE_SECONDS = 5.0
REQUEST_TIMEOUT_SECONDS = 30.0
# Far from every gate's limit, so that timing on a busy machine cannot move a decision: the
# canary fails on errors (1 in 4, retried on stable), and is 10x faster than stable.
CANARY = {"error_rate": 0.25, "delay_s": 0.01}
STABLE = {"delay_s": 0.1}
# The router's 50/50 split is drawn: 48 requests give the canary fewer than the default 20 about
# one run in ten. A fifth of them is over 4 standard deviations below the expected half.
GATES = Gates(min_requests=REQUESTS // 5)


@dataclass
class Seen:
    """What a client saw of one request: the status, the release that answered, whether the
    router answered it from a retry after another release failed."""

    status: int
    backend: str | None
    retried: bool


@pytest.fixture(scope="module")
def engines(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Proc]]:
    logs = tmp_path_factory.mktemp("replica-engines")
    procs = {"canary": start_fake_engine("replicas-canary", logs, CANARY),
             "stable": start_fake_engine("replicas-stable", logs, STABLE)}  # fmt: skip
    yield procs
    for proc in procs.values():
        proc.stop()


def _start(home: Path, engines: dict[str, Proc], replicas: int,
           shadow: dict[str, Any] | None = None) -> LocalRouter:  # fmt: skip
    """Canary and stable at 50% each; with `shadow`, the canary at 0% and shadowing stable."""
    router = LocalRouter(home, free_port(), Inventory(home / "state" / "processes"),
                         Owner.current(), keep=False, replicas=replicas)  # fmt: skip
    canary = backend(engines["canary"], 0, shadow=shadow) if shadow else backend(
        engines["canary"], 50)
    write_state_file(router.routes_file, {"models": {MODEL: [
        canary, backend(engines["stable"], 100 if shadow else 50)]}})
    router.ensure_running()
    return router


def _stop(router: LocalRouter) -> None:
    record = router.inventory.get(ROUTER_RECORD)
    assert record is not None
    stop_process(record.pid, record.ticks, groups=set(), term_seconds=GONE_SECONDS)


async def _send(url: str, bodies: list[dict[str, Any]],
                headers: dict[str, str] | None = None) -> list[Seen]:  # fmt: skip
    """Each request on a new connection: the kernel hands each to one of the replicas."""
    seen: list[Seen] = []
    requests = iter(bodies)
    limits = httpx.Limits(max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_SECONDS, limits=limits,
                                 trust_env=False) as client:  # fmt: skip

        async def worker() -> None:
            for body in requests:
                response = await client.post(f"{url}/v1/chat/completions", json=body,
                                             headers=headers)  # fmt: skip
                seen.append(Seen(response.status_code, response.headers.get("x-rollout-backend"),
                                 response.headers.get("x-rollout-retried") == "1"))

        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return seen


def _expected(seen: list[Seen], engines: dict[str, Proc]) -> dict[str, dict[str, int]]:
    """The router's per-release counts implied by the clients' answers: a retried answer from
    stable is a failed (and retried) attempt on the canary, and a retry served by stable."""
    canary, stable = engines["canary"].name, engines["stable"].name
    by = Counter((s.backend, s.retried) for s in seen if s.status == 200)
    failed_over = by[(stable, True)]
    return {
        canary: {"requests": by[(canary, False)] + failed_over, "errors": failed_over,
                 "retried": failed_over, "retries_served": 0},
        stable: {"requests": by[(stable, False)] + failed_over, "errors": 0, "retried": 0,
                 "retries_served": failed_over},
    }  # fmt: skip


def _counted(stats: dict[str, Any]) -> dict[str, dict[str, int]]:
    return {name: {"requests": b["requests"], "errors": b["errors"]["total"],
                   "retried": b["errors"]["retried"], "retries_served": b["retries_served"]}
            for name, b in stats["backends"].items()}  # fmt: skip


def _decision(stats: dict[str, Any], engines: dict[str, Proc]) -> Analysis:
    backends = stats["backends"]
    return analyse(GATES, Window.from_router_stats(backends[engines["canary"].name]),
                   Window.from_router_stats(backends[engines["stable"].name]))  # fmt: skip


def _traffic(router: LocalRouter) -> tuple[float, list[Seen]]:
    since = time.time()
    seen = asyncio.run(_send(router.url, [chat_body(MODEL)] * REQUESTS))
    assert all(s.status == 200 for s in seen), Counter(s.status for s in seen)
    return since, seen


def test_two_routers_merged_window_is_what_the_clients_saw_and_decides_as_one(
    tmp_path: Path, engines: dict[str, Proc],
) -> None:
    one = _start(tmp_path / "one", engines, replicas=1)
    try:
        since, seen_by_one = _traffic(one)
        # The reference: one router's own window, exact nearest-rank over its records.
        alone = one.client().stats(MODEL, since)
    finally:
        _stop(one)
    assert _counted(alone) == _expected(seen_by_one, engines)

    two = _start(tmp_path / "two", engines, replicas=2)
    try:
        assert len(two.server_pids()) == 2
        since, seen_by_two = _traffic(two)
        merged = two.replicas().window(MODEL, since)
        served = served_by_replica(two.stats_store(), MODEL)
    finally:
        _stop(two)

    assert _counted(merged) == _expected(seen_by_two, engines)
    assert merged["weights"] == {engines["canary"].name: 50, engines["stable"].name: 50}
    assert {b["weight"] for b in merged["backends"].values()} == {50}
    assert merged["measured_since"] <= since
    assert len(served) == 2 and all(served), f"the clients were not split: {served}"

    ours, theirs = _decision(merged, engines), _decision(alone, engines)
    assert ours.verdict == theirs.verdict == "fail"
    assert [(g.gate, g.passed) for g in ours.gates] == [(g.gate, g.passed) for g in theirs.gates]


SHADOW_EVERY_REQUEST = {"percent": 100, "max_in_flight": 4 * CONCURRENCY, "send": "after"}
DIFFERENT_ANSWER = "Four, I would say."
PINNED_REQUESTS = 24
COPIES_SETTLE_SECONDS = 30.0
POLL_SECONDS = 0.2


def _received(engine: Proc) -> int:
    response = httpx.get(f"{engine.url}/fake/requests", timeout=5)
    response.raise_for_status()
    return int(response.json()["requests"])


def _settled(router: LocalRouter, since: float, canary: Proc, copies: int,
             received_before: int) -> dict[str, Any]:  # fmt: skip
    """The merged window once the canary has every copy and no replica has one in flight."""
    deadline = time.monotonic() + COPIES_SETTLE_SECONDS
    while time.monotonic() < deadline:
        if _received(canary) - received_before >= copies:
            window = router.replicas().window(MODEL, since)
            if window["shadow"].get(canary.name, {}).get("in_flight", 1) == 0:
                return window
        time.sleep(POLL_SECONDS)
    raise AssertionError(f"{copies} shadow copies not settled in {COPIES_SETTLE_SECONDS}s")


def test_two_routers_merge_their_shadow_copies_and_their_pinned_requests(
    tmp_path: Path, engines: dict[str, Proc],
) -> None:
    canary, stable = engines["canary"], engines["stable"]
    # No injected errors: the FAKE engine draws them per burst of concurrent requests, and a
    # burst of copies could all fail. Failed copies are merged like compared ones (unit tests).
    configure_engine(canary, delay_s=CANARY["delay_s"], answer=DIFFERENT_ANSWER)
    router = _start(tmp_path, engines, replicas=2, shadow=SHADOW_EVERY_REQUEST)
    try:
        received_before, since = _received(canary), time.time()
        # every other request deterministic: the agreement is over those only
        bodies = [{**chat_body(MODEL), **({"temperature": 0} if i % 2 else {})}
                  for i in range(REQUESTS)]  # fmt: skip
        seen = asyncio.run(_send(router.url, bodies))
        window = _settled(router, since, canary, REQUESTS, received_before)
        received = _received(canary) - received_before
        copied = served_by_replica(router.stats_store(), MODEL, Traffic.SHADOW)

        token = {"x-rollout-release": canary.name, "x-rollout-admin-token": router.admin_token()}
        pinned_since = time.time()
        pinned_seen = asyncio.run(_send(router.url, [chat_body(MODEL)] * PINNED_REQUESTS, token))
        pinned = router.replicas().window(MODEL, pinned_since, pinned=True)
        weighted = router.replicas().window(MODEL, pinned_since)
        pinned_by_replica = served_by_replica(router.stats_store(), MODEL, Traffic.PINNED)
    finally:
        _stop(router)
        configure_engine(canary, **CANARY)

    assert {(s.status, s.backend) for s in seen} == {(200, stable.name)}
    shadow = window["shadow"][canary.name]
    # what the canary received, copied by both replicas, every copy compared
    assert shadow["copies"] == shadow["compared"] == received == REQUESTS
    assert (shadow["errors"], shadow["skipped"]) == (0, 0)
    assert len(copied) == 2 and all(copied), f"the copies were not split: {copied}"
    assert sum(copied) == shadow["latency_s"]["count"] == REQUESTS
    assert shadow["deterministic"] == REQUESTS // 2 and shadow["agreement"] == 0.0
    assert [c["canary"] for c in shadow["worst"]] == [DIFFERENT_ANSWER] * 3
    assert window["backends"].get(canary.name, {}).get("requests", 0) == 0  # copies apart

    assert {(s.status, s.backend) for s in pinned_seen} == {(200, canary.name)}
    assert len(pinned_by_replica) == 2 and all(pinned_by_replica), pinned_by_replica
    counted = pinned["backends"][canary.name]
    assert counted["requests"] == counted["successes"] == sum(pinned_by_replica) == PINNED_REQUESTS
    assert counted["latency_s"]["count"] == PINNED_REQUESTS
    assert weighted["backends"].get(canary.name, {}).get("requests", 0) == 0


PUBLISHED_WITHIN_SECONDS = 30.0  # a replica publishes every second; generous for a busy host


def _published(router: LocalRouter, since: float, seen: list[Seen],
               engines: dict[str, Proc]) -> dict[str, Any]:  # fmt: skip
    """The merged window once the replicas have published every request the clients saw."""
    last: dict[str, Any] = {}

    def complete() -> bool:
        last["window"] = router.replicas().window(MODEL, since)
        return _counted(last["window"]) == _expected(seen, engines)

    wait_for(complete, timeout=PUBLISHED_WITHIN_SECONDS, interval=POLL_SECONDS)
    return last["window"]  # the test asserts it complete


def _replaced(router: LocalRouter, killed: int) -> list[int]:
    def two_without_the_killed() -> bool:
        pids = router.server_pids()
        return len(pids) == 2 and killed not in pids

    assert wait_for(two_without_the_killed, timeout=PUBLISHED_WITHIN_SECONDS,
                    interval=POLL_SECONDS), f"router pid {killed} not replaced"  # fmt: skip
    return router.server_pids()


def test_one_of_two_routers_killed_the_other_serves_and_the_window_says_what_may_be_lost(
    tmp_path: Path, engines: dict[str, Proc],
) -> None:
    router = _start(tmp_path, engines, replicas=2)
    try:
        since, before = _traffic(router)
        assert _counted(_published(router, since, before, engines)) == _expected(before, engines)
        killed = router.server_pids()[0]
        os.kill(killed, signal.SIGKILL)
        killed_at = time.time()
        _, after = _traffic(router)  # every one answered 200 by the replica left (in _traffic)
        replicas = _replaced(router, killed)
        seen = before + after
        window = _published(router, since, seen, engines)
        later = time.time() + STALE_AFTER_SECONDS
        time.sleep(max(0.0, later - time.time()) + 1)
        _, last = _traffic(router)
        whole_again = _published(router, later, last, engines)
        served = served_by_replica(router.stats_store(), MODEL)
    finally:
        _stop(router)

    # What the killed replica had published survives it; the survivor counted the rest.
    assert _counted(window) == _expected(seen, engines)
    # It stopped without a final publish: what it held unpublished is unknown, so the window
    # is complete only from some moment after its last publish, and the gates find it lost.
    assert since < window["measured_since"] <= killed_at + STALE_AFTER_SECONDS
    finding = router_restart_finding(window["measured_since"], since)
    assert finding is not None and finding.inconclusive
    # A window begun once the dead replica is stale is whole, served by the replacement too.
    assert whole_again["measured_since"] <= later
    assert router_restart_finding(whole_again["measured_since"], later) is None
    assert _counted(whole_again) == _expected(last, engines)
    # the dead replica, the one left and the replacement: each took some of the connections
    assert len(replicas) == 2 and len(served) == 3 and all(served), served
