"""A release's supervisor restarts its crashed engine, as Modal replaces a dead container: on
the same port, after a backoff, up to a limit, with every step reported as an event.

The engine is the FAKE engine (tests/fake_engine.py, through the supervisor's fault-injection
variable): it starts in a second, and a SIGKILL is a crash a real engine cannot stage on cue.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import httpx
import pytest

from serving.core.procs import free_port
from serving.core.restarts import RestartPolicy
from serving.engines.engine import FAULT_ENGINES_ENV
from serving.supervisor.events import ServerEvent
from tests.router_fixtures import FAKE_ENGINE
from tests.server_fixtures import PASSABLE_PROFILE, REPO_ROOT, process_gone

RELEASE = "t1"
# A fake engine starts in about a second; generous for a busy machine.
EVENT_TIMEOUT_SECONDS = 30.0
SHORT_BACKOFF_SECONDS = 0.1


class Events:
    """The supervisor's stdout, one ServerEvent a line, each awaited with a deadline."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        assert process.stdout is not None
        self.process = process
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, args=(process.stdout,), daemon=True).start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            self.lines.put(line)

    def next(self) -> ServerEvent:
        try:
            line = self.lines.get(timeout=EVENT_TIMEOUT_SECONDS)
        except queue.Empty:
            raise AssertionError(
                f"no event within {EVENT_TIMEOUT_SECONDS} s (exit {self.process.poll()})"
            ) from None
        return ServerEvent.model_validate_json(line)


@pytest.fixture
def supervised(models_dir_with_tiny_profile: Path) -> Iterator[Any]:
    processes: list[subprocess.Popen[str]] = []

    def launch(limit: int) -> tuple[Events, int]:
        port = free_port()
        fake = [sys.executable, str(FAKE_ENGINE), "--port", "{port}", "--name", RELEASE]
        env = {**os.environ, "ROLLOUT_MODELS_DIR": str(models_dir_with_tiny_profile),
               FAULT_ENGINES_ENV: json.dumps({f"{PASSABLE_PROFILE}-{RELEASE}": fake})}
        process = subprocess.Popen(
            [sys.executable, "-m", "serving.supervisor", "--model", PASSABLE_PROFILE,
             "--weights", "unused", "--port", str(port), "--release-id", RELEASE,
             "--drain-seconds", "5", "--restart-limit", str(limit),
             "--restart-backoff", str(SHORT_BACKOFF_SECONDS)],
            cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        processes.append(process)
        return Events(process), port

    yield launch
    for process in processes:
        if process.poll() is None:
            process.kill()
        process.communicate(timeout=30)


def test_a_killed_engine_is_restarted_on_its_port_and_reported(supervised: Any) -> None:
    events, port = supervised(limit=3)
    first = events.next()
    assert first.event == "ready" and first.engine_pid is not None, first.error

    killed_at = time.time()
    os.kill(first.engine_pid, signal.SIGKILL)
    restarting = events.next()
    assert restarting.event == "restarting" and restarting.at >= killed_at
    assert "restart 1 of 3" in (restarting.error or "")
    again = events.next()
    assert again.event == "ready" and again.restarts == 1
    assert again.url == first.url == f"http://127.0.0.1:{port}"
    assert again.engine_pid not in (None, first.engine_pid)
    assert httpx.get(f"{again.url}/health", timeout=5).status_code == 200

    events.process.send_signal(signal.SIGTERM)
    assert events.next().event == "stopped"
    assert events.process.wait(timeout=30) == 0
    assert process_gone(again.engine_pid)


def test_an_engine_crashing_in_a_row_is_dead_at_the_limit(supervised: Any) -> None:
    events, _ = supervised(limit=1)
    first = events.next()
    assert first.event == "ready" and first.engine_pid is not None, first.error
    os.kill(first.engine_pid, signal.SIGKILL)
    assert events.next().event == "restarting"
    again = events.next()
    assert again.event == "ready" and again.engine_pid is not None

    os.kill(again.engine_pid, signal.SIGKILL)  # the second crash in a row: over the limit
    dead = events.next()
    assert dead.event == "crashed" and dead.restarts == 1
    assert "restart limit 1 reached" in (dead.error or "")
    assert events.process.wait(timeout=30) == 1  # the release's "container" is gone


def test_the_policy_backs_off_and_forgives_a_long_healthy_run() -> None:
    policy = RestartPolicy(limit=3, first_backoff_seconds=1, max_backoff_seconds=3,
                           healthy_run_seconds=60)  # fmt: skip
    delays = [policy.after_crash(row, ran_seconds=1).delay_seconds for row in range(3)]
    assert delays == [1, 2, 3]
    assert not policy.after_crash(3, ran_seconds=1).restart
    forgiven = policy.after_crash(3, ran_seconds=60)
    assert forgiven.restart and forgiven.attempt == 1
