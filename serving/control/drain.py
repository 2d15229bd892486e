"""The drain before a release stops: wait until the router counts no request in flight to it,
or the deadline. One loop for both platforms; the clock and the sleep are the caller's, so a
test can run it on a fake clock. The count is a RouterClient's (one router) or every replica's
(serving.control.measured.Replicas)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Protocol

from serving.control.router_client import RouterAdminError
from serving.control.routes import PROPAGATION_SECONDS, Outcome

logger = logging.getLogger(__name__)


class InFlight(Protocol):
    def in_flight(self, model: str, backend: str) -> int: ...


def drain(
    router: InFlight,
    model: str,
    backend: str,
    deadline: float,
    *,
    unrouted: Outcome,
    poll_seconds: float,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> bool:
    """True once the router counts nothing in flight to `backend`; False at the deadline
    (`deadline` on `clock`). `unrouted` is how taking the backend out of routing went: while it
    is pending, the router may still send the backend new requests until it reads its store,
    so a zero counts only after that. A count that cannot be read is not a zero: the loop
    waits out the whole deadline rather than cut requests off."""
    if unrouted is Outcome.PENDING:
        sleep(max(0.0, min(PROPAGATION_SECONDS, deadline - clock())))
    while True:
        count = _in_flight(router, model, backend)
        if count == 0:
            return True
        remaining = deadline - clock()
        if remaining <= 0:
            if count:
                logger.warning("%s: %d requests still in flight at the drain deadline",
                               backend, count)  # fmt: skip
            return False
        sleep(min(poll_seconds, remaining))


def _in_flight(router: InFlight, model: str, backend: str) -> int | None:
    try:
        return router.in_flight(model, backend)
    except (RouterAdminError, ValueError) as exc:  # ValueError: an answer that is not JSON
        logger.warning("%s: in-flight requests unknown: %s", backend, exc)
        return None
