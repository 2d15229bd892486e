"""The hub's digest of a file, computed two ways, and the stamp that keeps it true afterwards.

sha256 for LFS files, the git blob sha1 (`sha1(b"blob <size>\\0" + data)`) for the others. A
digest is computed either from the bytes on their way to disk (`HashingWriter`) or by reading
the file (`hash_file`); either way a match is recorded as the file's `Stamp` at that moment,
so a later proof can trust the file without reading it while the stamp is unchanged.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import queue
import threading
from pathlib import Path
from typing import BinaryIO, Literal, Protocol

from serving.weights.models import FileEntry, MiB, Stamp

# Large reads amortise the syscall and Python overhead; hashlib releases the GIL for any update
# over 2 KiB, so threads hash different files on different cores at full speed.
HASH_CHUNK = 8 * MiB

# A download's chunks (socket reads, <= 64 KiB) reach its hashing thread in batches of this
# size: one hand-over per batch instead of one thread wake-up per chunk.
HASH_BATCH = 1 * MiB
# Batches a download may run ahead of its hash: bounds the memory when hashing is the slower.
HASH_BATCHES_AHEAD = 8

HashStatus = Literal["ok", "bad", "missing"]


class Hasher(Protocol):
    def update(self, data: bytes | memoryview, /) -> None: ...

    def hexdigest(self) -> str: ...


def new_hasher(entry: FileEntry) -> Hasher:
    algorithm, _ = entry.digest
    if algorithm == "sha256":
        return hashlib.sha256()
    return hashlib.sha1(b"blob %d\0" % entry.size)


def stamp_of(path: Path) -> Stamp:
    stat = path.stat()
    return Stamp(
        size=stat.st_size, mtime_ns=stat.st_mtime_ns, ctime_ns=stat.st_ctime_ns, inode=stat.st_ino
    )


def current_stamp(path: Path) -> Stamp | None:
    try:
        return stamp_of(path)
    except FileNotFoundError:
        return None


def hash_file(path: Path, entry: FileEntry) -> tuple[HashStatus, int]:
    """Whether the file at `path` is `entry`, and how many bytes were read to tell."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return "missing", 0
    if size != entry.size:
        return "bad", 0  # no need to read a file of the wrong size
    hasher = new_hasher(entry)
    buffer = bytearray(HASH_CHUNK)
    view = memoryview(buffer)
    with path.open("rb", buffering=0) as f:
        with contextlib.suppress(AttributeError, OSError):
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)  # larger readahead
        while n := f.readinto(buffer):
            hasher.update(view[:n])
    return ("ok" if hasher.hexdigest() == entry.digest[1] else "bad"), size


def prove_file(path: Path, entry: FileEntry) -> tuple[HashStatus, int, Stamp | None]:
    """`hash_file`, plus the stamp that stands for the result: only if the file was not
    changed while it was read (the stamps before and after agree) and its hash matched."""
    before = current_stamp(path)
    status, read = hash_file(path, entry)
    if status != "ok" or before is None or current_stamp(path) != before:
        return ("bad" if status == "ok" else status), read, None
    return status, read, before


class HashingWriter:
    """The file object huggingface_hub's `http_get` writes a download into: each chunk is
    hashed on its way to disk, so the file never has to be read back.

    The hashing runs on a thread of its own, fed in batches (hashlib releases the GIL), so the
    thread that reads the socket goes back to it at once: on bench/download.py's 4 shards that
    cut the wall time by about a quarter for the same CPU. Use it as a context manager, so the
    thread ends with the download whatever happens.

    `http_get` seeks only to start over (a server that ignored `Range` on a resume): the hash
    starts over with it. Any other seek leaves no digest, and the file is read instead.
    """

    def __init__(self, file: BinaryIO, entry: FileEntry) -> None:
        self.file = file
        self.entry = entry
        self.hasher: Hasher | None = new_hasher(entry)
        self._batch: list[bytes] = []
        self._batch_bytes = 0
        self._batches: queue.Queue[list[bytes] | None] = queue.Queue(HASH_BATCHES_AHEAD)
        self._worker: threading.Thread | None = None

    def __enter__(self) -> HashingWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self._settle()

    def write(self, chunk: bytes) -> int:
        if self.hasher is not None:
            self._batch.append(chunk)
            self._batch_bytes += len(chunk)
            if self._batch_bytes >= HASH_BATCH:
                self._hand_over()
        return self.file.write(chunk)

    def tell(self) -> int:
        return self.file.tell()

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        self._settle()
        position = self.file.seek(offset, whence)
        self.hasher = new_hasher(self.entry) if position == 0 else None
        return position

    def truncate(self, size: int | None = None) -> int:
        return self.file.truncate(size)

    def matches(self) -> bool:
        """Whether the bytes written are the hub's file (False when no digest is known)."""
        self._settle()
        return self.hasher is not None and self.hasher.hexdigest() == self.entry.digest[1]

    def _hand_over(self) -> None:
        if self._worker is None:
            assert self.hasher is not None
            self._worker = threading.Thread(
                target=_hash_batches, args=(self.hasher, self._batches), daemon=True,
                name=f"hash {self.entry.path}",
            )  # fmt: skip
            self._worker.start()
        self._batches.put(self._batch)
        self._batch, self._batch_bytes = [], 0

    def _settle(self) -> None:
        """Return once every chunk written so far is in the digest."""
        if self._batch:
            self._hand_over()
        if self._worker is not None:
            self._batches.put(None)
            self._worker.join()
            self._worker = None


def _hash_batches(hasher: Hasher, batches: queue.Queue[list[bytes] | None]) -> None:
    while (batch := batches.get()) is not None:
        for chunk in batch:
            hasher.update(chunk)
