"""The Modal Apps of a profile, built by one factory each.

Any change to an App redeploys every function in it, so each job kind gets its own App:

    <model>-weights   download (CPU; big repos one spawned call per shard), merge, verify, and
                      the serving config (config and tokenizer) of dummy weights
    <model>-compile   DeepGEMM precompile on the profile's GPUs
    <model>-<rev8>    one per release: the Server running the engine supervisor
    <model>-router    the canary router (CPU, always on), weights read from a modal.Dict

Stable and canary are two release Apps of the same class: a promotion moves traffic, it never
reloads weights, and a rollback is a weight flip.

Everything here builds offline (no Modal token): tests assert the specs with `.info()`.
The Apps are built per profile and revision, so every decorator passes `serialized=True`:
containers unpickle the function (a thin closure over the profile's name and volume names)
and import what it calls by name, from the `serving` package baked into the image
(resources._with_project): the bodies in serving.platforms.modal.bodies and .server_bodies.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import modal

from serving.config.layout import DEEPGEMM_MOUNT, WEIGHTS_MOUNT
from serving.config.loader import load_profile
from serving.config.profile import Profile
from serving.engines.deepgemm import COMPILE_TIMEOUT_SECONDS
from serving.platforms.modal.bodies import (
    compile_body,
    download_body,
    merge_body,
    serving_config_body,
    verify_body,
)
from serving.platforms.modal.resources import (
    COMPILE_FUNCTION,
    COMPILE_TIMEOUT,
    DOWNLOAD_CPU,
    DOWNLOAD_FUNCTION,
    DOWNLOAD_MEMORY_MIB,
    DOWNLOAD_TIMEOUT,
    ENGINE_PORT,
    MERGE_CPU,
    MERGE_FUNCTION,
    MERGE_MEMORY_MIB,
    MERGE_TIMEOUT,
    ROUTER_ADMIN_SECRET,
    ROUTER_CPU,
    ROUTER_EXIT_GRACE,
    ROUTER_MEMORY_MIB,
    ROUTER_NAME,
    ROUTER_PORT,
    ROUTER_STARTUP_TIMEOUT,
    SERVER_NAME,
    SERVING_CONFIG_CPU,
    SERVING_CONFIG_FUNCTION,
    SERVING_CONFIG_MEMORY_MIB,
    SERVING_CONFIG_TIMEOUT,
    VERIFY_FUNCTION,
    VERIFY_MEMORY_MIB,
    VERIFY_TIMEOUT,
    api_key_secrets,
    compile_app_name,
    deepgemm_volume,
    engine_image,
    hf_secrets,
    mounted_volume,
    release_app_name,
    router_app_name,
    router_image,
    routes_dict_name,
    weights_app_name,
    weights_image,
    weights_volume,
)
from serving.platforms.modal.server_bodies import (
    container_api_key,
    exit_grace_seconds,
    release_drain_seconds,
    resume_release,
    router_config,
    start_release,
    start_router,
    stop_release,
    stop_router,
)
from serving.weights.hub import hf_token


@dataclass(frozen=True)
class WeightsApp:
    app: modal.App
    download: modal.Function
    merge: modal.Function
    verify: modal.Function
    serving_config: modal.Function


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

    def serving_config(revision: str) -> dict:
        """Config and tokenizer of a revision, for dummy weights, into the weights volume."""
        return serving_config_body(
            load_profile(profile_name),
            revision,
            root=Path(WEIGHTS_MOUNT),
            volume=mounted_volume(weights_name),
            token=hf_token(),
        )

    def cpu_function(
        fn: Callable[..., dict], *, name: str, cpu: float, memory: int, timeout: int,
        mounts: dict[str, modal.Volume],
    ) -> modal.Function:
        # Every weights function reads the Hub (the HF secret) and is retried by Modal: a CPU
        # container is cheap to run twice, unlike the compile's GPUs.
        return app.function(
            image=weights_image(), volumes=mounts, secrets=hf_secrets(profile), cpu=cpu,
            memory=memory, timeout=timeout, retries=retries, serialized=True, name=name,
        )(fn)  # fmt: skip

    verify_volumes = dict(volumes)
    if profile.deepgemm:
        # Verify checks the compile marker; it never writes kernels.
        verify_volumes[DEEPGEMM_MOUNT] = deepgemm_volume(profile).with_mount_options(read_only=True)
    download_fn = cpu_function(download, name=DOWNLOAD_FUNCTION, cpu=DOWNLOAD_CPU,
                               memory=DOWNLOAD_MEMORY_MIB, timeout=DOWNLOAD_TIMEOUT,
                               mounts=volumes)  # fmt: skip
    # The merge fetches the file list itself when not given one: it needs the secret too.
    merge_fn = cpu_function(merge_shards, name=MERGE_FUNCTION, cpu=MERGE_CPU,
                            memory=MERGE_MEMORY_MIB, timeout=MERGE_TIMEOUT, mounts=volumes)
    verify_fn = cpu_function(verify, name=VERIFY_FUNCTION, cpu=DOWNLOAD_CPU,
                             memory=VERIFY_MEMORY_MIB, timeout=VERIFY_TIMEOUT,
                             mounts=verify_volumes)  # fmt: skip
    config_fn = cpu_function(serving_config, name=SERVING_CONFIG_FUNCTION, cpu=SERVING_CONFIG_CPU,
                             memory=SERVING_CONFIG_MEMORY_MIB, timeout=SERVING_CONFIG_TIMEOUT,
                             mounts=volumes)  # fmt: skip
    return WeightsApp(app=app, download=download_fn, merge=merge_fn, verify=verify_fn,
                      serving_config=config_fn)  # fmt: skip


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


def build_release_app(profile: Profile, revision: str) -> ReleaseApp:
    """One App per release, so a canary and the stable release scale and stop independently.
    A dummy-weights profile gets an App of its own (`<model>-<rev8>-dummy`), serving random
    weights from the config in the volume's dummy directory."""
    app = modal.App(release_app_name(profile, revision))
    volumes = {WEIGHTS_MOUNT: weights_volume(profile).with_mount_options(read_only=True)}
    if profile.deepgemm:
        volumes[DEEPGEMM_MOUNT] = deepgemm_volume(profile).with_mount_options(read_only=True)
    # The closures carry strings only (see build_weights_app); "" means no cache volume.
    profile_name = profile.name
    weights_name = profile.volumes.weights
    deepgemm_name = (
        profile.volumes.deepgemm if profile.deepgemm and profile.volumes.deepgemm else ""
    )
    snapshot = profile.engine.memory_snapshot
    dummy = profile.dummy_weights

    class Server:
        # snap=True for memory-snapshot profiles: the container is snapshotted after this
        # method (engine warmed up, GPU memory released) and later ones start from there.
        @modal.enter(snap=snapshot)
        def start(self) -> None:
            loaded = load_profile(profile_name)
            if dummy:  # the profiles in the image are the real ones
                loaded = loaded.with_dummy_weights()
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


def build_router_app(profile: Profile) -> RouterApp:
    """The router for one model: CPU, always on, up to the profile's `router.replicas`
    containers behind Modal's load balancing. Each publishes its measurements to the routes
    Dict, where the gates merge them (serving.control.measured)."""
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
        max_containers=profile.router.replicas,
        # Clients hold the model's API key and the orchestrator the admin token; OpenAI
        # clients cannot be expected to send Modal proxy-auth headers.
        unauthenticated=True,
        serialized=True,
        name=ROUTER_NAME,
    )(Router)
    return RouterApp(app=app, server=server, routes=routes)
