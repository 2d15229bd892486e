"""The verify stage's repair: it starts from the first verify report, re-fetches only the bad
files, hashed as they arrive; the sentinel is written last, and only when every file matches.

Real huggingface_hub against the local mirror; bytes read to hash are counted by wrapping the
real reading hash function (serving.weights.digests.hash_file), which every read goes through.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dev.demo_model import shard_name
from dev.mirror import MirrorServer
from dev.mirror_faults import ErrorFault
from serving.config.layout import SENTINEL_NAME
from serving.config.loader import load_profile
from serving.config.profile import HubSource, Profile, Secrets
from serving.verification import verify_revision
from serving.weights import digests
from serving.weights.digests import HashStatus
from serving.weights.download import Transfer, download, read_sentinel, repair_download
from serving.weights.models import FileEntry, WeightsError
from serving.weights.verify import verify
from tests.mirror_fixtures import SYNTHETIC_SHARDS, SyntheticRepo


def profile_of(repo_id: str) -> Profile:
    return load_profile("smollm2-135m").model_copy(
        update={"hub": HubSource(repo=repo_id, revision="main"), "secrets": Secrets()}
    )


def count_hashing(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Bytes read by the real hash function, per repo path."""
    hashed: dict[str, int] = {}
    real = digests.hash_file

    def counted(path: Path, entry: FileEntry) -> tuple[HashStatus, int]:
        status, read = real(path, entry)
        hashed[entry.path] = hashed.get(entry.path, 0) + read
        return status, read

    monkeypatch.setattr(digests, "hash_file", counted)
    return hashed


def flip_a_byte(path: Path) -> None:
    """Same size, different content, and the mtime set back: only the hash, or the ctime that
    no one can set back, can tell."""
    before = path.stat()
    with path.open("r+b") as f:
        f.seek(before.st_size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


def resolve_gets(mirror: MirrorServer) -> list[str]:
    return sorted(
        r.path.split("/resolve/", 1)[1].split("/", 1)[1]
        for r in mirror.requests
        if r.method == "GET" and "/resolve/" in r.path
    )


def test_a_shard_changed_after_the_download_is_read_once_and_fetched_alone(
    mirror: MirrorServer,
    synthetic_repo: SyntheticRepo,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    profile = profile_of(synthetic_repo.repo_id)
    root = tmp_path / "weights"
    first = download(profile, synthetic_repo.v1, root, endpoint=mirror.url, progress=None)
    bad = shard_name(1, len(SYNTHETIC_SHARDS))
    flip_a_byte(first.directory / bad)
    mirror.clear_requests()
    hashed = count_hashing(monkeypatch)

    result = verify_revision(
        profile, synthetic_repo.v1, weights_root=root, deepgemm_root=None,
        compile_required=False, endpoint=mirror.url,
    )  # fmt: skip

    assert result.passed and result.repaired == [bad]
    # The changed shard is read once, to find it bad; the others stand on the download's
    # stamps; the shard fetched again is hashed as it arrives.
    assert hashed == {bad: SYNTHETIC_SHARDS[1]}
    assert result.weights.bytes_hashed == SYNTHETIC_SHARDS[1]
    assert result.weights.bytes_trusted == first.manifest.bytes_total
    assert resolve_gets(mirror) == [bad]  # only that shard came from the hub again
    assert result.weights.ok == sorted(entry.path for entry in first.manifest.files)
    fresh = read_sentinel(first.directory, synthetic_repo.repo_id, synthetic_repo.v1)
    assert fresh is not None and fresh.files == first.manifest.files
    assert fresh.finished_at > first.manifest.finished_at
    # The new sentinel stands for the new shard: the next proof reads nothing.
    assert fresh.stamps[bad] != first.manifest.stamps[bad]
    again = verify_revision(
        profile, synthetic_repo.v1, weights_root=root, deepgemm_root=None,
        compile_required=False, endpoint=mirror.url,
    )  # fmt: skip
    assert again.passed and again.weights.bytes_hashed == 0 and hashed == {bad: SYNTHETIC_SHARDS[1]}


def test_a_repair_that_cannot_fetch_leaves_no_sentinel(
    mirror: MirrorServer, synthetic_repo: SyntheticRepo, tmp_path: Path
) -> None:
    profile = profile_of(synthetic_repo.repo_id)
    root = tmp_path / "weights"
    first = download(profile, synthetic_repo.v1, root, endpoint=mirror.url, progress=None)
    bad = shard_name(1, len(SYNTHETIC_SHARDS))
    flip_a_byte(first.directory / bad)
    report = verify(first.directory, first.manifest.files)
    assert report.bad == [bad]
    mirror.set_faults(error=ErrorFault(paths=f"*/resolve/*/{bad}", methods=["GET"], status=502))

    with pytest.raises(WeightsError, match="502"):
        repair_download(
            first.directory, first.manifest, report, endpoint=mirror.url,
            transfer=Transfer(attempts=2, backoff_s=0.05),
        )  # fmt: skip

    # Nothing unverified is ever trusted: the old sentinel went before the first delete.
    assert not (first.directory / SENTINEL_NAME).exists()
    assert not (first.directory / bad).exists()
