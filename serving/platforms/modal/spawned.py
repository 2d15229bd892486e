"""Spawned calls, started at most once and waited on.

`start` attaches to the call on record, takes its finished result, or spawns one and records it
at once (serving.platforms.modal.calls decides which). `finish` long-polls one call; `finish_all`
polls several in turn. While Modal's API does not answer (CallState.UNKNOWN) the call goes on
regardless: `start` and `finish` back off and ask again until it does, so a transient fault
changes nothing but the time taken (never a second call, never a stage failed for it).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from serving.core.errors import one_line
from serving.platforms.modal.calls import (
    CallKey,
    CallRecord,
    CallState,
    CallStore,
    ModalCallError,
    Poll,
    Stale,
    attach_or_spawn,
)
from serving.platforms.modal.gateway import Gateway

log = logging.getLogger(__name__)

# A long-poll on one call: the server answers as soon as the call finishes, so this only
# bounds how often a "still waiting" line is logged.
WAIT_POLL_SECONDS = 60.0
# Modal's API unreachable while waiting on a call: ask again after 5 s, 10 s, ... up to 2 min.
UNKNOWN_BACKOFF_FIRST_SECONDS = 5.0
UNKNOWN_BACKOFF_MAX_SECONDS = 120.0
# Several calls (shards) are polled in turn, each without waiting, then the loop sleeps.
SHARDS_POLL_INTERVAL = 10.0


@dataclass(frozen=True)
class Started:
    """A call to wait on (`call_id`), or the result of one that had already finished."""

    key: CallKey
    call_id: str | None
    result: Any = None


class SpawnedCalls:
    """The spawned calls of one CallStore, through one Gateway."""

    def __init__(
        self, store: CallStore, gateway: Gateway, *, sleep: Callable[[float], None] = time.sleep
    ) -> None:
        self.store = store
        self.gateway = gateway
        self._sleep = sleep

    def start(self, key: CallKey, deploy: Callable[[], str], function: str, *args: Any,
              stale: Stale | None = None) -> Started:  # fmt: skip
        """Attach to the recorded call, take its result (unless `stale`), or spawn one and
        record it. `deploy` deploys the App if needed and names it; it runs only when a call
        is spawned."""
        what = f"{key.stage} {key.model}@{key.revision[:8]}"

        def probe(call_id: str) -> Poll:
            return self._answered(call_id, 0, what)

        decision = attach_or_spawn(self.store.get(key), probe, stale)
        log.info("%s: %s", what, decision.reason)
        if decision.action == "attach":
            return Started(key, decision.call_id)
        if decision.action == "use-result":
            return Started(key, None, decision.result)
        app_name = deploy()
        # A failed spawn raises: Modal may have started the call without answering, and only
        # a call on record can be attached to.
        call_id = self.gateway.spawn(app_name, function, *args)
        # Recorded at once: from here a restarted orchestrator re-attaches. (A crash between
        # the spawn and this write is the one window in which a retry starts a second call.)
        self.store.put(CallRecord(key=key, call_id=call_id, app=app_name, function=function,
                                  spawned_at=datetime.now(UTC)))  # fmt: skip
        log.info("%s: spawned call %s", what, call_id)
        return Started(key, call_id)

    def finish(self, started: Started, what: str) -> Any:
        """Wait for one call (long-polling) and return its result."""
        if started.call_id is None:
            return started.result
        began = time.monotonic()
        while True:
            poll = self._answered(started.call_id, WAIT_POLL_SECONDS, what)
            if poll.state is not CallState.RUNNING:
                return self._outcome(started, poll, what)
            log.info("%s: waiting for call %s (%.0f min)", what, started.call_id,
                     (time.monotonic() - began) / 60)  # fmt: skip

    def _answered(self, call_id: str, timeout: float, what: str) -> Poll:
        """A poll of the call that Modal's API answered: while it does not, back off and ask
        again (a failed or expired call read through a fault would be started again too late,
        or not at all)."""
        unanswered = 0
        while True:
            poll = self.gateway.poll(call_id, timeout)
            if poll.state is not CallState.UNKNOWN:
                return poll
            unanswered += 1
            delay = min(UNKNOWN_BACKOFF_FIRST_SECONDS * 2 ** (unanswered - 1),
                        UNKNOWN_BACKOFF_MAX_SECONDS)  # fmt: skip
            log.warning("%s: call %s could not be read (%s); asking again in %.0f s", what,
                        call_id, one_line(poll.error), delay)  # fmt: skip
            self._sleep(delay)

    def finish_all(
        self, started: Sequence[tuple[Started, int]], report: Callable[[int], None]
    ) -> list[Any]:
        """Wait for several calls of a size each (the shards), reporting the size done as each
        one finishes. The first failure is raised at once; the other calls run on and are
        re-attached on retry."""
        results: dict[int, Any] = {}
        done_bytes = 0
        for index, (item, size) in enumerate(started):
            if item.call_id is None:
                results[index] = item.result
                done_bytes += size
        report(done_bytes)
        while len(results) < len(started):
            progressed = False
            for index, (item, size) in enumerate(started):
                if index in results:
                    continue
                assert item.call_id is not None
                poll = self.gateway.poll(item.call_id, 0)
                if poll.state in (CallState.RUNNING, CallState.UNKNOWN):
                    continue  # unknown: the next round asks again, after the interval
                results[index] = self._outcome(item, poll, f"download shard {item.key.detail}")
                done_bytes += size
                progressed = True
            if progressed:
                report(done_bytes)
            elif len(results) < len(started):
                self._sleep(SHARDS_POLL_INTERVAL)
        return [results[index] for index in range(len(started))]

    def _outcome(self, started: Started, poll: Poll, what: str) -> Any:
        if poll.state is CallState.SUCCEEDED:
            return poll.result
        if poll.state is CallState.EXPIRED:
            raise ModalCallError(f"{what}: the output of call {started.call_id} has expired")
        # The record stays: the next attempt probes it, sees the failure and spawns anew.
        raise ModalCallError(
            f"{what}: call {started.call_id} failed: {one_line(poll.error)}"
        ) from poll.error
