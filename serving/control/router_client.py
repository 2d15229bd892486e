"""The router's admin API as the control plane uses it, one client for both platforms.

Every call carries the admin token as Bearer: GET/PUT /admin/routes (the whole table, refused
with 409 when older than the router's), GET /admin/stats, POST /admin/ask/<backend>. Where the
router runs (a local process, a Modal App) and where the token comes from (a file of the home,
the orchestrator's environment) is the platform's business: it hands over a URL and a token
source.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel, ConfigDict, ValidationError

from serving.core.errors import one_line
from serving.router.table import RoutingTable

# Two CPU engines under load can starve a local router for seconds; an admin call waits it out.
ADMIN_TIMEOUT_SECONDS = 20.0
# Enough of a refusal's body to say why, not enough to flood a log line.
REFUSAL_CHARS = 200
# The analysis's reads (`_retried`: the stats, or a merged window's weights) take a router
# milliseconds; a miss is a starved host or a router coming back, worth a few more tries
# before a bake window is left unjudged.
ANALYSIS_READ_ATTEMPTS = 3
ANALYSIS_READ_RETRY_SECONDS = 5.0

logger = logging.getLogger(__name__)

# The admin token, read when a call is made; raises RouterUnreachable when there is none.
TokenSource = Callable[[], str]
Answer = TypeVar("Answer")


class RouterAdminError(RuntimeError):
    """The router's admin API cannot be used: no token here, no answer, or a refusal."""


class RouterUnreachable(RouterAdminError):
    """No admin token here, or no answer at all: the router may still run and read its store."""


class RouteEntry(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str
    weight: int


class RoutesView(BaseModel):
    """GET /admin/routes (and a successful PUT's answer): the table the router serves now."""

    model_config = ConfigDict(extra="ignore")

    generation: int
    models: dict[str, list[RouteEntry]]

    def weights(self, model: str) -> dict[str, int]:
        return {entry.name: entry.weight for entry in self.models.get(model, [])}


@dataclass(frozen=True)
class PushAnswer:
    """The router's generation after a push, and its weights when it took the table (None
    when it refused it as stale: it holds a newer one)."""

    generation: int
    routes: RoutesView | None


class RouterClient:
    def __init__(self, url: str, token: TokenSource, http: httpx.Client | None = None,
                 sleep: Callable[[float], None] = time.sleep) -> None:  # fmt: skip
        self.url = url.rstrip("/")
        self._token = token
        # None: the process's pooled client (see `pooled_http`).
        self._http = http or pooled_http(os.getpid())
        self._sleep = sleep

    def routes(self) -> RoutesView:
        return self._view(self._checked("GET", "/admin/routes"))

    def push(self, table: RoutingTable) -> PushAnswer:
        """PUT /admin/routes with the whole table. The table is serialised as the stores hold
        it: backends name the environment variable of their key, never a key."""
        response = self._request(
            "PUT", "/admin/routes", content=table.model_dump_json(exclude_none=True),
            headers={"Content-Type": "application/json"},
        )  # fmt: skip
        if response.status_code == httpx.codes.CONFLICT:
            return PushAnswer(generation=self._stale_generation(response), routes=None)
        view = self._view(_ok(response, "PUT /admin/routes"))
        return PushAnswer(generation=view.generation, routes=view)

    def stats(self, model: str, since: float, until: float | None = None, *,
              pinned: bool = False) -> dict[str, Any]:  # fmt: skip
        """Per-backend measurements of the model over [since, until] (until: now), with the
        in-flight counts and weights of this moment; of the header-pinned requests when
        `pinned`. Asked up to ANALYSIS_READ_ATTEMPTS times (`_retried`)."""
        params: dict[str, Any] = {"model": model, "since": since}
        if until is not None:
            params["until"] = until
        if pinned:
            params["traffic"] = "pinned"
        return self._retried(model, "stats", lambda: self._stats(params))

    def weights(self, model: str) -> dict[str, int]:
        """The model's weights in the table the router serves now, asked as `stats` is."""
        return self._retried(model, "routes", lambda: self.routes().weights(model))

    def ask(self, backend: str, chat: dict[str, Any], timeout: float) -> dict[str, Any]:
        """One chat completion from one named backend, sent by the router with that backend's
        key: not measured, not retried elsewhere."""
        response = self._checked("POST", f"/admin/ask/{backend}", json=chat, timeout=timeout)
        return dict(response.json())

    def in_flight(self, model: str, backend: str) -> int:
        # since=now: an empty window; in-flight counts are kept outside any window. Asked once:
        # a drain polls it anyway.
        stats = self._stats({"model": model, "since": time.time()})
        return int(stats.get("backends", {}).get(backend, {}).get("in_flight", 0))

    def _retried(self, model: str, what: str, ask: Callable[[], Answer]) -> Answer:
        """Up to ANALYSIS_READ_ATTEMPTS tries, ANALYSIS_READ_RETRY_SECONDS apart; then the last
        RouterAdminError (RouterUnreachable when nothing answered) is raised."""
        for attempt in range(1, ANALYSIS_READ_ATTEMPTS):
            try:
                return ask()
            except RouterAdminError as exc:
                logger.warning("%s: router %s, attempt %d of %d: %s", model, what, attempt,
                               ANALYSIS_READ_ATTEMPTS, one_line(exc))  # fmt: skip
                self._sleep(ANALYSIS_READ_RETRY_SECONDS)
        return ask()

    def _stats(self, params: dict[str, Any]) -> dict[str, Any]:
        return dict(self._checked("GET", "/admin/stats", params=params).json())

    def _checked(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return _ok(self._request(method, path, **kwargs), f"{method} {path}")

    def _request(
        self,
        method: str,
        path: str,
        *,
        timeout: float = ADMIN_TIMEOUT_SECONDS,
        headers: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> httpx.Response:
        headers = {**(headers or {}), "Authorization": f"Bearer {self._token()}"}
        try:
            return self._http.request(method, self.url + path, headers=headers,
                                      timeout=timeout, **kwargs)  # fmt: skip
        except httpx.TransportError as exc:
            raise RouterUnreachable(
                f"router at {self.url} does not answer: {type(exc).__name__}"
            ) from exc

    def _stale_generation(self, response: httpx.Response) -> int:
        """The generation a 409 names: the router's, newer than the pushed table's."""
        try:
            generation = response.json().get("generation")
        except (ValueError, AttributeError):
            generation = None
        if not isinstance(generation, int):
            raise RouterAdminError(f"router at {self.url}: a 409 without its generation")
        return generation

    def _view(self, response: httpx.Response) -> RoutesView:
        try:
            return RoutesView.model_validate_json(response.content)
        except ValidationError:
            raise RouterAdminError(
                f"router at {self.url}: not a routing table: {response.text[:REFUSAL_CHARS]}"
            ) from None


@cache
def pooled_http(pid: int) -> httpx.Client:
    """One client per process for every admin call, whichever RouterClient makes it: a new
    client costs 35-70 ms of CPU (its TLS context), and a rollback makes several calls while
    the canary still takes traffic; the pool also keeps the router's connection open between
    calls. Keyed by pid: a forked child must not share its parent's sockets. It never reads
    proxies from the environment: a proxy must never see the admin token."""
    return httpx.Client(trust_env=False)


def _ok(response: httpx.Response, what: str) -> httpx.Response:
    if response.status_code != httpx.codes.OK:
        raise RouterAdminError(
            f"router refused {what}: HTTP {response.status_code}: "
            f"{response.text[:REFUSAL_CHARS]}"
        )
    return response
