"""Modal resources of a profile: images, volumes, secrets, and the names things are deployed
under, with the sizes and timeouts of the containers that use them.

Everything here builds offline (no Modal token): a Volume, Secret or Dict is looked up by name
only when an App that uses it is deployed.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

import modal
import modal.exception

from serving.config.loader import models_dir
from serving.config.profile import Profile
from serving.domain.release import release_id
from serving.engines.deepgemm import COMPILE_TIMEOUT_SECONDS

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
    # serving.router.upstream parses backend responses with httptools; uvloop is the router's
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
# Dummy weights: config and tokenizer only, a few MB.
SERVING_CONFIG_CPU = 1.0
SERVING_CONFIG_MEMORY_MIB = 2 * 1024
SERVING_CONFIG_TIMEOUT = 15 * MINUTES
# compile_deep_gemm gives up first (COMPILE_TIMEOUT_SECONDS), so its own log says why.
COMPILE_TIMEOUT = COMPILE_TIMEOUT_SECONDS + 10 * MINUTES
# Modal caps a server's exit grace period at one hour.
MAX_EXIT_GRACE = 1 * HOURS
# Of a release's exit grace, what the supervisor keeps for SIGKILL, reaping (KILL_REAP_SECONDS
# of serving.core.procs) and the last log lines after the engine's drain deadline.
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
# Keys of a model's routes Dict: the RoutingTable JSON, and one Release JSON per release. The
# latter may expire with no harm: whoever reads them needs only the id and URL, which Modal
# gives again for a deployed release App (ModalPlatform.running_releases).
ROUTES_KEY = "routes"
RELEASE_KEY_PREFIX = "release:"
# One snapshot of its measurements per router replica (serving.platforms.modal.stats).
STATS_KEY_PREFIX = "stats:"
# The release records of every model, one file per model (serving.platforms.modal.stores).
STATE_VOLUME_NAME = "rollout-state"
# The records' leases; it held the records themselves before STATE_VOLUME_NAME did.
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


class VolumeVersionMismatch(RuntimeError):
    """A named volume exists with another VolumeFS version than the one asked for."""


# modal.volume._validate_volume_version's message: the only place the SDK reports a mismatch
# (raised as InvalidError when a deploy hydrates the volume).
_VERSION_MISMATCH = re.compile(
    r"Volume '(?P<name>[^']+)' exists but has version v(?P<actual>\d+), "
    r"not v(?P<requested>\d+) as requested"
)


def volume_version_mismatch(error: BaseException) -> VolumeVersionMismatch | None:
    """One line naming the volume and what to do, when `error` is Modal's version mismatch.

    Only the weights volume asks for a version (v2, see weights_volume), so the fix is either
    a new volume name in the profile or deleting the old volume."""
    if not isinstance(error, modal.exception.InvalidError):
        return None
    match = _VERSION_MISMATCH.search(str(error))
    if match is None:
        return None
    name = match["name"]
    return VolumeVersionMismatch(
        f"Modal volume {name!r} is v{match['actual']}, but rollout needs v{match['requested']}: "
        f"set the profile's volumes.weights to a new name, or `modal volume delete {name}`"
    )


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


def router_app_name(profile: Profile) -> str:
    return f"{profile.name}-router"


def weights_app_name(profile: Profile) -> str:
    return f"{profile.name}-weights"


def compile_app_name(profile: Profile) -> str:
    return f"{profile.name}-compile"


# Function names inside the Apps: the orchestrator looks them up with Function.from_name.
DOWNLOAD_FUNCTION = "download"
MERGE_FUNCTION = "merge"
VERIFY_FUNCTION = "verify"
SERVING_CONFIG_FUNCTION = "serving-config"
COMPILE_FUNCTION = "compile"


# What the bodies and the platform use of Modal's storage: protocols, so tests pass fakes.


class Syncable(Protocol):
    """What a body needs of a mounted modal.Volume."""

    def reload(self) -> None: ...

    def commit(self) -> None: ...


def mounted_volume(name: str) -> modal.Volume:
    # By name: the closures carry only strings into the container (an unhydrated Volume object
    # cannot be pickled), and the lookup finds the volume the function mounts.
    return modal.Volume.from_name(name)


def reload_read_only(volumes: Sequence[Syncable]) -> None:
    # modal 1.6.4 allows reload() on a read-only mount (only writes check the flag client
    # side); what the server does with it is not known. A fresh container already mounts the
    # latest commit, so a failed reload is worth a warning, not a lost container.
    for volume in volumes:
        try:
            volume.reload()
        except Exception as exc:
            log.warning("volume reload failed (%s); using the mounted state", type(exc).__name__)


class WholeFiles(Protocol):
    """What the release store needs of a Volume: small files, each read and written whole."""

    def read(self, path: str) -> bytes | None:
        """The file, or None if it is not there."""
        ...

    def write(self, path: str, data: bytes, *, replace: bool = True) -> bool:
        """The file as `data`, in one call; with replace=False only if it does not exist yet.
        Whether this call wrote it."""
        ...


class KeyValue(Protocol):
    """What the bodies, the platform and the release store's leases need of a modal.Dict."""

    def get(self, key: str, default: Any = None) -> Any: ...

    def put(self, key: str, value: Any, *, skip_if_exists: bool = False) -> bool:
        """skip_if_exists: an atomic create; whether this call wrote the key."""
        ...

    def pop(self, key: str, default: Any = None) -> Any: ...

    def keys(self) -> Iterable[Any]: ...

