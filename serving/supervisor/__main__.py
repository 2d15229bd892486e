"""One release's engine, supervised: python -m serving.supervisor --model NAME --weights PATH
--port N.

This process is the release's "container" on the local target: as Modal replaces a container
whose engine died, it restarts a crashed engine on the same port (backoff, up to a limit:
serving.core.restarts), and reports every step as an event on stdout."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import FrameType

from serving.config.loader import load_profile
from serving.config.profile import Profile, ProfileError
from serving.core.redaction import API_KEY_ENV
from serving.core.restarts import DEFAULT_RESTART_LIMIT, FIRST_BACKOFF_SECONDS, RestartPolicy
from serving.engines.engine import (
    FAULT_ENGINES_ENV,
    engine_command,
    fault_engine_command,
    request_model,
    write_secrets_config,
)
from serving.engines.sglang import Command
from serving.supervisor.events import EventKind, ServerEvent
from serving.supervisor.supervisor import (
    DEFAULT_DRAIN_SECONDS,
    EngineFailed,
    ProbeFailed,
    ShutdownRequested,
    Supervisor,
    logger,
    new_release_id,
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m serving.server", description="Supervise one release's engine."
    )
    parser.add_argument("--model", required=True, help="profile name (models/NAME.yaml)")
    parser.add_argument(
        "--weights", required=True, type=Path, help="the revision's weights directory"
    )
    parser.add_argument("--port", required=True, type=int)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--release-id", default=None)
    parser.add_argument("--deepgemm", type=Path, default=None, help="DeepGEMM cache directory")
    parser.add_argument("--drain-seconds", type=float, default=DEFAULT_DRAIN_SECONDS)
    parser.add_argument("--startup-budget", type=float, default=None, help="default: the profile's")
    parser.add_argument("--api-key-env", default=API_KEY_ENV, help="variable holding the API key")
    parser.add_argument("--restart-limit", type=int, default=DEFAULT_RESTART_LIMIT,
                        help="engine crashes in a row restarted before the release is dead")
    parser.add_argument("--restart-backoff", type=float, default=FIRST_BACKOFF_SECONDS,
                        help="seconds before the first restart; doubles with each crash")
    parser.add_argument("--dummy-weights", action="store_true",
                        help="serve random weights of the model (--weights: config, tokenizer)")
    return parser.parse_args(argv)  # fmt: skip


def _emit(event: ServerEvent) -> None:
    print(event.model_dump_json(exclude_none=True), flush=True)


class _Release:
    """Start the engine, then serve until a signal; restart it after each crash, as the policy
    decides. Returns the process's exit code."""

    def __init__(self, args: argparse.Namespace, profile: Profile, command: Command,
                 api_key: str | None, release_id: str) -> None:  # fmt: skip
        self.args, self.profile, self.command = args, profile, command
        self.api_key, self.release_id = api_key, release_id
        self.policy = RestartPolicy(
            limit=args.restart_limit, first_backoff_seconds=args.restart_backoff
        )
        self.shutdown = threading.Event()
        self.wake = threading.Event()  # a crash or a signal
        self.crash: EngineFailed | None = None
        self.starting = False
        self.restarts = 0

    def on_signal(self, signum: int, _frame: FrameType | None) -> None:
        first = not self.shutdown.is_set()
        self.shutdown.set()
        self.wake.set()
        # Interrupt a start in progress (once); a serving release notices the event.
        if first and self.starting:
            raise ShutdownRequested(signal.Signals(signum).name)

    def on_crash(self, failure: EngineFailed) -> None:
        self.crash = failure
        self.wake.set()

    def emit(self, kind: EventKind, **fields: object) -> None:
        _emit(ServerEvent(event=kind, model=self.profile.name, release_id=self.release_id,
                          restarts=self.restarts, **fields))  # type: ignore[arg-type]

    def run(self) -> int:
        try:
            supervisor = self._start()
        except (EngineFailed, ProbeFailed) as exc:
            logger.error("[%s] release failed: %s", self.profile.name, exc)
            self.emit("failed", error=str(exc))
            return 1
        except ShutdownRequested:
            self.emit("stopped", error="shutdown requested during startup")
            return 0
        crashes_in_row = 0
        while True:
            served_since = time.monotonic()
            self.wake.wait()
            if self.shutdown.is_set():
                supervisor.stop(self.args.drain_seconds)
                self.emit("stopped")
                return 0
            self.wake.clear()
            failure, self.crash = self.crash, None
            supervisor.stop(drain_seconds=0)  # reaps what is left of its group
            while True:  # a restart that fails to start is the next crash of the row
                decision = self.policy.after_crash(
                    crashes_in_row, time.monotonic() - served_since
                )
                crashes_in_row = decision.attempt
                if not decision.restart:
                    self.emit("crashed", error=f"{decision.reason}: {failure}")
                    return 1
                logger.warning("[%s] engine crashed; %s", supervisor.label, decision.reason)
                self.emit("restarting", error=f"{decision.reason}: {failure}")
                if self.shutdown.wait(decision.delay_seconds):
                    self.emit("stopped")
                    return 0
                self.restarts += 1
                served_since = time.monotonic()
                try:
                    supervisor = self._start()
                    break
                except (EngineFailed, ProbeFailed) as exc:
                    failure = EngineFailed(str(exc))
                except ShutdownRequested:
                    self.emit("stopped", error="shutdown requested during a restart")
                    return 0

    def _start(self) -> Supervisor:
        args = self.args
        supervisor = Supervisor(
            self.profile, self.command, port=args.port, host=args.host,
            model=request_model(self.profile, args.weights), api_key=self.api_key,
            release_id=self.release_id, on_crash=self.on_crash,
        )  # fmt: skip
        self.starting = True
        try:
            if self.shutdown.is_set():  # a signal before the start: it is interrupted too
                raise ShutdownRequested("before the start")
            startup_seconds = supervisor.startup(args.startup_budget)
        except BaseException:
            supervisor.stop(drain_seconds=0)  # a signal may land after startup() returned
            raise
        finally:
            self.starting = False
        self.emit(
            "ready", url=supervisor.base_url, pid=os.getpid(), engine_pid=supervisor.pid,
            startup_seconds=round(startup_seconds, 3),
        )  # fmt: skip
        return supervisor


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per health poll otherwise
    release_id = args.release_id or new_release_id()
    try:
        profile = load_profile(args.model)
        if args.dummy_weights:
            profile = profile.with_dummy_weights()
    except ProfileError as exc:
        _emit(ServerEvent(event="failed", model=args.model, release_id=release_id, error=str(exc)))
        return 2
    api_key = os.environ.get(args.api_key_env) or None
    with tempfile.TemporaryDirectory(prefix="rollout-engine-") as private:
        command = fault_engine_command(f"{profile.name}-{release_id}", args.port)
        if command is not None:
            logger.warning("%s: FAULT INJECTION: serving a fake engine (%s)", release_id,
                        FAULT_ENGINES_ENV)  # fmt: skip
        else:
            command = engine_command(
                profile,
                weights_path=args.weights,
                deepgemm_path=args.deepgemm,
                port=args.port,
                host=args.host,
                secrets_config=write_secrets_config(Path(private), api_key),
            )
        release = _Release(args, profile, command, api_key, release_id)
        signal.signal(signal.SIGTERM, release.on_signal)
        signal.signal(signal.SIGINT, release.on_signal)
        return release.run()


if __name__ == "__main__":
    sys.exit(main())
