"""Atomic file replacement: a reader sees the old file or the whole new one, never a part,
and the new one survives a crash once this returns. And the lock writers of one file take
around a read-modify-write."""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

TEMPORARY_SUFFIX = ".tmp"


def write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(
        dir=path.parent, prefix=f".{path.name}.", suffix=TEMPORARY_SUFFIX
    )
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # the rename itself is durable
    finally:
        os.close(directory)


def is_partial_write_of(name: str, target: str) -> bool:
    """Whether `name` is a temporary file `write_atomically` left behind for `target` (a
    process killed mid-write)."""
    return name.startswith(f".{target}.") and name.endswith(TEMPORARY_SUFFIX)


@contextlib.contextmanager
def locked(lock_path: Path) -> Iterator[None]:
    """Exclusive between processes and between threads (each opens its own file)."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield
