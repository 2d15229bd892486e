"""The local router's "containers": python -m serving.platforms.local.router_keeper
[--restart-limit N] [--restart-backoff S] [--replicas N] [--listen-host H --listen-port P]
-- <the router's argv>.

Runs N routers (replicas) as its children, in the keeper's process group (stopping the group
stops all), and starts each again when it dies (backoff, up to a limit: serving.core.restarts),
as Modal replaces a dead router container; a replica that reaches the limit stops them all. A
restarted router reads its routes from the state file before it answers (the generation rule
keeps a newer pushed table); what it had measured and not yet published is lost, which the
merged stats say (`measured_since`). SIGTERM or SIGINT stops the routers, then the keeper.

With --listen-port the keeper itself binds and listens on the router's port and hands the socket
to each router it starts (`--fd N` appended to the router's argv), as Modal's load balancer
queues requests while a container is replaced: a connection made while the router restarts
waits in the listen backlog for the next router instead of being refused. Requests the dead
router had already accepted still fail. Every replica accepts on that one socket, and the
kernel hands each connection to one of them: the local stand-in for Modal's load balancing.
"""

from __future__ import annotations

import argparse
import logging
import signal
import socket
import subprocess
import sys
import threading
import time
from types import FrameType

from serving.core.restarts import DEFAULT_RESTART_LIMIT, FIRST_BACKOFF_SECONDS, RestartPolicy

logger = logging.getLogger("rollout.router.keeper")
ROUTER_ARGV = "--"  # what follows is the router's command line
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"  # the router's own
# Connections that may wait for a restarting router (uvicorn's own default backlog).
LISTEN_BACKLOG = 2048
SIGNAL_CHECK_SECONDS = 0.5


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m serving.platforms.local.router_keeper",
                                     description="Run the router; restart it when it dies.")
    parser.add_argument("--restart-limit", type=int, default=DEFAULT_RESTART_LIMIT)
    parser.add_argument("--restart-backoff", type=float, default=FIRST_BACKOFF_SECONDS)
    parser.add_argument("--replicas", type=int, default=1, help="routers on the one socket")
    parser.add_argument("--listen-host", default="127.0.0.1")
    parser.add_argument("--listen-port", type=int,
                        help="listen here and pass the socket to the router (--fd)")
    argv = sys.argv[1:] if argv is None else argv
    if ROUTER_ARGV not in argv or argv.index(ROUTER_ARGV) == len(argv) - 1:
        parser.error(f"the router's argv is missing (after {ROUTER_ARGV})")
    split = argv.index(ROUTER_ARGV)
    args = parser.parse_args(argv[:split])
    if args.replicas < 1:
        parser.error("--replicas must be at least 1")
    args.router = argv[split + 1 :]
    return args  # fmt: skip


def listen(host: str, port: int) -> socket.socket:
    """The router's listening socket, held by the keeper for the lives of all its routers."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise SystemExit(f"router keeper cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(LISTEN_BACKLOG)
    return sock


class _Keeper:
    def __init__(self, router: list[str], policy: RestartPolicy,
                 sock: socket.socket | None) -> None:
        self.policy = policy
        self.inherited: tuple[int, ...] = () if sock is None else (sock.fileno(),)
        self.router = router + [arg for fd in self.inherited for arg in ("--fd", str(fd))]
        self.stopping = threading.Event()
        self.children: dict[int, subprocess.Popen[bytes]] = {}
        self.gave_up = threading.Event()

    def on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self.stopping.set()
        self._stop_children()

    def _stop_children(self) -> None:
        for child in list(self.children.values()):
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)

    def run(self, replicas: int) -> int:
        threads = [threading.Thread(target=self.keep, args=(replica,), name=f"replica-{replica}")
                   for replica in range(replicas)]  # fmt: skip
        for thread in threads:
            thread.start()
        # A signal handler runs on the main thread only between bytecodes: wait in slices.
        while any(thread.is_alive() for thread in threads):
            for thread in threads:
                thread.join(SIGNAL_CHECK_SECONDS)
        return 1 if self.gave_up.is_set() else 0

    def keep(self, replica: int) -> None:
        """One replica, started again whenever it dies, until the keeper stops or gives up."""
        crashes_in_row = 0
        while not self.stopping.is_set():
            started = time.monotonic()
            # Output goes where the keeper's goes: the router's log.
            child = self.children[replica] = subprocess.Popen(
                self.router, stdin=subprocess.DEVNULL, pass_fds=self.inherited)
            if self.stopping.is_set():  # a signal between the check and the start
                self._stop_children()
            code = child.wait()
            if self.stopping.is_set():
                break
            decision = self.policy.after_crash(crashes_in_row, time.monotonic() - started)
            crashes_in_row = decision.attempt
            logger.warning("router (pid %d) exited with code %s; %s", child.pid, code,
                           decision.reason)  # fmt: skip
            if not decision.restart:
                self.gave_up.set()
                self.stopping.set()
                self._stop_children()
                return
            if self.stopping.wait(decision.delay_seconds):
                break


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    sock = None if args.listen_port is None else listen(args.listen_host, args.listen_port)
    keeper = _Keeper(args.router, RestartPolicy(limit=args.restart_limit,
                                                first_backoff_seconds=args.restart_backoff), sock)
    signal.signal(signal.SIGTERM, keeper.on_signal)
    signal.signal(signal.SIGINT, keeper.on_signal)
    return keeper.run(args.replicas)


if __name__ == "__main__":
    sys.exit(main())
