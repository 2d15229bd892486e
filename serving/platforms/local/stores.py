"""The local release store: one JSON file per model, replaced atomically under a lock."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from serving.core.files import locked, write_atomically
from serving.domain.records import ReleaseRecord, checked


class FileReleaseStore:
    """One JSON file per model, replaced atomically (write, fsync, rename) under a file lock
    held from the read to the write."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def _path(self, model: str) -> Path:
        return self.directory / f"{model}.json"

    def read(self, model: str) -> ReleaseRecord:
        path = self._path(model)
        if not path.is_file():
            return ReleaseRecord(model=model)
        return ReleaseRecord.model_validate_json(path.read_text())

    def update(self, model: str, fn: Callable[[ReleaseRecord], ReleaseRecord]) -> ReleaseRecord:
        with locked(self.directory / f".{model}.lock"):
            current = self.read(model)
            updated = checked(model, fn(current))
            if updated != current:
                write_atomically(self._path(model), updated.model_dump_json(indent=1))
            return updated
