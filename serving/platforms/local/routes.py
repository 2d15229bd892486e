"""The local route store: `$ROLLOUT_HOME/state/routes.json`, which the local router polls."""

from __future__ import annotations

from pathlib import Path

from serving.control.routes import TableChange, rewrite
from serving.core.files import locked, write_atomically
from serving.router.table import RoutingTable


class FileRouteStore:
    """A RoutingTable in one JSON file, replaced atomically (the router never reads half of
    it), each read-modify-write under an exclusive lock: writers in any process of the home
    never lose each other's change."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = path.with_name(f".{path.stem}.lock")

    def table(self) -> RoutingTable:
        try:
            return RoutingTable.model_validate_json(self.path.read_bytes())
        except FileNotFoundError:
            return RoutingTable()

    def update(self, change: TableChange) -> RoutingTable:
        with locked(self._lock):
            return rewrite(self.table, self._write, change)

    def _write(self, table: RoutingTable) -> None:
        # Backends carry api_key_env names only, never keys: the file holds no secret.
        write_atomically(self.path, table.model_dump_json(exclude_none=True))
