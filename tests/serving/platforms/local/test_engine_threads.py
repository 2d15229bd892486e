"""The thread budget of a local engine: its profile's `resources.cpu`, capped by the host's
cores shared among the engines that run beside it. (That the budget reaches a real engine's
environment: test_local_serving.py.)"""

from __future__ import annotations

import pytest

from serving.config.loader import load_profile
from serving.config.profile import Profile
from serving.platforms.local.engine_env import engine_threads


def with_cpu(cpu: float) -> Profile:
    profile = load_profile("smollm2-135m")
    return profile.model_copy(
        update={"resources": profile.resources.model_copy(update={"cpu": cpu})}
    )


@pytest.mark.parametrize(
    ("cpu", "running", "cores", "threads"),
    [
        (2, 0, 16, 2),  # a big host: the profile's budget, not half the host
        (4, 0, 8, 4),  # alone, a canary is still expected beside it: half the host
        (8, 0, 8, 4),
        (8, 1, 8, 4),  # the canary beside stable
        (8, 3, 8, 2),  # a second model's stable and canary share the host too
        (2, 5, 2, 1),  # never fewer than one
        (0.5, 0, 8, 1),  # a fraction of a core is still a thread
    ],
)
def test_the_budget_is_the_profile_capped_by_the_shared_cores(
    cpu: float, running: int, cores: int, threads: int
) -> None:
    assert engine_threads(with_cpu(cpu), running=running, cores=cores) == threads
