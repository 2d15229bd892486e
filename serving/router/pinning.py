"""Header-pinned requests: an operator sends one request to one named release, whatever its
weight, e.g. to try a dark canary (weight 0) with curl or an OpenAI client.

A request is pinned by ``X-Rollout-Release: <release id>`` and must also carry the router's
admin token in ``X-Rollout-Admin-Token``. A separate header, not the bearer: the bearer
already carries the client API key that the data path checks, and an OpenAI client sets it
from ``api_key`` while ``extra_headers`` adds these two. Both headers are dropped before the
request reaches the backend.

A pinned request is never retried on another release (the operator asked for this one), and
it is measured on its own ``Measurements``: it never enters the window a canary's gate reads.
Its slices are published with the weighted ones, apart, so that pinned requests sent through
any router replica are all counted.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from serving.router.asgi import Scope
from serving.router.balancing import ModelRoute, Target
from serving.router.measurements import Measurements
from serving.router.slices import Slices, Traffic

RELEASE_HEADER = b"x-rollout-release"
ADMIN_TOKEN_HEADER = b"x-rollout-admin-token"
PINNING_HEADERS = frozenset({RELEASE_HEADER, ADMIN_TOKEN_HEADER})


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a pinned request is not forwarded, as the client is told."""

    status: int
    message: str
    code: str


class Pinning:
    """Decides pinned requests; the router forwards them with ``reroute`` and measures them
    in ``measurements``, apart from weighted traffic."""

    def __init__(self, admin_token: str | None, retention_s: float, slices: Slices) -> None:
        self._token = admin_token.encode() if admin_token else None
        self.measurements = Measurements(retention_s=retention_s, slices=slices,
                                         traffic=Traffic.PINNED)  # fmt: skip

    @staticmethod
    def requested(scope: Scope) -> str | None:
        """The release a request is pinned to, if any."""
        for key, value in scope["headers"]:
            if key == RELEASE_HEADER:
                return value.decode("latin-1").strip()
        return None

    def choose(self, scope: Scope, release: str, route: ModelRoute) -> Target | Refusal:
        """The pinned release's target, or why not. The token is checked first, so a caller
        without it learns nothing about which releases exist."""
        if self._token is None:
            return Refusal(403, "pinned requests need the router's admin API, which is off",
                           "forbidden")  # fmt: skip
        supplied = next((v for k, v in scope["headers"] if k == ADMIN_TOKEN_HEADER), b"")
        # constant-time compare: the token must not leak through timing
        if not hmac.compare_digest(supplied, self._token):
            return Refusal(403, "a pinned request needs the admin token in "
                                "X-Rollout-Admin-Token", "forbidden")  # fmt: skip
        target = next((t for t in route.targets if t.name == release), None)
        if target is None:
            return Refusal(404, "no such release for this model", "release_not_found")
        return target

    @staticmethod
    def reroute(model: str, failed: str) -> Target | None:
        """Where a failed pinned request is retried: nowhere, the operator asked for this
        release."""
        return None
