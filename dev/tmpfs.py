"""A small private tmpfs, to fill a disk without touching the host's: the disk-full test of the
weights download and the chaos run's `disk-full` fault.

`unshare -rm` gives a private user and mount namespace in which an unprivileged tmpfs mount
works: nothing to unmount afterwards, nothing leaks to the host, and the mount lives exactly as
long as the processes inside it.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from pathlib import Path

PROBE_TIMEOUT_SECONDS = 10


def can_mount_private_tmpfs() -> bool:
    if shutil.which("unshare") is None:
        return False
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        probe = subprocess.run(
            ["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /tmp"],
            capture_output=True,
            timeout=PROBE_TIMEOUT_SECONDS,
        )
        return probe.returncode == 0
    return False


def in_tiny_tmpfs(mount_point: Path, size_bytes: int, argv: list[str]) -> list[str]:
    """argv run with a tmpfs of `size_bytes` mounted at `mount_point`, visible to it (and to
    the processes it starts) alone."""
    script = f'mount -t tmpfs -o size={size_bytes} tmpfs "{mount_point}" && exec "$@"'
    return ["unshare", "-rm", "sh", "-c", script, "sh", *argv]
