"""The `refresh` flow when the hub is down: real Prefect, real huggingface_hub, the real mirror
(its 5xx knob) or a port nobody listens on.

A scheduled refresh that cannot reach the hub logs one warning line, starts no rollout and
completes; the next one, after the outage, starts the rollout of the branch head.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.filters import (
    DeploymentFilter,
    DeploymentFilterId,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.client.schemas.objects import FlowRun, Log

from dev.mirror import MirrorServer
from dev.mirror_faults import ErrorFault
from flows.refresh import refresh
from flows.rollout import rollout
from serving.core.procs import free_port
from tests.flows.synthetic_fixtures import add_profile
from tests.mirror_fixtures import SyntheticRepo

MODEL = "synthetic-refresh"  # its own rollout deployment: no other test runs it
WARNING = 30
# Prefect ships a flow run's logs to the API from a background thread.
LOGS_WITHIN_SECONDS = 15.0


def _rollouts(client: SyncPrefectClient, deployment_id: uuid.UUID) -> list[FlowRun]:
    return client.read_flow_runs(
        deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id]))
    )


def _warnings(client: SyncPrefectClient, flow_run_id: uuid.UUID) -> list[Log]:
    """The run's logs at WARNING and above, once the first has reached the API."""
    deadline = time.monotonic() + LOGS_WITHIN_SECONDS
    while True:
        logs = client.read_logs(
            log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))
        )
        found = [log for log in logs if log.level >= WARNING]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


@pytest.mark.parametrize("outage", ["http-503", "connection-refused"])
def test_refresh_during_a_hub_outage_is_one_line_and_the_next_one_starts_the_rollout(
    workspace: Path,
    mirror: MirrorServer,
    synthetic_repo: SyntheticRepo,
    monkeypatch: pytest.MonkeyPatch,
    outage: str,
) -> None:
    add_profile(workspace, MODEL)
    deployment_id = rollout.to_deployment(name=MODEL, parameters={"model": MODEL}).apply()
    if outage == "http-503":
        mirror.set_faults(error=ErrorFault(status=503))
    else:
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")

    during = refresh(MODEL, return_state=True)

    assert during.is_completed(), during.message
    assert during.result().action == "hub-unavailable"
    with get_client(sync_client=True) as client:
        assert _rollouts(client, deployment_id) == []
        warnings = _warnings(client, during.state_details.flow_run_id)
        assert [log.message.count("\n") for log in warnings] == [0], warnings
        assert "hub is unavailable" in warnings[0].message

        mirror.clear_faults()
        monkeypatch.setenv("HF_ENDPOINT", mirror.url)
        after = refresh(MODEL)
        assert after.action == "started" and after.head == synthetic_repo.v2
        (started,) = _rollouts(client, deployment_id)
        assert str(started.id) == after.flow_run_id
        assert started.parameters["revision"] == synthetic_repo.v2
        # Cleared, so nothing is left to run on this session's server.
        client.delete_flow_run(started.id)
