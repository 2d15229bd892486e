"""Prefect tasks of weight preparation: resolve, download, compile, verify.

Each is one stage, calling the target's Platform; retries, caching and GPU concurrency live here,
the work itself in `serving`.
"""

from __future__ import annotations

import contextvars
from datetime import timedelta
from typing import TypeVar
from uuid import UUID

from huggingface_hub.utils import disable_progress_bars
from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.concurrency.sync import concurrency
from prefect.futures import PrefectFuture
from prefect.states import State
from prefect.tasks import Task, exponential_backoff

from serving.config.loader import load_profile
from serving.core.errors import ExpectedFailure
from serving.domain.release import VerifyResult
from serving.engines.deepgemm import CompileResult, unavailable_reason
from serving.platform import Target
from serving.platforms import get_platform
from serving.weights.models import DownloadResult, Progress, WeightsError
from tasks.cache import stage_key

# A proven stage stays proven for a day; after that a rerun re-checks (one stat for weights).
PROVEN_FOR = timedelta(days=1)
# The name Prefect gives a task run that handed back an earlier run's persisted result.
CACHED_STATE_NAME = "Cached"

R = TypeVar("R")


class VerifyFailed(ExpectedFailure):
    """Weights, kernels or the serve command did not prove out: nothing may be deployed."""


def retry_unless_final(task: object, task_run: object, state: State) -> bool:
    """serving.weights retries transient failures (5xx, cut connections) itself, so what it
    raises is final (not found, disk full, persistent 5xx) and so is a failed proof; a
    Prefect retry would only repeat them. Anything else (a crashed compile) is retried."""
    return not isinstance(state.data, WeightsError | VerifyFailed)


# A stage whose result stays proven: cached on model@commit+profile (never the run id), so a
# `prefect flow-run retry` of a failed compile finds the download Cached; final errors are
# not retried.
PROVEN_STAGE = {
    "retry_condition_fn": retry_unless_final,
    "persist_result": True,
    "cache_key_fn": stage_key,
    "cache_expiration": PROVEN_FOR,
}


@task(name="resolve", retries=1, retry_delay_seconds=5, retry_condition_fn=retry_unless_final)
def resolve(model: str, revision: str, target: Target) -> str:
    """A branch or tag becomes a commit before anything else; every later stage uses it."""
    sha = get_platform(target).resolve(load_profile(model), revision)
    get_run_logger().info("%s@%s is commit %s", model, revision, sha)
    return sha


@task(name="fetch-serving-config", retries=1, retry_delay_seconds=5,
      retry_condition_fn=retry_unless_final)  # fmt: skip
def fetch_serving_config(model: str, revision: str, target: Target) -> str:
    """Dummy weights: the revision's config and tokenizer instead of the download."""
    directory = get_platform(target).fetch_serving_config(load_profile(model), revision)
    get_run_logger().info("%s@%s: dummy weights, config and tokenizer only", model, revision[:8])
    return directory


@task(name="download", retries=2, retry_delay_seconds=[30, 120], **PROVEN_STAGE)
def download(model: str, revision: str, target: Target) -> DownloadResult:
    profile = load_profile(model)
    disable_progress_bars()  # tqdm bars in task logs are noise; the artifact shows progress
    report = _ProgressArtifact(model)
    result = get_platform(target).download(profile, revision, report)
    report.finish()
    get_run_logger().info(
        "%s: %d files, %.2f GiB, %s",
        model,
        len(result.manifest.files),
        result.manifest.bytes_total / 2**30,
        "already complete (sentinel)"
        if result.cached
        else f"{result.bytes_downloaded / 2**30:.2f} GiB downloaded in {result.seconds:.1f}s",
    )
    return result


def submit_download(model: str, revision: str, target: Target) -> PrefectFuture[DownloadResult]:
    """The download stage, its cached result trusted only while its sentinel is on the volume."""
    present = get_platform(target).has_weights(load_profile(model), revision)
    return _submit_proven(download, present, "no weights on the volume; downloading",
                          model, revision, target)  # fmt: skip


def _submit_proven(stage: Task[..., R], present: bool, missing: str, model: str,
                   revision: str, target: Target) -> PrefectFuture[R]:  # fmt: skip
    """A proven stage whose output is gone (deleted by hand, a volume cleanup) runs again,
    where its Cached result would have verify fail for as long as it stays proven. The fresh
    result replaces the stale one under the same key: `prefect flow-run retry` still finds it."""
    if present:
        return stage.submit(model, revision, target)
    get_run_logger().info("%s@%s: %s", model, revision[:8], missing)
    return stage.with_options(refresh_cache=True).submit(model, revision, target)


def bytes_transferred(run: PrefectFuture[DownloadResult]) -> int:
    """What the download moved in THIS flow run. A Cached task run hands back an earlier run's
    result, whose bytes that run moved: here it moved none."""
    result = run.result()
    return 0 if run.state.name == CACHED_STATE_NAME else result.bytes_downloaded


@task(name="compile", retries=2, retry_delay_seconds=exponential_backoff(backoff_factor=30),
      **PROVEN_STAGE)  # fmt: skip
def compile_kernels(model: str, revision: str, target: Target) -> CompileResult:
    profile = load_profile(model)
    platform = get_platform(target)
    gpu = profile.resources.gpu
    uses_gpu = profile.deepgemm and gpu is not None and (
        target == "modal" or unavailable_reason() is None
    )
    if uses_gpu:
        # strict: a missing limit is an error, not a silent free-for-all on 8-GPU jobs.
        with concurrency(gpu_limit_name(gpu), occupy=profile.resources.gpu_count, strict=True):
            result = platform.compile(profile, revision)
    else:
        result = platform.compile(profile, revision)
    get_run_logger().info("%s: compile %s (%s)", model, result.status, result.reason)
    return result


def gpu_limit_name(gpu: str | None) -> str:
    return f"gpu-{(gpu or 'cpu').lower()}"


def submit_compile(model: str, revision: str, target: Target) -> PrefectFuture[CompileResult]:
    """The compile stage, its cached result trusted only while its marker is in the cache."""
    present = get_platform(target).has_kernels(load_profile(model), revision)
    return _submit_proven(compile_kernels, present, "no compiled kernels in the cache; compiling",
                          model, revision, target)  # fmt: skip


@task(name="verify", retries=1, retry_delay_seconds=10, retry_condition_fn=retry_unless_final)
def verify(model: str, revision: str, target: Target) -> VerifyResult:
    result = get_platform(target).verify(load_profile(model), revision)
    logger = get_run_logger()
    logger.info("%s: weights %s", model, result.weights.summary())
    if result.repaired:
        logger.warning("%s: re-fetched %s", model, ", ".join(result.repaired))
    if not result.passed:
        raise VerifyFailed(f"{model}@{revision[:8]}: " + "; ".join(result.problems))
    return result


class _ProgressArtifact:
    """Download progress as a Prefect progress artifact, updated at most once per percent.

    Progress is reported from the download's own thread, which has none of the task run's
    context: updates run inside a copy of it, so the artifact belongs to this task run.
    """

    def __init__(self, model: str) -> None:
        self.key = f"download-{model.replace('.', '-')}"
        self.artifact: UUID | None = None
        self.percent = -1
        self.logger = get_run_logger()
        self.context = contextvars.copy_context()

    def __call__(self, progress: Progress) -> None:
        if progress.phase != "download" or not progress.bytes_total:
            return
        percent = int(100 * progress.bytes_done / progress.bytes_total)
        if percent > self.percent:
            self.percent = percent
            self.context.run(self._report, percent, progress)

    def _report(self, percent: int, progress: Progress) -> None:
        self.logger.info(progress.line())
        if self.artifact is None:
            self.artifact = create_progress_artifact(
                progress=percent, key=self.key, description="weights download"
            )
        else:
            update_progress_artifact(self.artifact, progress=percent, description=progress.line())

    def finish(self) -> None:
        if self.artifact is not None:
            self.context.run(update_progress_artifact, self.artifact, progress=100.0)
