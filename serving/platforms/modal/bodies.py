"""What runs inside the weights and compile containers: download, merge, verify, compile, and
the serving config of a dummy-weights release.

Module-level functions with the roots and volumes as arguments. The Modal functions in
serving.platforms.modal.apps are thin closures that pass the mounts; tests call these with a
temporary directory, a fake volume and the local mirror as `endpoint`. Each returns a JSON-ready
dict, so a spawned call's result never needs this package's classes to be unpickled by whoever
reads it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from serving.config.layout import compile_model_dir, deepgemm_dir, dummy_weights_dir, weights_dir
from serving.config.profile import Profile
from serving.engines.deepgemm import CompileFailed, compile_kernels
from serving.platforms.modal.resources import Syncable, reload_read_only
from serving.verification import check_serving_config, verify_revision
from serving.weights.download import Transfer, download_files, merge
from serving.weights.download import download as download_revision
from serving.weights.hub import SERVING_CONFIG_PATTERNS, fetch_model_config, revision_files
from serving.weights.models import DownloadResult, FileEntry, ShardResult

log = logging.getLogger(__name__)

# CPU containers with the volume to themselves: hf_xet at full concurrency.
FULL_SPEED = Transfer(high_performance=True)


def _quiet_hub() -> None:
    # tqdm bars in container logs are noise; serving.weights logs its own progress lines.
    from huggingface_hub.utils import disable_progress_bars

    disable_progress_bars()


def _commit_keeping_error(volume: Syncable) -> None:
    """Commit while an exception is propagating: a failed commit must not hide the cause."""
    try:
        volume.commit()
    except Exception as exc:  # the original error is the one worth raising
        log.warning("volume commit after a failure failed too: %s", type(exc).__name__)


def download_body(
    profile: Profile,
    revision: str,
    *,
    root: Path,
    volume: Syncable,
    paths: list[str] | None = None,
    files: list[dict[str, Any]] | None = None,
    token: str | None = None,
    endpoint: str | None = None,
) -> dict[str, Any]:
    """The whole revision (`paths` None: DownloadResult, sentinel written) or one shard of it
    (ShardResult, no sentinel: `merge_body` writes it once all shards are in).

    `files` is the revision's file list as the orchestrator fetched it, so N shards do not
    make N metadata calls.
    """
    _quiet_hub()
    volume.reload()
    try:
        result: DownloadResult | ShardResult
        if paths is None:
            result = download_revision(
                profile, revision, root, token=token, endpoint=endpoint, transfer=FULL_SPEED
            )
        else:
            result = download_files(
                profile.hub.repo,
                revision,
                weights_dir(root, profile, revision),
                paths,
                token=token,
                endpoint=endpoint,
                transfer=FULL_SPEED,
                files=[FileEntry.model_validate(f) for f in files] if files is not None else None,
            )
    except BaseException:
        # Files that finished are kept for Modal's retry of this input (no sentinel is written,
        # so nothing unverified is ever trusted); the next run removes the partial ones.
        _commit_keeping_error(volume)
        raise
    volume.commit()
    return result.model_dump(mode="json")


def merge_body(
    profile: Profile,
    revision: str,
    shards: list[dict[str, Any]],
    *,
    root: Path,
    volume: Syncable,
    files: list[dict[str, Any]] | None = None,
    token: str | None = None,
    endpoint: str | None = None,
) -> dict[str, Any]:
    """The sentinel of a sharded download, written only if the shards together verified exactly
    the profile's selection of files (serving.weights.merge). Returns a DownloadResult."""
    volume.reload()  # the shards committed their files from other containers
    results = [ShardResult.model_validate(shard) for shard in shards]
    hub = profile.hub
    all_files, expected = revision_files(
        hub.repo, revision, hub.allow_patterns, hub.ignore_patterns, token=token,
        endpoint=endpoint,
        known=[FileEntry.model_validate(f) for f in files] if files is not None else None,
    )  # fmt: skip
    directory = weights_dir(root, profile, revision)
    manifest = merge(
        directory,
        results,
        expected,
        allow_patterns=hub.allow_patterns,
        ignore_patterns=hub.ignore_patterns,
        revision_paths=[entry.path for entry in all_files],
    )
    volume.commit()
    return DownloadResult(
        directory=directory,
        manifest=manifest,
        cached=False,
        refetched=sorted({path for shard in results for path in shard.refetched}),
        attempts=len(results),
        seconds=(manifest.finished_at - manifest.started_at).total_seconds(),
        bytes_downloaded=sum(shard.bytes_downloaded for shard in results),
    ).model_dump(mode="json")


def verify_body(
    profile: Profile,
    revision: str,
    *,
    weights_root: Path,
    weights_volume: Syncable,
    deepgemm_root: Path | None = None,
    deepgemm_volume: Syncable | None = None,
    token: str | None = None,
    endpoint: str | None = None,
) -> dict[str, Any]:
    """Stage 4 on the volume: every file hashed against the sentinel's manifest, bad ones
    re-fetched; the DeepGEMM marker of the current cache key (read-only mount). Returns a
    serving.platform.VerifyResult."""
    _quiet_hub()
    weights_volume.reload()
    if deepgemm_volume is not None:
        reload_read_only([deepgemm_volume])
    try:
        result = verify_revision(
            profile,
            revision,
            weights_root=weights_root,
            deepgemm_root=deepgemm_root,
            # On Modal the compile always runs on the profile's GPUs: no marker is a problem.
            compile_required=True,
            token=token,
            endpoint=endpoint,
        )
    except BaseException:
        _commit_keeping_error(weights_volume)
        raise
    weights_volume.commit()  # repaired files, and the fresh sentinel written after a repair
    return result.model_dump(mode="json")


def serving_config_body(
    profile: Profile,
    revision: str,
    *,
    root: Path,
    volume: Syncable,
    token: str | None = None,
    endpoint: str | None = None,
) -> dict[str, Any]:
    """Dummy weights: the revision's config and tokenizer (SERVING_CONFIG_PATTERNS) into its
    dummy directory of the weights volume, checked as a dummy release's verify; never a weight
    file, never a sentinel, never the real weights' directory. Returns a
    serving.verification.ServingConfigCheck."""
    _quiet_hub()
    volume.reload()
    directory = fetch_model_config(
        profile.hub.repo,
        revision,
        dummy_weights_dir(root, profile, revision),
        token=token,
        endpoint=endpoint,
        patterns=SERVING_CONFIG_PATTERNS,
    )
    volume.commit()
    return check_serving_config(profile, directory).model_dump(mode="json")


def compile_body(
    profile: Profile,
    revision: str,
    *,
    deepgemm_root: Path,
    deepgemm_volume: Syncable,
    timeout_seconds: int,
    token: str | None = None,
    endpoint: str | None = None,
    **compile_options: Any,
) -> dict[str, Any]:
    """DeepGEMM kernels of a revision into the cache volume (serving.deepgemm.compile_kernels).

    Kernel shapes depend only on config.json, so the compile runs on dummy weights from the
    model's config fetched into the cache volume (layout.compile_model_dir): it does not wait
    for the download. `compile_options` go to compile_kernels (tests inject `run`).
    """
    _quiet_hub()
    deepgemm_volume.reload()
    model_dir = fetch_model_config(
        profile.hub.repo,
        revision,
        compile_model_dir(deepgemm_root, profile, revision),
        token=token,
        endpoint=endpoint,
    )
    if not (model_dir / "config.json").is_file():
        raise CompileFailed(f"{profile.hub.repo}@{revision[:8]}: no config.json in {model_dir}")
    result = compile_kernels(
        profile,
        revision=revision,
        weights_path=model_dir,
        cache_dir=deepgemm_dir(deepgemm_root, profile),
        timeout_seconds=timeout_seconds,
        **compile_options,
    )
    # Only after success: a failed compile may leave half-written kernels that a server would
    # load; the marker, written last, is what says "done".
    deepgemm_volume.commit()
    return result.model_dump(mode="json")
