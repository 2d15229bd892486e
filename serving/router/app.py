"""Weighted canary router in front of the SGLang releases of one or more models.

The router is a raw ASGI app (measured faster than starlette on the proxy hot path) that
splits OpenAI-compatible traffic between backends (releases) by integer weight, routing on
the ``model`` field of the JSON body (``balancing``); forwards, retries and relays through
``proxy``; measures every attempt and exports Prometheus ``/metrics``; copies a share of chat
requests to a shadow canary and compares its answers (``shadow``); and serves an admin API
(``admin``). It can poll an external routing source (a Modal Dict, a JSON state file) and
publish its measurements for the merge of N replicas' (``publishing``) through plain
callables -- this package imports neither prefect nor modal.

This module holds the routing state: the installed table (a table of an older generation than
the one here is ignored, from a poll or a push), the poll loop, the lifespan, and the dispatch
of each request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError

from serving.router.admin import AdminApi
from serving.router.asgi import (
    ClientGone,
    Receive,
    Scope,
    Send,
    bearer,
    bearer_matches,
    read_body,
    send_error,
    send_json,
    send_unavailable,
)
from serving.router.balancing import ModelRoute, Target, build_routes, resolve_model
from serving.router.config import RouterConfig
from serving.router.measurements import Measurements
from serving.router.pinning import Pinning, Refusal
from serving.router.proxy import Forwarder, open_client
from serving.router.publishing import Publisher
from serving.router.shadow import Shadower
from serving.router.table import Backend, RoutingTable, _check_unique
from serving.router.upstream import UpstreamClient

logger = logging.getLogger("rollout.router")


class RouterApp:
    """Raw ASGI application. One instance per router process (or per test)."""

    def __init__(self, config: RouterConfig) -> None:
        self.config = config
        self.measurements = Measurements(retention_s=config.retention_s)
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(self.measurements.collector())
        self._table = RoutingTable()
        self._routes: dict[str, ModelRoute] = {}
        self._table_version = 0
        self._table_updated_at = time.time()
        self._table_source = "empty"
        self._last_polled: RoutingTable | None = None
        self._forwarder: Forwarder | None = None
        admin_token = config.admin_token.get_secret_value() if config.admin_token else None
        self._pinning = Pinning(admin_token, config.retention_s, self.measurements.slices)
        self._pinned_forwarder: Forwarder | None = None
        self._poller: asyncio.Task[None] | None = None
        tokens = [t.get_secret_value() for t in (config.admin_token, config.client_api_key) if t]
        self._shadow = Shadower(self.upstream, tokens, config.retention_s, config.total_timeout_s,
                                self.measurements.slices)  # fmt: skip
        self._publisher = None if config.stats_publish is None else Publisher(
            config.stats_publish, self.measurements, config.publish_interval_s,
            also=[self._pinning.measurements, self._shadow])  # fmt: skip
        self._admin = AdminApi(self, self.measurements, self._shadow, bearer(admin_token),
                               config.retention_s, self._pinning.measurements)  # fmt: skip
        self._client_auth = bearer(config.client_api_key.get_secret_value()) \
            if config.client_api_key else None

    # -- routing table --------------------------------------------------------------------

    @property
    def table(self) -> RoutingTable:
        return self._table

    @property
    def routes(self) -> Mapping[str, ModelRoute]:
        return self._routes

    def install(self, table: RoutingTable, source: str) -> bool:
        """Swap the routing table. New requests see it at once; in-flight ones keep theirs.
        A table of an older generation than the one installed is ignored (False)."""
        if table.generation < self._table.generation:
            logger.info("ignored a routing table of generation %d from %s: have %d",
                        table.generation, source, self._table.generation)  # fmt: skip
            return False
        self._routes = build_routes(table)
        self._shadow.install(table, self._routes)
        self._table = table
        self._table_version += 1
        self._table_updated_at = time.time()
        self._table_source = source
        summary = {m: {b.name: b.weight for b in bs} for m, bs in table.models.items()}
        logger.info("routing table v%d from %s: %s", self._table_version, source, summary)
        return True

    def set_model_backends(self, model: str, backends: list[Backend]) -> None:
        _check_unique(model, backends)
        previous = {b.name: b for b in self._table.models.get(model, [])}
        merged = [_keep_previous_key(b, previous.get(b.name)) for b in backends]
        models = dict(self._table.models)
        models[model] = merged
        # An operator's edit of one model: applied at the current generation, so the next
        # change the control plane writes supersedes it.
        self.install(RoutingTable(models=models, generation=self._table.generation),
                     source="admin")  # fmt: skip

    def replace_table(self, table: RoutingTable) -> bool:
        """The control plane's push: the whole table, unless it is older than the one here."""
        for model, backends in table.models.items():
            previous = {b.name: b for b in self._table.models.get(model, [])}
            table.models[model] = [_keep_previous_key(b, previous.get(b.name)) for b in backends]
        return self.install(table, source="admin")

    def remove_model(self, model: str) -> bool:
        if model not in self._table.models:
            return False
        models = {m: bs for m, bs in self._table.models.items() if m != model}
        self.install(RoutingTable(models=models, generation=self._table.generation),
                     source="admin")  # fmt: skip
        return True

    def routes_view(self) -> dict[str, Any]:
        return {
            **self._table.public(),
            "version": self._table_version,
            "updated_at": self._table_updated_at,
            "source": self._table_source,
        }

    def _alternative(self, model: str, failed: str) -> Target | None:
        route = self._routes.get(model)
        return route.pick(exclude=failed) if route else None

    # -- lifecycle ------------------------------------------------------------------------

    async def startup(self) -> None:
        if self._forwarder is None:
            self._forwarder = Forwarder(open_client(self.config), self.measurements,
                                        self.config.total_timeout_s, self._alternative)
            self._pinned_forwarder = Forwarder(self._forwarder.client, self._pinning.measurements,
                                               self.config.total_timeout_s, Pinning.reroute)
        if self.config.routing_poll is not None and self._poller is None:
            await self._poll_once()
            self._poller = asyncio.create_task(self._poll_forever())
        if self._publisher is not None:
            self._publisher.start()

    async def shutdown(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
            self._poller = None
        if self._publisher is not None:
            await self._publisher.stop()
        await self._shadow.aclose()
        if self._forwarder is not None:
            await self._forwarder.client.aclose()
            self._forwarder = self._pinned_forwarder = None

    async def upstream(self) -> UpstreamClient:
        """The backends' client, started here when the server ran no lifespan."""
        if self._forwarder is None:
            await self.startup()
        assert self._forwarder is not None
        return self._forwarder.client

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self.config.poll_interval_s)
            await self._poll_once()

    async def _poll_once(self) -> None:
        poll = self.config.routing_poll
        assert poll is not None
        try:
            table = await asyncio.to_thread(poll)
        except Exception as exc:  # a broken source must not take the router down
            logger.warning("routing poll failed: %s", _safe_error(exc))
            return
        # Only apply changes of the source, so an admin PUT survives until the source moves.
        if table is not None and table != self._last_polled:
            self._last_polled = table
            self.install(table, source="poll")

    # -- ASGI entry -----------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await self.startup()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        try:
            if path == "/health":
                await send_json(send, 200, {"status": "ok", "models": sorted(self._routes)})
            elif path == "/metrics":
                await self._metrics(send)
            elif path.startswith("/admin/") or path == "/admin":
                await self._admin(scope, receive, send)
            elif path == "/v1/models":
                if self._client_authorized(scope):
                    await self._list_models(send)
                else:
                    await send_error(send, 401, "invalid API key", "unauthorized")
            elif self._client_authorized(scope):
                await self._proxy(scope, receive, send)
            else:
                await send_error(send, 401, "invalid API key", "unauthorized")
        except ClientGone:
            return

    def _client_authorized(self, scope: Scope) -> bool:
        return self._client_auth is None or bearer_matches(scope, self._client_auth)

    async def _metrics(self, send: Send) -> None:
        body = generate_latest(self.registry)
        await send({
            "type": "http.response.start", "status": 200,
            "headers": [(b"content-type", CONTENT_TYPE_LATEST.encode()),
                        (b"content-length", str(len(body)).encode())],
        })
        await send({"type": "http.response.body", "body": body})

    async def _list_models(self, send: Send) -> None:
        data = [{"id": m, "object": "model", "owned_by": "rollout"} for m in sorted(self._routes)]
        await send_json(send, 200, {"object": "list", "data": data})

    async def _proxy(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = await read_body(receive)
        routes = self._routes
        model = resolve_model(routes, scope["path"], body)
        if model is None:
            await send_error(send, 404, "model not found on this router", "model_not_found")
            return
        if self._forwarder is None:  # served without lifespan support
            await self.startup()
        pinned = Pinning.requested(scope)
        if pinned is not None:
            choice = self._pinning.choose(scope, pinned, routes[model])
            if isinstance(choice, Refusal):
                await send_error(send, choice.status, choice.message, choice.code)
                return
            assert self._pinned_forwarder is not None
            await self._pinned_forwarder.forward(model, choice, scope, body, receive, send)
            return
        target = routes[model].pick()
        if target is None:
            await send_unavailable(send, "no backend with weight > 0")
            return
        assert self._forwarder is not None
        tap = self._shadow.tap(model, scope, target, body)
        try:
            await self._forwarder.forward(model, target, scope, body, receive, send, tap)
        finally:
            if tap is not None:
                self._shadow.settle(tap)


def _keep_previous_key(new: Backend, old: Backend | None) -> Backend:
    """GET /admin/routes never returns keys, so a PUT without one keeps the known key."""
    if old is None or new.api_key is not None or new.api_key_env or old.url != new.url:
        return new
    return new.model_copy(update={"api_key": old.api_key, "api_key_env": old.api_key_env})


def _safe_error(exc: BaseException) -> str:
    if isinstance(exc, ValidationError):
        # never echo input values: a routing table may carry api keys
        fields = [".".join(map(str, e["loc"])) for e in exc.errors(include_input=False)]
        return f"invalid routing table ({exc.error_count()} errors at {fields})"
    return type(exc).__name__
