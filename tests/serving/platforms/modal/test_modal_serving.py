"""Serving on Modal, offline: the release and router container bodies, and ModalPlatform's
deploy / set_traffic / retire / stats / running_releases against a FAKE gateway.

- The release body (serving.platforms.modal.server_bodies: start_release / resume_release /
  stop_release) runs here with the FAKE engine (tests/engines/fake_engine.py) instead of
  SGLang: the same lifecycle as in a Modal container (enter with snap=True, snapshot, enter
  with snap=False, exit).
- FakeServingGateway stands in for Modal: deploying a release App runs the real release
  bodies on a loopback port; deploying the router App runs the real router (serving.router via
  server_bodies.start_router) on loopback, polling a dict-backed FakeDict through the same
  `routes_poll` function the router container uses.
- Where timing must be exact (drain deadlines, health waits), the router and the releases are
  httpx.MockTransport handlers and the clock is fake.
- conftest.py refuses any connection past loopback: a Modal call fails these tests.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from serving.config.layout import deepgemm_dir, weights_dir
from serving.config.loader import load_profile
from serving.config.profile import Profile
from serving.control.router_client import RouterAdminError
from serving.core.errors import DeployFailed
from serving.core.procs import free_port, wait_for
from serving.domain.records import ReleaseRecord
from serving.domain.release import Release
from serving.engines.sglang import Command
from serving.platforms.modal import platform as modal_platform
from serving.platforms.modal import resources, server_bodies
from serving.platforms.modal.platform import ModalPlatform
from serving.router.table import Backend, RoutingTable
from serving.supervisor.supervisor import EngineFailed, Supervisor
from serving.weights.download import write_sentinel
from serving.weights.models import Manifest
from tests.modal_fixtures import FakeDict, serving_profile
from tests.server_fixtures import POLL_SECONDS, fake_command, probe

REV_A = "aaaaaaaa" + "0" * 32
REV_B = "bbbbbbbb" + "1" * 32
API_KEY = "sk-test-SECRET-engine-key-123456"
ADMIN_TOKEN = "admin-SECRET-token-abcdef"
# The FAKE engine streams this many chunks this far apart: a request that is in flight for a
# while, for the drain tests.
STREAM_CHUNKS = 6
STREAM_INTERVAL_S = 0.25


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def write_verified_weights(root: Path, profile: Profile, revision: str) -> Path:
    directory = weights_dir(root, profile, revision)
    directory.mkdir(parents=True, exist_ok=True)
    moment = datetime(2026, 11, 1, tzinfo=UTC)
    manifest = Manifest(
        repo=profile.hub.repo, revision=revision, files=[], bytes_total=0,
        started_at=moment, finished_at=moment,
    )  # fmt: skip
    write_sentinel(directory, manifest)
    return directory


class FakeVolume:
    def __init__(self) -> None:
        self.reloads = 0

    def reload(self) -> None:
        self.reloads += 1

    def commit(self) -> None:
        raise AssertionError("a release never commits its read-only volumes")


class FakeEngineBuilder:
    """Stands in for serving.engine.engine_command: records what the body asked for and
    returns the FAKE engine's command line on the same port."""

    def __init__(self, record: Path) -> None:
        self.record = record
        self.calls: list[dict[str, Any]] = []

    def __call__(self, profile: Profile, **kwargs: Any) -> Command:
        self.calls.append(kwargs)
        return fake_command(
            "--port", str(kwargs["port"]), "--record", str(self.record),
            "--stream-chunks", str(STREAM_CHUNKS), "--stream-interval", str(STREAM_INTERVAL_S),
        )  # fmt: skip


def engine_requests(record: Path) -> list[str]:
    if not record.exists():
        return []
    return [json.loads(line)["path"] for line in record.read_text().splitlines()]


@pytest.fixture
def admin_token(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv(resources.ROUTER_ADMIN_TOKEN_ENV, ADMIN_TOKEN)
    return ADMIN_TOKEN


@pytest.fixture
def api_key(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv(resources.API_KEY_ENV, API_KEY)
    return API_KEY


@pytest.fixture
def started() -> Iterator[list[Supervisor]]:
    """Supervisors a test started, stopped at teardown even when it fails."""
    supervisors: list[Supervisor] = []
    yield supervisors
    for supervisor in supervisors:
        supervisor.stop(drain_seconds=0)


def start_fake_release(
    profile: Profile, revision: str, tmp_path: Path, **options: Any
) -> tuple[Supervisor, FakeEngineBuilder, FakeVolume]:
    builder = FakeEngineBuilder(tmp_path / f"engine-{revision[:8]}.jsonl")
    volume = FakeVolume()
    options.setdefault("on_crash", lambda failure: None)
    supervisor = server_bodies.start_release(
        profile,
        revision,
        weights_root=tmp_path / "weights",
        deepgemm_root=tmp_path / "deepgemm",
        volumes=[volume],
        private_dir=tmp_path / f"private-{revision[:8]}",
        api_key=options.pop("api_key", None),
        port=free_port(),
        bind_host="127.0.0.1",
        build_command=builder,
        **options,
    )
    return supervisor, builder, volume


# --------------------------------------------------------------------------------------------
# The release body
# --------------------------------------------------------------------------------------------


def test_snapshot_release_warms_up_releases_memory_then_resumes_and_watches(
    tmp_path: Path, started: list[Supervisor]
) -> None:
    profile = serving_profile(snapshot=True, api_key=True)
    write_verified_weights(tmp_path / "weights", profile, REV_A)
    crashes: list[EngineFailed] = []

    # @modal.enter(snap=True): ready, probed, warmed up, GPU memory released.
    supervisor, builder, volume = start_fake_release(
        profile, REV_A, tmp_path, api_key=API_KEY, on_crash=crashes.append
    )
    started.append(supervisor)
    record = builder.record
    assert volume.reloads == 1
    assert engine_requests(record) == [
        "/v1/chat/completions",  # the probe
        "/v1/chat/completions",  # the warm-up before the snapshot
        "/release_memory_occupation",
    ]
    # The engine's weights, its DeepGEMM cache, and the key in a private file, not on argv.
    [call] = builder.calls
    assert call["weights_path"] == weights_dir(tmp_path / "weights", profile, REV_A)
    assert call["deepgemm_path"] == deepgemm_dir(tmp_path / "deepgemm", profile)
    config = Path(call["secrets_config"])
    assert stat.S_IMODE(config.stat().st_mode) == 0o600 and API_KEY in config.read_text()
    assert all(API_KEY not in arg for arg in supervisor.command.argv)

    # No crash monitor before the snapshot: the engine is paused, not dead.
    assert supervisor._monitor is None
    # @modal.enter(snap=False), after the restore: memory back, then the crash monitor.
    server_bodies.resume_release(supervisor)
    assert engine_requests(record)[-1] == "/resume_memory_occupation"
    assert supervisor._monitor is not None

    # A dead engine is reported to on_crash (exit_process_on_crash in a container).
    assert supervisor.pid is not None
    os.killpg(supervisor.pid, signal.SIGKILL)
    assert wait_for(lambda: bool(crashes), 10, POLL_SECONDS), (
        "the crash monitor did not notice the dead engine"
    )
    assert "exited with code" in str(crashes[0])


def test_release_without_snapshot_serves_after_enter_and_drains_on_exit(
    tmp_path: Path, started: list[Supervisor]
) -> None:
    profile = serving_profile(snapshot=False, api_key=False)
    write_verified_weights(tmp_path / "weights", profile, REV_A)
    crashes: list[EngineFailed] = []
    supervisor, builder, _ = start_fake_release(profile, REV_A, tmp_path, on_crash=crashes.append)
    started.append(supervisor)
    server_bodies.resume_release(supervisor)  # the same second enter: only the crash monitor
    assert engine_requests(builder.record) == ["/v1/chat/completions"]
    assert builder.calls[0]["secrets_config"] is None  # no key, no file

    server_bodies.stop_release(supervisor, drain_seconds=5)  # @modal.exit

    assert not supervisor.running
    time.sleep(2 * 0.5)  # two crash-monitor polls: a requested stop is no crash
    assert crashes == []
    server_bodies.stop_release(None, drain_seconds=5)  # an enter that failed left no supervisor


def test_a_release_without_verified_weights_starts_no_engine(tmp_path: Path) -> None:
    profile = serving_profile(snapshot=False, api_key=False)
    builder = FakeEngineBuilder(tmp_path / "engine.jsonl")
    with pytest.raises(server_bodies.ReleaseStartFailed, match="no verified weights"):
        server_bodies.start_release(
            profile, REV_A, weights_root=tmp_path / "weights", deepgemm_root=None, volumes=[],
            private_dir=tmp_path / "private", api_key=None, build_command=builder,
        )  # fmt: skip
    assert builder.calls == []


def test_a_release_that_fails_its_probe_kills_its_engine(tmp_path: Path) -> None:
    profile = serving_profile(snapshot=True, api_key=False).model_copy(
        update={"probes": [probe("empty", "canned:empty", expect="content")]}
    )
    write_verified_weights(tmp_path / "weights", profile, REV_A)
    builder = FakeEngineBuilder(tmp_path / "engine.jsonl")
    spawned: list[Supervisor] = []
    real_init = Supervisor.__init__

    def remember(self: Supervisor, *args: Any, **kwargs: Any) -> None:
        real_init(self, *args, **kwargs)
        spawned.append(self)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Supervisor, "__init__", remember)
        with pytest.raises(Exception, match="probe 'empty': empty content"):
            start_fake_release(profile, REV_A, tmp_path)
    [supervisor] = spawned
    assert not supervisor.running
    assert "/release_memory_occupation" not in engine_requests(builder.record)


def test_a_release_that_fails_to_resume_is_stopped(
    tmp_path: Path, started: list[Supervisor]
) -> None:
    profile = serving_profile(snapshot=True, api_key=False)
    write_verified_weights(tmp_path / "weights", profile, REV_A)
    supervisor, _, _ = start_fake_release(profile, REV_A, tmp_path)
    started.append(supervisor)
    assert supervisor.pid is not None
    os.killpg(supervisor.pid, signal.SIGKILL)  # died while the container was snapshotted
    with pytest.raises(EngineFailed):
        server_bodies.resume_release(supervisor)
    assert not supervisor.running and supervisor._monitor is None


def test_the_container_api_key_comes_from_the_secret_and_is_required_where_named(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with_key = serving_profile(snapshot=False, api_key=True)
    monkeypatch.delenv(resources.API_KEY_ENV, raising=False)
    assert server_bodies.container_api_key(serving_profile(snapshot=False, api_key=False)) is None
    with pytest.raises(server_bodies.ReleaseStartFailed, match="gives no API_KEY"):
        server_bodies.container_api_key(with_key)
    monkeypatch.setenv(resources.API_KEY_ENV, API_KEY)
    assert server_bodies.container_api_key(with_key) == API_KEY


def test_the_engine_drains_within_the_exit_grace_period() -> None:
    for name in ("glm-5.1", "qwen3-8b"):
        profile = load_profile(name)
        grace = server_bodies.exit_grace_seconds(profile)
        drain = server_bodies.release_drain_seconds(profile)
        assert drain == grace - resources.EXIT_STOP_MARGIN_SECONDS
    short = load_profile("qwen3-8b")
    short = short.model_copy(
        update={"canary": short.canary.model_copy(update={"retire_grace_seconds": 5})}
    )
    assert server_bodies.release_drain_seconds(short) == 0
    # The supervisor gives up before Modal's startup_timeout, so its error says why.
    assert server_bodies.readiness_budget(load_profile("qwen3-8b")) < 600


# --------------------------------------------------------------------------------------------
# The router body
# --------------------------------------------------------------------------------------------


def test_the_router_polls_the_routing_table_from_the_dict() -> None:
    routes = FakeDict()
    poll = server_bodies.routes_poll(routes)
    assert poll() is None  # nothing written yet: no change
    table = RoutingTable(
        models={"qwen3-8b": [Backend(name="qwen3-8b-aaaaaaaa", url="https://a.modal.run",
                                     weight=100, api_key_env="API_KEY")]}
    )  # fmt: skip
    routes.put(resources.ROUTES_KEY, table.model_dump_json(exclude_none=True))
    assert poll() == table


def test_the_router_needs_its_admin_token_and_the_models_key(
    monkeypatch: pytest.MonkeyPatch, api_key: str
) -> None:
    profile = serving_profile(snapshot=False, api_key=True)
    monkeypatch.delenv(resources.ROUTER_ADMIN_TOKEN_ENV, raising=False)
    with pytest.raises(server_bodies.ReleaseStartFailed, match="ROUTER_ADMIN_TOKEN"):
        server_bodies.router_config(profile, FakeDict())
    monkeypatch.setenv(resources.ROUTER_ADMIN_TOKEN_ENV, ADMIN_TOKEN)
    config = server_bodies.router_config(profile, FakeDict())
    assert config.admin_token is not None and config.admin_token.get_secret_value() == ADMIN_TOKEN
    assert config.client_api_key is not None
    assert config.client_api_key.get_secret_value() == api_key
    assert config.poll_interval_s == resources.ROUTER_POLL_SECONDS
    assert ADMIN_TOKEN not in repr(config) and api_key not in repr(config)


def test_the_router_serves_on_a_thread_and_stops(admin_token: str) -> None:
    routes = FakeDict()
    profile = serving_profile(snapshot=False, api_key=False)
    router = server_bodies.start_router(
        server_bodies.router_config(profile, routes), host="127.0.0.1", port=0
    )
    try:
        url = f"http://127.0.0.1:{router.port}"
        assert httpx.get(f"{url}/health").status_code == 200
        table = RoutingTable(models={"qwen3-8b": [Backend(name="b", url="http://x", weight=1)]})
        routes.put(resources.ROUTES_KEY, table.model_dump_json())
        headers = {"Authorization": f"Bearer {admin_token}"}

        def polled() -> bool:
            view = httpx.get(f"{url}/admin/routes", headers=headers).json()
            return view["source"] == "poll" and "qwen3-8b" in view["models"]

        assert wait_for(polled, 5, POLL_SECONDS), (
            "the router did not pick up the Dict within a second"
        )
    finally:
        server_bodies.stop_router(router)
    assert not router.thread.is_alive()


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


def weights_of(table: RoutingTable | None, profile: Profile) -> dict[str, int]:
    assert table is not None
    return {b.name: b.weight for b in table.models.get(profile.served_model_name, [])}


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


def test_the_release_store_is_one_dict_keyed_by_model(
    serving: tuple[Profile, FakeServingGateway, ModalPlatform],
) -> None:
    _, gateway, platform = serving
    store = platform.release_store()
    assert store.read("qwen3-8b") == ReleaseRecord(model="qwen3-8b")
    release = Release(
        model="qwen3-8b", revision=REV_A, id="qwen3-8b-aaaaaaaa", url="https://a.modal.run",
        deployed_at=datetime(2026, 11, 1, tzinfo=UTC),
    )  # fmt: skip
    store.update("qwen3-8b", lambda record: record.model_copy(update={"stable": release}))
    assert platform.release_store().read("qwen3-8b").stable == release
    assert list(gateway.dicts) == [resources.RELEASES_DICT_NAME]
    assert list(gateway.dicts[resources.RELEASES_DICT_NAME].data) == ["qwen3-8b"]
    platform.shutdown()  # Modal Apps outlive the orchestrator: nothing to stop
    assert gateway.stopped == []


# --------------------------------------------------------------------------------------------
# Exact timing: MockTransport router and releases, fake clock
# --------------------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@dataclass
class MockModal:
    """A gateway whose Apps are URLs answered by `handle` (httpx.MockTransport)."""

    handle: Callable[[httpx.Request], httpx.Response]
    apps: list[str] = field(default_factory=list)
    deployed: list[str] = field(default_factory=list)
    stopped: list[str] = field(default_factory=list)
    dicts: dict[str, FakeDict] = field(default_factory=dict)

    def deploy(self, app: Any) -> None:
        self.deployed.append(str(app.name))
        self.apps.append(str(app.name))

    def deployed_apps(self) -> list[str]:
        return list(self.apps)

    def server_url(self, app_name: str, server_name: str) -> str | None:
        return f"https://{app_name}.modal.test"

    def stop_app(self, app_name: str) -> None:
        self.stopped.append(app_name)
        if app_name in self.apps:
            self.apps.remove(app_name)

    def dict(self, name: str) -> FakeDict:
        return self.dicts.setdefault(name, FakeDict())

    def platform(self, home: Path, clock: FakeClock) -> ModalPlatform:
        return ModalPlatform(
            home, environment="test", gateway=self, sleep=clock.sleep, clock=clock,
            http=httpx.Client(transport=httpx.MockTransport(self.handle)),
        )  # fmt: skip


def router_answer(request: httpx.Request) -> httpx.Response:
    """The router's answer to the admin calls a test does not look at: a pushed table is
    taken (PUT /admin/routes answers with the table it now serves), anything else is a 200."""
    if (request.method, request.url.path) == ("PUT", "/admin/routes"):
        table = RoutingTable.model_validate_json(request.content)
        return httpx.Response(200, json=table.public())
    return httpx.Response(200, json={})


def stats_handler(in_flight: list[int], seen: list[httpx.Request]) -> Callable[..., Any]:
    """The router: in-flight counts of release A, one per stats read (the last repeats)."""

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.path == "/admin/stats":
            count = in_flight.pop(0) if len(in_flight) > 1 else in_flight[0]
            backends = {"qwen3-8b-aaaaaaaa": {"in_flight": count}}
            return httpx.Response(200, json={"model": "qwen3-8b", "backends": backends})
        return router_answer(request)

    return handle


def release_a() -> Release:
    return Release(
        model="qwen3-8b", revision=REV_A, id="qwen3-8b-aaaaaaaa",
        url="https://qwen3-8b-aaaaaaaa.modal.test", deployed_at=datetime(2026, 11, 1, tzinfo=UTC),
    )  # fmt: skip


def test_retire_stops_the_app_once_the_router_counts_nothing_in_flight(
    tmp_path: Path, admin_token: str
) -> None:
    profile = serving_profile(snapshot=False, api_key=False)
    seen: list[httpx.Request] = []
    modal = MockModal(stats_handler([2, 1, 0], seen), apps=["qwen3-8b-router", "qwen3-8b-aaaaaaaa"])
    routed = RoutingTable(models={"qwen3-8b": [Backend(name="qwen3-8b-aaaaaaaa", weight=100,
                                                       url=release_a().url)]})  # fmt: skip
    modal.dict("qwen3-8b-routes").put(resources.ROUTES_KEY, routed.model_dump_json())
    clock = FakeClock()

    modal.platform(tmp_path, clock).retire(profile, release_a(), drain_seconds=60)

    stats_reads = [r for r in seen if r.url.path == "/admin/stats"]
    assert len(stats_reads) == 3
    assert all(r.headers["authorization"] == f"Bearer {admin_token}" for r in seen)
    # Out of routing before anything else: the whole table pushed, without the release.
    assert (seen[0].method, seen[0].url.path) == ("PUT", "/admin/routes")
    assert "qwen3-8b-aaaaaaaa" not in seen[0].content.decode()
    assert modal.stopped == ["qwen3-8b-aaaaaaaa"]
    assert sum(clock.sleeps) < 60


def test_ask_goes_through_the_router_admin_api_to_the_named_release(
    tmp_path: Path, admin_token: str
) -> None:
    seen: list[httpx.Request] = []

    def router(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"choices": [{"message": {"content": "Paris"}}]})

    profile = serving_profile(snapshot=False, api_key=True)
    modal = MockModal(router, apps=["qwen3-8b-router"])
    chat = {"model": "qwen3-8b", "messages": [{"role": "user", "content": "capital?"}]}

    answer = modal.platform(tmp_path, FakeClock()).ask(profile, "qwen3-8b-aaaaaaaa", chat)

    assert answer["choices"][0]["message"]["content"] == "Paris"
    [request] = seen
    assert (request.method, request.url.path) == ("POST", "/admin/ask/qwen3-8b-aaaaaaaa")
    assert request.headers["authorization"] == f"Bearer {admin_token}"  # never the API key
    assert json.loads(request.content) == chat


def test_retire_stops_at_the_deadline_when_requests_do_not_finish(
    tmp_path: Path, admin_token: str, caplog: pytest.LogCaptureFixture
) -> None:
    profile = serving_profile(snapshot=False, api_key=False)
    modal = MockModal(stats_handler([3], []), apps=["qwen3-8b-router", "qwen3-8b-aaaaaaaa"])
    clock = FakeClock()
    with caplog.at_level(logging.WARNING):
        modal.platform(tmp_path, clock).retire(profile, release_a(), drain_seconds=10)
    assert modal.stopped == ["qwen3-8b-aaaaaaaa"]
    assert sum(clock.sleeps) == pytest.approx(10)
    assert "3 requests still in flight at the drain deadline" in caplog.text
    assert admin_token not in caplog.text


def test_without_the_admin_token_routing_still_moves_and_retire_waits_out_the_deadline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv(resources.ROUTER_ADMIN_TOKEN_ENV, raising=False)
    profile = serving_profile(snapshot=False, api_key=False)
    seen: list[httpx.Request] = []
    modal = MockModal(stats_handler([0], seen), apps=["qwen3-8b-router", "qwen3-8b-aaaaaaaa"])
    clock = FakeClock()
    platform = modal.platform(tmp_path, clock)

    platform.set_traffic(profile, {"qwen3-8b-aaaaaaaa": 100})
    assert weights_of(server_bodies.routes_poll(modal.dict("qwen3-8b-routes"))(), profile) == {
        "qwen3-8b-aaaaaaaa": 100
    }
    with pytest.raises(RouterAdminError, match="ROUTER_ADMIN_TOKEN is not set"):
        platform.stats(profile, since=0)
    with caplog.at_level(logging.WARNING):
        platform.retire(profile, release_a(), drain_seconds=20)

    assert seen == []  # nothing sent without the token
    assert sum(clock.sleeps) == pytest.approx(20)  # unknown in-flight: the whole deadline
    assert modal.stopped == ["qwen3-8b-aaaaaaaa"]
    assert "in-flight requests unknown" in caplog.text


def test_a_release_that_never_gets_healthy_is_stopped_and_fails_the_deploy(
    tmp_path: Path, admin_token: str
) -> None:
    profile = serving_profile(snapshot=False, api_key=False)
    health: list[str] = []

    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/health":
            health.append(request.url.host)
            return httpx.Response(503)  # Modal's answer while no container is up
        return router_answer(request)

    modal = MockModal(handle, apps=["qwen3-8b-router"])
    clock = FakeClock()
    with pytest.raises(DeployFailed, match=r"not healthy .* within 630 s \(last: HTTP 503\)"):
        modal.platform(tmp_path, clock).deploy(profile, REV_A)
    assert modal.deployed == ["qwen3-8b-aaaaaaaa"]  # the running router was not redeployed
    assert modal.stopped == ["qwen3-8b-aaaaaaaa"]  # no GPU left running
    assert set(health) == {"qwen3-8b-aaaaaaaa.modal.test"} and len(health) > 1
    assert (
        weights_of(
            server_bodies.routes_poll(modal.dict("qwen3-8b-routes"))() or RoutingTable(), profile
        )
        == {}
    )


def test_deploy_waits_through_cold_start_answers(tmp_path: Path, admin_token: str) -> None:
    profile = serving_profile(snapshot=False, api_key=False)
    answers = [httpx.ConnectTimeout("cold"), httpx.Response(503), httpx.Response(200)]

    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/health":
            answer = answers.pop(0)
            if isinstance(answer, Exception):
                raise answer
            return answer
        return router_answer(request)

    modal = MockModal(handle)
    release = modal.platform(tmp_path, FakeClock()).deploy(profile, REV_A)
    assert modal.deployed == ["qwen3-8b-router", "qwen3-8b-aaaaaaaa"] and answers == []
    assert release.url == "https://qwen3-8b-aaaaaaaa.modal.test"
    assert modal.stopped == []


def test_refs_are_refused_before_anything_is_deployed(tmp_path: Path) -> None:
    modal = MockModal(lambda request: httpx.Response(500))
    with pytest.raises(Exception, match="must be resolved"):
        modal.platform(tmp_path, FakeClock()).deploy(
            serving_profile(snapshot=False, api_key=False), "main"
        )
    assert modal.deployed == []
