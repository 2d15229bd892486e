"""The double's call RPCs: a function of a deployed App looked up by name, spawned, and its
output polled. No container runs: each call ends as the test scripts it (Outcome), and the
output is serialized as modal's container runtime serializes it."""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from grpclib import GRPCError, Status
from grpclib.server import Stream
from modal._serialization import pickle_exception, pickle_traceback, serialize
from modal_proto import api_pb2

from tests.modal_double.state import App, function_data

# How often a long poll of a running call looks again for a changed outcome.
LONG_POLL_STEP_SECONDS = 0.01
FAILURE = api_pb2.GenericResult.GENERIC_STATUS_FAILURE
SUCCESS = api_pb2.GenericResult.GENERIC_STATUS_SUCCESS


@dataclass(frozen=True)
class Outcome:
    """running: no output yet; returned/raised: the body's result; expired: output gone after
    7 days; api-failing: Modal's API itself answers INTERNAL to every poll of the call."""

    kind: Literal["running", "returned", "raised", "expired", "api-failing"]
    value: Any = None


RUNNING = Outcome("running")
EXPIRED = Outcome("expired")
API_FAILING = Outcome("api-failing")


def returned(value: Any) -> Outcome:
    return Outcome("returned", value)


def raised(exc: BaseException) -> Outcome:
    return Outcome("raised", exc)


@dataclass
class Call:
    function_id: str
    args: bytes  # the client's serialized (args, kwargs)
    outcome: Outcome = RUNNING


def _output(outcome: Outcome) -> api_pb2.FunctionGetOutputsItem:
    if outcome.kind == "returned":
        result = api_pb2.GenericResult(status=SUCCESS, data=serialize(outcome.value))
    else:
        exc = outcome.value
        try:  # raised here, so it carries a traceback as in a container
            raise exc
        except BaseException as caught:
            serialized_tb, line_cache = pickle_traceback(caught, "ta-double")
            result = api_pb2.GenericResult(
                status=FAILURE, exception=repr(caught), data=pickle_exception(caught),
                serialized_tb=serialized_tb, tb_line_cache=line_cache,
            )  # fmt: skip
    return api_pb2.FunctionGetOutputsItem(result=result, data_format=api_pb2.DATA_FORMAT_PICKLE)


class CallRpcs:
    """Mixed into the servicer, whose state it shares."""

    functions: dict[str, api_pb2.Function]
    calls: dict[str, Call]
    scripts: defaultdict[str, deque[Outcome]]

    deployed: Callable[..., App]
    _new_id: Callable[[str], str]

    # What a test scripts.

    def script(self, app_name: str, tag: str, *outcomes: Outcome) -> None:
        """How the next calls of a deployed function end, in spawn order (then: running)."""
        self.scripts[self.deployed(app_name).function_ids[tag]].extend(outcomes)

    def settle(self, call_id: str, outcome: Outcome) -> None:
        """A running call ends (or its output expires, or the API starts failing)."""
        self.calls[call_id].outcome = outcome

    # RPCs.

    async def FunctionGet(self, stream: Stream) -> None:
        request = await stream.recv_message()
        try:
            function_id = self.deployed(request.app_name, request.environment_name).function_ids[
                request.object_tag
            ]
        except KeyError:
            raise GRPCError(
                Status.NOT_FOUND,
                f"Function {request.app_name}.{request.object_tag} not found",
            ) from None
        definition = self.functions[function_id]
        await stream.send_message(api_pb2.FunctionGetResponse(
            function_id=function_id,
            function=function_data(definition),
            handle_metadata=api_pb2.FunctionHandleMetadata(
                function_name=definition.function_name, function_type=definition.function_type
            ),
        ))  # fmt: skip

    async def FunctionMap(self, stream: Stream) -> None:
        request = await stream.recv_message()
        if request.function_id not in self.functions:
            raise GRPCError(Status.NOT_FOUND, f"no function {request.function_id!r}")
        if len(request.pipelined_inputs) != 1:
            raise GRPCError(Status.UNIMPLEMENTED, "the Modal double maps one input per call")
        script = self.scripts[request.function_id]
        outcome = script.popleft() if script else RUNNING
        call_id = self._new_id("fc")
        self.calls[call_id] = Call(
            request.function_id, request.pipelined_inputs[0].input.args, outcome
        )
        await stream.send_message(api_pb2.FunctionMapResponse(
            function_call_id=call_id,
            pipelined_inputs=[api_pb2.FunctionPutInputsResponseItem(
                idx=0, input_id=self._new_id("in")
            )],
        ))  # fmt: skip

    async def FunctionGetOutputs(self, stream: Stream) -> None:
        request = await stream.recv_message()
        call = self.calls.get(request.function_call_id)
        if call is None:
            raise GRPCError(Status.NOT_FOUND, f"no function call {request.function_call_id!r}")
        # A long poll: wait up to the request's timeout for the call to end.
        deadline = time.monotonic() + request.timeout
        while call.outcome is RUNNING and time.monotonic() < deadline:
            await asyncio.sleep(LONG_POLL_STEP_SECONDS)
        kind = call.outcome.kind
        if kind == "api-failing":
            raise GRPCError(Status.INTERNAL, "the Modal double's API is failing (scripted)")
        response = api_pb2.FunctionGetOutputsResponse(
            num_unfinished_inputs=1 if kind == "running" else 0
        )
        if kind in ("returned", "raised"):
            response.outputs.append(_output(call.outcome))
        await stream.send_message(response)
