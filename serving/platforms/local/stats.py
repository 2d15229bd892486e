"""The local StatsStore (serving.control.measured): `$ROLLOUT_HOME/state/router-stats/`, where
each router process writes its head and chunks (serving.router.serve --stats-dir)."""

from __future__ import annotations

import contextlib
from pathlib import Path

from serving.router.serve import HEAD_SUFFIX, chunk_file, head_file


class DirectoryStatsStore:
    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def heads(self) -> dict[str, bytes]:
        heads: dict[str, bytes] = {}
        for path in self.directory.glob(f"*{HEAD_SUFFIX}"):
            with contextlib.suppress(FileNotFoundError):  # forgotten by another reader
                heads[path.name.removesuffix(HEAD_SUFFIX)] = path.read_bytes()
        return heads

    def chunk(self, replica: str, chunk: int) -> bytes | None:
        try:
            return chunk_file(self.directory, replica, chunk).read_bytes()
        except FileNotFoundError:
            return None

    def forget(self, replica: str, chunks: list[int]) -> None:
        head_file(self.directory, replica).unlink(missing_ok=True)
        for chunk in chunks:
            chunk_file(self.directory, replica, chunk).unlink(missing_ok=True)
