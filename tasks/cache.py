"""Task cache keys: a stage of one model at one commit on one target, never the run id.

So `prefect flow-run retry` after a failed compile finds the download `Cached` and re-runs only
what failed, and a rerun of the same revision and profile reuses what was already proven.
"""

from __future__ import annotations

import hashlib
from typing import Any

from prefect.context import TaskRunContext

from serving.config.loader import load_profile
from serving.platforms import get_platform


def stage_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    # Where the stage's output lives is part of the key (another ROLLOUT_HOME or Modal
    # environment has none of it), and so is the profile's content: a changed flag or image
    # must not reuse kernels compiled for the old one.
    scope = get_platform(parameters["target"]).cache_scope
    profile = load_profile(parameters["model"]).model_dump_json()
    digest = hashlib.sha256(f"{scope}\n{profile}".encode()).hexdigest()[:16]
    return (
        f"{context.task.name}/{parameters['target']}/"
        f"{parameters['model']}@{parameters['revision']}/{digest}"
    )
