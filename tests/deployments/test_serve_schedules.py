"""`make serve` schedules only what this machine can run: after its deploy of prefect.yaml to a
real `prefect server start`, the scheduler creates runs for the local target's refreshes and
none for the Modal targets' (no Modal account, no Hub on a laptop), whose deployments remain.
"""

from __future__ import annotations

import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowFilter, FlowFilterName
from prefect.client.schemas.objects import FlowRun

from dev.serve import RUNNABLE, deploy

# Its module-scoped `prefect_server`, imported, is a server of this module's own: the schedules
# are changed here.
from tests.deployments.test_prefect_schedules import (  # noqa: F401
    ROOT,
    SCHEDULED_WITHIN_SECONDS,
    PrefectServer,
    _ensure_pool,
    _poll,
    _prefect_env,
    _runs_of,
    _scheduled_by_scheduler,
    _tail,
    prefect_server,
)


def _scheduled_targets() -> dict[str, str]:
    """prefect.yaml's deployments that have schedules: name → target."""
    deployments = yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]
    return {d["name"]: d["parameters"]["target"] for d in deployments if d.get("schedules")}


def test_make_serve_schedules_only_the_local_target(prefect_server: PrefectServer) -> None:  # noqa: F811
    targets = _scheduled_targets()
    local = {name for name, target in targets.items() if target in RUNNABLE}
    elsewhere = set(targets) - local
    assert local and elsewhere, targets
    with get_client(sync_client=True) as client:
        _ensure_pool(client, "rollout")
    paused = deploy(_prefect_env(prefect_server.api_url, prefect_server.home), RUNNABLE)
    assert set(paused) == elsewhere

    with get_client(sync_client=True) as client:
        refreshes = {d.name: d.id for d in client.read_deployments(
            flow_filter=FlowFilter(name=FlowFilterName(any_=["refresh"])))}  # fmt: skip
        assert set(targets) <= set(refreshes), refreshes

        def scheduled() -> dict[str, list[FlowRun]]:
            return {name: _scheduled_by_scheduler(_runs_of(client, refreshes[name]))
                    for name in targets}  # fmt: skip

        # The scheduler has been through the deployments once the local ones have their runs.
        found = _poll(scheduled, lambda runs: all(runs[name] for name in local),
                      SCHEDULED_WITHIN_SECONDS, 1.0)  # fmt: skip
        assert all(found[name] for name in local), _tail(prefect_server.log)
        assert {name: len(found[name]) for name in elsewhere if found[name]} == {}
        for name in elsewhere:
            schedules = client.read_deployment(refreshes[name]).schedules
            assert schedules and not any(schedule.active for schedule in schedules), name
