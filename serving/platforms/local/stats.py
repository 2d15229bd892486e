"""The local StatsStore (serving.control.measured): `$ROLLOUT_HOME/state/router-stats/`, one
`<replica>.json` per router process, which each replica replaces every second
(serving.router.serve --stats-dir)."""

from __future__ import annotations

import contextlib
from pathlib import Path

SNAPSHOT_SUFFIX = ".json"


class DirectoryStatsStore:
    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def published(self) -> dict[str, bytes]:
        snapshots: dict[str, bytes] = {}
        for path in self.directory.glob(f"*{SNAPSHOT_SUFFIX}"):
            with contextlib.suppress(FileNotFoundError):  # forgotten by another reader
                snapshots[path.name.removesuffix(SNAPSHOT_SUFFIX)] = path.read_bytes()
        return snapshots

    def forget(self, replica: str) -> None:
        (self.directory / f"{replica}{SNAPSHOT_SUFFIX}").unlink(missing_ok=True)
