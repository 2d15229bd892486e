"""Spawned calls on Modal: which one computes what, and whether to attach to it or spawn anew.

Long jobs are SPAWNED on the deployed Apps, and each call id is written to a small durable
CallStore ($ROLLOUT_HOME/state/modal-calls.json) before the orchestrator waits on it. A spawned
call outlives the orchestrator, so a retried or restarted flow re-attaches to it instead of
paying for a second 8-GPU job:

    no record                      -> spawn
    record, call still running     -> attach (wait for it)
    record, call finished ok       -> use its result
    record, call failed            -> spawn anew
    record, output expired (7 d)   -> spawn anew

The decision is the pure function `attach_or_spawn`; `probe_call` turns one look at a
modal.FunctionCall into a Poll.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal, Protocol

import modal.exception
from pydantic import BaseModel, Field, ValidationError

from serving.core.errors import one_line
from serving.core.files import locked, write_atomically

CALL_STORE_FORMAT = 1

Stage = Literal["download", "download-shard", "compile"]


class CallStoreError(RuntimeError):
    """The call store cannot be read; starting calls blindly could duplicate GPU jobs."""


class ModalCallError(RuntimeError):
    """A spawned call failed or its output is gone; one line, the remote error chained."""


# --------------------------------------------------------------------------------------------
# The durable call store
# --------------------------------------------------------------------------------------------


class CallKey(BaseModel, frozen=True):
    """What a call computes. A compile is keyed by its cache key too: a changed flag or image
    must not attach to a compile of other kernels."""

    stage: Stage
    model: str
    revision: str
    detail: str = Field("", description="the compile cache key, or a shard's name")
    environment: str = Field("", description="the Modal environment; call ids live in one")

    @property
    def id(self) -> str:
        return "/".join(
            (self.stage, self.environment or "-", self.model, self.revision, self.detail or "-")
        )


class CallRecord(BaseModel):
    key: CallKey
    call_id: str
    app: str
    function: str
    spawned_at: datetime


class _CallStoreFile(BaseModel):
    format: int = CALL_STORE_FORMAT
    calls: dict[str, CallRecord] = Field(default_factory=dict)


class CallStore:
    """Call ids of spawned jobs in one JSON file: replaced atomically (a crash leaves the old or
    the new file, never half of one), read-modify-write under an exclusive lock (two
    orchestrators on one machine do not lose each other's records)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock_path = self.path.with_name(self.path.name + ".lock")

    def get(self, key: CallKey) -> CallRecord | None:
        return self._read().calls.get(key.id)

    def records(self) -> list[CallRecord]:
        return list(self._read().calls.values())

    def put(self, record: CallRecord) -> None:
        with locked(self._lock_path):
            data = self._read()
            data.calls[record.key.id] = record
            self._write(data)

    def remove(self, key: CallKey) -> None:
        with locked(self._lock_path):
            data = self._read()
            if data.calls.pop(key.id, None) is not None:
                self._write(data)

    def _read(self) -> _CallStoreFile:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return _CallStoreFile()
        try:
            data = _CallStoreFile.model_validate_json(text)
        except ValidationError:
            raise CallStoreError(
                f"{self.path} is unreadable; move it away to start afresh (calls still running "
                "on Modal would then be started a second time)"
            ) from None
        if data.format != CALL_STORE_FORMAT:
            raise CallStoreError(f"{self.path}: unknown format {data.format}")
        return data

    def _write(self, data: _CallStoreFile) -> None:
        write_atomically(self.path, data.model_dump_json(indent=1))


# --------------------------------------------------------------------------------------------
# Attach or spawn: the decision, pure
# --------------------------------------------------------------------------------------------


class CallState(StrEnum):
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    EXPIRED = "expired"
    # Modal's API did not answer this time (UNAVAILABLE, INTERNAL, RESOURCE_EXHAUSTED...): the
    # call may be running, finished or failed. Poll again later; never spawn on it.
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class Poll:
    """What one look at a call found. `error` is the remote exception of a failed call."""

    state: CallState
    result: Any = None
    error: BaseException | None = None


Probe = Callable[[str], Poll]
# Whether a finished call's result no longer holds: what it made is gone from the volume since.
Stale = Callable[[Any], bool]


@dataclass(frozen=True)
class Decision:
    action: Literal["spawn", "attach", "use-result"]
    reason: str
    call_id: str | None = None
    result: Any = None


def attach_or_spawn(
    record: CallRecord | None, probe: Probe, stale: Stale | None = None
) -> Decision:
    """Whether to start a call, wait for the recorded one, or take its finished result (unless
    `stale` says it no longer holds)."""
    if record is None:
        return Decision("spawn", "no call on record")
    poll = probe(record.call_id)
    if poll.state is CallState.RUNNING:
        return Decision("attach", f"call {record.call_id} is still running", record.call_id)
    if poll.state is CallState.SUCCEEDED and stale is not None and stale(poll.result):
        return Decision("spawn", f"call {record.call_id} finished, but what it made is gone")
    if poll.state is CallState.SUCCEEDED:
        return Decision(
            "use-result", f"call {record.call_id} finished", record.call_id, poll.result
        )
    if poll.state is CallState.EXPIRED:
        return Decision("spawn", f"the output of call {record.call_id} has expired")
    if poll.state is CallState.UNKNOWN:
        return Decision("attach", f"call {record.call_id} could not be read "
                        f"({one_line(poll.error)}): waiting on it", record.call_id)  # fmt: skip
    return Decision("spawn", f"call {record.call_id} failed: {one_line(poll.error)}")


class _Gettable(Protocol):
    def get(self, timeout: float | None = None) -> Any: ...


# Trouble on the orchestrator's side of Modal: re-raised, never read as "the call failed" (which
# would start a second job).
LOCAL_MODAL_ERRORS: tuple[type[BaseException], ...] = (
    modal.exception.AuthError,
    modal.exception.ConnectionError,
    modal.exception.ClientClosed,
    modal.exception.VersionError,
)


# Modal's API failing to answer, as the SDK raises it after its own retries: says nothing
# about the call.
TRANSIENT_MODAL_ERRORS: tuple[type[BaseException], ...] = (
    modal.exception.ServiceError,
    modal.exception.InternalError,
    modal.exception.ResourceExhaustedError,
)
# Where modal 1.6.4 raises its bare TimeoutError for "no output yet" (_Invocation.poll_function).
STILL_RUNNING_RAISED_IN = ("modal/_functions.py", "poll_function")


def probe_call(call: _Gettable, timeout: float = 0) -> Poll:
    """One look at a modal.FunctionCall: `get(timeout)` raises the built-in TimeoutError while
    the call runs, OutputExpiredError once its output is gone (7 days), and the remote
    exception (or FunctionTimeoutError) if it failed."""
    try:
        result = call.get(timeout=timeout)
    except modal.exception.OutputExpiredError:
        return Poll(CallState.EXPIRED)
    except modal.exception.NotFoundError:
        return Poll(CallState.EXPIRED)  # an unknown call id: nothing to wait for
    except TimeoutError as exc:
        # The same type means two things: Modal's "still running", and a remote function that
        # raised TimeoutError itself (asyncio.wait_for does, bare), which has finished, failed.
        if _raised_by_modal_poll(exc):
            return Poll(CallState.RUNNING)
        return Poll(CallState.FAILED, error=exc)
    except LOCAL_MODAL_ERRORS:
        raise
    except TRANSIENT_MODAL_ERRORS as exc:
        if _is_remote(exc):
            return Poll(CallState.FAILED, error=exc)  # the function itself raised it
        return Poll(CallState.UNKNOWN, error=exc)
    except (Exception, modal.exception.InputCancellation) as exc:
        return Poll(CallState.FAILED, error=exc)
    return Poll(CallState.SUCCEEDED, result=result)


def _is_remote(exc: BaseException) -> bool:
    # modal attaches the remote traceback's source lines to an exception the function raised.
    return hasattr(exc, "__line_cache__")


def _raised_by_modal_poll(exc: TimeoutError) -> bool:
    if type(exc) is not TimeoutError or exc.args or _is_remote(exc):
        return False
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None:
        return False
    path, function = STILL_RUNNING_RAISED_IN
    code = tb.tb_frame.f_code
    return code.co_filename.replace("\\", "/").endswith(path) and code.co_name == function
