"""The canary steps of a profile, interpreted by one small state machine.

The machine is a generator: it yields the next Action and receives that action's outcome (an
Analysis after `analyse`, a bool after `await_approval`, None otherwise). The flow performs the
actions; all the decisions are here, in the order a reader would expect:

    for each step:  [approval?] → set weight → bake → analyse
                    (a shadow step: the weight the canary has, plus shadow copies, baked for
                    the shadow's seconds, analysed on the copies; the next step ends them)
                    inconclusive → bake once more → analyse → still inconclusive: pause or roll back
                    fail → roll back
    all steps held → promote

The first release of a model has nothing to compare against: it goes straight to 100% (the
warmup probes have already passed) and is promoted.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Literal

from pydantic import BaseModel

from serving.config.profile import Canary, Shadow
from serving.domain.analysis import Analysis


class Action(BaseModel):
    kind: Literal["set_weight", "bake", "analyse", "await_approval", "promote", "rollback"]
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
        seconds = step.shadow.seconds if step.shadow else step.bake_seconds
        if not seconds:
            continue
        analysis = yield from _bake_and_analyse(weight, seconds, step.shadow)
        if analysis.verdict == "fail":
            yield Action(kind="rollback", reason=f"at {where}: {analysis.reason}")
            return
        if analysis.verdict == "inconclusive":
            why = f"at {where} after an extended bake: {analysis.reason}"
            if canary.on_inconclusive == "rollback":
                yield Action(kind="rollback", reason=f"inconclusive {why}")
                return
            approved = yield Action(kind="await_approval", reason=f"inconclusive {why}")
            if not approved:
                yield Action(kind="rollback", reason=f"not approved: inconclusive {why}")
                return
    yield Action(kind="promote", reason="every step held")


def _bake_and_analyse(
    weight: int, seconds: float, shadow: Shadow | None
) -> Generator[Action, Outcome, Analysis]:
    """Bake and analyse; an inconclusive window (too few requests) earns one more bake."""
    for _ in range(2):
        yield Action(kind="bake", weight=weight, seconds=seconds, shadow=shadow)
        analysis = yield Action(kind="analyse", weight=weight, shadow=shadow)
        assert isinstance(analysis, Analysis), "analyse must be answered with an Analysis"
        if analysis.verdict != "inconclusive":
            break
    return analysis
