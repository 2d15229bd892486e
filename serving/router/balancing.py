"""Which backend serves a request: the model it names, then a weighted pick among releases.

Routes are immutable snapshots built once per routing table and swapped atomically, so the
hot path reads no pydantic model and takes no lock.
"""

from __future__ import annotations

import bisect
import json
import random
from collections.abc import Mapping
from dataclasses import dataclass

from serving.router.asgi import bearer
from serving.router.table import Backend, RoutingTable

CHAT_PATH = "/v1/chat/completions"
# On these paths a router with one model serves it, whatever model the request names.
MODEL_ROUTED_PATHS = frozenset({CHAT_PATH, "/v1/completions"})
BACKEND_HEADER = b"x-rollout-backend"


@dataclass(frozen=True, slots=True)
class Target:
    name: str
    url: str
    weight: int
    auth: bytes | None  # resolved "Bearer <key>" header value
    backend_header: tuple[bytes, bytes]  # (x-rollout-backend, name), built once


@dataclass(frozen=True, slots=True)
class ModelRoute:
    targets: tuple[Target, ...]
    cumulative: tuple[int, ...]  # running sum of weights, for bisect

    @classmethod
    def build(cls, backends: list[Backend]) -> ModelRoute:
        targets = tuple(
            Target(b.name, b.url, b.weight, bearer(b.resolved_api_key()),
                   (BACKEND_HEADER, b.name.encode()))
            for b in backends
        )
        running, cumulative = 0, []
        for t in targets:
            running += t.weight
            cumulative.append(running)
        return cls(targets, tuple(cumulative))

    def pick(self, exclude: str | None = None) -> Target | None:
        """Weighted random choice among weight > 0 targets, optionally excluding one."""
        if exclude is None:
            total = self.cumulative[-1] if self.cumulative else 0
            if total <= 0:
                return None
            return self.targets[bisect.bisect_right(self.cumulative, random.randrange(total))]
        candidates = [t for t in self.targets if t.weight > 0 and t.name != exclude]
        if not candidates:
            return None
        return random.choices(candidates, weights=[t.weight for t in candidates])[0]


def build_routes(table: RoutingTable) -> dict[str, ModelRoute]:
    return {m: ModelRoute.build(bs) for m, bs in table.models.items()}


def resolve_model(routes: Mapping[str, ModelRoute], path: str, body: bytes) -> str | None:
    """The routed model a request is for: the one its body names, else the only one."""
    requested = _model_field(body) if body[:1] in (b"{", b" ", b"\n") else None
    if requested is not None and requested in routes:
        return requested
    if len(routes) == 1 and (requested is None or path in MODEL_ROUTED_PATHS):
        return next(iter(routes))
    return None


def _model_field(body: bytes) -> str | None:
    try:
        payload = json.loads(body)
    except ValueError:
        return None
    model = payload.get("model") if isinstance(payload, dict) else None
    return model if isinstance(model, str) else None
