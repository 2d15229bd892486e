"""Schedules fire: a real `prefect server start` (the test harness may not run the scheduler
and the ephemeral API never does) creates the runs of prefect.yaml's schedules, and a worker
completes a scheduled `refresh` of the demo model.

Everything checked here is the scheduler's product: flow runs it created (`auto_scheduled`),
never runs the test created itself. A scheduler that fails every cycle (Prefect 3.8.8 with
SQLAlchemy 2.1: "Can't evaluate bulk DML statement") fails both tests.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TypeVar

import httpx
import pytest
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.actions import DeploymentScheduleCreate, WorkPoolCreate
from prefect.client.schemas.filters import (
    DeploymentFilter,
    DeploymentFilterId,
    FlowFilter,
    FlowFilterName,
    FlowRunFilter,
    FlowRunFilterId,
)
from prefect.client.schemas.objects import FlowRun, TaskRun
from prefect.client.schemas.schedules import IntervalSchedule
from prefect.settings import PREFECT_API_URL, temporary_settings
from pydantic import BaseModel

from dev.demo_model import make_synthetic_repo
from dev.mirror import MirrorServer, run_mirror
from dev.mirror_store import KiB, MirrorStore
from serving.config.loader import available_models, load_profile
from serving.core.home import REPO_ROOT
from serving.domain.release import Release
from serving.platforms.local.stores import FileReleaseStore
from tests.mirror_fixtures import hf_env

ROOT = REPO_ROOT
# Generous for a busy 2-core machine: the server migrates a fresh SQLite database first.
SERVER_STARTUP_SECONDS = 120.0
STOP_SECONDS = 20.0
# The scheduler loops every 1-2 s here (see _server_env); a minute is far more than it needs.
SCHEDULED_WITHIN_SECONDS = 60.0
# Interval + worker poll + a flow-run subprocess that imports prefect and the project.
COMPLETED_WITHIN_SECONDS = 90.0
INTERVAL_SECONDS = 3
DEMO_MODEL = "smollm2-135m"
PINNED_MODEL = "qwen3-8b"
TEST_POOL = "schedule-test"

T = TypeVar("T")


class PrefectServer(BaseModel):
    api_url: str
    home: Path  # the test's scratch directory (PREFECT_HOME lives under it)
    log: Path  # the server's stdout and stderr


# --------------------------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _start(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """A child in its own process group (and session), output to `log`."""
    with log.open("ab") as out:
        return subprocess.Popen(
            argv, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip


def _stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the whole group, then SIGKILL to what is left of it after STOP_SECONDS."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=STOP_SECONDS)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)  # a leader that ignored SIGTERM, or members
    process.wait(timeout=STOP_SECONDS)


def _kill_pids_with_env(key: str, value: str) -> None:
    """SIGKILL every process of ours whose environment has key=value: a flow-run subprocess
    runs in a session of its own, which killing the worker's group would miss."""
    needle = f"{key}={value}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                os.kill(int(entry.name), signal.SIGKILL)
        except OSError:
            continue


def _tail(path: Path, chars: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return "(no log)"


def _poll(read: Callable[[], T], done: Callable[[T], bool], timeout: float, step: float) -> T:
    """`read()` until `done` holds or `timeout` passes; the last value either way."""
    deadline = time.monotonic() + timeout
    value = read()
    while not done(value) and time.monotonic() < deadline:
        time.sleep(step)
        value = read()
    return value


def _wait_healthy(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + SERVER_STARTUP_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"prefect server exited {process.returncode}:\n{_tail(log)}")
        try:
            if httpx.get(f"{url}/health", timeout=5, trust_env=False).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"no /api/health in {SERVER_STARTUP_SECONDS} s:\n{_tail(log)}")


def _prefect_env(api_url: str, home: Path) -> dict[str, str]:
    """For every prefect process here: this server, a private PREFECT_HOME, nothing phoned home."""
    return {
        **os.environ,
        "PREFECT_API_URL": api_url,
        "PREFECT_HOME": str(home / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_TELEMETRY_ENABLE_RESOURCE_METRICS": "false",
        "PYTHONPATH": str(ROOT),
    }


def _server_env(api_url: str, home: Path) -> dict[str, str]:
    return {
        **_prefect_env(api_url, home),
        "PREFECT_SERVER_UI_ENABLED": "false",
        # The main scheduler and the one for just-updated deployments (defaults 60 s and 5 s).
        "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2",
        "PREFECT_SERVER_SERVICES_SCHEDULER_RECENT_DEPLOYMENTS_LOOP_SECONDS": "1",
        # A few runs ahead per schedule, not 100 (an interval of seconds would get 100).
        "PREFECT_SERVER_SERVICES_SCHEDULER_MAX_RUNS": "5",
    }


# --------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServer]:
    """`prefect server start` on a free loopback port, its scheduler looping every 1-2 s."""
    home = tmp_path_factory.mktemp("prefect-schedules")
    port = _free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    log = home / "server.log"
    argv = [sys.executable, "-m", "prefect", "server", "start",
            "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
    process = _start(argv, _server_env(api_url, home), log)
    try:
        _wait_healthy(api_url, process, log)
        with temporary_settings(updates={PREFECT_API_URL: api_url}):
            yield PrefectServer(api_url=api_url, home=home, log=log)
    finally:
        _stop(process)


def _ensure_pool(client: SyncPrefectClient, name: str) -> None:
    if not any(pool.name == name for pool in client.read_work_pools()):
        client.create_work_pool(WorkPoolCreate(name=name, type="process"))


def _runs_of(client: SyncPrefectClient, deployment_id: uuid.UUID) -> list[FlowRun]:
    return client.read_flow_runs(
        deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id]))
    )


def _scheduled_by_scheduler(runs: list[FlowRun]) -> list[FlowRun]:
    return [r for r in runs if r.auto_scheduled and r.state is not None
            and r.state.type.value == "SCHEDULED"]  # fmt: skip


# --------------------------------------------------------------------------------------------
# A: prefect.yaml's schedules produce runs
# --------------------------------------------------------------------------------------------


def test_deployed_refresh_schedules_create_scheduled_runs(prefect_server: PrefectServer) -> None:
    with get_client(sync_client=True) as client:
        _ensure_pool(client, "rollout")
    result = subprocess.run(
        [sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all"],
        cwd=ROOT, env=_prefect_env(prefect_server.api_url, prefect_server.home),
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    followed = [m for m in available_models() if not load_profile(m).hub.pinned]
    assert followed and PINNED_MODEL not in followed
    with get_client(sync_client=True) as client:
        ids = {d.name: d.id for d in client.read_deployments(
            flow_filter=FlowFilter(name=FlowFilterName(any_=["refresh"])))}  # fmt: skip
        assert set(followed) | {PINNED_MODEL} <= set(ids), ids

        def scheduled() -> dict[str, list[FlowRun]]:
            return {m: _scheduled_by_scheduler(_runs_of(client, ids[m])) for m in followed}

        found = _poll(scheduled, lambda runs: all(runs.values()), SCHEDULED_WITHIN_SECONDS, 1.0)
        missing = [model for model, runs in found.items() if not runs]
        assert not missing, (
            f"the scheduler created no runs for refresh/{missing} in "
            f"{SCHEDULED_WITHIN_SECONDS} s; server log:\n{_tail(prefect_server.log)}"
        )
        now = datetime.now(UTC)
        for model, runs in found.items():
            for run in runs:
                assert run.deployment_id == ids[model]
                assert run.parameters["model"] == model
                assert run.expected_start_time is not None
                assert run.expected_start_time > now - timedelta(minutes=1)
        assert _runs_of(client, ids[PINNED_MODEL]) == []  # pinned: no schedule, no runs


# --------------------------------------------------------------------------------------------
# B: a scheduled refresh runs to completion on a worker
# --------------------------------------------------------------------------------------------


class Mirrored(BaseModel):
    url: str
    head: str  # the commit of the demo profile's followed branch


@pytest.fixture
def demo_mirror(tmp_path: Path) -> Iterator[tuple[MirrorServer, Mirrored]]:
    """The demo profile's repo in a fresh mirror: one tiny revision on its followed branch."""
    profile = load_profile(DEMO_MODEL)
    store = MirrorStore(tmp_path / "mirror")
    head = make_synthetic_repo(store, profile.hub.repo, [16 * KiB], seed=21,
                               branch=profile.hub.revision)  # fmt: skip
    with run_mirror(store) as server:
        yield server, Mirrored(url=server.url, head=head)


def _task_runs(client: SyncPrefectClient, flow_run_id: uuid.UUID) -> list[TaskRun]:
    return client.read_task_runs(
        flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
    )


def test_a_scheduled_refresh_completes_on_a_worker(
    prefect_server: PrefectServer,
    demo_mirror: tuple[MirrorServer, Mirrored],
    tmp_path: Path,
) -> None:
    mirror, mirrored = demo_mirror
    profile = load_profile(DEMO_MODEL)
    # The stable release already serves the branch head: refresh has nothing to do.
    rollout_home = tmp_path / "rollout-home"
    stable = Release(model=DEMO_MODEL, revision=mirrored.head, id=f"{DEMO_MODEL}-stable",
                     url="http://127.0.0.1:9", deployed_at=datetime.now(UTC))  # fmt: skip
    FileReleaseStore(rollout_home / "state" / "releases").update(
        DEMO_MODEL, lambda record: record.model_copy(update={"stable": stable})
    )

    with get_client(sync_client=True) as client:
        _ensure_pool(client, TEST_POOL)
        flow_id = client.create_flow_from_name("refresh")
        deployment_id = client.create_deployment(
            flow_id=flow_id,
            name=f"{DEMO_MODEL}-every-{INTERVAL_SECONDS}s",
            entrypoint="flows/refresh.py:refresh",
            path=str(ROOT),
            pull_steps=[{"prefect.deployments.steps.set_working_directory":
                         {"directory": str(ROOT)}}],
            work_pool_name=TEST_POOL,
            parameters={"model": DEMO_MODEL, "target": "local"},
            schedules=[DeploymentScheduleCreate(
                schedule=IntervalSchedule(interval=timedelta(seconds=INTERVAL_SECONDS)),
                active=True,
            )],
        )  # fmt: skip

    env = {
        **hf_env(mirrored.url, tmp_path / "hf"),
        **{k: v for k, v in _prefect_env(prefect_server.api_url, prefect_server.home).items()
           if not k.startswith("HF_")},
        "ROLLOUT_HOME": str(rollout_home),
        "PREFECT_WORKER_QUERY_SECONDS": "1",
    }  # fmt: skip
    log = tmp_path / "worker.log"
    argv = [sys.executable, "-m", "prefect", "worker", "start", "--pool", TEST_POOL,
            "--type", "process", "--limit", "1"]  # fmt: skip
    worker = _start(argv, env, log)
    try:
        with get_client(sync_client=True) as client:

            def completed() -> list[FlowRun]:
                return [r for r in _runs_of(client, deployment_id) if r.auto_scheduled
                        and r.state is not None and r.state.type.value == "COMPLETED"]  # fmt: skip

            done = _poll(completed, bool, COMPLETED_WITHIN_SECONDS, 1.0)
            states = [(r.name, r.auto_scheduled, r.state_name)
                      for r in _runs_of(client, deployment_id)]  # fmt: skip
            assert done, (
                f"no scheduled run completed in {COMPLETED_WITHIN_SECONDS} s; runs: {states}\n"
                f"worker log:\n{_tail(log)}\nserver log:\n{_tail(prefect_server.log)}"
            )
            run = done[0]
            assert run.parameters == {"model": DEMO_MODEL, "target": "local"}
            # It resolved the branch head and read the release record, and started nothing.
            tasks = {t.name.rsplit("-", 1)[0]: t for t in _task_runs(client, run.id)}
            assert set(tasks) == {"resolve", "read-release-record"}, sorted(tasks)
            assert all(t.state_name == "Completed" for t in tasks.values())
            rollouts = client.read_flow_runs(
                flow_filter=FlowFilter(name=FlowFilterName(any_=["rollout"]))
            )
            assert rollouts == [], [(r.name, r.state_name) for r in rollouts]
        paths = [r.path for r in mirror.requests]
        assert any(profile.hub.repo in path for path in paths), paths
    finally:
        _stop(worker)
        _kill_pids_with_env("ROLLOUT_HOME", str(rollout_home))
