"""The canary state machine and the analysis gates, as pure logic."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from serving.config.profile import Canary, CanaryStep, ChatMessage, Gates, GoldenPrompt
from serving.domain.analysis import (
    Analysis,
    Ask,
    GoldenResult,
    Side,
    Silence,
    Unanswered,
    Window,
    analyse,
    golden_agreement,
    unmeasured,
)
from serving.domain.canary import Action, Machine, Outcome, canary_machine
from serving.domain.interruptions import interrupted, router_restart_finding
from serving.domain.records import HistoryEntry, ReleaseRecord, now
from serving.domain.release import Release
from serving.platforms.local.stores import FileReleaseStore

GATES = Gates(min_requests=10)
STABLE = Window(requests=100, errors=0, error_rate=0.0, ttft_p50=0.1, ttft_p99=0.3)
HEALTHY = Window(requests=50, errors=0, error_rate=0.0, ttft_p50=0.11, ttft_p99=0.33)


def canary(**overrides: object) -> Canary:
    steps = [CanaryStep(weight=10, bake_seconds=5), CanaryStep(weight=50, bake_seconds=5),
             CanaryStep(weight=100, bake_seconds=0)]  # fmt: skip
    return Canary(steps=steps, gates=GATES, **overrides)  # type: ignore[arg-type]


def actions(machine: Machine, outcomes: list[Outcome]) -> list[Action]:
    """Run the machine, answering analyse/approval actions from `outcomes` in order."""
    answers = iter(outcomes)
    seen: list[Action] = []
    action = next(machine)
    while True:
        seen.append(action)
        reply = next(answers) if action.kind in ("analyse", "await_approval") else None
        try:
            action = machine.send(reply)
        except StopIteration:
            return seen


def drive(machine: Machine, outcomes: list[Outcome]) -> list[str]:
    """The actions as `kind:weight`."""
    return [f"{a.kind}:{a.weight}" if a.weight is not None else a.kind
            for a in actions(machine, outcomes)]  # fmt: skip


def steps_of(profile: Canary, outcomes: list[Outcome]) -> list[Action]:
    return actions(canary_machine(profile, has_stable=True), outcomes)


def baked(trace: list[Action], weight: int) -> list[float | None]:
    """The seconds of each bake and extension at `weight`."""
    return [a.seconds for a in trace if a.kind in ("bake", "extend_bake") and a.weight == weight]


def verdict(window: Window) -> Analysis:
    return analyse(GATES, window, STABLE)


def test_healthy_canary_walks_every_step_then_promotes() -> None:
    trace = drive(canary_machine(canary(), has_stable=True), [verdict(HEALTHY)] * 2)
    assert trace == ["set_weight:10", "bake:10", "analyse:10", "set_weight:50", "bake:50",
                     "analyse:50", "set_weight:100", "promote"]  # fmt: skip


def test_first_release_goes_straight_to_full_traffic() -> None:
    assert drive(canary_machine(canary(), has_stable=False), []) == ["set_weight:100", "promote"]


def test_failed_gate_rolls_back_at_once() -> None:
    broken = Window(requests=50, errors=10, error_rate=0.2, ttft_p50=0.1, ttft_p99=0.3)
    trace = drive(canary_machine(canary(), has_stable=True), [verdict(broken)])
    assert trace == ["set_weight:10", "bake:10", "analyse:10", "rollback"]


def test_thin_traffic_extends_the_bake_up_to_max_then_applies_the_policy() -> None:
    quiet = verdict(Window(requests=3))  # of 10 needed
    trace = steps_of(canary(max_bake_seconds=20), [quiet] * 3)
    # 3 requests in 5 s: 7 more need 11.7 s at that rate, 14.6 s with the margin; then the
    # last 0.4 s up to the limit
    assert baked(trace, 10) == [5, pytest.approx(14.583, abs=0.01), pytest.approx(0.417, abs=0.01)]
    assert [a.kind for a in trace][-2:] == ["analyse", "rollback"]
    assert trace[-1].reason == (
        "inconclusive at 10% after a 20 s bake: only 3 canary requests (need 10)"
    )
    paused = steps_of(canary(max_bake_seconds=20, on_inconclusive="pause"), [quiet] * 3 + [False])
    assert [a.kind for a in paused][-2:] == ["await_approval", "rollback"]


def test_an_extension_ends_as_soon_as_the_window_is_judged() -> None:
    half = verdict(Window(requests=5))
    trace = steps_of(canary(max_bake_seconds=60), [half, verdict(HEALTHY), verdict(HEALTHY)])
    assert baked(trace, 10) == [5, pytest.approx(1.25 * 5)]  # the rate doubles the window
    assert baked(trace, 50) == [5]
    assert trace[-1].kind == "promote"


def test_an_empty_window_or_no_measurements_wait_one_more_step_bake() -> None:
    for unjudged in (verdict(Window(requests=0)), unmeasured("RouterUnreachable: ReadTimeout")):
        trace = steps_of(canary(max_bake_seconds=60),
                         [unjudged, verdict(HEALTHY), verdict(HEALTHY)])  # fmt: skip
        assert baked(trace, 10) == [5, 5]
        assert trace[-1].kind == "promote"


def test_a_window_the_router_restarted_in_is_not_extended() -> None:
    """A longer bake keeps the window's start, and the measurements lost at the restart: it
    could never be judged, so the inconclusive policy applies at once."""
    restart = router_restart_finding(measured_since=103.0, window_started=100.0)
    lost = interrupted(HEALTHY, STABLE, None, restart)
    assert lost is not None and lost.lost_for_good and not lost.short_of_requests
    trace = steps_of(canary(max_bake_seconds=60), [lost])
    assert baked(trace, 10) == [5]
    assert trace[-1].kind == "rollback" and "the router restarted 3.0 s into" in trace[-1].reason


def test_no_extension_when_the_limit_is_the_bake_itself() -> None:
    trace = drive(canary_machine(canary(max_bake_seconds=5), has_stable=True),
                  [verdict(Window(requests=3))])  # fmt: skip
    assert trace == ["set_weight:10", "bake:10", "analyse:10", "rollback"]


def test_by_default_an_inconclusive_bake_is_extended_once() -> None:
    quiet = verdict(Window(requests=3))
    trace = steps_of(canary(), [quiet, quiet])
    assert baked(trace, 10) == [5, 5]  # up to twice the step's bake
    assert trace[-1].kind == "rollback"
    recovered = steps_of(canary(), [quiet, verdict(HEALTHY), verdict(HEALTHY)])
    assert baked(recovered, 10) == [5, 5] and recovered[-1].kind == "promote"


def test_approval_step_waits_for_a_human() -> None:
    steps = [CanaryStep(weight=10, bake_seconds=0), CanaryStep(weight=100, bake_seconds=0,
                                                               approval=True)]  # fmt: skip
    machine = canary_machine(Canary(steps=steps, gates=GATES), has_stable=True)
    assert drive(machine, [False]) == ["set_weight:10", "await_approval", "rollback"]


@pytest.mark.parametrize(
    ("window", "gate"),
    [
        (Window(requests=50, errors=5, error_rate=0.1, ttft_p50=0.1, ttft_p99=0.3), "error_rate"),
        (Window(requests=50, ttft_p50=0.35, ttft_p99=0.4), "ttft_p50_ratio"),
        (Window(requests=50, ttft_p50=0.1, ttft_p99=0.9), "ttft_p99_ratio"),
    ],
)
def test_each_gate_can_fail(window: Window, gate: str) -> None:
    analysis = verdict(window)
    assert analysis.verdict == "fail"
    assert [g.gate for g in analysis.gates if not g.passed] == [gate]
    assert gate.split("_")[0] in analysis.reason or "TTFT" in analysis.reason.upper()


@pytest.mark.parametrize("percentile", ["p50", "p99"])
def test_absolute_ttft_slo_fails_a_slow_canary_even_beside_a_slow_stable(percentile: str) -> None:
    slow_stable = Window(requests=100, ttft_p50=1.0, ttft_p99=2.0)
    slow_canary = Window(requests=50, ttft_p50=1.2, ttft_p99=2.4)  # within every ratio
    assert analyse(GATES, slow_canary, slow_stable).verdict == "pass"
    gates = GATES.model_copy(update={f"max_ttft_{percentile}_seconds": 1.0})
    analysis = analyse(gates, slow_canary, slow_stable)
    assert analysis.verdict == "fail"
    assert [g.gate for g in analysis.gates if not g.passed] == [f"ttft_{percentile}_seconds"]
    assert f"canary ttft_{percentile} seconds" in analysis.reason


def test_relative_error_gate_uses_stable_as_the_baseline() -> None:
    noisy_stable = STABLE.model_copy(update={"errors": 1, "error_rate": 0.004})
    gates = Gates(min_requests=10, max_error_rate=0.05, max_error_rate_ratio=2.0)
    worse = Window(requests=100, errors=2, error_rate=0.02, ttft_p50=0.1, ttft_p99=0.3)
    analysis = analyse(gates, worse, noisy_stable)
    assert analysis.verdict == "fail" and "canary/stable error rate" in analysis.reason


def test_golden_disagreement_fails() -> None:
    golden = GoldenResult(agreement=0.5, answers=[("Paris", "Paris"), ("Lyon", "Paris")])
    analysis = analyse(GATES.model_copy(update={"min_golden_agreement": 0.9}), HEALTHY, STABLE,
                       golden)  # fmt: skip
    assert analysis.verdict == "fail" and "golden agreement 50%" in analysis.reason


CAPITAL = GoldenPrompt(messages=[ChatMessage(role="user", content="Capital of France?")])


def test_golden_prompts_stop_at_the_first_silence_and_name_who_kept_it() -> None:
    asked: list[str] = []

    def answers(who: str, content: str | None) -> Ask:
        def ask(chat: dict[str, Any]) -> dict[str, Any]:
            asked.append(who)
            if content is None:
                raise Unanswered("ReadTimeout")
            return {"choices": [{"message": {"content": content}}]}

        return ask

    result = golden_agreement([CAPITAL, CAPITAL], model="m", canary=answers("canary", "Paris"),
                              stable=answers("stable", None))  # fmt: skip
    assert result.silence == Silence(releases=["stable"], prompt=1, why="ReadTimeout")
    assert asked == ["canary", "stable"]  # both asked the first prompt, nobody the second
    both = golden_agreement([CAPITAL], model="m", canary=answers("canary", None),
                            stable=answers("stable", None))  # fmt: skip
    assert both.silence is not None and both.silence.releases == ["canary", "stable"]
    malformed = golden_agreement([CAPITAL], model="m", canary=lambda chat: {"error": "x"},
                                 stable=answers("stable", "Paris"))  # fmt: skip
    assert malformed.silence is not None and malformed.silence.releases == ["canary"]


@pytest.mark.parametrize(
    ("releases", "expected"),
    [(["canary"], "fail"), (["stable"], "inconclusive"), (["canary", "stable"], "inconclusive")],
)
def test_a_release_silent_on_a_golden_prompt_is_a_finding(
    releases: list[Side], expected: str
) -> None:
    silence = Silence(releases=releases, prompt=1, why="ReadTimeout")
    golden = GoldenResult(agreement=0.0, answers=[], silence=silence)
    analysis = analyse(GATES, HEALTHY, STABLE, golden)
    assert analysis.verdict == expected
    who = " and ".join(releases)
    assert analysis.reason == f"{who} did not answer golden prompt 1 within 60 s: ReadTimeout"


def test_a_broken_gate_fails_even_when_stable_is_silent() -> None:
    broken = Window(requests=50, errors=10, error_rate=0.2, ttft_p50=0.1, ttft_p99=0.3)
    silence = Silence(releases=["stable"], prompt=1, why="ReadTimeout")
    analysis = analyse(GATES, broken, STABLE, GoldenResult(agreement=0, answers=[],
                                                           silence=silence))  # fmt: skip
    assert analysis.verdict == "fail" and analysis.reason.startswith("canary error rate 0.2")


def test_no_measurements_leave_the_window_unjudged() -> None:
    analysis = unmeasured("RouterUnreachable: router at http://127.0.0.1:1 does not answer")
    assert analysis.verdict == "inconclusive" and not analysis.short_of_requests
    assert analysis.reason.startswith("no measurements from the router: RouterUnreachable")


def test_release_record_is_atomic_and_remembers_the_last_failure(tmp_path: Path) -> None:
    store = FileReleaseStore(tmp_path)
    assert store.read("m") == ReleaseRecord(model="m")
    release = Release(model="m", revision="a" * 40, id="m-aaaaaaaa", url="http://x",
                      deployed_at=now())  # fmt: skip
    record = ReleaseRecord(model="m", stable=release).with_history(
        HistoryEntry(revision="b" * 40, at=now(), outcome="rolled-back", reason="5xx")
    )
    assert store.update("m", lambda _: record) == record
    assert FileReleaseStore(tmp_path).read("m") == record
    assert record.last_failed_revision() == "b" * 40
    promoted = record.with_history(
        HistoryEntry(revision="c" * 40, at=now(), outcome="promoted", reason="ok")
    )
    assert promoted.last_failed_revision() is None
    assert not list(tmp_path.glob("*.tmp"))
