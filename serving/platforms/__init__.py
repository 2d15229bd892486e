"""The platforms, and the functions that know them all: the caller names a target, and only
the platform it names is imported (Modal's SDK is not needed for the local target). A caller
that only routes, retires or reads records asks for the Serving half: on the local target it
comes without the Hub client, the verification and the compiler, whose imports `rollout abort`
would otherwise pay before it can act."""

from __future__ import annotations

from serving.platform import Platform, Serving, Target


def get_platform(target: Target) -> Platform:
    if target == "local":
        from serving.platforms.local.platform import LocalPlatform

        return LocalPlatform.from_env()
    from serving.platforms.modal.platform import ModalPlatform

    return ModalPlatform()


def get_serving(target: Target) -> Serving:
    if target == "local":
        from serving.platforms.local.releases import LocalReleases

        return LocalReleases.from_env()
    return get_platform(target)
