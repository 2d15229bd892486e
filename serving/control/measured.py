"""The gates' window, written once for both platforms: every router replica's published
measurements merged (serving.router.replicas), in the shape of GET /admin/stats.

N replicas sit behind one load balancer (Modal's; locally, N processes accepting on one
socket), so no one replica can be asked for the window. Each publishes a snapshot every second
to the platform's StatsStore; a window ending now waits until every replica still publishing
has published after its end, so no request that ended in it is missing. A drain counts the
requests in flight on all of them.
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
from serving.router.replicas import STALE_AFTER_SECONDS, Snapshot, merge

logger = logging.getLogger(__name__)

POLL_SECONDS = 0.2
# A snapshot this old answers no window the router can still be asked about: forgotten.
FORGET_AFTER_SECONDS = DEFAULT_RETENTION_S + STALE_AFTER_SECONDS


class StatsStore(Protocol):
    """Where a platform's router replicas publish their snapshots, one per replica."""

    def published(self) -> dict[str, bytes]:
        """Each replica's latest snapshot (serving.router.replicas.Snapshot JSON), by id."""
        ...

    def forget(self, replica: str) -> None: ...


class Replicas:
    """A model's router replicas, as the orchestrator sees them: through the admin API of
    whichever answers, and through the snapshots all of them publish.

    A router that publishes nothing at all (one deployed before replicas published, which is
    never redeployed under a running canary) is asked alone, as before."""

    def __init__(self, router: RouterClient, store: StatsStore, *,
                 clock: Callable[[], float] = time.time,
                 sleep: Callable[[float], None] = time.sleep) -> None:  # fmt: skip
        self.router = router
        self._store = store
        self._clock = clock
        self._sleep = sleep

    def window(self, model: str, since: float) -> dict[str, Any]:
        """The model's stats over [since, now]: per-backend counts, errors and percentiles,
        in-flight counts and `measured_since` of every replica; weights and shadow comparisons
        from the replica that answers (shadow comparisons of its own copies only)."""
        until = self._clock()
        snapshots = self._fresh(until)
        if snapshots is None:
            return self.router.stats(model, since)
        merged = merge(snapshots, model, since, until)
        view = self.router.stats(model, since, until)
        weights: dict[str, int] = view.get("weights", {})
        backends = {name: {**stats.model_dump(), "weight": weights.get(name)}
                    for name, stats in merged.backends.items()}  # fmt: skip
        return {**view, "since": since, "until": until, "backends": backends,
                "measured_since": merged.measured_since, "replicas": len(snapshots)}  # fmt: skip

    def in_flight(self, model: str, backend: str) -> int:
        """The requests in flight to `backend` on every replica, as each published after the
        question: what a drain counts, since any replica may hold some."""
        asked = self._clock()
        snapshots = self._fresh(asked)
        if snapshots is None:
            return self.router.in_flight(model, backend)
        stats = merge(snapshots, model, asked, asked).backends.get(backend)
        return 0 if stats is None else stats.in_flight

    def unrouted(self, outcome: Outcome) -> Outcome:
        """How taking a release out of routing went on every replica: a push reaches only the
        one that answered it; the others apply it when they next read the store."""
        now = self._clock()
        live = [s for s in _read(self._store, now)
                if not s.final and s.published_at >= now - STALE_AFTER_SECONDS]  # fmt: skip
        return outcome if len(live) <= 1 else Outcome.PENDING

    def _fresh(self, until: float) -> list[Snapshot] | None:
        """The snapshots once every replica still publishing has published past `until` (or
        was silent for STALE_AFTER_SECONDS: then it is gone, and the merge says what that
        cost). None when no replica publishes."""
        while True:
            snapshots = _read(self._store, self._clock())
            if not snapshots:
                return None
            # One silent for longer than that already is gone: nothing to wait for.
            late = [s for s in snapshots if s.stopped_unannounced(until)
                    and s.published_at >= until - STALE_AFTER_SECONDS]  # fmt: skip
            if not late or self._clock() > until + STALE_AFTER_SECONDS:
                return snapshots
            self._sleep(POLL_SECONDS)


def _read(store: StatsStore, now: float) -> list[Snapshot]:
    snapshots = []
    for replica, raw in store.published().items():
        try:
            snapshot = Snapshot.model_validate_json(raw)
        except ValidationError:
            logger.warning("router replica %s published an unreadable snapshot", replica)
            continue
        if snapshot.published_at < now - FORGET_AFTER_SECONDS:
            store.forget(replica)
        else:
            snapshots.append(snapshot)
    return snapshots
