"""A failed compile retried through the deployment, as users do it: a run of the deployment
rollout/<model> executed by a process worker fails in compile (the FAKE compile_deep_gemm
fails more often than the task retries), then `prefect flow-run retry <id>` reschedules the
same flow run; the worker runs it again. The download comes back Cached, compile runs once
more, and the rollout goes on to promote (a first release: probes, then 100%).

Real parts: the session's Prefect server, a `prefect worker start` process, the Prefect CLI,
the mirror, the router and the release's supervisor; the engine is the FAKE engine (no GPU
runs SGLang here) and compile_deep_gemm the FAKE that fails on demand.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId
from prefect.client.schemas.objects import ConcurrencyOptions, FlowRun, StateType
from prefect.deployments import run_deployment

from dev.mirror import MirrorServer
from serving.config.loader import load_profile
from serving.core.home import REPO_ROOT
from serving.core.procs import free_port, spawn, stop_group, wait_for
from serving.domain.release import release_id
from serving.engines.engine import FAULT_ENGINES_ENV
from serving.platforms.local.platform import LocalPlatform
from serving.platforms.local.router_process import ROUTER_PORT_ENV
from tests.flows.synthetic_fixtures import SYNTHETIC_MODEL, compile_attempts, task_states
from tests.local_fixtures import processes_under
from tests.mirror_fixtures import SyntheticRepo

MODEL = SYNTHETIC_MODEL
POOL = "compile-retry"
ENTRYPOINT = "tests/deployments/fast_retry_rollout.py:rollout"
FAKE_ENGINE = REPO_ROOT / "tests" / "fake_engine.py"
# Worker start, a flow-run process importing prefect and the project, a 5 MiB download, three
# compiles, on a busy 2-core machine.
FAILED_WITHIN_SECONDS = 180.0
PROMOTED_WITHIN_SECONDS = 180.0
STOP_SECONDS = 20.0
CLI_SECONDS = 120


@pytest.fixture
def worker(
    workspace: Path,
    prefect_server: str,
    synthetic_repo: SyntheticRepo,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Path]:
    """A `prefect worker start` on a pool of its own, with the workspace's environment plus the
    FAKE engine for the head's release, a router port and a compile that fails 3 times; yields
    its log. Everything the flow runs started is stopped afterwards."""
    release = release_id(load_profile(MODEL), synthetic_repo.v2)  # the profile follows main
    engine = [sys.executable, str(FAKE_ENGINE), "--port", "{port}", "--name", release]
    monkeypatch.setenv(FAULT_ENGINES_ENV, json.dumps({release: engine}))
    monkeypatch.setenv(ROUTER_PORT_ENV, str(free_port()))
    monkeypatch.setenv("FAKE_COMPILE_FAILURES", "3")  # more than the task's 2 retries
    with get_client(sync_client=True) as client:
        if not any(pool.name == POOL for pool in client.read_work_pools()):
            client.create_work_pool(WorkPoolCreate(name=POOL, type="process"))
    log = tmp_path / "worker.log"
    argv = [sys.executable, "-m", "prefect", "worker", "start", "--pool", POOL,
            "--type", "process", "--limit", "1"]  # fmt: skip
    env = _env(prefect_server, PREFECT_WORKER_QUERY_SECONDS="1")
    with log.open("ab") as out:
        process = spawn(argv, cwd=REPO_ROOT, env=env, stdout=out, stderr=out)
    try:
        yield log
    finally:
        stop_group(process, STOP_SECONDS)
        LocalPlatform.from_env().stop_all()
        home = workspace / "home"
        assert wait_for(lambda: processes_under(home) == [], STOP_SECONDS, 0.5), (
            processes_under(home)
        )


def _env(api_url: str, **extra: str) -> dict[str, str]:
    return {**os.environ, "PREFECT_API_URL": api_url, "PYTHONPATH": str(REPO_ROOT),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false", **extra}  # fmt: skip


def _prefect(api_url: str, *args: str) -> None:
    result = subprocess.run([sys.executable, "-m", "prefect", *args], cwd=REPO_ROOT,
                            env=_env(api_url), capture_output=True, text=True,
                            timeout=CLI_SECONDS)  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def _wait_for_state(
    client: SyncPrefectClient, run_id: uuid.UUID, wanted: StateType, timeout: float, log: Path
) -> FlowRun:
    """Poll until the run is in a final state; assert it is `wanted`."""

    def settled() -> bool:
        state = client.read_flow_run(run_id).state
        return state is not None and state.is_final()

    wait_for(settled, timeout, 1.0)
    run = client.read_flow_run(run_id)
    assert run.state is not None and run.state.type == wanted, (
        f"{run.state_name}: {run.state.message if run.state else ''}\n"
        f"worker log:\n{log.read_text(errors='replace')[-4000:]}"
    )
    return run


def _prep_runs(client: SyncPrefectClient, rollout_run: uuid.UUID) -> list[FlowRun]:
    """The `prep` subflow runs of a rollout run, oldest first."""
    runs = client.read_flow_runs(
        flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[rollout_run])
        )
    )
    return sorted(runs, key=lambda run: run.created or run.expected_start_time)


def test_a_failed_compile_retried_through_the_deployment_resumes_and_promotes(
    workspace: Path,
    worker: Path,
    prefect_server: str,
    mirror: MirrorServer,
    synthetic_repo: SyntheticRepo,
) -> None:
    with get_client(sync_client=True) as client:
        client.create_deployment(
            flow_id=client.create_flow_from_name("rollout"),
            name=MODEL,
            entrypoint=ENTRYPOINT,
            path=str(REPO_ROOT),
            pull_steps=[{"prefect.deployments.steps.set_working_directory":
                         {"directory": str(REPO_ROOT)}}],
            work_pool_name=POOL,
            parameters={"model": MODEL, "target": "local"},
            # As prefect.yaml's rollout deployments: the retry must get the slot back.
            concurrency_limit=1,
            concurrency_options=ConcurrencyOptions(collision_strategy="ENQUEUE"),
        )  # fmt: skip
        # What `prefect deployment run rollout/<model>` does, without a third CLI process
        # (each costs ~9 s on a busy 2-core machine): a run of the deployment, for the worker.
        run_id = run_deployment(f"rollout/{MODEL}", timeout=0).id

        failed = _wait_for_state(client, run_id, StateType.FAILED, FAILED_WITHIN_SECONDS, worker)
        assert "compile" in (failed.state.message or "").lower(), failed.state
        assert compile_attempts(workspace) == 3
        mirror.clear_requests()

        _prefect(prefect_server, "flow-run", "retry", str(run_id))
        _wait_for_state(client, run_id, StateType.COMPLETED, PROMOTED_WITHIN_SECONDS, worker)

        assert compile_attempts(workspace) == 4  # one more compile, and it succeeded
        first, retried = _prep_runs(client, run_id)
        assert first.state is not None and first.state.is_failed()
        states = task_states(retried.id)
        assert "Cached" in states["download"], states
        assert StateType.COMPLETED in states["compile"], states
    assert not [r for r in mirror.requests if r.path.endswith(".safetensors")]
    record = LocalPlatform.from_env().release_store().read(MODEL)
    assert record.stable is not None and record.stable.revision == synthetic_repo.v2
    assert record.history[-1].outcome == "promoted", record.history
