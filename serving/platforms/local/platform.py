"""LocalPlatform: the embedded target whole. Directories are volumes, processes are containers:
the serving half (deploy, route, retire, the release store) is LocalReleases (releases.py); this
adds the preparation of a revision (resolve, download, compile, verify), whose Hub client and
verification only `prep` and `run` import.

The Hub endpoint comes from HF_ENDPOINT (the local mirror in tests and in `make demo`).
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path

from serving.config.layout import (
    SENTINEL_NAME,
    compile_model_dir,
    deepgemm_dir,
    dummy_weights_dir,
    weights_dir,
)
from serving.config.profile import Profile
from serving.core.home import rollout_home
from serving.core.restarts import RestartPolicy
from serving.domain.release import VerifyResult
from serving.engines.deepgemm import (
    COMPILE_TIMEOUT_SECONDS,
    CompileResult,
    Log,
    compile_kernels,
    read_marker,
    run_compile,
    unavailable_reason,
)
from serving.engines.sglang import COMPILE_ENTRYPOINT, Command, deepgemm_cache_key
from serving.platforms.local.releases import LocalReleases, serving_settings_from_env
from serving.platforms.local.router_process import DEFAULT_ROUTER_PORT
from serving.verification import check_serving_config, verify_revision
from serving.weights.download import accept_sentinel, download
from serving.weights.hub import (
    SERVING_CONFIG_PATTERNS,
    fetch_model_config,
    hf_token,
    resolve_revision,
)
from serving.weights.models import DownloadResult, ProgressCallback
from serving.weights.progress import log_progress

# Replaces `python3 -m sglang.compile_deep_gemm` by another program. Exists for fault injection
# in tests (a compile that fails N times), because no real compile runs without a GPU.
COMPILE_ENTRYPOINT_ENV = "ROLLOUT_COMPILE_ENTRYPOINT"


class LocalPlatform(LocalReleases):
    def __init__(
        self,
        home: Path,
        *,
        endpoint: str | None = None,
        compile_entrypoint: list[str] | None = None,
        keep_serving: bool = False,
        router_port: int = DEFAULT_ROUTER_PORT,
        restarts: RestartPolicy | None = None,
    ) -> None:
        super().__init__(home, keep_serving=keep_serving, router_port=router_port,
                         restarts=restarts)  # fmt: skip
        self.cache_scope = f"local:{home.resolve()}"
        self.endpoint = endpoint
        self.compile_entrypoint = compile_entrypoint

    @classmethod
    def from_env(cls) -> LocalPlatform:
        override = os.environ.get(COMPILE_ENTRYPOINT_ENV)
        return cls(
            rollout_home(),
            endpoint=os.environ.get("HF_ENDPOINT") or None,
            compile_entrypoint=shlex.split(override) if override else None,
            **serving_settings_from_env(),
        )

    # -- preparation --------------------------------------------------------------------------
    def resolve(self, profile: Profile, revision: str) -> str:
        return resolve_revision(
            profile.hub.repo, revision, hf_token(), endpoint=self.endpoint
        )

    def download(
        self, profile: Profile, revision: str, progress: ProgressCallback | None = None
    ) -> DownloadResult:
        return download(
            profile,
            revision,
            self._weights_root(profile),
            token=hf_token(),
            endpoint=self.endpoint,
            progress=progress or log_progress,
        )

    def fetch_serving_config(self, profile: Profile, revision: str) -> str:
        directory = fetch_model_config(
            profile.hub.repo,
            revision,
            dummy_weights_dir(self._weights_root(profile), profile, revision),
            token=hf_token(),
            endpoint=self.endpoint,
            patterns=SERVING_CONFIG_PATTERNS,
        )
        return check_serving_config(profile, directory).proven()

    def has_weights(self, profile: Profile, revision: str) -> bool:
        sentinel = weights_dir(self._weights_root(profile), profile, revision) / SENTINEL_NAME
        try:
            raw = sentinel.read_text()
        except OSError:
            return False
        hub = profile.hub
        manifest = accept_sentinel(raw, hub.repo, revision, hub.allow_patterns, hub.ignore_patterns)
        return manifest is not None

    def has_kernels(self, profile: Profile, revision: str) -> bool:
        deepgemm_root = self._deepgemm_root(profile)
        if not profile.deepgemm or deepgemm_root is None or not self._can_compile():
            return True  # a compile here skips: it promised no kernels
        config = compile_model_dir(deepgemm_root, profile, revision) / "config.json"
        try:
            key = deepgemm_cache_key(profile, config.read_bytes())
        except OSError:  # the cache volume went with its kernels
            return False
        return read_marker(deepgemm_dir(deepgemm_root, profile), key) is not None

    def compile(self, profile: Profile, revision: str, log: Log = print) -> CompileResult:
        deepgemm_root = self._deepgemm_root(profile)
        if not profile.deepgemm or deepgemm_root is None:
            return CompileResult.not_required()

        # Kernel shapes need only the config: the compile runs beside the download.
        directory = fetch_model_config(
            profile.hub.repo,
            revision,
            compile_model_dir(deepgemm_root, profile, revision),
            token=hf_token(),
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

    def _can_compile(self) -> bool:
        """A GPU with SGLang here, or a compile entrypoint standing in for it."""
        return self.compile_entrypoint is not None or unavailable_reason() is None

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
            compile_required=self._can_compile(),
            token=hf_token(),
            endpoint=self.endpoint,
        )
