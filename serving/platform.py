"""The Platform seam: what the Prefect tasks ask of a target, and nothing more.

Two implementations: `serving.local.LocalPlatform` (directories as volumes, processes as
containers) and `serving.modal_platform.ModalPlatform` (Volumes, GPU functions, one App per
release). Tasks never talk to Modal or to processes directly.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any, Literal, Protocol

from pydantic import BaseModel, Field, TypeAdapter, ValidationError

from serving.deepgemm import CompileResult
from serving.profile import Profile

if TYPE_CHECKING:
    from serving.releases import ReleaseStore
from serving.weights import DownloadResult, ProgressCallback, VerifyReport

Target = Literal["local", "modal"]


class Release(BaseModel):
    """One deployed revision of a model: an engine behind the router."""

    model: str
    revision: str
    id: str
    url: str
    deployed_at: datetime


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


# A release's first answers may pay for graph capture and JIT compilation.
ASK_TIMEOUT_SECONDS = 120.0


# A release is named by its model and the first hex digits of its commit.
RELEASE_ID_HEX = 8


def release_id(profile: Profile, revision: str) -> str:
    return f"{profile.name}-{revision[:RELEASE_ID_HEX]}"


class Platform(Protocol):
    target: Target
    # Names where this platform keeps prepared weights and kernels (a ROLLOUT_HOME, a Modal
    # environment): cached stage results are only valid in the same scope.
    cache_scope: str

    def resolve(self, profile: Profile, revision: str) -> str:
        """A branch or tag → its 40-hex commit (a commit is returned as is, no request)."""
        ...

    def download(
        self, profile: Profile, revision: str, progress: ProgressCallback | None = None
    ) -> DownloadResult: ...

    def compile(self, profile: Profile, revision: str) -> CompileResult: ...

    def verify(self, profile: Profile, revision: str) -> VerifyResult: ...

    def deploy(self, profile: Profile, revision: str) -> Release:
        """Start a release at 0% traffic; returns once it is ready and passed its probes."""
        ...

    def set_traffic(self, profile: Profile, weights: dict[str, int]) -> None:
        """Route `weights` (release id → percent) for the model; applies to new requests."""
        ...

    def retire(self, profile: Profile, release: Release, drain_seconds: float) -> None:
        """Out of routing, drain in-flight requests up to the deadline, then stop."""
        ...

    def router_url(self, profile: Profile) -> str: ...

    def stats(self, profile: Profile, since: float) -> dict:
        """The router's per-backend measurements for the model since a unix time
        (GET /admin/stats: {"backends": {release id: {...}}})."""
        ...

    def ask(self, profile: Profile, release_id: str, chat: dict[str, Any]) -> dict[str, Any]:
        """One chat completion from one release, through the router, which holds the
        release's key (POST /admin/ask/<release id>); not measured, not retried."""
        ...

    def running_releases(self, profile: Profile) -> list[Release]:
        """Releases of the model that are up now, whoever started them."""
        ...

    def release_store(self) -> ReleaseStore: ...

    def reconcile_orphans(self) -> list[str]:
        """Stop what a killed orchestrator left running (its hooks never ran); the names of
        what was stopped or forgotten."""
        ...

    def shutdown(self) -> None:
        """Stop what this process started, unless it was asked to keep serving."""
        ...


def get_platform(target: Target) -> Platform:
    if target == "local":
        from serving.local import LocalPlatform

        return LocalPlatform.from_env()
    from serving.modal_platform import ModalPlatform

    return ModalPlatform()
