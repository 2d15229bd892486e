"""A router replica publishes its measurements (weighted and pinned requests, shadow copies)
every second, and once more as it stops, through the platform's `stats_publish` (files of the
replica locally, keys of the model's Dict on Modal): the orchestrator merges every replica's
(serving.router.replicas)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import uuid
from collections.abc import Callable, Sequence

from serving.router.measurements import InFlight, Measurements
from serving.router.slices import Published

logger = logging.getLogger("rollout.router")

Publish = Callable[[Published], None]


def new_replica_id() -> str:
    """Unique per router process, even when a restarted one reuses its predecessor's pid."""
    return f"{os.getpid()}-{uuid.uuid4().hex[:12]}"


class Publisher:
    def __init__(self, publish: Publish, measurements: Measurements, interval_s: float,
                 also: Sequence[InFlight] = ()) -> None:  # fmt: skip
        """`measurements` of weighted traffic; `also`, the others sharing its slices."""
        self.replica = new_replica_id()
        self._publish = publish
        self._measurements = measurements
        self._also = also
        self._interval_s = interval_s
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._forever())

    async def stop(self) -> None:
        """The final snapshot: every request of this replica has ended (uvicorn closed its
        connections before the lifespan's shutdown), so nothing of it is missing."""
        if self._task is None:
            return
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None
        await self._once(final=True)

    async def _forever(self) -> None:
        while True:
            await self._once(final=False)
            await asyncio.sleep(self._interval_s)

    async def _once(self, *, final: bool) -> None:
        # Taken on the event loop (the measurements have no locks), encoded and written in a
        # thread.
        publication = self._measurements.publication(self.replica, final=final, also=self._also)
        try:
            await asyncio.to_thread(lambda: self._publish(publication.encode()))
        except Exception as exc:  # a full disk or a Dict hiccup must not take the router down
            self._measurements.unpublished(publication)
            logger.warning("publishing measurements failed: %s", type(exc).__name__)
