"""Weights of one revision on disk: download, repair, and the sentinel that says "complete".

Layout: `weights_dir(root, profile, sha)` holds exactly the files of one commit, plus
huggingface_hub's own `.cache/` bookkeeping and, written last, the sentinel
(`layout.SENTINEL_NAME`): a `Manifest` of every file with its size and hash. Its presence means
"every file was verified against the hub's metadata in the run that wrote it". A rerun that finds
it costs one read and no network request.

Each file is hashed as it arrives (serving.weights.fetch), so the proof before the sentinel
reads only what this run did not fetch; the sentinel keeps each file's stamp from that moment,
and the verify stage reads only files changed since (serving.weights.verify).

No Prefect and no Modal here: the same code runs in a Modal container and in a local process.

    python -m serving.weights download REPO --revision REV --dir DIR   # one line on error, exit 1
    python -m serving.weights verify DIR                               # against the sentinel
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

from pydantic import ValidationError

from serving.config.layout import SENTINEL_NAME, weights_dir
from serving.config.profile import Profile
from serving.core.files import write_atomically
from serving.weights.fetch import DEFAULT_HASH_METHOD, HashMethod, fetch_proven
from serving.weights.hub import (
    BACKOFF_FIRST_S,
    DOWNLOAD_ATTEMPTS,
    DOWNLOAD_WORKERS,
    Retry,
    ask_high_performance,
    disk_full_line,
    is_disk_full,
    make_dir,
    require_commit,
    revision_files,
)
from serving.weights.models import (
    HF_DOWNLOAD_DIR,
    INCOMPLETE_SUFFIX,
    DownloadResult,
    FileEntry,
    Manifest,
    ProgressCallback,
    ShardResult,
    Stamp,
    VerifyReport,
    WeightsError,
)
from serving.weights.progress import DiskProgress, log_progress
from serving.weights.verify import REFETCH_ROUNDS, list_present, repair, verify

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Transfer:
    """How hard a download pulls and how long it keeps trying: defaults that suit a container;
    tests and the CLI shorten the backoff, Modal's CPU containers ask for hf_xet's full speed."""

    high_performance: bool = False
    max_workers: int = DOWNLOAD_WORKERS
    attempts: int = DOWNLOAD_ATTEMPTS
    backoff_s: float = BACKOFF_FIRST_S
    refetch_rounds: int = REFETCH_ROUNDS
    hashing: HashMethod = DEFAULT_HASH_METHOD


DEFAULT_TRANSFER = Transfer()


def download(
    profile: Profile,
    revision: str,
    root: Path,
    *,
    token: str | None = None,
    endpoint: str | None = None,
    progress: ProgressCallback | None = log_progress,
    transfer: Transfer = DEFAULT_TRANSFER,
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
        transfer=transfer,
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
    transfer: Transfer = DEFAULT_TRANSFER,
) -> DownloadResult:
    """Download, verify, then write the sentinel; a valid sentinel returns at once, offline."""
    directory = Path(directory)
    began = time.monotonic()
    require_commit(revision)
    allow = list(allow_patterns) if allow_patterns is not None else None
    ignore = list(ignore_patterns) if ignore_patterns is not None else None

    manifest = accept_sentinel(_read_sentinel_text(directory), repo, revision, allow, ignore)
    if manifest is not None:
        return DownloadResult(directory=directory, manifest=manifest, cached=True)
    # From here on nothing on disk is trusted until it is hashed in this run.
    remove_sentinel(directory)
    started_at = datetime.now(UTC)
    if transfer.high_performance:
        ask_high_performance()
    retry = Retry(repo, revision, token, transfer.attempts, transfer.backoff_s)
    files = revision_files(
        repo, revision, allow, ignore, token=token, endpoint=endpoint, retry=retry
    )
    # Only now: a revision that does not exist leaves no directory behind.
    make_dir(directory)
    remove_orphans(directory)
    before = _stamps(directory, files.selected)
    report, refetched = _fetch_and_prove(
        directory, files.selected, [entry.path for entry in files.every], retry,
        endpoint=endpoint, progress=progress, transfer=transfer,
    )  # fmt: skip
    manifest = Manifest(
        repo=repo,
        revision=revision,
        allow_patterns=allow,
        ignore_patterns=ignore,
        files=sorted(files.selected, key=lambda entry: entry.path),
        bytes_total=sum(entry.size for entry in files.selected),
        extra=report.extra,
        started_at=started_at,
        finished_at=datetime.now(UTC),
        stamps=report.stamps,
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
        bytes_downloaded=_bytes_written(directory, files.selected, before),
        proof_bytes_read=report.bytes_hashed,
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
    transfer: Transfer = DEFAULT_TRANSFER,
    files: Sequence[FileEntry] | None = None,
) -> ShardResult:
    """One shard of a big repo (the Modal download fans out with `.map`): download and verify
    `paths` into the shared revision directory. No sentinel: `merge` writes it once."""
    directory = Path(directory)
    require_commit(revision)
    started_at = datetime.now(UTC)
    if transfer.high_performance:
        ask_high_performance()
    make_dir(directory)
    retry = Retry(repo, revision, token, transfer.attempts, transfer.backoff_s)
    every = revision_files(
        repo, revision, None, None, token=token, endpoint=endpoint, known=files, retry=retry
    ).every
    by_path = {entry.path: entry for entry in every}
    unknown = [path for path in paths if path not in by_path]
    if unknown:
        raise WeightsError(f"{repo}@{revision[:8]}: not in the revision: {', '.join(unknown[:3])}")
    expected = [by_path[path] for path in paths]
    # Only this shard's partial files: other containers may be writing theirs right now.
    remove_orphans(directory, expected)
    before = _stamps(directory, expected)
    report, refetched = _fetch_and_prove(
        directory, expected, [entry.path for entry in every], retry,
        endpoint=endpoint, progress=progress, transfer=transfer,
    )  # fmt: skip
    return ShardResult(
        repo=repo,
        revision=revision,
        files=sorted(expected, key=lambda entry: entry.path),
        started_at=started_at,
        finished_at=datetime.now(UTC),
        refetched=refetched,
        bytes_downloaded=_bytes_written(directory, expected, before),
        proof_bytes_read=report.bytes_hashed,
        stamps=report.stamps,
    )


def repair_download(
    directory: Path,
    manifest: Manifest,
    report: VerifyReport,
    *,
    token: str | None = None,
    endpoint: str | None = None,
    transfer: Transfer = DEFAULT_TRANSFER,
) -> tuple[VerifyReport, list[str]]:
    """The verify stage's repair, from the report it already has of `manifest`'s files (the
    hub's metadata of that commit): only the bad or missing files are fetched and hashed again.

    The sentinel goes first, so an interrupted repair leaves none; a fresh one is written once
    every file matches. Returns the report of every file and the paths fetched again.
    """
    directory = Path(directory)
    if report.passed:
        return report, []
    started_at = datetime.now(UTC)
    remove_sentinel(directory)
    by_path = {entry.path: entry for entry in manifest.files}
    remove_orphans(directory, [by_path[path] for path in report.broken])
    retry = Retry(manifest.repo, manifest.revision, token, transfer.attempts, transfer.backoff_s)
    report, refetched = repair(
        directory, manifest.files, report, retry,
        endpoint=endpoint, max_workers=transfer.max_workers, rounds=transfer.refetch_rounds,
        method=transfer.hashing,
    )  # fmt: skip
    fresh = manifest.model_copy(
        update={
            "extra": report.extra,
            "started_at": started_at,
            "finished_at": datetime.now(UTC),
            "stamps": report.stamps,
        }
    )
    _guard_disk(
        lambda: write_sentinel(directory, fresh), directory, manifest.repo, manifest.revision
    )
    return report, refetched


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
        stamps={path: stamp for shard in shards for path, stamp in shard.stamps.items()},
    )
    _guard_disk(lambda: write_sentinel(directory, manifest), directory, repo, revision)
    return manifest


# --------------------------------------------------------------------------------------------
# Sentinel
# --------------------------------------------------------------------------------------------


def parse_sentinel(raw: str | bytes | None, repo: str, revision: str) -> Manifest | None:
    """The manifest if `raw` is one and describes this repo and revision; else None."""
    if raw is None:
        return None
    try:
        manifest = Manifest.model_validate_json(raw)
    except ValidationError:
        log.warning("ignoring an unreadable sentinel of %s@%s", repo, revision[:8])
        return None
    if manifest.repo != repo or manifest.revision != revision:
        return None
    return manifest


def accept_sentinel(
    raw: str | bytes | None,
    repo: str,
    revision: str,
    allow_patterns: Sequence[str] | None,
    ignore_patterns: Sequence[str] | None,
) -> Manifest | None:
    """The rule that lets a download be skipped: a sentinel of this repo and revision, written
    for this selection of files (one written for another selection does not prove this one)."""
    manifest = parse_sentinel(raw, repo, revision)
    if manifest is None:
        return None
    wanted = [
        list(allow_patterns) if allow_patterns is not None else None,
        list(ignore_patterns) if ignore_patterns is not None else None,
    ]
    return manifest if [manifest.allow_patterns, manifest.ignore_patterns] == wanted else None


def read_sentinel(directory: Path, repo: str, revision: str) -> Manifest | None:
    """The manifest in `directory` if there is one for this repo and revision; else None."""
    return parse_sentinel(_read_sentinel_text(directory), repo, revision)


def write_sentinel(directory: Path, manifest: Manifest) -> Path:
    """Written atomically and durably: a reader sees all of it or nothing."""
    target = Path(directory) / SENTINEL_NAME
    write_atomically(target, manifest.model_dump_json(indent=1))
    return target


def remove_sentinel(directory: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        (Path(directory) / SENTINEL_NAME).unlink()


def _read_sentinel_text(directory: Path) -> str | None:
    try:
        return (Path(directory) / SENTINEL_NAME).read_text()
    except (FileNotFoundError, NotADirectoryError):
        return None


# --------------------------------------------------------------------------------------------
# Internals
# --------------------------------------------------------------------------------------------


def _fetch_and_prove(
    directory: Path,
    expected: Sequence[FileEntry],
    revision_paths: Sequence[str],
    retry: Retry,
    *,
    endpoint: str | None,
    progress: ProgressCallback | None,
    transfer: Transfer,
) -> tuple[VerifyReport, list[str]]:
    """Fetch what is missing, hashing it as it arrives; prove every file (reading only those
    without evidence: an earlier run's, or one whose hash failed); repair what is broken."""
    evidence: dict[str, Stamp] = {}
    fetch = partial(
        fetch_proven, retry.repo, retry.revision, directory, expected, evidence,
        token=retry.token, endpoint=endpoint, max_workers=transfer.max_workers,
        method=transfer.hashing,
    )  # fmt: skip
    with DiskProgress(directory, expected, progress):
        retry.run("download", fetch, directory)
    report = verify(
        directory, expected, revision_paths=revision_paths, progress=progress, evidence=evidence
    )
    return repair(
        directory, expected, report, retry,
        endpoint=endpoint, max_workers=transfer.max_workers, rounds=transfer.refetch_rounds,
        method=transfer.hashing,
    )  # fmt: skip


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


def _stamps(directory: Path, files: Sequence[FileEntry]) -> dict[str, tuple[int, int]]:
    """Inode and change time of each file present: huggingface_hub moves every finished
    download into place, so a file written by this run has a new stamp."""
    stamps = {}
    for entry in files:
        with contextlib.suppress(OSError):
            stat = (directory / entry.path).stat()
            stamps[entry.path] = (stat.st_ino, stat.st_ctime_ns)
    return stamps


def _bytes_written(
    directory: Path, files: Sequence[FileEntry], before: dict[str, tuple[int, int]]
) -> int:
    """What this run transferred: the files whose stamp changed since `before`. Files that an
    earlier, interrupted run finished are not counted; their orphaned partials were removed."""
    after = _stamps(directory, files)
    return sum(e.size for e in files if e.path in after and after[e.path] != before.get(e.path))


def _guard_disk(step: Callable[[], object], directory: Path, repo: str, revision: str) -> None:
    try:
        step()
    except OSError as exc:
        if is_disk_full(exc):
            raise WeightsError(disk_full_line(directory, repo, revision)) from None
        raise WeightsError(f"cannot write the sentinel in {directory}: {exc.strerror}") from None
