"""The platforms, and the functions that know them all: the caller names a target, and only
the platform it names is imported (Modal's SDK is not needed for the local target). A caller
that only routes, retires or reads records asks for the Serving half: on the local target it
comes without the Hub client, the verification and the compiler, whose imports `rollout abort`
would otherwise pay before it can act."""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path

from serving.core.home import rollout_home
from serving.platform import Platform, Serving, Target

# Where a ModalPlatform's Modal API is (modal's own client reads it; tests point it at a double).
MODAL_SERVER_ENV = "MODAL_SERVER_URL"


def get_platform(target: Target) -> Platform:
    if target == "local":
        from serving.platforms.local.platform import LocalPlatform

        return LocalPlatform.from_env()
    return _modal_platform(
        rollout_home().resolve(),
        os.environ.get("MODAL_ENVIRONMENT") or None,
        os.environ.get("HF_ENDPOINT") or None,
        os.environ.get(MODAL_SERVER_ENV),
        os.getpid(),
    )


@cache
def _modal_platform(
    home: Path, environment: str | None, endpoint: str | None, server: str | None, pid: int
) -> Platform:
    """One ModalPlatform per process and settings (`server` and `pid` only key it: modal keeps
    one client per process too): every Prefect task asks for its platform, and each new one
    would deploy the weights App again before its first call. A LocalPlatform costs nothing
    to build, and reads more of the environment."""
    from serving.platforms.modal.platform import ModalPlatform

    return ModalPlatform(home, environment=environment, endpoint=endpoint)


def get_serving(target: Target) -> Serving:
    if target == "local":
        from serving.platforms.local.releases import LocalReleases

        return LocalReleases.from_env()
    return get_platform(target)
