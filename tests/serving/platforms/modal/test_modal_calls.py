"""Spawned Modal calls: the durable call store, and reading a call's state (attach_or_spawn,
probe_call), including modal's own signals for a running call."""

from __future__ import annotations

import asyncio
import os
import threading
from datetime import UTC, datetime
from pathlib import Path

import modal.exception
import modal.volume
import pytest
from modal._functions import _Invocation
from modal_proto import api_pb2

from serving.engines.deepgemm import CompileFailed
from serving.platforms.modal.calls import (
    CallKey,
    CallRecord,
    CallState,
    CallStore,
    CallStoreError,
    Poll,
    attach_or_spawn,
    probe_call,
)
from serving.weights.models import WeightsError
from tests.modal_fixtures import remote_wait_for_timeout

TOKEN = "hf_test_SECRET_token_value_0987654321"
MISSING_SHA = "f" * 40
COMPILE_TIMEOUT_S = 60


# --------------------------------------------------------------------------------------------
# CallStore
# --------------------------------------------------------------------------------------------


def record(call_id: str, stage: str = "compile", detail: str = "key1") -> CallRecord:
    return CallRecord(
        key=CallKey(stage=stage, model="glm-5.1", revision="a" * 40, detail=detail),  # type: ignore[arg-type]
        call_id=call_id,
        app="glm-5.1-compile",
        function="compile",
        spawned_at=datetime(2026, 11, 1, tzinfo=UTC),
    )


def test_call_store_survives_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "state" / "modal-calls.json"
    CallStore(path).put(record("fc-1"))
    CallStore(path).put(record("fc-2", stage="download", detail=""))

    reopened = CallStore(path)  # a new process after a crash reads the same file
    assert reopened.get(record("x").key) == record("fc-1")
    assert reopened.get(record("x", stage="download", detail="").key) == record(
        "fc-2", stage="download", detail=""
    )
    assert reopened.get(record("x", detail="other-key").key) is None
    reopened.remove(record("x").key)
    assert [r.call_id for r in CallStore(path).records()] == ["fc-2"]


def test_call_store_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "modal-calls.json"
    store = CallStore(path)
    store.put(record("fc-1"))
    before = path.read_text()

    def crash(*args: object) -> None:
        raise OSError("simulated crash before the rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        store.put(record("fc-2", detail="key2"))
    monkeypatch.undo()

    assert path.read_text() == before  # the old file, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "modal-calls.json",
        "modal-calls.json.lock",
    ]
    assert CallStore(path).get(record("x").key) == record("fc-1")


def test_call_store_loses_no_record_to_concurrent_writers(tmp_path: Path) -> None:
    path = tmp_path / "modal-calls.json"
    writers = 16
    barrier = threading.Barrier(writers)

    def write(i: int) -> None:
        barrier.wait()
        CallStore(path).put(record(f"fc-{i}", detail=f"key{i}"))

    threads = [threading.Thread(target=write, args=(i,)) for i in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(r.call_id for r in CallStore(path).records()) == sorted(
        f"fc-{i}" for i in range(writers)
    )


def test_an_unreadable_call_store_stops_rather_than_respawning(tmp_path: Path) -> None:
    path = tmp_path / "modal-calls.json"
    path.write_text("{not json")
    with pytest.raises(CallStoreError, match=r"modal-calls\.json is unreadable"):
        CallStore(path).get(record("x").key)


# --------------------------------------------------------------------------------------------
# attach_or_spawn and probe_call
# --------------------------------------------------------------------------------------------


class FakeCallProbe:
    """Answers a probe with a fixed Poll and remembers which call ids were asked about."""

    def __init__(self, poll: Poll) -> None:
        self.poll = poll
        self.asked: list[str] = []

    def __call__(self, call_id: str) -> Poll:
        self.asked.append(call_id)
        return self.poll


def test_no_record_spawns_without_probing() -> None:
    probe = FakeCallProbe(Poll(CallState.RUNNING))
    decision = attach_or_spawn(None, probe)
    assert decision.action == "spawn" and probe.asked == []


def test_a_running_call_is_attached_to() -> None:
    probe = FakeCallProbe(Poll(CallState.RUNNING))
    decision = attach_or_spawn(record("fc-7"), probe)
    assert (decision.action, decision.call_id) == ("attach", "fc-7")
    assert probe.asked == ["fc-7"]


def test_a_finished_call_gives_its_result() -> None:
    decision = attach_or_spawn(
        record("fc-7"), FakeCallProbe(Poll(CallState.SUCCEEDED, result={"status": "compiled"}))
    )
    assert (decision.action, decision.result) == ("use-result", {"status": "compiled"})


def test_a_finished_call_whose_output_is_gone_is_spawned_anew() -> None:
    finished = FakeCallProbe(Poll(CallState.SUCCEEDED, result={"status": "compiled"}))
    decision = attach_or_spawn(record("fc-7"), finished, stale=lambda result: True)
    assert decision.action == "spawn" and "gone" in decision.reason


def test_a_failed_call_is_spawned_anew() -> None:
    failed = Poll(CallState.FAILED, error=CompileFailed("the compile server process died\ntail"))
    decision = attach_or_spawn(record("fc-7"), FakeCallProbe(failed))
    assert decision.action == "spawn"
    assert decision.reason == "call fc-7 failed: CompileFailed: the compile server process died"


def test_an_expired_call_is_spawned_anew() -> None:
    decision = attach_or_spawn(record("fc-7"), FakeCallProbe(Poll(CallState.EXPIRED)))
    assert decision.action == "spawn" and "expired" in decision.reason


class FakeFunctionCall:
    """A modal.FunctionCall stand-in: get() raises or returns what it was given."""

    def __init__(self, outcome: object) -> None:
        self.outcome = outcome
        self.timeouts: list[float | None] = []

    def get(self, timeout: float | None = None) -> object:
        self.timeouts.append(timeout)
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        return self.outcome


@pytest.mark.parametrize(
    ("outcome", "state"),
    [
        # Modal's own bare TimeoutError (running) is told apart by where it was raised: see
        # test_modal_s_still_running_is_read_from_where_modal_raises_it.
        (modal.exception.OutputExpiredError(), CallState.EXPIRED),
        (modal.exception.FunctionTimeoutError("ran past its timeout"), CallState.FAILED),
        (TimeoutError("timed out"), CallState.FAILED),  # raised BY the remote function
        (WeightsError("repo x/y not found"), CallState.FAILED),
        (modal.exception.RemoteError("boom"), CallState.FAILED),
        ({"status": "compiled"}, CallState.SUCCEEDED),
    ],
)
def test_probe_call_reads_modal_outcomes(outcome: object, state: CallState) -> None:
    call = FakeFunctionCall(outcome)
    poll = probe_call(call)
    assert poll.state is state
    assert call.timeouts == [0]  # a probe never blocks
    if state is CallState.SUCCEEDED:
        assert poll.result == outcome
    if state is CallState.FAILED:
        assert poll.error is outcome


class ModalStillRunning:
    """get() runs modal's own poll_function on an empty answer with one input unfinished:
    the TimeoutError modal 1.6.4 raises while a call runs, from where it raises it."""

    def get(self, timeout: float | None = None) -> object:
        invocation = _Invocation.__new__(_Invocation)

        async def no_output_yet(**_: object) -> api_pb2.FunctionGetOutputsResponse:
            return api_pb2.FunctionGetOutputsResponse(num_unfinished_inputs=1)

        invocation.pop_function_call_outputs = no_output_yet  # type: ignore[method-assign]
        return asyncio.run(invocation.poll_function(timeout=timeout))


def test_modal_s_still_running_is_read_from_where_modal_raises_it() -> None:
    assert probe_call(ModalStillRunning()).state is CallState.RUNNING


def test_a_remote_bare_timeout_error_is_a_failed_call_not_a_running_one() -> None:
    exc = remote_wait_for_timeout()
    assert type(exc) is TimeoutError and not exc.args  # indistinguishable by type and message
    poll = probe_call(FakeFunctionCall(exc))
    assert poll.state is CallState.FAILED and poll.error is exc


@pytest.mark.parametrize(
    "error",
    [
        modal.exception.ServiceError("UNAVAILABLE"),
        modal.exception.InternalError("INTERNAL"),
        modal.exception.ResourceExhaustedError("RESOURCE_EXHAUSTED"),
    ],
)
def test_a_transient_api_error_is_unknown_and_never_spawns_again(error: Exception) -> None:
    poll = probe_call(FakeFunctionCall(error))
    assert poll.state is CallState.UNKNOWN and poll.error is error
    decision = attach_or_spawn(record("fc-7"), FakeCallProbe(poll))
    assert (decision.action, decision.call_id) == ("attach", "fc-7")


def test_the_same_error_raised_by_the_remote_function_is_a_failure() -> None:
    error = modal.exception.InternalError("raised by the body")
    error.__line_cache__ = {}  # type: ignore[attr-defined]  # as modal marks a remote exception
    assert probe_call(FakeFunctionCall(error)).state is CallState.FAILED


def test_probe_call_reraises_local_modal_trouble() -> None:
    # No token here is not "the call failed": that would start a second job.
    with pytest.raises(modal.exception.AuthError):
        probe_call(FakeFunctionCall(modal.exception.AuthError("token missing")))
