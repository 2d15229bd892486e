"""The gates' window, written once for both platforms: every router replica's published
measurements merged (serving.router.replicas), in the shape of GET /admin/stats.

N replicas sit behind one load balancer (Modal's; locally, N processes accepting on one
socket), so no one replica can be asked for the window. Each publishes a snapshot every second
to the platform's StatsStore; a window ending now waits until every replica still publishing
has published after its end, so no request that ended in it is missing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

from pydantic import ValidationError

from serving.control.router_client import RouterAdminError, RouterClient
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


def window_stats(
    router: RouterClient, store: StatsStore, model: str, since: float, *,
    clock: Callable[[], float] = time.time, sleep: Callable[[float], None] = time.sleep,
) -> dict[str, Any]:  # fmt: skip
    """The model's stats over [since, now]: per-backend counts, errors and percentiles (and
    `measured_since`) of every replica; weights and shadow comparisons from the replica that
    answers the admin API (shadow comparisons are of that replica's copies only)."""
    until = clock()
    snapshots = _fresh_snapshots(store, until, clock, sleep)
    if not snapshots:
        # No replica publishes: an empty window would read as "no traffic".
        raise RouterAdminError("no router replica published its measurements")
    merged = merge(snapshots, model, since, until)
    view = router.stats(model, since, until)
    weights: dict[str, int] = view.get("weights", {})
    backends = {name: {**stats.model_dump(), "weight": weights.get(name)}
                for name, stats in merged.backends.items()}  # fmt: skip
    return {**view, "since": since, "until": until, "measured_since": merged.measured_since,
            "backends": backends, "replicas": len(snapshots)}  # fmt: skip


def _fresh_snapshots(
    store: StatsStore, until: float, clock: Callable[[], float],
    sleep: Callable[[float], None],
) -> list[Snapshot]:  # fmt: skip
    """The snapshots once every replica still publishing has published past `until` (or was
    silent for STALE_AFTER_SECONDS: then it is gone, and the merge says what that cost)."""
    while True:
        snapshots = _read(store, clock())
        # One silent for longer than that already is gone: nothing to wait for.
        late = [s for s in snapshots if s.stopped_unannounced(until)
                and s.published_at >= until - STALE_AFTER_SECONDS]
        if not late or clock() > until + STALE_AFTER_SECONDS:
            return snapshots
        sleep(POLL_SECONDS)


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
