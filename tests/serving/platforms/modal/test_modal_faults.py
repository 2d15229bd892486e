"""Spawn, poll and attach across a restarted orchestrator, under gRPC faults injected at the
TEST DOUBLE of Modal's API (tests/modal_double), through the real modal SDK: the project's
compile App is deployed once for the module; each orchestrator is a SpawnedCalls over the same
call store, with its own gateway and modal client, as a restarted worker has.

The modal 1.6.4 client retries DEADLINE_EXCEEDED, UNAVAILABLE and INTERNAL itself, 3 times, on
both FunctionMap and FunctionGetOutputs (modal._utils.grpc_utils.RETRYABLE_GRPC_STATUS_CODES),
and raises RESOURCE_EXHAUSTED and NOT_FOUND at once: to reach the project's own handling, a
test injects SDK_ATTEMPTS of a retried status, or one of the others.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import modal.exception
import pytest
from grpclib import Status

from serving.config.loader import load_profile
from serving.core.procs import wait_for
from serving.platforms.modal import apps, resources
from serving.platforms.modal.calls import CallKey, CallStore, ModalCallError
from serving.platforms.modal.gateway import ModalGateway
from serving.platforms.modal.spawned import UNKNOWN_BACKOFF_FIRST_SECONDS, SpawnedCalls
from tests.modal_double.calls import EXPIRED, RUNNING, Call, Outcome, raised, returned
from tests.modal_double.fixtures import forget_client
from tests.modal_double.servicer import ModalDouble
from tests.modal_fixtures import remote_wait_for_timeout
from tests.server_fixtures import POLL_SECONDS

REVISION = "0123456789abcdef0123456789abcdef01234567"
COMPILE_APP = "glm-5.1-compile"
COMPILE = resources.COMPILE_FUNCTION
KEY = CallKey(stage="compile", model="glm-5.1", revision=REVISION, detail="kernels-1")
# What the first call computes, and what a call spawned anew computes.
FIRST = {"compiled": "by the first call"}
ANEW = {"compiled": "by a call spawned anew"}
# The SDK's own attempts at a retried status: the first and DEFAULT_MAX_RETRIES more.
SDK_ATTEMPTS = 4
SETTLE_DEADLINE_S = 20.0
POLL_RPC, SPAWN_RPC = "FunctionGetOutputs", "FunctionMap"

# Faults that say nothing about the call, as many as get past the SDK's own retries. Every call
# state meets UNAVAILABLE (INTERNAL and DEADLINE_EXCEEDED take the same path through the SDK,
# raised as InternalError and ServiceError) and RESOURCE_EXHAUSTED; all four meet a wait.
TRANSIENT = {
    "unavailable": (Status.UNAVAILABLE, SDK_ATTEMPTS),
    "internal": (Status.INTERNAL, SDK_ATTEMPTS),
    "deadline-exceeded": (Status.DEADLINE_EXCEEDED, SDK_ATTEMPTS),
    "resource-exhausted": (Status.RESOURCE_EXHAUSTED, 1),
}
# The recorded call as Modal has it when the restarted orchestrator looks, and what it ends
# with: the first call's result (attached to), or a call spawned anew.
STATES: dict[str, tuple[Outcome, dict[str, str]]] = {
    "running": (RUNNING, FIRST),
    "succeeded": (returned(FIRST), FIRST),
    "failed": (raised(RuntimeError("nvcc exited 1")), ANEW),
    # The body's own bare TimeoutError is the type modal uses for "still running".
    "remote-timeout": (raised(remote_wait_for_timeout()), ANEW),
    "expired": (EXPIRED, ANEW),
}


@pytest.fixture(scope="module")
def deployed(module_modal_double: ModalDouble) -> ModalDouble:
    profile = load_profile("glm-5.1")
    module_modal_double.create_secret(profile.secrets.hf_token, {})
    ModalGateway().deploy(apps.build_compile_app(profile).app)
    return module_modal_double


@pytest.fixture
def double(deployed: ModalDouble) -> Iterator[ModalDouble]:
    """The module's double, its calls, scripts, faults and counts of this test only."""
    for state in (deployed.calls, deployed.scripts, deployed.faults, deployed.requests):
        state.clear()
    yield deployed
    assert not deployed.pending_faults(), "a fault the test injected was never reached"


class Orchestrator:
    """One orchestrator process: its own modal client and gateway over the call store in
    `home`, and the backoffs it slept (not slept: recorded)."""

    def __init__(self, home: Path) -> None:
        forget_client()
        self.slept: list[float] = []
        self.calls = SpawnedCalls(CallStore(home / "modal-calls.json"), ModalGateway(),
                                  sleep=self.slept.append)  # fmt: skip

    def compile(self) -> Any:
        started = self.calls.start(KEY, lambda: COMPILE_APP, COMPILE, REVISION)
        return self.calls.finish(started, "compile")

    def spawn_and_die(self, double: ModalDouble) -> Call:
        """Spawn the compile and record it, then die before waiting on it."""
        self.calls.start(KEY, lambda: COMPILE_APP, COMPILE, REVISION)
        return double.calls_of(COMPILE_APP, COMPILE)[-1]


def settle_when_waited_on(double: ModalDouble, call: Call, outcome: Outcome) -> threading.Thread:
    """The running call ends once an orchestrator long-polls it (unless the test ends it)."""

    def waited_on_or_ended() -> bool:
        return call.waits > 0 or call.outcome is not RUNNING

    def settle() -> None:
        waited_on = wait_for(waited_on_or_ended, SETTLE_DEADLINE_S, POLL_SECONDS)
        if waited_on and call.outcome is RUNNING:
            double.settle(call.call_id, outcome)

    thread = threading.Thread(target=settle, daemon=True)
    thread.start()
    return thread


def restart_and_compile(
    double: ModalDouble, home: Path, state: str, fault: tuple[Status, int] | None
) -> tuple[Any, Orchestrator]:
    """A call in `state` on record, then a restarted orchestrator compiles, its first polls
    answered with `fault`."""
    outcome, _ = STATES[state]
    double.script(COMPILE_APP, COMPILE, outcome, returned(ANEW))
    first = Orchestrator(home).spawn_and_die(double)
    settler = settle_when_waited_on(double, first, returned(FIRST)) if state == "running" else None
    if fault is not None:
        double.fail_next(POLL_RPC, *fault)
    restarted = Orchestrator(home)
    result = restarted.compile()
    if settler is not None:
        double.settle(first.call_id, returned(FIRST))  # ends the settler if never waited on
        settler.join(SETTLE_DEADLINE_S)
    return result, restarted


def call_ids(double: ModalDouble) -> list[str]:
    return [call.call_id for call in double.calls_of(COMPILE_APP, COMPILE)]


def recorded(home: Path) -> list[str]:
    return [record.call_id for record in CallStore(home / "modal-calls.json").records()]


@pytest.mark.parametrize("state", list(STATES))
def test_a_restarted_orchestrator_attaches_or_spawns_anew_by_the_recorded_call_s_state(
    double: ModalDouble, tmp_path: Path, state: str
) -> None:
    result, restarted = restart_and_compile(double, tmp_path, state, fault=None)

    _, expected = STATES[state]
    assert result == expected
    spawned = 1 if expected is FIRST else 2
    assert len(call_ids(double)) == double.requests[SPAWN_RPC] == spawned
    assert recorded(tmp_path) == call_ids(double)[-1:]
    assert restarted.slept == []


@pytest.mark.parametrize("fault", ["unavailable", "resource-exhausted"])
@pytest.mark.parametrize("state", list(STATES))
def test_a_transient_fault_on_the_poll_changes_nothing_but_a_backoff(
    double: ModalDouble, tmp_path: Path, state: str, fault: str
) -> None:
    result, restarted = restart_and_compile(double, tmp_path, state, TRANSIENT[fault])

    _, expected = STATES[state]
    assert result == expected  # as without the fault
    spawned = 1 if expected is FIRST else 2
    assert len(call_ids(double)) == double.requests[SPAWN_RPC] == spawned  # never one more
    assert restarted.slept == [UNKNOWN_BACKOFF_FIRST_SECONDS]


@pytest.mark.parametrize("state", list(STATES))
def test_a_call_modal_no_longer_knows_is_spawned_anew_exactly_once(
    double: ModalDouble, tmp_path: Path, state: str
) -> None:
    # NOT_FOUND on the poll: the SDK raises NotFoundError, not retried; the call is gone.
    result, restarted = restart_and_compile(double, tmp_path, state, (Status.NOT_FOUND, 1))

    assert result == ANEW
    assert len(call_ids(double)) == double.requests[SPAWN_RPC] == 2
    assert recorded(tmp_path) == call_ids(double)[-1:]
    assert restarted.slept == []


@pytest.mark.parametrize("fault", list(TRANSIENT))
def test_a_transient_fault_while_waiting_backs_off_and_waits_on_the_same_call(
    double: ModalDouble, tmp_path: Path, fault: str
) -> None:
    double.script(COMPILE_APP, COMPILE, RUNNING)
    orchestrator = Orchestrator(tmp_path)
    started = orchestrator.calls.start(KEY, lambda: COMPILE_APP, COMPILE, REVISION)
    [call] = double.calls_of(COMPILE_APP, COMPILE)
    double.fail_next(POLL_RPC, *TRANSIENT[fault])
    settler = settle_when_waited_on(double, call, returned(FIRST))

    assert orchestrator.calls.finish(started, "compile") == FIRST
    settler.join(SETTLE_DEADLINE_S)
    assert double.requests[SPAWN_RPC] == 1
    assert orchestrator.slept == [UNKNOWN_BACKOFF_FIRST_SECONDS]


@pytest.mark.parametrize(
    ("status", "times"),
    [(Status.UNAVAILABLE, 2), (Status.INTERNAL, 1), (Status.DEADLINE_EXCEEDED, 1)],
)
def test_the_sdk_s_own_retries_of_a_spawn_start_one_call(
    double: ModalDouble, tmp_path: Path, status: Status, times: int
) -> None:
    double.script(COMPILE_APP, COMPILE, returned(FIRST))
    double.fail_next(SPAWN_RPC, status, times)

    assert Orchestrator(tmp_path).compile() == FIRST
    assert double.requests[SPAWN_RPC] == times + 1
    assert len(call_ids(double)) == 1


@pytest.mark.parametrize(
    ("status", "times", "raised_as"),
    [
        (Status.UNAVAILABLE, SDK_ATTEMPTS, modal.exception.ServiceError),
        (Status.INTERNAL, SDK_ATTEMPTS, modal.exception.InternalError),
        (Status.RESOURCE_EXHAUSTED, 1, modal.exception.ResourceExhaustedError),
        (Status.NOT_FOUND, 1, modal.exception.NotFoundError),
    ],
    ids=["unavailable", "internal", "resource-exhausted", "not-found"],
)
def test_a_spawn_that_fails_records_nothing_and_the_restart_spawns_once(
    double: ModalDouble, tmp_path: Path, status: Status, times: int, raised_as: type[Exception]
) -> None:
    double.script(COMPILE_APP, COMPILE, returned(FIRST))
    double.fail_next(SPAWN_RPC, status, times)
    with pytest.raises(raised_as):
        Orchestrator(tmp_path).compile()
    assert recorded(tmp_path) == [] and call_ids(double) == []

    assert Orchestrator(tmp_path).compile() == FIRST
    assert double.requests[SPAWN_RPC] == times + 1
    assert len(call_ids(double)) == 1


def test_a_remote_timeout_error_read_while_waiting_fails_the_stage(
    double: ModalDouble, tmp_path: Path
) -> None:
    double.script(COMPILE_APP, COMPILE, RUNNING)
    orchestrator = Orchestrator(tmp_path)
    started = orchestrator.calls.start(KEY, lambda: COMPILE_APP, COMPILE, REVISION)
    [call] = double.calls_of(COMPILE_APP, COMPILE)
    settler = settle_when_waited_on(double, call, raised(remote_wait_for_timeout()))

    with pytest.raises(ModalCallError, match=f"call {call.call_id} failed: TimeoutError"):
        orchestrator.calls.finish(started, "compile")
    settler.join(SETTLE_DEADLINE_S)
    assert recorded(tmp_path) == [call.call_id]  # the next attempt probes it and spawns anew
