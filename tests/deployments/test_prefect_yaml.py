"""prefect.yaml deployed to a real Prefect server: what got registered is what we meant
(a misspelled key would be silently dropped, so only a real deploy proves the file)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.deployments import run_deployment
from prefect.states import Pending

from serving.config.loader import available_models, load_profile
from serving.core.home import REPO_ROOT

ROOT = REPO_ROOT


@pytest.fixture(scope="module")
def deployments(prefect_server: str) -> dict[str, object]:
    with get_client(sync_client=True) as client:
        if not any(pool.name == "rollout" for pool in client.read_work_pools()):
            client.create_work_pool(WorkPoolCreate(name="rollout", type="process"))
    result = subprocess.run(
        [sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all"],
        cwd=ROOT,
        env={**os.environ, "PREFECT_API_URL": prefect_server},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    with get_client(sync_client=True) as client:
        found = client.read_deployments()
        flows = {flow.id: flow.name for flow in client.read_flows()}
    return {f"{flows[d.flow_id]}/{d.name}": d for d in found}


def test_every_profile_has_a_rollout_and_a_refresh(deployments: dict[str, object]) -> None:
    for model in available_models():
        assert f"rollout/{model}" in deployments
        assert f"refresh/{model}" in deployments


@pytest.mark.parametrize("model", available_models())
def test_rollout_deployment_is_registered_as_written(
    deployments: dict[str, object], model: str
) -> None:
    deployment = deployments[f"rollout/{model}"]
    target = "local" if load_profile(model).engine.kind == "transformers" else "modal"
    assert deployment.parameters == {"model": model, "target": target}  # type: ignore[attr-defined]
    assert deployment.entrypoint == "flows/rollout.py:rollout"  # type: ignore[attr-defined]
    assert deployment.work_pool_name == "rollout"  # type: ignore[attr-defined]
    limit = deployment.global_concurrency_limit  # type: ignore[attr-defined]
    assert limit is not None and limit.limit == 1
    options = deployment.concurrency_options  # type: ignore[attr-defined]
    assert options is not None and options.collision_strategy.value == "ENQUEUE"


def test_a_second_run_of_a_rollout_deployment_waits_for_the_first(
    deployments: dict[str, object],
) -> None:
    """The limit as the file registers it, enforced by the server. No worker: the runs are
    moved to Pending by hand, as a worker picking them up would."""
    deployment = deployments["rollout/smollm2-135m"]
    first = run_deployment(deployment.id, timeout=0)  # type: ignore[attr-defined]
    second = run_deployment(deployment.id, timeout=0)  # type: ignore[attr-defined]
    with get_client(sync_client=True) as client:
        assert client.set_flow_run_state(first.id, Pending()).status.value == "ACCEPT"
        answer = client.set_flow_run_state(second.id, Pending())
        assert answer.status.value != "ACCEPT"  # queued behind the first
        state = client.read_flow_run(second.id).state
    assert state is not None and state.name == "AwaitingConcurrencySlot"


def test_followed_branches_are_refreshed_on_a_schedule(deployments: dict[str, object]) -> None:
    for model in available_models():
        schedules = deployments[f"refresh/{model}"].schedules  # type: ignore[attr-defined]
        if load_profile(model).hub.pinned:
            assert schedules == []
            continue
        (schedule,) = schedules
        assert schedule.schedule.cron and schedule.schedule.timezone == "UTC"
        assert schedule.active


def test_the_file_has_no_key_prefect_ignores() -> None:
    known = {"name", "entrypoint", "work_pool", "concurrency_limit", "parameters", "schedules"}
    for deployment in yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]:
        assert set(deployment) <= known, set(deployment) - known
