"""RouterClient against the real router process: admin calls share one pooled connection.

A rollback reaches the router through several admin calls, each from a new RouterClient (the
local platform builds one per call); a client per call paid a new connection and a new TLS
context (35-70 ms of CPU) every time, on a machine whose engines already share the cores.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from serving.control.router_client import RouterAdminError, RouterClient
from tests.router_fixtures import RouterProc, new_secret, start_router

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
