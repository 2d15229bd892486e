"""The `prep` flow: resolve → download ‖ compile → verify.

Compile needs only the revision's config.json, so it runs beside the download. Nothing here is
logic: the stages live in tasks/, the work in serving/.
"""

from __future__ import annotations

import time
from typing import Literal

from prefect import flow
from pydantic import BaseModel

from serving.platform import Target
from serving.profile import load_profile
from tasks.weights import compile_kernels, download, resolve, verify


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
    clock = _StageClock()
    sha = resolve(model, revision or profile.hub.revision, target)
    clock.lap("resolve")
    downloaded = download.submit(model, sha, target)
    compiled = compile_kernels.submit(model, sha, target)
    weights, kernels = downloaded.result(), compiled.result()
    clock.lap("download+compile")
    proof = verify(model, sha, target)
    clock.lap("verify")
    return PrepReport(
        model=model,
        revision=sha,
        weights_path=str(weights.directory),
        files=len(weights.manifest.files),
        bytes_total=weights.manifest.bytes_total,
        bytes_downloaded=0 if weights.cached else weights.manifest.bytes_total,
        verified=proof.passed,
        repaired=proof.repaired,
        compile_status=kernels.status,
        compile_reason=kernels.reason,
        seconds=clock.laps,
    )


class _StageClock:
    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self._last = time.monotonic()

    def lap(self, stage: str) -> None:
        now = time.monotonic()
        self.laps[stage] = round(now - self._last, 3)
        self._last = now
