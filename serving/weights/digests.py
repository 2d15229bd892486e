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
from pathlib import Path
from typing import BinaryIO, Literal, Protocol

from serving.weights.models import FileEntry, MiB, Stamp

# Large reads amortise the syscall and Python overhead; hashlib releases the GIL for any update
# over 2 KiB, so threads hash different files on different cores at full speed.
HASH_CHUNK = 8 * MiB

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

    `http_get` seeks only to start over (a server that ignored `Range` on a resume): the hash
    starts over with it. Any other seek leaves no digest, and the file is read instead.
    """

    def __init__(self, file: BinaryIO, entry: FileEntry) -> None:
        self.file = file
        self.entry = entry
        self.hasher: Hasher | None = new_hasher(entry)

    def write(self, chunk: bytes) -> int:
        if self.hasher is not None:
            self.hasher.update(chunk)
        return self.file.write(chunk)

    def tell(self) -> int:
        return self.file.tell()

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        position = self.file.seek(offset, whence)
        self.hasher = new_hasher(self.entry) if position == 0 else None
        return position

    def truncate(self, size: int | None = None) -> int:
        return self.file.truncate(size)

    def matches(self) -> bool:
        """Whether the bytes written are the hub's file (False when no digest is known)."""
        return self.hasher is not None and self.hasher.hexdigest() == self.entry.digest[1]
