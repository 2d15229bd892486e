"""LocalPlatform: the embedded target. Directories are volumes, processes are containers.

    $ROLLOUT_HOME/volumes/<volume name>/...   weights and DeepGEMM caches, same layout as Modal
    $ROLLOUT_HOME/state/...                   release records, routing state, call ids

ROLLOUT_HOME defaults to `.rollout/` in the repository. The Hub endpoint comes from HF_ENDPOINT
(the local mirror in tests and in `make demo`).
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path

from serving.deepgemm import (
    COMPILE_TIMEOUT_SECONDS,
    CompileResult,
    Log,
    compile_kernels,
    run_compile,
    unavailable_reason,
)
from serving.layout import compile_model_dir, deepgemm_dir
from serving.platform import Target, VerifyResult
from serving.profile import Profile
from serving.sglang import COMPILE_ENTRYPOINT, Command
from serving.verification import verify_revision
from serving.weights import (
    DownloadResult,
    ProgressCallback,
    download,
    fetch_model_config,
    log_progress,
    resolve_revision,
)

DEFAULT_HOME = Path(__file__).resolve().parent.parent / ".rollout"
# Replaces `python3 -m sglang.compile_deep_gemm` by another program. Exists for fault injection
# in tests (a compile that fails N times), because no real compile runs without a GPU.
COMPILE_ENTRYPOINT_ENV = "ROLLOUT_COMPILE_ENTRYPOINT"


class LocalPlatform:
    target: Target = "local"

    def __init__(
        self,
        home: Path,
        *,
        endpoint: str | None = None,
        compile_entrypoint: list[str] | None = None,
    ) -> None:
        self.home = home
        self.cache_scope = f"local:{home.resolve()}"
        self.endpoint = endpoint
        self.compile_entrypoint = compile_entrypoint

    @classmethod
    def from_env(cls) -> LocalPlatform:
        override = os.environ.get(COMPILE_ENTRYPOINT_ENV)
        return cls(
            Path(os.environ.get("ROLLOUT_HOME", DEFAULT_HOME)),
            endpoint=os.environ.get("HF_ENDPOINT") or None,
            compile_entrypoint=shlex.split(override) if override else None,
        )

    def volume(self, name: str) -> Path:
        return self.home / "volumes" / name

    def _token(self, profile: Profile) -> str | None:
        return os.environ.get(profile.secrets.hf_token) if profile.secrets.hf_token else None

    def _weights_root(self, profile: Profile) -> Path:
        return self.volume(profile.volumes.weights)

    def _deepgemm_root(self, profile: Profile) -> Path | None:
        return self.volume(profile.volumes.deepgemm) if profile.volumes.deepgemm else None

    # -- preparation --------------------------------------------------------------------------

    def resolve(self, profile: Profile, revision: str) -> str:
        return resolve_revision(
            profile.hub.repo, revision, self._token(profile), endpoint=self.endpoint
        )

    def download(
        self, profile: Profile, revision: str, progress: ProgressCallback | None = None
    ) -> DownloadResult:
        return download(
            profile,
            revision,
            self._weights_root(profile),
            token=self._token(profile),
            endpoint=self.endpoint,
            progress=progress or log_progress,
        )

    def compile(self, profile: Profile, revision: str, log: Log = print) -> CompileResult:
        deepgemm_root = self._deepgemm_root(profile)
        if not profile.deepgemm or deepgemm_root is None:
            return CompileResult(
                status="skipped",
                reason="the profile does not precompile kernels",
                key=None,
                marker=None,
                seconds=0.0,
            )
        # Kernel shapes need only the config: the compile runs beside the download.
        directory = fetch_model_config(
            profile.hub.repo,
            revision,
            compile_model_dir(deepgemm_root, profile, revision),
            token=self._token(profile),
            endpoint=self.endpoint,
        )
        return compile_kernels(
            profile,
            revision=revision,
            weights_path=directory,
            cache_dir=deepgemm_dir(deepgemm_root, profile),
            timeout_seconds=COMPILE_TIMEOUT_SECONDS,
            log=log,
            run=self._run_compile,
            unavailable=(lambda: None) if self.compile_entrypoint else unavailable_reason,
        )

    def _run_compile(self, command: Command, timeout: float, log: Log) -> None:
        if self.compile_entrypoint:
            argv = self.compile_entrypoint + command.argv[len(COMPILE_ENTRYPOINT) :]
            command = command.model_copy(update={"argv": argv})
        run_compile(command, timeout, log)

    def verify(self, profile: Profile, revision: str) -> VerifyResult:
        return verify_revision(
            profile,
            revision,
            weights_root=self._weights_root(profile),
            deepgemm_root=self._deepgemm_root(profile),
            compile_required=self.compile_entrypoint is not None or unavailable_reason() is None,
            token=self._token(profile),
            endpoint=self.endpoint,
        )
