"""The `prep` flow: resolve → download ‖ compile → verify.

Compile needs only the revision's config.json, so it runs beside the download. Nothing here is
logic: the stages live in tasks/, the work in serving/.
"""

from __future__ import annotations

from typing import Literal

from prefect import flow
from pydantic import BaseModel

from serving.config.loader import load_profile
from serving.config.profile import is_commit_sha
from serving.platform import Target
from tasks.stopwatch import Stopwatch
from tasks.weights import bytes_transferred, resolve, submit_compile, submit_download, verify


class PrepReport(BaseModel):
    model: str
    revision: str
    weights_path: str
    files: int
    bytes_total: int
    bytes_downloaded: int
    verified: bool
    repaired: list[str]
    compile_status: Literal["compiled", "cached", "skipped"]
    compile_reason: str
    seconds: dict[str, float]


@flow(name="prep", log_prints=True)
def prep(model: str, revision: str | None = None, target: Target = "local") -> PrepReport:
    profile = load_profile(model)
    watch = Stopwatch()
    seconds: dict[str, float] = {}
    asked = revision or profile.hub.revision
    # A commit (the rollout flow's, resolved already) is its own answer: no second task run.
    sha = asked if is_commit_sha(asked) else resolve(model, asked, target)
    seconds["resolve"] = watch.lap()
    downloaded = submit_download(model, sha, target)
    compiled = submit_compile(model, sha, target)
    weights, kernels = downloaded.result(), compiled.result()
    seconds["download+compile"] = watch.lap()
    proof = verify(model, sha, target)
    seconds["verify"] = watch.lap()
    return PrepReport(
        model=model,
        revision=sha,
        weights_path=str(weights.directory),
        files=len(weights.manifest.files),
        bytes_total=weights.manifest.bytes_total,
        bytes_downloaded=bytes_transferred(downloaded),
        verified=proof.passed,
        repaired=proof.repaired,
        compile_status=kernels.status,
        compile_reason=kernels.reason,
        seconds=seconds,
    )
