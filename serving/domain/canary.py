"""The canary steps of a profile, interpreted by one small state machine.

The machine is a generator: it yields the next Action and receives that action's outcome (an
Analysis after `analyse`, a bool after `await_approval`, None otherwise). The flow performs the
actions; all the decisions are here, in the order a reader would expect:

    for each step:  [approval?] → set weight → bake → analyse
                    (a shadow step: the weight the canary has, plus shadow copies, judged on
                    the copies; the next step ends them)
                    inconclusive → extend the bake (the same window grows) → analyse, until
                        it is judged or the bake reaches the profile's max_bake_seconds (not
                        when the router restarted in the window: that hole stays in it)
                    still inconclusive → pause or roll back (on_inconclusive)
                    fail → roll back
    all steps held → promote

An extension waits as long as the canary's request rate so far needs to reach min_requests
(with a margin); with no rate to go by, or when something other than the request count left the
window unjudged (no measurements, stable silent), it waits one more step bake.

The first release of a model has nothing to compare against: it goes straight to 100% (the
warmup probes have already passed) and is promoted.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Literal

from pydantic import BaseModel

from serving.config.profile import Canary, CanaryStep, Shadow
from serving.domain.analysis import Analysis

# Traffic is bursty: an extension sized to the bare average would often fall just short.
EXTENSION_MARGIN = 1.25


class Action(BaseModel):
    kind: Literal[
        "set_weight", "bake", "extend_bake", "analyse", "await_approval", "promote", "rollback"
    ]
    weight: int | None = None
    seconds: float | None = None
    reason: str = ""
    shadow: Shadow | None = None  # set_weight, bake, analyse of a shadow step


Outcome = Analysis | bool | None
Machine = Generator[Action, Outcome, None]


def canary_machine(canary: Canary, *, has_stable: bool) -> Machine:
    if not has_stable:
        yield Action(kind="set_weight", weight=100)
        yield Action(kind="promote", reason="first release of the model: nothing to compare")
        return
    weight = 0
    for step in canary.steps:
        weight = step.weight if step.weight is not None else weight
        where = f"the shadow step at {weight}%" if step.shadow else f"{weight}%"
        if step.approval:
            approved = yield Action(kind="await_approval", reason=f"before {where}")
            if not approved:
                yield Action(kind="rollback", reason=f"not approved before {where}")
                return
        yield Action(kind="set_weight", weight=weight, shadow=step.shadow)
        if not step.seconds:
            continue
        analysis, baked = yield from _bake_until_judged(canary, step, weight)
        if analysis.verdict == "fail":
            yield Action(kind="rollback", reason=f"at {where}: {analysis.reason}")
            return
        if analysis.verdict == "inconclusive":
            why = f"at {where} after a {baked:.0f} s bake: {analysis.reason}"
            if canary.on_inconclusive == "rollback":
                yield Action(kind="rollback", reason=f"inconclusive {why}")
                return
            approved = yield Action(kind="await_approval", reason=f"inconclusive {why}")
            if not approved:
                yield Action(kind="rollback", reason=f"not approved: inconclusive {why}")
                return
    yield Action(kind="promote", reason="every step held")


def _bake_until_judged(
    canary: Canary, step: CanaryStep, weight: int
) -> Generator[Action, Outcome, tuple[Analysis, float]]:
    """Bake and analyse; extend an inconclusive window while the step's bake limit allows.
    Returns the last analysis and the seconds baked."""
    limit = canary.bake_limit(step)
    baked = step.seconds
    shadow: Shadow | None = step.shadow
    yield Action(kind="bake", weight=weight, seconds=baked, shadow=shadow)
    while True:
        analysis = yield Action(kind="analyse", weight=weight, shadow=shadow)
        assert isinstance(analysis, Analysis), "analyse must be answered with an Analysis"
        if analysis.verdict != "inconclusive" or baked >= limit or analysis.lost_for_good:
            return analysis, baked
        more = min(limit - baked, _extension(analysis, canary.gates.min_requests, baked, step))
        yield Action(kind="extend_bake", weight=weight, seconds=more, reason=analysis.reason,
                     shadow=shadow)  # fmt: skip
        baked += more


def _extension(analysis: Analysis, min_requests: int, baked: float, step: CanaryStep) -> float:
    """Seconds more the window needs: what the canary's rate so far takes to reach
    min_requests, or one more step bake when there is no rate to go by."""
    arrived = analysis.canary.requests
    if not analysis.short_of_requests or arrived == 0:
        return step.seconds
    return EXTENSION_MARGIN * baked * (min_requests - arrived) / arrived
