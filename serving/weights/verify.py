"""Proving files: hash them against the hub's metadata, and repair the ones that fail.

A file with evidence (its `Stamp` when its hash last matched, unchanged since) is proven without
a read; the others are hashed in parallel threads (hashlib releases the GIL). A repair starts
from a report that already exists: only the bad or missing files are deleted and fetched again,
hashed as they arrive, so a 700 GB revision is read once, by the download.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path

from serving.config.layout import SENTINEL_NAME
from serving.core.files import is_partial_write_of
from serving.weights.digests import current_stamp, prove_file
from serving.weights.fetch import DEFAULT_HASH_METHOD, HashMethod, fetch_proven
from serving.weights.hub import DOWNLOAD_WORKERS, Retry
from serving.weights.models import (
    HF_LOCAL_CACHE,
    FileEntry,
    Manifest,
    ProgressCallback,
    Stamp,
    VerifyReport,
    WeightsError,
)
from serving.weights.progress import Throttle

log = logging.getLogger(__name__)

# A bad file is deleted and fetched again at most this many times before the run fails.
REFETCH_ROUNDS = 2
# How long a sentinel's stamps stand in for reading the files: as long as the prep flow trusts
# a finished download stage (tasks.weights.PROVEN_FOR). A stamp catches every write through
# the filesystem, not a volume that decays underneath, so an older download is read again.
EVIDENCE_FRESH_FOR = timedelta(days=1)


def fresh_evidence(manifest: Manifest, now: datetime | None = None) -> Mapping[str, Stamp]:
    """The sentinel's stamps while its download is recent enough to be this run's; else none."""
    age = (now or datetime.now(UTC)) - manifest.finished_at
    return manifest.stamps if age <= EVIDENCE_FRESH_FOR else {}


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
    evidence: Mapping[str, Stamp] | None = None,
) -> VerifyReport:
    """Prove every expected file against the hub's metadata: a file whose stamp equals its
    `evidence` without a read (`bytes_trusted`), the others hashed in parallel (`bytes_hashed`).

    `extra` lists files present but not in the revision (`revision_paths`, default: the expected
    files), so a subset check does not report the other shards' files. `stamps` is the evidence
    of this proof, for the next sentinel.
    """
    directory = Path(directory)
    evidence = evidence or {}
    started = time.monotonic()
    known = set(revision_paths) if revision_paths is not None else set()
    known |= {entry.path for entry in expected_files}
    report = VerifyReport(extra=sorted(list_present(directory) - known))
    throttle = Throttle(progress, "verify", sum(entry.size for entry in expected_files))
    unproven = []
    for entry in expected_files:
        stamp = evidence.get(entry.path)
        if stamp is not None and current_stamp(directory / entry.path) == stamp:
            report.ok.append(entry.path)
            report.stamps[entry.path] = stamp
            report.bytes_trusted += entry.size
        else:
            unproven.append(entry)
    done = report.bytes_trusted
    # Largest first: the long hashes start early and the small ones fill the gaps.
    unproven.sort(key=lambda entry: entry.size, reverse=True)
    with ThreadPoolExecutor(max_workers=workers or default_hash_workers()) as pool:
        futures = {pool.submit(prove_file, directory / e.path, e): e for e in unproven}
        for future in as_completed(futures):
            entry = futures[future]
            status, read, stamp = future.result()
            getattr(report, status).append(entry.path)
            if stamp is not None:
                report.stamps[entry.path] = stamp
            report.bytes_hashed += read
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
    method: HashMethod = DEFAULT_HASH_METHOD,
) -> tuple[VerifyReport, list[str]]:
    """From `report` (of `expected`), delete and re-fetch only the bad or missing files, hashed
    as they arrive (a file whose hash did not match is read once more, to name it); a file still
    bad after `rounds` rounds fails the run. Returns the report of every expected file, with the
    stamps of all, and the paths fetched again."""
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
        entries = [by_path[path] for path in broken]
        evidence: dict[str, Stamp] = {}
        fetch = partial(
            fetch_proven, retry.repo, retry.revision, directory, entries, evidence,
            token=retry.token, endpoint=endpoint, max_workers=max_workers, method=method,
        )  # fmt: skip
        retry.run("re-fetch", fetch, directory)
        refetched.extend(broken)
        again = verify(directory, entries, evidence=evidence)
        report = VerifyReport(
            ok=sorted([*report.ok, *again.ok]),
            bad=again.bad,
            missing=again.missing,
            extra=report.extra,
            bytes_hashed=report.bytes_hashed + again.bytes_hashed,
            bytes_trusted=report.bytes_trusted + again.bytes_trusted,
            seconds=report.seconds + again.seconds,
            stamps=report.stamps | again.stamps,
        )
    if not report.passed:
        raise WeightsError(
            f"{retry.repo}@{retry.revision[:8]}: verification failed after {rounds} re-fetch "
            f"round(s): {report.summary()}"
        )
    return report, refetched
