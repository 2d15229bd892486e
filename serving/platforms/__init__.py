"""The platforms, and the one function that knows them all: the caller names a target, and
only the platform it names is imported (Modal's SDK is not needed for the local target)."""

from __future__ import annotations

from serving.platform import Platform, Target


def get_platform(target: Target) -> Platform:
    if target == "local":
        from serving.platforms.local.platform import LocalPlatform

        return LocalPlatform.from_env()
    from serving.platforms.modal.platform import ModalPlatform

    return ModalPlatform()
