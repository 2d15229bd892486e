"""Shared fixtures for router tests: real processes on loopback, bounded load loops."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from serving.control.measured import StatsStore
from serving.core.files import write_atomically
from serving.core.procs import free_port, wait_for
from serving.router.replicas import Chunk, Head
from serving.router.slices import Traffic
from tests.server_fixtures import POLL_SECONDS

REPO = Path(__file__).resolve().parents[1]
FAKE_ENGINE = REPO / "tests" / "fake_engine.py"
STARTUP_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 5.0
# Shared router: first-byte timeout short enough for a test to wait it out.
TEST_FIRST_BYTE_TIMEOUT_S = 1.5
MODEL_PREFIX = "smollm2-135m"


@dataclass
class Proc:
    """A child process serving HTTP on loopback, with its log captured to a file."""

    name: str
    url: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(STOP_TIMEOUT_S)

    def kill(self) -> None:
        self.popen.kill()
        self.popen.wait(STOP_TIMEOUT_S)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def _spawn(name: str, args: list[str], port: int, log_dir: Path,
           env: dict[str, str] | None = None) -> Proc:
    log_path = log_dir / f"{name}.log"
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    with log_path.open("wb") as log:
        popen = subprocess.Popen([sys.executable, *args], cwd=REPO, env=full_env,
                                 stdout=log, stderr=subprocess.STDOUT)
    proc = Proc(name, f"http://127.0.0.1:{port}", popen, log_path)
    _wait_ready(proc)
    return proc


def _wait_ready(proc: Proc) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited during startup:\n{proc.log()}")
        try:
            if httpx.get(proc.url + "/health", timeout=0.5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    proc.stop()
    raise RuntimeError(f"{proc.name} not ready after {STARTUP_TIMEOUT_S}s:\n{proc.log()}")


def start_fake_engine(name: str, log_dir: Path, config: dict[str, Any] | None = None,
                      api_key: str | None = None) -> Proc:
    port = free_port()
    args = [str(FAKE_ENGINE), "--port", str(port), "--name", name,
            "--config", json.dumps(config or {})]
    env = {}
    if api_key is not None:
        args += ["--api-key-env", "FAKE_ENGINE_KEY"]
        env["FAKE_ENGINE_KEY"] = api_key
    return _spawn(name, args, port, log_dir, env)


def configure_engine(engine: Proc, **config: Any) -> None:
    """Reset an engine's faults to defaults plus ``config``."""
    response = httpx.put(engine.url + "/fake/config", json=config, timeout=5)
    response.raise_for_status()


@dataclass
class RouterProc:
    proc: Proc
    admin_token: str | None
    client_key: str | None
    state_file: Path | None

    @property
    def url(self) -> str:
        return self.proc.url

    def admin_headers(self) -> dict[str, str]:
        assert self.admin_token is not None
        return {"authorization": f"Bearer {self.admin_token}"}

    def client_headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.client_key}"} if self.client_key else {}

    def put_route(self, model: str, backends: list[dict[str, Any]]) -> httpx.Response:
        response = httpx.put(f"{self.url}/admin/routes/{model}", json=backends,
                             headers=self.admin_headers(), timeout=5)
        response.raise_for_status()
        return response

    def stats(self, model: str, since: float, until: float | None = None) -> dict[str, Any]:
        params = {"model": model, "since": since, **({} if until is None else {"until": until})}
        response = httpx.get(f"{self.url}/admin/stats", params=params,
                             headers=self.admin_headers(), timeout=5)
        response.raise_for_status()
        return dict(response.json())


def start_router(log_dir: Path, *, admin_token: str | None = None,
                 client_key: str | None = None, state_file: Path | None = None,
                 extra_args: list[str] | None = None,
                 env: dict[str, str] | None = None) -> RouterProc:
    port = free_port()
    args = ["-m", "serving.router", "--port", str(port),
            "--first-byte-timeout", str(TEST_FIRST_BYTE_TIMEOUT_S), "--connect-timeout", "1",
            *(extra_args or [])]
    env = dict(env or {})
    if admin_token is not None:
        args += ["--admin-token-env", "TEST_ROUTER_ADMIN_TOKEN"]
        env["TEST_ROUTER_ADMIN_TOKEN"] = admin_token
    if client_key is not None:
        args += ["--client-api-key-env", "TEST_ROUTER_CLIENT_KEY"]
        env["TEST_ROUTER_CLIENT_KEY"] = client_key
    if state_file is not None:
        args += ["--state-file", str(state_file), "--poll-interval", "0.2"]
    proc = _spawn(f"router-{port}", args, port, log_dir, env)
    return RouterProc(proc, admin_token, client_key, state_file)


def backend(engine: Proc, weight: int, **extra: Any) -> dict[str, Any]:
    return {"name": engine.name, "url": engine.url, "weight": weight, **extra}


def new_secret() -> str:
    return secrets.token_hex(16)


def write_state_file(path: Path, table: dict[str, Any]) -> None:
    """Atomic replace, as the local platform does: the router never reads half a file."""
    write_atomically(path, json.dumps(table))


def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    assert wait_for(predicate, timeout_s, POLL_SECONDS), f"timed out after {timeout_s}s: {what}"


# ---------------------------------------------------------------------------------------
# Load generation (bounded by count and by time)
# ---------------------------------------------------------------------------------------


@dataclass
class Result:
    started_at: float  # unix time
    latency_s: float
    status: int  # 0: the request failed without a response
    backend: str | None
    error: str | None = None
    index: int = -1  # the request's place in run_load's order (its per-request headers)


def chat_body(model: str, stream: bool = False) -> dict[str, Any]:
    return {"model": model, "stream": stream,
            "messages": [{"role": "user", "content": "What is 2+2?"}], "max_tokens": 8}


async def _one(client: httpx.AsyncClient, url: str, body: dict[str, Any],
               headers: dict[str, str]) -> Result:
    started_at, t0 = time.time(), time.perf_counter()
    try:
        response = await client.post(url, json=body, headers=headers)
        return Result(started_at, time.perf_counter() - t0, response.status_code,
                      response.headers.get("x-rollout-backend"))
    except httpx.HTTPError as exc:
        return Result(started_at, time.perf_counter() - t0, 0, None, type(exc).__name__)


async def run_load(url: str, model: str, *, requests: int, concurrency: int,
                   max_seconds: float, headers: dict[str, str] | None = None,
                   per_request_headers: list[dict[str, str]] | None = None,
                   stop: asyncio.Event | None = None) -> list[Result]:
    """Closed-loop load: ``concurrency`` workers until ``requests`` done, time or ``stop``."""
    results: list[Result] = []
    deadline = time.monotonic() + max_seconds
    counter = iter(range(requests))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=30, limits=limits, trust_env=False) as client:

        async def worker() -> None:
            for i in counter:
                if time.monotonic() > deadline or (stop is not None and stop.is_set()):
                    return
                extra = per_request_headers[i] if per_request_headers else {}
                result = await _one(client, f"{url}/v1/chat/completions", chat_body(model),
                                    {**(headers or {}), **extra})
                result.index = i
                results.append(result)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results


# ---------------------------------------------------------------------------------------
# pytest fixtures
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def log_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("router-logs")


@pytest.fixture(scope="module")
def engines(log_dir: Path) -> Iterator[list[Proc]]:
    procs: list[Proc] = []
    try:
        for suffix in ("aaaa1111", "bbbb2222", "cccc3333"):
            procs.append(start_fake_engine(f"{MODEL_PREFIX}-{suffix}", log_dir))
        yield procs
    finally:
        for p in procs:
            p.stop()


@pytest.fixture(scope="module")
def router(log_dir: Path) -> Iterator[RouterProc]:
    r = start_router(log_dir, admin_token=new_secret())
    try:
        yield r
    finally:
        r.proc.stop()


def served_by_replica(store: StatsStore, model: str,
                      traffic: Traffic = Traffic.WEIGHTED) -> list[int]:  # fmt: skip
    """The attempts (of shadow traffic: the copies compared) each router replica published for
    the model, from its head and chunks: how the load balancer (the kernel, or the test
    standing in for Modal's) split the clients."""
    served = []
    for raw in store.heads().values():
        head = Head.model_validate_json(raw)
        chunks = [Chunk.model_validate_json(store.chunk(head.replica, index) or b"{}")
                  for index in head.chunks]  # fmt: skip
        served.append(sum(piece.tally[0] for chunk in chunks
                          for slices in getattr(chunk, traffic.value).get(model, {}).values()
                          for piece in slices))  # fmt: skip
    return served
