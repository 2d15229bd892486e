"""The engine supervisor (serving/supervisor/) with real processes over real HTTP.

The real engine is `transformers serve` with a tiny random Llama (tests/server_fixtures.py).
The FAKE engine (tests/engines/fake_engine.py) is used only for what a real engine cannot do on
demand: canned tool calls and reasoning, slow streams during a stop, ignoring SIGTERM, a crash
at a chosen moment, and recording the snapshot calls it receives.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from serving.config.loader import load_profile
from serving.config.profile import Profile
from serving.core.procs import free_port, wait_for
from serving.core.redaction import REDACTED
from serving.engines.engine import engine_command, request_model, write_secrets_config
from serving.engines.sglang import Command
from serving.supervisor.events import ServerEvent
from serving.supervisor.supervisor import EngineFailed, ProbeFailed, Supervisor
from tests.server_fixtures import (
    DEMO_PROFILE,
    PASSABLE_PROFILE,
    POLL_SECONDS,
    REPO_ROOT,
    SupervisorFactory,
    fake_command,
    probe,
    process_gone,
)

API_KEY = "sk-test-7f3a9c1e5b2d4f6a8c0e"
HF_TOKEN = "hf_testTokenValue1234567890"
# How long a real `transformers serve` with the tiny model may take to answer /health here
# (measured: about 4 s on 2 CPU cores).
REAL_STARTUP_BUDGET = 60.0
ENTRY_POINT_TIMEOUT = 90.0


def read_records(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


# --------------------------------------------------------------------------------------------
# Engine commands
# --------------------------------------------------------------------------------------------


def test_transformers_command_serves_the_weights_on_cpu(demo_profile: Profile) -> None:
    command = engine_command(demo_profile, weights_path=Path("/w/rev"), port=8123, host="127.0.0.1")
    argv = command.argv
    assert argv[:5] == [sys.executable, "-m", "transformers.cli.transformers", "serve", "/w/rev"]
    assert argv[argv.index("--device") + 1] == "cpu"
    assert argv[argv.index("--port") + 1] == "8123"
    assert argv[argv.index("--host") + 1] == "127.0.0.1"
    assert argv[argv.index("--dtype") + 1] == "float32"  # from the profile's engine.flags
    assert command.env["HF_HUB_OFFLINE"] == "1"
    assert request_model(demo_profile, Path("/w/rev")) == "/w/rev"


def test_sglang_command_keeps_the_api_key_off_the_argv(tmp_path: Path) -> None:
    profile = load_profile("glm-5.1")
    config = write_secrets_config(tmp_path, API_KEY)
    assert config is not None
    command = engine_command(
        profile, weights_path=Path("/weights/x"), deepgemm_path=Path("/deepgemm/sm_100"),
        port=8000, host="0.0.0.0", secrets_config=config,
    )  # fmt: skip
    assert command.argv[:2] == ["sglang", "serve"]
    assert command.argv[command.argv.index("--config") + 1] == str(config)
    assert not any(API_KEY in arg for arg in command.argv)
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    assert config.read_text().strip() == f"api-key: {API_KEY}"
    assert request_model(profile, Path("/weights/x")) == "glm-5.1"


def test_no_secrets_config_without_a_key(tmp_path: Path) -> None:
    assert write_secrets_config(tmp_path, None) is None
    assert write_secrets_config(tmp_path, "") is None
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------
# The real engine: `transformers serve` with a tiny model
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_engine(
    demo_profile: Profile, tiny_model_dir: Path, module_supervisors: SupervisorFactory
) -> Supervisor:
    port = free_port()
    command = engine_command(demo_profile, weights_path=tiny_model_dir, port=port)
    supervisor = module_supervisors(
        demo_profile, command, port=port, model=request_model(demo_profile, tiny_model_dir)
    )
    supervisor.start()
    seconds = supervisor.wait_ready(REAL_STARTUP_BUDGET)
    print(f"transformers serve (tiny model) healthy after {seconds:.1f} s")
    return supervisor


def test_real_engine_becomes_healthy(real_engine: Supervisor) -> None:
    assert real_engine.running
    assert httpx.get(f"{real_engine.base_url}/health", timeout=5).status_code == 200
    assert any("Uvicorn running" in line for line in real_engine.log_tail())


def test_real_engine_passes_the_demo_probes_a_tiny_model_can(
    real_engine: Supervisor, demo_profile: Profile
) -> None:
    passable = [p for p in demo_profile.probes if p.contains is None]
    assert {p.name for p in passable} >= {"no-thinking", "long-context"}
    for each in passable:
        message = real_engine.run_probe(each)
        assert message.content and message.content.strip()


def test_probe_whose_answer_violates_the_expectation_fails(
    real_engine: Supervisor, demo_profile: Profile
) -> None:
    capital = next(p for p in demo_profile.probes if p.name == "capital")
    assert capital.contains == "Paris"
    with pytest.raises(ProbeFailed, match=r"probe 'capital': answer does not contain 'Paris'"):
        real_engine.run_probe(capital)


def test_probe_against_a_dead_engine_fails_with_its_exit(
    demo_profile: Profile, supervisors: SupervisorFactory
) -> None:
    # An engine that died is an EngineFailed carrying its output, not a vague request error.
    exits = Command(
        argv=[sys.executable, "-c", "print('out of memory'); raise SystemExit(1)"], env={}
    )
    supervisor = supervisors(demo_profile, exits)
    supervisor.start()
    assert wait_for(lambda: not supervisor.running, 10, POLL_SECONDS)
    with pytest.raises(EngineFailed, match="exited with code 1 during probe 'capital'") as failure:
        supervisor.run_probe(next(p for p in demo_profile.probes if p.name == "capital"))
    assert "out of memory" in str(failure.value)


# --------------------------------------------------------------------------------------------
# The process entry point, with the real engine
# --------------------------------------------------------------------------------------------


@pytest.fixture
def entry_point(models_dir_with_tiny_profile: Path) -> Iterator[Any]:
    processes: list[subprocess.Popen[str]] = []

    def launch(model: str, weights: Path, port: int) -> subprocess.Popen[str]:
        env = {**os.environ, "ROLLOUT_MODELS_DIR": str(models_dir_with_tiny_profile)}
        process = subprocess.Popen(
            [sys.executable, "-m", "serving.supervisor", "--model", model,
             "--weights", str(weights), "--port", str(port), "--release-id", "t1",
             "--drain-seconds", "10"],
            cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        processes.append(process)
        return process

    yield launch
    for process in processes:
        if process.poll() is None:
            process.kill()
        process.communicate(timeout=30)


def test_entry_point_serves_until_sigterm_then_stops_the_engine(
    entry_point: Any, tiny_model_dir: Path
) -> None:
    port = free_port()
    process = entry_point(PASSABLE_PROFILE, tiny_model_dir, port)
    assert process.stdout is not None
    line = process.stdout.readline()  # blocks until ready or failed; bounded by the budget
    ready = ServerEvent.model_validate_json(line)
    assert ready.event == "ready", ready.error
    assert (ready.model, ready.release_id, ready.url) == (
        PASSABLE_PROFILE,
        "t1",
        f"http://127.0.0.1:{port}",
    )
    assert ready.engine_pid is not None
    assert httpx.get(f"{ready.url}/health", timeout=5).status_code == 200

    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=ENTRY_POINT_TIMEOUT)
    assert process.returncode == 0, err[-2000:]
    assert ServerEvent.model_validate_json(out.strip().splitlines()[-1]).event == "stopped"
    assert process_gone(ready.engine_pid)
    assert "[tiny-test-t1]" in err  # engine output, prefixed with the release


def test_entry_point_fails_the_deploy_when_a_probe_fails(
    entry_point: Any, tiny_model_dir: Path
) -> None:
    port = free_port()
    process = entry_point(DEMO_PROFILE, tiny_model_dir, port)
    out, err = process.communicate(timeout=ENTRY_POINT_TIMEOUT)
    assert process.returncode == 1, err[-2000:]
    lines = out.strip().splitlines()
    assert len(lines) == 1  # one clear error line, no "ready"
    failed = ServerEvent.model_validate_json(lines[0])
    assert failed.event == "failed"
    assert failed.error is not None and "probe 'capital'" in failed.error
    assert "healthy after" in err  # it did start: the probe, not the start, failed the deploy
    with pytest.raises(httpx.TransportError):  # and the engine is gone
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)


def test_entry_point_sigterm_during_startup_stops_the_engine(
    entry_point: Any, tiny_model_dir: Path
) -> None:
    port = free_port()
    process = entry_point(PASSABLE_PROFILE, tiny_model_dir, port)
    # Signal once the supervisor says the engine is starting (a load takes seconds), not after
    # a fixed wait that a busy machine outlasts before Python has even imported.
    seen = ""
    while "starting:" not in seen:
        line = process.stderr.readline()
        assert line, f"the supervisor exited before starting the engine: {seen[-2000:]}"
        seen += line
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=ENTRY_POINT_TIMEOUT)
    assert process.returncode == 0, (seen + err)[-2000:]
    stopped = ServerEvent.model_validate_json(out.strip())  # one line, and not "ready"
    assert stopped.event == "stopped" and stopped.error == "shutdown requested during startup"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))  # nothing holds the port: the engine is gone


def test_entry_point_rejects_an_unknown_model(entry_point: Any, tmp_path: Path) -> None:
    process = entry_point("no-such-model", tmp_path, free_port())
    out, _ = process.communicate(timeout=30)
    assert process.returncode == 2
    event = ServerEvent.model_validate_json(out.strip())
    assert event.event == "failed" and "unknown model 'no-such-model'" in (event.error or "")


# --------------------------------------------------------------------------------------------
# Startup failures
# --------------------------------------------------------------------------------------------


def test_engine_exiting_during_startup_fails_at_once_with_its_output(
    demo_profile: Profile, supervisors: SupervisorFactory
) -> None:
    crashing = Command(
        argv=[sys.executable, "-c",
              "import sys\nfor i in range(60): print(f'loading shard {i}')\n"
              "print('CUDA error: out of memory', file=sys.stderr)\nsys.exit(3)"],
        env={},
    )  # fmt: skip
    supervisor = supervisors(demo_profile, crashing)
    supervisor.start()
    started = time.monotonic()
    with pytest.raises(EngineFailed) as failure:
        supervisor.wait_ready(budget_seconds=120)
    assert time.monotonic() - started < 5  # not the 120 s budget
    message = str(failure.value)
    assert "engine exited with code 3 during startup" in message
    assert "CUDA error: out of memory" in message  # stderr too
    assert "loading shard 59" in message
    assert "loading shard 5\n" not in message  # only the tail: the last 50 lines
    assert message.startswith(f"{demo_profile.name}-{supervisor.release_id}:")


def never_healthy(profile: Profile, supervisors: SupervisorFactory) -> Supervisor:
    """A supervisor of a FAKE engine that listens but answers /health 503 for ten minutes."""
    port = free_port()
    return supervisors(
        profile, fake_command("--port", str(port), "--health-delay", "600"), port=port
    )


def test_engine_never_healthy_fails_at_the_budget(
    demo_profile: Profile, supervisors: SupervisorFactory
) -> None:
    supervisor = never_healthy(demo_profile, supervisors)
    supervisor.start()
    started = time.monotonic()
    with pytest.raises(EngineFailed, match=r"not healthy within 1.5 s") as failure:
        supervisor.wait_ready(budget_seconds=1.5)
    assert 1.5 <= time.monotonic() - started < 4
    assert "fake: listening" in str(failure.value)
    assert supervisor.running  # the caller decides to stop it; startup() does


def test_startup_stops_the_engine_when_it_fails(
    demo_profile: Profile, supervisors: SupervisorFactory
) -> None:
    supervisor = never_healthy(demo_profile, supervisors)
    with pytest.raises(EngineFailed):
        supervisor.startup(budget_seconds=1)
    assert not supervisor.running
    assert supervisor.pid is not None and process_gone(supervisor.pid)


def test_a_missing_engine_binary_is_an_engine_failure(
    demo_profile: Profile, supervisors: SupervisorFactory
) -> None:
    supervisor = supervisors(demo_profile, Command(argv=["/nonexistent/sglang", "serve"], env={}))
    with pytest.raises(EngineFailed, match="cannot start the engine"):
        supervisor.start()


# --------------------------------------------------------------------------------------------
# Secrets
# --------------------------------------------------------------------------------------------


def test_secrets_never_reach_logs_or_errors(
    demo_profile: Profile,
    supervisors: SupervisorFactory,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.INFO, logger="serving.supervisor.supervisor")
    leaky = Command(
        argv=[sys.executable, "-c",
              "import os, sys\nprint('api key is', os.environ['ENGINE_API_KEY'])\n"
              "print('token=' + os.environ['HF_TOKEN'], file=sys.stderr)\nsys.exit(3)"],
        env={"ENGINE_API_KEY": API_KEY, "HF_TOKEN": HF_TOKEN},
    )  # fmt: skip
    supervisor = supervisors(demo_profile, leaky, api_key=API_KEY)
    supervisor.start()
    with pytest.raises(EngineFailed) as failure:
        supervisor.wait_ready(budget_seconds=30)
    captured = capfd.readouterr()
    for text in (
        str(failure.value),
        caplog.text,
        captured.out,
        captured.err,
        *supervisor.log_tail(),
    ):
        assert API_KEY not in text
        assert HF_TOKEN not in text
    assert f"api key is {REDACTED}" in str(failure.value)
    assert f"token={REDACTED}" in caplog.text


# --------------------------------------------------------------------------------------------
# Memory snapshots
# --------------------------------------------------------------------------------------------


def test_snapshot_calls_hit_sglang_memory_endpoints(
    supervisors: SupervisorFactory, tmp_path: Path
) -> None:
    qwen = load_profile("qwen3-8b")
    assert qwen.engine.memory_snapshot
    # The fake cannot pass qwen's tool-call probe; one canned warmup probe stands in.
    profile = qwen.model_copy(
        update={"probes": [probe("warmup", "canned:content", expect="content")]}
    )
    records = tmp_path / "requests.jsonl"
    port = free_port()
    supervisor = supervisors(
        profile,
        fake_command("--port", str(port), "--record", str(records)),
        port=port,
        api_key=API_KEY,
    )
    supervisor.start()
    supervisor.wait_ready(budget_seconds=30)

    supervisor.prepare_snapshot()
    assert [r["path"] for r in read_records(records)] == [
        "/v1/chat/completions",  # warm up first: the snapshot holds an engine that has served
        "/release_memory_occupation",
    ]
    supervisor.restore_snapshot()
    last = read_records(records)[-1]
    assert last["path"] == "/resume_memory_occupation"
    assert last["authorization"] == f"Bearer {API_KEY}"


# --------------------------------------------------------------------------------------------
# Crash monitor
# --------------------------------------------------------------------------------------------


def test_crash_after_startup_calls_on_crash(
    demo_profile: Profile, supervisors: SupervisorFactory
) -> None:
    crashed = threading.Event()
    failures: list[EngineFailed] = []

    def on_crash(failure: EngineFailed) -> None:
        failures.append(failure)
        crashed.set()

    profile = demo_profile.model_copy(update={"probes": [probe("chat", "hi", expect="content")]})
    port = free_port()
    supervisor = supervisors(
        profile, fake_command("--port", str(port)), port=port, on_crash=on_crash
    )
    supervisor.startup(budget_seconds=30)
    assert not crashed.wait(1.0)  # a healthy engine is not a crash

    assert supervisor.pid is not None
    os.kill(supervisor.pid, signal.SIGKILL)
    started = time.monotonic()
    assert crashed.wait(5)
    assert time.monotonic() - started < 2
    assert "engine exited with code -9" in str(failures[0])
    assert "fake: listening" in str(failures[0])


def test_a_requested_stop_is_not_a_crash(
    demo_profile: Profile, supervisors: SupervisorFactory
) -> None:
    crashes: list[EngineFailed] = []
    profile = demo_profile.model_copy(update={"probes": [probe("chat", "hi", expect="content")]})
    port = free_port()
    supervisor = supervisors(
        profile, fake_command("--port", str(port)), port=port, on_crash=crashes.append
    )
    supervisor.startup(budget_seconds=30)
    assert supervisor.stop(drain_seconds=10) == 0
    time.sleep(1.0)  # two monitor polls
    assert crashes == []


# --------------------------------------------------------------------------------------------
# Graceful stop
# --------------------------------------------------------------------------------------------


def test_stop_lets_an_in_flight_stream_finish(
    demo_profile: Profile, supervisors: SupervisorFactory
) -> None:
    port = free_port()
    command = fake_command("--port", str(port), "--stream-chunks", "8", "--stream-interval", "0.2")
    supervisor = supervisors(demo_profile, command, port=port)
    supervisor.start()
    supervisor.wait_ready(budget_seconds=30)

    first_chunk = threading.Event()
    lines: list[str] = []

    def stream() -> None:
        request = {"messages": [{"role": "user", "content": "slow"}], "stream": True}
        with httpx.stream(
            "POST", f"{supervisor.base_url}/v1/chat/completions", json=request, timeout=30
        ) as response:
            for line in response.iter_lines():
                if line:
                    lines.append(line)
                    first_chunk.set()

    client = threading.Thread(target=stream)
    client.start()
    assert first_chunk.wait(10)
    started = time.monotonic()
    assert supervisor.stop(drain_seconds=20) == 0  # exited by itself, not killed
    stopped_after = time.monotonic() - started
    client.join(10)
    assert lines[-1] == "data: [DONE]"
    assert len(lines) == 9  # every chunk arrived
    assert 0.8 < stopped_after < 10  # it waited for the stream (~1.4 s), not the deadline
    assert supervisor.stop(drain_seconds=20) == 0  # idempotent


def test_an_engine_ignoring_sigterm_is_killed_with_its_group_at_the_deadline(
    demo_profile: Profile, supervisors: SupervisorFactory, tmp_path: Path
) -> None:
    port = free_port()
    child_pid_file = tmp_path / "child.pid"
    command = fake_command(
        "--port", str(port), "--ignore-sigterm", "--child-pid-file", str(child_pid_file)
    )
    supervisor = supervisors(demo_profile, command, port=port)
    supervisor.start()
    supervisor.wait_ready(budget_seconds=30)
    child = int(child_pid_file.read_text())
    assert not process_gone(child)

    started = time.monotonic()
    assert supervisor.stop(drain_seconds=1.0) == -signal.SIGKILL
    assert 1.0 <= time.monotonic() - started < 5
    assert supervisor.pid is not None and process_gone(supervisor.pid)
    # the engine's worker went with it
    assert wait_for(lambda: process_gone(child), 5, POLL_SECONDS)
    started = time.monotonic()
    supervisor.stop(drain_seconds=1.0)
    assert time.monotonic() - started < 0.5  # idempotent: nothing left to wait for
