"""serving.control.routes against both platforms' route stores and a real router.

- local: the routes file (FileRouteStore) and the real router process (`python -m
  serving.router --state-file`);
- modal: the routes Dict (DictRouteStore over a dict-backed stand-in of modal.Dict) and the real
  router app in-process, polling the Dict through the same `routes_poll` as its container.

What the router's poll reads is the one FAKE part: a `PollView` decides which table the poll
sees, so a test can make it return the table of before a change after that change's push has
landed (the stale-poll race, which real timing produces only now and then). Locally the router
polls a symlink the test points at the routes file or at a copy; on Modal it reads the Dict
through a wrapper that can answer with another table.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import httpx
import pytest

from serving.control.router_client import RouterAdminError, RouterClient
from serving.control.routes import ModelRoutes, Outcome, RouteStore
from serving.core.files import write_atomically
from serving.core.procs import free_port, wait_for
from serving.platforms.local.routes import FileRouteStore
from serving.platforms.modal import resources, server_bodies
from serving.platforms.modal.routes import DictRouteStore
from serving.router.table import Backend, RoutingTable
from tests.modal_fixtures import FakeDict, serving_profile
from tests.router_fixtures import new_secret, start_router
from tests.server_fixtures import POLL_SECONDS

MODEL = "qwen3-8b"
# The in-process router polls this often (the local process: router_fixtures' 0.2 s).
POLL_INTERVAL_S = 0.2
# Generous: the machine may be shared, with a core kept busy.
POLLED_TIMEOUT_S = 20.0


def backend(name: str, weight: int, url: str | None = None) -> Backend:
    return Backend(name=name, url=url or f"http://127.0.0.1:9/{name}", weight=weight)


class PollView(Protocol):
    def serve(self, table: RoutingTable | None) -> None:
        """From now on the router's poll reads `table` (None: nothing stored yet)."""
        ...

    def wait_polled(self) -> None:
        """Returns once the router has read what `serve` set and applied or ignored it."""
        ...


@dataclass
class Stand:
    name: str
    store: RouteStore
    router_url: str
    token: str
    poll: PollView

    def routes(self, *, token: str | None = None, url: str | None = None) -> ModelRoutes:
        client = RouterClient(url or self.router_url, lambda: token or self.token)
        return ModelRoutes(self.store, client, MODEL)

    def router_view(self) -> dict[str, Any]:
        """GET /admin/routes as it is, with `version` (installs) and `source`."""
        headers = {"Authorization": f"Bearer {self.token}"}
        response = httpx.get(f"{self.router_url}/admin/routes", headers=headers, timeout=10)
        response.raise_for_status()
        return dict(response.json())

    def router_weights(self) -> dict[str, int]:
        entries = self.router_view()["models"].get(MODEL, [])
        return {entry["name"]: entry["weight"] for entry in entries}


class SymlinkPollView:
    """FAKE poll source for the local router: its --state-file is a symlink, pointed at a
    file holding the table to serve (or at nothing)."""

    def __init__(self, link: Path, log: Callable[[], str]) -> None:
        self.link = link
        self.log = log
        self.serial = 0
        self.polls_seen = 0
        self.serve(None)

    def serve(self, table: RoutingTable | None) -> None:
        self.serial += 1
        target = self.link.with_name(f"served-{self.serial}.json")
        if table is not None:
            write_atomically(target, table.model_dump_json(exclude_none=True))
        self.polls_seen = self._polls()
        fresh = self.link.with_name(f".{self.link.name}.new")
        fresh.unlink(missing_ok=True)
        fresh.symlink_to(target)
        os.replace(fresh, self.link)

    def wait_polled(self) -> None:
        # The router logs every table a poll brings, installed or ignored, "... from poll".
        assert wait_for(lambda: self._polls() > self.polls_seen, POLLED_TIMEOUT_S, POLL_SECONDS)

    def _polls(self) -> int:
        return self.log().count("from poll")


class WrappedDictPollView:
    """FAKE poll source for the Modal router: the Dict as the router reads it, except that
    ROUTES_KEY answers with the served table."""

    def __init__(self) -> None:
        self.served: str | None = None
        self.reads = 0
        self.reads_seen = 0

    def get(self, key: str, default: Any = None) -> Any:
        if key != resources.ROUTES_KEY:
            return default
        self.reads += 1
        return self.served

    def put(self, key: str, value: Any) -> Any:
        raise AssertionError("the router never writes its Dict")

    def serve(self, table: RoutingTable | None) -> None:
        self.served = None if table is None else table.model_dump_json(exclude_none=True)
        self.reads_seen = self.reads

    def wait_polled(self) -> None:
        # Polls run one after another: a second read starts after the first one was applied.
        assert wait_for(lambda: self.reads >= self.reads_seen + 2, POLLED_TIMEOUT_S, POLL_SECONDS)


@pytest.fixture(params=["local", "modal"])
def stand(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Stand]:
    token = new_secret()
    if request.param == "local":
        link = tmp_path / "router-reads.json"
        router = start_router(tmp_path, admin_token=token, state_file=link)
        try:
            view = SymlinkPollView(link, router.proc.log)
            yield Stand("local", FileRouteStore(tmp_path / "routes.json"), router.url, token, view)
        finally:
            router.proc.stop()
        return
    monkeypatch.setenv(resources.ROUTER_ADMIN_TOKEN_ENV, token)
    dict_view = WrappedDictPollView()
    config = server_bodies.router_config(serving_profile(snapshot=False, api_key=False), dict_view)
    config = config.model_copy(update={"poll_interval_s": POLL_INTERVAL_S})
    running = server_bodies.start_router(config, host="127.0.0.1", port=0)
    try:
        url = f"http://127.0.0.1:{running.port}"
        yield Stand("modal", DictRouteStore(FakeDict()), url, token, dict_view)
    finally:
        server_bodies.stop_router(running)


def test_a_stale_poll_after_the_push_never_reinstalls_the_old_table(stand: Stand) -> None:
    routes = stand.routes()
    assert routes.set([backend("a", 100)]) is Outcome.APPLIED
    before = stand.store.table()  # what a poll reads just before the next change
    assert routes.set([backend("a", 0), backend("b", 100)]) is Outcome.APPLIED
    after = stand.store.table()
    assert after.generation == before.generation + 1

    stand.poll.serve(before)  # ... and brings back once the change was pushed
    stand.poll.wait_polled()

    view = stand.router_view()
    assert view["generation"] == after.generation
    assert stand.router_weights() == {"a": 0, "b": 100}

    stand.poll.serve(after)  # the poll catches up: nothing changes
    stand.poll.wait_polled()
    assert stand.router_view()["generation"] == after.generation
    assert stand.router_weights() == {"a": 0, "b": 100}


def test_a_surviving_backend_keeps_its_weight_and_unroute_is_one_update(stand: Stand) -> None:
    routes = stand.routes()
    routes.set([backend("a", 100, url="http://127.0.0.1:9/old")])

    # A re-run of a deploy registers "a" at 0 again, from a new URL: it keeps its traffic.
    assert routes.add(backend("a", 0, url="http://127.0.0.1:9/new")) is Outcome.APPLIED
    assert routes.add(backend("b", 0)) is Outcome.APPLIED
    assert routes.weights() == stand.router_weights() == {"a": 100, "b": 0}
    [a, _] = stand.store.table().models[MODEL]
    assert a.url == "http://127.0.0.1:9/new"

    generation, installs = stand.store.table().generation, stand.router_view()["version"]
    assert routes.unroute("a") is Outcome.APPLIED
    # One write of the store, one table installed by the router (the poll reads nothing here).
    assert stand.store.table().generation == generation + 1
    assert stand.router_view()["version"] == installs + 1
    assert routes.weights() == stand.router_weights() == {"b": 0}

    assert routes.unroute("a") is Outcome.APPLIED  # again: nothing to write
    assert stand.store.table().generation == generation + 1


def test_a_router_out_of_reach_gets_the_change_from_its_store_and_a_refusal_raises(
    stand: Stand,
) -> None:
    unreachable = stand.routes(url=f"http://127.0.0.1:{free_port()}")
    assert unreachable.set([backend("a", 100)]) is Outcome.PENDING
    stored = stand.store.table()
    assert stored.weights(MODEL) == {"a": 100}

    stand.poll.serve(stored)  # the router's next read of its store
    stand.poll.wait_polled()
    assert stand.router_view()["generation"] == stored.generation
    assert stand.router_weights() == {"a": 100}

    with pytest.raises(RouterAdminError, match="HTTP 401"):
        stand.routes(token="not-the-admin-token").set([backend("a", 50)])
    assert stand.router_weights() == {"a": 100}


def test_a_push_older_than_the_routers_table_yields_to_it(stand: Stand) -> None:
    # Someone newer wrote and pushed first: the router holds a later generation.
    newer = RoutingTable(models={MODEL: [backend("b", 100)]}, generation=50)
    assert stand.routes().router.push(newer).generation == 50

    assert stand.routes().set([backend("a", 100)]) is Outcome.SUPERSEDED  # a 409: no error

    assert stand.router_view()["generation"] == 50
    assert stand.router_weights() == {"b": 100}
