"""Helpers for tests/test_weights.py: a private tmpfs (dev/tmpfs.py), to fill a disk without
touching the host's.

Faults on the wire come from the mirror's own knobs (dev/mirror.py: ErrorFault(methods=["GET"]),
CutFault, throttle), so the mirror's request log shows every request, failed or not.
"""

from __future__ import annotations

from dev.tmpfs import can_mount_private_tmpfs, in_tiny_tmpfs

__all__ = ["can_mount_private_tmpfs", "in_tiny_tmpfs"]
