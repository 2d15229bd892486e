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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import modal

from serving.deepgemm import CompileFailed, compile_kernels
from serving.layout import (
    DEEPGEMM_MOUNT,
    WEIGHTS_MOUNT,
    compile_model_dir,
    deepgemm_dir,
    weights_dir,
)
from serving.profile import Profile, load_profile, models_dir
from serving.verification import verify_revision
from serving.weights import (
    DownloadResult,
    FileEntry,
    ShardResult,
    download_files,
    fetch_files,
    fetch_model_config,
    merge,
    select_files,
)
from serving.weights import download as download_revision

log = logging.getLogger(__name__)

MINUTES = 60
HOURS = 60 * MINUTES

PYTHON_VERSION = "3.11"
ENGINE_PORT = 8000
ROUTER_PORT = 8000

# Environment variable names inside containers; the Modal Secrets must hold these keys.
HF_TOKEN_ENV = "HF_TOKEN"
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
COMPILE_TIMEOUT = 3 * HOURS
# compile_deep_gemm gives up first, so its own log says why rather than a Modal timeout.
COMPILE_CHILD_TIMEOUT = COMPILE_TIMEOUT - 10 * MINUTES
# A release container lives as long as Modal lets it; replacement is Modal's job.
SERVER_TIMEOUT = 24 * HOURS
# Modal caps a server's exit grace period at one hour.
MAX_EXIT_GRACE = 1 * HOURS


def _with_project(image: modal.Image) -> modal.Image:
    """The `serving` package (with its SGLang flag tables) and the profiles, in /root."""
    return (
        image.add_local_python_source("serving", ignore=["**/__pycache__", "**/*.pyc"])
        .add_local_dir(models_dir(), CONTAINER_MODELS_DIR)
        .env({"ROLLOUT_MODELS_DIR": CONTAINER_MODELS_DIR})
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
    return f"{profile.name}-{revision[:8]}"


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


def container_token() -> str | None:
    """The HF token the Modal Secret puts in the environment; passed on, never logged."""
    return os.environ.get(HF_TOKEN_ENV) or None


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
            token=container_token(),
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
            token=container_token(),
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
            token=container_token(),
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
            timeout_seconds=COMPILE_CHILD_TIMEOUT,
            token=container_token(),
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


def build_release_app(profile: Profile, revision: str) -> ReleaseApp:
    """One App per release, so a canary and the stable release scale and stop independently."""
    app = modal.App(release_app_name(profile, revision))
    volumes = {WEIGHTS_MOUNT: weights_volume(profile).read_only()}
    if profile.deepgemm:
        volumes[DEEPGEMM_MOUNT] = deepgemm_volume(profile).read_only()

    class Server:
        @modal.enter()
        def start(self) -> None:
            raise NotImplementedError("the release Server body lands with the serving issue")

    scaling = profile.scaling
    snapshot = profile.engine.memory_snapshot
    server = app.server(
        image=engine_image(profile),
        gpu=profile.resources.modal_gpu,
        volumes=volumes,
        secrets=api_key_secrets(profile),
        cpu=profile.resources.cpu,
        memory=profile.resources.memory_mib,
        port=ENGINE_PORT,
        startup_timeout=int(profile.startup_budget_seconds),
        exit_grace_period=int(min(profile.canary.retire_grace_seconds, MAX_EXIT_GRACE)),
        min_containers=scaling.min_containers,
        max_containers=scaling.max_containers,
        target_concurrency=scaling.target_inputs,
        max_concurrency=scaling.max_inputs,
        scaledown_window=scaling.scaledown_window_seconds,
        enable_memory_snapshot=snapshot,
        experimental_options={"enable_gpu_snapshot": True} if snapshot else None,
        serialized=True,
        name="Server",
    )(Server)
    return ReleaseApp(app=app, server=server, revision=revision)


def build_router_app(profile: Profile) -> RouterApp:
    """The router for one model: CPU, always on, exactly one container, because the canary
    gates compare measurements that must all be taken in one place."""
    app = modal.App(f"{profile.name}-router")
    routes = modal.Dict.from_name(routes_dict_name(profile), create_if_missing=True)

    class Router:
        @modal.enter()
        def start(self) -> None:
            raise NotImplementedError("the router body lands with the serving issue")

    server = app.server(
        image=router_image(),
        secrets=[modal.Secret.from_name(ROUTER_ADMIN_SECRET), *api_key_secrets(profile)],
        cpu=2.0,
        memory=2 * 1024,
        port=ROUTER_PORT,
        startup_timeout=2 * MINUTES,
        exit_grace_period=5 * MINUTES,
        min_containers=1,
        max_containers=1,
        serialized=True,
        name="Router",
    )(Router)
    return RouterApp(app=app, server=server, routes=routes)
