"""Stable's latency without shadow copies and with each way of sending them, in one run.

    .venv/bin/python bench/shadow.py [--rounds 3] [--rate 20] [--seconds 10] [--delay-ms 50]

Topology (127.0.0.1, one process each): the router (`python -m serving.router`), a stable and
a canary engine (the FAKE engine of tests/, answering after `--delay-ms` like a generation
would, without burning the CPU the router needs), and this load generator, which sends chats
at a fixed open-loop rate (bench/openloop.py: each answer timed from its scheduled moment, so
a slower router cannot slow the load down and hide its queue). Stable has all the weight; the
canary 0%. Rounds alternate three phases so drift on a shared machine hits all alike:

    baseline   no shadow
    after      the router copies 100% of stable's requests once the client has the answer
    parallel   the router copies 100% of stable's requests with the request, before stable
               is asked

(8 copies in flight at most.) What stable's clients can pay either way is the router's own work
for copies (a JSON parse, a send, a comparison) on its one event loop, and here, where all share
two cores, the canary engine's CPU (on Modal it has GPUs of its own). Printed: stable's latency
p50/p99 per phase with the router's CPU milliseconds per client request, each mode's ratio to
the baseline and to the other mode, and the copies' own latency (send to the canary's whole
answer, as the router measured it) with how many it compared.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import psutil
from openloop import OpenLoop, p50_p99

REPO = Path(__file__).resolve().parents[1]
FAKE_ENGINE = REPO / "tests" / "fake_engine.py"
MODEL = "bench-shadow"
READY_TIMEOUT_S = 20.0
MAX_IN_FLIGHT = 8
MODES: dict[str, dict[str, Any] | None] = {
    "baseline": None,
    "after": {"percent": 100, "max_in_flight": MAX_IN_FLIGHT, "send": "after"},
    "parallel": {"percent": 100, "max_in_flight": MAX_IN_FLIGHT, "send": "parallel"},
}
# Deterministic, so every copy is judged (an identical canary agrees on each).
BODY = {"model": MODEL, "temperature": 0, "max_tokens": 8,
        "messages": [{"role": "user", "content": "What is 2+2?"}]}  # fmt: skip
WARM_SECONDS = 1.0
MS = 1000


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


def _engine(name: str, delay_ms: float, port: int) -> list[str]:
    config = json.dumps({"delay_s": delay_ms / MS})
    return [str(FAKE_ENGINE), "--name", name, "--config", config, "--port", str(port)]


def _load(router: str, rate: float, seconds: float) -> list[float]:
    """Stable's answer times (seconds) under `seconds` of open-loop load at `rate`."""
    load = OpenLoop(router, MODEL, rate)
    load.body = BODY
    with load:
        time.sleep(seconds)
    failed = sum(a.status != 200 for a in load.answers)
    if failed:
        raise RuntimeError(f"{failed} client requests failed")
    return [a.seconds for a in load.answers]


def _ms(seconds: float) -> str:
    return f"{seconds * MS:7.2f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rate", type=float, default=20.0, help="client requests per second")
    parser.add_argument("--seconds", type=float, default=10.0, help="per phase and round")
    parser.add_argument("--delay-ms", type=float, default=50.0, help="each engine's answer time")
    args = parser.parse_args()
    token = secrets.token_hex(16)
    admin = {"authorization": f"Bearer {token}"}
    stable_port, canary_port, router_port = _free_port(), _free_port(), _free_port()
    router_argv = ["-m", "serving.router", "--port", str(router_port),
                   "--admin-token-env", "BENCH_ADMIN_TOKEN"]  # fmt: skip
    latencies: dict[str, list[float]] = {mode: [] for mode in MODES}
    cpu_s = dict.fromkeys(MODES, 0.0)
    copies: dict[str, list[dict[str, Any]]] = {mode: [] for mode in MODES if MODES[mode]}
    with (
        _process(_engine("stable", args.delay_ms, stable_port), stable_port) as (stable, _),
        _process(_engine("canary", args.delay_ms, canary_port), canary_port) as (canary, _),
        _process(router_argv, router_port, {"BENCH_ADMIN_TOKEN": token}) as (router, pid),
    ):
        router_cpu = psutil.Process(pid)

        def route(shadow: dict[str, Any] | None) -> None:
            backends = [{"name": "stable", "url": stable, "weight": 100},
                        {"name": "canary", "url": canary, "weight": 0, "shadow": shadow}]
            httpx.put(f"{router}/admin/routes/{MODEL}", json=backends, headers=admin,
                      timeout=10, trust_env=False).raise_for_status()  # fmt: skip

        def shadow_stats(since: float, until: float) -> dict[str, Any]:
            stats = httpx.get(f"{router}/admin/stats", headers=admin, timeout=10, trust_env=False,
                              params={"model": MODEL, "since": since, "until": until}).json()
            return dict(stats["shadow"]["canary"])

        def settled(since: float) -> dict[str, Any]:
            """The phase's copies, once the last of them is compared."""
            deadline = time.monotonic() + READY_TIMEOUT_S
            while (stats := shadow_stats(since, time.time()))["in_flight"] and (
                    time.monotonic() < deadline):  # fmt: skip
                time.sleep(args.delay_ms / MS)
            return stats

        route(None)
        _load(router, args.rate, WARM_SECONDS)  # the connections are open for every phase
        for _ in range(args.rounds):
            for mode, shadow in MODES.items():
                route(shadow)
                started, before = time.time(), sum(router_cpu.cpu_times()[:2])
                latencies[mode] += _load(router, args.rate, args.seconds)
                cpu_s[mode] += sum(router_cpu.cpu_times()[:2]) - before
                if shadow is not None:
                    copies[mode].append(settled(started))
    _print(args, latencies, cpu_s, copies)


def _print(args: argparse.Namespace, latencies: dict[str, list[float]], cpu_s: dict[str, float],
           copies: dict[str, list[dict[str, Any]]]) -> None:  # fmt: skip
    print(f"stable's latency at {args.rate:g} requests/s open loop, engines answer in "
          f"{args.delay_ms:g} ms, {args.rounds} alternating rounds of {args.seconds:g} s per phase")
    for mode, values in latencies.items():
        p50, p99 = p50_p99(values)
        print(f"  {mode:9} n={len(values):5}  p50 {_ms(p50)}  p99 {_ms(p99)}  "
              f"router CPU {cpu_s[mode] / len(values) * MS:.3f} ms/request")
    base = p50_p99(latencies["baseline"])
    for mode in copies:
        ours = p50_p99(latencies[mode])
        print(f"  {mode:9} / baseline: p50 {ours[0] / base[0]:.3f} ({(ours[0] - base[0]) * MS:+.2f}"
              f" ms), p99 {ours[1] / base[1]:.3f} ({(ours[1] - base[1]) * MS:+.2f} ms)")
    after, parallel = p50_p99(latencies["after"]), p50_p99(latencies["parallel"])
    print(f"  parallel / after: p50 {parallel[0] / after[0]:.3f}, p99 {parallel[1] / after[1]:.3f}")
    print("copies (as the router measured them; p50 the median of the rounds', p99 the worst)")
    for mode, rounds in copies.items():
        compared = sum(r["compared"] for r in rounds)
        p50s = [r["latency_s"]["p50"] for r in rounds if r["latency_s"]["p50"] is not None]
        p99s = [r["latency_s"]["p99"] for r in rounds if r["latency_s"]["p99"] is not None]
        agreement = [r["agreement"] for r in rounds if r["agreement"] is not None]
        latency = (f"p50 {_ms(statistics.median(p50s))}  p99 {_ms(max(p99s))}" if p50s
                   else "none answered")  # fmt: skip
        print(f"  {mode:9} {latency}  {compared} compared, "
              f"{sum(r['skipped'] for r in rounds)} skipped at the cap, "
              f"{sum(r['errors'] for r in rounds)} failed, agreement "
              f"{min(agreement) if agreement else 'n/a'} (worst round)")


if __name__ == "__main__":
    main()
