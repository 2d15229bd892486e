"""RouterClient against the real router process: admin calls share one pooled connection;
stats are asked again when the router refuses or does not answer.

A rollback reaches the router through several admin calls, each from a new RouterClient (the
local platform builds one per call); a client per call paid a new connection and a new TLS
context (35-70 ms of CPU) every time, on a machine whose engines already share the cores.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from serving.control.router_client import (
    ANALYSIS_READ_ATTEMPTS,
    ANALYSIS_READ_RETRY_SECONDS,
    RouterAdminError,
    RouterClient,
    RouterUnreachable,
)
from serving.core.procs import free_port
from tests.router_fixtures import RouterProc, new_secret, start_router
from tests.threaded_http import QuietHandler, http_peer

CALLS = 5


@pytest.fixture(scope="module")
def router(log_dir: Path) -> Iterator[RouterProc]:
    proc = start_router(log_dir, admin_token=new_secret())
    yield proc
    proc.proc.stop()


def connections_to(url: str) -> set[int]:
    """The local ports of every TCP connection to the router's port, open or closing."""
    port = int(url.rsplit(":", 1)[1])
    return {
        connection.laddr.port
        for connection in psutil.net_connections(kind="tcp")
        if connection.raddr and connection.raddr.port == port
    }


def test_admin_calls_from_new_clients_reuse_one_connection(router: RouterProc) -> None:
    before = connections_to(router.url)
    token = router.admin_token
    assert token is not None
    for _ in range(CALLS):
        assert RouterClient(router.url, lambda: token).routes().generation >= 0
    assert len(connections_to(router.url) - before) == 1


def test_each_call_still_carries_its_own_token(router: RouterProc) -> None:
    token = router.admin_token
    assert token is not None
    assert RouterClient(router.url, lambda: token).routes().generation >= 0
    with pytest.raises(RouterAdminError, match="HTTP 401"):
        RouterClient(router.url, lambda: "not-the-token").routes()


ANSWERS = {  # what the flaky router answers once it does
    "/admin/stats": {"backends": {"a": {"requests": 7}}},
    "/admin/routes": {"generation": 3, "models": {"m": [{"name": "a", "weight": 40}]}},
}


class FlakyStats(QuietHandler):
    """FAULT: a router whose admin API answers 503 the first `failures` times (the real
    router has no such mode; a starved or restarting one does this)."""

    failures = 0
    asked = 0

    def do_GET(self) -> None:
        type(self).asked += 1
        failing = type(self).asked <= self.failures
        answer = ANSWERS[self.path.split("?")[0]]
        if failing:
            self.answer(503, b"starting")
        else:
            self.answer(200, json.dumps(answer).encode())


@pytest.fixture
def flaky_router() -> Iterator[tuple[str, type[FlakyStats]]]:
    handler = type("Flaky", (FlakyStats,), {"failures": 1, "asked": 0})
    with http_peer(handler) as url:
        yield url, handler


def test_stats_are_asked_again_after_a_refusal(
    flaky_router: tuple[str, type[FlakyStats]],
) -> None:
    url, handler = flaky_router
    slept: list[float] = []
    stats = RouterClient(url, lambda: "token", sleep=slept.append).stats("m", since=0.0)
    assert stats["backends"]["a"]["requests"] == 7
    assert handler.asked == 2 and slept == [ANALYSIS_READ_RETRY_SECONDS]


def test_weights_are_asked_again_after_a_refusal(
    flaky_router: tuple[str, type[FlakyStats]],
) -> None:
    """The merged window of router replicas takes only the weights from one of them."""
    url, handler = flaky_router
    slept: list[float] = []
    weights = RouterClient(url, lambda: "token", sleep=slept.append).weights("m")
    assert weights == {"a": 40}
    assert handler.asked == 2 and slept == [ANALYSIS_READ_RETRY_SECONDS]


def test_stats_of_a_router_that_never_answers_raise_unreachable_after_every_attempt() -> None:
    slept: list[float] = []
    client = RouterClient(f"http://127.0.0.1:{free_port()}", lambda: "token", sleep=slept.append)
    with pytest.raises(RouterUnreachable, match="does not answer"):
        client.stats("m", since=0.0)
    assert slept == [ANALYSIS_READ_RETRY_SECONDS] * (ANALYSIS_READ_ATTEMPTS - 1)
