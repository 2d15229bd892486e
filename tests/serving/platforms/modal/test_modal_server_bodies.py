"""The release and router container bodies, offline: start_release / resume_release /
stop_release run the FAKE engine (tests/engines/fake_engine.py) instead of SGLang, with the
lifecycle of a Modal container (enter with snap=True, snapshot, enter with snap=False, exit);
the router body polls a dict-backed FakeDict."""

from __future__ import annotations

import os
import signal
import stat
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from serving.config.layout import deepgemm_dir, weights_dir
from serving.config.loader import load_profile
from serving.core.procs import wait_for
from serving.platforms.modal import resources, server_bodies
from serving.router.table import Backend, RoutingTable
from serving.supervisor.supervisor import EngineFailed, Supervisor
from tests.modal_fixtures import FakeDict, serving_profile
from tests.modal_serving_fixtures import (
    ADMIN_TOKEN,
    API_KEY,
    REV_A,
    FakeEngineBuilder,
    engine_requests,
    start_fake_release,
    verified_profile,
    write_verified_weights,
)
from tests.server_fixtures import POLL_SECONDS, probe

# --------------------------------------------------------------------------------------------
# The release body
# --------------------------------------------------------------------------------------------


def test_snapshot_release_warms_up_releases_memory_then_resumes_and_watches(
    tmp_path: Path, started: list[Supervisor]
) -> None:
    profile = verified_profile(tmp_path, snapshot=True, api_key=True)
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
    profile = verified_profile(tmp_path, snapshot=False, api_key=False)
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


def test_a_dummy_release_needs_its_config_not_the_verified_weights(tmp_path: Path) -> None:
    profile = serving_profile(snapshot=False, api_key=False)
    write_verified_weights(tmp_path / "weights", profile, REV_A)  # the real release's, not its
    builder = FakeEngineBuilder(tmp_path / "engine.jsonl")
    with pytest.raises(server_bodies.ReleaseStartFailed, match="no config for dummy weights"):
        server_bodies.start_release(
            profile.with_dummy_weights(), REV_A, weights_root=tmp_path / "weights",
            deepgemm_root=None, volumes=[], private_dir=tmp_path / "private", api_key=None,
            build_command=builder,
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
    profile = verified_profile(tmp_path, snapshot=True, api_key=False)
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
