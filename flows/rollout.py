"""The `rollout` flow: prepare a revision, canary it against the stable release, then promote it
or roll it back.

    reconcile → resolve → (no-op if already stable)
    → prep (download ‖ compile → verify, a subflow)
    → deploy canary at 0% (readiness + warmup probes) → canary steps → promote | roll back

With dummy weights (the flag or the profile's `dummy_weights`), to iterate on serving flags:
    reconcile → resolve → config and tokenizer only → deploy at 0% (readiness + probes)
    → retired, recorded as `dummy`: never weighted, never stable

Decisions (a failed gate, an inconclusive window, trouble measuring) roll back by themselves;
an unexpected failure after the canary is deployed is undone by the transaction's rollback hook,
and no task inside the transaction is retried by Prefect (the retry would find the canary
retired); cancellation and crashes by the flow's hooks; a SIGKILLed orchestrator by the next
run's `reconcile`.
"""

from __future__ import annotations

from prefect import flow
from prefect.client.schemas.objects import FlowRun
from prefect.runtime import flow_run
from prefect.states import State
from prefect.transactions import transaction

from flows.prep import prep
from serving.config.loader import load_profile
from serving.platform import Target
from tasks.canary import CanaryRun
from tasks.release import (
    deploy_canary,
    promote,
    reconcile,
    record_outcome,
    rollback,
    settle_ended_run,
)
from tasks.report import RolloutReport, publish
from tasks.stopwatch import Stopwatch
from tasks.weights import fetch_serving_config, resolve

DUMMY_REASON = "dummy weights: served and probed at 0%, never promoted"


def _settle(flow: object, run: FlowRun, state: State) -> None:
    """Cancelled, crashed or failed: weights back to stable, canary retired, reason recorded
    (a run that failed before its canary still leaves its line)."""
    model, target = run.parameters["model"], run.parameters.get("target", "local")
    # The state message may hold a whole traceback: the history keeps its first line.
    first_line = next(iter((state.message or "").strip().splitlines()), "")
    reason = f"flow run {state.name.lower()}: {first_line}".strip()
    settle_ended_run(model, target, run.parameters.get("revision"), reason, str(run.id))


@flow(
    name="rollout",
    on_cancellation=[_settle],
    on_crashed=[_settle],
    on_failure=[_settle],
)
def rollout(
    model: str,
    revision: str | None = None,
    target: Target = "local",
    approve: bool = False,
    dummy_weights: bool = False,
) -> RolloutReport:
    profile = load_profile(model)
    dummy = dummy_weights or profile.dummy_weights
    report = RolloutReport(model=model, dummy_weights=dummy)
    watch = Stopwatch()

    asked = revision or profile.hub.revision
    record = reconcile(model, asked, target)
    sha = resolve(model, asked, target)
    report.revision = sha
    report.stage("resolve", watch.lap())
    if dummy:
        return _serve_dummy(report, sha, target, watch)
    if record.stable is not None and record.stable.revision == sha:
        record_outcome(model, target, sha, "no-op", f"{sha[:8]} is already stable")
        return _finish(report, "no-op", f"{sha[:8]} is already stable")

    prepared = prep(model, sha, target)
    report.bytes_downloaded = prepared.bytes_downloaded
    compiled = f"compile {prepared.compile_status}: {prepared.compile_reason}"
    report.stage("prep", watch.lap(), compiled)

    with transaction():
        canary = deploy_canary(model, sha, target, owner=str(flow_run.id))
        report.stage("deploy canary", watch.lap(), canary.id)
        run = CanaryRun(model, target, canary, record.stable, approve)
        decision = run.drive()
        report.steps = run.steps
        report.stage("canary steps", watch.lap())
        outcome, reason = "rolled-back", decision.reason
        if decision.kind == "promote":
            # An abort may win the race for the record: then its entry is the outcome.
            decided = promote(model, target, canary, decision.reason)
            outcome, reason = decided.outcome, decided.reason
        else:
            rollback(model, target, decision.reason, canary)
        report.stage(decision.kind, watch.lap())
    return _finish(report, outcome, reason)


def _serve_dummy(report: RolloutReport, sha: str, target: Target,
                 watch: Stopwatch) -> RolloutReport:  # fmt: skip
    """Random weights of the revision, served and probed at 0% beside whatever is stable, then
    retired: the release store never takes them as stable."""
    model = report.model
    fetch_serving_config(model, sha, target)
    report.stage("fetch config", watch.lap(), "config and tokenizer only, no download")
    with transaction():
        canary = deploy_canary(model, sha, target, owner=str(flow_run.id), dummy_weights=True)
        report.stage("deploy", watch.lap(), f"{canary.id}: ready, probes answered")
        rollback(model, target, DUMMY_REASON)
        report.stage("retire", watch.lap(), canary.id)
    return _finish(report, "dummy", DUMMY_REASON)


def _finish(report: RolloutReport, decision: str, reason: str) -> RolloutReport:
    report.decision, report.reason = decision, reason  # type: ignore[assignment]
    publish(report)
    return report
