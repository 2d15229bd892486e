"""A shadow step in the canary machine, and its gate on the router's comparisons: pure logic."""

from __future__ import annotations

from serving.config.profile import Canary, CanaryStep, Gates, Shadow
from serving.domain.analysis import Analysis, Window, analyse_shadow
from serving.domain.canary import Action, canary_machine
from serving.router.comparison import ShadowStats

GATES = Gates(min_requests=10, min_shadow_agreement=0.95, max_error_rate=0.05)
SHADOW = Shadow(percent=50, seconds=30)
AT_ZERO = Window(requests=0)


def shadow_first() -> Canary:
    steps = [CanaryStep(shadow=SHADOW), CanaryStep(weight=50, bake_seconds=5),
             CanaryStep(weight=100, bake_seconds=0)]  # fmt: skip
    return Canary(steps=steps, gates=GATES)


def judged(**copies: object) -> Analysis:
    return analyse_shadow(GATES, ShadowStats.model_validate(copies), AT_ZERO)


def run(canary: Canary, analyses: list[Analysis]) -> list[Action]:
    """Every action of the machine, answering each `analyse` from `analyses` in order."""
    answers = iter(analyses)
    machine = canary_machine(canary, has_stable=True)
    actions = [next(machine)]
    while actions[-1].kind not in ("promote", "rollback"):
        reply = next(answers) if actions[-1].kind == "analyse" else None
        actions.append(machine.send(reply))
    return actions


def test_a_disagreeing_canary_is_rolled_back_before_any_weight() -> None:
    disagree = judged(copies=40, compared=40, deterministic=40, agreement=0.5)
    actions = run(shadow_first(), [disagree])
    assert [(a.kind, a.weight, a.shadow) for a in actions] == [
        ("set_weight", 0, SHADOW), ("bake", 0, SHADOW), ("analyse", 0, SHADOW),
        ("rollback", None, None),
    ]  # fmt: skip
    assert actions[1].seconds == SHADOW.seconds
    assert actions[-1].reason == (
        "at the shadow step at 0%: shadow agreement 50% over 40 deterministic requests (< 95%)"
    )


def test_an_agreeing_canary_goes_on_and_the_next_step_ends_the_copies() -> None:
    agree = judged(copies=40, compared=40, deterministic=40, agreement=1.0)
    healthy = Analysis(verdict="pass", canary=Window(requests=40), stable=None, gates=[])
    actions = run(shadow_first(), [agree, healthy])
    weights = [(a.weight, a.shadow) for a in actions if a.kind == "set_weight"]
    assert weights == [(0, SHADOW), (50, None), (100, None)]
    assert actions[-1].kind == "promote"


def test_too_few_deterministic_copies_is_inconclusive() -> None:
    sampled = judged(copies=40, compared=40, deterministic=3, agreement=1.0)
    assert sampled.verdict == "inconclusive"
    assert "only 3 deterministic shadow copies" in sampled.reason


def test_failed_copies_fail_the_step_on_their_own_error_rate() -> None:
    failing = judged(copies=40, compared=0, errors=40, error_rate=1.0, deterministic=0)
    assert failing.verdict == "fail" and "shadow copy error rate 1" in failing.reason


def test_agreement_at_the_threshold_passes() -> None:
    held = judged(copies=20, compared=20, deterministic=20, agreement=0.95)
    assert held.verdict == "pass"
    assert [gate.gate for gate in held.gates] == ["shadow_error_rate", "shadow_agreement"]
