"""Modal resources for a profile: images, volumes, secrets, and the Apps that run in them.

Any change to an App redeploys every function in it, so each job kind gets its own App:

    <model>-weights   download (CPU, sharded with .map) and verify (CPU)
    <model>-compile   DeepGEMM precompile on the profile's GPUs
    <model>-<rev8>    one per release: the Server running the engine supervisor
    <model>-router    the canary router (CPU, always on), weights read from a modal.Dict

Stable and canary are two release Apps of the same class: a promotion moves traffic, it never
reloads weights, and a rollback is a weight flip.

Everything here builds offline (no Modal token): tests assert the specs with `.info()`.
The Apps are built by factories, one per profile and revision, so every decorator passes
`serialized=True`: containers unpickle the function instead of re-importing this module.
"""

from __future__ import annotations

from dataclasses import dataclass

import modal

from serving.layout import DEEPGEMM_MOUNT, WEIGHTS_MOUNT
from serving.profile import Profile, models_dir

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


@dataclass(frozen=True)
class WeightsApp:
    app: modal.App
    download: modal.Function
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


def build_weights_app(profile: Profile) -> WeightsApp:
    app = modal.App(f"{profile.name}-weights")
    volumes = {WEIGHTS_MOUNT: weights_volume(profile)}
    retries = modal.Retries(max_retries=2, backoff_coefficient=2.0, initial_delay=10.0)

    def download(revision: str, paths: list[str] | None = None) -> dict:
        """Download `paths` (all files if None) of a revision into the weights volume."""
        raise NotImplementedError("the download body lands with the weight-preparation issue")

    def verify(revision: str) -> dict:
        """Verify every file of a revision on the volume against the Hub's metadata."""
        raise NotImplementedError("the verify body lands with the weight-preparation issue")

    download_fn = app.function(
        image=weights_image(),
        volumes=volumes,
        secrets=hf_secrets(profile),
        cpu=DOWNLOAD_CPU,
        memory=DOWNLOAD_MEMORY_MIB,
        timeout=DOWNLOAD_TIMEOUT,
        retries=retries,
        serialized=True,
        name="download",
    )(download)
    verify_fn = app.function(
        image=weights_image(),
        volumes=volumes,
        secrets=hf_secrets(profile),
        cpu=DOWNLOAD_CPU,
        memory=8 * 1024,
        timeout=VERIFY_TIMEOUT,
        retries=retries,
        serialized=True,
        name="verify",
    )(verify)
    return WeightsApp(app=app, download=download_fn, verify=verify_fn)


def build_compile_app(profile: Profile) -> CompileApp:
    if not profile.deepgemm:
        raise ValueError(f"{profile.name} does not precompile DeepGEMM kernels")
    app = modal.App(f"{profile.name}-compile")

    def compile_deep_gemm(revision: str) -> dict:
        """Precompile DeepGEMM kernels for a revision into the cache volume."""
        raise NotImplementedError("the compile body lands with the weight-preparation issue")

    compile_fn = app.function(
        image=engine_image(profile),
        gpu=profile.resources.modal_gpu,
        volumes={
            WEIGHTS_MOUNT: weights_volume(profile).read_only(),
            DEEPGEMM_MOUNT: deepgemm_volume(profile),
        },
        secrets=hf_secrets(profile),
        cpu=profile.resources.cpu,
        memory=profile.resources.memory_mib,
        timeout=COMPILE_TIMEOUT,
        # Retries belong to the Prefect task (backoff, visibility); a Modal retry on top would
        # silently start a second 8-GPU job.
        retries=0,
        serialized=True,
        name="compile",
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
