"""The Platform seam: what the Prefect tasks ask of a target, and nothing more.

Two implementations, chosen by the caller through `serving.platforms.get_platform` (or
`get_serving`, for the Serving half alone):
`serving.platforms.local` (directories as volumes, processes as containers) and
`serving.platforms.modal` (Volumes, GPU functions, one App per release). Tasks never talk to
Modal or to processes directly.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal, Protocol

from serving.config.profile import Profile, Shadow
from serving.domain.records import ReleaseStore
from serving.domain.release import Release, VerifyResult

if TYPE_CHECKING:
    # Named by Preparation's signatures alone: the Serving half's users (the lifecycle,
    # `rollout abort`) do not load the compiler's and the downloader's modules for them.
    from serving.engines.deepgemm import CompileResult
    from serving.weights.models import DownloadResult, ProgressCallback

Target = Literal["local", "modal"]


class Preparation(Protocol):
    """What makes a revision ready to serve on a target: weights, kernels, their proof."""

    # Names where this platform keeps prepared weights and kernels (a ROLLOUT_HOME, a Modal
    # environment): cached stage results are only valid in the same scope.
    cache_scope: str

    def resolve(self, profile: Profile, revision: str) -> str:
        """A branch or tag → its 40-hex commit (a commit is returned as is, no request)."""
        ...

    def download(
        self, profile: Profile, revision: str, progress: ProgressCallback | None = None
    ) -> DownloadResult: ...

    def fetch_serving_config(self, profile: Profile, revision: str) -> str:
        """Dummy weights: the revision's config and tokenizer alone (no weights) where
        `deploy` of `profile.with_dummy_weights()` finds them; their path."""
        ...

    def has_weights(self, profile: Profile, revision: str) -> bool:
        """The revision's download sentinel is on the weights volume: what a cached download
        stage promised is still there (weights may be deleted by hand or by a cleanup)."""
        ...

    def has_kernels(self, profile: Profile, revision: str) -> bool:
        """The DeepGEMM marker of the revision's cache key is in the cache volume, or there is
        nothing to compile here: what a cached compile stage promised is still there."""
        ...

    def compile(self, profile: Profile, revision: str) -> CompileResult: ...

    def verify(self, profile: Profile, revision: str) -> VerifyResult: ...


class Serving(Protocol):
    """A target's releases, their traffic and the release store: all that the lifecycle,
    `rollout abort` and `rollout status` need, so they import no Hub client nor compiler."""

    target: Target

    def deploy(self, profile: Profile, revision: str) -> Release:
        """Start a release at 0% traffic; returns once it is ready and passed its probes."""
        ...

    def set_traffic(
        self, profile: Profile, weights: dict[str, int], shadow: dict[str, Shadow] | None = None
    ) -> None:
        """Route `weights` (release id → percent) for the model, and copies of stable's chat
        requests to the releases of `shadow` (release id → shadow step); applies to new
        requests, and ends any shadow not named."""
        ...

    def retire(self, profile: Profile, release: Release, drain_seconds: float) -> None:
        """Out of routing, drain in-flight requests up to the deadline, then stop."""
        ...

    def router_url(self, profile: Profile) -> str: ...

    def stats(self, profile: Profile, since: float) -> dict:
        """The router's per-backend measurements for the model since a unix time
        (GET /admin/stats: {"backends": {release id: {...}}})."""
        ...

    def ask(
        self, profile: Profile, release_id: str, chat: dict[str, Any], timeout: float
    ) -> dict[str, Any]:
        """One chat completion from one release within `timeout` seconds, through the router,
        which holds the release's key (POST /admin/ask/<release id>); not measured, not
        retried."""
        ...

    def running_releases(self, profile: Profile) -> list[Release]:
        """Releases of the model that are up now, whoever started them."""
        ...

    def engine_crashes(self, profile: Profile, release_id: str, since: float) -> int:
        """How often the release's engine crashed since a unix time (each crash restarted it,
        as Modal replaces a container, up to a limit); a bake with a crash of its canary
        fails."""
        ...

    def release_store(self) -> ReleaseStore: ...

    def reconcile_orphans(self) -> list[str]:
        """Stop what a killed orchestrator left running (its hooks never ran); the names of
        what was stopped or forgotten."""
        ...

    def shutdown(self) -> None:
        """Stop what this process started, unless it was asked to keep serving."""
        ...


class Platform(Preparation, Serving, Protocol):
    """A target whole."""
