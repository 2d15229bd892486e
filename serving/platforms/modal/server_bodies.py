"""What runs inside a release container and the router container.

The Server classes of serving.platforms.modal.apps are thin: each lifecycle method calls one of
these functions with the mounts and the environment, so tests run them here against a temporary
directory, the FAKE engine and a plain dict standing in for the modal.Dict.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import TYPE_CHECKING

from serving.config.layout import deepgemm_dir, dummy_weights_dir, weights_dir
from serving.config.profile import Profile
from serving.engines.engine import engine_command, request_model, write_secrets_config
from serving.engines.sglang import Command
from serving.platforms.modal.resources import (
    API_KEY_ENV,
    ENGINE_BIND_HOST,
    ENGINE_PORT,
    EXIT_STOP_MARGIN_SECONDS,
    MAX_EXIT_GRACE,
    READINESS_MARGIN_SECONDS,
    ROUTER_ADMIN_SECRET,
    ROUTER_ADMIN_TOKEN_ENV,
    ROUTER_BIND_HOST,
    ROUTER_DRAIN_SECONDS,
    ROUTER_KEEPALIVE_SECONDS,
    ROUTER_POLL_SECONDS,
    ROUTER_PORT,
    ROUTER_START_POLL_SECONDS,
    ROUTER_START_SECONDS,
    ROUTER_STOP_MARGIN_SECONDS,
    ROUTES_KEY,
    SUPERVISOR_HOST,
    KeyValue,
    Syncable,
    release_app_name,
    reload_read_only,
)
from serving.platforms.modal.stats import dict_publish
from serving.supervisor.supervisor import CrashCallback, Supervisor, exit_process_on_crash
from serving.weights.download import read_sentinel

if TYPE_CHECKING:
    # The router's modules are imported where they run: an engine container never needs them.
    import uvicorn

    from serving.router.config import RouterConfig
    from serving.router.table import RoutingTable


class ReleaseStartFailed(RuntimeError):
    """A release container cannot serve: weights missing or unverified, or no API key."""


def exit_grace_seconds(profile: Profile) -> int:
    """How long Modal lets a stopping release container run its exit handler."""
    return int(min(profile.canary.retire_grace_seconds, MAX_EXIT_GRACE))


def release_drain_seconds(profile: Profile) -> float:
    """The engine's drain deadline inside the exit grace period: SIGKILL, reaping and the last
    log lines need their margin, or Modal kills the container before the supervisor has."""
    return float(max(0, exit_grace_seconds(profile) - EXIT_STOP_MARGIN_SECONDS))


def readiness_budget(profile: Profile) -> float:
    """The supervisor gives up before Modal's startup_timeout kills the container, so the
    failure carries the engine's last log lines instead of a bare timeout."""
    budget = profile.startup_budget_seconds
    return max(budget - READINESS_MARGIN_SECONDS, budget / 2)


def container_api_key(profile: Profile) -> str | None:
    """The engine's API key from the Modal Secret; a profile that names a key must have one.
    Passed on, never logged."""
    if not profile.secrets.api_key:
        return None
    key = os.environ.get(API_KEY_ENV)
    if not key:
        raise ReleaseStartFailed(
            f"{profile.name}: secret {profile.secrets.api_key!r} gives no {API_KEY_ENV}"
        )
    return key



def start_release(
    profile: Profile,
    revision: str,
    *,
    weights_root: PurePath,
    deepgemm_root: PurePath | None,
    volumes: Sequence[Syncable],
    private_dir: Path,
    api_key: str | None,
    port: int = ENGINE_PORT,
    bind_host: str = ENGINE_BIND_HOST,
    on_crash: CrashCallback = exit_process_on_crash,
    budget_seconds: float | None = None,
    build_command: Callable[..., Command] = engine_command,
) -> Supervisor:
    """The release container's first @modal.enter: the engine started, healthy and probed.

    A memory-snapshot profile then warms up and releases its GPU memory (Modal snapshots the
    container next); the crash monitor starts in `resume_release`, after the snapshot. On any
    failure the engine is killed and the exception propagates: the container fails to start,
    Modal never routes to it, and the deploy's health wait sees no 200.
    `build_command` is serving.engine.engine_command (tests pass the FAKE engine's).
    """
    reload_read_only(volumes)
    weights = _checked_weights(profile, revision, weights_root)
    deepgemm = (
        deepgemm_dir(deepgemm_root, profile)
        if profile.deepgemm and deepgemm_root is not None
        else None
    )
    command = build_command(
        profile,
        weights_path=weights,
        deepgemm_path=deepgemm,
        port=port,
        host=bind_host,
        # The key goes to the engine in a 0600 file, never on its argv.
        secrets_config=write_secrets_config(private_dir, api_key),
    )
    supervisor = Supervisor(
        profile,
        command,
        port=port,
        host=SUPERVISOR_HOST,
        model=request_model(profile, weights),
        api_key=api_key,
        release_id=revision[:8],
        on_crash=on_crash,
    )
    budget = budget_seconds if budget_seconds is not None else readiness_budget(profile)
    try:
        supervisor.start()
        supervisor.wait_ready(budget)
        supervisor.run_probes()
        if profile.engine.memory_snapshot:
            supervisor.prepare_snapshot()
    except BaseException:
        supervisor.stop(drain_seconds=0)  # nothing routes to a release that never got ready
        raise
    return supervisor


def _checked_weights(profile: Profile, revision: str, weights_root: PurePath) -> PurePath:
    """Verified weights only: the sentinel is written last, after verification. Dummy weights
    have none: the config their random model is built from, checked when it was fetched."""
    if profile.dummy_weights:
        weights = dummy_weights_dir(weights_root, profile, revision)
        missing = not Path(weights, "config.json").is_file()
    else:
        weights = weights_dir(weights_root, profile, revision)
        missing = read_sentinel(Path(weights), profile.hub.repo, revision) is None
    if missing:
        what = "no config for dummy weights" if profile.dummy_weights else "no verified weights"
        raise ReleaseStartFailed(f"{release_app_name(profile, revision)}: {what} at {weights}")
    return weights


def resume_release(supervisor: Supervisor) -> None:
    """The release container's last @modal.enter (after a snapshot restore, or straight after
    `start_release`): GPU memory back for snapshot profiles, then the crash monitor, so an
    engine that dies from now on takes the container with it and Modal replaces it."""
    try:
        if supervisor.profile.engine.memory_snapshot:
            supervisor.restore_snapshot()
    except BaseException:
        supervisor.stop(drain_seconds=0)
        raise
    supervisor.watch()


def stop_release(supervisor: Supervisor | None, drain_seconds: float) -> None:
    """@modal.exit: SIGTERM the engine, let it drain, SIGKILL at the deadline."""
    if supervisor is not None:
        supervisor.stop(drain_seconds=drain_seconds)



def routes_poll(routes: KeyValue) -> Callable[[], RoutingTable | None]:
    """The router's routing_poll: the RoutingTable JSON the platform writes under ROUTES_KEY.
    None (no change) while nothing is written; the router applies a table only when it
    changed, so reading every second is cheap for it. The read also keeps the Dict entry from
    expiring (7 days without access)."""
    from serving.router.table import RoutingTable

    def poll() -> RoutingTable | None:
        raw = routes.get(ROUTES_KEY)
        return None if raw is None else RoutingTable.model_validate_json(raw)

    return poll


def router_config(profile: Profile, routes: KeyValue) -> RouterConfig:
    """The router's config from the container's environment (the Modal Secrets)."""
    from serving.router.config import RouterConfig

    admin_token = os.environ.get(ROUTER_ADMIN_TOKEN_ENV)
    if not admin_token:
        # Without it the orchestrator can read no measurements: no canary could ever pass.
        raise ReleaseStartFailed(
            f"secret {ROUTER_ADMIN_SECRET!r} gives no {ROUTER_ADMIN_TOKEN_ENV}"
        )
    return RouterConfig(
        admin_token=admin_token,
        client_api_key=container_api_key(profile),
        routing_poll=routes_poll(routes),
        poll_interval_s=ROUTER_POLL_SECONDS,
        stats_publish=dict_publish(routes),

    )


@dataclass
class RunningRouter:
    server: uvicorn.Server
    thread: threading.Thread

    @property
    def port(self) -> int:
        return int(self.server.servers[0].sockets[0].getsockname()[1])


def start_router(
    config: RouterConfig,
    *,
    host: str = ROUTER_BIND_HOST,
    port: int = ROUTER_PORT,
    startup_seconds: float = ROUTER_START_SECONDS,
) -> RunningRouter:
    """uvicorn in a thread, returned once it listens: Modal marks a Server container ready
    when its @modal.enter methods return, then blocks the main thread until SIGTERM, so the
    router must run beside it (port 0: any free port, for tests)."""
    import uvicorn

    from serving.router.app import RouterApp
    from serving.router.serve import fastest_uvicorn_impls

    loop, http = fastest_uvicorn_impls()
    server = uvicorn.Server(
        uvicorn.Config(
            RouterApp(config), host=host, port=port, loop=loop, http=http,
            lifespan="on", access_log=False, timeout_keep_alive=ROUTER_KEEPALIVE_SECONDS,
            timeout_graceful_shutdown=ROUTER_DRAIN_SECONDS,
        )
    )  # fmt: skip
    # uvicorn installs no signal handlers off the main thread: Modal's SIGTERM stays Modal's.
    thread = threading.Thread(target=server.run, name="router", daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_seconds
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(f"the router did not start listening on port {port}")
        time.sleep(ROUTER_START_POLL_SECONDS)
    return RunningRouter(server=server, thread=thread)


def stop_router(router: RunningRouter | None) -> None:
    """@modal.exit: stop accepting, let open requests finish (uvicorn's graceful shutdown)."""
    if router is None:
        return
    router.server.should_exit = True
    router.thread.join(ROUTER_DRAIN_SECONDS + ROUTER_STOP_MARGIN_SECONDS)
