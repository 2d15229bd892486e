"""The gates' window, written once for both platforms: every router replica's published
measurements merged (serving.router.replicas), in the shape of GET /admin/stats.

N replicas sit behind one load balancer (Modal's; locally, N processes accepting on one
socket), so no one replica can be asked for the window. Each publishes a head every second, and
its changed chunks, to the platform's StatsStore; a window ending now waits until every replica
still publishing has published after its end, so no request that ended in it is missing. A
drain counts the requests in flight on all of them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

from pydantic import ValidationError

from serving.control.router_client import RouterClient
from serving.control.routes import Outcome
from serving.router.measurements import DEFAULT_RETENTION_S
from serving.router.replicas import (
    STALE_AFTER_SECONDS,
    Chunk,
    Head,
    Snapshot,
    merge,
    merge_shadow,
)
from serving.router.slices import Traffic

logger = logging.getLogger(__name__)

POLL_SECONDS = 0.2
# A head this old answers no window the router can still be asked about: forgotten.
FORGET_AFTER_SECONDS = DEFAULT_RETENTION_S + STALE_AFTER_SECONDS


class StatsStore(Protocol):
    """Where a platform's router replicas publish (serving.router.slices): per replica, a head
    and the chunks it names."""

    def heads(self) -> dict[str, bytes]:
        """Each replica's head (serving.router.replicas.Head JSON), by replica."""
        ...

    def chunk(self, replica: str, chunk: int) -> bytes | None:
        """A chunk of a replica (serving.router.replicas.Chunk JSON); None when it is gone."""
        ...

    def forget(self, replica: str, chunks: list[int]) -> None: ...


class Replicas:
    """A model's router replicas, as the orchestrator sees them: through the admin API of
    whichever answers, and through what all of them publish.

    A router that publishes nothing at all (one deployed before replicas published, which is
    never redeployed under a running canary) is asked alone, as before."""

    def __init__(self, router: RouterClient, store: StatsStore, *,
                 clock: Callable[[], float] = time.time,
                 sleep: Callable[[float], None] = time.sleep) -> None:  # fmt: skip
        self.router = router
        self._store = store
        self._clock = clock
        self._sleep = sleep

    def window(self, model: str, since: float, *, pinned: bool = False) -> dict[str, Any]:
        """The model's stats over [since, now] of every replica: per-backend counts, errors and
        percentiles, in-flight counts and `measured_since` (of the header-pinned requests instead
        when `pinned`), and each canary's shadow comparisons. The weights are the answering
        replica's (every replica reads the same routes)."""
        until = self._clock()
        heads = self._fresh(until)
        if heads is None:
            return self.router.stats(model, since, pinned=pinned)
        snapshots = [self._snapshot(head, since, until) for head in heads]
        traffic = Traffic.PINNED if pinned else Traffic.WEIGHTED
        merged = merge(snapshots, model, since, until, traffic)
        # Only the weights from a replica: its own window is in the merge already.
        weights = self.router.weights(model)
        backends = {name: {**stats.model_dump(), "weight": weights.get(name)}
                    for name, stats in merged.backends.items()}  # fmt: skip
        shadow = {name: copies.model_dump()
                  for name, copies in merge_shadow(snapshots, model, since, until).items()}
        return {"model": model, "since": since, "until": until, "backends": backends,
                "weights": weights, "shadow": shadow, "measured_since": merged.measured_since,
                "replicas": len(heads)}  # fmt: skip

    def in_flight(self, model: str, backend: str) -> int:
        """The requests in flight to `backend` on every replica, as each published after the
        question: what a drain counts, since any replica may hold some."""
        asked = self._clock()
        heads = self._fresh(asked)
        if heads is None:
            return self.router.in_flight(model, backend)
        snapshots = [Snapshot(head=head, chunks=[]) for head in heads]
        stats = merge(snapshots, model, asked, asked).backends.get(backend)
        return 0 if stats is None else stats.in_flight

    def unrouted(self, outcome: Outcome) -> Outcome:
        """How taking a release out of routing went on every replica: a push reaches only the
        one that answered it; the others apply it when they next read the store."""
        now = self._clock()
        live = [head for head in _read(self._store, now)
                if not head.final and head.published_at >= now - STALE_AFTER_SECONDS]  # fmt: skip
        return outcome if len(live) <= 1 else Outcome.PENDING

    def _fresh(self, until: float) -> list[Head] | None:
        """The heads once every replica still publishing has published past `until` (or was
        silent for STALE_AFTER_SECONDS: then it is gone, and the merge says what that cost).
        None when no replica publishes."""
        while True:
            heads = _read(self._store, self._clock())
            if not heads:
                return None
            # One silent for longer than that already is gone: nothing to wait for.
            late = [head for head in heads if head.stopped_unannounced(until)
                    and head.published_at >= until - STALE_AFTER_SECONDS]  # fmt: skip
            if not late or self._clock() > until + STALE_AFTER_SECONDS:
                return heads
            self._sleep(POLL_SECONDS)

    def _snapshot(self, head: Head, since: float, until: float) -> Snapshot:
        """The head with the chunks the window needs. A chunk gone meanwhile (the replica
        dropped it as too old, a reader forgot the replica) holds nothing of the window."""
        chunks = []
        for index in head.chunks_between(since, until):
            raw = self._store.chunk(head.replica, index)
            if raw is not None:
                chunks.append(Chunk.model_validate_json(raw))
        return Snapshot(head=head, chunks=chunks)


def _read(store: StatsStore, now: float) -> list[Head]:
    heads = []
    for replica, raw in store.heads().items():
        try:
            head = Head.model_validate_json(raw)
        except ValidationError:
            logger.warning("router replica %s published an unreadable head", replica)
            continue
        if head.published_at < now - FORGET_AFTER_SECONDS:
            store.forget(replica, head.chunks)
        else:
            heads.append(head)
    return heads
