"""Traffic plans: the weights a rollout step asks for, validated once for both platforms."""

from __future__ import annotations

import logging
from typing import Annotated

from pydantic import Field, TypeAdapter, ValidationError

from serving.config.profile import Profile
from serving.domain.release import Release

logger = logging.getLogger(__name__)

TRAFFIC = TypeAdapter(dict[str, Annotated[int, Field(ge=0, le=100, strict=True)]])


def traffic_plan(
    profile: Profile, weights: dict[str, int], running: list[Release]
) -> list[tuple[Release, int]]:
    """The weight of each running release: one not named gets 0, one not running is left out
    (a release that died cannot take traffic, and a rollback must still zero a dead canary)."""
    try:
        wanted = TRAFFIC.validate_python(weights)
    except ValidationError as exc:
        raise ValueError(f"bad traffic weights {weights}: {exc.errors()[0]['msg']}") from None
    by_id = {release.id: release for release in running}
    missing = sorted(rid for rid, weight in wanted.items() if weight and rid not in by_id)
    if missing:
        logger.warning("%s: not running, left out of routing: %s", profile.name, missing)
    return [(release, wanted.get(rid, 0)) for rid, release in sorted(by_id.items())]
