"""Fixtures for tests/test_weights.py: the shared mirror, a fault proxy, a private tmpfs.

`FaultProxy` exists because the mirror's ErrorFault matches a URL path whatever the method, and a
file's HEAD and GET share one path: huggingface_hub retries a failed HEAD for ~23 s of backoff
before it ever sends the GET, so a file-GET 5xx (the case it does NOT retry) cannot be produced
quickly with the mirror's knob alone. The proxy fails only GETs and forwards everything else, so
the mirror's request log still shows what reached it.
"""

from __future__ import annotations

import contextlib
import fnmatch
import http.client
import shutil
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from dev.mirror import MirrorServer

PROXY_CHUNK = 1024 * 1024
UPSTREAM_TIMEOUT_S = 30.0
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
    "proxy-authorization", "proxy-authenticate", "server", "date",
})  # fmt: skip


class FaultProxy:
    """An HTTP proxy in front of the mirror that answers `status` to matching GETs."""

    def __init__(self, upstream: str) -> None:
        split = urlsplit(upstream)
        self.upstream_host = split.hostname or "127.0.0.1"
        self.upstream_port = split.port or 80
        self.fail_glob: str | None = None
        self.fail_times: int | None = None  # None = every time
        self.status = 503
        self.failed = 0
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def fail_gets(self, glob: str, times: int | None = None, status: int = 503) -> None:
        with self._lock:
            self.fail_glob, self.fail_times, self.status, self.failed = glob, times, status, 0

    def should_fail(self, method: str, path: str) -> bool:
        with self._lock:
            if method != "GET" or self.fail_glob is None:
                return False
            if not fnmatch.fnmatchcase(path, self.fail_glob):
                return False
            if self.fail_times is not None and self.failed >= self.fail_times:
                return False
            self.failed += 1
            return True

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()


def _make_handler(proxy: FaultProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_HEAD(self) -> None:
            self._forward()

        def do_GET(self) -> None:
            self._forward()

        def _forward(self) -> None:
            path = unquote(urlsplit(self.path).path)
            if proxy.should_fail(self.command, path):
                body = b'{"error": "injected by FaultProxy"}'
                self.send_response(proxy.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
            upstream = http.client.HTTPConnection(
                proxy.upstream_host, proxy.upstream_port, timeout=UPSTREAM_TIMEOUT_S
            )
            try:
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                upstream.request(self.command, self.path, headers=headers)
                response = upstream.getresponse()
                self.send_response(response.status, response.reason)
                for key, value in response.getheaders():
                    if key.lower() not in HOP_BY_HOP:
                        self.send_header(key, value)
                self.end_headers()
                if self.command != "HEAD":
                    while chunk := response.read(PROXY_CHUNK):
                        self.wfile.write(chunk)
            finally:
                upstream.close()

    return Handler


@pytest.fixture
def fault_proxy(mirror: MirrorServer) -> Iterator[FaultProxy]:
    with FaultProxy(mirror.url) as proxy:
        yield proxy


def can_mount_private_tmpfs() -> bool:
    """`unshare -rm` gives a private mount namespace in which an unprivileged tmpfs mount works."""
    if shutil.which("unshare") is None:
        return False
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        probe = subprocess.run(
            ["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /tmp"],
            capture_output=True,
            timeout=10,
        )
        return probe.returncode == 0
    return False


def in_tiny_tmpfs(mount_point: Path, size_bytes: int, argv: list[str]) -> list[str]:
    """argv run with a tmpfs of `size_bytes` mounted at `mount_point`, visible to it alone
    (a private mount namespace: nothing to unmount afterwards, nothing leaks to the host)."""
    script = f'mount -t tmpfs -o size={size_bytes} tmpfs "{mount_point}" && exec "$@"'
    return ["unshare", "-rm", "sh", "-c", script, "sh", *argv]
