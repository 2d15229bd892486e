"""Progress of a download or a verification, as `Progress` reports at a bounded rate.

A download's progress is polled from the disk (finished files plus huggingface_hub's partial
files), which works for plain HTTP and hf_xet alike.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from serving.weights.models import (
    HF_DOWNLOAD_DIR,
    INCOMPLETE_SUFFIX,
    FileEntry,
    Progress,
    ProgressCallback,
)

log = logging.getLogger(__name__)

# Reported at most this often, so a Prefect progress artifact is not flooded.
PROGRESS_INTERVAL_S = 0.5


def log_progress(progress: Progress) -> None:
    log.info(progress.line())


class Throttle:
    """Turns byte counts into Progress reports, at most one per PROGRESS_INTERVAL_S."""

    def __init__(
        self, callback: ProgressCallback | None, phase: Literal["download", "verify"], total: int
    ) -> None:
        self.callback = callback
        self.phase: Literal["download", "verify"] = phase
        self.total = total
        self.began = time.monotonic()
        self.last_at = self.began
        self.last_done = 0
        self.rate = 0.0

    def update(self, done: int, *, force: bool = False) -> None:
        if self.callback is None:
            return
        now = time.monotonic()
        if not force and now - self.last_at < PROGRESS_INTERVAL_S:
            return
        interval = now - self.last_at
        if interval > 0:
            instant = max(0, done - self.last_done) / interval
            # Smoothed, so one slow poll does not swing the ETA wildly.
            self.rate = instant if self.rate == 0 else 0.7 * self.rate + 0.3 * instant
        self.last_at, self.last_done = now, done
        remaining = max(0, self.total - done)
        eta = remaining / self.rate if self.rate > 0 else None
        self.callback(
            Progress(
                phase=self.phase,
                bytes_done=min(done, self.total),
                bytes_total=self.total,
                rate_bytes_per_s=self.rate,
                eta_s=eta,
            )
        )

    def finish(self, done: int) -> None:
        if self.callback is not None:
            elapsed = time.monotonic() - self.began
            self.rate = done / elapsed if elapsed > 0 else 0.0
            self.last_at = 0.0  # force
            self.update(done, force=True)


class DiskProgress:
    """Polls the bytes on disk (finished files + partial downloads) from a background thread."""

    def __init__(
        self, directory: Path, files: Sequence[FileEntry], callback: ProgressCallback | None
    ) -> None:
        self.directory = directory
        self.files = files
        self.throttle = Throttle(callback, "download", sum(entry.size for entry in files))
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="weights-progress", daemon=True)

    def bytes_on_disk(self) -> int:
        done = 0
        for entry in self.files:
            with contextlib.suppress(OSError):
                done += (self.directory / entry.path).stat().st_size
        download_dir = self.directory / HF_DOWNLOAD_DIR
        if download_dir.is_dir():
            for path in download_dir.rglob(f"*{INCOMPLETE_SUFFIX}"):
                with contextlib.suppress(OSError):
                    done += path.stat().st_size
        return done

    def _loop(self) -> None:
        while not self.stop.wait(PROGRESS_INTERVAL_S):
            self.throttle.update(self.bytes_on_disk())

    def __enter__(self) -> DiskProgress:
        if self.throttle.callback is not None:
            self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join()
        if exc[0] is None:
            self.throttle.finish(self.bytes_on_disk())
