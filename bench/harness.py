"""What the router benches share: the processes under test and how their cost is read.

Each process (backend, router, nginx, load generator) runs apart, so none starves another's
event loop; the router is started as the product starts it (``python -m serving.router`` with
a state file and an admin token from the environment), nginx as the plain reverse proxy a user
would otherwise pick.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil

REPO = Path(__file__).resolve().parents[1]
READY_TIMEOUT_S = 15.0
NGINX_KEEPALIVE = 128
# Thousands of streams connect within a second: the kernel's default backlog (511) drops SYNs.
LISTEN_BACKLOG = 4096
ADMIN_TOKEN_ENV = "BENCH_ROUTER_ADMIN_TOKEN"


def install_uvloop() -> bool:
    try:
        import uvloop
    except ImportError:
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(port: int, path: str = "/health") -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}{path}", timeout=0.5).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing healthy on port {port}")


@contextmanager
def process(cmd: list[str], port: int, log: Path, ready_path: str = "/health",
            env: dict[str, str] | None = None, repo: Path = REPO
            ) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``cmd`` with ``repo``'s packages (another checkout: the code before a change)."""
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, cwd=repo, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONPATH": str(repo), **(env or {})})
    try:
        wait_http(port, ready_path)
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def router_command(python: str, port: int, state_file: Path) -> list[str]:
    """The argv serving.platforms.local.router_process uses (admin API on, as in production)."""
    return [python, "-m", "serving.router", "--port", str(port), "--state-file",
            str(state_file), "--admin-token-env", ADMIN_TOKEN_ENV, "--log-level", "warning"]


def find_nginx() -> str | None:
    return shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists()
                                     else None)


def nginx_conf(workdir: Path, listen: int, upstream: int) -> Path:
    """One worker (the router is one process too), keepalive upstream, no buffering."""
    for sub in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (workdir / sub).mkdir(exist_ok=True)
    conf = workdir / "nginx.conf"
    conf.write_text(f"""
worker_processes 1;
pid {workdir}/nginx.pid;
error_log {workdir}/error.log warn;
events {{ worker_connections 16384; }}
http {{
    access_log off;
    keepalive_requests 10000000;
    client_body_temp_path {workdir}/client_body;
    proxy_temp_path {workdir}/proxy;
    fastcgi_temp_path {workdir}/fastcgi;
    uwsgi_temp_path {workdir}/uwsgi;
    scgi_temp_path {workdir}/scgi;
    upstream backend {{
        server 127.0.0.1:{upstream};
        keepalive {NGINX_KEEPALIVE};
        keepalive_requests 10000000;
    }}
    server {{
        listen 127.0.0.1:{listen} backlog={LISTEN_BACKLOG};
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_read_timeout 600s;
        }}
    }}
}}
""")
    return conf


def pct(values: list[float], p: float) -> float:
    """Nearest-rank percentile of unsorted values (nan when empty)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered)) - 1))]


@dataclass
class Cpu:
    """User + system CPU seconds of a process and its children (nginx's workers)."""

    proc: psutil.Process

    @classmethod
    def of(cls, popen: subprocess.Popen[bytes]) -> Cpu:
        return cls(psutil.Process(popen.pid))

    def seconds(self) -> float:
        total = 0.0
        for p in [self.proc, *self.proc.children(recursive=True)]:
            times = p.cpu_times()
            total += times.user + times.system
        return total
