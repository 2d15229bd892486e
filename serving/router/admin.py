"""The router's admin API, behind a Bearer admin token (disabled without one).

    GET    /admin/routes            the routing table (no keys), its version and source
    PUT    /admin/routes            the control plane's whole table; 409 if its generation is older
    PUT    /admin/routes/<model>    an operator's backends for one model
    DELETE /admin/routes/<model>    stop routing a model
    GET    /admin/stats             per-backend measurements (?since ?until ?window ?model),
                                    and each shadow canary's comparisons (`shadow`);
                                    ?traffic=pinned: the header-pinned requests instead
    GET    /admin/health            every backend's /health
    POST   /admin/ask/<backend>     one chat completion from one named backend (golden prompts)
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping
from typing import Any, Protocol
from urllib.parse import parse_qs

from pydantic import TypeAdapter, ValidationError

from serving.router.asgi import (
    JSON_CT,
    Receive,
    Scope,
    Send,
    bearer_matches,
    read_body,
    send_error,
    send_json,
)
from serving.router.balancing import CHAT_PATH, ModelRoute, Target, resolve_model
from serving.router.measurements import Measurements
from serving.router.shadow import Shadower
from serving.router.table import Backend, RoutingTable
from serving.router.upstream import UpstreamClient, UpstreamError

HEALTH_PROBE_TIMEOUT_S = 3.0
ASK_PREFIX = "/admin/ask/"
ROUTES_PREFIX = "/admin/routes/"

_BACKEND_LIST = TypeAdapter(list[Backend])


class Routing(Protocol):
    """What the admin API reads and changes on the router (RouterApp)."""

    @property
    def table(self) -> RoutingTable: ...

    @property
    def routes(self) -> Mapping[str, ModelRoute]: ...

    def routes_view(self) -> dict[str, Any]: ...

    def replace_table(self, table: RoutingTable) -> bool: ...

    def set_model_backends(self, model: str, backends: list[Backend]) -> None: ...

    def remove_model(self, model: str) -> bool: ...

    async def upstream(self) -> UpstreamClient: ...


class AdminApi:
    """Raw ASGI handler of every /admin path."""

    def __init__(self, router: Routing, measurements: Measurements, shadow: Shadower,
                 auth: bytes | None, retention_s: float, pinned: Measurements) -> None:
        self._router = router
        self._measurements = measurements
        self._shadow = shadow
        self._pinned = pinned
        self._auth = auth
        self._retention_s = retention_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._auth is None:
            await send_error(send, 404, "admin API disabled", "not_found")
            return
        if not bearer_matches(scope, self._auth):
            await send_error(send, 401, "invalid admin token", "unauthorized")
            return
        method, path = scope["method"], scope["path"]
        query = parse_qs(scope.get("query_string", b"").decode())
        if path == "/admin/routes" and method == "GET":
            await send_json(send, 200, self._router.routes_view())
        elif path == "/admin/routes" and method == "PUT":
            await self._put_table(receive, send)
        elif path.startswith(ROUTES_PREFIX) and method in ("PUT", "DELETE"):
            await self._put_route(path.removeprefix(ROUTES_PREFIX), method, receive, send)
        elif path == "/admin/stats" and method == "GET":
            await self._stats(query, send)
        elif path == "/admin/health" and method == "GET":
            await send_json(send, 200, await self._probe_backends())
        elif path.startswith(ASK_PREFIX) and method == "POST":
            await self._ask(path.removeprefix(ASK_PREFIX), receive, send)
        else:
            await send_error(send, 404, "unknown admin endpoint", "not_found")

    async def _put_table(self, receive: Receive, send: Send) -> None:
        try:
            table = RoutingTable.model_validate_json(await read_body(receive))
        except ValidationError as exc:
            # include_input=False: the rejected input may hold an api_key
            details = exc.errors(include_input=False, include_url=False, include_context=False)
            await send_json(send, 422, {"error": {"message": "invalid routing table",
                                                  "details": details}})
            return
        if not self._router.replace_table(table):
            await send_json(send, 409, {"error": {"message": "stale routing table",
                                                  "code": "stale_generation"},
                                        "generation": self._router.table.generation})
            return
        await send_json(send, 200, self._router.routes_view())

    async def _put_route(self, model: str, method: str, receive: Receive, send: Send) -> None:
        if not model:
            await send_error(send, 400, "model name missing", "invalid_request")
            return
        if method == "DELETE":
            removed = self._router.remove_model(model)
            await send_json(send, 200 if removed else 404, {"removed": removed})
            return
        body = await read_body(receive)
        try:
            payload = json.loads(body)
            if isinstance(payload, dict) and "backends" in payload:
                payload = payload["backends"]
            backends = _BACKEND_LIST.validate_python(payload)
            if not backends:
                raise ValueError("at least one backend is required (DELETE removes a model)")
            self._router.set_model_backends(model, backends)
        except ValidationError as exc:
            # include_input=False: the rejected input may hold an api_key
            details = exc.errors(include_input=False, include_url=False, include_context=False)
            await send_json(send, 422, {"error": {"message": "invalid backends",
                                                  "details": details}})
            return
        except ValueError as exc:  # json errors and our own checks carry no secrets
            await send_error(send, 422, str(exc), "invalid_request")
            return
        await send_json(send, 200, self._router.routes_view())

    async def _stats(self, query: dict[str, list[str]], send: Send) -> None:
        now = time.time()
        try:
            if "since" in query:
                since = float(query["since"][0])
            else:
                window = float(query.get("window", [self._retention_s])[0])
                since = now - window
            # a closed window (one canary step) ends at `until`; an open one ends now
            until = float(query["until"][0]) if "until" in query else now
        except ValueError:
            await send_error(send, 422, "since/window/until must be numbers", "invalid_request")
            return
        traffic = query.get("traffic", ["weighted"])[0]
        if traffic not in ("weighted", "pinned"):
            await send_error(send, 422, "traffic must be weighted or pinned", "invalid_request")
            return
        measurements = self._pinned if traffic == "pinned" else self._measurements
        models = query.get("model") or sorted(
            set(self._router.routes) | set(measurements.models()))
        out = {m: self._model_stats(measurements, m, since, until) for m in models}
        if "model" in query:
            await send_json(send, 200, out[models[0]])
        else:
            await send_json(send, 200, {"since": since, "until": until, "models": out})

    def _model_stats(self, measurements: Measurements, model: str, since: float,
                     until: float) -> dict[str, Any]:
        stats = measurements.stats(model, since, until).model_dump()
        weights = {b.name: b.weight for b in self._router.table.models.get(model, [])}
        for name, backend in stats["backends"].items():
            backend["weight"] = weights.get(name)  # None: no longer in the table
        stats["weights"] = weights
        stats["shadow"] = {name: summary.model_dump()
                           for name, summary in self._shadow.stats(model, since, until).items()}
        return stats

    async def _probe_backends(self) -> dict[str, Any]:
        client = await self._router.upstream()
        routes = self._router.routes
        jobs = [(m, t) for m, r in routes.items() for t in r.targets]
        results = await asyncio.gather(*(_probe(client, t) for _, t in jobs))
        out: dict[str, list[dict[str, Any]]] = {m: [] for m in routes}
        for (model, _), result in zip(jobs, results, strict=True):
            out[model].append(result)
        serving_ok = all(r["healthy"] for rs in out.values() for r in rs if r["weight"] > 0)
        return {"healthy": serving_ok, "models": out}

    async def _ask(self, backend: str, receive: Receive, send: Send) -> None:
        """One chat completion from one named backend, sent with that backend's key: the
        orchestrator compares releases prompt by prompt (golden prompts) without holding
        their keys. Not measured (it is not client traffic) and not retried elsewhere."""
        body = await read_body(receive)
        routes = self._router.routes
        model = resolve_model(routes, CHAT_PATH, body)
        route = routes.get(model) if model is not None else None
        target = next((t for t in route.targets if t.name == backend), None) if route else None
        if target is None:
            await send_error(send, 404, "no such backend for this model", "not_found")
            return
        client = await self._router.upstream()
        headers = [JSON_CT]
        if target.auth is not None:
            headers.append((b"authorization", target.auth))
        try:
            response = await client.request("POST", target.url, CHAT_PATH, headers, body)
            chunks: list[bytes] = []
            try:
                while (chunk := await response.next_chunk()) is not None:
                    chunks.append(chunk)
            finally:
                response.close()
        except (UpstreamError, OSError):
            await send_error(send, 502, "backend unavailable", "bad_gateway")
            return
        answer = b"".join(chunks)
        await send({"type": "http.response.start", "status": response.status, "headers": [
            JSON_CT, (b"content-length", str(len(answer)).encode()), target.backend_header]})
        await send({"type": "http.response.body", "body": answer})


async def _probe(client: UpstreamClient, target: Target) -> dict[str, Any]:
    headers = [(b"authorization", target.auth)] if target.auth else []
    t0 = time.perf_counter()
    result: dict[str, Any] = {"name": target.name, "url": target.url, "weight": target.weight}
    try:
        async with asyncio.timeout(HEALTH_PROBE_TIMEOUT_S):
            response = await client.request("GET", target.url, "/health", headers, b"")
            try:
                await response.read()
            finally:
                response.close()
        result.update(healthy=response.status == 200, status=response.status, error=None)
    except (UpstreamError, OSError, TimeoutError) as exc:
        result.update(healthy=False, status=None, error=type(exc).__name__)
    result["latency_s"] = time.perf_counter() - t0
    return result
