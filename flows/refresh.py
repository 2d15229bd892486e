"""The `refresh` flow: notice a new upstream commit of the profile's branch and start a rollout.

One cheap Hub call (the branch head). Nothing happens when the head is already stable or is the
revision that last failed, or when the hub does not answer: one warning line, and the run
completes, because the next scheduled refresh is the retry (a Failed run every hour of a hub
outage would page for what nobody here can fix). Otherwise `rollout/<model>` starts with an
idempotency key of model@sha, so two refreshes of the same commit start exactly one rollout.
"""

from __future__ import annotations

from typing import Literal

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.deployments import run_deployment
from pydantic import BaseModel

from serving.config.loader import load_profile
from serving.domain.records import ReleaseRecord
from serving.platform import Target
from serving.platforms import get_platform
from serving.weights.models import HubUnavailable
from tasks.weights import resolve


class RefreshResult(BaseModel):
    model: str
    head: str | None
    action: Literal["started", "up-to-date", "skipped-failed", "pinned", "hub-unavailable"]
    flow_run_id: str | None = None


@task(name="resolve", cache_policy=NO_CACHE)
def branch_head(model: str, target: Target) -> str | None:
    """The followed branch's commit, or None while the hub does not answer."""
    try:
        return resolve.fn(model, load_profile(model).hub.revision, target)
    except HubUnavailable as exc:
        get_run_logger().warning("%s: the hub is unavailable, the next refresh asks again: %s",
                                 model, exc)  # fmt: skip
        return None


@task(name="read-release-record", cache_policy=NO_CACHE)
def read_record(model: str, target: Target) -> ReleaseRecord:
    return get_platform(target).release_store().read(model)


@task(name="start-rollout", cache_policy=NO_CACHE)
def start_rollout(model: str, head: str, target: Target) -> str:
    run = run_deployment(
        f"rollout/{model}",
        parameters={"model": model, "revision": head, "target": target},
        idempotency_key=f"{model}@{head}",
        timeout=0,  # start it, don't wait: a rollout takes as long as its bakes
    )
    return str(run.id)


@flow(name="refresh")
def refresh(model: str, target: Target = "local") -> RefreshResult:
    profile = load_profile(model)
    if profile.hub.pinned:
        return RefreshResult(model=model, head=None, action="pinned")
    head = branch_head(model, target)
    if head is None:
        return RefreshResult(model=model, head=None, action="hub-unavailable")
    record = read_record(model, target)
    if record.stable is not None and record.stable.revision == head:
        return RefreshResult(model=model, head=head, action="up-to-date")
    if record.last_failed_revision() == head:
        get_run_logger().info("%s: %s failed before; waiting for a newer commit", model, head)
        return RefreshResult(model=model, head=head, action="skipped-failed")
    run_id = start_rollout(model, head, target)
    return RefreshResult(model=model, head=head, action="started", flow_run_id=run_id)
