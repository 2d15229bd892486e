"""Hashing in flight: a download proves each file as it arrives, so its proof, and the verify
stage after it, read nothing it hashed; the stamps in the sentinel make a file changed since
be read again.

Real huggingface_hub against the local mirror. Reads are counted by the verifier's own counters
(VerifyReport.bytes_hashed, DownloadResult.proof_bytes_read) and by wrapping the one function
that reads a file to hash it (serving.weights.digests.hash_file).
"""

from __future__ import annotations

import hashlib
import io
import os
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import get_args

import pytest
from huggingface_hub import constants

from dev.mirror import MirrorServer
from dev.mirror_faults import CorruptFault, CutFault
from serving.config.layout import SENTINEL_NAME
from serving.verification import verify_revision
from serving.weights.digests import HASH_BATCH, HashingWriter
from serving.weights.download import Transfer, download, read_sentinel, write_sentinel
from serving.weights.fetch import HashMethod, fetch_proven
from serving.weights.hub import fetch_files
from serving.weights.models import FileEntry, Stamp
from serving.weights.verify import EVIDENCE_FRESH_FOR, verify
from tests.mirror_fixtures import BIG_SHARD, MID_SHARD, SYNTHETIC_SHARDS, SyntheticRepo
from tests.serving.weights.test_weights_repair import (
    count_hashing,
    flip_a_byte,
    profile_of,
    resolve_gets,
)

CLOCK_DEADLINE_S = 5.0


def after_the_filesystem_clock_passes(stamp: Stamp, directory: Path) -> None:
    """A write now gets a ctime after `stamp`'s, even where timestamps are coarse (one tick)."""
    probe = directory / "clock-probe"
    deadline = time.monotonic() + CLOCK_DEADLINE_S
    while True:
        probe.write_bytes(b"")
        if probe.stat().st_ctime_ns > stamp.ctime_ns:
            probe.unlink()
            return
        assert time.monotonic() < deadline, "the filesystem clock did not move"
        time.sleep(0.001)


@pytest.mark.parametrize("method", get_args(HashMethod))
def test_a_fresh_download_is_proven_without_reading_it_again(
    method: HashMethod,
    mirror: MirrorServer,
    synthetic_repo: SyntheticRepo,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    profile = profile_of(synthetic_repo.repo_id)
    root = tmp_path / "weights"
    reads = count_hashing(monkeypatch)

    first = download(
        profile, synthetic_repo.v1, root, endpoint=mirror.url, progress=None,
        transfer=Transfer(hashing=method),
    )  # fmt: skip

    files = first.manifest.files
    assert first.proof_bytes_read == 0
    assert sorted(first.manifest.stamps) == sorted(entry.path for entry in files)
    # "stream" hashes the bytes on their way to disk; "reread" reads each file once, right
    # after huggingface_hub wrote it. Neither reads anything for the proof.
    expected = {} if method == "stream" else {entry.path: entry.size for entry in files}
    assert reads == expected
    reads.clear()

    proof = verify_revision(
        profile, synthetic_repo.v1, weights_root=root, deepgemm_root=None,
        compile_required=False, endpoint=mirror.url,
    )  # fmt: skip

    assert proof.passed and proof.repaired == []
    assert proof.weights.bytes_hashed == 0 and reads == {}
    assert proof.weights.bytes_trusted == first.manifest.bytes_total


def test_a_cut_download_resumes_where_the_socket_stopped_and_is_still_proven(
    mirror: MirrorServer, synthetic_repo: SyntheticRepo, tmp_path: Path
) -> None:
    # Each socket read goes to disk as it arrives (huggingface_hub's 10 MiB re-chunking is
    # off while we fetch), so a cut loses nothing: the resume asks for the very next byte.
    cut_at = SYNTHETIC_SHARDS[0] // 3
    mirror.set_faults(cut=CutFault(after_bytes=cut_at, paths=f"*/resolve/*/{BIG_SHARD}", times=1))
    chunk_size = constants.DOWNLOAD_CHUNK_SIZE
    files = fetch_files(synthetic_repo.repo_id, synthetic_repo.v1, endpoint=mirror.url)
    evidence: dict[str, Stamp] = {}

    fetch_proven(
        synthetic_repo.repo_id, synthetic_repo.v1, tmp_path, files, evidence,
        token=None, endpoint=mirror.url,
    )  # fmt: skip

    gets = [r for r in mirror.requests if r.method == "GET" and r.path.endswith(BIG_SHARD)]
    assert [(r.status, r.range) for r in gets] == [(200, None), (206, f"bytes={cut_at}-")]
    assert sorted(evidence) == sorted(entry.path for entry in files)  # hashed across the resume
    assert chunk_size == constants.DOWNLOAD_CHUNK_SIZE  # the library's own setting is back


def test_a_file_changed_between_download_and_proof_is_read_and_found_bad(
    mirror: MirrorServer, synthetic_repo: SyntheticRepo, tmp_path: Path
) -> None:
    files = fetch_files(synthetic_repo.repo_id, synthetic_repo.v1, endpoint=mirror.url)
    evidence: dict[str, Stamp] = {}
    fetch_proven(
        synthetic_repo.repo_id, synthetic_repo.v1, tmp_path, files, evidence,
        token=None, endpoint=mirror.url,
    )  # fmt: skip
    assert sorted(evidence) == sorted(entry.path for entry in files)
    after_the_filesystem_clock_passes(evidence[MID_SHARD], tmp_path)
    flip_a_byte(tmp_path / MID_SHARD)  # same size, mtime set back

    report = verify(tmp_path, files, evidence=evidence)

    assert report.bad == [MID_SHARD]
    assert report.bytes_hashed == SYNTHETIC_SHARDS[1]
    assert MID_SHARD not in report.stamps


def test_a_file_corrupted_on_the_wire_is_read_once_and_fetched_again(
    mirror: MirrorServer, synthetic_repo: SyntheticRepo, tmp_path: Path
) -> None:
    mirror.set_faults(corrupt=CorruptFault(paths=f"*/resolve/*/{MID_SHARD}", times=1))

    result = download(
        profile_of(synthetic_repo.repo_id), synthetic_repo.v2, tmp_path, endpoint=mirror.url,
        progress=None,
    )  # fmt: skip

    # Its hash failed as it arrived, so the proof read it to name it; the fetch again was
    # hashed in flight, and the sentinel stands for every file.
    assert result.refetched == [MID_SHARD]
    assert result.proof_bytes_read == SYNTHETIC_SHARDS[1]
    assert resolve_gets(mirror).count(MID_SHARD) == 2
    assert sorted(result.manifest.stamps) == sorted(e.path for e in result.manifest.files)
    assert verify(result.directory, result.manifest.files).passed


def test_an_old_download_is_read_again(
    mirror: MirrorServer, synthetic_repo: SyntheticRepo, tmp_path: Path
) -> None:
    profile = profile_of(synthetic_repo.repo_id)
    root = tmp_path / "weights"
    first = download(profile, synthetic_repo.v1, root, endpoint=mirror.url, progress=None)
    aged = first.manifest.model_copy(
        update={"finished_at": first.manifest.finished_at - EVIDENCE_FRESH_FOR - timedelta(1)}
    )
    write_sentinel(first.directory, aged)

    proof = verify_revision(
        profile, synthetic_repo.v1, weights_root=root, deepgemm_root=None,
        compile_required=False, endpoint=mirror.url,
    )  # fmt: skip

    assert proof.passed and proof.weights.bytes_trusted == 0
    assert proof.weights.bytes_hashed == first.manifest.bytes_total
    assert read_sentinel(first.directory, synthetic_repo.repo_id, synthetic_repo.v1) == aged
    assert (first.directory / SENTINEL_NAME).exists()


SOCKET_READ = 64 * 1024  # what http_get hands on: one socket read at a time


def write_in_reads(writer: HashingWriter, data: bytes) -> None:
    for start in range(0, len(data), SOCKET_READ):
        writer.write(data[start : start + SOCKET_READ])


def lfs_entry(data: bytes) -> FileEntry:
    return FileEntry(
        path="shard.safetensors", size=len(data), lfs=True, sha256=hashlib.sha256(data).hexdigest()
    )


def test_the_hash_starts_over_when_the_download_does() -> None:
    # Over one batch, so part of the first attempt is on the hashing thread when it restarts.
    data = os.urandom(2 * HASH_BATCH + 4096)
    with HashingWriter(io.BytesIO(), lfs_entry(data)) as writer:
        write_in_reads(writer, data[: HASH_BATCH + 1000])
        # What http_get does when a server ignores Range on a resume: back to the start.
        writer.seek(0)
        writer.truncate()
        write_in_reads(writer, data)
        assert writer.matches()

        writer.seek(10)  # anywhere else: no digest can be trusted, the file will be read
        assert not writer.matches()


def test_the_hashing_thread_ends_with_a_failed_download() -> None:
    data = os.urandom(2 * HASH_BATCH)
    with pytest.raises(ConnectionResetError), HashingWriter(io.BytesIO(), lfs_entry(data)) as w:
        write_in_reads(w, data[: HASH_BATCH + 1000])
        raise ConnectionResetError  # http_get gave up
    assert not [t for t in threading.enumerate() if t.name.startswith("hash ")]
