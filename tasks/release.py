"""Prefect tasks of a release: reconcile, deploy the canary, move traffic, bake, analyse, promote,
roll back. Each calls the target's Platform and keeps the release record true.

Action tasks use NO_CACHE: baking twice with the same arguments (an extended bake) must bake
twice, and setting the same weights again must set them again.
"""

from __future__ import annotations

import logging
import sys
import time
from functools import partial

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.events import emit_event
from prefect.exceptions import MissingContextError
from prefect.transactions import Transaction, get_transaction
from pydantic import BaseModel

from serving.config.loader import load_profile
from serving.config.profile import Profile
from serving.core.errors import one_line
from serving.domain.analysis import Analysis, GateResult, Window, analyse, golden_agreement
from serving.domain.records import HistoryEntry, Outcome, ReleaseRecord, now
from serving.domain.release import Release
from serving.platform import Platform, Target
from serving.platforms import get_platform

# How often a bake looks for a crashed canary, so a crash ends the bake at once.
CRASH_CHECK_SECONDS = 2.0


class Bake(BaseModel):
    weight: int
    started: float
    ended: float
    crashed: bool


def _log() -> logging.Logger | logging.LoggerAdapter:
    """The run's logger inside Prefect; a plain one for `rollout abort` on the command line."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("rollout")


def _context(model: str, target: Target) -> tuple[Profile, Platform]:
    return load_profile(model), get_platform(target)


def _record_outcome(
    platform: Platform,
    record: ReleaseRecord,
    revision: str,
    outcome: Outcome,
    reason: str,
    **changes: object,
) -> ReleaseRecord:
    entry = HistoryEntry(revision=revision, at=now(), outcome=outcome, reason=reason)
    updated = record.model_copy(update=changes).with_history(entry)
    platform.release_store().write(updated)
    if outcome in ("promoted", "rolled-back"):
        emit_event(
            event=f"rollout.{outcome}",
            resource={"prefect.resource.id": f"rollout.model.{record.model}"},
            payload={"revision": revision, "reason": reason},
        )
    return updated


def revert(profile: Profile, platform: Platform, record: ReleaseRecord, reason: str) -> None:
    """Weights back to stable, canary retired, the reason in the history. Safe to repeat."""
    canary = record.canary
    platform.set_traffic(profile, {record.stable.id: 100} if record.stable else {})
    if canary is not None:
        if canary.id in {release.id for release in platform.running_releases(profile)}:
            platform.retire(profile, canary, drain_seconds=profile.canary.retire_grace_seconds)
        _record_outcome(
            platform, record, canary.revision, "rolled-back", reason,
            canary=None, canary_owner=None,
        )  # fmt: skip
    _log().warning("%s: rolled back: %s", profile.name, reason)


@task(name="reconcile", cache_policy=NO_CACHE)
def reconcile(model: str, target: Target) -> ReleaseRecord:
    """Finish what a killed orchestrator left: an orphaned canary is reverted, a stable release
    that is no longer running is forgotten (nothing can be compared against it)."""
    profile, platform = _context(model, target)
    # A SIGKILLed orchestrator cannot stop what it started: the next run does.
    for name in platform.reconcile_orphans():
        get_run_logger().warning("%s: stopped %s, left by a dead orchestrator", model, name)
    store = platform.release_store()
    record = store.read(model)
    if record.canary is not None:
        revert(profile, platform, record,
               f"reconciled: canary left behind by flow run {record.canary_owner}")  # fmt: skip
        record = store.read(model)
    running = {release.id for release in platform.running_releases(profile)}
    if record.stable is not None and record.stable.id not in running:
        get_run_logger().warning("%s: stable %s is not running", model, record.stable.id)
        record = record.model_copy(update={"stable": None})
        store.write(record)
    return record


@task(name="deploy-canary", cache_policy=NO_CACHE)
def deploy_canary(model: str, revision: str, target: Target, owner: str) -> Release:
    """Start the new release at 0% (readiness and warmup probes inside deploy)."""
    profile, platform = _context(model, target)
    release = platform.deploy(profile, revision)
    store = platform.release_store()
    store.write(store.read(model).model_copy(update={"canary": release, "canary_owner": owner}))
    get_transaction().set("model", model)  # type: ignore[union-attr]
    get_transaction().set("target", target)  # type: ignore[union-attr]
    return release


@deploy_canary.on_rollback
def _revert_on_failure(transaction: Transaction) -> None:
    """Something raised after the canary was deployed: a failed task, SIGTERM (Prefect raises
    TerminationSignal), Ctrl-C. Not a gate: those roll back by decision."""
    model, target = transaction.get("model"), transaction.get("target")
    profile, platform = _context(model, target)
    record = platform.release_store().read(model)
    if record.canary is not None:
        # Rollback hooks run while the exception propagates out of the transaction block.
        cause = one_line(sys.exc_info()[1])
        revert(profile, platform, record, f"the rollout stopped after its canary was deployed:"
               f" {cause}")  # fmt: skip


@task(name="set-weight", cache_policy=NO_CACHE)
def set_weight(model: str, target: Target, canary: Release, stable: Release | None,
               weight: int) -> None:  # fmt: skip
    profile, platform = _context(model, target)
    weights = {canary.id: weight}
    if stable is not None:
        weights[stable.id] = 100 - weight
    platform.set_traffic(profile, weights)
    get_run_logger().info("%s: canary %s at %d%%", model, canary.id, weight)


@task(name="bake", cache_policy=NO_CACHE)
def bake(model: str, target: Target, canary: Release, weight: int, seconds: float) -> Bake:
    """Wait out the bake time, ending early if the canary stops running."""
    profile, platform = _context(model, target)
    started = time.time()
    crashed = False
    while time.time() - started < seconds:
        time.sleep(min(CRASH_CHECK_SECONDS, max(0.0, seconds - (time.time() - started))))
        if canary.id not in {release.id for release in platform.running_releases(profile)}:
            crashed = True
            break
    return Bake(weight=weight, started=started, ended=time.time(), crashed=crashed)


@task(name="analyse", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5)
def analyse_canary(model: str, target: Target, canary: Release, stable: Release | None,
                   window: Bake) -> Analysis:  # fmt: skip
    """The gates on the router's measurements of this bake, canary vs stable."""
    profile, platform = _context(model, target)
    backends = platform.stats(profile, since=window.started).get("backends", {})
    canary_window = Window.from_router_stats(backends.get(canary.id, {}))
    stable_window = (
        Window.from_router_stats(backends.get(stable.id, {})) if stable is not None else None
    )
    if window.crashed:
        stopped = GateResult(gate="running", passed=False, observed=None, limit=1,
                             detail="the canary stopped running during the bake")  # fmt: skip
        return Analysis(verdict="fail", canary=canary_window, stable=stable_window, gates=[stopped])
    golden = None
    if profile.canary.golden_prompts and stable is not None:
        golden = golden_agreement(
            profile.canary.golden_prompts,
            model=profile.served_model_name,
            canary=partial(platform.ask, profile, canary.id),
            stable=partial(platform.ask, profile, stable.id),
        )
    analysis = analyse(profile.canary.gates, canary_window, stable_window, golden)
    get_run_logger().info("%s at %d%%: %s — %s", model, window.weight, analysis.verdict,
                          analysis.reason)  # fmt: skip
    return analysis


@task(name="promote", cache_policy=NO_CACHE)
def promote(model: str, target: Target, canary: Release, reason: str) -> None:
    """The canary becomes stable; the old stable drains within its grace and is retired."""
    profile, platform = _context(model, target)
    store = platform.release_store()
    record = store.read(model)
    old = record.stable
    platform.set_traffic(profile, {canary.id: 100})
    _record_outcome(platform, record, canary.revision, "promoted", reason,
                    stable=canary, canary=None, canary_owner=None)  # fmt: skip
    if old is not None and old.id != canary.id:
        platform.retire(profile, old, drain_seconds=profile.canary.retire_grace_seconds)
    get_run_logger().info("%s: promoted %s", model, canary.id)


@task(name="rollback", cache_policy=NO_CACHE)
def rollback(model: str, target: Target, reason: str) -> None:
    profile, platform = _context(model, target)
    revert(profile, platform, platform.release_store().read(model), reason)


@task(name="record", cache_policy=NO_CACHE)
def record_outcome(model: str, target: Target, revision: str, outcome: Outcome,
                   reason: str) -> None:  # fmt: skip
    """A rollout that deployed nothing (no-op, or failed before its canary) still leaves a line
    in the history."""
    _, platform = _context(model, target)
    _record_outcome(platform, platform.release_store().read(model), revision, outcome, reason)
