"""Modal resources for a profile: images, volumes, secrets, and the Apps that run in them.

Any change to an App redeploys every function in it, so each job kind gets its own App:

    <model>-weights   download (CPU; big repos one spawned call per shard), merge, verify
    <model>-compile   DeepGEMM precompile on the profile's GPUs
    <model>-<rev8>    one per release: the Server running the engine supervisor
    <model>-router    the canary router (CPU, always on), weights read from a modal.Dict

Stable and canary are two release Apps of the same class: a promotion moves traffic, it never
reloads weights, and a rollback is a weight flip.

Everything here builds offline (no Modal token): tests assert the specs with `.info()`.
The Apps are built by factories, one per profile and revision, so every decorator passes
`serialized=True`: containers unpickle the function (a thin closure over the profile's name
and volume names) instead of finding it in this module; the bodies it calls live here.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import TYPE_CHECKING, Any, Protocol

import modal

from serving.config.layout import (
    DEEPGEMM_MOUNT,
    WEIGHTS_MOUNT,
    compile_model_dir,
    deepgemm_dir,
    weights_dir,
)
from serving.config.loader import load_profile, models_dir
from serving.config.profile import Profile
from serving.domain.release import release_id
from serving.engines.deepgemm import COMPILE_TIMEOUT_SECONDS, CompileFailed, compile_kernels
from serving.engines.engine import engine_command, request_model, write_secrets_config
from serving.engines.sglang import Command
from serving.supervisor.supervisor import CrashCallback, Supervisor, exit_process_on_crash
from serving.verification import verify_revision
from serving.weights.download import (
    DownloadResult,
    FileEntry,
    ShardResult,
    download_files,
    fetch_files,
    fetch_model_config,
    hf_token,
    merge,
    read_sentinel,
    select_files,
)
from serving.weights.download import download as download_revision

if TYPE_CHECKING:
    # The router's modules are imported where they run: an engine container never needs them.
    import uvicorn

    from serving.router.config import RouterConfig
    from serving.router.table import RoutingTable

log = logging.getLogger(__name__)

MINUTES = 60
HOURS = 60 * MINUTES

PYTHON_VERSION = "3.11"
ENGINE_PORT = 8000
ROUTER_PORT = 8000

# Environment variable names inside containers; the Modal Secrets must hold these keys.
API_KEY_ENV = "API_KEY"
ROUTER_ADMIN_TOKEN_ENV = "ROUTER_ADMIN_TOKEN"
ROUTER_ADMIN_SECRET = "rollout-router-admin"

# The same pins as the orchestrator's lock file: what runs in a container is what was tested.
WEIGHTS_PACKAGES = [
    "huggingface_hub==2.4.0",
    "hf_xet==1.8.0",
    "httpx==0.28.1",
    "pydantic==2.14.4",
    "pyyaml==6.0.4",
]
ROUTER_PACKAGES = [
    *WEIGHTS_PACKAGES,
    "starlette==1.10.0",
    "uvicorn==0.54.0",
    "prometheus-client==0.26.0",
    "certifi==2026.10.19.post1",
    # serving.router_upstream parses backend responses with httptools; uvloop is the router's
    # measured-faster event loop (serving.router picks it when installed).
    "httptools==0.9.0",
    "uvloop==0.23.0",
]

CONTAINER_MODELS_DIR = "/root/models"

# Downloads of hundreds of GB: hf_xet's high-performance mode wants the memory to go with it.
DOWNLOAD_CPU = 8.0
DOWNLOAD_MEMORY_MIB = 64 * 1024
DOWNLOAD_TIMEOUT = 6 * HOURS
VERIFY_TIMEOUT = 2 * HOURS
VERIFY_MEMORY_MIB = 8 * 1024
# Merging shard results reads no weights: it lists the directory and writes the sentinel.
MERGE_CPU = 1.0
MERGE_MEMORY_MIB = 2 * 1024
MERGE_TIMEOUT = 15 * MINUTES
# compile_deep_gemm gives up first (COMPILE_TIMEOUT_SECONDS), so its own log says why.
COMPILE_TIMEOUT = COMPILE_TIMEOUT_SECONDS + 10 * MINUTES
# Modal caps a server's exit grace period at one hour.
MAX_EXIT_GRACE = 1 * HOURS
# Of a release's exit grace, what the supervisor keeps for SIGKILL, reaping (its own
# KILL_REAP_SECONDS) and the last log lines after the engine's drain deadline.
EXIT_STOP_MARGIN_SECONDS = 15
# The engine must be healthy this long before Modal's startup_timeout, leaving time for the
# probes and for the supervisor's own error (with the engine's last output) to be raised.
READINESS_MARGIN_SECONDS = 60

# Modal's proxy reaches a container's port from outside its loopback; the supervisor talks to
# the engine over loopback.
ENGINE_BIND_HOST = "0.0.0.0"
SUPERVISOR_HOST = "127.0.0.1"
ROUTER_BIND_HOST = "0.0.0.0"
SERVER_NAME = "Server"
ROUTER_NAME = "Router"

ROUTER_CPU = 2.0
ROUTER_MEMORY_MIB = 2 * 1024
ROUTER_STARTUP_TIMEOUT = 2 * MINUTES
ROUTER_EXIT_GRACE = 5 * MINUTES
# uvicorn lets open requests (streams of minutes) finish within the exit grace, less a margin
# for the thread to wind down before Modal kills the container.
ROUTER_STOP_MARGIN_SECONDS = 15
ROUTER_DRAIN_SECONDS = ROUTER_EXIT_GRACE - ROUTER_STOP_MARGIN_SECONDS
ROUTER_START_SECONDS = 30.0
ROUTER_START_POLL_SECONDS = 0.05
ROUTER_KEEPALIVE_SECONDS = 75
# The platform writes routing to the model's Dict; the router re-reads it this often.
ROUTER_POLL_SECONDS = 1.0
# Keys of a model's routes Dict: the RoutingTable JSON, and one Release JSON per release.
ROUTES_KEY = "routes"
RELEASE_KEY_PREFIX = "release:"
# The release records of every model, one key per model (serving.releases.DictReleaseStore).
RELEASES_DICT_NAME = "rollout-releases"


def _with_project(image: modal.Image) -> modal.Image:
    """The `serving` package (with its SGLang flag tables) and the profiles, in /root.

    The local files come last: Modal refuses, when the image loads at deploy time, any build
    step (`.env` is one) on top of an `add_local_*` layer.
    """
    return (
        image.env({"ROLLOUT_MODELS_DIR": CONTAINER_MODELS_DIR})
        .add_local_python_source("serving", ignore=["**/__pycache__", "**/*.pyc"])
        .add_local_dir(models_dir(), CONTAINER_MODELS_DIR)
    )


def weights_image() -> modal.Image:
    """Slim CPU image for downloads and verification: no CUDA, starts in seconds."""
    base = modal.Image.debian_slim(python_version=PYTHON_VERSION).pip_install(*WEIGHTS_PACKAGES)
    return _with_project(base.env({"HF_XET_HIGH_PERFORMANCE": "1"}))


def engine_image(profile: Profile) -> modal.Image:
    """The SGLang image pinned by tag, plus what the supervisor needs."""
    if profile.engine.image is None:
        raise ValueError(f"{profile.name}: engine {profile.engine.kind} has no container image")
    base = (
        modal.Image.from_registry(profile.engine.image)
        .entrypoint([])  # the image's entrypoint prints a banner and nothing useful
        .pip_install("httpx==0.28.1", "pydantic==2.14.4", "pyyaml==6.0.4")
    )
    return _with_project(base)


def router_image() -> modal.Image:
    base = modal.Image.debian_slim(python_version=PYTHON_VERSION).pip_install(*ROUTER_PACKAGES)
    return _with_project(base)


def weights_volume(profile: Profile) -> modal.Volume:
    # v2: many containers of a sharded download write distinct files concurrently.
    return modal.Volume.from_name(profile.volumes.weights, create_if_missing=True, version=2)


def deepgemm_volume(profile: Profile) -> modal.Volume:
    if profile.volumes.deepgemm is None:
        raise ValueError(f"{profile.name} has no DeepGEMM cache volume")
    return modal.Volume.from_name(profile.volumes.deepgemm, create_if_missing=True)


def hf_secrets(profile: Profile) -> list[modal.Secret]:
    return [modal.Secret.from_name(profile.secrets.hf_token)] if profile.secrets.hf_token else []


def api_key_secrets(profile: Profile) -> list[modal.Secret]:
    return [modal.Secret.from_name(profile.secrets.api_key)] if profile.secrets.api_key else []


def release_app_name(profile: Profile, revision: str) -> str:
    # The App and the router's backend share the release id: listing Apps lists releases.
    return release_id(profile, revision)


def routes_dict_name(profile: Profile) -> str:
    return f"{profile.name}-routes"


# --------------------------------------------------------------------------------------------
# Bodies: what runs inside the weights and compile containers
# --------------------------------------------------------------------------------------------
# Module-level functions with the roots and volumes as arguments. The Modal functions below are
# thin closures that pass the mounts; tests call these with a temporary directory, a fake
# volume and the local mirror as `endpoint`. Each returns a JSON-ready dict, so a spawned call's
# result never needs this package's classes to be unpickled by whoever reads it.


class Syncable(Protocol):
    """What a body needs of a mounted modal.Volume."""

    def reload(self) -> None: ...

    def commit(self) -> None: ...


def mounted_volume(name: str) -> modal.Volume:
    # By name: the closures carry only strings into the container (an unhydrated Volume object
    # cannot be pickled), and the lookup finds the volume the function mounts.
    return modal.Volume.from_name(name)


def _quiet_hub() -> None:
    # tqdm bars in container logs are noise; serving.weights logs its own progress lines.
    from huggingface_hub.utils import disable_progress_bars

    disable_progress_bars()


def _commit_keeping_error(volume: Syncable) -> None:
    """Commit while an exception is propagating: a failed commit must not hide the cause."""
    try:
        volume.commit()
    except Exception as exc:  # the original error is the one worth raising
        log.warning("volume commit after a failure failed too: %s", type(exc).__name__)


def download_body(
    profile: Profile,
    revision: str,
    *,
    root: Path,
    volume: Syncable,
    paths: list[str] | None = None,
    files: list[dict[str, Any]] | None = None,
    token: str | None = None,
    endpoint: str | None = None,
) -> dict[str, Any]:
    """The whole revision (`paths` None: DownloadResult, sentinel written) or one shard of it
    (ShardResult, no sentinel: `merge_body` writes it once all shards are in).

    `files` is the revision's file list as the orchestrator fetched it, so N shards do not
    make N metadata calls.
    """
    _quiet_hub()
    volume.reload()
    try:
        result: DownloadResult | ShardResult
        if paths is None:
            result = download_revision(
                profile, revision, root, token=token, endpoint=endpoint, high_performance=True
            )
        else:
            result = download_files(
                profile.hub.repo,
                revision,
                weights_dir(root, profile, revision),
                paths,
                token=token,
                endpoint=endpoint,
                high_performance=True,
                files=[FileEntry.model_validate(f) for f in files] if files is not None else None,
            )
    except BaseException:
        # Files that finished are kept for Modal's retry of this input (no sentinel is written,
        # so nothing unverified is ever trusted); the next run removes the partial ones.
        _commit_keeping_error(volume)
        raise
    volume.commit()
    return result.model_dump(mode="json")


def merge_body(
    profile: Profile,
    revision: str,
    shards: list[dict[str, Any]],
    *,
    root: Path,
    volume: Syncable,
    files: list[dict[str, Any]] | None = None,
    token: str | None = None,
    endpoint: str | None = None,
) -> dict[str, Any]:
    """The sentinel of a sharded download, written only if the shards together verified exactly
    the profile's selection of files (serving.weights.merge). Returns a DownloadResult."""
    volume.reload()  # the shards committed their files from other containers
    results = [ShardResult.model_validate(shard) for shard in shards]
    all_files = (
        [FileEntry.model_validate(f) for f in files]
        if files is not None
        else fetch_files(profile.hub.repo, revision, token, endpoint=endpoint)
    )
    hub = profile.hub
    expected = select_files(all_files, hub.allow_patterns, hub.ignore_patterns)
    directory = weights_dir(root, profile, revision)
    manifest = merge(
        directory,
        results,
        expected,
        allow_patterns=hub.allow_patterns,
        ignore_patterns=hub.ignore_patterns,
        revision_paths=[entry.path for entry in all_files],
    )
    volume.commit()
    return DownloadResult(
        directory=directory,
        manifest=manifest,
        cached=False,
        refetched=sorted({path for shard in results for path in shard.refetched}),
        attempts=len(results),
        seconds=(manifest.finished_at - manifest.started_at).total_seconds(),
    ).model_dump(mode="json")


def verify_body(
    profile: Profile,
    revision: str,
    *,
    weights_root: Path,
    weights_volume: Syncable,
    deepgemm_root: Path | None = None,
    deepgemm_volume: Syncable | None = None,
    token: str | None = None,
    endpoint: str | None = None,
) -> dict[str, Any]:
    """Stage 4 on the volume: every file hashed against the sentinel's manifest, bad ones
    re-fetched; the DeepGEMM marker of the current cache key (read-only mount). Returns a
    serving.platform.VerifyResult."""
    _quiet_hub()
    weights_volume.reload()
    if deepgemm_volume is not None:
        deepgemm_volume.reload()
    try:
        result = verify_revision(
            profile,
            revision,
            weights_root=weights_root,
            deepgemm_root=deepgemm_root,
            # On Modal the compile always runs on the profile's GPUs: no marker is a problem.
            compile_required=True,
            token=token,
            endpoint=endpoint,
        )
    except BaseException:
        _commit_keeping_error(weights_volume)
        raise
    weights_volume.commit()  # repaired files, and the fresh sentinel written after a repair
    return result.model_dump(mode="json")


def compile_body(
    profile: Profile,
    revision: str,
    *,
    deepgemm_root: Path,
    deepgemm_volume: Syncable,
    timeout_seconds: int,
    token: str | None = None,
    endpoint: str | None = None,
    **compile_options: Any,
) -> dict[str, Any]:
    """DeepGEMM kernels of a revision into the cache volume (serving.deepgemm.compile_kernels).

    Kernel shapes depend only on config.json, so the compile runs on dummy weights from the
    model's config fetched into the cache volume (layout.compile_model_dir): it does not wait
    for the download. `compile_options` go to compile_kernels (tests inject `run`).
    """
    _quiet_hub()
    deepgemm_volume.reload()
    model_dir = fetch_model_config(
        profile.hub.repo,
        revision,
        compile_model_dir(deepgemm_root, profile, revision),
        token=token,
        endpoint=endpoint,
    )
    if not (model_dir / "config.json").is_file():
        raise CompileFailed(f"{profile.hub.repo}@{revision[:8]}: no config.json in {model_dir}")
    result = compile_kernels(
        profile,
        revision=revision,
        weights_path=model_dir,
        cache_dir=deepgemm_dir(deepgemm_root, profile),
        timeout_seconds=timeout_seconds,
        **compile_options,
    )
    # Only after success: a failed compile may leave half-written kernels that a server would
    # load; the marker, written last, is what says "done".
    deepgemm_volume.commit()
    return result.model_dump(mode="json")


@dataclass(frozen=True)
class WeightsApp:
    app: modal.App
    download: modal.Function
    merge: modal.Function
    verify: modal.Function


@dataclass(frozen=True)
class CompileApp:
    app: modal.App
    compile: modal.Function


@dataclass(frozen=True)
class ReleaseApp:
    app: modal.App
    server: modal.Server
    revision: str


@dataclass(frozen=True)
class RouterApp:
    app: modal.App
    server: modal.Server
    routes: modal.Dict


def weights_app_name(profile: Profile) -> str:
    return f"{profile.name}-weights"


def compile_app_name(profile: Profile) -> str:
    return f"{profile.name}-compile"


# Function names inside the Apps: the orchestrator looks them up with Function.from_name.
DOWNLOAD_FUNCTION = "download"
MERGE_FUNCTION = "merge"
VERIFY_FUNCTION = "verify"
COMPILE_FUNCTION = "compile"


def build_weights_app(profile: Profile) -> WeightsApp:
    app = modal.App(weights_app_name(profile))
    volumes = {WEIGHTS_MOUNT: weights_volume(profile)}
    retries = modal.Retries(max_retries=2, backoff_coefficient=2.0, initial_delay=10.0)
    # The closures carry strings only; the profile is loaded again in the container from the
    # profiles baked into the image (ROLLOUT_MODELS_DIR).
    profile_name = profile.name
    weights_name = profile.volumes.weights
    deepgemm_name = profile.volumes.deepgemm if profile.deepgemm else None

    def download(
        revision: str, paths: list[str] | None = None, files: list[dict] | None = None
    ) -> dict:
        """Download `paths` (all files if None) of a revision into the weights volume."""
        return download_body(
            load_profile(profile_name),
            revision,
            root=Path(WEIGHTS_MOUNT),
            volume=mounted_volume(weights_name),
            paths=paths,
            files=files,
            token=hf_token(),
        )

    def merge_shards(revision: str, shards: list[dict], files: list[dict] | None = None) -> dict:
        """Write the sentinel of a sharded download from its shards' results."""
        return merge_body(
            load_profile(profile_name),
            revision,
            shards,
            root=Path(WEIGHTS_MOUNT),
            volume=mounted_volume(weights_name),
            files=files,
            token=hf_token(),
        )

    def verify(revision: str) -> dict:
        """Verify every file of a revision on the volume against the Hub's metadata."""
        return verify_body(
            load_profile(profile_name),
            revision,
            weights_root=Path(WEIGHTS_MOUNT),
            weights_volume=mounted_volume(weights_name),
            deepgemm_root=Path(DEEPGEMM_MOUNT) if deepgemm_name else None,
            deepgemm_volume=mounted_volume(deepgemm_name) if deepgemm_name else None,
            token=hf_token(),
        )

    download_fn = app.function(
        image=weights_image(),
        volumes=volumes,
        secrets=hf_secrets(profile),
        cpu=DOWNLOAD_CPU,
        memory=DOWNLOAD_MEMORY_MIB,
        timeout=DOWNLOAD_TIMEOUT,
        retries=retries,
        serialized=True,
        name=DOWNLOAD_FUNCTION,
    )(download)
    merge_fn = app.function(
        image=weights_image(),
        volumes=volumes,
        secrets=hf_secrets(profile),  # fetches the file list itself when not given one
        cpu=MERGE_CPU,
        memory=MERGE_MEMORY_MIB,
        timeout=MERGE_TIMEOUT,
        retries=retries,
        serialized=True,
        name=MERGE_FUNCTION,
    )(merge_shards)
    verify_volumes = dict(volumes)
    if profile.deepgemm:
        # Verify checks the compile marker; it never writes kernels.
        verify_volumes[DEEPGEMM_MOUNT] = deepgemm_volume(profile).read_only()
    verify_fn = app.function(
        image=weights_image(),
        volumes=verify_volumes,
        secrets=hf_secrets(profile),
        cpu=DOWNLOAD_CPU,
        memory=VERIFY_MEMORY_MIB,
        timeout=VERIFY_TIMEOUT,
        retries=retries,
        serialized=True,
        name=VERIFY_FUNCTION,
    )(verify)
    return WeightsApp(app=app, download=download_fn, merge=merge_fn, verify=verify_fn)


def build_compile_app(profile: Profile) -> CompileApp:
    if not profile.deepgemm:
        raise ValueError(f"{profile.name} does not precompile DeepGEMM kernels")
    app = modal.App(compile_app_name(profile))
    profile_name = profile.name
    cache_volume = deepgemm_volume(profile)  # raises without a cache volume in the profile
    deepgemm_name = str(profile.volumes.deepgemm)

    def compile_deep_gemm(revision: str) -> dict:
        """Precompile DeepGEMM kernels for a revision into the cache volume."""
        return compile_body(
            load_profile(profile_name),
            revision,
            deepgemm_root=Path(DEEPGEMM_MOUNT),
            deepgemm_volume=mounted_volume(deepgemm_name),
            timeout_seconds=COMPILE_TIMEOUT_SECONDS,
            token=hf_token(),
        )

    compile_fn = app.function(
        image=engine_image(profile),
        gpu=profile.resources.modal_gpu,
        # Only the cache volume: the compile runs on dummy weights from the model's config,
        # which it fetches into that volume itself, so it never waits for the download.
        volumes={DEEPGEMM_MOUNT: cache_volume},
        secrets=hf_secrets(profile),
        cpu=profile.resources.cpu,
        memory=profile.resources.memory_mib,
        timeout=COMPILE_TIMEOUT,
        # Retries belong to the Prefect task (backoff, visibility); a Modal retry on top would
        # silently start a second 8-GPU job.
        retries=0,
        serialized=True,
        name=COMPILE_FUNCTION,
    )(compile_deep_gemm)
    return CompileApp(app=app, compile=compile_fn)


# --------------------------------------------------------------------------------------------
# Bodies: what runs inside a release container and the router container
# --------------------------------------------------------------------------------------------
# The Server classes below are thin: each lifecycle method calls one of these functions with
# the mounts and the environment, so tests run them here against a temporary directory, the
# FAKE engine and a plain dict standing in for the modal.Dict.


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


def _reload_read_only(volumes: Sequence[Syncable]) -> None:
    # modal 1.6.4 allows reload() on a read_only() mount (only writes check the flag client
    # side). A fresh container already mounts the latest commit, so a failed reload is worth a
    # warning, not a lost container.
    for volume in volumes:
        try:
            volume.reload()
        except Exception as exc:
            log.warning("volume reload failed (%s); serving the mounted state", type(exc).__name__)


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
    _reload_read_only(volumes)
    weights = weights_dir(weights_root, profile, revision)
    # Verified weights only: the sentinel is written last, after verification.
    if read_sentinel(Path(weights), profile.hub.repo, revision) is None:
        raise ReleaseStartFailed(
            f"{release_app_name(profile, revision)}: no verified weights at {weights}"
        )
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


class KeyValue(Protocol):
    """What the bodies and the platform need of a modal.Dict (a dict-backed fake in tests)."""

    def get(self, key: str, default: Any = None) -> Any: ...

    def put(self, key: str, value: Any) -> Any: ...


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


# --------------------------------------------------------------------------------------------
# Release and router Apps
# --------------------------------------------------------------------------------------------


def build_release_app(profile: Profile, revision: str) -> ReleaseApp:
    """One App per release, so a canary and the stable release scale and stop independently."""
    app = modal.App(release_app_name(profile, revision))
    volumes = {WEIGHTS_MOUNT: weights_volume(profile).read_only()}
    if profile.deepgemm:
        volumes[DEEPGEMM_MOUNT] = deepgemm_volume(profile).read_only()
    # The closures carry strings only (see build_weights_app); "" means no cache volume.
    profile_name = profile.name
    weights_name = profile.volumes.weights
    deepgemm_name = (
        profile.volumes.deepgemm if profile.deepgemm and profile.volumes.deepgemm else ""
    )
    snapshot = profile.engine.memory_snapshot

    class Server:
        # snap=True for memory-snapshot profiles: the container is snapshotted after this
        # method (engine warmed up, GPU memory released) and later ones start from there.
        @modal.enter(snap=snapshot)
        def start(self) -> None:
            loaded = load_profile(profile_name)
            mounted = [mounted_volume(weights_name)]
            if deepgemm_name:
                mounted.append(mounted_volume(deepgemm_name))
            self.supervisor = start_release(
                loaded,
                revision,
                weights_root=WEIGHTS_MOUNT,
                deepgemm_root=DEEPGEMM_MOUNT if deepgemm_name else None,
                volumes=mounted,
                private_dir=Path(tempfile.mkdtemp(prefix="rollout-engine-")),
                api_key=container_api_key(loaded),
            )

        @modal.enter(snap=False)
        def serve(self) -> None:
            resume_release(self.supervisor)

        @modal.exit()
        def stop(self) -> None:
            stop_release(
                getattr(self, "supervisor", None),
                release_drain_seconds(load_profile(profile_name)),
            )

    scaling = profile.scaling
    server = app.server(
        image=engine_image(profile),
        gpu=profile.resources.modal_gpu,
        volumes=volumes,
        secrets=api_key_secrets(profile),
        cpu=profile.resources.cpu,
        memory=profile.resources.memory_mib,
        port=ENGINE_PORT,
        startup_timeout=int(profile.startup_budget_seconds),
        exit_grace_period=exit_grace_seconds(profile),
        min_containers=scaling.min_containers,
        max_containers=scaling.max_containers,
        target_concurrency=scaling.target_inputs,
        max_concurrency=scaling.max_inputs,
        scaledown_window=scaling.scaledown_window_seconds,
        # The router calls releases through their Modal URLs and can send only the engine's
        # Bearer key, not Modal proxy-auth headers: the engine's API key is the lock.
        unauthenticated=True,
        enable_memory_snapshot=snapshot,
        experimental_options={"enable_gpu_snapshot": True} if snapshot else None,
        serialized=True,
        name=SERVER_NAME,
    )(Server)
    return ReleaseApp(app=app, server=server, revision=revision)


def router_app_name(profile: Profile) -> str:
    return f"{profile.name}-router"


def build_router_app(profile: Profile) -> RouterApp:
    """The router for one model: CPU, always on, exactly one container, because the canary
    gates compare measurements that must all be taken in one place."""
    app = modal.App(router_app_name(profile))
    routes = modal.Dict.from_name(routes_dict_name(profile), create_if_missing=True)
    profile_name = profile.name
    routes_name = routes_dict_name(profile)

    class Router:
        @modal.enter()
        def start(self) -> None:
            loaded = load_profile(profile_name)
            # Created if missing: the router may start before the first routes are written.
            routes = modal.Dict.from_name(routes_name, create_if_missing=True)
            self.router = start_router(router_config(loaded, routes))

        @modal.exit()
        def stop(self) -> None:
            stop_router(getattr(self, "router", None))

    server = app.server(
        image=router_image(),
        secrets=[modal.Secret.from_name(ROUTER_ADMIN_SECRET), *api_key_secrets(profile)],
        cpu=ROUTER_CPU,
        memory=ROUTER_MEMORY_MIB,
        port=ROUTER_PORT,
        startup_timeout=ROUTER_STARTUP_TIMEOUT,
        exit_grace_period=ROUTER_EXIT_GRACE,
        min_containers=1,
        max_containers=1,
        # Clients hold the model's API key and the orchestrator the admin token; OpenAI
        # clients cannot be expected to send Modal proxy-auth headers.
        unauthenticated=True,
        serialized=True,
        name=ROUTER_NAME,
    )(Router)
    return RouterApp(app=app, server=server, routes=routes)
