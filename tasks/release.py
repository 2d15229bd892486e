"""Prefect tasks of a release: reconcile, deploy the canary, move traffic, bake, analyse, promote,
roll back. Each calls the target's Platform; the release record changes only through the
lifecycle (serving.control.lifecycle), to which these tasks add the flow run's id, the run's
log and the events (`rollout.promoted`, `rollout.rolled-back`).

Action tasks use NO_CACHE: baking twice with the same arguments (an extended bake) must bake
twice, and setting the same weights again must set them again. The tasks a rollout runs inside
its transaction have no Prefect retries: a failure reverts the canary at once, and a retry would
then run against a retired release.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.events import emit_event
from prefect.exceptions import MissingContextError
from prefect.runtime import flow_run
from prefect.transactions import Transaction, get_transaction
from pydantic import BaseModel

from serving.config.loader import load_profile
from serving.config.profile import Profile, Shadow
from serving.control import lifecycle
from serving.control.router_client import RouterAdminError, RouterUnreachable
from serving.core.errors import one_line
from serving.domain.analysis import (
    Analysis,
    Ask,
    Unanswered,
    Window,
    analyse,
    analyse_shadow,
    enough_requests,
    golden_agreement,
    unmeasured,
)
from serving.domain.interruptions import crash_finding, interrupted, router_restart_finding
from serving.domain.records import HistoryEntry, Outcome, ReleaseRecord
from serving.domain.release import Release
from serving.platform import Platform, Target
from serving.platforms import get_platform
from serving.router.comparison import ShadowStats

# How often a bake looks for a crashed canary, so a crash ends the bake at once.
CRASH_CHECK_SECONDS = 2.0


class Bake(BaseModel):
    weight: int
    started: float
    ended: float
    crashes: int = 0  # of the canary's engine during the bake (its supervisor restarts it)
    stopped: bool = False  # the canary no longer runs (its restarts ran out)


def _log() -> logging.Logger | logging.LoggerAdapter:
    """The run's logger inside Prefect; a plain one where a hook runs without the run's
    context."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("rollout")


def _context(model: str, target: Target) -> tuple[Profile, Platform]:
    return load_profile(model), get_platform(target)


def _run_id() -> str | None:
    """The flow run this task or hook belongs to: the history names the run that decided."""
    return flow_run.id


def _announce(model: str, entry: HistoryEntry) -> None:
    emit_event(
        event=f"rollout.{entry.outcome}",
        resource={"prefect.resource.id": f"rollout.model.{model}"},
        payload={"revision": entry.revision, "reason": entry.reason},
    )


def revert_and_retire(
    model: str, target: Target, reason: str, flow_run_id: str | None, owner: str | None = None
) -> HistoryEntry | None:
    """Weights back to stable, the canary recorded as rolled back and retired; nothing when
    there is no canary (or none `owner` owns) any more. The entry written, if any."""
    profile, platform = _context(model, target)
    entry = lifecycle.revert(profile, platform, reason, flow_run_id, owner=owner)
    if entry is None:
        return None
    _log().warning("%s: %s: %s", model, entry.outcome, reason)
    _announce(model, entry)
    lifecycle.retire_released(profile, platform)
    return entry


def _decided_elsewhere(platform: Platform, model: str, canary: Release) -> HistoryEntry | None:
    """The entry another process wrote for a canary it took from this run (`rollout abort`)."""
    for entry in reversed(platform.release_store().read(model).history):
        if entry.revision == canary.revision:
            return entry
    return None


def _announce_taken(model: str, entry: HistoryEntry) -> None:
    """`rollout abort` emits no event itself: it would first have to start or reach a Prefect
    API. The run whose canary it rolled back announces it."""
    if entry.outcome == "rolled-back":
        _announce(model, entry)


def settle_ended_run(
    model: str, target: Target, revision: str | None, reason: str, flow_run_id: str
) -> None:
    """A run that ended failed, crashed or cancelled: its canary reverted and retired, and a
    line in the history even when it failed before deploying one (a failed download, a
    canary that died during startup), unless it already wrote its own."""
    revert_and_retire(model, target, reason, flow_run_id, owner=flow_run_id)
    profile, platform = _context(model, target)
    lifecycle.record_failure(platform, model, revision or profile.hub.revision, reason,
                             flow_run_id)  # fmt: skip


@task(name="reconcile", cache_policy=NO_CACHE)
def reconcile(model: str, revision: str, target: Target) -> ReleaseRecord:
    """Mark this run as begun, and finish what a killed orchestrator left
    (serving.control.lifecycle.reconcile)."""
    profile, platform = _context(model, target)
    done = lifecycle.reconcile(profile, platform, _run_id(), revision)
    log = get_run_logger()
    if done.interrupted is not None:
        log.warning("%s: %s", model, done.interrupted.reason)
    for name in done.orphans_stopped:
        log.warning("%s: stopped %s, left by a dead orchestrator", model, name)
    if done.reverted is not None:
        log.warning("%s: rolled back: %s", model, done.reverted.reason)
        _announce(model, done.reverted)
    for release in done.retired:
        log.warning("%s: retired %s, left retiring by an earlier run", model, release.id)
    if done.forgotten is not None:
        log.warning("%s: stable %s is not running", model, done.forgotten.id)
    return done.record


@task(name="deploy-canary", cache_policy=NO_CACHE)
def deploy_canary(model: str, revision: str, target: Target, owner: str,
                  dummy_weights: bool = False) -> Release:  # fmt: skip
    """Start the new release at 0% (readiness and warmup probes inside deploy)."""
    profile, platform = _context(model, target)
    if dummy_weights:
        profile = profile.with_dummy_weights()
    release = platform.deploy(profile, revision)
    lifecycle.start_canary(platform, release, owner)
    get_transaction().set("model", model)  # type: ignore[union-attr]
    get_transaction().set("target", target)  # type: ignore[union-attr]
    return release


@deploy_canary.on_rollback
def _revert_on_failure(transaction: Transaction) -> None:
    """Something raised after the canary was deployed: a failed task, SIGTERM (Prefect raises
    TerminationSignal), Ctrl-C. Not a gate: those roll back by decision."""
    # Rollback hooks run while the exception propagates out of the transaction block.
    cause = one_line(sys.exc_info()[1])
    revert_and_retire(transaction.get("model"), transaction.get("target"),
                      f"the rollout stopped after its canary was deployed: {cause}",
                      _run_id())  # fmt: skip


@task(name="set-weight", cache_policy=NO_CACHE)
def set_weight(model: str, target: Target, canary: Release, stable: Release | None,
               weight: int, shadow: Shadow | None = None) -> None:  # fmt: skip
    """The canary at `weight`, stable at the rest; with `shadow`, the canary also gets copies
    of stable's chat requests (and without, any it got end)."""
    profile, platform = _context(model, target)
    weights = {canary.id: weight}
    if stable is not None:
        weights[stable.id] = 100 - weight
    platform.set_traffic(profile, weights, {canary.id: shadow} if shadow else None)
    copies = f", shadow copies of {shadow.percent:g}% of stable's requests" if shadow else ""
    get_run_logger().info("%s: canary %s at %d%%%s", model, canary.id, weight, copies)


@task(name="bake", cache_policy=NO_CACHE)
def bake(model: str, target: Target, canary: Release, weight: int, seconds: float) -> Bake:
    """Wait out the bake time, ending early if the canary's engine crashes."""
    profile, platform = _context(model, target)
    started = time.time()
    crashes, stopped = 0, False
    while time.time() - started < seconds:
        time.sleep(min(CRASH_CHECK_SECONDS, max(0.0, seconds - (time.time() - started))))
        crashes = platform.engine_crashes(profile, canary.id, since=started)
        stopped = canary.id not in {release.id for release in platform.running_releases(profile)}
        if crashes or stopped:
            break
    return Bake(weight=weight, started=started, ended=time.time(), crashes=crashes,
                stopped=stopped)  # fmt: skip


@task(name="analyse", cache_policy=NO_CACHE)
def analyse_canary(model: str, target: Target, canary: Release, stable: Release | None,
                   window: Bake, shadow: bool = False) -> Analysis:  # fmt: skip
    """The gates on the router's measurements of this bake, canary vs stable; of a shadow
    step, on the router's comparisons of the canary's answers to copies of stable's. Trouble
    measuring (no stats, a golden prompt unanswered in time) is a finding of the analysis,
    never a failure of the task."""
    profile, platform = _context(model, target)
    crashed = window.crashes > 0 or window.stopped
    try:
        stats = platform.stats(profile, since=window.started)  # retried by the router client
    except RouterAdminError as exc:
        if not crashed:  # a crash needs no measurements to fail
            analysis = unmeasured(one_line(exc))
            get_run_logger().warning("%s at %d%%: %s — %s", model, window.weight,
                                     analysis.verdict, analysis.reason)  # fmt: skip
            return analysis
        stats = {}
    backends = stats.get("backends", {})
    canary_window = Window.from_router_stats(backends.get(canary.id, {}))
    stable_window = (
        Window.from_router_stats(backends.get(stable.id, {})) if stable is not None else None
    )
    verdict = interrupted(
        canary_window, stable_window, crash_finding(window.crashes, running=not window.stopped),
        router_restart_finding(stats.get("measured_since"), window.started),
    )  # fmt: skip
    if verdict is not None:
        get_run_logger().warning("%s at %d%%: %s — %s", model, window.weight, verdict.verdict,
                                 verdict.reason)  # fmt: skip
        return verdict
    gates = profile.canary.gates
    if shadow:
        copies = ShadowStats.model_validate(stats.get("shadow", {}).get(canary.id, {}))
        analysis = analyse_shadow(gates, copies, canary_window)
        get_run_logger().info("%s shadow at %d%%: %s — %s", model, window.weight,
                              analysis.verdict, analysis.reason)  # fmt: skip
        return analysis
    golden = None
    # Too few requests is inconclusive whatever the answers: spare the engines the prompts.
    asking = bool(profile.canary.golden_prompts) and enough_requests(gates, canary_window)
    if asking and stable is not None:
        seconds = gates.max_golden_answer_seconds
        golden = golden_agreement(
            profile.canary.golden_prompts,
            model=profile.served_model_name,
            canary=_asker(platform, profile, canary.id, seconds),
            stable=_asker(platform, profile, stable.id, seconds),
        )
    analysis = analyse(gates, canary_window, stable_window, golden)
    get_run_logger().info("%s at %d%%: %s — %s", model, window.weight, analysis.verdict,
                          analysis.reason)  # fmt: skip
    return analysis


def _asker(platform: Platform, profile: Profile, release_id: str, seconds: float) -> Ask:
    """Platform.ask bound to one release, a refusal or a timeout told as Unanswered."""

    def ask(chat: dict[str, Any]) -> dict[str, Any]:
        try:
            return platform.ask(profile, release_id, chat, timeout=seconds)
        except RouterUnreachable as exc:  # mostly a timeout: the release is slow, not gone
            raise Unanswered(one_line(exc.__cause__ or exc)) from exc
        except RouterAdminError as exc:
            raise Unanswered(str(exc)) from exc

    return ask


@task(name="promote", cache_policy=NO_CACHE)
def promote(model: str, target: Target, canary: Release, reason: str) -> HistoryEntry:
    """The canary becomes stable; the old stable drains within its grace and is retired.
    If an abort won the race for the record, nothing changes: the abort's entry is returned."""
    profile, platform = _context(model, target)
    entry = lifecycle.promote(profile, platform, canary, reason, _run_id())
    if entry is None:
        lost = _decided_elsewhere(platform, model, canary)
        if lost is None:
            raise RuntimeError(f"{canary.id} left the release record without an outcome")
        get_run_logger().warning("%s: not promoted: %s", model, lost.reason)
        _announce_taken(model, lost)
        return lost
    get_run_logger().info("%s: promoted %s", model, canary.id)
    _announce(model, entry)
    lifecycle.retire_released(profile, platform)
    return entry


@task(name="rollback", cache_policy=NO_CACHE)
def rollback(model: str, target: Target, reason: str, canary: Release | None = None) -> None:
    """The canary rolled back by decision; if an abort took `canary` first, the abort's entry
    is announced instead."""
    if revert_and_retire(model, target, reason, _run_id()) is not None or canary is None:
        return
    taken = _decided_elsewhere(get_platform(target), model, canary)
    if taken is not None:
        _announce_taken(model, taken)


@task(name="record", cache_policy=NO_CACHE)
def record_outcome(model: str, target: Target, revision: str, outcome: Outcome,
                   reason: str) -> None:  # fmt: skip
    """A rollout that deployed nothing (no-op, or failed before its canary) still leaves a line
    in the history."""
    lifecycle.record_outcome(get_platform(target), model, revision, outcome, reason, _run_id())
