"""ModalPlatform's deploy / set_traffic / retire / stats / running_releases against a FAKE
gateway that runs the real release and router bodies on loopback (FakeServingGateway): a
release App runs the FAKE engine under the real supervisor; the router App runs the real
router polling a dict-backed FakeDict through the same `routes_poll` the container uses.
conftest.py refuses any connection past loopback: a Modal call fails these tests."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from serving.config.profile import Profile
from serving.core.procs import wait_for
from serving.platforms.modal import platform as modal_platform
from serving.platforms.modal import resources, server_bodies
from serving.platforms.modal.platform import ModalPlatform
from serving.router.table import RoutingTable
from serving.supervisor.supervisor import Supervisor
from tests.modal_fixtures import FakeDict, serving_profile
from tests.modal_serving_fixtures import (
    ADMIN_TOKEN,
    API_KEY,
    REV_A,
    REV_B,
    start_fake_release,
    weights_of,
    write_verified_weights,
)
from tests.server_fixtures import POLL_SECONDS

# --------------------------------------------------------------------------------------------
# ModalPlatform serving against a FAKE gateway running the real bodies
# --------------------------------------------------------------------------------------------


@dataclass
class FakeApp:
    url: str
    stop: Callable[[], None]
    supervisor: Supervisor | None = None


@dataclass
class FakeServingGateway:
    """FAKE Modal for serving. Deploying a release App runs the release bodies (FAKE engine,
    loopback port); deploying the router App runs the router body on loopback over the model's
    FakeDict; stopping an App runs its exit body."""

    profile: Profile
    root: Path
    apps: dict[str, FakeApp] = field(default_factory=dict)
    dicts: dict[str, FakeDict] = field(default_factory=dict)
    deployed: list[str] = field(default_factory=list)
    stopped: list[str] = field(default_factory=list)
    other_apps: list[str] = field(default_factory=list)

    def deploy(self, app: Any) -> None:
        name = str(app.name)
        self.deployed.append(name)
        if name == resources.router_app_name(self.profile):
            routes = self.dict(resources.routes_dict_name(self.profile))
            config = server_bodies.router_config(self.profile, routes)
            router = server_bodies.start_router(config, host="127.0.0.1", port=0)
            url = f"http://127.0.0.1:{router.port}"
            self.apps[name] = FakeApp(url, lambda: server_bodies.stop_router(router))
            return
        revision = next(
            path.name
            for path in (self.root / "weights" / self.profile.hub.repo).iterdir()
            if name == resources.release_app_name(self.profile, path.name)
        )
        supervisor, _, _ = start_fake_release(
            self.profile, revision, self.root, api_key=server_bodies.container_api_key(self.profile)
        )
        server_bodies.resume_release(supervisor)
        self.apps[name] = FakeApp(
            supervisor.base_url, lambda: server_bodies.stop_release(supervisor, 5), supervisor
        )

    def deployed_apps(self) -> list[str]:
        return [*self.apps, *self.other_apps]

    def server_url(self, app_name: str, server_name: str) -> str | None:
        app = self.apps.get(app_name)
        return app.url if app else f"https://fake--{app_name}.modal.run"

    def stop_app(self, app_name: str) -> None:
        self.stopped.append(app_name)
        app = self.apps.pop(app_name, None)
        if app is not None:
            app.stop()

    def dict(self, name: str) -> FakeDict:
        return self.dicts.setdefault(name, FakeDict())

    def close(self) -> None:
        for name in list(self.apps):
            self.stop_app(name)

    # Preparation is tested in test_modal_platform.py.
    def spawn(self, app_name: str, function: str, *args: Any) -> str:
        raise AssertionError("no preparation call while serving")

    def call(self, app_name: str, function: str, *args: Any) -> Any:
        raise AssertionError("no preparation call while serving")

    def poll(self, call_id: str, timeout: float = 0) -> Any:
        raise AssertionError("no preparation call while serving")

    def read_volume_file(self, volume: str, path: str) -> bytes | None:
        raise AssertionError("no preparation call while serving")


@pytest.fixture
def serving(
    tmp_path: Path, admin_token: str, api_key: str
) -> Iterator[tuple[Profile, FakeServingGateway, ModalPlatform]]:
    profile = serving_profile(snapshot=True, api_key=True)
    for revision in (REV_A, REV_B):
        write_verified_weights(tmp_path / "weights", profile, revision)
    gateway = FakeServingGateway(profile, tmp_path)
    platform = ModalPlatform(tmp_path / "home", environment="test", gateway=gateway)
    try:
        yield profile, gateway, platform
    finally:
        gateway.close()


def dict_table(gateway: FakeServingGateway, profile: Profile) -> RoutingTable | None:
    """What the router container reads: the real poll function over the model's Dict."""
    return server_bodies.routes_poll(gateway.dict(resources.routes_dict_name(profile)))()


def chat(router: str, **extra: Any) -> httpx.Response:
    return httpx.post(
        f"{router}/v1/chat/completions",
        headers={"Authorization": f"Bearer {API_KEY}"},
        json={"model": "qwen3-8b", "messages": [{"role": "user", "content": "hi"}], **extra},
        timeout=30,
    )


def test_deploy_starts_the_router_then_the_release_at_weight_zero_and_is_idempotent(
    serving: tuple[Profile, FakeServingGateway, ModalPlatform],
) -> None:
    profile, gateway, platform = serving

    release = platform.deploy(profile, REV_A)

    assert gateway.deployed == ["qwen3-8b-router", "qwen3-8b-aaaaaaaa"]
    assert release.id == "qwen3-8b-aaaaaaaa" and release.revision == REV_A
    assert release.url == gateway.apps["qwen3-8b-aaaaaaaa"].url
    table = dict_table(gateway, profile)
    assert weights_of(table, profile) == {"qwen3-8b-aaaaaaaa": 0}
    assert table is not None
    [backend] = table.models["qwen3-8b"]
    # The router reads the engine's key from its own environment: only the variable's name.
    assert backend.api_key_env == resources.API_KEY_ENV and backend.api_key is None
    stored = gateway.dicts["qwen3-8b-routes"].data.values()
    assert all(API_KEY not in str(value) for value in stored)
    # Pushed to the router at once, too.
    routes = httpx.get(
        platform.router_url(profile) + "/admin/routes",
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
    ).json()
    assert routes["source"] == "admin" or routes["source"] == "poll"
    assert [b["name"] for b in routes["models"]["qwen3-8b"]] == ["qwen3-8b-aaaaaaaa"]

    # A re-run converges: nothing redeployed (a redeploy would roll the serving containers).
    again = ModalPlatform(platform.home, environment="test", gateway=gateway).deploy(profile, REV_A)
    assert again == release
    assert gateway.deployed == ["qwen3-8b-router", "qwen3-8b-aaaaaaaa"]


def test_set_traffic_writes_the_table_the_router_reads_and_requests_follow_it(
    serving: tuple[Profile, FakeServingGateway, ModalPlatform],
) -> None:
    profile, gateway, platform = serving
    a = platform.deploy(profile, REV_A)
    b = platform.deploy(profile, REV_B)
    router = platform.router_url(profile)
    since = time.time()

    platform.set_traffic(profile, {a.id: 100})

    # Round trip through the real poll function of the router container.
    table = dict_table(gateway, profile)
    assert weights_of(table, profile) == {a.id: 100, b.id: 0}
    assert table is not None
    assert {x.name: x.url for x in table.models["qwen3-8b"]} == {a.id: a.url, b.id: b.url}
    served = {chat(router).headers["x-rollout-backend"] for _ in range(5)}
    assert served == {a.id}
    # A re-run of the deploy registers the release at 0 again: it keeps its traffic.
    assert platform.deploy(profile, REV_A) == a
    assert weights_of(dict_table(gateway, profile), profile) == {a.id: 100, b.id: 0}

    platform.set_traffic(profile, {b.id: 100, "qwen3-8b-deadbeef": 0})  # not running: left out
    assert weights_of(dict_table(gateway, profile), profile) == {a.id: 0, b.id: 100}
    assert {chat(router).headers["x-rollout-backend"] for _ in range(5)} == {b.id}

    backends = platform.stats(profile, since)["backends"]
    assert backends[a.id]["requests"] == 5 and backends[b.id]["requests"] == 5
    with pytest.raises(ValueError, match="bad traffic weights"):
        platform.set_traffic(profile, {a.id: 101})


def test_retire_takes_the_release_out_waits_for_its_stream_then_stops_its_app(
    serving: tuple[Profile, FakeServingGateway, ModalPlatform],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(modal_platform, "RETIRE_POLL_SECONDS", 0.1)
    profile, gateway, platform = serving
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
    # What the router itself counts for the release when its App is stopped.
    at_stop: list[dict[str, Any]] = []
    stop_app = gateway.stop_app

    def observed_stop(app_name: str) -> None:
        if app_name == a.id and not at_stop:
            at_stop.append(platform.stats(profile, time.time())["backends"][a.id])
        stop_app(app_name)

    monkeypatch.setattr(gateway, "stop_app", observed_stop)
    began = time.monotonic()

    platform.retire(profile, a, drain_seconds=30)

    # Stopped only once the stream had been relayed whole, well before the deadline.
    assert at_stop[0]["in_flight"] == 0 and at_stop[0]["weight"] is None
    assert 0.2 < time.monotonic() - began < 30
    stream.join(5)
    [response] = streamed
    assert response.status_code == 200 and response.text.rstrip().endswith("data: [DONE]")
    assert gateway.stopped == [a.id]
    assert weights_of(dict_table(gateway, profile), profile) == {b.id: 100}
    assert [r.id for r in platform.running_releases(profile)] == [b.id]
    platform.retire(profile, a, drain_seconds=30)  # idempotent
    assert gateway.stopped == [a.id, a.id]


def test_running_releases_are_the_models_release_apps(
    serving: tuple[Profile, FakeServingGateway, ModalPlatform],
) -> None:
    profile, gateway, platform = serving
    a = platform.deploy(profile, REV_A)
    gateway.other_apps = [
        "qwen3-8b-weights", "qwen3-8b-compile", "qwen3-8b-cccccccc",  # deployed by hand
        "qwen3-8b-extra-dddddddd", "glm-5.1-aaaaaaaa", "qwen3-8b-aaaaaaa",
    ]  # fmt: skip

    releases = {release.id: release for release in platform.running_releases(profile)}

    assert sorted(releases) == [a.id, "qwen3-8b-cccccccc"]
    assert releases[a.id] == a  # from the record written at deploy
    hand = releases["qwen3-8b-cccccccc"]
    assert hand.revision == "cccccccc" and hand.url == "https://fake--qwen3-8b-cccccccc.modal.run"


def test_shutdown_stops_nothing_modal_apps_outlive_the_orchestrator(
    serving: tuple[Profile, FakeServingGateway, ModalPlatform],
) -> None:
    _, gateway, platform = serving
    platform.shutdown()
    assert gateway.stopped == []
