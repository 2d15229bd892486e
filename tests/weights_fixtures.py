"""Helpers for tests/test_weights.py: a private tmpfs, to fill a disk without touching the host's.

Faults on the wire come from the mirror's own knobs (dev/mirror.py: ErrorFault(methods=["GET"]),
CutFault, throttle), so the mirror's request log shows every request, failed or not.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from pathlib import Path


def can_mount_private_tmpfs() -> bool:
    """`unshare -rm` gives a private mount namespace in which an unprivileged tmpfs mount works."""
    if shutil.which("unshare") is None:
        return False
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        probe = subprocess.run(
            ["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /tmp"],
            capture_output=True,
            timeout=10,
        )
        return probe.returncode == 0
    return False


def in_tiny_tmpfs(mount_point: Path, size_bytes: int, argv: list[str]) -> list[str]:
    """argv run with a tmpfs of `size_bytes` mounted at `mount_point`, visible to it alone
    (a private mount namespace: nothing to unmount afterwards, nothing leaks to the host)."""
    script = f'mount -t tmpfs -o size={size_bytes} tmpfs "{mount_point}" && exec "$@"'
    return ["unshare", "-rm", "sh", "-c", script, "sh", *argv]
