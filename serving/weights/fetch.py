"""Files of a revision onto disk, each proven against the hub's digest as it arrives.

Two ways to hash a file while its bytes are fresh, measured against each other by
bench/download.py:

- "stream": huggingface_hub's own `http_get` writes the download into a `HashingWriter`, which
  hashes every chunk on its way to disk; the finished file is moved into place.
- "reread": `hf_hub_download` writes the file and the same worker reads it back at once, from
  the page cache, while the other workers keep downloading.

hf_xet writes Xet-backed files itself (in parallel ranges, from Rust), so those always take the
"reread" way. Each file proven here leaves its `Stamp` in `evidence`; a proof afterwards reads
only the files without one. A file already in place is not fetched: an earlier run finished it,
and the proof reads it.
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
from collections.abc import Iterator, MutableMapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

from huggingface_hub import constants, get_hf_file_metadata, hf_hub_download, hf_hub_url
from huggingface_hub.file_download import http_get
from huggingface_hub.utils import build_hf_headers

from serving.weights.digests import HashingWriter, prove_file, stamp_of
from serving.weights.hub import DOWNLOAD_WORKERS
from serving.weights.models import HF_DOWNLOAD_DIR, INCOMPLETE_SUFFIX, FileEntry, Stamp

log = logging.getLogger(__name__)

HashMethod = Literal["stream", "reread"]
# The cheaper of the two on bench/download.py (README, "Weights are read once").
DEFAULT_HASH_METHOD: HashMethod = "stream"

Evidence = MutableMapping[str, Stamp]


def fetch_proven(
    repo: str,
    revision: str,
    directory: Path,
    entries: Sequence[FileEntry],
    evidence: Evidence,
    *,
    token: str | None,
    endpoint: str | None,
    max_workers: int = DOWNLOAD_WORKERS,
    method: HashMethod = DEFAULT_HASH_METHOD,
) -> None:
    """Fetch the `entries` not yet in `directory`, in parallel. `evidence` gains each file whose
    digest matched as it arrived, as soon as it is in place, so a step retried after a failure
    keeps what the failed attempt proved. A file that did not match is left for the proof."""

    def one(entry: FileEntry) -> None:
        target = directory / entry.path
        if target.exists():
            return
        if method == "stream" and not _written_by_xet(repo, revision, entry, token, endpoint):
            proven = _stream(repo, revision, directory, entry, token=token, endpoint=endpoint)
        else:
            hf_hub_download(
                repo, entry.path, revision=revision, local_dir=directory, token=token,
                endpoint=endpoint,
            )  # fmt: skip
            proven = prove_file(target, entry)[2]
        if proven is None:
            log.warning("%s does not match the hub's hash as downloaded", entry.path)
        else:
            evidence[entry.path] = proven

    with _socket_reads_passed_on(), ThreadPoolExecutor(max_workers=max_workers) as pool:
        for future in [pool.submit(one, entry) for entry in entries]:
            future.result()


class _Rechunking:
    """How many fetches in this process want huggingface_hub's downloads unchunked, and the
    chunk size to restore when none does."""

    lock = threading.Lock()
    users = 0
    saved: int | None = None


@contextmanager
def _socket_reads_passed_on() -> Iterator[None]:
    """huggingface_hub's `http_get` gathers a download's socket reads (<= 64 KiB each) into
    fresh 10 MiB `bytes` (`DOWNLOAD_CHUNK_SIZE`) before writing them: two more copies of every
    byte, through buffers too large for the CPU's caches. That doubled a download's CPU, most of
    it kernel time (bench/download.py: our prep went from 1.23x to 0.6x the CPU of
    `hf download`). For as long as a fetch runs, each read is handed on as it came. The library
    reads the constant on every call and has no parameter for it; restored after the last fetch."""
    with _Rechunking.lock:
        if _Rechunking.users == 0:
            _Rechunking.saved = constants.DOWNLOAD_CHUNK_SIZE
            constants.DOWNLOAD_CHUNK_SIZE = None  # type: ignore[assignment]
        _Rechunking.users += 1
    try:
        yield
    finally:
        with _Rechunking.lock:
            _Rechunking.users -= 1
            if _Rechunking.users == 0:
                constants.DOWNLOAD_CHUNK_SIZE = _Rechunking.saved  # type: ignore[assignment]


def _written_by_xet(
    repo: str, revision: str, entry: FileEntry, token: str | None, endpoint: str | None
) -> bool:
    """Whether the hub stores this file in Xet, so huggingface_hub hands it to hf_xet (one HEAD
    request; small files are plain git blobs)."""
    if not entry.lfs:
        return False
    url = hf_hub_url(repo, entry.path, revision=revision, endpoint=endpoint)
    return get_hf_file_metadata(url, token=token, endpoint=endpoint).xet_file_data is not None


def _stream(
    repo: str,
    revision: str,
    directory: Path,
    entry: FileEntry,
    *,
    token: str | None,
    endpoint: str | None,
) -> Stamp | None:
    """Download one file through a `HashingWriter` into a partial file where huggingface_hub
    keeps its own (named alike, so an interrupted run's orphans are found the same way), then
    move it into place. Its stamp if its digest matched."""
    target = directory / entry.path
    unique = f"{entry.etag}.{uuid.uuid4().hex[:8]}{INCOMPLETE_SUFFIX}"
    partial = directory / HF_DOWNLOAD_DIR / f"{entry.path}.{unique}"
    partial.parent.mkdir(parents=True, exist_ok=True)
    try:
        with partial.open("wb") as file, HashingWriter(file, entry) as writer:
            http_get(
                hf_hub_url(repo, entry.path, revision=revision, endpoint=endpoint),
                writer,  # type: ignore[arg-type]  # what http_get calls of a file, it has
                headers=build_hf_headers(token=token),
                expected_size=entry.size,
            )
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    # Stamped after the move: a rename changes the ctime.
    return stamp_of(target) if writer.matches() else None
