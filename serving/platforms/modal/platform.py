"""ModalPlatform: the Platform on Modal.

Preparation (resolve, download, compile, verify) is serving.platforms.modal.prep: long jobs
spawned on the deployed `<model>-weights` / `<model>-compile` Apps, their call ids recorded so a
restarted orchestrator re-attaches instead of paying for a second 8-GPU job. Everything that
talks to Modal sits behind the small `Gateway` protocol (serving.platforms.modal.gateway).

Serving: one `<model>-<rev8>` App per release (apps.build_release_app; `<model>-<rev8>-dummy`
serves random weights from the config `fetch_serving_config` put on the weights volume) and one
`<model>-router` App per model. Routing lives in the model's modal.Dict (`<model>-routes`, key
"routes": a RoutingTable whose backends are the releases' Modal URLs), which the router reads
every second; each change is also pushed to the router's admin API so it applies at once. The
admin token (ROUTER_ADMIN_TOKEN, the same value as in the `rollout-router-admin` Secret) lets
the orchestrator read the router's measurements. Apps outlive the orchestrator by design.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from pydantic import ValidationError

from serving.config.profile import Profile, Shadow
from serving.control.drain import drain
from serving.control.measured import Replicas
from serving.control.router_client import RouterClient, RouterUnreachable
from serving.control.routes import ModelRoutes, release_backend, traffic_backends
from serving.core.errors import DeployFailed
from serving.core.home import rollout_home
from serving.domain.records import ReleaseStore
from serving.domain.release import (
    DUMMY_SUFFIX,
    RELEASE_ID_HEX,
    Release,
    VerifyResult,
    release_id,
)
from serving.engines.deepgemm import CompileResult
from serving.platform import Target
from serving.platforms.modal import resources
from serving.platforms.modal.apps import build_release_app, build_router_app
from serving.platforms.modal.gateway import Gateway, ModalGateway
from serving.platforms.modal.prep import (
    BYTES_PER_SHARD,
    MAX_SHARDS,
    SHARD_MIN_BYTES,
    SHARD_MIN_FILES,
    Preparation,
)
from serving.platforms.modal.routes import DictRouteStore
from serving.platforms.modal.stats import DictStatsStore
from serving.platforms.modal.stores import VolumeReleaseStore
from serving.weights.hub import require_commit
from serving.weights.models import DownloadResult, ProgressCallback

log = logging.getLogger(__name__)

# Serving. A release answers /health through Modal's URL after its container is scheduled
# (an image of several GB may be pulled first) and its own startup budget: allow for both.
DEPLOY_SCHEDULING_SECONDS = 10 * 60.0
HEALTH_PATH = "/health"
HEALTH_POLL_SECONDS = 5.0
HEALTH_TIMEOUT_SECONDS = 10.0
# Each in-flight read during a drain is an HTTPS round trip to the router's Modal URL.
RETIRE_POLL_SECONDS = 2.0


class ModalPlatform:
    target: Target = "modal"

    def __init__(
        self,
        home: Path | None = None,
        *,
        environment: str | None = None,
        endpoint: str | None = None,
        gateway: Gateway | None = None,
        shard_min_files: int = SHARD_MIN_FILES,
        shard_min_bytes: int = SHARD_MIN_BYTES,
        bytes_per_shard: int = BYTES_PER_SHARD,
        max_shards: int = MAX_SHARDS,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        http: httpx.Client | None = None,
    ) -> None:
        self.home = Path(home) if home else rollout_home()
        self.environment = environment or os.environ.get("MODAL_ENVIRONMENT") or None
        self.cache_scope = f"modal:{self.environment or 'default'}"
        self.gateway: Gateway = gateway or ModalGateway(self.environment)
        self.prep = Preparation(
            self.home,
            self.gateway,
            environment=self.environment,
            endpoint=endpoint or os.environ.get("HF_ENDPOINT") or None,
            shard_min_files=shard_min_files,
            shard_min_bytes=shard_min_bytes,
            bytes_per_shard=bytes_per_shard,
            max_shards=max_shards,
            sleep=sleep,
        )
        self._sleep = sleep
        self._clock = clock
        # To the routers' and releases' Modal URLs (health, admin API); no request is made
        # until a serving call needs one.
        self._http = http or httpx.Client(follow_redirects=False)
        self._deploy_lock = threading.Lock()
        self._router_urls: dict[str, str] = {}

    @classmethod
    def from_env(cls) -> ModalPlatform:
        return cls()

    # -- preparation --------------------------------------------------------------------------

    def resolve(self, profile: Profile, revision: str) -> str:
        return self.prep.resolve(profile, revision)

    def download(
        self, profile: Profile, revision: str, progress: ProgressCallback | None = None
    ) -> DownloadResult:
        return self.prep.download(profile, revision, progress)

    def fetch_serving_config(self, profile: Profile, revision: str) -> str:
        return self.prep.fetch_serving_config(profile, revision)

    def has_weights(self, profile: Profile, revision: str) -> bool:
        return self.prep.has_weights(profile, revision)

    def has_kernels(self, profile: Profile, revision: str) -> bool:
        return self.prep.has_kernels(profile, revision)

    def compile(self, profile: Profile, revision: str) -> CompileResult:
        return self.prep.compile(profile, revision)

    def verify(self, profile: Profile, revision: str) -> VerifyResult:
        return self.prep.verify(profile, revision)

    # -- serving ------------------------------------------------------------------------------

    def deploy(self, profile: Profile, revision: str) -> Release:
        """The release App deployed (once: a running release is never rolled by a re-run),
        healthy through its Modal URL, and registered with the router at weight 0. The
        container's own @modal.enter already ran the probes: a release that fails them never
        answers 200. On failure an App this call deployed is stopped again: DeployFailed."""
        require_commit(revision)
        rid = release_id(profile, revision)
        app_name = resources.release_app_name(profile, revision)
        self.router_url(profile)  # the router first: it fails before a GPU is paid for
        deployed_now = False
        if app_name not in self.gateway.deployed_apps():
            log.info("deploying Modal app %s", app_name)
            self.gateway.deploy(build_release_app(profile, revision).app)
            deployed_now = True
        try:
            url = self._server_url(app_name, resources.SERVER_NAME)
            self._wait_healthy(profile, rid, url)
            release = self._stored_release(profile, rid)
            if release is None or release.url != url or release.revision != revision:
                release = Release(
                    model=profile.name, revision=revision, id=rid, url=url,
                    deployed_at=datetime.now(UTC), dummy_weights=profile.dummy_weights,
                )  # fmt: skip
                self._routes(profile).put(_release_key(rid), release.model_dump_json())
            self._model_routes(profile).add(release_backend(release, 0, _key_env(profile)))
        except BaseException:
            if deployed_now:
                # Nothing that never took traffic may keep costing GPU time.
                self.gateway.stop_app(app_name)
            raise
        log.info("%s: ready at %s (0%% traffic)", rid, url)
        return release

    def set_traffic(
        self, profile: Profile, weights: dict[str, int], shadow: dict[str, Shadow] | None = None
    ) -> None:
        """Route `weights` (release id → percent) to the model's running releases; a running
        release not named gets 0, one not running is left out (a rollback must still zero a
        dead canary). Written to the model's Dict (the router's source, read every second)
        and pushed to the router's admin API so it applies at once."""
        backends = traffic_backends(
            profile, weights, self.running_releases(profile), _key_env(profile), shadow
        )
        self._model_routes(profile).set(backends)

    def retire(self, profile: Profile, release: Release, drain_seconds: float) -> None:
        """Out of routing, then wait until the router counts no request in flight to it (or
        the deadline), then stop its App; the container's exit handler drains the engine
        within the exit grace period. Idempotent."""
        deadline = self._clock() + drain_seconds
        routes = self._model_routes(profile)
        unrouted = routes.take_out(release.id)
        replicas = self._replicas(profile)
        drain(replicas, routes.model, release.id, deadline, unrouted=replicas.unrouted(unrouted),
              poll_seconds=RETIRE_POLL_SECONDS, clock=self._clock, sleep=self._sleep)  # fmt: skip
        # The App is named by the release id: a dummy release of the stable revision is another
        # App, which the profile (never dummy here) would not name.
        self.gateway.stop_app(release.id)
        log.info("%s: retired", release.id)

    def router_url(self, profile: Profile) -> str:
        """The model's router URL; its App is deployed first if it is not running. A running
        router is never redeployed from here: a redeploy restarts its containers, and the
        measurements they have not published yet with them, perhaps in the middle of someone's
        canary."""
        with self._deploy_lock:
            url = self._router_urls.get(profile.name)
            if url is None:
                name = resources.router_app_name(profile)
                if name not in self.gateway.deployed_apps():
                    log.info("deploying Modal app %s", name)
                    self.gateway.deploy(build_router_app(profile).app)
                url = self._server_url(name, resources.ROUTER_NAME)
                self._router_urls[profile.name] = url
        return url

    def stats(self, profile: Profile, since: float) -> dict[str, Any]:
        """The model's window since `since` (unix time), merged from every router replica:
        per-backend requests, errors, TTFT and latency percentiles, in-flight counts and
        weights (serving.control.measured)."""
        return self._replicas(profile).window(profile.served_model_name, since)

    def running_releases(self, profile: Profile) -> list[Release]:
        """The model's deployed release Apps (`<model>-<rev8>`, `<model>-<rev8>-dummy`), whoever
        deployed them. A release deployed here is described by its record in the model's Dict;
        one without a record gets its URL from Modal and its 8-hex revision prefix."""
        pattern = re.compile(
            rf"{re.escape(profile.name)}-(?P<rev>[0-9a-f]{{{RELEASE_ID_HEX}}})"
            rf"(?P<dummy>{re.escape(DUMMY_SUFFIX)})?"
        )
        releases = []
        for name in sorted(self.gateway.deployed_apps()):
            match = pattern.fullmatch(name)
            if match is None:
                continue
            release = self._stored_release(profile, name)
            if release is None:
                url = self.gateway.server_url(name, resources.SERVER_NAME)
                if not url:
                    log.warning("%s: deployed, but Modal gives it no URL", name)
                    continue
                release = Release(
                    model=profile.name, revision=match["rev"], id=name,
                    url=url.rstrip("/"), deployed_at=datetime.now(UTC),
                    dummy_weights=match["dummy"] is not None,
                )  # fmt: skip
            releases.append(release)
        return releases

    def engine_crashes(self, profile: Profile, release_id: str, since: float) -> int:
        # A crashed engine exits its container and Modal starts another; this platform reads
        # no count of those. The crash still reaches the gates as the router's errors for the
        # requests the dying container held.
        return 0

    def ask(
        self, profile: Profile, release_id: str, chat: dict[str, Any], timeout: float
    ) -> dict[str, Any]:
        return self._router_client(profile).ask(release_id, chat, timeout)

    def release_store(self) -> ReleaseStore:
        return VolumeReleaseStore(
            self.gateway.volume_files(resources.STATE_VOLUME_NAME),
            self.gateway.dict(resources.RELEASES_DICT_NAME),
        )

    def reconcile_orphans(self) -> list[str]:
        # Nothing is tied to an orchestrator process: releases and routers are Modal apps that
        # serve on, and a half-finished canary is reverted from the release record.
        return []

    def shutdown(self) -> None:
        # Nothing to stop: spawned preparation calls are meant to outlive this process, so a
        # restarted orchestrator can re-attach to them; releases and routers serve on.
        return None

    # -- serving internals ----------------------------------------------------------------------

    def _routes(self, profile: Profile) -> resources.KeyValue:
        return self.gateway.dict(resources.routes_dict_name(profile))

    def _stored_release(self, profile: Profile, rid: str) -> Release | None:
        raw = self._routes(profile).get(_release_key(rid))
        if raw is None:
            return None
        try:
            return Release.model_validate_json(raw)
        except ValidationError:
            return None

    def _model_routes(self, profile: Profile) -> ModelRoutes:
        """The model's routes: its Dict (the router's source of truth across restarts) and
        the router's admin API."""
        return ModelRoutes(
            DictRouteStore(self._routes(profile)),
            self._router_client(profile),
            profile.served_model_name,
        )

    def _replicas(self, profile: Profile) -> Replicas:
        """The router's replicas: each publishes its measurements to the routes Dict."""
        return Replicas(self._router_client(profile), DictStatsStore(self._routes(profile)))

    def _router_client(self, profile: Profile) -> RouterClient:
        return RouterClient(self.router_url(profile), _admin_token, self._http)

    def _server_url(self, app_name: str, server_name: str) -> str:
        url = self.gateway.server_url(app_name, server_name)
        if not url:
            raise DeployFailed(f"{app_name}: Modal gives no URL for {server_name}")
        return url.rstrip("/")

    def _wait_healthy(self, profile: Profile, rid: str, url: str) -> None:
        """GET /health through Modal's URL until 200. Modal answers 503 (or holds the
        request) while no container is up; a container passes its probes before its port is
        served, so a 200 means ready and probed."""
        budget = profile.startup_budget_seconds + DEPLOY_SCHEDULING_SECONDS
        deadline = self._clock() + budget
        last = "no answer"
        while True:
            try:
                response = self._http.get(url + HEALTH_PATH, timeout=HEALTH_TIMEOUT_SECONDS)
                if response.status_code == 200:
                    return
                last = f"HTTP {response.status_code}"
            except httpx.HTTPError as exc:
                last = type(exc).__name__
            remaining = deadline - self._clock()
            if remaining <= 0:
                raise DeployFailed(
                    f"{rid}: not healthy through {url} within {budget:g} s (last: {last}); "
                    f"its container logs say why"
                )
            self._sleep(min(HEALTH_POLL_SECONDS, remaining))


def _release_key(rid: str) -> str:
    return f"{resources.RELEASE_KEY_PREFIX}{rid}"


def _key_env(profile: Profile) -> str | None:
    """Where the router finds a release's key: its container's environment, from the same
    Modal Secret. The Dict holds the variable's name, never the key."""
    return resources.API_KEY_ENV if profile.secrets.api_key else None


def _admin_token() -> str:
    token = os.environ.get(resources.ROUTER_ADMIN_TOKEN_ENV)
    if not token:
        raise RouterUnreachable(
            f"{resources.ROUTER_ADMIN_TOKEN_ENV} is not set: the router's admin API is out of "
            f"reach (the same value as in the Modal Secret {resources.ROUTER_ADMIN_SECRET!r})"
        )
    return token
