"""The Modal StatsStore (serving.control.measured): one key per router replica in the model's
routes Dict, `stats:<replica>`, which that replica's container replaces every second
(server_bodies.dict_publish). A Dict key is written whole, so a reader never sees half of one."""

from __future__ import annotations

from serving.platforms.modal.resources import STATS_KEY_PREFIX, KeyValue


class DictStatsStore:
    def __init__(self, routes: KeyValue) -> None:
        self.routes = routes

    def published(self) -> dict[str, bytes]:
        snapshots: dict[str, bytes] = {}
        for key in list(self.routes.keys()):
            if isinstance(key, str) and key.startswith(STATS_KEY_PREFIX):
                snapshot = self.routes.get(key)
                if snapshot is not None:  # forgotten by another reader meanwhile
                    snapshots[key.removeprefix(STATS_KEY_PREFIX)] = snapshot
        return snapshots

    def forget(self, replica: str) -> None:
        self.routes.pop(f"{STATS_KEY_PREFIX}{replica}")
