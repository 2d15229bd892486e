"""Proving files: hash them against the hub's metadata, and repair the ones that fail.

sha256 for LFS files, the git blob sha1 for the others; files are hashed in parallel threads
(hashlib releases the GIL). A repair starts from a report that already exists: only the bad or
missing files are deleted, fetched again and hashed again, so a 700 GB revision is read once.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Literal

from serving.config.layout import SENTINEL_NAME
from serving.core.files import is_partial_write_of
from serving.weights.hub import DOWNLOAD_WORKERS, Retry, fetch_paths
from serving.weights.models import (
    HF_LOCAL_CACHE,
    FileEntry,
    MiB,
    ProgressCallback,
    VerifyReport,
    WeightsError,
)
from serving.weights.progress import Throttle

log = logging.getLogger(__name__)

# Large reads amortise the syscall and Python overhead; hashlib releases the GIL for any update
# over 2 KiB, so threads hash different files on different cores at full speed.
HASH_CHUNK = 8 * MiB
# A bad file is deleted and fetched again at most this many times before the run fails.
REFETCH_ROUNDS = 2

HashStatus = Literal["ok", "bad", "missing"]


def hash_file(path: Path, entry: FileEntry) -> tuple[HashStatus, int]:
    """Whether the file at `path` is `entry`, and how many bytes were read to tell."""
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
    throttle = Throttle(progress, "verify", total)
    # Largest first: the long hashes start early and the small ones fill the gaps.
    ordered = sorted(expected_files, key=lambda entry: entry.size, reverse=True)
    with ThreadPoolExecutor(max_workers=workers or default_hash_workers()) as pool:
        futures = {pool.submit(hash_file, directory / e.path, e): e for e in ordered}
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


def repair(
    directory: Path,
    expected: Sequence[FileEntry],
    report: VerifyReport,
    retry: Retry,
    *,
    endpoint: str | None,
    max_workers: int = DOWNLOAD_WORKERS,
    rounds: int = REFETCH_ROUNDS,
) -> tuple[VerifyReport, list[str]]:
    """From `report` (of `expected`), delete and re-fetch only the bad or missing files, then
    hash those again; a file still bad after `rounds` rounds fails the run. Returns the report
    of every expected file and the paths fetched again."""
    refetched: list[str] = []
    by_path = {entry.path: entry for entry in expected}
    for round_number in range(1, rounds + 1):
        broken = report.broken
        if not broken:
            break
        log.warning("round %d: re-fetching %s", round_number, report.summary())
        for path in broken:
            with contextlib.suppress(FileNotFoundError):
                (directory / path).unlink()
        retry.run(
            "re-fetch",
            lambda paths=broken: fetch_paths(
                retry.repo,
                retry.revision,
                directory,
                paths,
                token=retry.token,
                endpoint=endpoint,
                max_workers=max_workers,
            ),
            directory,
        )
        refetched.extend(broken)
        again = verify(directory, [by_path[path] for path in broken])
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
