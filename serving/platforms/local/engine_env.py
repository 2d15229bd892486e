"""How local engines share the host: each release's supervisor and engine get a thread budget
and an environment that works from the release's own directory."""

from __future__ import annotations

import os

from serving.config.loader import models_dir
from serving.config.profile import Profile
from serving.core.home import repo_pythonpath

# During a canary, stable and the canary run side by side; a release started alone will be
# joined by the next canary, and its thread count is fixed at its start.
ENGINES_SHARING_A_HOST = 2
# The thread pools an engine's numeric libraries size from the environment (torch's intra-op
# pool reads OMP_NUM_THREADS; MKL and OpenBLAS their own); each defaults to a thread per core.
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def engine_env(threads: int) -> dict[str, str]:
    """The environment of a release's supervisor and engine."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # Releases on one host share its cores. Left alone, each engine's torch takes a thread per
    # core, and stable plus a canary oversubscribe the CPU: on 2 cores the demo's canary then
    # answered 3-6 requests per 30 s bake (TTFT p50 2-7 s) and was never judged; with a
    # budget, 20-30 (TTFT p50 0.8-1.6 s). A value the user set wins.
    for name in THREAD_ENV:
        env.setdefault(name, str(threads))
    # The supervisor runs in the release's directory: paths it inherits must be absolute.
    env["PYTHONPATH"] = repo_pythonpath()
    env["ROLLOUT_MODELS_DIR"] = str(models_dir().resolve())
    return env


def engine_threads(profile: Profile, running: int, cores: int | None = None) -> int:
    """CPU threads for one local engine: its profile's `resources.cpu`, capped by the host's
    cores shared among the engines that run beside it (`running` already do, at least a
    stable and a canary)."""
    cores = cores or len(os.sched_getaffinity(0))
    sharing = max(ENGINES_SHARING_A_HOST, running + 1)
    return max(1, min(int(profile.resources.cpu), cores // sharing))
