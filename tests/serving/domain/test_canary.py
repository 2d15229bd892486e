"""The canary state machine and the analysis gates, as pure logic."""

from __future__ import annotations

from pathlib import Path

import pytest

from serving.config.profile import Canary, CanaryStep, Gates
from serving.domain.analysis import Analysis, GoldenResult, Window, analyse
from serving.domain.canary import Action, Outcome, canary_machine
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


def drive(machine: object, outcomes: list[Outcome]) -> list[str]:
    """Run the machine, answering analyse/approval actions from `outcomes` in order."""
    answers = iter(outcomes)
    trace: list[str] = []
    action: Action = next(machine)  # type: ignore[call-overload]
    while True:
        trace.append(f"{action.kind}:{action.weight}" if action.weight is not None else action.kind)
        reply = next(answers) if action.kind in ("analyse", "await_approval") else None
        try:
            action = machine.send(reply)  # type: ignore[attr-defined]
        except StopIteration:
            return trace


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


def test_inconclusive_extends_once_then_pauses_or_rolls_back() -> None:
    quiet = verdict(Window(requests=3))
    paused = drive(canary_machine(canary(on_inconclusive="pause"), has_stable=True),
                   [quiet, quiet, True, verdict(HEALTHY)])  # fmt: skip
    assert paused[:6] == ["set_weight:10", "bake:10", "analyse:10", "bake:10", "analyse:10",
                          "await_approval"]  # fmt: skip
    assert paused[-1] == "promote"
    rolled = drive(canary_machine(canary(on_inconclusive="rollback"), has_stable=True),
                   [quiet, quiet])  # fmt: skip
    assert rolled[-1] == "rollback"
    recovered = drive(canary_machine(canary(), has_stable=True),
                      [quiet, verdict(HEALTHY), verdict(HEALTHY)])  # fmt: skip
    assert recovered[-1] == "promote" and recovered.count("bake:10") == 2


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
