"""The preparation stages on Modal: resolve, download, compile, verify (and, for dummy weights,
the serving config alone).

Download and compile are calls SPAWNED on the deployed `<model>-weights` / `<model>-compile`
Apps and recorded in the CallStore (serving.platforms.modal.calls), so a retried or restarted
flow re-attaches to them instead of paying for a second 8-GPU job. Before any container starts,
a finished stage is recognised from the volume itself (the weights sentinel, the compile
marker): a rerun of a proven stage starts nothing.

Big repos are downloaded in shards, each shard its own spawned call (a `.map` would die with
the orchestrator and could not be re-attached), then merged into one sentinel.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from serving.config.layout import (
    DEEPGEMM_MOUNT,
    SENTINEL_NAME,
    WEIGHTS_MOUNT,
    deepgemm_dir,
    weights_dir,
)
from serving.config.profile import Profile
from serving.domain.release import VerifyResult
from serving.engines.deepgemm import CompileResult, marker_path, parse_marker
from serving.engines.sglang import deepgemm_cache_key
from serving.platforms.modal import resources
from serving.platforms.modal.apps import build_compile_app, build_weights_app
from serving.platforms.modal.calls import CallKey, CallStore, Stage, Stale
from serving.platforms.modal.gateway import Gateway
from serving.platforms.modal.spawned import SpawnedCalls, Started
from serving.verification import ServingConfigCheck
from serving.weights.download import accept_sentinel, plan_shards
from serving.weights.hub import (
    fetch_model_config,
    hf_token,
    require_commit,
    resolve_revision,
    revision_files,
)
from serving.weights.models import DownloadResult, FileEntry, GiB, Progress, ProgressCallback

log = logging.getLogger(__name__)

GB = 1000**3
CALLS_FILE = "modal-calls.json"
# Where the orchestrator keeps a revision's config.json to compute the DeepGEMM cache key.
CONFIGS_DIR = "modal-configs"
# Shard a download over several containers above either threshold: one container's network
# and disk top out around a few hundred MB/s, and a 700 GB repo is hours in one container.
SHARD_MIN_FILES = 16
SHARD_MIN_BYTES = 200 * GB
BYTES_PER_SHARD = 100 * GiB
MAX_SHARDS = 16


def shard_count(
    files: Sequence[FileEntry],
    *,
    min_files: int = SHARD_MIN_FILES,
    min_bytes: int = SHARD_MIN_BYTES,
    bytes_per_shard: int = BYTES_PER_SHARD,
    max_shards: int = MAX_SHARDS,
) -> int:
    """1 for one container; more above either threshold, about `bytes_per_shard` each."""
    total = sum(entry.size for entry in files)
    if len(files) <= min_files and total <= min_bytes:
        return 1
    return max(2, min(max_shards, len(files), math.ceil(total / bytes_per_shard)))


class Preparation:
    """ModalPlatform's preparation stages: the spawned calls of one Modal environment."""

    def __init__(
        self,
        home: Path,
        gateway: Gateway,
        *,
        environment: str | None,
        endpoint: str | None,
        shard_min_files: int = SHARD_MIN_FILES,
        shard_min_bytes: int = SHARD_MIN_BYTES,
        bytes_per_shard: int = BYTES_PER_SHARD,
        max_shards: int = MAX_SHARDS,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.home = home
        self.gateway = gateway
        self.environment = environment
        # The Hub endpoint of the orchestrator's own cheap calls (resolve, file list, config).
        self.endpoint = endpoint
        self.calls = CallStore(self.home / "state" / CALLS_FILE)
        self.spawned = SpawnedCalls(self.calls, gateway, sleep=sleep)
        self.shard_min_files = shard_min_files
        self.shard_min_bytes = shard_min_bytes
        self.bytes_per_shard = bytes_per_shard
        self.max_shards = max_shards
        self._deployed: set[str] = set()
        self._deploy_lock = threading.Lock()

    def resolve(self, profile: Profile, revision: str) -> str:
        # One cheap HTTP call from the orchestrator; no container.
        return resolve_revision(profile.hub.repo, revision, hf_token(), endpoint=self.endpoint)

    def download(
        self, profile: Profile, revision: str, progress: ProgressCallback | None = None
    ) -> DownloadResult:
        require_commit(revision)
        cached = self._sentinel_on_volume(profile, revision)
        if cached is not None:
            log.info("%s@%s: weights already complete on the volume", profile.name, revision[:8])
            return cached
        hub = profile.hub
        all_files, expected = revision_files(
            hub.repo, revision, hub.allow_patterns, hub.ignore_patterns,
            token=hf_token(), endpoint=self.endpoint,
        )  # fmt: skip
        total = sum(entry.size for entry in expected)
        count = shard_count(
            expected,
            min_files=self.shard_min_files,
            min_bytes=self.shard_min_bytes,
            bytes_per_shard=self.bytes_per_shard,
            max_shards=self.max_shards,
        )
        app_name = resources.weights_app_name(profile)
        report = _DownloadProgress(progress, total)
        report.update(0)
        if count == 1:
            key = self._key("download", profile, revision)
            # The call wrote the sentinel before it returned: a finished one, with no sentinel
            # now, made weights that were deleted since.
            started = self._start(
                key, profile, "weights", resources.DOWNLOAD_FUNCTION, revision,
                stale=lambda _: not self.has_weights(profile, revision),
            )  # fmt: skip
            result = DownloadResult.model_validate(self.spawned.finish(started, "download"))
            report.update(total)
            return result

        # Sorted by path first: the same revision gives the same plan on every run, so a
        # restarted orchestrator finds its shards' calls under the same keys.
        shards = plan_shards(sorted(expected, key=lambda e: e.path), count)
        files = [entry.model_dump(mode="json") for entry in all_files]
        sizes = {entry.path: entry.size for entry in expected}
        log.info("%s@%s: %d files, %.1f GiB in %d shards", profile.name, revision[:8],
                 len(expected), total / GiB, len(shards))  # fmt: skip
        started_shards = []
        for index, paths in enumerate(shards):
            key = self._key("download-shard", profile, revision, f"{index + 1}-of-{len(shards)}")
            started_shards.append(
                (
                    self._start(
                        key, profile, "weights", resources.DOWNLOAD_FUNCTION, revision, paths, files
                    ),
                    sum(sizes[path] for path in paths),
                )
            )
        results = self.spawned.finish_all(started_shards, report.update)
        merged = self.gateway.call(app_name, resources.MERGE_FUNCTION, revision, results, files)
        report.update(total)
        return DownloadResult.model_validate(merged)

    def fetch_serving_config(self, profile: Profile, revision: str) -> str:
        """Dummy weights: one short call on the weights App (not spawned: a few MB, and a
        rerun fetches nothing already there) puts config and tokenizer in the volume's dummy
        directory and checks them; their path in a container."""
        require_commit(revision)
        app_name = self._ensure_deployed(profile, "weights")
        fetched = self.gateway.call(app_name, resources.SERVING_CONFIG_FUNCTION, revision)
        return ServingConfigCheck.model_validate(fetched).proven()

    def has_weights(self, profile: Profile, revision: str) -> bool:
        return self._sentinel_on_volume(profile, revision) is not None

    def has_kernels(self, profile: Profile, revision: str) -> bool:
        # The compile container's marker, the only sign of finished kernels: one volume read.
        require_commit(revision)
        if not profile.deepgemm or profile.volumes.deepgemm is None:
            return True
        return self._marker_on_volume(profile, self._cache_key(profile, revision)) is not None

    def compile(self, profile: Profile, revision: str) -> CompileResult:
        require_commit(revision)
        if not profile.deepgemm or profile.volumes.deepgemm is None:
            return CompileResult.not_required()
        key = self._cache_key(profile, revision)
        marker = self._marker_on_volume(profile, key)
        if marker is not None:
            log.info("%s: DeepGEMM kernels for key %s are already compiled", profile.name, key)
            return CompileResult(
                status="cached", reason="marker found", key=key, marker=marker, seconds=0.0
            )
        call_key = self._key("compile", profile, revision, key)
        started = self._start(
            call_key, profile, "compile", resources.COMPILE_FUNCTION, revision,
            stale=lambda result: self._kernels_gone(profile, key, result),
        )  # fmt: skip
        return CompileResult.model_validate(self.spawned.finish(started, "compile"))

    def verify(self, profile: Profile, revision: str) -> VerifyResult:
        # Not spawned: re-hashing the volume is minutes, and a fresh verification is the point
        # of this stage, so a rerun verifies again rather than reusing an old call's result.
        require_commit(revision)
        self._ensure_deployed(profile, "weights")
        result = self.gateway.call(
            resources.weights_app_name(profile), resources.VERIFY_FUNCTION, revision
        )
        return VerifyResult.model_validate(result)

    # -- calls --------------------------------------------------------------------------------

    def _key(self, stage: Stage, profile: Profile, revision: str, detail: str = "") -> CallKey:
        return CallKey(
            stage=stage,
            model=profile.name,
            revision=revision,
            detail=detail,
            environment=self.environment or "",
        )

    def _start(
        self,
        key: CallKey,
        profile: Profile,
        app_kind: Literal["weights", "compile"],
        function: str,
        *args: Any,
        stale: Stale | None = None,
    ) -> Started:
        return self.spawned.start(
            key, lambda: self._ensure_deployed(profile, app_kind), function, *args, stale=stale
        )

    def _ensure_deployed(self, profile: Profile, app_kind: Literal["weights", "compile"]) -> str:
        """Deploy the App once per process: the first spawn deploys the code and profiles of
        this checkout; later ones reuse it."""
        if app_kind == "weights":
            name, build = resources.weights_app_name(profile), build_weights_app
        else:
            name, build = resources.compile_app_name(profile), build_compile_app
        with self._deploy_lock:
            if name not in self._deployed:
                log.info("deploying Modal app %s", name)
                self.gateway.deploy(build(profile).app)
                self._deployed.add(name)
        return name

    # -- what the volumes already hold ----------------------------------------------------------

    def _sentinel_on_volume(self, profile: Profile, revision: str) -> DownloadResult | None:
        """The weights sentinel read straight from the volume: a proven download starts no
        container. The same acceptance rule as serving.weights.download_repo."""
        relative = weights_dir(PurePosixPath("/"), profile, revision) / SENTINEL_NAME
        raw = self.gateway.read_volume_file(profile.volumes.weights, str(relative))
        hub = profile.hub
        manifest = accept_sentinel(raw, hub.repo, revision, hub.allow_patterns, hub.ignore_patterns)
        if manifest is None:
            return None
        return DownloadResult(
            directory=Path(weights_dir(WEIGHTS_MOUNT, profile, revision)),
            manifest=manifest,
            cached=True,
        )

    def _marker_on_volume(self, profile: Profile, key: str) -> str | None:
        assert profile.volumes.deepgemm is not None
        relative = marker_path(Path(deepgemm_dir(PurePosixPath("/"), profile)), key)
        raw = self.gateway.read_volume_file(profile.volumes.deepgemm, str(relative))
        if raw is None or parse_marker(raw) is None:
            return None
        return str(marker_path(Path(deepgemm_dir(DEEPGEMM_MOUNT, profile)), key))

    def _kernels_gone(self, profile: Profile, key: str, result: dict[str, Any]) -> bool:
        """A compile that returned "compiled" had committed its marker: none now, no kernels."""
        return result.get("status") == "compiled" and self._marker_on_volume(profile, key) is None

    def _cache_key(self, profile: Profile, revision: str) -> str:
        """The DeepGEMM cache key, from the revision's config.json fetched here (one small
        download, kept): the compile call is keyed by it before it starts."""
        directory = fetch_model_config(
            profile.hub.repo,
            revision,
            self.home / "state" / CONFIGS_DIR / profile.hub.repo / revision,
            token=hf_token(),
            endpoint=self.endpoint,
        )
        return deepgemm_cache_key(profile, (directory / "config.json").read_bytes())


class _DownloadProgress:
    """Bytes of finished calls as Progress reports: the containers' own progress stays in
    their logs."""

    def __init__(self, callback: ProgressCallback | None, total: int) -> None:
        self.callback = callback
        self.total = total
        self.began = time.monotonic()

    def update(self, done: int) -> None:
        if self.callback is None:
            return
        elapsed = time.monotonic() - self.began
        rate = done / elapsed if elapsed > 0 and done else 0.0
        eta = (self.total - done) / rate if rate > 0 else None
        self.callback(
            Progress(
                phase="download",
                bytes_done=done,
                bytes_total=self.total,
                rate_bytes_per_s=rate,
                eta_s=eta,
            )
        )
