"""ModalPlatform: the preparation stages (resolve, download, compile, verify) on Modal.

Long jobs are SPAWNED on the deployed `<model>-weights` / `<model>-compile` Apps, and each call
id is written to a small durable CallStore ($ROLLOUT_HOME/state/modal-calls.json) before the
orchestrator waits on it. A spawned call outlives the orchestrator, so a retried or restarted
flow re-attaches to it instead of paying for a second 8-GPU job:

    no record                      -> spawn
    record, call still running     -> attach (wait for it)
    record, call finished ok       -> use its result
    record, call failed            -> spawn anew
    record, output expired (7 d)   -> spawn anew

The decision is the pure function `attach_or_spawn`; everything that talks to Modal sits behind
the small `Gateway` protocol (`ModalGateway` here, a fake in tests), so all of this is tested
offline. Before any container starts, a finished stage is recognised from the volume itself
(the weights sentinel, the compile marker): a rerun of a proven stage starts nothing.

Big repos are downloaded in shards, each shard its own spawned call (a `.map` would die with
the orchestrator and could not be re-attached), then merged into one sentinel.

Serving: one `<model>-<rev8>` App per release (modal_app.build_release_app) and one
`<model>-router` App per model. Routing lives in the model's modal.Dict (`<model>-routes`, key
"routes": a RoutingTable whose backends are the releases' Modal URLs), which the router reads
every second; each change is also pushed to the router's admin API so it applies at once. The
admin token (ROUTER_ADMIN_TOKEN, the same value as in the `rollout-router-admin` Secret) lets
the orchestrator read the router's measurements. Apps outlive the orchestrator by design.
"""

from __future__ import annotations

import logging
import math
import os
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path, PurePosixPath
from typing import Any, Literal, Protocol

import httpx
import modal
import modal.exception
import modal.experimental
from pydantic import BaseModel, Field, ValidationError

from serving.config.layout import SENTINEL_NAME, WEIGHTS_MOUNT, deepgemm_dir, weights_dir
from serving.config.profile import Profile
from serving.control.drain import drain
from serving.control.router_client import RouterClient, RouterUnreachable
from serving.control.routes import ModelRoutes, release_backend, traffic_backends
from serving.core.errors import DeployFailed, one_line
from serving.core.files import locked, write_atomically
from serving.core.home import rollout_home
from serving.domain.records import ReleaseStore
from serving.domain.release import RELEASE_ID_HEX, Release, VerifyResult, release_id
from serving.engines.deepgemm import CompileResult, marker_path, parse_marker
from serving.engines.sglang import deepgemm_cache_key
from serving.platform import Target
from serving.platforms.modal import apps as modal_app
from serving.platforms.modal.routes import DictRouteStore
from serving.platforms.modal.stores import DictReleaseStore
from serving.weights.download import (
    DownloadResult,
    FileEntry,
    GiB,
    Manifest,
    Progress,
    ProgressCallback,
    WeightsError,
    fetch_files,
    fetch_model_config,
    hf_token,
    plan_shards,
    require_commit,
    resolve_revision,
    select_files,
)

log = logging.getLogger(__name__)

GB = 1000**3
CALLS_FILE = "modal-calls.json"
CALL_STORE_FORMAT = 1
# Where the orchestrator keeps a revision's config.json to compute the DeepGEMM cache key.
CONFIGS_DIR = "modal-configs"
# Shard a download over several containers above either threshold: one container's network
# and disk top out around a few hundred MB/s, and a 700 GB repo is hours in one container.
SHARD_MIN_FILES = 16
SHARD_MIN_BYTES = 200 * GB
BYTES_PER_SHARD = 100 * GiB
MAX_SHARDS = 16
# A long-poll on one call: the server answers as soon as the call finishes, so this only
# bounds how often a "still waiting" line is logged.
WAIT_POLL_SECONDS = 60.0
# Several calls (shards) are polled in turn, each without waiting, then the loop sleeps.
SHARDS_POLL_INTERVAL = 10.0

# Serving. A release answers /health through Modal's URL after its container is scheduled
# (an image of several GB may be pulled first) and its own startup budget: allow for both.
DEPLOY_SCHEDULING_SECONDS = 10 * 60.0
HEALTH_PATH = "/health"
HEALTH_POLL_SECONDS = 5.0
HEALTH_TIMEOUT_SECONDS = 10.0
# Each in-flight read during a drain is an HTTPS round trip to the router's Modal URL.
RETIRE_POLL_SECONDS = 2.0

Stage = Literal["download", "download-shard", "compile"]


class CallStoreError(RuntimeError):
    """The call store cannot be read; starting calls blindly could duplicate GPU jobs."""


class ModalCallError(RuntimeError):
    """A spawned call failed or its output is gone; one line, the remote error chained."""


# --------------------------------------------------------------------------------------------
# The durable call store
# --------------------------------------------------------------------------------------------


class CallKey(BaseModel, frozen=True):
    """What a call computes. A compile is keyed by its cache key too: a changed flag or image
    must not attach to a compile of other kernels."""

    stage: Stage
    model: str
    revision: str
    detail: str = Field("", description="the compile cache key, or a shard's name")
    environment: str = Field("", description="the Modal environment; call ids live in one")

    @property
    def id(self) -> str:
        return "/".join(
            (self.stage, self.environment or "-", self.model, self.revision, self.detail or "-")
        )


class CallRecord(BaseModel):
    key: CallKey
    call_id: str
    app: str
    function: str
    spawned_at: datetime


class _CallStoreFile(BaseModel):
    format: int = CALL_STORE_FORMAT
    calls: dict[str, CallRecord] = Field(default_factory=dict)


class CallStore:
    """Call ids of spawned jobs in one JSON file: replaced atomically (a crash leaves the old or
    the new file, never half of one), read-modify-write under an exclusive lock (two
    orchestrators on one machine do not lose each other's records)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock_path = self.path.with_name(self.path.name + ".lock")

    def get(self, key: CallKey) -> CallRecord | None:
        return self._read().calls.get(key.id)

    def records(self) -> list[CallRecord]:
        return list(self._read().calls.values())

    def put(self, record: CallRecord) -> None:
        with locked(self._lock_path):
            data = self._read()
            data.calls[record.key.id] = record
            self._write(data)

    def remove(self, key: CallKey) -> None:
        with locked(self._lock_path):
            data = self._read()
            if data.calls.pop(key.id, None) is not None:
                self._write(data)

    def _read(self) -> _CallStoreFile:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return _CallStoreFile()
        try:
            data = _CallStoreFile.model_validate_json(text)
        except ValidationError:
            raise CallStoreError(
                f"{self.path} is unreadable; move it away to start afresh (calls still running "
                "on Modal would then be started a second time)"
            ) from None
        if data.format != CALL_STORE_FORMAT:
            raise CallStoreError(f"{self.path}: unknown format {data.format}")
        return data

    def _write(self, data: _CallStoreFile) -> None:
        write_atomically(self.path, data.model_dump_json(indent=1))


# --------------------------------------------------------------------------------------------
# Attach or spawn: the decision, pure
# --------------------------------------------------------------------------------------------


class CallState(StrEnum):
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    EXPIRED = "expired"


@dataclass(frozen=True)
class Poll:
    """What one look at a call found. `error` is the remote exception of a failed call."""

    state: CallState
    result: Any = None
    error: BaseException | None = None


Probe = Callable[[str], Poll]


@dataclass(frozen=True)
class Decision:
    action: Literal["spawn", "attach", "use-result"]
    reason: str
    call_id: str | None = None
    result: Any = None


def attach_or_spawn(record: CallRecord | None, probe: Probe) -> Decision:
    """Whether to start a call, wait for the recorded one, or take its finished result."""
    if record is None:
        return Decision("spawn", "no call on record")
    poll = probe(record.call_id)
    if poll.state is CallState.RUNNING:
        return Decision("attach", f"call {record.call_id} is still running", record.call_id)
    if poll.state is CallState.SUCCEEDED:
        return Decision(
            "use-result", f"call {record.call_id} finished", record.call_id, poll.result
        )
    if poll.state is CallState.EXPIRED:
        return Decision("spawn", f"the output of call {record.call_id} has expired")
    return Decision("spawn", f"call {record.call_id} failed: {one_line(poll.error)}")


class _Gettable(Protocol):
    def get(self, timeout: float | None = None) -> Any: ...


# Trouble on the orchestrator's side of Modal: re-raised, never read as "the call failed" (which
# would start a second job).
LOCAL_MODAL_ERRORS: tuple[type[BaseException], ...] = (
    modal.exception.AuthError,
    modal.exception.ConnectionError,
    modal.exception.ClientClosed,
    modal.exception.VersionError,
)


def probe_call(call: _Gettable, timeout: float = 0) -> Poll:
    """One look at a modal.FunctionCall: `get(timeout)` raises the built-in TimeoutError while
    the call runs, OutputExpiredError once its output is gone (7 days), and the remote
    exception (or FunctionTimeoutError) if it failed."""
    try:
        result = call.get(timeout=timeout)
    except modal.exception.OutputExpiredError:
        return Poll(CallState.EXPIRED)
    except modal.exception.NotFoundError:
        return Poll(CallState.EXPIRED)  # an unknown call id: nothing to wait for
    except TimeoutError as exc:
        # Modal raises a bare TimeoutError(); a remote function that itself timed out on a
        # socket raises one with a message, and that call has finished, failed.
        if type(exc) is TimeoutError and not exc.args:
            return Poll(CallState.RUNNING)
        return Poll(CallState.FAILED, error=exc)
    except LOCAL_MODAL_ERRORS:
        raise
    except (Exception, modal.exception.InputCancellation) as exc:
        return Poll(CallState.FAILED, error=exc)
    return Poll(CallState.SUCCEEDED, result=result)


# --------------------------------------------------------------------------------------------
# The gateway: everything that talks to Modal
# --------------------------------------------------------------------------------------------


class Gateway(Protocol):
    def deploy(self, app: modal.App) -> None: ...

    def spawn(self, app_name: str, function: str, *args: Any) -> str:
        """Start a call on a deployed App; its call id."""
        ...

    def call(self, app_name: str, function: str, *args: Any) -> Any:
        """Run a short call on a deployed App and return its result."""
        ...

    def poll(self, call_id: str, timeout: float = 0) -> Poll: ...

    def read_volume_file(self, volume: str, path: str) -> bytes | None:
        """A small file from a volume, or None if it is not there."""
        ...

    def deployed_apps(self) -> list[str]:
        """Names of the deployed (not stopped) Apps of the environment."""
        ...

    def server_url(self, app_name: str, server_name: str) -> str | None:
        """The URL of a deployed App's Server."""
        ...

    def stop_app(self, app_name: str) -> None:
        """Stop a deployed App (its containers get SIGTERM and their exit grace); no error
        when there is no such App."""
        ...

    def dict(self, name: str) -> modal_app.KeyValue:
        """A named modal.Dict, created if missing."""
        ...


class ModalGateway:
    def __init__(self, environment: str | None = None) -> None:
        self.environment = environment

    def deploy(self, app: modal.App) -> None:
        # A no-op deploy does not bump the version; a changed one rolls the App.
        app.deploy(environment_name=self.environment)

    def _function(self, app_name: str, function: str) -> modal.Function:
        return modal.Function.from_name(app_name, function, environment_name=self.environment)

    def spawn(self, app_name: str, function: str, *args: Any) -> str:
        return self._function(app_name, function).spawn(*args).object_id

    def call(self, app_name: str, function: str, *args: Any) -> Any:
        return self._function(app_name, function).remote(*args)

    def poll(self, call_id: str, timeout: float = 0) -> Poll:
        return probe_call(modal.FunctionCall.from_id(call_id), timeout)

    def read_volume_file(self, volume: str, path: str) -> bytes | None:
        handle = modal.Volume.from_name(volume, environment_name=self.environment)
        try:
            return b"".join(handle.read_file(path))
        except (FileNotFoundError, modal.exception.NotFoundError):
            return None

    def deployed_apps(self) -> list[str]:
        # For a deployed App, the listing's name (its description) is the App's name.
        apps = modal.experimental.list_deployed_apps(environment_name=self.environment or "")
        return [app.name for app in apps]

    def server_url(self, app_name: str, server_name: str) -> str | None:
        server = modal.Server.from_name(app_name, server_name, environment_name=self.environment)
        return server.get_url()

    def stop_app(self, app_name: str) -> None:
        try:
            app = modal.App.lookup(app_name, environment_name=self.environment)
        except modal.exception.NotFoundError:
            return
        app.stop()

    def dict(self, name: str) -> modal_app.KeyValue:
        return modal.Dict.from_name(name, environment_name=self.environment, create_if_missing=True)


# --------------------------------------------------------------------------------------------
# The platform
# --------------------------------------------------------------------------------------------


def shard_count(
    files: Sequence[FileEntry],
    *,
    min_files: int = SHARD_MIN_FILES,
    min_bytes: int = SHARD_MIN_BYTES,
    bytes_per_shard: int = BYTES_PER_SHARD,
    max_shards: int = MAX_SHARDS,
) -> int:
    """1 for one container; more above either threshold, about `bytes_per_shard` each."""
    total = sum(entry.size for entry in files)
    if len(files) <= min_files and total <= min_bytes:
        return 1
    return max(2, min(max_shards, len(files), math.ceil(total / bytes_per_shard)))


@dataclass(frozen=True)
class _Started:
    key: CallKey
    call_id: str | None
    result: Any = None


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
        # The Hub endpoint of the orchestrator's own cheap calls (resolve, file list, config).
        self.endpoint = endpoint or os.environ.get("HF_ENDPOINT") or None
        self.gateway: Gateway = gateway or ModalGateway(self.environment)
        self.calls = CallStore(self.home / "state" / CALLS_FILE)
        self.shard_min_files = shard_min_files
        self.shard_min_bytes = shard_min_bytes
        self.bytes_per_shard = bytes_per_shard
        self.max_shards = max_shards
        self._sleep = sleep
        self._clock = clock
        # To the routers' and releases' Modal URLs (health, admin API); no request is made
        # until a serving call needs one.
        self._http = http or httpx.Client(follow_redirects=False)
        self._deployed: set[str] = set()
        self._deploy_lock = threading.Lock()
        self._router_urls: dict[str, str] = {}

    @classmethod
    def from_env(cls) -> ModalPlatform:
        return cls()

    # -- preparation --------------------------------------------------------------------------

    def resolve(self, profile: Profile, revision: str) -> str:
        # One cheap HTTP call from the orchestrator; no container.
        return resolve_revision(profile.hub.repo, revision, hf_token(), endpoint=self.endpoint)

    def download(
        self, profile: Profile, revision: str, progress: ProgressCallback | None = None
    ) -> DownloadResult:
        require_commit(revision)
        cached = self._sentinel_on_volume(profile, revision)
        if cached is not None:
            log.info("%s@%s: weights already complete on the volume", profile.name, revision[:8])
            return cached
        hub = profile.hub
        all_files = fetch_files(hub.repo, revision, hf_token(), endpoint=self.endpoint)
        expected = select_files(all_files, hub.allow_patterns, hub.ignore_patterns)
        if not expected:
            raise WeightsError(
                f"{hub.repo}@{revision[:8]}: no file matches the allow/ignore patterns"
            )
        total = sum(entry.size for entry in expected)
        count = shard_count(
            expected,
            min_files=self.shard_min_files,
            min_bytes=self.shard_min_bytes,
            bytes_per_shard=self.bytes_per_shard,
            max_shards=self.max_shards,
        )
        app_name = modal_app.weights_app_name(profile)
        report = _DownloadProgress(progress, total)
        report.update(0)
        if count == 1:
            key = self._key("download", profile, revision)
            started = self._start(key, profile, "weights", modal_app.DOWNLOAD_FUNCTION, revision)
            result = DownloadResult.model_validate(self._finish(started, "download"))
            report.update(total)
            return result

        # Sorted by path first: the same revision gives the same plan on every run, so a
        # restarted orchestrator finds its shards' calls under the same keys.
        shards = plan_shards(sorted(expected, key=lambda e: e.path), count)
        files = [entry.model_dump(mode="json") for entry in all_files]
        sizes = {entry.path: entry.size for entry in expected}
        log.info("%s@%s: %d files, %.1f GiB in %d shards", profile.name, revision[:8],
                 len(expected), total / GiB, len(shards))  # fmt: skip
        started_shards = []
        for index, paths in enumerate(shards):
            key = self._key("download-shard", profile, revision, f"{index + 1}-of-{len(shards)}")
            started_shards.append(
                (
                    self._start(
                        key, profile, "weights", modal_app.DOWNLOAD_FUNCTION, revision, paths, files
                    ),
                    sum(sizes[path] for path in paths),
                )
            )
        results = self._finish_all(started_shards, report)
        merged = self.gateway.call(app_name, modal_app.MERGE_FUNCTION, revision, results, files)
        report.update(total)
        return DownloadResult.model_validate(merged)

    def compile(self, profile: Profile, revision: str) -> CompileResult:
        require_commit(revision)
        if not profile.deepgemm or profile.volumes.deepgemm is None:
            return CompileResult.not_required()
        key = self._cache_key(profile, revision)
        marker = self._marker_on_volume(profile, key)
        if marker is not None:
            log.info("%s: DeepGEMM kernels for key %s are already compiled", profile.name, key)
            return CompileResult(
                status="cached", reason="marker found", key=key, marker=marker, seconds=0.0
            )
        call_key = self._key("compile", profile, revision, key)
        started = self._start(call_key, profile, "compile", modal_app.COMPILE_FUNCTION, revision)
        return CompileResult.model_validate(self._finish(started, "compile"))

    def verify(self, profile: Profile, revision: str) -> VerifyResult:
        # Not spawned: re-hashing the volume is minutes, and a fresh verification is the point
        # of this stage, so a rerun verifies again rather than reusing an old call's result.
        require_commit(revision)
        self._ensure_deployed(profile, "weights")
        result = self.gateway.call(
            modal_app.weights_app_name(profile), modal_app.VERIFY_FUNCTION, revision
        )
        return VerifyResult.model_validate(result)

    # -- serving ------------------------------------------------------------------------------

    def deploy(self, profile: Profile, revision: str) -> Release:
        """The release App deployed (once: a running release is never rolled by a re-run),
        healthy through its Modal URL, and registered with the router at weight 0. The
        container's own @modal.enter already ran the probes: a release that fails them never
        answers 200. On failure an App this call deployed is stopped again: DeployFailed."""
        require_commit(revision)
        rid = release_id(profile, revision)
        app_name = modal_app.release_app_name(profile, revision)
        self.router_url(profile)  # the router first: it fails before a GPU is paid for
        deployed_now = False
        if app_name not in self.gateway.deployed_apps():
            log.info("deploying Modal app %s", app_name)
            self.gateway.deploy(modal_app.build_release_app(profile, revision).app)
            deployed_now = True
        try:
            url = self._server_url(app_name, modal_app.SERVER_NAME)
            self._wait_healthy(profile, rid, url)
            release = self._stored_release(profile, rid)
            if release is None or release.url != url or release.revision != revision:
                release = Release(
                    model=profile.name, revision=revision, id=rid, url=url,
                    deployed_at=datetime.now(UTC),
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

    def set_traffic(self, profile: Profile, weights: dict[str, int]) -> None:
        """Route `weights` (release id → percent) to the model's running releases; a running
        release not named gets 0, one not running is left out (a rollback must still zero a
        dead canary). Written to the model's Dict (the router's source, read every second)
        and pushed to the router's admin API so it applies at once."""
        backends = traffic_backends(
            profile, weights, self.running_releases(profile), _key_env(profile)
        )
        self._model_routes(profile).set(backends)

    def retire(self, profile: Profile, release: Release, drain_seconds: float) -> None:
        """Out of routing, then wait until the router counts no request in flight to it (or
        the deadline), then stop its App; the container's exit handler drains the engine
        within the exit grace period. Idempotent."""
        deadline = self._clock() + drain_seconds
        routes = self._model_routes(profile)
        unrouted = routes.take_out(release.id)
        drain(routes.router, routes.model, release.id, deadline, unrouted=unrouted,
              poll_seconds=RETIRE_POLL_SECONDS, clock=self._clock, sleep=self._sleep)  # fmt: skip
        self.gateway.stop_app(modal_app.release_app_name(profile, release.revision))
        log.info("%s: retired", release.id)

    def router_url(self, profile: Profile) -> str:
        """The model's router URL; its App is deployed first if it is not running. A running
        router is never redeployed from here: a redeploy restarts its single container, and
        its measurements with it, perhaps in the middle of someone's canary."""
        with self._deploy_lock:
            url = self._router_urls.get(profile.name)
            if url is None:
                name = modal_app.router_app_name(profile)
                if name not in self.gateway.deployed_apps():
                    log.info("deploying Modal app %s", name)
                    self.gateway.deploy(modal_app.build_router_app(profile).app)
                url = self._server_url(name, modal_app.ROUTER_NAME)
                self._router_urls[profile.name] = url
        return url

    def stats(self, profile: Profile, since: float) -> dict[str, Any]:
        """GET /admin/stats of the model since `since` (unix time): per-backend requests,
        errors, TTFT and latency percentiles, in-flight counts and weights."""
        return self._router_client(profile).stats(profile.served_model_name, since)

    def running_releases(self, profile: Profile) -> list[Release]:
        """The model's deployed release Apps (`<model>-<rev8>`), whoever deployed them. A
        release deployed here is described by its record in the model's Dict; one without a
        record gets its URL from Modal and its 8-hex revision prefix."""
        pattern = re.compile(rf"{re.escape(profile.name)}-[0-9a-f]{{{RELEASE_ID_HEX}}}")
        releases = []
        for name in sorted(self.gateway.deployed_apps()):
            if not pattern.fullmatch(name):
                continue
            release = self._stored_release(profile, name)
            if release is None:
                url = self.gateway.server_url(name, modal_app.SERVER_NAME)
                if not url:
                    log.warning("%s: deployed, but Modal gives it no URL", name)
                    continue
                release = Release(
                    model=profile.name, revision=name.rsplit("-", 1)[1], id=name,
                    url=url.rstrip("/"), deployed_at=datetime.now(UTC),
                )  # fmt: skip
            releases.append(release)
        return releases

    def ask(self, profile: Profile, release_id: str, chat: dict[str, Any]) -> dict[str, Any]:
        return self._router_client(profile).ask(release_id, chat)

    def release_store(self) -> ReleaseStore:
        return DictReleaseStore(self.gateway.dict(modal_app.RELEASES_DICT_NAME))

    def reconcile_orphans(self) -> list[str]:
        # Nothing is tied to an orchestrator process: releases and routers are Modal apps that
        # serve on, and a half-finished canary is reverted from the release record.
        return []

    def shutdown(self) -> None:
        # Nothing to stop: spawned preparation calls are meant to outlive this process, so a
        # restarted orchestrator can re-attach to them; releases and routers serve on.
        return None

    # -- serving internals ----------------------------------------------------------------------

    def _routes(self, profile: Profile) -> modal_app.KeyValue:
        return self.gateway.dict(modal_app.routes_dict_name(profile))

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

    # -- calls --------------------------------------------------------------------------------

    def _key(self, stage: Stage, profile: Profile, revision: str, detail: str = "") -> CallKey:
        return CallKey(
            stage=stage,
            model=profile.name,
            revision=revision,
            detail=detail,
            environment=self.environment or "",
        )

    def _start(
        self,
        key: CallKey,
        profile: Profile,
        app_kind: Literal["weights", "compile"],
        function: str,
        *args: Any,
    ) -> _Started:
        """Attach to the recorded call, take its result, or spawn one and record it."""
        record = self.calls.get(key)
        decision = attach_or_spawn(record, self.gateway.poll)
        log.info("%s %s@%s: %s", key.stage, key.model, key.revision[:8], decision.reason)
        if decision.action == "attach":
            return _Started(key, decision.call_id)
        if decision.action == "use-result":
            return _Started(key, None, decision.result)
        app_name = self._ensure_deployed(profile, app_kind)
        call_id = self.gateway.spawn(app_name, function, *args)
        # Recorded at once: from here a restarted orchestrator re-attaches. (A crash between
        # the spawn and this write is the one window in which a retry starts a second call.)
        self.calls.put(
            CallRecord(
                key=key,
                call_id=call_id,
                app=app_name,
                function=function,
                spawned_at=datetime.now(UTC),
            )
        )
        log.info("%s %s@%s: spawned call %s", key.stage, key.model, key.revision[:8], call_id)
        return _Started(key, call_id)

    def _finish(self, started: _Started, what: str) -> Any:
        """Wait for one call (long-polling) and return its result."""
        if started.call_id is None:
            return started.result
        began = time.monotonic()
        while True:
            poll = self.gateway.poll(started.call_id, WAIT_POLL_SECONDS)
            if poll.state is not CallState.RUNNING:
                return self._outcome(started, poll, what)
            log.info("%s: waiting for call %s (%.0f min)", what, started.call_id,
                     (time.monotonic() - began) / 60)  # fmt: skip

    def _finish_all(
        self, started: Sequence[tuple[_Started, int]], report: _DownloadProgress
    ) -> list[Any]:
        """Wait for several calls (the shards), reporting bytes as each one finishes. The first
        failure is raised at once; the other calls run on and are re-attached on retry."""
        results: dict[int, Any] = {}
        done_bytes = 0
        for index, (item, size) in enumerate(started):
            if item.call_id is None:
                results[index] = item.result
                done_bytes += size
        report.update(done_bytes)
        while len(results) < len(started):
            progressed = False
            for index, (item, size) in enumerate(started):
                if index in results:
                    continue
                assert item.call_id is not None
                poll = self.gateway.poll(item.call_id, 0)
                if poll.state is CallState.RUNNING:
                    continue
                results[index] = self._outcome(item, poll, f"download shard {item.key.detail}")
                done_bytes += size
                progressed = True
            if progressed:
                report.update(done_bytes)
            elif len(results) < len(started):
                self._sleep(SHARDS_POLL_INTERVAL)
        return [results[index] for index in range(len(started))]

    def _outcome(self, started: _Started, poll: Poll, what: str) -> Any:
        if poll.state is CallState.SUCCEEDED:
            return poll.result
        if poll.state is CallState.EXPIRED:
            raise ModalCallError(f"{what}: the output of call {started.call_id} has expired")
        # The record stays: the next attempt probes it, sees the failure and spawns anew.
        raise ModalCallError(
            f"{what}: call {started.call_id} failed: {one_line(poll.error)}"
        ) from poll.error

    def _ensure_deployed(self, profile: Profile, app_kind: Literal["weights", "compile"]) -> str:
        """Deploy the App once per process: the first spawn deploys the code and profiles of
        this checkout; later ones reuse it."""
        if app_kind == "weights":
            name, build = modal_app.weights_app_name(profile), modal_app.build_weights_app
        else:
            name, build = modal_app.compile_app_name(profile), modal_app.build_compile_app
        with self._deploy_lock:
            if name not in self._deployed:
                log.info("deploying Modal app %s", name)
                self.gateway.deploy(build(profile).app)
                self._deployed.add(name)
        return name

    # -- what the volumes already hold ----------------------------------------------------------

    def _sentinel_on_volume(self, profile: Profile, revision: str) -> DownloadResult | None:
        """The weights sentinel read straight from the volume: a proven download starts no
        container. The same acceptance rule as serving.weights.download_repo."""
        relative = weights_dir(PurePosixPath("/"), profile, revision) / SENTINEL_NAME
        raw = self.gateway.read_volume_file(profile.volumes.weights, str(relative))
        if raw is None:
            return None
        try:
            manifest = Manifest.model_validate_json(raw)
        except ValidationError:
            return None
        hub = profile.hub
        if (manifest.repo, manifest.revision) != (hub.repo, revision) or [
            manifest.allow_patterns,
            manifest.ignore_patterns,
        ] != [hub.allow_patterns, hub.ignore_patterns]:
            return None
        return DownloadResult(
            directory=Path(weights_dir(WEIGHTS_MOUNT, profile, revision)),
            manifest=manifest,
            cached=True,
        )

    def _marker_on_volume(self, profile: Profile, key: str) -> str | None:
        assert profile.volumes.deepgemm is not None
        relative = marker_path(Path(deepgemm_dir(PurePosixPath("/"), profile)), key)
        raw = self.gateway.read_volume_file(profile.volumes.deepgemm, str(relative))
        if raw is None or parse_marker(raw) is None:
            return None
        return str(marker_path(Path(deepgemm_dir(modal_app.DEEPGEMM_MOUNT, profile)), key))

    def _cache_key(self, profile: Profile, revision: str) -> str:
        """The DeepGEMM cache key, from the revision's config.json fetched here (one small
        download, kept): the compile call is keyed by it before it starts."""
        directory = fetch_model_config(
            profile.hub.repo,
            revision,
            self.home / "state" / CONFIGS_DIR / profile.hub.repo / revision,
            token=hf_token(),
            endpoint=self.endpoint,
        )
        return deepgemm_cache_key(profile, (directory / "config.json").read_bytes())


class _DownloadProgress:
    """Bytes of finished calls as Progress reports: the containers' own progress stays in
    their logs."""

    def __init__(self, callback: ProgressCallback | None, total: int) -> None:
        self.callback = callback
        self.total = total
        self.began = time.monotonic()

    def update(self, done: int) -> None:
        if self.callback is None:
            return
        elapsed = time.monotonic() - self.began
        rate = done / elapsed if elapsed > 0 and done else 0.0
        eta = (self.total - done) / rate if rate > 0 else None
        self.callback(
            Progress(
                phase="download",
                bytes_done=done,
                bytes_total=self.total,
                rate_bytes_per_s=rate,
                eta_s=eta,
            )
        )


def _release_key(rid: str) -> str:
    return f"{modal_app.RELEASE_KEY_PREFIX}{rid}"


def _key_env(profile: Profile) -> str | None:
    """Where the router finds a release's key: its container's environment, from the same
    Modal Secret. The Dict holds the variable's name, never the key."""
    return modal_app.API_KEY_ENV if profile.secrets.api_key else None


def _admin_token() -> str:
    token = os.environ.get(modal_app.ROUTER_ADMIN_TOKEN_ENV)
    if not token:
        raise RouterUnreachable(
            f"{modal_app.ROUTER_ADMIN_TOKEN_ENV} is not set: the router's admin API is out of "
            f"reach (the same value as in the Modal Secret {modal_app.ROUTER_ADMIN_SECRET!r})"
        )
    return token
