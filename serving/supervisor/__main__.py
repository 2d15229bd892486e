"""One release's engine, supervised: python -m serving.supervisor --model NAME --weights PATH
--port N."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import tempfile
import threading
from pathlib import Path
from types import FrameType

from serving.config.loader import load_profile
from serving.config.profile import ProfileError
from serving.core.redaction import API_KEY_ENV
from serving.engines.engine import (
    FAULT_ENGINES_ENV,
    engine_command,
    fault_engine_command,
    request_model,
    write_secrets_config,
)
from serving.supervisor.events import ServerEvent
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
    return parser.parse_args(argv)


def _emit(event: ServerEvent) -> None:
    print(event.model_dump_json(exclude_none=True), flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per health poll otherwise
    release_id = args.release_id or new_release_id()
    try:
        profile = load_profile(args.model)
    except ProfileError as exc:
        _emit(ServerEvent(event="failed", model=args.model, release_id=release_id, error=str(exc)))
        return 2
    api_key = os.environ.get(args.api_key_env) or None
    shutdown = threading.Event()
    ready = threading.Event()
    crashes: list[EngineFailed] = []

    def on_crash(failure: EngineFailed) -> None:
        crashes.append(failure)
        shutdown.set()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        first = not shutdown.is_set()
        shutdown.set()
        # Interrupt a startup in progress (once); after ready, the main loop notices the event.
        if first and not ready.is_set():
            raise ShutdownRequested(signal.Signals(signum).name)

    event = {"model": profile.name, "release_id": release_id}
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
        supervisor = Supervisor(
            profile,
            command,
            port=args.port,
            host=args.host,
            model=request_model(profile, args.weights),
            api_key=api_key,
            release_id=release_id,
            on_crash=on_crash,
        )
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        try:
            startup_seconds = supervisor.startup(args.startup_budget)
            ready.set()
            _emit(
                ServerEvent(
                    event="ready", url=supervisor.base_url, pid=os.getpid(),
                    engine_pid=supervisor.pid, startup_seconds=round(startup_seconds, 3), **event,
                )
            )  # fmt: skip
            while not shutdown.wait(timeout=1.0):
                pass
        except (EngineFailed, ProbeFailed) as exc:
            logger.error("[%s] release failed: %s", supervisor.label, exc)
            _emit(ServerEvent(event="failed", error=str(exc), **event))
            return 1
        except ShutdownRequested:
            _emit(ServerEvent(event="stopped", error="shutdown requested during startup", **event))
            return 0
        finally:
            supervisor.stop(args.drain_seconds)
        if crashes:
            _emit(ServerEvent(event="crashed", error=str(crashes[0]), **event))
            return 1
        _emit(ServerEvent(event="stopped", **event))
        return 0


if __name__ == "__main__":
    sys.exit(main())
