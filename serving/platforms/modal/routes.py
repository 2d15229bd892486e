"""The Modal route store: the model's routes Dict, key ROUTES_KEY, which the router polls."""

from __future__ import annotations

import threading

from serving.control.routes import TableChange, rewrite
from serving.platforms.modal.resources import ROUTES_KEY, KeyValue
from serving.router.table import RoutingTable

# modal.Dict has no lock and no compare-and-set of a value, so a read-modify-write of the table
# is safe only with one writer per model. That writer is the model's orchestrator: rollouts of
# one model never overlap (deployment concurrency limit 1), and its threads (each task builds
# a platform of its own) take this lock. A second writer elsewhere could lose an update (both
# writing the same next generation); the router would still never go back to an older table.
_WRITER = threading.Lock()


class DictRouteStore:
    """A RoutingTable as JSON under ROUTES_KEY of the model's routes Dict. A Dict write of one
    key is atomic; the router's read every second keeps the entry from expiring."""

    def __init__(self, routes: KeyValue) -> None:
        self.routes = routes

    def table(self) -> RoutingTable:
        raw = self.routes.get(ROUTES_KEY)
        return RoutingTable() if raw is None else RoutingTable.model_validate_json(raw)

    def update(self, change: TableChange) -> RoutingTable:
        with _WRITER:
            return rewrite(self.table, self._write, change)

    def _write(self, table: RoutingTable) -> None:
        # Backends name the environment variable of their key: the Dict holds no secret.
        self.routes.put(ROUTES_KEY, table.model_dump_json(exclude_none=True))
