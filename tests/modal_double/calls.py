"""The double's call RPCs: a function of a deployed App looked up by name, spawned, and its
output polled. No container runs: each call ends as the test scripts it (Outcome), or as a
stand-in body the test gives for the function answers it (`run`), and the output is serialized
as modal's container runtime serializes it."""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from grpclib import GRPCError, Status
from grpclib.server import Stream
from modal._serialization import deserialize, pickle_exception, pickle_traceback, serialize
from modal_proto import api_pb2

from tests.modal_double.state import App, function_data

# How often a long poll of a running call looks again for a changed outcome.
LONG_POLL_STEP_SECONDS = 0.01
FAILURE = api_pb2.GenericResult.GENERIC_STATUS_FAILURE
SUCCESS = api_pb2.GenericResult.GENERIC_STATUS_SUCCESS


@dataclass(frozen=True)
class Outcome:
    """running: no output yet; returned/raised: the body's result; answered: what `value`, a
    stand-in for the body, returns or raises for the call's arguments; expired: output gone
    after 7 days; api-failing: Modal's API itself answers INTERNAL to every poll of the call."""

    kind: Literal["running", "returned", "raised", "answered", "expired", "api-failing"]
    value: Any = None


RUNNING = Outcome("running")
EXPIRED = Outcome("expired")
API_FAILING = Outcome("api-failing")


def returned(value: Any) -> Outcome:
    return Outcome("returned", value)


def raised(exc: BaseException) -> Outcome:
    return Outcome("raised", exc)


def answered(body: Callable[..., Any]) -> Outcome:
    """`body(*args, **kwargs)` of the call's own arguments, run when the call starts."""
    return Outcome("answered", body)


@dataclass
class Call:
    call_id: str
    function_id: str
    function: tuple[str, str]  # (App name, function tag)
    args: bytes  # the client's serialized (args, kwargs)
    outcome: Outcome = RUNNING
    waits: int = 0  # polls that asked to wait for the output (a long poll)

    @property
    def arguments(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The (args, kwargs) the client sent."""
        return deserialize(self.args, None)


async def _answer(
    body: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Outcome:
    """What the body makes of the call, computed off the double's event loop (a body may take
    a while, or call the API itself): its value, or the exception it raised."""
    try:
        return returned(await asyncio.to_thread(body, *args, **kwargs))
    except Exception as exc:
        return raised(exc)


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

    apps: dict[str, App]
    functions: dict[str, api_pb2.Function]
    calls: dict[str, Call]
    scripts: defaultdict[tuple[str, str], deque[Outcome]]
    bodies: dict[tuple[str, str], Callable[..., Any]]

    deployed: Callable[..., App]
    server_urls: Callable[[str], list[str]]
    _new_id: Callable[[str], str]

    # What a test scripts.

    def script(self, app_name: str, tag: str, *outcomes: Outcome) -> None:
        """How the next calls of an App's function end, in call order (then: running). The
        App may be deployed later, as a flow deploys it right before its first call."""
        self.scripts[(app_name, tag)].extend(outcomes)

    def run(self, app_name: str, tag: str, body: Callable[..., Any]) -> None:
        """Every call of an App's function that no script names is answered by `body`: a
        stand-in for the function's container."""
        self.bodies[(app_name, tag)] = body

    def calls_of(self, app_name: str, tag: str) -> list[Call]:
        """The calls of an App's function (spawned or `.remote()`), in call order."""
        return [call for call in self.calls.values() if call.function == (app_name, tag)]

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
                function_name=definition.function_name, function_type=definition.function_type,
                # A Server's URL (modal.Server.get_url reads it from here).
                **{"_experimental_flash_urls": self.server_urls(function_id)},
            ),
        ))  # fmt: skip

    async def FunctionMap(self, stream: Stream) -> None:
        request = await stream.recv_message()
        if request.function_id not in self.functions:
            raise GRPCError(Status.NOT_FOUND, f"no function {request.function_id!r}")
        if len(request.pipelined_inputs) != 1:
            raise GRPCError(Status.UNIMPLEMENTED, "the Modal double maps one input per call")
        function = self._tag_of(request.function_id)
        script = self.scripts[function]
        if script:
            outcome = script.popleft()
        else:
            outcome = answered(self.bodies[function]) if function in self.bodies else RUNNING
        call_id = self._new_id("fc")
        call = Call(call_id, request.function_id, function, request.pipelined_inputs[0].input.args)
        if outcome.kind == "answered":
            outcome = await _answer(outcome.value, *call.arguments)
        call.outcome = outcome
        self.calls[call_id] = call
        await stream.send_message(api_pb2.FunctionMapResponse(
            function_call_id=call_id,
            pipelined_inputs=[api_pb2.FunctionPutInputsResponseItem(
                idx=0, input_id=self._new_id("in")
            )],
        ))  # fmt: skip

    def _tag_of(self, function_id: str) -> tuple[str, str]:
        for app in self.apps.values():
            for tag, candidate in app.function_ids.items():
                if candidate == function_id:
                    return app.name, tag
        raise GRPCError(Status.NOT_FOUND, f"no App has function {function_id!r}")

    async def FunctionGetOutputs(self, stream: Stream) -> None:
        request = await stream.recv_message()
        call = self.calls.get(request.function_call_id)
        if call is None:
            raise GRPCError(Status.NOT_FOUND, f"no function call {request.function_call_id!r}")
        # A long poll: wait up to the request's timeout for the call to end.
        if request.timeout > 0:
            call.waits += 1
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
