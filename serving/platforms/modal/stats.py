"""Where Modal router containers publish their measurements: the model's routes Dict, a head
under `stats:<replica>` and a key per chunk, `stats:<replica>:<chunk>` (serving.router.slices).
The router body publishes with `dict_publish`; the orchestrator reads with DictStatsStore
(serving.control.measured). A Dict write of one key is atomic: nobody reads half of one."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from serving.platforms.modal.resources import STATS_KEY_PREFIX, KeyValue

if TYPE_CHECKING:  # a release container imports this module and needs no router
    from serving.router.slices import Published


def _head_key(replica: str) -> str:
    return f"{STATS_KEY_PREFIX}{replica}"


def _chunk_key(replica: str, chunk: int) -> str:
    return f"{STATS_KEY_PREFIX}{replica}:{chunk}"


def dict_publish(routes: KeyValue) -> Callable[[Published], None]:
    """The router's stats_publish: the changed chunks, then the head that names them."""

    def publish(published: Published) -> None:
        for chunk, data in published.chunks.items():
            routes.put(_chunk_key(published.replica, chunk), data)
        for chunk in published.gone:
            routes.pop(_chunk_key(published.replica, chunk))
        routes.put(_head_key(published.replica), published.head)

    return publish


class DictStatsStore:
    def __init__(self, routes: KeyValue) -> None:
        self.routes = routes

    def heads(self) -> dict[str, bytes]:
        heads: dict[str, bytes] = {}
        for key in list(self.routes.keys()):
            replica = key.removeprefix(STATS_KEY_PREFIX) if isinstance(key, str) else ""
            if key != replica and ":" not in replica:
                head = self.routes.get(key)
                if head is not None:  # forgotten by another reader meanwhile
                    heads[replica] = head
        return heads

    def chunk(self, replica: str, chunk: int) -> bytes | None:
        data: bytes | None = self.routes.get(_chunk_key(replica, chunk))
        return data

    def forget(self, replica: str, chunks: list[int]) -> None:
        self.routes.pop(_head_key(replica))
        for chunk in chunks:
            self.routes.pop(_chunk_key(replica, chunk))
