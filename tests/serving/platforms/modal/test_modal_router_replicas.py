"""Two router containers of one model (the router body of serving.platforms.modal.server_bodies)
publish their measurements to the model's routes Dict through the real modal SDK, against the
Modal double (tests/modal_double); the orchestrator's window merges both. Modal's load balancer
is stood in for by the test, which sends some requests to each container."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from serving.control.measured import Replicas
from serving.control.router_client import RouterClient
from serving.core.procs import wait_for
from serving.platforms.modal import resources, server_bodies
from serving.platforms.modal.gateway import ModalGateway
from serving.platforms.modal.stats import DictStatsStore
from serving.router.replicas import Head
from serving.router.table import Backend, RoutingTable
from tests.modal_double.servicer import ModalDouble
from tests.modal_fixtures import serving_profile
from tests.router_fixtures import Proc, chat_body, served_by_replica, start_fake_engine
from tests.server_fixtures import POLL_SECONDS

# What the load balancer sent to each container.
SENT = (9, 5)
ROUTES_SECONDS = 10.0


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Proc]:
    proc = start_fake_engine("qwen3-8b-aaaaaaaa", tmp_path)
    yield proc
    proc.stop()


def test_router_containers_publish_to_the_dict_and_their_window_merges(
    modal_double: ModalDouble, admin_token: str, engine: Proc,
) -> None:
    profile = serving_profile(snapshot=False, api_key=False)
    model = profile.served_model_name
    routes = ModalGateway().dict(resources.routes_dict_name(profile))
    table = RoutingTable(models={model: [Backend(name=engine.name, url=engine.url, weight=100)]})
    routes.put(resources.ROUTES_KEY, table.model_dump_json())
    routers = [server_bodies.start_router(server_bodies.router_config(profile, routes),
                                          host="127.0.0.1", port=0) for _ in SENT]  # fmt: skip
    urls = [f"http://127.0.0.1:{router.port}" for router in routers]
    try:
        for url in urls:
            assert wait_for(lambda url=url: httpx.get(f"{url}/health").json()["models"] == [model],
                            ROUTES_SECONDS, POLL_SECONDS)  # fmt: skip
        since = time.time()
        for url, count in zip(urls, SENT, strict=True):
            for _ in range(count):
                response = httpx.post(f"{url}/v1/chat/completions", json=chat_body(model))
                assert response.status_code == 200
        replicas = Replicas(RouterClient(urls[0], lambda: admin_token), DictStatsStore(routes))
        window = replicas.window(model, since)
    finally:
        for router in routers:
            server_bodies.stop_router(router)

    assert window["replicas"] == len(SENT)
    assert window["backends"][engine.name]["requests"] == sum(SENT)
    assert window["backends"][engine.name]["weight"] == 100
    assert window["measured_since"] <= since
    # Stopped containers leave final heads: nothing of theirs is missing afterwards.
    store = DictStatsStore(routes)
    heads = [Head.model_validate_json(raw) for raw in store.heads().values()]
    assert len(heads) == len(SENT) and all(head.final for head in heads)
    assert sorted(served_by_replica(store, model)) == sorted(SENT)
