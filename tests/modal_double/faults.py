"""Fault injection for the double: every RPC handler is wrapped once, so a test can make the
next calls of any RPC answer with a gRPC status of its choosing, and read how often each RPC
was reached (a transient fault on FunctionMap must not start a second call)."""

from __future__ import annotations

from collections import Counter, defaultdict, deque
from collections.abc import Callable, Coroutine
from typing import Any

import grpclib.const
from grpclib import GRPCError, Status
from grpclib.server import Stream
from modal_proto import api_grpc

Handler = Callable[[Stream], Coroutine[Any, Any, None]]

RPC_NAMES = frozenset(api_grpc.ModalClientBase.__abstractmethods__)
SERVICE_PREFIX = "/modal.client.ModalClient/"


class Faults:
    """Mixed into the servicer: the statuses queued per RPC are answered, in order, before the
    real handler runs (the request is read, nothing of it happens), then the RPC works again.
    The modal client retries some statuses of some RPCs by itself (modal._utils.grpc_utils,
    RETRYABLE_GRPC_STATUS_CODES): a test that means to get past those retries queues more."""

    def __init__(self) -> None:
        super().__init__()
        self.requests: Counter[str] = Counter()  # RPC name -> times reached, faults included
        self.faults: defaultdict[str, deque[Status]] = defaultdict(deque)

    def fail_next(self, rpc: str, status: Status, times: int = 1) -> None:
        """The next `times` calls of `rpc` answer `status`."""
        if rpc not in RPC_NAMES:
            raise ValueError(f"the ModalClient service has no RPC {rpc!r}")
        self.faults[rpc].extend([status] * times)

    def pending_faults(self) -> dict[str, list[Status]]:
        """Faults queued and not yet answered, by RPC."""
        return {rpc: list(queue) for rpc, queue in self.faults.items() if queue}

    def __mapping__(self) -> dict[str, grpclib.const.Handler]:
        mapping: dict[str, grpclib.const.Handler] = super().__mapping__()  # type: ignore[misc]
        wrapped = {}
        for path, handler in mapping.items():
            rpc = path.removeprefix(SERVICE_PREFIX)
            wrapped[path] = handler._replace(func=self._faulty(rpc, handler.func))
        return wrapped

    def _faulty(self, rpc: str, handler: Handler) -> Handler:
        async def answer(stream: Stream) -> None:
            self.requests[rpc] += 1
            queue = self.faults[rpc]
            if not queue:
                await handler(stream)
                return
            status = queue.popleft()
            await stream.recv_message()
            raise GRPCError(status, f"{rpc}: {status.name} injected by the Modal double")

        return answer
