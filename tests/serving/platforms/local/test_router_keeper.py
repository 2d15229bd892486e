"""The local router's keeper holds the router's listening socket: a SIGKILLed router is
replaced without one connection refused, with the real keeper, router and HTTP in front of a
FAKE engine (tests/fake_engine.py)."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from serving.core.procs import free_port, is_running, stop_process, wait_for
from serving.core.restarts import RestartPolicy
from serving.platforms.local.inventory import Inventory, Owner
from serving.platforms.local.router_process import ROUTER_RECORD, LocalRouter
from tests.router_fixtures import (
    Proc,
    backend,
    chat_body,
    start_fake_engine,
    write_state_file,
)

MODEL = "keeper-model"
CLIENTS = 2
# The keeper waits this long before the restart (then ~1 s of router start): the gap the
# backlog must cover, where without it every attempt is refused at once.
BACKOFF_SECONDS = 0.3
# Generous: one core may be busy with other work.
RESTART_SECONDS = 20.0
GONE_SECONDS = 5.0
# Requests answered by the new router before the load stops: it serves, not only accepts.
ANSWERED_AFTER_RESTART = 5
REQUEST_TIMEOUT_SECONDS = 30.0


@dataclass
class Sent:
    started: float  # time.monotonic()
    seconds: float
    error: str | None  # the exception's type; None for a 200


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Proc]:
    proc = start_fake_engine("keeper-engine", tmp_path)
    yield proc
    proc.stop()


@pytest.fixture
def router(tmp_path: Path, engine: Proc) -> Iterator[LocalRouter]:
    home = tmp_path / "home"
    local = LocalRouter(home, free_port(), Inventory(home / "state" / "processes"),
                        Owner.current(), keep=False,
                        restarts=RestartPolicy(first_backoff_seconds=BACKOFF_SECONDS))
    write_state_file(local.routes_file, {"models": {MODEL: [backend(engine, 100)]}})
    local.ensure_running()
    yield local
    record = local.inventory.get(ROUTER_RECORD)
    assert record is not None
    stop_process(record.pid, record.ticks, groups=set(), term_seconds=GONE_SECONDS)


def send_until(url: str, stop: threading.Event, sent: list[Sent]) -> None:
    """One request at a time, each on a new connection, never retried: a refused connect
    surfaces as ConnectError."""
    limits = httpx.Limits(max_keepalive_connections=0)
    with httpx.Client(timeout=REQUEST_TIMEOUT_SECONDS, limits=limits, trust_env=False) as client:
        while not stop.is_set():
            started = time.monotonic()
            try:
                response = client.post(f"{url}/v1/chat/completions", json=chat_body(MODEL))
                error = None if response.status_code == 200 else f"HTTP {response.status_code}"
            except httpx.HTTPError as exc:
                error = type(exc).__name__
            sent.append(Sent(started, time.monotonic() - started, error))


def test_a_sigkilled_router_is_replaced_without_a_refused_connection(
    router: LocalRouter,
) -> None:
    sent: list[Sent] = []
    stop = threading.Event()
    clients = [threading.Thread(target=send_until, args=(router.url, stop, sent))
               for _ in range(CLIENTS)]
    for client in clients:
        client.start()
    try:
        assert wait_for(lambda: sum(s.error is None for s in sent) >= CLIENTS, RESTART_SECONDS,
                        0.05), f"no answers before the kill: {sent[-3:]}"
        victim = router.server_pid()
        assert victim is not None
        os.kill(victim, signal.SIGKILL)
        assert wait_for(lambda: not is_running(victim, None), GONE_SECONDS, 0.01)
        dead = time.monotonic()  # seen late on a busy machine: the in-flight bound is generous

        def answered_after_restart() -> int:
            return sum(s.error is None and s.started > dead for s in sent)

        assert wait_for(lambda: answered_after_restart() >= ANSWERED_AFTER_RESTART,
                        RESTART_SECONDS, 0.05), f"the new router did not answer: {sent[-3:]}"
        assert router.server_pid() not in (None, victim)
    finally:
        stop.set()
        for client in clients:
            client.join(REQUEST_TIMEOUT_SECONDS)

    refused = [s for s in sent if s.error == "ConnectError"]
    assert not refused, f"{len(refused)} connections refused while the router restarted"
    # Only what the dead router had accepted may fail: one request per client at most.
    failed = [s for s in sent if s.error is not None]
    assert len(failed) <= CLIENTS and all(s.started < dead for s in failed), failed
