"""A release (one revision of a model, served) and what verification proved about it."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, Field

from serving.config.profile import Profile

if TYPE_CHECKING:
    pass
from serving.weights.models import VerifyReport


class Release(BaseModel):
    """One deployed revision of a model: an engine behind the router."""

    model: str
    revision: str
    id: str
    url: str
    deployed_at: datetime
    # Serves random weights (profile.dummy_weights): probed, never stable.
    dummy_weights: bool = False


class VerifyResult(BaseModel):
    """Stage 4: the weights, the kernels and the serve command, proven before any deploy."""

    weights: VerifyReport
    repaired: list[str] = Field(description="files that were bad or missing and re-fetched")
    compile_status: Literal["compiled", "skipped", "missing", "not-required"]
    compile_key: str | None
    problems: list[str]

    @property
    def passed(self) -> bool:
        return self.weights.passed and not self.problems


# A release is named by its model and the first hex digits of its commit.
RELEASE_ID_HEX = 8
DUMMY_SUFFIX = "-dummy"


def release_id(profile: Profile, revision: str) -> str:
    """Dummy weights are another release of the revision, and never mistaken for it."""
    suffix = DUMMY_SUFFIX if profile.dummy_weights else ""
    return f"{profile.name}-{revision[:RELEASE_ID_HEX]}{suffix}"
