"""The router as a process under uvicorn (``python -m serving.router``), polling a state file.

It listens on --port, or serves on a socket its parent already listens on (--fd): the local
keeper holds that socket across router restarts, so connections wait in its backlog instead
of being refused while the next router starts, and splits it among N replicas. With
--stats-dir, each replica publishes its measurements there every second (a head file and chunk
files per replica), for the orchestrator to merge.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
from collections.abc import Callable
from pathlib import Path

from serving.core.files import write_atomically
from serving.router.app import RouterApp
from serving.router.config import (
    DEFAULT_CONNECT_TIMEOUT_S,
    DEFAULT_FIRST_BYTE_TIMEOUT_S,
    DEFAULT_POLL_INTERVAL_S,
    DEFAULT_TOTAL_TIMEOUT_S,
    RouterConfig,
)
from serving.router.slices import Published
from serving.router.table import RoutingTable

logger = logging.getLogger("rollout.router")


def state_file_poll(path: Path) -> Callable[[], RoutingTable | None]:
    """A routing_poll reading a JSON RoutingTable that writers replace atomically.

    Parses only when the file's (inode, mtime, size) changed; a missing file means no change.
    """
    last_seen: list[tuple[int, int, int] | None] = [None]

    def poll() -> RoutingTable | None:
        try:
            st = path.stat()
        except FileNotFoundError:
            return None
        key = (st.st_ino, st.st_mtime_ns, st.st_size)
        if key == last_seen[0]:
            return None
        table = RoutingTable.model_validate_json(path.read_bytes())
        last_seen[0] = key
        return table

    return poll


HEAD_SUFFIX = ".head.json"


def head_file(directory: Path, replica: str) -> Path:
    return directory / f"{replica}{HEAD_SUFFIX}"


def chunk_file(directory: Path, replica: str, chunk: int) -> Path:
    return directory / f"{replica}.{chunk}.chunk.json"


def stats_dir_publish(directory: Path) -> Callable[[Published], None]:
    """A stats_publish writing a replica's changed chunks, then its head, into `directory`,
    each file replaced atomically: a reader never sees half of one."""

    def publish(published: Published) -> None:
        for chunk, data in published.chunks.items():
            write_atomically(chunk_file(directory, published.replica, chunk), data.decode())
        for chunk in published.gone:
            chunk_file(directory, published.replica, chunk).unlink(missing_ok=True)
        write_atomically(head_file(directory, published.replica), published.head.decode())

    return publish


def fastest_uvicorn_impls() -> tuple[str, str]:
    """uvloop + httptools when installed: measured ~2x the throughput of asyncio + h11."""
    try:
        import uvloop  # noqa: F401

        loop = "uvloop"
    except ImportError:
        loop = "asyncio"
    try:
        import httptools  # noqa: F401

        http = "httptools"
    except ImportError:
        http = "h11"
    return loop, http


def main(argv: list[str] | None = None) -> None:
    import uvicorn
    from uvicorn.server import STARTUP_FAILURE

    args = _parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = RouterConfig(
        admin_token=_secret_from_env(args.admin_token_env),
        client_api_key=_secret_from_env(args.client_api_key_env),
        connect_timeout_s=args.connect_timeout,
        first_byte_timeout_s=args.first_byte_timeout,
        total_timeout_s=args.total_timeout,
        routing_poll=state_file_poll(args.state_file) if args.state_file else None,
        poll_interval_s=args.poll_interval,
        stats_publish=stats_dir_publish(args.stats_dir) if args.stats_dir else None,
    )
    loop, http = fastest_uvicorn_impls()
    listening = f"inherited socket (fd {args.fd})" if args.fd is not None else (
        f"{args.host}:{args.port}")
    logger.info("router on %s (loop=%s, http=%s, admin api %s)", listening, loop, http,
                "enabled" if config.admin_token else "disabled")
    server = uvicorn.Server(uvicorn.Config(
        RouterApp(config), host=args.host, port=args.port or 0, loop=loop, http=http,
        lifespan="on", access_log=False, log_level=args.log_level, timeout_keep_alive=75,
        # the router never reads the client address: skip the X-Forwarded-* middleware
        proxy_headers=False,
    ))
    # socket(fileno=...) reads the family (IPv4/IPv6) from the descriptor itself.
    server.run(sockets=None if args.fd is None else [socket.socket(fileno=args.fd)])
    if not server.started:  # as uvicorn.run: a failed startup is a failed process
        raise SystemExit(STARTUP_FAILURE)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m serving.router",
                                     description="Weighted canary router in front of releases.")
    parser.add_argument("--host", default="127.0.0.1")
    listen = parser.add_mutually_exclusive_group(required=True)
    listen.add_argument("--port", type=int)
    listen.add_argument("--fd", type=int, help="serve on this inherited, listening socket")
    parser.add_argument("--state-file", type=Path, help="JSON RoutingTable, polled every second")
    parser.add_argument("--stats-dir", type=Path,
                        help="publish this replica's measurements here every second")
    parser.add_argument("--admin-token-env", help="env var holding the admin Bearer token")
    parser.add_argument("--client-api-key-env", help="env var holding the client API key")
    parser.add_argument("--connect-timeout", type=float, default=DEFAULT_CONNECT_TIMEOUT_S)
    parser.add_argument("--first-byte-timeout", type=float, default=DEFAULT_FIRST_BYTE_TIMEOUT_S)
    parser.add_argument("--total-timeout", type=float, default=DEFAULT_TOTAL_TIMEOUT_S)
    parser.add_argument("--poll-interval", type=float, default=DEFAULT_POLL_INTERVAL_S)
    parser.add_argument("--log-level", default="info")
    return parser.parse_args(argv)


def _secret_from_env(var: str | None) -> str | None:
    if not var:
        return None
    value = os.environ.get(var)
    if not value:
        raise SystemExit(f"environment variable {var} is empty or unset")
    return value
