"""Benchmark the canary router against a direct connection and nginx, in one run.

    .venv/bin/python bench/router.py [--seconds 10] [--rate 200] [--clients 50]

Topology (all on 127.0.0.1, each in its own process so nobody starves the load generator's
event loop): a minimal raw-asyncio backend returning a fixed completion (or a short SSE
stream), the router (``python -m serving.router`` with a state file), nginx as a plain
keepalive reverse proxy (skipped if not installed), and a separate load-generator process
(raw asyncio sockets + uvloop). ``wrk`` (if installed) cross-checks closed-loop throughput,
since a Python load generator can itself become the bottleneck.

Measured: (a) latency at a fixed open-loop rate, (b) closed-loop throughput, (c) streaming
time to first byte, (d) router CPU seconds per 1000 requests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, cast

from harness import (
    ADMIN_TOKEN_ENV,
    Cpu,
    find_nginx,
    free_port,
    install_uvloop,
    nginx_conf,
    pct,
    process,
    router_command,
    wait_http,
)

MODEL = "bench-model"
WARMUP_CONNECTIONS = 8
SSE_EVENTS = 10
SSE_INTERVAL_S = 0.01
STREAM_REQUESTS = 200
TARGET_ADDED_P50_MS = 1.0
TARGET_ADDED_P99_MS = 5.0
TARGET_NGINX_RATIO = 0.30

COMPLETION = json.dumps({
    "id": "bench", "object": "chat.completion", "created": 0, "model": MODEL,
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "The answer is 4."},
                 "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10},
}).encode()
REQUEST_BODY = json.dumps({"model": MODEL, "max_tokens": 8,
                           "messages": [{"role": "user", "content": "What is 2+2?"}]}).encode()
STREAM_BODY = json.dumps({"model": MODEL, "stream": True, "max_tokens": 8,
                          "messages": [{"role": "user", "content": "What is 2+2?"}]}).encode()


# ---------------------------------------------------------------------------------------
# Backend: minimal HTTP/1.1 keepalive server (raw asyncio protocol)
# ---------------------------------------------------------------------------------------


class _BackendProtocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the interface without subclassing it
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buffer[:end].decode("latin-1")
            match = re.search(r"(?im)^content-length:\s*(\d+)", head)
            length = int(match.group(1)) if match else 0
            if len(self.buffer) < end + 4 + length:
                return
            body = self.buffer[end + 4:end + 4 + length]
            self.buffer = self.buffer[end + 4 + length:]
            self._respond(head, body)

    def _respond(self, head: str, body: bytes) -> None:
        assert self.transport is not None
        if head.startswith("GET /health"):
            self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n"
                                 b"content-type: application/json\r\n\r\n{}")
        elif b'"stream": true' in body:
            asyncio.get_running_loop().create_task(self._stream())
        else:
            self.transport.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
                + str(len(COMPLETION)).encode() + b"\r\n\r\n" + COMPLETION)

    async def _stream(self) -> None:
        assert self.transport is not None
        self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                             b"transfer-encoding: chunked\r\n\r\n")
        for i in range(SSE_EVENTS):
            if i:
                await asyncio.sleep(SSE_INTERVAL_S)
            event = b'data: {"choices":[{"delta":{"content":"tok"}}]}\n\n'
            self.transport.write(b"%x\r\n%s\r\n" % (len(event), event))
        done = b"data: [DONE]\n\n"
        self.transport.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(done), done))


async def _serve_backend(port: int) -> None:
    server = await asyncio.get_running_loop().create_server(
        _BackendProtocol, "127.0.0.1", port, backlog=1024)
    async with server:
        await server.serve_forever()


# ---------------------------------------------------------------------------------------
# Load generator (runs in its own process; prints one JSON line)
# ---------------------------------------------------------------------------------------


def _request_bytes(port: int, body: bytes) -> bytes:
    return (f"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\n"
            f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
            ).encode() + body


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, float]:
    """Read one response; return (status, time of the first body byte)."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    lower = head.lower()
    match = re.search(rb"content-length:\s*(\d+)", lower)
    if match:
        length = int(match.group(1))
        first = await reader.readexactly(1) if length else b""
        first_at = time.perf_counter()
        await reader.readexactly(length - len(first))
        return status, first_at
    first_at = 0.0
    while True:  # chunked
        size = int((await reader.readuntil(b"\r\n")).strip(), 16)
        if not first_at:
            first_at = time.perf_counter()
        if size == 0:
            await reader.readuntil(b"\r\n")
            return status, first_at
        await reader.readexactly(size + 2)


class _Pool:
    def __init__(self, port: int) -> None:
        self.port = port
        self.free: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def get(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self.free:
            return self.free.pop()
        return await asyncio.open_connection("127.0.0.1", self.port)

    def put(self, conn: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> None:
        self.free.append(conn)

    def close(self) -> None:
        for _, writer in self.free:
            writer.close()


async def _timed_request(pool: _Pool, request: bytes) -> tuple[int, float, float]:
    conn = await pool.get()
    t0 = time.perf_counter()
    conn[1].write(request)
    status, first_at = await _read_response(conn[0])
    done = time.perf_counter()
    pool.put(conn)
    return status, first_at - t0, done - t0


async def _open_loop(port: int, rate: float, seconds: float, body: bytes) -> dict[str, Any]:
    """Fixed arrival rate, independent of responses (no coordinated omission)."""
    pool = _Pool(port)
    request = _request_bytes(port, body)
    for _ in range(WARMUP_CONNECTIONS):  # warm connections and the path
        await _timed_request(pool, request)
    loop = asyncio.get_running_loop()
    start = loop.time() + 0.05
    tasks: list[asyncio.Task[tuple[int, float, float]]] = []
    for i in range(int(rate * seconds)):
        delay = start + i / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(loop.create_task(_timed_request(pool, request)))
    results = await asyncio.gather(*tasks, return_exceptions=True)
    pool.close()
    ok = [r for r in results if isinstance(r, tuple) and r[0] == 200]
    return {"requests": len(results), "ok": len(ok),
            "ttft": [r[1] for r in ok], "latency": [r[2] for r in ok]}


async def _closed_loop(port: int, clients: int, seconds: float) -> dict[str, Any]:
    request = _request_bytes(port, REQUEST_BODY)
    deadline = time.perf_counter() + seconds
    counts = {"ok": 0, "failed": 0}

    async def worker() -> None:
        pool = _Pool(port)
        try:
            while time.perf_counter() < deadline:
                status, _, _ = await _timed_request(pool, request)
                counts["ok" if status == 200 else "failed"] += 1
        except (OSError, asyncio.IncompleteReadError):
            counts["failed"] += 1
        finally:
            pool.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    elapsed = time.perf_counter() - t0
    return {**counts, "elapsed": elapsed, "rps": counts["ok"] / elapsed}


def _load_main(args: argparse.Namespace) -> None:
    install_uvloop()
    if args.load == "open":
        result = asyncio.run(_open_loop(args.port, args.rate, args.seconds, REQUEST_BODY))
    elif args.load == "stream":
        result = asyncio.run(_open_loop(args.port, args.rate, args.seconds, STREAM_BODY))
    else:
        result = asyncio.run(_closed_loop(args.port, args.clients, args.seconds))
    print(json.dumps(result))


# ---------------------------------------------------------------------------------------
# Orchestration
# ---------------------------------------------------------------------------------------


def _run_load(port: int, mode: str, seconds: float, rate: float = 0, clients: int = 0
              ) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, __file__, "--load", mode, "--port", str(port), "--seconds",
         str(seconds), "--rate", str(rate), "--clients", str(clients)],
        capture_output=True, text=True, timeout=seconds * 3 + 60)
    if out.returncode != 0:
        raise RuntimeError(f"load generator failed on port {port}:\n{out.stderr[-2000:]}")
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def _wrk(port: int, clients: int, seconds: float, workdir: Path) -> float | None:
    if shutil.which("wrk") is None:
        return None
    script = workdir / "post.lua"
    script.write_text(
        'wrk.method = "POST"\nwrk.headers["content-type"] = "application/json"\n'
        f"wrk.body = {json.dumps(REQUEST_BODY.decode())}\n")
    out = subprocess.run(
        ["wrk", "-t1", f"-c{clients}", f"-d{int(seconds)}s", "-s", str(script),
         f"http://127.0.0.1:{port}/v1/chat/completions"],
        capture_output=True, text=True, timeout=seconds + 30, check=True).stdout
    match = re.search(r"Requests/sec:\s*([\d.]+)", out)
    errors = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", out)
    if errors:
        print(f"  wrk saw {errors.group(1)} non-2xx responses on port {port}")
    return float(match.group(1)) if match else None


def _ms(x: float) -> str:
    return f"{x * 1000:7.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--load", choices=["open", "closed", "stream"], help=argparse.SUPPRESS)
    parser.add_argument("--backend", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.backend:
        install_uvloop()
        asyncio.run(_serve_backend(args.port))
    elif args.load:
        _load_main(args)
    else:
        _bench(args)


def _bench(args: argparse.Namespace) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="router-bench-"))
    backend_port, router_port, nginx_port = free_port(), free_port(), free_port()
    state = workdir / "routes.json"
    state.write_text(json.dumps({"models": {MODEL: [
        {"name": "bench-backend", "url": f"http://127.0.0.1:{backend_port}", "weight": 100}]}}))
    nginx = find_nginx()
    print(f"cores={os.cpu_count()} seconds/phase={args.seconds} rate={args.rate} req/s "
          f"clients={args.clients} workdir={workdir}")
    with (
        process([sys.executable, __file__, "--backend", "--port", str(backend_port)],
                backend_port, workdir / "backend.log"),
        process(router_command(sys.executable, router_port, state), router_port,
                workdir / "router.log", env={ADMIN_TOKEN_ENV: secrets.token_hex(16)}
                ) as router_proc,
    ):
        wait_http(router_port, "/v1/models")
        targets = {"direct": backend_port, "router": router_port}
        if nginx is None:
            print("nginx not installed (apt-get install -y nginx): skipping the nginx column")
            _run_phases(args, targets, router_proc, None, workdir)
            return
        conf = nginx_conf(workdir, nginx_port, backend_port)
        with process([nginx, "-c", str(conf), "-p", str(workdir), "-g", "daemon off;"],
                     nginx_port, workdir / "nginx.log") as nginx_proc:
            targets["nginx"] = nginx_port
            _run_phases(args, targets, router_proc, nginx_proc, workdir)


def _run_phases(args: argparse.Namespace, targets: dict[str, int],
                router_proc: subprocess.Popen[bytes],
                nginx_proc: subprocess.Popen[bytes] | None, workdir: Path) -> None:
    router_cpu = Cpu.of(router_proc)
    nginx_cpu = Cpu.of(nginx_proc) if nginx_proc else None
    cpu: dict[str, tuple[float, int]] = {}

    print(f"\n(a) open loop {args.rate:.0f} req/s for {args.seconds:.0f}s (latency from send)")
    open_results: dict[str, dict[str, Any]] = {}
    for name, port in targets.items():
        c0 = router_cpu.seconds()
        open_results[name] = r = _run_load(port, "open", args.seconds, rate=args.rate)
        if name == "router":
            cpu["open"] = (router_cpu.seconds() - c0, r["ok"])
        print(f"  {name:7s} ok={r['ok']}/{r['requests']} p50={_ms(pct(r['latency'], 50))} ms"
              f" p99={_ms(pct(r['latency'], 99))} ms")

    print(f"\n(b) closed loop, {args.clients} clients for {args.seconds:.0f}s")
    closed: dict[str, dict[str, Any]] = {}
    nginx_cpu_per_k: float | None = None
    for name, port in targets.items():
        c0, n0 = router_cpu.seconds(), nginx_cpu.seconds() if nginx_cpu else 0.0
        closed[name] = r = _run_load(port, "closed", args.seconds, clients=args.clients)
        if name == "router":
            cpu["closed"] = (router_cpu.seconds() - c0, r["ok"])
        if name == "nginx" and nginx_cpu is not None:
            nginx_cpu_per_k = (nginx_cpu.seconds() - n0) / max(r["ok"], 1) * 1000
        print(f"  {name:7s} {r['rps']:9.0f} req/s  ok={r['ok']} failed={r['failed']}")
    wrk_rps = {name: _wrk(port, args.clients, args.seconds, workdir)
               for name, port in targets.items()}
    if any(v is not None for v in wrk_rps.values()):
        print("  cross-check with wrk (C, 1 thread): " + ", ".join(
            f"{k}={v:.0f} req/s" for k, v in wrk_rps.items() if v is not None))

    stream_rate = STREAM_REQUESTS / args.seconds
    print(f"\n(c) SSE streaming, {SSE_EVENTS} events {SSE_INTERVAL_S * 1000:.0f} ms apart, "
          f"{stream_rate:.0f} req/s open loop")
    streams = {name: _run_load(port, "stream", args.seconds, rate=stream_rate)
               for name, port in targets.items()}
    for name, r in streams.items():
        print(f"  {name:7s} ttft p50={_ms(pct(r['ttft'], 50))} ms p99="
              f"{_ms(pct(r['ttft'], 99))} ms  total p50={_ms(pct(r['latency'], 50))} ms")

    _summary(open_results, closed, wrk_rps, streams, cpu, nginx_cpu_per_k)


def _summary(open_results: dict[str, dict[str, Any]], closed: dict[str, dict[str, Any]],
             wrk_rps: dict[str, float | None], streams: dict[str, dict[str, Any]],
             cpu: dict[str, tuple[float, int]], nginx_cpu_per_k: float | None) -> None:
    d = open_results["direct"]["latency"]
    print("\n================ summary ================")
    print(f"{'':26s}{'direct':>10s}{'router':>10s}{'nginx':>10s}")

    def row(label: str, values: dict[str, str]) -> None:
        print(f"{label:26s}" + "".join(f"{values.get(k, '-'):>10s}"
                                       for k in ("direct", "router", "nginx")))

    for p in (50, 99):
        row(f"(a) p{p} latency ms", {k: f"{pct(v['latency'], p) * 1000:.2f}"
                                     for k, v in open_results.items()})
        row(f"(a) p{p} added ms", {k: f"{(pct(v['latency'], p) - pct(d, p)) * 1000:.2f}"
                                   for k, v in open_results.items() if k != "direct"})
    row("(b) req/s (python gen)", {k: f"{v['rps']:.0f}" for k, v in closed.items()})
    row("(b) req/s (wrk)", {k: f"{v:.0f}" for k, v in wrk_rps.items() if v is not None})
    for p in (50, 99):
        row(f"(c) SSE TTFT p{p} ms", {k: f"{pct(v['ttft'], p) * 1000:.2f}"
                                      for k, v in streams.items()})
    per_k = {phase: sec / max(n, 1) * 1000 for phase, (sec, n) in cpu.items()}
    row("(d) CPU s / 1000 req", {"router": f"{per_k.get('closed', float('nan')):.3f}",
                                 **({"nginx": f"{nginx_cpu_per_k:.3f}"}
                                    if nginx_cpu_per_k is not None else {})})
    print(f"    (d) is measured in the closed loop; at the fixed {len(d) and 'open-loop'} rate "
          f"the router used {per_k.get('open', float('nan')):.3f} CPU s / 1000 req")

    added50 = (pct(open_results["router"]["latency"], 50) - pct(d, 50)) * 1000
    added99 = (pct(open_results["router"]["latency"], 99) - pct(d, 99)) * 1000
    print(f"\ntarget router added p50 <= {TARGET_ADDED_P50_MS} ms: {added50:.2f} ms "
          f"{'MET' if added50 <= TARGET_ADDED_P50_MS else 'MISSED'}")
    print(f"target router added p99 <= {TARGET_ADDED_P99_MS} ms: {added99:.2f} ms "
          f"{'MET' if added99 <= TARGET_ADDED_P99_MS else 'MISSED'}")
    if "nginx" in closed:
        for label, source in (("python gen", {k: v["rps"] for k, v in closed.items()}),
                              ("wrk", wrk_rps)):
            router_rps, nginx_rps = source.get("router"), source.get("nginx")
            if router_rps and nginx_rps:
                ratio = router_rps / nginx_rps
                print(f"target router/nginx throughput >= {TARGET_NGINX_RATIO:.0%} ({label}): "
                      f"{ratio:.0%} {'MET' if ratio >= TARGET_NGINX_RATIO else 'MISSED'}")


if __name__ == "__main__":
    main()
