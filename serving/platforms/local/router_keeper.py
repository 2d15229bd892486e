"""The local router's "container": python -m serving.platforms.local.router_keeper
[--restart-limit N] [--restart-backoff S] -- <the router's argv>.

Runs the router as its child, in the keeper's process group (stopping the group stops both),
and starts it again when it dies (backoff, up to a limit: serving.core.restarts), as Modal
replaces a dead router container. A restarted router reads its routes from the state file
before it answers (the generation rule keeps a newer pushed table); its measurements start
afresh, which its stats say (`measured_since`). SIGTERM or SIGINT stops the router, then the keeper.
"""

from __future__ import annotations

import argparse
import logging
import signal
import subprocess
import sys
import threading
import time
from types import FrameType

from serving.core.restarts import DEFAULT_RESTART_LIMIT, FIRST_BACKOFF_SECONDS, RestartPolicy

logger = logging.getLogger("rollout.router.keeper")
ROUTER_ARGV = "--"  # what follows is the router's command line
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"  # the router's own


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m serving.platforms.local.router_keeper",
                                     description="Run the router; restart it when it dies.")
    parser.add_argument("--restart-limit", type=int, default=DEFAULT_RESTART_LIMIT)
    parser.add_argument("--restart-backoff", type=float, default=FIRST_BACKOFF_SECONDS)
    argv = sys.argv[1:] if argv is None else argv
    if ROUTER_ARGV not in argv or argv.index(ROUTER_ARGV) == len(argv) - 1:
        parser.error(f"the router's argv is missing (after {ROUTER_ARGV})")
    split = argv.index(ROUTER_ARGV)
    args = parser.parse_args(argv[:split])
    args.router = argv[split + 1 :]
    return args  # fmt: skip


class _Keeper:
    def __init__(self, router: list[str], policy: RestartPolicy) -> None:
        self.router, self.policy = router, policy
        self.stopping = threading.Event()
        self.child: subprocess.Popen[bytes] | None = None

    def on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self.stopping.set()
        self._stop_child()

    def _stop_child(self) -> None:
        child = self.child
        if child is not None and child.poll() is None:
            child.send_signal(signal.SIGTERM)

    def run(self) -> int:
        crashes_in_row = 0
        while not self.stopping.is_set():
            started = time.monotonic()
            # Output goes where the keeper's goes: the router's log.
            self.child = subprocess.Popen(self.router, stdin=subprocess.DEVNULL)
            if self.stopping.is_set():  # a signal between the check and the start
                self._stop_child()
            code = self.child.wait()
            if self.stopping.is_set():
                break
            decision = self.policy.after_crash(crashes_in_row, time.monotonic() - started)
            crashes_in_row = decision.attempt
            logger.warning("router (pid %d) exited with code %s; %s", self.child.pid, code,
                           decision.reason)  # fmt: skip
            if not decision.restart:
                return 1
            if self.stopping.wait(decision.delay_seconds):
                break
        return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    keeper = _Keeper(args.router, RestartPolicy(limit=args.restart_limit,
                                                first_backoff_seconds=args.restart_backoff))
    signal.signal(signal.SIGTERM, keeper.on_signal)
    signal.signal(signal.SIGINT, keeper.on_signal)
    return keeper.run()


if __name__ == "__main__":
    sys.exit(main())
