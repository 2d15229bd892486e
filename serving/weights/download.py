"""Weights of one revision: resolve, download, verify, and the sentinel that says "complete".

Layout: `weights_dir(root, profile, sha)` holds exactly the files of one commit, plus
huggingface_hub's own `.cache/` bookkeeping and, written last, the sentinel
(`layout.SENTINEL_NAME`): a `Manifest` of every file with its size and hash. Its presence means
"every file was verified against the hub's metadata in the run that wrote it". A rerun that finds
it costs one read and no network request.

No Prefect and no Modal here: the same code runs in a Modal container and in a local process.
The HF token is passed to huggingface_hub only; it never reaches a log line or an exception.

    python -m serving.weights download REPO --revision REV --dir DIR   # one line on error, exit 1
    python -m serving.weights verify DIR                               # against the sentinel
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal, TypeVar

import httpx
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import filter_repo_objects
from pydantic import BaseModel, Field

from serving.config.layout import SENTINEL_NAME, weights_dir
from serving.config.profile import Profile, check_revision, is_commit_sha
from serving.core.files import is_partial_write_of, write_atomically

log = logging.getLogger(__name__)

T = TypeVar("T")

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

MANIFEST_FORMAT = 1
# Large reads amortise the syscall and Python overhead; hashlib releases the GIL for any update
# over 2 KiB, so threads hash different files on different cores at full speed.
HASH_CHUNK = 8 * MiB
# snapshot_download's own default; more connections do not help a single origin.
DOWNLOAD_WORKERS = 8
# A bad file is deleted and fetched again at most this many times before the run fails.
REFETCH_ROUNDS = 2
# Whole-download attempts on a transient failure (5xx, cut connection): huggingface_hub retries
# API calls itself but fails a file GET on the first 5xx.
DOWNLOAD_ATTEMPTS = 4
BACKOFF_FIRST_S = 2.0
BACKOFF_MAX_S = 60.0
# Progress is polled from the disk (works for plain HTTP and hf_xet alike) and reported at most
# this often, so a Prefect progress artifact is not flooded.
PROGRESS_INTERVAL_S = 0.5

# Where huggingface_hub keeps per-file metadata, partial files and the tree listing of a
# `local_dir` download; never part of the revision.
HF_LOCAL_CACHE = ".cache"
HF_DOWNLOAD_DIR = Path(".cache") / "huggingface" / "download"
INCOMPLETE_SUFFIX = ".incomplete"
HIGH_PERFORMANCE_ENV = "HF_XET_HIGH_PERFORMANCE"
HF_TOKEN_ENV = "HF_TOKEN"
# What an engine needs to build a model without its weights: trust_remote_code configs name
# Python files of the repo.
MODEL_CONFIG_PATTERNS = ["config.json", "*.py"]


class WeightsError(RuntimeError):
    """A download or verification that cannot succeed; the message is one line, without secrets."""


# --------------------------------------------------------------------------------------------
# Data at the boundaries
# --------------------------------------------------------------------------------------------


class FileEntry(BaseModel):
    """One file of a revision as the hub describes it."""

    path: str
    size: int = Field(ge=0)
    lfs: bool
    sha256: str | None = Field(None, description="content sha256, for LFS files")
    blob_id: str | None = Field(None, description="git blob sha1 (of the pointer, for LFS files)")

    @property
    def digest(self) -> tuple[Literal["sha256", "git-sha1"], str]:
        if self.lfs:
            if not self.sha256:
                raise WeightsError(f"hub metadata of LFS file {self.path} has no sha256")
            return "sha256", self.sha256
        if not self.blob_id:
            raise WeightsError(f"hub metadata of {self.path} has no blob id")
        return "git-sha1", self.blob_id

    @property
    def etag(self) -> str:
        """What huggingface_hub puts in the name of this file's partial download."""
        return self.digest[1]


class Manifest(BaseModel):
    """The sentinel: written last, atomically, only after every file verified in the same run."""

    format: int = MANIFEST_FORMAT
    repo: str
    revision: str
    allow_patterns: list[str] | None = None
    ignore_patterns: list[str] | None = None
    files: list[FileEntry]
    bytes_total: int
    extra: list[str] = Field(default_factory=list, description="present but not in the revision")
    started_at: datetime
    finished_at: datetime


class VerifyReport(BaseModel):
    ok: list[str] = Field(default_factory=list)
    bad: list[str] = Field(default_factory=list)
    missing: list[str] = Field(default_factory=list)
    extra: list[str] = Field(default_factory=list)
    bytes_hashed: int = 0
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return not self.bad and not self.missing

    def summary(self) -> str:
        parts = [f"{len(self.ok)} ok"]
        for name, paths in (("bad", self.bad), ("missing", self.missing), ("extra", self.extra)):
            if paths:
                shown = ", ".join(paths[:3]) + (
                    f", +{len(paths) - 3} more" if len(paths) > 3 else ""
                )
                parts.append(f"{len(paths)} {name} ({shown})")
        return "; ".join(parts)


class Progress(BaseModel):
    phase: Literal["download", "verify"]
    bytes_done: int
    bytes_total: int
    rate_bytes_per_s: float
    eta_s: float | None

    def line(self) -> str:
        eta = f"{self.eta_s:.0f}s" if self.eta_s is not None else "?"
        return (
            f"{self.phase} {self.bytes_done / GiB:.2f}/{self.bytes_total / GiB:.2f} GiB "
            f"{self.rate_bytes_per_s / MiB:.0f} MiB/s eta {eta}"
        )


ProgressCallback = Callable[[Progress], None]


class ShardResult(BaseModel):
    """What one container of a sharded download proves: these files, verified in this run."""

    repo: str
    revision: str
    files: list[FileEntry]
    started_at: datetime
    finished_at: datetime
    refetched: list[str] = Field(default_factory=list)


class DownloadResult(BaseModel):
    directory: Path
    manifest: Manifest
    cached: bool = Field(description="a valid sentinel was found; nothing was downloaded")
    refetched: list[str] = Field(default_factory=list)
    attempts: int = 0
    seconds: float = 0.0


def hf_token() -> str | None:
    """The Hub token: HF_TOKEN, which the profile's Modal Secret (`secrets.hf_token`) holds in
    a container and the orchestrator's environment holds outside. Passed on, never logged."""
    return os.environ.get(HF_TOKEN_ENV) or None


def log_progress(progress: Progress) -> None:
    log.info(progress.line())


# --------------------------------------------------------------------------------------------
# Resolve
# --------------------------------------------------------------------------------------------


def resolve_revision(
    repo: str, revision: str, token: str | None = None, *, endpoint: str | None = None
) -> str:
    """A 40-hex commit as is (no request); a branch or tag -> its commit, with the cheapest call."""
    if is_commit_sha(revision):
        return revision
    try:
        check_revision(revision)
    except ValueError as exc:
        raise WeightsError(str(exc)) from None
    try:
        info = HfApi(endpoint=endpoint, token=token).model_info(
            repo, revision=revision, expand=["sha"]
        )
    except Exception as exc:
        raise WeightsError(_describe(exc, repo, revision, token)) from None
    if not info.sha or not is_commit_sha(info.sha):
        raise WeightsError(f"{repo}@{revision}: the hub returned no commit sha")
    return info.sha


def fetch_files(
    repo: str, revision: str, token: str | None = None, *, endpoint: str | None = None
) -> list[FileEntry]:
    """Every file of the commit with size and hash: one API call."""
    info = HfApi(endpoint=endpoint, token=token).model_info(
        repo, revision=revision, files_metadata=True
    )
    entries = []
    for sibling in info.siblings or []:
        if sibling.size is None:
            raise WeightsError(
                f"{repo}@{revision}: the hub returned no size for {sibling.rfilename}"
            )
        entries.append(
            FileEntry(
                path=sibling.rfilename,
                size=sibling.size,
                lfs=sibling.lfs is not None,
                sha256=sibling.lfs.sha256 if sibling.lfs is not None else None,
                blob_id=sibling.blob_id,
            )
        )
    return entries


def select_files(
    files: Sequence[FileEntry],
    allow_patterns: Sequence[str] | None = None,
    ignore_patterns: Sequence[str] | None = None,
) -> list[FileEntry]:
    """The profile's selection, with huggingface_hub's own pattern semantics."""
    return list(
        filter_repo_objects(
            files,
            allow_patterns=list(allow_patterns) if allow_patterns is not None else None,
            ignore_patterns=list(ignore_patterns) if ignore_patterns is not None else None,
            key=lambda entry: entry.path,
        )
    )


# --------------------------------------------------------------------------------------------
# Verify
# --------------------------------------------------------------------------------------------


def _hash_one(path: Path, entry: FileEntry) -> tuple[Literal["ok", "bad", "missing"], int]:
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return "missing", 0
    if size != entry.size:
        return "bad", 0  # no need to read a file of the wrong size
    algorithm, expected = entry.digest
    hasher = hashlib.sha256() if algorithm == "sha256" else hashlib.sha1(b"blob %d\0" % size)
    buffer = bytearray(HASH_CHUNK)
    view = memoryview(buffer)
    with path.open("rb", buffering=0) as f:
        with contextlib.suppress(AttributeError, OSError):
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)  # larger readahead
        while n := f.readinto(buffer):
            hasher.update(view[:n])
    return ("ok" if hasher.hexdigest() == expected else "bad"), size


def default_hash_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return os.cpu_count() or 1


def list_present(directory: Path) -> set[str]:
    """Repo paths under `directory`, without huggingface_hub's `.cache/` and the sentinel."""
    present: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(directory):
        rel = Path(dirpath).relative_to(directory)
        if rel == Path("."):
            dirnames[:] = [d for d in dirnames if d != HF_LOCAL_CACHE]
        for name in filenames:
            path = (rel / name).as_posix()
            if path != SENTINEL_NAME and not is_partial_write_of(path, SENTINEL_NAME):
                present.add(path)
    return present


def verify(
    directory: Path,
    expected_files: Sequence[FileEntry],
    *,
    revision_paths: Iterable[str] | None = None,
    workers: int | None = None,
    progress: ProgressCallback | None = None,
) -> VerifyReport:
    """Hash every expected file in parallel against the hub's metadata.

    `extra` lists files present but not in the revision (`revision_paths`, default: the expected
    files), so a subset check does not report the other shards' files.
    """
    directory = Path(directory)
    started = time.monotonic()
    known = set(revision_paths) if revision_paths is not None else set()
    known |= {entry.path for entry in expected_files}
    report = VerifyReport(extra=sorted(list_present(directory) - known))
    total = sum(entry.size for entry in expected_files)
    done = 0
    throttle = _Throttle(progress, "verify", total)
    # Largest first: the long hashes start early and the small ones fill the gaps.
    ordered = sorted(expected_files, key=lambda entry: entry.size, reverse=True)
    with ThreadPoolExecutor(max_workers=workers or default_hash_workers()) as pool:
        futures = {pool.submit(_hash_one, directory / e.path, e): e for e in ordered}
        for future in as_completed(futures):
            entry = futures[future]
            status, hashed = future.result()
            getattr(report, status).append(entry.path)
            report.bytes_hashed += hashed
            done += entry.size
            throttle.update(done)
    throttle.finish(done)
    for paths in (report.ok, report.bad, report.missing):
        paths.sort()
    report.seconds = time.monotonic() - started
    return report


# --------------------------------------------------------------------------------------------
# Sentinel
# --------------------------------------------------------------------------------------------


def read_sentinel(directory: Path, repo: str, revision: str) -> Manifest | None:
    """The manifest if it is there and describes this repo and revision; else None."""
    try:
        text = (Path(directory) / SENTINEL_NAME).read_text()
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        manifest = Manifest.model_validate_json(text)
    except ValueError:
        log.warning("ignoring an unreadable sentinel in %s", directory)
        return None
    if manifest.repo != repo or manifest.revision != revision:
        return None
    return manifest


def write_sentinel(directory: Path, manifest: Manifest) -> Path:
    """Written atomically and durably: a reader sees all of it or nothing."""
    target = Path(directory) / SENTINEL_NAME
    write_atomically(target, manifest.model_dump_json(indent=1))
    return target


def remove_sentinel(directory: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        (Path(directory) / SENTINEL_NAME).unlink()


# --------------------------------------------------------------------------------------------
# Download
# --------------------------------------------------------------------------------------------


def download(
    profile: Profile,
    revision: str,
    root: Path,
    *,
    token: str | None = None,
    endpoint: str | None = None,
    progress: ProgressCallback | None = log_progress,
    high_performance: bool = False,
    reverify: bool = False,
    attempts: int = DOWNLOAD_ATTEMPTS,
    backoff_s: float = BACKOFF_FIRST_S,
) -> DownloadResult:
    """The profile's files of `revision` (a 40-hex commit) into `weights_dir(root, profile, …)`."""
    return download_repo(
        profile.hub.repo,
        revision,
        weights_dir(Path(root), profile, revision),
        allow_patterns=profile.hub.allow_patterns,
        ignore_patterns=profile.hub.ignore_patterns,
        token=token,
        endpoint=endpoint,
        progress=progress,
        high_performance=high_performance,
        reverify=reverify,
        attempts=attempts,
        backoff_s=backoff_s,
    )


def download_repo(
    repo: str,
    revision: str,
    directory: Path,
    *,
    allow_patterns: Sequence[str] | None = None,
    ignore_patterns: Sequence[str] | None = None,
    token: str | None = None,
    endpoint: str | None = None,
    progress: ProgressCallback | None = log_progress,
    high_performance: bool = False,
    reverify: bool = False,
    max_workers: int = DOWNLOAD_WORKERS,
    attempts: int = DOWNLOAD_ATTEMPTS,
    backoff_s: float = BACKOFF_FIRST_S,
    refetch_rounds: int = REFETCH_ROUNDS,
) -> DownloadResult:
    """Download, verify, then write the sentinel; a valid sentinel returns at once, offline.

    `reverify=True` (the verify stage) hashes the files against an existing sentinel first and
    repairs only the bad ones, with a fresh manifest written after.
    """
    directory = Path(directory)
    began = time.monotonic()
    require_commit(revision)
    allow = list(allow_patterns) if allow_patterns is not None else None
    ignore = list(ignore_patterns) if ignore_patterns is not None else None

    manifest = read_sentinel(directory, repo, revision)
    # A sentinel written for another selection of files does not prove this one.
    if manifest is not None and [manifest.allow_patterns, manifest.ignore_patterns] == [
        allow,
        ignore,
    ]:
        if not reverify:
            return DownloadResult(directory=directory, manifest=manifest, cached=True)
        report = verify(directory, manifest.files, progress=progress)
        if report.passed:
            return DownloadResult(
                directory=directory,
                manifest=manifest,
                cached=True,
                seconds=time.monotonic() - began,
            )
        log.warning("%s: %s", directory, report.summary())
    # From here on nothing on disk is trusted until it is hashed in this run.
    remove_sentinel(directory)
    started_at = datetime.now(UTC)
    if high_performance:
        # hf_xet reads it when its runtime starts: set before the first transfer of the process.
        os.environ[HIGH_PERFORMANCE_ENV] = "1"
    retry = _Retry(repo, revision, token, attempts, backoff_s)
    all_files = retry.run(
        "file metadata", lambda: fetch_files(repo, revision, token, endpoint=endpoint)
    )
    expected = select_files(all_files, allow, ignore)
    if not expected:
        raise WeightsError(f"{repo}@{revision[:8]}: no file matches the allow/ignore patterns")
    # Only now: a revision that does not exist leaves no directory behind.
    _make_dir(directory)
    remove_orphans(directory)

    def fetch_all() -> None:
        snapshot_download(
            repo,
            revision=revision,
            local_dir=directory,
            allow_patterns=allow,
            ignore_patterns=ignore,
            max_workers=max_workers,
            token=token,
            endpoint=endpoint,
        )

    with _DiskProgress(directory, expected, progress):
        retry.run("download", fetch_all, directory)
    report, refetched = _verify_and_repair(
        directory, expected, all_files, retry, endpoint, max_workers, refetch_rounds, progress
    )
    manifest = Manifest(
        repo=repo,
        revision=revision,
        allow_patterns=allow,
        ignore_patterns=ignore,
        files=sorted(expected, key=lambda entry: entry.path),
        bytes_total=sum(entry.size for entry in expected),
        extra=report.extra,
        started_at=started_at,
        finished_at=datetime.now(UTC),
    )
    _guard_disk(lambda: write_sentinel(directory, manifest), directory, repo, revision)
    if report.extra:
        log.warning("%s: files not in the revision: %s", directory, ", ".join(report.extra))
    return DownloadResult(
        directory=directory,
        manifest=manifest,
        cached=False,
        refetched=refetched,
        attempts=retry.attempts_used,
        seconds=time.monotonic() - began,
    )


def download_files(
    repo: str,
    revision: str,
    directory: Path,
    paths: Sequence[str],
    *,
    token: str | None = None,
    endpoint: str | None = None,
    progress: ProgressCallback | None = log_progress,
    high_performance: bool = False,
    max_workers: int = DOWNLOAD_WORKERS,
    attempts: int = DOWNLOAD_ATTEMPTS,
    backoff_s: float = BACKOFF_FIRST_S,
    refetch_rounds: int = REFETCH_ROUNDS,
    files: Sequence[FileEntry] | None = None,
) -> ShardResult:
    """One shard of a big repo (the Modal download fans out with `.map`): download and verify
    `paths` into the shared revision directory. No sentinel: `merge` writes it once."""
    directory = Path(directory)
    require_commit(revision)
    started_at = datetime.now(UTC)
    if high_performance:
        os.environ[HIGH_PERFORMANCE_ENV] = "1"
    _make_dir(directory)
    retry = _Retry(repo, revision, token, attempts, backoff_s)
    all_files = (
        list(files)
        if files is not None
        else retry.run(
            "file metadata", lambda: fetch_files(repo, revision, token, endpoint=endpoint)
        )
    )
    by_path = {entry.path: entry for entry in all_files}
    unknown = [path for path in paths if path not in by_path]
    if unknown:
        raise WeightsError(f"{repo}@{revision[:8]}: not in the revision: {', '.join(unknown[:3])}")
    expected = [by_path[path] for path in paths]
    # Only this shard's partial files: other containers may be writing theirs right now.
    remove_orphans(directory, expected)
    with _DiskProgress(directory, expected, progress):
        retry.run(
            "download",
            lambda: _fetch_each(repo, revision, directory, paths, token, endpoint, max_workers),
            directory,
        )
    _, refetched = _verify_and_repair(
        directory, expected, all_files, retry, endpoint, max_workers, refetch_rounds, progress
    )
    return ShardResult(
        repo=repo,
        revision=revision,
        files=sorted(expected, key=lambda entry: entry.path),
        started_at=started_at,
        finished_at=datetime.now(UTC),
        refetched=refetched,
    )


def plan_shards(files: Sequence[FileEntry], count: int) -> list[list[str]]:
    """Split files into `count` groups of about equal bytes (largest first, into the lightest)."""
    groups: list[tuple[int, list[str]]] = [(0, []) for _ in range(max(1, count))]
    for entry in sorted(files, key=lambda e: e.size, reverse=True):
        index = min(range(len(groups)), key=lambda i: groups[i][0])
        size, paths = groups[index]
        groups[index] = (size + entry.size, [*paths, entry.path])
    return [sorted(paths) for _, paths in groups if paths]


def merge(
    directory: Path,
    shards: Sequence[ShardResult],
    expected_files: Sequence[FileEntry],
    *,
    allow_patterns: Sequence[str] | None = None,
    ignore_patterns: Sequence[str] | None = None,
    revision_paths: Iterable[str] | None = None,
) -> Manifest:
    """One manifest from the shards' verified files; the sentinel is written only if together
    they cover exactly the expected files with the expected hashes."""
    directory = Path(directory)
    if not shards:
        raise WeightsError(f"{directory}: no shard results to merge")
    repo, revision = shards[0].repo, shards[0].revision
    if any((s.repo, s.revision) != (repo, revision) for s in shards):
        raise WeightsError(f"{directory}: shard results of different revisions")
    verified = {entry.path: entry for shard in shards for entry in shard.files}
    wanted = {entry.path: entry for entry in expected_files}
    missing = sorted(set(wanted) - set(verified))
    differing = sorted(p for p in set(wanted) & set(verified) if wanted[p] != verified[p])
    if missing or differing:
        raise WeightsError(
            f"{repo}@{revision[:8]}: shards did not verify {len(missing)} file(s) "
            f"and disagree on {len(differing)}: {', '.join((missing + differing)[:3])}"
        )
    known = set(revision_paths) if revision_paths is not None else set(wanted)
    extra = sorted(list_present(directory) - known)
    manifest = Manifest(
        repo=repo,
        revision=revision,
        allow_patterns=list(allow_patterns) if allow_patterns is not None else None,
        ignore_patterns=list(ignore_patterns) if ignore_patterns is not None else None,
        files=sorted(wanted.values(), key=lambda entry: entry.path),
        bytes_total=sum(entry.size for entry in wanted.values()),
        extra=extra,
        started_at=min(shard.started_at for shard in shards),
        finished_at=datetime.now(UTC),
    )
    _guard_disk(lambda: write_sentinel(directory, manifest), directory, repo, revision)
    return manifest


def fetch_model_config(
    repo: str,
    revision: str,
    directory: Path,
    *,
    token: str | None = None,
    endpoint: str | None = None,
) -> Path:
    """The model's config.json (and any remote code it names) alone, into its own directory.

    The DeepGEMM compile runs on these with dummy weights, so it can start while the shards
    are still downloading; a separate directory keeps it clear of the download's bookkeeping.
    """
    directory = Path(directory)
    require_commit(revision)
    if (directory / "config.json").is_file():
        return directory
    _make_dir(directory)
    retry = _Retry(repo, revision, token, DOWNLOAD_ATTEMPTS, BACKOFF_FIRST_S)
    retry.run(
        "config.json",
        lambda: snapshot_download(
            repo,
            revision=revision,
            local_dir=directory,
            allow_patterns=MODEL_CONFIG_PATTERNS,
            token=token,
            endpoint=endpoint,
        ),
        directory,
    )
    return directory


def remove_orphans(directory: Path, files: Sequence[FileEntry] | None = None) -> list[Path]:
    """Delete partial downloads left by a killed process (huggingface_hub names them uniquely
    per process, so a new run never resumes them). With `files`, only those files' partials."""
    download_dir = Path(directory) / HF_DOWNLOAD_DIR
    if not download_dir.is_dir():
        return []
    etags = {f".{entry.etag}." for entry in files} if files is not None else None
    removed = []
    for path in download_dir.rglob(f"*{INCOMPLETE_SUFFIX}"):
        if etags is None or any(tag in path.name for tag in etags):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed.append(path)
    if removed:
        log.info("removed %d partial file(s) of an interrupted download", len(removed))
    return removed


# --------------------------------------------------------------------------------------------
# Internals
# --------------------------------------------------------------------------------------------


def require_commit(revision: str) -> None:
    if not is_commit_sha(revision):
        raise WeightsError(f"revision {revision!r} must be resolved to a 40-hex commit first")


def _make_dir(directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WeightsError(f"cannot create {directory}: {exc.strerror}") from None


def _fetch_each(
    repo: str,
    revision: str,
    directory: Path,
    paths: Sequence[str],
    token: str | None,
    endpoint: str | None,
    max_workers: int,
) -> None:
    def one(path: str) -> None:
        hf_hub_download(
            repo, path, revision=revision, local_dir=directory, token=token, endpoint=endpoint
        )

    with ThreadPoolExecutor(max_workers=max_workers) as pool:
        for future in [pool.submit(one, path) for path in paths]:
            future.result()


def _verify_and_repair(
    directory: Path,
    expected: Sequence[FileEntry],
    all_files: Sequence[FileEntry],
    retry: _Retry,
    endpoint: str | None,
    max_workers: int,
    rounds: int,
    progress: ProgressCallback | None,
) -> tuple[VerifyReport, list[str]]:
    """Hash everything; delete and re-fetch only the bad or missing files, then hash those."""
    revision_paths = [entry.path for entry in all_files]
    report = verify(directory, expected, revision_paths=revision_paths, progress=progress)
    refetched: list[str] = []
    by_path = {entry.path: entry for entry in expected}
    for round_number in range(1, rounds + 1):
        broken = report.bad + report.missing
        if not broken:
            break
        log.warning("round %d: re-fetching %s", round_number, report.summary())
        for path in broken:
            with contextlib.suppress(FileNotFoundError):
                (directory / path).unlink()
        retry.run(
            "re-fetch",
            lambda paths=broken: _fetch_each(
                retry.repo, retry.revision, directory, paths, retry.token, endpoint, max_workers
            ),
            directory,
        )
        refetched.extend(broken)
        again = verify(directory, [by_path[p] for p in broken], revision_paths=revision_paths)
        report = VerifyReport(
            ok=sorted([*report.ok, *again.ok]),
            bad=again.bad,
            missing=again.missing,
            extra=report.extra,
            bytes_hashed=report.bytes_hashed + again.bytes_hashed,
            seconds=report.seconds + again.seconds,
        )
    if not report.passed:
        raise WeightsError(
            f"{retry.repo}@{retry.revision[:8]}: verification failed after {rounds} re-fetch "
            f"round(s): {report.summary()}"
        )
    return report, refetched


class _Retry:
    """Runs a network step; transient failures are retried with backoff, the rest fail at once
    with one line."""

    def __init__(
        self, repo: str, revision: str, token: str | None, attempts: int, backoff_s: float
    ) -> None:
        self.repo = repo
        self.revision = revision
        self.token = token
        self.attempts = max(1, attempts)
        self.backoff_s = backoff_s
        self.attempts_used = 0

    def run(self, what: str, step: Callable[[], T], directory: Path | None = None) -> T:
        delay = self.backoff_s
        for attempt in range(1, self.attempts + 1):
            self.attempts_used += 1
            try:
                return step()
            except WeightsError:
                raise
            except Exception as exc:
                if directory is not None and _is_disk_full(exc):
                    raise WeightsError(
                        _disk_full_line(directory, self.repo, self.revision)
                    ) from None
                line = _describe(exc, self.repo, self.revision, self.token)
                if not _is_transient(exc):
                    raise WeightsError(line) from None
                if attempt == self.attempts:
                    raise WeightsError(
                        f"{what} failed after {attempt} attempt(s): {line}"
                    ) from None
                log.warning("%s attempt %d/%d failed (%s); retrying in %.0fs",
                            what, attempt, self.attempts, line, delay)  # fmt: skip
                time.sleep(delay)
                delay = min(BACKOFF_MAX_S, delay * 2)
        raise AssertionError("unreachable")


def _guard_disk(step: Callable[[], object], directory: Path, repo: str, revision: str) -> None:
    try:
        step()
    except OSError as exc:
        if _is_disk_full(exc):
            raise WeightsError(_disk_full_line(directory, repo, revision)) from None
        raise WeightsError(f"cannot write the sentinel in {directory}: {exc.strerror}") from None


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _is_disk_full(exc: BaseException) -> bool:
    return any(
        isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT) for e in _chain(exc)
    )


def _disk_full_line(directory: Path, repo: str, revision: str) -> str:
    try:
        free = f"{shutil.disk_usage(directory).free / GiB:.2f} GiB free"
    except OSError:
        free = "free space unknown"
    return f"disk full writing {repo}@{revision[:8]} to {directory} ({free}); no sentinel written"


def _status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def _is_transient(exc: BaseException) -> bool:
    for e in _chain(exc):
        if isinstance(e, (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError)):
            return False
        status = _status(e)
        if status is not None:
            return status >= 500 or status in (408, 429)
        if isinstance(e, (httpx.TransportError, LocalEntryNotFoundError)):
            return True
        # huggingface_hub's own HTTP stack (a fork of httpx) has the same error names.
        if type(e).__name__ in _TRANSIENT_NAMES:
            return True
        if isinstance(e, OSError) and "Consistency check failed" in str(e):
            return True  # a body shorter than Content-Length: the connection was cut
    return False


_TRANSIENT_NAMES = frozenset({
    "ConnectError", "ConnectTimeout", "ReadTimeout", "WriteTimeout", "PoolTimeout",
    "ReadError", "WriteError", "RemoteProtocolError", "NetworkError", "TimeoutException",
    "ProtocolError", "ConnectionError", "IncompleteSnapshotError",
})  # fmt: skip


def _describe(exc: BaseException, repo: str, revision: str, token: str | None) -> str:
    """One line for a person: what was not found or what failed, never the token."""
    if isinstance(exc, GatedRepoError):
        line = f"{repo} is gated: accept its terms on the hub with the account of the token"
    elif isinstance(exc, RepositoryNotFoundError):
        line = f"repo {repo} not found (or private, and the token has no access)"
    elif isinstance(exc, RevisionNotFoundError):
        line = f"revision {revision!r} not found in {repo}"
    elif isinstance(exc, EntryNotFoundError):
        line = f"{repo}@{revision[:8]}: file not found ({_first_line(exc)})"
    elif _status(exc) in (401, 403):
        line = f"{repo}: access denied (HTTP {_status(exc)}): check the HF token"
    elif _status(exc) is not None:
        line = f"HTTP {_status(exc)} from the hub: {_first_line(exc)}"
    else:
        line = f"{type(exc).__name__}: {_first_line(exc)}"
    if token:
        line = line.replace(token, "***")
    return line


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class _Throttle:
    """Turns byte counts into Progress reports, at most one per PROGRESS_INTERVAL_S."""

    def __init__(
        self, callback: ProgressCallback | None, phase: Literal["download", "verify"], total: int
    ) -> None:
        self.callback = callback
        self.phase: Literal["download", "verify"] = phase
        self.total = total
        self.began = time.monotonic()
        self.last_at = self.began
        self.last_done = 0
        self.rate = 0.0

    def update(self, done: int, *, force: bool = False) -> None:
        if self.callback is None:
            return
        now = time.monotonic()
        if not force and now - self.last_at < PROGRESS_INTERVAL_S:
            return
        interval = now - self.last_at
        if interval > 0:
            instant = max(0, done - self.last_done) / interval
            # Smoothed, so one slow poll does not swing the ETA wildly.
            self.rate = instant if self.rate == 0 else 0.7 * self.rate + 0.3 * instant
        self.last_at, self.last_done = now, done
        remaining = max(0, self.total - done)
        eta = remaining / self.rate if self.rate > 0 else None
        self.callback(
            Progress(
                phase=self.phase,
                bytes_done=min(done, self.total),
                bytes_total=self.total,
                rate_bytes_per_s=self.rate,
                eta_s=eta,
            )
        )

    def finish(self, done: int) -> None:
        if self.callback is not None:
            elapsed = time.monotonic() - self.began
            self.rate = done / elapsed if elapsed > 0 else 0.0
            self.last_at = 0.0  # force
            self.update(done, force=True)


class _DiskProgress:
    """Polls the bytes on disk (finished files + partial downloads) from a background thread."""

    def __init__(
        self, directory: Path, files: Sequence[FileEntry], callback: ProgressCallback | None
    ) -> None:
        self.directory = directory
        self.files = files
        self.throttle = _Throttle(callback, "download", sum(entry.size for entry in files))
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="weights-progress", daemon=True)

    def bytes_on_disk(self) -> int:
        done = 0
        for entry in self.files:
            with contextlib.suppress(OSError):
                done += (self.directory / entry.path).stat().st_size
        download_dir = self.directory / HF_DOWNLOAD_DIR
        if download_dir.is_dir():
            for path in download_dir.rglob(f"*{INCOMPLETE_SUFFIX}"):
                with contextlib.suppress(OSError):
                    done += path.stat().st_size
        return done

    def _loop(self) -> None:
        while not self.stop.wait(PROGRESS_INTERVAL_S):
            self.throttle.update(self.bytes_on_disk())

    def __enter__(self) -> _DiskProgress:
        if self.throttle.callback is not None:
            self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join()
        if exc[0] is None:
            self.throttle.finish(self.bytes_on_disk())
