"""ModalPlatform's deploy / set_traffic / retire / stats / running_releases through the real
modal SDK against the TEST DOUBLE of Modal's API (tests/modal_double). The double runs the
deployed Servers through tests/modal_containers.py: a release App runs the FAKE engine under the
real supervisor, the router App runs the real router polling the model's routes Dict through the
SDK; stopping an App runs its exit body. conftest.py refuses any connection past loopback."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import httpx
import modal
import pytest
from modal_proto import api_pb2

from serving.config.layout import dummy_weights_dir
from serving.config.profile import Profile
from serving.core.procs import wait_for
from serving.platforms.modal import apps, resources, server_bodies
from serving.platforms.modal import platform as modal_platform
from serving.platforms.modal.gateway import ModalGateway
from serving.platforms.modal.platform import ModalPlatform
from serving.router.table import RoutingTable
from tests.modal_containers import ServingContainers, seed_verified_weights
from tests.modal_double.servicer import ModalDouble
from tests.modal_fixtures import serving_profile
from tests.modal_serving_fixtures import (
    ADMIN_TOKEN,
    API_KEY,
    REV_A,
    REV_B,
    STREAM_CHUNKS,
    STREAM_INTERVAL_S,
    weights_of,
)
from tests.server_fixtures import POLL_SECONDS, fake_command

ENVIRONMENT = "test"
STOPPED = api_pb2.APP_STATE_STOPPED
REV_C = "cccccccc" + "2" * 32


def stdlib_fake_engine(port: int, name: str) -> Any:
    """tests/engines/fake_engine.py: answers the snapshot endpoints, streams slowly."""
    return fake_command("--port", str(port), "--stream-chunks", str(STREAM_CHUNKS),
                        "--stream-interval", str(STREAM_INTERVAL_S))  # fmt: skip


@pytest.fixture
def serving(
    tmp_path: Path, modal_double: ModalDouble, admin_token: str, api_key: str
) -> Iterator[tuple[Profile, ServingContainers, ModalPlatform]]:
    profile = serving_profile(snapshot=True, api_key=True)
    modal_double.create_secret(resources.ROUTER_ADMIN_SECRET,
                               {resources.ROUTER_ADMIN_TOKEN_ENV: admin_token}, ENVIRONMENT)
    modal_double.create_secret(str(profile.secrets.api_key), {resources.API_KEY_ENV: api_key},
                               ENVIRONMENT)  # fmt: skip
    seed_verified_weights(modal_double, profile, [REV_A, REV_B], ENVIRONMENT)
    engines = {REV_A: stdlib_fake_engine, REV_B: stdlib_fake_engine}
    containers = ServingContainers(modal_double, profile, tmp_path / "containers", engines,
                                   ENVIRONMENT)  # fmt: skip
    modal_double.containers = containers
    platform = ModalPlatform(tmp_path / "home", environment=ENVIRONMENT)
    try:
        yield profile, containers, platform
    finally:
        containers.close()


def dict_table(profile: Profile) -> RoutingTable | None:
    """What the router container reads: the real poll function over the model's Dict."""
    routes = ModalGateway(ENVIRONMENT).dict(resources.routes_dict_name(profile))
    return server_bodies.routes_poll(routes)()


def chat(router: str, **extra: Any) -> httpx.Response:
    return httpx.post(
        f"{router}/v1/chat/completions",
        headers={"Authorization": f"Bearer {API_KEY}"},
        json={"model": "qwen3-8b", "messages": [{"role": "user", "content": "hi"}], **extra},
        timeout=30,
    )


def test_deploy_starts_the_router_then_the_release_at_weight_zero_and_is_idempotent(
    serving: tuple[Profile, ServingContainers, ModalPlatform], modal_double: ModalDouble
) -> None:
    profile, containers, platform = serving

    release = platform.deploy(profile, REV_A)

    assert modal_double.publishes == ["qwen3-8b-router", "qwen3-8b-aaaaaaaa"]
    assert containers.started == ["qwen3-8b-router", "qwen3-8b-aaaaaaaa"]
    assert release.id == "qwen3-8b-aaaaaaaa" and release.revision == REV_A
    server = modal.Server.from_name(release.id, resources.SERVER_NAME,
                                    environment_name=ENVIRONMENT)  # fmt: skip
    assert release.url == server.get_url()  # the Server's URL, as Modal hands it out
    table = dict_table(profile)
    assert weights_of(table, profile) == {"qwen3-8b-aaaaaaaa": 0}
    assert table is not None
    [backend] = table.models["qwen3-8b"]
    # The router reads the engine's key from its own environment: only the variable's name.
    assert backend.api_key_env == resources.API_KEY_ENV and backend.api_key is None
    [routes_dict] = [d for (env, name), d in modal_double.dicts.items()
                     if (env, name) == (ENVIRONMENT, "qwen3-8b-routes")]  # fmt: skip
    assert all(API_KEY.encode() not in value for value in routes_dict.data.values())
    # Pushed to the router at once, too.
    routes = httpx.get(
        platform.router_url(profile) + "/admin/routes",
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
    ).json()
    assert routes["source"] == "admin" or routes["source"] == "poll"
    assert [b["name"] for b in routes["models"]["qwen3-8b"]] == ["qwen3-8b-aaaaaaaa"]

    # A re-run converges: nothing redeployed (a redeploy would roll the serving containers).
    again = ModalPlatform(platform.home, environment=ENVIRONMENT).deploy(profile, REV_A)
    assert again == release
    assert modal_double.publishes == ["qwen3-8b-router", "qwen3-8b-aaaaaaaa"]
    assert containers.started == ["qwen3-8b-router", "qwen3-8b-aaaaaaaa"]


def test_set_traffic_writes_the_table_the_router_reads_and_requests_follow_it(
    serving: tuple[Profile, ServingContainers, ModalPlatform],
) -> None:
    profile, _, platform = serving
    a = platform.deploy(profile, REV_A)
    b = platform.deploy(profile, REV_B)
    router = platform.router_url(profile)
    since = time.time()

    platform.set_traffic(profile, {a.id: 100})

    # Round trip through the real poll function of the router container.
    table = dict_table(profile)
    assert weights_of(table, profile) == {a.id: 100, b.id: 0}
    assert table is not None
    assert {x.name: x.url for x in table.models["qwen3-8b"]} == {a.id: a.url, b.id: b.url}
    served = {chat(router).headers["x-rollout-backend"] for _ in range(5)}
    assert served == {a.id}
    # A re-run of the deploy registers the release at 0 again: it keeps its traffic.
    assert platform.deploy(profile, REV_A) == a
    assert weights_of(dict_table(profile), profile) == {a.id: 100, b.id: 0}

    platform.set_traffic(profile, {b.id: 100, "qwen3-8b-deadbeef": 0})  # not running: left out
    assert weights_of(dict_table(profile), profile) == {a.id: 0, b.id: 100}
    assert {chat(router).headers["x-rollout-backend"] for _ in range(5)} == {b.id}

    backends = platform.stats(profile, since)["backends"]
    assert backends[a.id]["requests"] == 5 and backends[b.id]["requests"] == 5
    with pytest.raises(ValueError, match="bad traffic weights"):
        platform.set_traffic(profile, {a.id: 101})


def test_retire_takes_the_release_out_waits_for_its_stream_then_stops_its_app(
    serving: tuple[Profile, ServingContainers, ModalPlatform],
    modal_double: ModalDouble,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(modal_platform, "RETIRE_POLL_SECONDS", 0.1)
    profile, containers, platform = serving
    a = platform.deploy(profile, REV_A)
    b = platform.deploy(profile, REV_B)
    platform.set_traffic(profile, {a.id: 100})
    router = platform.router_url(profile)
    streamed: list[httpx.Response] = []
    stream = threading.Thread(target=lambda: streamed.append(chat(router, stream=True)))
    stream.start()

    def stream_in_flight_on_a() -> bool:
        stats = platform.stats(profile, time.time())
        return stats["backends"].get(a.id, {}).get("in_flight") == 1

    assert wait_for(stream_in_flight_on_a, 10, POLL_SECONDS)
    platform.set_traffic(profile, {b.id: 100})
    # What the router itself counts for the release when Modal stops its container.
    at_stop: list[dict[str, Any]] = []
    stop_container = containers.stop

    def observed_stop(app_name: str) -> None:
        if app_name == a.id and not at_stop:
            at_stop.append(platform.stats(profile, time.time())["backends"][a.id])
        stop_container(app_name)

    monkeypatch.setattr(containers, "stop", observed_stop)
    began = time.monotonic()

    platform.retire(profile, a, drain_seconds=30)

    # Stopped only once the stream had been relayed whole, well before the deadline.
    assert at_stop[0]["in_flight"] == 0 and at_stop[0]["weight"] is None
    assert 0.2 < time.monotonic() - began < 30
    stream.join(5)
    [response] = streamed
    assert response.status_code == 200 and response.text.rstrip().endswith("data: [DONE]")
    assert containers.stopped == [a.id]
    assert [app.state for app in modal_double.apps.values() if app.name == a.id] == [STOPPED]
    assert weights_of(dict_table(profile), profile) == {b.id: 100}
    assert [r.id for r in platform.running_releases(profile)] == [b.id]
    platform.retire(profile, a, drain_seconds=30)  # idempotent: no App of that name runs
    assert containers.stopped == [a.id]


def test_running_releases_are_the_models_release_apps(
    serving: tuple[Profile, ServingContainers, ModalPlatform], modal_double: ModalDouble
) -> None:
    profile, _, platform = serving
    a = platform.deploy(profile, REV_A)
    # Deployed by hand: a release App of another revision (its Server gets a URL of Modal's
    # shape, and runs nothing here), and Apps that are not the model's releases.
    ModalGateway(ENVIRONMENT).deploy(apps.build_release_app(profile, REV_C).app)
    for name in ("qwen3-8b-compile", "qwen3-8b-extra-dddddddd", "glm-5.1-aaaaaaaa",
                 "qwen3-8b-aaaaaaa"):  # fmt: skip
        modal.App.lookup(name, environment_name=ENVIRONMENT, create_if_missing=True)

    releases = {release.id: release for release in platform.running_releases(profile)}

    assert sorted(releases) == [a.id, "qwen3-8b-cccccccc"]
    assert releases[a.id] == a  # from the record written at deploy
    hand = releases["qwen3-8b-cccccccc"]
    by_modal = modal.Server.from_name("qwen3-8b-cccccccc", resources.SERVER_NAME,
                                      environment_name=ENVIRONMENT).get_url()  # fmt: skip
    assert hand.revision == "cccccccc" and hand.url == by_modal.rstrip("/")
    assert by_modal.startswith("https://") and by_modal.endswith(".modal.run")


def test_a_dummy_release_of_the_stable_revision_is_an_app_of_its_own(
    serving: tuple[Profile, ServingContainers, ModalPlatform], modal_double: ModalDouble
) -> None:
    """Iterating on flags beside stable: its dummy-weights release, of the same revision, is
    deployed, listed and retired as its own App, and the stable one serves on."""
    profile, containers, platform = serving
    dummy = profile.with_dummy_weights()
    config = dummy_weights_dir(PurePosixPath(), profile, REV_A) / "config.json"
    modal_double.write_volume_file(profile.volumes.weights, str(config), b"{}", ENVIRONMENT)
    stable = platform.deploy(profile, REV_A)

    release = platform.deploy(dummy, REV_A)

    assert release.id == "qwen3-8b-aaaaaaaa-dummy" and release.dummy_weights
    listed = {r.id: r.dummy_weights for r in platform.running_releases(profile)}
    assert listed == {stable.id: False, release.id: True}
    platform.set_traffic(profile, {stable.id: 100})
    assert weights_of(dict_table(profile), profile) == {stable.id: 100, release.id: 0}

    platform.retire(profile, release, drain_seconds=5)

    assert containers.stopped == [release.id]
    assert [r.id for r in platform.running_releases(profile)] == [stable.id]
    assert chat(platform.router_url(profile)).status_code == 200


def test_shutdown_stops_nothing_modal_apps_outlive_the_orchestrator(
    serving: tuple[Profile, ServingContainers, ModalPlatform], modal_double: ModalDouble
) -> None:
    profile, containers, platform = serving
    release = platform.deploy(profile, REV_A)

    platform.shutdown()

    assert containers.stopped == []
    assert modal_double.deployed(release.id, ENVIRONMENT).state == api_pb2.APP_STATE_DEPLOYED
