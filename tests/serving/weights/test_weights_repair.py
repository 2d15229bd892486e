"""The verify stage's repair: it starts from the first verify report, re-fetches only the bad
files and hashes only those again; the sentinel is written last, and only when every file matches.

Real huggingface_hub against the local mirror; bytes hashed are counted by wrapping the real
hashing function (serving.weights.verify.hash_file), which every hash goes through.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dev.demo_model import make_synthetic_repo, shard_name
from dev.mirror import MirrorServer
from dev.mirror_faults import ErrorFault
from dev.mirror_store import MirrorStore
from serving.config.layout import SENTINEL_NAME
from serving.config.loader import load_profile
from serving.config.profile import HubSource, Profile, Secrets
from serving.verification import verify_revision
from serving.weights import verify as weights_verify
from serving.weights.download import Transfer, download, read_sentinel, repair_download
from serving.weights.models import FileEntry, GiB, MiB, WeightsError
from serving.weights.verify import HashStatus, verify
from tests.mirror_fixtures import SYNTHETIC_SHARDS, SyntheticRepo

GIB_SHARDS = [256 * MiB] * 4
# One full pass over the revision plus the one bad shard again is 1.25 GiB.
HASH_BUDGET = int(1.3 * GiB)


def profile_of(repo_id: str) -> Profile:
    return load_profile("smollm2-135m").model_copy(
        update={"hub": HubSource(repo=repo_id, revision="main"), "secrets": Secrets()}
    )


def count_hashing(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Bytes read by the real hash function, per repo path."""
    hashed: dict[str, int] = {}
    real = weights_verify.hash_file

    def counted(path: Path, entry: FileEntry) -> tuple[HashStatus, int]:
        status, read = real(path, entry)
        hashed[entry.path] = hashed.get(entry.path, 0) + read
        return status, read

    monkeypatch.setattr(weights_verify, "hash_file", counted)
    return hashed


def flip_a_byte(path: Path) -> None:
    """Same size, different content: only the hash can tell."""
    with path.open("r+b") as f:
        f.seek(path.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))


def resolve_gets(mirror: MirrorServer) -> list[str]:
    return sorted(
        r.path.split("/resolve/", 1)[1].split("/", 1)[1]
        for r in mirror.requests
        if r.method == "GET" and "/resolve/" in r.path
    )


def test_one_bad_shard_of_1_gib_is_hashed_once_more_and_fetched_alone(
    mirror: MirrorServer,
    mirror_store: MirrorStore,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    repo_id = f"weights-test/one-gib-{os.getpid()}"
    sha = make_synthetic_repo(mirror_store, repo_id, GIB_SHARDS, seed=7)
    profile = profile_of(repo_id)
    root = tmp_path / "weights"
    first = download(profile, sha, root, endpoint=mirror.url, progress=None)
    bad = shard_name(2, len(GIB_SHARDS))
    flip_a_byte(first.directory / bad)
    mirror.clear_requests()
    hashed = count_hashing(monkeypatch)

    result = verify_revision(
        profile, sha, weights_root=root, deepgemm_root=None, compile_required=False,
        endpoint=mirror.url,
    )  # fmt: skip

    total_hashed = sum(hashed.values())
    assert result.passed and result.repaired == [bad]
    assert total_hashed <= HASH_BUDGET, f"{total_hashed / GiB:.2f} GiB hashed"
    assert hashed[bad] == 2 * GIB_SHARDS[2]  # the first pass, and once after the re-fetch
    good = [entry for entry in first.manifest.files if entry.path != bad]
    assert all(hashed[entry.path] == entry.size for entry in good)  # once each
    assert resolve_gets(mirror) == [bad]  # only that shard came from the hub again
    assert result.weights.ok == sorted(entry.path for entry in first.manifest.files)
    fresh = read_sentinel(first.directory, repo_id, sha)
    assert fresh is not None and fresh.files == first.manifest.files
    assert fresh.finished_at > first.manifest.finished_at


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
