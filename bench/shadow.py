"""Stable's latency with and without shadow copies to a canary, measured in one run.

    .venv/bin/python bench/shadow.py [--rounds 4] [--requests 200] [--clients 8] [--delay-ms 50]

Topology (127.0.0.1, one process each): the router (`python -m serving.router`), a stable and
a canary engine (the FAKE engine of tests/, answering after `--delay-ms` like a generation
would, without burning the CPU the router needs), and this load generator. Stable has all the
weight; the canary 0%. Rounds alternate three phases so drift on a shared machine hits all
alike:

    baseline   no shadow
    direct     no shadow; the load generator itself sends each request again to the canary
               once stable answered (8 in flight at most): the canary's work on this host
    shadow     the router copies 100% of stable's requests to the canary (8 in flight at most)

The router sends a copy only after the client has stable's whole answer, so what stable's
clients can pay is the router's own work for copies (a JSON parse, a send, a comparison) on its
one event loop, and here, where all share two cores, the canary engine's CPU (on Modal it has
GPUs of its own). `direct` puts the canary's work on the host without the router's. Printed:
stable's client-side latency p50/p99 per phase, the ratios and added milliseconds, the router's
CPU milliseconds per client request in each phase (its own cost of copying, whatever the host's
load), and how many copies the router compared.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import psutil

REPO = Path(__file__).resolve().parents[1]
FAKE_ENGINE = REPO / "tests" / "fake_engine.py"
MODEL = "bench-shadow"
READY_TIMEOUT_S = 20.0
SHADOW = {"percent": 100, "max_in_flight": 8}
BODY = {"model": MODEL, "temperature": 0, "max_tokens": 8,
        "messages": [{"role": "user", "content": "What is 2+2?"}]}  # fmt: skip


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def _process(argv: list[str], port: int,
             env: dict[str, str] | None = None) -> Iterator[tuple[str, int]]:  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen([sys.executable, *argv], cwd=REPO, env={**os.environ, **(env or {}),
                               "PYTHONPATH": str(REPO)}, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=0.5, trust_env=False).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError(f"{argv[0]} did not start")
            time.sleep(0.05)
        yield url, process.pid
    finally:
        process.terminate()
        process.wait(10)


def _engine(name: str, delay_ms: float) -> list[str]:
    config = json.dumps({"delay_s": delay_ms / 1000})
    return [str(FAKE_ENGINE), "--name", name, "--config", config, "--port"]


async def _phase(router: str, requests: int, clients: int,
                 copy_to: str | None = None) -> list[float]:  # fmt: skip
    """Closed loop: `clients` workers send `requests` in all; each latency in seconds. With
    `copy_to`, each answered request is also sent there, off the worker's path, as the router
    would copy it."""
    latencies: list[float] = []
    remaining = iter(range(requests))
    copies: set[asyncio.Task[httpx.Response]] = set()
    in_flight = asyncio.Semaphore(int(SHADOW["max_in_flight"]))
    limits = httpx.Limits(max_connections=clients * 2, max_keepalive_connections=clients * 2)
    async with httpx.AsyncClient(timeout=30, limits=limits, trust_env=False) as client:

        async def copy(url: str) -> httpx.Response:
            try:
                return await client.post(f"{url}/v1/chat/completions", json=BODY)
            finally:
                in_flight.release()

        async def worker() -> None:
            for _ in remaining:
                t0 = time.perf_counter()
                response = await client.post(f"{router}/v1/chat/completions", json=BODY)
                response.raise_for_status()
                latencies.append(time.perf_counter() - t0)
                if copy_to is not None and not in_flight.locked():
                    await in_flight.acquire()
                    task = asyncio.create_task(copy(copy_to))
                    copies.add(task)
                    task.add_done_callback(copies.discard)

        await asyncio.gather(*(worker() for _ in range(clients)))
        await asyncio.gather(*copies)
    return latencies


def _nearest_rank(values: list[float], p: int) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--requests", type=int, default=200, help="per phase and round")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--delay-ms", type=float, default=50.0, help="each engine's answer time")
    args = parser.parse_args()
    token = secrets.token_hex(16)
    admin = {"authorization": f"Bearer {token}"}
    stable_port, canary_port, router_port = _free_port(), _free_port(), _free_port()
    router_argv = ["-m", "serving.router", "--port", str(router_port),
                   "--admin-token-env", "BENCH_ADMIN_TOKEN"]  # fmt: skip
    with (
        _process([*_engine("stable", args.delay_ms), str(stable_port)],
                 stable_port) as (stable, _),
        _process([*_engine("canary", args.delay_ms), str(canary_port)],
                 canary_port) as (canary, _),
        _process(router_argv, router_port, {"BENCH_ADMIN_TOKEN": token}) as (router, pid),
    ):
        router_cpu = psutil.Process(pid)

        def route(shadow: dict[str, Any] | None) -> None:
            backends = [{"name": "stable", "url": stable, "weight": 100},
                        {"name": "canary", "url": canary, "weight": 0, "shadow": shadow}]
            httpx.put(f"{router}/admin/routes/{MODEL}", json=backends, headers=admin,
                      timeout=10, trust_env=False).raise_for_status()  # fmt: skip

        started = time.time()
        route(None)
        asyncio.run(_phase(router, args.clients * 4, args.clients))  # warm the connections
        phases: dict[str, list[float]] = {"baseline": [], "direct": [], "shadow": []}
        cpu_s = dict.fromkeys(phases, 0.0)
        for _ in range(args.rounds):
            for name, shadow, copy_to in (("baseline", None, None), ("direct", None, canary),
                                          ("shadow", SHADOW, None)):  # fmt: skip
                route(shadow)
                before = sum(router_cpu.cpu_times()[:2])
                phases[name] += asyncio.run(_phase(router, args.requests, args.clients, copy_to))
                cpu_s[name] += sum(router_cpu.cpu_times()[:2]) - before
        time.sleep(1)  # the last copies finish
        stats = httpx.get(f"{router}/admin/stats", params={"model": MODEL, "since": started},
                          headers=admin, timeout=10, trust_env=False).json()  # fmt: skip
    copies = stats["shadow"]["canary"]
    canary_served = stats["backends"].get("canary", {}).get("requests", 0)
    print(f"stable's latency, {args.clients} clients, engines answer in {args.delay_ms:g} ms, "
          f"{args.rounds} alternating rounds of {args.requests} requests per phase")
    for name, values in phases.items():
        print(f"  {name:8}  n={len(values):5}  p50 {_nearest_rank(values, 50) * 1000:7.2f} ms"
              f"  p99 {_nearest_rank(values, 99) * 1000:7.2f} ms"
              f"  router CPU {cpu_s[name] / len(values) * 1000:.3f} ms/request")
    for p in (50, 99):
        base, direct, shadowed = (_nearest_rank(phases[n], p) for n in phases)
        print(f"  p{p}: shadow / baseline = {shadowed / base:.3f} ({(shadowed - base) * 1000:+.2f}"
              f" ms); direct / baseline = {direct / base:.3f} ({(direct - base) * 1000:+.2f} ms);"
              f" shadow / direct = {shadowed / direct:.3f} ({(shadowed - direct) * 1000:+.2f} ms)")
    print(f"  copies: {copies['copies']} sent, {copies['compared']} compared, "
          f"{copies['skipped']} skipped at the cap, {copies['errors']} failed; agreement "
          f"{copies['agreement']}; client requests the canary served: {canary_served}")


if __name__ == "__main__":
    main()
