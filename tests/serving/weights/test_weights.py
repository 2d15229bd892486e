"""serving.weights: the real huggingface_hub against the local mirror over loopback.

In-process calls pass `endpoint=mirror.url` (huggingface_hub reads HF_ENDPOINT only at import);
the subprocess tests (SIGKILL, disk full, the one-line CLI error) pass `--endpoint`.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dev.demo_model import make_synthetic_repo
from dev.mirror import MirrorServer
from dev.mirror_api import parse_range
from dev.mirror_faults import CutFault, ErrorFault
from dev.mirror_store import KiB, MiB, MirrorStore
from serving.config.layout import SENTINEL_NAME, weights_dir
from serving.config.loader import load_profile
from serving.config.profile import HubSource, Secrets
from serving.core.home import REPO_ROOT
from serving.weights.download import (
    Transfer,
    download,
    download_files,
    download_repo,
    merge,
    plan_shards,
    read_sentinel,
    repair_download,
)
from serving.weights.hub import fetch_files, fetch_model_config, resolve_revision
from serving.weights.models import HF_DOWNLOAD_DIR, FileEntry, Progress, WeightsError
from serving.weights.verify import list_present, verify
from tests.mirror_fixtures import (
    BIG_SHARD,
    MID_SHARD,
    SHARD_COUNT,
    SYNTHETIC_SHARDS,
    SyntheticRepo,
    hf_env,
)
from tests.weights_fixtures import can_mount_private_tmpfs, in_tiny_tmpfs

SUBPROCESS_TIMEOUT_S = 60
FAST_BACKOFF_S = 0.05
TOKEN = "hf_test_SECRET_token_value_1234567890"


def resolve_gets(mirror: MirrorServer) -> list[str]:
    """Repo paths of the file GETs that reached the mirror."""
    return sorted(
        r.path.split("/resolve/", 1)[1].split("/", 1)[1]
        for r in mirror.requests
        if r.method == "GET" and "/resolve/" in r.path
    )


def bytes_served(mirror: MirrorServer, repo_id: str, sha: str) -> int:
    """Body bytes of the file GETs the mirror answered, from its request log (whole files or
    the asked ranges)."""
    sizes = {f.path: f.size for f in mirror.store.revision(repo_id, sha).files}
    served = 0
    for r in mirror.requests:
        if r.method == "GET" and "/resolve/" in r.path and r.status in (200, 206):
            size = sizes[r.path.split("/resolve/", 1)[1].split("/", 1)[1]]
            start, end = parse_range(r.range, size) or (0, size - 1)
            served += end - start + 1
    return served


def incomplete_files(directory: Path) -> list[Path]:
    return sorted((directory / HF_DOWNLOAD_DIR).rglob("*.incomplete"))


def run_cli(args: list[str], home: Path, endpoint: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "serving.weights", *args],
        cwd=REPO_ROOT,
        env=hf_env(endpoint, home) | {TOKEN_ENV: TOKEN},
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT_S,
    )


TOKEN_ENV = "ROLLOUT_TEST_HF_TOKEN"
NOT_FOUND_LINE = "repo nobody/nothing not found (or private, and the token has no access)"


def test_fresh_download_verifies_then_writes_the_sentinel(
    mirror: MirrorServer, mirror_store: MirrorStore, synthetic_repo: SyntheticRepo, tmp_path: Path
) -> None:
    reports: list[Progress] = []
    result = download_repo(
        synthetic_repo.repo_id, synthetic_repo.v1, tmp_path, endpoint=mirror.url,
        progress=reports.append, token=TOKEN,
    )  # fmt: skip

    assert not result.cached
    meta = mirror_store.revision(synthetic_repo.repo_id, synthetic_repo.v1)
    assert {f.path: f.size for f in result.manifest.files} == {f.path: f.size for f in meta.files}
    truths = sorted(meta.files, key=lambda f: f.path)
    for entry, truth in zip(result.manifest.files, truths, strict=True):
        assert entry.sha256 == (truth.lfs.sha256 if truth.lfs else None)
        # every byte on disk is the mirror's
        assert (tmp_path / entry.path).read_bytes() == mirror_store.file_path(
            synthetic_repo.repo_id, synthetic_repo.v1, entry.path
        ).read_bytes()
    on_disk = json.loads((tmp_path / SENTINEL_NAME).read_text())
    assert on_disk["revision"] == synthetic_repo.v1
    assert on_disk["bytes_total"] == sum(SYNTHETIC_SHARDS) + sum(
        f.size for f in meta.files if not f.path.endswith(".safetensors")
    )
    assert TOKEN not in (tmp_path / SENTINEL_NAME).read_text()
    assert {p.phase for p in reports} == {"download", "verify"}
    assert reports[-1].bytes_done == reports[-1].bytes_total == result.manifest.bytes_total
    assert incomplete_files(tmp_path) == []
    assert resolve_gets(mirror) == sorted(f.path for f in meta.files)  # each file fetched once
    served = bytes_served(mirror, synthetic_repo.repo_id, synthetic_repo.v1)
    assert result.bytes_downloaded == result.manifest.bytes_total == served


def test_rerun_with_a_sentinel_makes_zero_requests(
    mirror: MirrorServer, synthetic_repo: SyntheticRepo, tmp_path: Path
) -> None:
    first = download_repo(synthetic_repo.repo_id, synthetic_repo.v1, tmp_path, endpoint=mirror.url)
    mirror.clear_requests()

    began = time.perf_counter()
    again = download_repo(synthetic_repo.repo_id, synthetic_repo.v1, tmp_path, endpoint=mirror.url)
    elapsed = time.perf_counter() - began

    assert again.cached and again.manifest == first.manifest
    assert mirror.requests == []
    assert first.bytes_downloaded > 0 and again.bytes_downloaded == 0
    assert elapsed < 0.5


def test_branch_move_gives_a_new_directory_and_leaves_the_old_one(
    mirror: MirrorServer, mirror_store: MirrorStore, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    repo_id = f"weights-test/moving-{request.node.name[-20:].strip('_')}-{os.getpid()}"
    old_sha = make_synthetic_repo(mirror_store, repo_id, [64 * KiB], seed=10)
    profile = load_profile("smollm2-135m").model_copy(
        update={"hub": HubSource(repo=repo_id, revision="main"), "secrets": Secrets()}
    )
    root = tmp_path / "weights"

    assert resolve_revision(repo_id, "main", endpoint=mirror.url) == old_sha
    old = download(profile, old_sha, root, endpoint=mirror.url)
    assert old.directory == weights_dir(root, profile, old_sha)
    before = {p: p.stat().st_mtime_ns for p in old.directory.rglob("*") if p.is_file()}

    new_sha = make_synthetic_repo(mirror_store, repo_id, [64 * KiB], seed=11)
    assert resolve_revision(repo_id, "main", endpoint=mirror.url) == new_sha != old_sha
    new = download(profile, new_sha, root, endpoint=mirror.url)

    assert new.directory == root / repo_id / new_sha != old.directory
    assert {p: p.stat().st_mtime_ns for p in old.directory.rglob("*") if p.is_file()} == before
    assert read_sentinel(old.directory, repo_id, old_sha) == old.manifest
    assert verify(old.directory, old.manifest.files).passed


def test_a_sentinel_write_cut_short_is_not_a_repo_file(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / SENTINEL_NAME).write_text("{}")
    (tmp_path / f".{SENTINEL_NAME}.k3x9q.tmp").write_text("{")  # killed mid-write
    assert list_present(tmp_path) == {"config.json"}


def test_a_resolved_sha_makes_no_request(mirror: MirrorServer) -> None:
    assert resolve_revision("any/repo", "a" * 40, endpoint=mirror.url) == "a" * 40
    assert mirror.requests == []


def test_sigkill_mid_download_then_the_rerun_completes_without_orphans(
    mirror: MirrorServer, synthetic_repo: SyntheticRepo, tmp_path: Path
) -> None:
    target = tmp_path / "weights"
    mirror.set_faults(throttle_bytes_per_s=512 * KiB)  # the 3 MiB shard takes ~6 s
    args = ["download", synthetic_repo.repo_id, "--revision", synthetic_repo.v2,
            "--dir", str(target), "--endpoint", mirror.url]  # fmt: skip
    child = subprocess.Popen(
        [sys.executable, "-m", "serving.weights", *args],
        cwd=REPO_ROOT, env=hf_env(mirror.url, tmp_path / "home"),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + SUBPROCESS_TIMEOUT_S
        # huggingface_hub writes a partial file in 10 MiB chunks: it exists, maybe still empty.
        while not incomplete_files(target):
            assert child.poll() is None, "the download finished before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(0.5)
        assert child.poll() is None, "the download finished before it could be killed"
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    orphans = incomplete_files(target)
    assert orphans, "a killed download leaves partial files behind"
    assert not (target / SENTINEL_NAME).exists()

    mirror.clear_faults()
    mirror.clear_requests()
    result = download_repo(synthetic_repo.repo_id, synthetic_repo.v2, target, endpoint=mirror.url)

    # What this run fetched, not the whole revision: the files the killed run finished stay.
    served = bytes_served(mirror, synthetic_repo.repo_id, synthetic_repo.v2)
    assert result.bytes_downloaded == served
    assert 0 < served < result.manifest.bytes_total
    assert incomplete_files(target) == []
    assert verify(target, result.manifest.files).passed
    assert read_sentinel(target, synthetic_repo.repo_id, synthetic_repo.v2) == result.manifest


def test_a_corrupted_file_is_named_and_only_it_is_refetched(
    mirror: MirrorServer, synthetic_repo: SyntheticRepo, tmp_path: Path
) -> None:
    first = download_repo(synthetic_repo.repo_id, synthetic_repo.v1, tmp_path, endpoint=mirror.url)
    shard = tmp_path / MID_SHARD
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the hash can tell
    shard.write_bytes(bytes(data))
    (tmp_path / "config.json").write_text("{}")  # wrong size: found without hashing
    (tmp_path / "stray.bin").write_bytes(b"not in the revision")

    report = verify(tmp_path, first.manifest.files)
    assert report.bad == sorted(["config.json", MID_SHARD])
    assert report.missing == []
    assert report.extra == ["stray.bin"]
    assert not report.passed
    mirror.clear_requests()

    # The verify stage: repair from that report, only what is bad.
    final, refetched = repair_download(tmp_path, first.manifest, report, endpoint=mirror.url)

    assert sorted(refetched) == sorted(["config.json", MID_SHARD])
    assert resolve_gets(mirror) == sorted(["config.json", MID_SHARD])
    assert final.passed and final.ok == sorted(f.path for f in first.manifest.files)
    assert verify(tmp_path, first.manifest.files).passed
    repaired = read_sentinel(tmp_path, synthetic_repo.repo_id, synthetic_repo.v1)
    assert repaired is not None and repaired.files == first.manifest.files
    assert repaired.extra == ["stray.bin"]


def test_a_missing_file_is_reported_and_refetched(
    mirror: MirrorServer, synthetic_repo: SyntheticRepo, tmp_path: Path
) -> None:
    first = download_repo(synthetic_repo.repo_id, synthetic_repo.v1, tmp_path, endpoint=mirror.url)
    (tmp_path / BIG_SHARD).unlink()
    assert verify(tmp_path, first.manifest.files).missing == [BIG_SHARD]
    (tmp_path / SENTINEL_NAME).unlink()  # as after a crash between download and sentinel
    mirror.clear_requests()

    again = download_repo(synthetic_repo.repo_id, synthetic_repo.v1, tmp_path, endpoint=mirror.url)

    assert resolve_gets(mirror) == [BIG_SHARD]
    assert not again.cached and verify(tmp_path, again.manifest.files).passed
    assert again.bytes_downloaded == SYNTHETIC_SHARDS[0]


def test_a_cut_connection_is_resumed(
    mirror: MirrorServer, synthetic_repo: SyntheticRepo, tmp_path: Path
) -> None:
    mirror.set_faults(cut=CutFault(paths=f"*/{BIG_SHARD}", after_bytes=MiB, times=1))

    result = download_repo(synthetic_repo.repo_id, synthetic_repo.v2, tmp_path, endpoint=mirror.url)

    assert verify(tmp_path, result.manifest.files).passed
    # huggingface_hub writes 10 MiB chunks, so a cut inside the first one restarts the file
    # (no Range) within the same call; our attempt counter never had to move.
    gets = [r for r in mirror.requests if r.method == "GET" and r.path.endswith(BIG_SHARD)]
    assert len(gets) == 2
    assert result.attempts == 2  # metadata + one download


def failed_gets(mirror: MirrorServer, status: int) -> int:
    return sum(1 for r in mirror.requests if r.method == "GET" and r.status == status)


def test_a_file_get_5xx_is_retried_by_us(
    mirror: MirrorServer, synthetic_repo: SyntheticRepo, tmp_path: Path
) -> None:
    # GETs only: huggingface_hub retries a failed HEAD itself for ~23 s before any GET.
    mirror.set_faults(
        error=ErrorFault(paths=f"*/resolve/*/{MID_SHARD}", methods=["GET"], times=2, status=503)
    )

    result = download_repo(
        synthetic_repo.repo_id, synthetic_repo.v2, tmp_path, endpoint=mirror.url,
        transfer=Transfer(attempts=4, backoff_s=FAST_BACKOFF_S),
    )  # fmt: skip

    assert failed_gets(mirror, 503) == 2
    assert result.attempts >= 3  # metadata + two failed downloads + the good one
    assert verify(tmp_path, result.manifest.files).passed


def test_a_persistent_5xx_fails_with_one_line_and_no_sentinel(
    mirror: MirrorServer, synthetic_repo: SyntheticRepo, tmp_path: Path
) -> None:
    mirror.set_faults(
        error=ErrorFault(paths=f"*/resolve/*/{MID_SHARD}", methods=["GET"], status=502)
    )

    with pytest.raises(WeightsError) as caught:
        download_repo(
            synthetic_repo.repo_id, synthetic_repo.v2, tmp_path, endpoint=mirror.url,
            transfer=Transfer(attempts=3, backoff_s=FAST_BACKOFF_S), token=TOKEN,
        )  # fmt: skip

    message = str(caught.value)
    assert "\n" not in message and TOKEN not in message
    assert "after 3 attempt" in message and "502" in message
    assert failed_gets(mirror, 502) == 3
    assert not (tmp_path / SENTINEL_NAME).exists()


@pytest.mark.parametrize(
    ("repo", "revision", "expected"),
    [
        ("nobody/nothing", "main", "repo nobody/nothing not found"),
        (None, "no-such-branch", "revision 'no-such-branch' not found"),
        (None, "0" * 40, f"revision '{'0' * 40}' not found"),
    ],
    ids=["repo", "branch", "sha"],
)
def test_not_found_is_one_clear_line_and_no_directory(
    mirror: MirrorServer,
    synthetic_repo: SyntheticRepo,
    tmp_path: Path,
    repo: str | None,
    revision: str,
    expected: str,
) -> None:
    repo = repo or synthetic_repo.repo_id
    target = tmp_path / "weights"
    with pytest.raises(WeightsError) as caught:
        sha = resolve_revision(repo, revision, TOKEN, endpoint=mirror.url)
        download_repo(repo, sha, target, endpoint=mirror.url, token=TOKEN)
    message = str(caught.value)
    assert expected in message
    assert "\n" not in message and TOKEN not in message
    assert caught.value.__suppress_context__  # raised `from None`: no chained traceback
    assert not target.exists()


def test_cli_prints_one_line_without_traceback(mirror: MirrorServer, tmp_path: Path) -> None:
    proc = run_cli(
        ["download", "nobody/nothing", "--revision", "main", "--dir", str(tmp_path / "w"),
         "--endpoint", mirror.url, "--token-env", TOKEN_ENV],
        tmp_path / "home", mirror.url,
    )  # fmt: skip
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {NOT_FOUND_LINE}"]
    assert "Traceback" not in proc.stderr and TOKEN not in proc.stderr + proc.stdout


@pytest.mark.skipif(not can_mount_private_tmpfs(), reason="no user+mount namespaces for a tmpfs")
def test_disk_full_fails_with_one_line_and_no_sentinel(
    mirror: MirrorServer, synthetic_repo: SyntheticRepo, tmp_path: Path
) -> None:
    mount = tmp_path / "small-disk"
    mount.mkdir()
    target = mount / "weights"
    # 2 MiB: the small files fit, the 3 MiB shard does not.
    cli = [
        sys.executable, "-m", "serving.weights", "download", synthetic_repo.repo_id,
        "--revision", synthetic_repo.v2, "--dir", str(target), "--endpoint", mirror.url,
    ]  # fmt: skip
    probe = f'; echo sentinel=$(test -e "{target / SENTINEL_NAME}" && echo yes || echo no)'
    script_argv = ["sh", "-c", " ".join(f"'{a}'" for a in cli) + probe]
    proc = subprocess.run(
        in_tiny_tmpfs(mount, 2 * MiB, script_argv),
        cwd=REPO_ROOT, env=hf_env(mirror.url, tmp_path / "home"),
        capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S,
    )  # fmt: skip
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    assert errors[0].startswith("error: disk full writing") and "no sentinel" in errors[0]
    assert "sentinel=no" in proc.stdout
    assert "Traceback" not in proc.stderr


def test_sharded_download_merges_into_one_manifest(
    mirror: MirrorServer, synthetic_repo: SyntheticRepo, tmp_path: Path
) -> None:
    files = fetch_files(synthetic_repo.repo_id, synthetic_repo.v2, endpoint=mirror.url)
    shards = plan_shards(files, 2)
    assert sorted(p for shard in shards for p in shard) == sorted(f.path for f in files)
    results = [
        download_files(
            synthetic_repo.repo_id,
            synthetic_repo.v2,
            tmp_path,
            paths,
            endpoint=mirror.url,
            files=files,
        )
        for paths in shards
    ]
    assert not (tmp_path / SENTINEL_NAME).exists()
    with pytest.raises(WeightsError, match="did not verify"):
        merge(tmp_path, results[:1], files)
    assert not (tmp_path / SENTINEL_NAME).exists()

    manifest = merge(tmp_path, results, files)

    assert read_sentinel(tmp_path, synthetic_repo.repo_id, synthetic_repo.v2) == manifest
    assert verify(tmp_path, manifest.files).passed
    mirror.clear_requests()
    assert download_repo(
        synthetic_repo.repo_id, synthetic_repo.v2, tmp_path, endpoint=mirror.url
    ).cached
    assert mirror.requests == []


def test_model_config_comes_alone(
    mirror: MirrorServer, synthetic_repo: SyntheticRepo, tmp_path: Path
) -> None:
    directory = fetch_model_config(
        synthetic_repo.repo_id, synthetic_repo.v2, tmp_path, endpoint=mirror.url
    )

    assert json.loads((directory / "config.json").read_text())["num_shards"] == SHARD_COUNT
    assert resolve_gets(mirror) == ["config.json"]
    assert [p.name for p in tmp_path.iterdir() if p.name != ".cache"] == ["config.json"]


def test_verify_hashes_git_blobs_and_lfs(tmp_path: Path) -> None:
    small, big = b'{"a": 1}\n', os.urandom(3 * MiB + 5)
    (tmp_path / "small.json").write_bytes(small)
    (tmp_path / "big.safetensors").write_bytes(big)
    entries = [
        FileEntry(path="small.json", size=len(small), lfs=False,
                  blob_id=hashlib.sha1(b"blob %d\0" % len(small) + small).hexdigest()),
        FileEntry(path="big.safetensors", size=len(big), lfs=True,
                  sha256=hashlib.sha256(big).hexdigest()),
        FileEntry(path="gone.bin", size=1, lfs=True, sha256="0" * 64),
    ]  # fmt: skip
    report = verify(tmp_path, entries, workers=2)
    assert report.ok == ["big.safetensors", "small.json"]
    assert report.missing == ["gone.bin"]
    assert report.bytes_hashed == len(small) + len(big)
    wrong = entries[1].model_copy(update={"sha256": "f" * 64})
    assert verify(tmp_path, [wrong]).bad == ["big.safetensors"]
