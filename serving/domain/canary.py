"""The canary steps of a profile, interpreted by one small state machine.

The machine is a generator: it yields the next Action and receives that action's outcome (an
Analysis after `analyse`, a bool after `await_approval`, None otherwise). The flow performs the
actions; all the decisions are here, in the order a reader would expect:

    for each step:  [approval?] → set weight → bake → analyse
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

from serving.config.profile import Canary
from serving.domain.analysis import Analysis


class Action(BaseModel):
    kind: Literal["set_weight", "bake", "analyse", "await_approval", "promote", "rollback"]
    weight: int | None = None
    seconds: float | None = None
    reason: str = ""


Outcome = Analysis | bool | None
Machine = Generator[Action, Outcome, None]


def canary_machine(canary: Canary, *, has_stable: bool) -> Machine:
    if not has_stable:
        yield Action(kind="set_weight", weight=100)
        yield Action(kind="promote", reason="first release of the model: nothing to compare")
        return
    for step in canary.steps:
        if step.approval:
            approved = yield Action(kind="await_approval", reason=f"before {step.weight}%")
            if not approved:
                yield Action(kind="rollback", reason=f"not approved before {step.weight}%")
                return
        yield Action(kind="set_weight", weight=step.weight)
        if step.bake_seconds == 0:
            continue
        analysis = yield from _bake_and_analyse(step.weight, step.bake_seconds)
        if analysis.verdict == "fail":
            yield Action(kind="rollback", reason=f"at {step.weight}%: {analysis.reason}")
            return
        if analysis.verdict == "inconclusive":
            why = f"at {step.weight}% after an extended bake: {analysis.reason}"
            if canary.on_inconclusive == "rollback":
                yield Action(kind="rollback", reason=f"inconclusive {why}")
                return
            approved = yield Action(kind="await_approval", reason=f"inconclusive {why}")
            if not approved:
                yield Action(kind="rollback", reason=f"not approved: inconclusive {why}")
                return
    yield Action(kind="promote", reason="every step held")


def _bake_and_analyse(weight: int, seconds: float) -> Generator[Action, Outcome, Analysis]:
    """Bake and analyse; an inconclusive window (too few requests) earns one more bake."""
    for _ in range(2):
        yield Action(kind="bake", weight=weight, seconds=seconds)
        analysis = yield Action(kind="analyse", weight=weight)
        assert isinstance(analysis, Analysis), "analyse must be answered with an Analysis"
        if analysis.verdict != "inconclusive":
            break
    return analysis
