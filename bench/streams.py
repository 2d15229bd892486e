"""The router on token streams: added inter-token latency, against nginx, in one run.

    .venv/bin/python bench/streams.py [--quick] [--levels 100,400,1000] [--chunks 256]
                                      [--router-before CHECKOUT] [--routers N]

An LLM router mostly carries long SSE answers of one small chunk per token, so users feel
it as added time between tokens and as the number of streams it holds before that grows.

Backend: raw asyncio (uvloop); every 20 ms one decode step writes one chat-completion chunk
shaped like SGLang's to every running stream (a batching engine emits the whole batch's
tokens together), 256 chunks per answer, then ``data: [DONE]``.
Load: at each level, that many streams start evenly over one second and are held to the
end; each client (its own process, raw asyncio) stamps every chunk's arrival.
Paths, one after another at each level: direct to the backend, through the router started
as the product starts it, and through nginx (one worker, ``proxy_buffering off``); with
``--router-before``, also through the router of another checkout (before a change), e.g.
``git archive <commit> serving | tar -x -C /tmp/before``; with ``--routers N``, also through N
router processes on one socket under the local keeper (the router scaled out), as the path
``router xN``. The project's routers publish their measurements every second, as in the product.

Per level: inter-token gap p50/p99 and what each path adds to direct's, time to first byte,
streams that failed or stalled (> 1 s without a chunk), and CPU seconds per 10,000 chunks
of the router and of nginx; at the end, the highest level at which the router adds <= 10 ms
at p99, and the targets.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any, cast

import httpx
from harness import (
    ADMIN_TOKEN_ENV,
    LISTEN_BACKLOG,
    REPO,
    Cpu,
    find_nginx,
    free_port,
    install_uvloop,
    nginx_conf,
    pct,
    process,
    router_command,
)

MODEL = "bench-model"
MS = 1000.0
TOKEN_INTERVAL_S = 0.020  # 50 tokens/s per stream
CHUNKS = 256
LEVELS = (100, 250, 400, 700, 1000)  # the three, and two between for the "highest"
QUICK_LEVELS = (100, 400)
QUICK_CHUNKS = 128
RAMP_S = 1.0  # streams of a level start evenly over this long
STALL_S = 1.0  # a stream this long without a chunk is stalled
SETTLE_S = 0.5  # between runs: closed sockets leave the proxies' loops
CPU_PER_CHUNKS = 10_000
# Targets (issue 11 §1), on a 2-core machine.
TARGET_LEVEL = 400
TARGET_ADDED_P99_MS = 2.0
TARGET_STALL_FREE_LEVEL = 1000
TARGET_CPU_RATIO = 2.0
HOLD_ADDED_P99_MS = 10.0

BEFORE = "before"  # the path of --router-before
KEEPER = "serving.platforms.local.router_keeper"
SSE_END = b"0\r\n\r\n"  # the chunked body's last chunk


def _request(port: int, chunks: int) -> bytes:
    body = json.dumps({"model": MODEL, "stream": True, "max_tokens": chunks,
                       "messages": [{"role": "user", "content": "Count slowly."}]}).encode()
    return (f"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\n"
            f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
            ).encode() + body


# ---------------------------------------------------------------------------------------
# Backend: one decode step every TOKEN_INTERVAL_S writes a token to every running stream
# ---------------------------------------------------------------------------------------


def _sse_chunk(answer_id: str, content: str, finish: str | None) -> bytes:
    """One SGLang chat-completion chunk, framed as one HTTP/1.1 chunk."""
    event = {"id": answer_id, "object": "chat.completion.chunk", "created": int(time.time()),
             "model": MODEL, "choices": [{
                 "index": 0, "delta": {"role": None, "content": content,
                                       "reasoning_content": None, "tool_calls": None},
                 "logprobs": None, "finish_reason": finish, "matched_stop": None}],
             "usage": None}
    data = b"data: " + json.dumps(event, separators=(",", ":")).encode() + b"\n\n"
    return b"%x\r\n%s\r\n" % (len(data), data)


_DONE = b"data: [DONE]\n\n"
_LAST = b"%x\r\n%s\r\n" % (len(_DONE), _DONE) + SSE_END


@dataclass(slots=True)
class _Answer:
    transport: asyncio.Transport
    token: bytes
    last: bytes
    left: int


class _Engine:
    """The running batch: every step, each answer gets its next token."""

    def __init__(self) -> None:
        self.running: list[_Answer] = []

    def admit(self, transport: asyncio.Transport, tokens: int) -> None:
        answer_id = secrets.token_hex(16)
        transport.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                        b"cache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n")
        self.running.append(_Answer(transport, _sse_chunk(answer_id, " tok", None),
                                    _sse_chunk(answer_id, " end", "stop") + _LAST, tokens))

    async def decode_forever(self) -> None:
        loop = asyncio.get_running_loop()
        next_step = loop.time()
        while True:
            next_step += TOKEN_INTERVAL_S
            await asyncio.sleep(max(0.0, next_step - loop.time()))
            still: list[_Answer] = []
            for answer in self.running:
                if answer.transport.is_closing():
                    continue
                answer.left -= 1
                if answer.left > 0:
                    answer.transport.write(answer.token)
                    still.append(answer)
                else:
                    answer.transport.write(answer.last)
            self.running = still


class _BackendProtocol(asyncio.Protocol):
    def __init__(self, engine: _Engine) -> None:
        self.engine = engine
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the interface without subclassing it
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        head = self.buffer[:end].lower()
        length_at = head.find(b"content-length:")
        length = int(head[length_at + 15:].split(b"\r\n", 1)[0]) if length_at >= 0 else 0
        if len(self.buffer) < end + 4 + length:
            return
        body, self.buffer = self.buffer[end + 4:end + 4 + length], self.buffer[end + 4 + length:]
        assert self.transport is not None
        if head.startswith(b"get /health"):
            self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n"
                                 b"content-type: application/json\r\n\r\n{}")
        else:
            self.engine.admit(self.transport, int(json.loads(body).get("max_tokens", CHUNKS)))


async def _serve_backend(port: int) -> None:
    engine = _Engine()
    server = await asyncio.get_running_loop().create_server(
        lambda: _BackendProtocol(engine), "127.0.0.1", port, backlog=LISTEN_BACKLOG)
    async with server:
        await engine.decode_forever()


# ---------------------------------------------------------------------------------------
# Load: N streams, each stamping every chunk's arrival (its own process; prints one JSON line)
# ---------------------------------------------------------------------------------------


class _StreamClient(asyncio.Protocol):
    """One stream on its own connection. Events end with a blank line; the chunked framing
    and the response head never contain one, so counting ``\\n\\n`` counts events."""

    def __init__(self, request: bytes, tokens: int, done: Callable[[], None]) -> None:
        self.request = request
        self.tokens = tokens
        self.done = done
        self.sent_at = time.perf_counter()
        self.first_byte_at = 0.0
        self.arrivals: list[float] = []
        self.status = 0
        self.tail = b""
        self.complete = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        if not self.first_byte_at:
            self.first_byte_at = now
            self.status = int(data[9:12]) if data.startswith(b"HTTP/1.1 ") else -1
        # an event's blank line may straddle two reads: carry one byte over
        events = (self.tail[-1:] + data).count(b"\n\n")
        if events and len(self.arrivals) < self.tokens:
            self.arrivals.extend([now] * min(events, self.tokens - len(self.arrivals)))
        self.tail = (self.tail + data)[-len(SSE_END):]
        if self.tail == SSE_END:
            self.complete = True
            assert self.transport is not None
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.done()

    def gaps(self) -> list[float]:
        a = self.arrivals
        return [a[i] - a[i - 1] for i in range(1, len(a))]

    def stalled(self) -> bool:
        times = [self.sent_at, *self.arrivals]
        return any(later - earlier > STALL_S for earlier, later in pairwise(times))

    def ok(self) -> bool:
        return self.complete and self.status == 200 and len(self.arrivals) == self.tokens


async def _hold_streams(port: int, streams: int, tokens: int) -> dict[str, Any]:
    cpu_at_start = time.process_time()  # past the interpreter's start and imports
    loop = asyncio.get_running_loop()
    request = _request(port, tokens)
    clients: list[_StreamClient] = []
    finished = asyncio.Event()
    left = [streams]
    connect_failures = 0

    def one_done() -> None:
        left[0] -= 1
        if left[0] == 0:
            finished.set()

    async def open_stream() -> None:
        nonlocal connect_failures
        client = _StreamClient(request, tokens, one_done)
        clients.append(client)
        try:
            await loop.create_connection(lambda: client, "127.0.0.1", port)
        except OSError:
            connect_failures += 1
            one_done()

    start = loop.time()
    openers = []
    for i in range(streams):
        await asyncio.sleep(max(0.0, start + i * RAMP_S / streams - loop.time()))
        openers.append(loop.create_task(open_stream()))
    await asyncio.gather(*openers)
    deadline = RAMP_S + tokens * TOKEN_INTERVAL_S * 3 + 10
    with contextlib.suppress(TimeoutError):  # the streams still open count as failed
        await asyncio.wait_for(finished.wait(), deadline)
    for client in clients:
        if client.transport is not None:
            client.transport.close()
    gaps = sorted(g for c in clients for g in c.gaps())
    ttfb = [c.first_byte_at - c.sent_at for c in clients if c.first_byte_at]
    return {
        "streams": streams, "ok": sum(c.ok() for c in clients),
        "failed": sum(not c.ok() for c in clients), "stalled": sum(c.stalled() for c in clients),
        "connect_failures": connect_failures, "chunks": sum(len(c.arrivals) for c in clients),
        "gap_p50": pct(gaps, 50), "gap_p99": pct(gaps, 99), "gap_max": gaps[-1] if gaps else 0,
        "ttfb_p50": pct(ttfb, 50), "ttfb_p99": pct(ttfb, 99),
        "client_cpu": time.process_time() - cpu_at_start,
    }


def _run_load(port: int, streams: int, tokens: int) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, __file__, "--load", "--port", str(port), "--streams", str(streams),
         "--chunks", str(tokens)],
        capture_output=True, text=True, timeout=RAMP_S + tokens * TOKEN_INTERVAL_S * 4 + 60)
    if out.returncode != 0:
        raise RuntimeError(f"load generator failed on port {port}:\n{out.stderr[-2000:]}")
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


# ---------------------------------------------------------------------------------------
# Orchestration and report
# ---------------------------------------------------------------------------------------


@dataclass
class _Path:
    name: str
    port: int
    cpu: Cpu | None  # the proxy's own CPU (direct has none)


def _measure(paths: list[_Path], backend: Cpu, levels: list[int], tokens: int
             ) -> dict[int, dict[str, dict[str, Any]]]:
    results: dict[int, dict[str, dict[str, Any]]] = {}
    for level in levels:
        results[level] = {}
        for path in paths:
            before, backend_before = path.cpu.seconds() if path.cpu else 0.0, backend.seconds()
            r = _run_load(path.port, level, tokens)
            per_10k = CPU_PER_CHUNKS / max(r["chunks"], 1)
            if path.cpu is not None:
                r["cpu_per_10k"] = (path.cpu.seconds() - before) * per_10k
            r["backend_cpu_per_10k"] = (backend.seconds() - backend_before) * per_10k
            r["client_cpu_per_10k"] = r["client_cpu"] * per_10k
            results[level][path.name] = r
            time.sleep(SETTLE_S)
        _print_level(level, results[level])
    return results


def _print_level(level: int, by_path: dict[str, dict[str, Any]]) -> None:
    direct = by_path["direct"]
    print(f"\n{level} streams")
    print(f"  {'path':10s}{'gap p50':>9s}{'gap p99':>9s}{'+p50':>8s}{'+p99':>8s}{'ttfb p50':>10s}"
          f"{'ttfb p99':>10s}{'failed':>8s}{'stalled':>8s}{'CPU s/10k':>11s}")
    for name, r in by_path.items():
        added = ("", "") if name == "direct" else (
            f"{(r['gap_p50'] - direct['gap_p50']) * MS:.2f}",
            f"{(r['gap_p99'] - direct['gap_p99']) * MS:.2f}")
        cpu = f"{r['cpu_per_10k']:.3f}" if "cpu_per_10k" in r else "-"
        print(f"  {name:10s}{r['gap_p50'] * MS:9.2f}{r['gap_p99'] * MS:9.2f}{added[0]:>8s}"
              f"{added[1]:>8s}{r['ttfb_p50'] * MS:10.2f}{r['ttfb_p99'] * MS:10.2f}"
              f"{r['failed']:8d}{r['stalled']:8d}{cpu:>11s}")
    # On 2 cores the backend and the clients compete with the proxy for the same CPU.
    print("  the rest of the machine, CPU s/10k chunks (direct run): backend "
          f"{direct['backend_cpu_per_10k']:.3f}, clients {direct['client_cpu_per_10k']:.3f}; "
          f"load average {os.getloadavg()[0]:.1f}")


def _added_p99_ms(by_path: dict[str, dict[str, Any]], name: str) -> float:
    return float((by_path[name]["gap_p99"] - by_path["direct"]["gap_p99"]) * MS)


def _summary(results: dict[int, dict[str, dict[str, Any]]]) -> None:
    levels = sorted(results)
    proxies = [name for name in results[levels[0]] if name != "direct"]
    has_nginx = "nginx" in proxies
    baselines = [name for name in proxies if not name.startswith("router")]
    print("\n================ router (project) vs " + " and ".join(baselines or ["nothing"])
          + " (baseline) ================")
    print(f"{'streams':>8s}" + "".join(f"{name + ' +p99 ms':>19s}" for name in proxies)
          + "".join(f"{name + ' CPU/10k':>19s}" for name in proxies)
          + "".join(f"{'router/' + name + ' CPU':>19s}" for name in baselines))
    for level in levels:
        r = results[level]
        print(f"{level:8d}" + "".join(f"{_added_p99_ms(r, n):19.2f}" for n in proxies)
              + "".join(f"{r[n]['cpu_per_10k']:19.3f}" for n in proxies)
              + "".join(f"{r['router']['cpu_per_10k'] / r[n]['cpu_per_10k']:18.2f}x"
                        for n in baselines))
    for router in (name for name in proxies if name.startswith("router")):
        holding = [lv for lv in levels if _added_p99_ms(results[lv], router) <= HOLD_ADDED_P99_MS
                   and results[lv][router]["failed"] == 0]
        print(f"\nhighest level where {router} adds <= {HOLD_ADDED_P99_MS:.0f} ms at p99: "
              f"{max(holding) if holding else 'none'} (of {', '.join(map(str, levels))})")
    _targets(results, has_nginx)


def _verdict(ok: bool) -> str:
    return "MET" if ok else "MISSED"


def _targets(results: dict[int, dict[str, dict[str, Any]]], has_nginx: bool) -> None:
    if TARGET_LEVEL in results:
        added = _added_p99_ms(results[TARGET_LEVEL], "router")
        print(f"target: {TARGET_LEVEL} streams, router adds <= {TARGET_ADDED_P99_MS} ms at p99: "
              f"{added:.2f} ms {_verdict(added <= TARGET_ADDED_P99_MS)}")
    if TARGET_STALL_FREE_LEVEL in results:
        r = results[TARGET_STALL_FREE_LEVEL]["router"]
        bad = r["failed"] + r["stalled"]
        print(f"target: {TARGET_STALL_FREE_LEVEL} streams through the router, 0 failed or "
              f"stalled: {r['failed']} failed, {r['stalled']} stalled {_verdict(bad == 0)}")
    if has_nginx:
        top = max(results)
        ratio = results[top]["router"]["cpu_per_10k"] / results[top]["nginx"]["cpu_per_10k"]
        print(f"target: router CPU per chunk <= {TARGET_CPU_RATIO:.0f}x nginx's (at {top} "
              f"streams): {ratio:.2f}x {_verdict(ratio <= TARGET_CPU_RATIO)}")


def _router_saw(port: int, token: str, streams: int) -> None:
    """The router's own measurements must have kept counting through the load."""
    stats = httpx.get(f"http://127.0.0.1:{port}/admin/stats", params={"model": MODEL},
                      headers={"authorization": f"Bearer {token}"}, timeout=10).json()
    backend = stats["backends"]["bench-backend"]
    print(f"router's own measurements: {backend['requests']} requests of {streams} sent, "
          f"{backend['errors']['total']} errors, TTFT p50 "
          f"{(backend['ttft_s']['p50'] or 0) * MS:.2f} ms, {backend['in_flight']} in flight")


def _keeper_command(replicas: int, port: int, state: Path, stats_dir: Path) -> list[str]:
    """`replicas` routers on one socket the keeper listens on, as the local platform runs them
    (serving.platforms.local.router_process)."""
    router = router_command(sys.executable, port, state)
    at = router.index("--port")
    del router[at : at + 2]  # the keeper passes its socket instead (--fd)
    return [sys.executable, "-m", KEEPER, "--replicas", str(replicas), "--listen-port",
            str(port), "--", *router, "--stats-dir", str(stats_dir)]


def _bench(args: argparse.Namespace) -> None:
    levels = [int(x) for x in args.levels.split(",")] if args.levels else \
        list(QUICK_LEVELS if args.quick else LEVELS)
    tokens = args.chunks or (QUICK_CHUNKS if args.quick else CHUNKS)
    workdir = Path(tempfile.mkdtemp(prefix="streams-bench-"))
    backend_port, router_port, nginx_port = free_port(), free_port(), free_port()
    state = workdir / "routes.json"
    state.write_text(json.dumps({"models": {MODEL: [
        {"name": "bench-backend", "url": f"http://127.0.0.1:{backend_port}", "weight": 100}]}}))
    token = secrets.token_hex(16)
    nginx = find_nginx()
    print(f"cores={os.cpu_count()} load={os.getloadavg()[0]:.2f} levels={levels} "
          f"chunks/stream={tokens} every {TOKEN_INTERVAL_S * MS:.0f} ms workdir={workdir}")
    with ExitStack() as running:
        backend_proc = running.enter_context(process(
            [sys.executable, __file__, "--backend", "--port", str(backend_port)], backend_port,
            workdir / "backend.log"))
        paths = [_Path("direct", backend_port, None)]
        routers = {"router": REPO, **({BEFORE: args.router_before} if args.router_before else {})}
        for name, repo in routers.items():
            port = router_port if name == "router" else free_port()
            command = router_command(sys.executable, port, state)
            if repo == REPO:
                command += ["--stats-dir", str(workdir / f"{name}-stats")]
            proc = running.enter_context(process(
                command, port, workdir / f"{name}.log", env={ADMIN_TOKEN_ENV: token}, repo=repo))
            paths.append(_Path(name, port, Cpu.of(proc)))
        if args.routers > 1:
            name, port = f"router x{args.routers}", free_port()
            proc = running.enter_context(process(
                _keeper_command(args.routers, port, state, workdir / "replicas-stats"), port,
                workdir / "replicas.log", env={ADMIN_TOKEN_ENV: token}))
            paths.append(_Path(name, port, Cpu.of(proc)))
        if nginx is None:
            print("nginx not installed (apt-get install -y nginx): skipping the nginx path")
        else:
            conf = nginx_conf(workdir, nginx_port, backend_port)
            nginx_proc = running.enter_context(process(
                [nginx, "-c", str(conf), "-p", str(workdir), "-g", "daemon off;"], nginx_port,
                workdir / "nginx.log"))
            paths.append(_Path("nginx", nginx_port, Cpu.of(nginx_proc)))
        results = _measure(paths, Cpu.of(backend_proc), levels, tokens)
        _router_saw(router_port, token, sum(levels))
    _summary(results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help=f"levels {QUICK_LEVELS}, {QUICK_CHUNKS} chunks per stream")
    parser.add_argument("--levels", help="comma-separated stream counts")
    parser.add_argument("--chunks", type=int, help="chunks per stream")
    parser.add_argument("--router-before", type=Path, metavar="CHECKOUT",
                        help="also run the router of another checkout (e.g. a worktree of the "
                             "commit before a change), as the path 'before'")
    parser.add_argument("--routers", type=int, default=1, metavar="N",
                        help="also run N router processes on one socket (the router scaled "
                             "out), as the path 'router xN'")
    parser.add_argument("--backend", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--load", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--streams", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.backend:
        install_uvloop()
        asyncio.run(_serve_backend(args.port))
    elif args.load:
        install_uvloop()
        print(json.dumps(asyncio.run(_hold_streams(args.port, args.streams, args.chunks))))
    else:
        _bench(args)


if __name__ == "__main__":
    main()
