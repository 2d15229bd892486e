"""The local release store: one JSON file per model, replaced atomically under a lock."""

from __future__ import annotations

from pathlib import Path

from serving.core.files import locked, write_atomically
from serving.domain.records import ReleaseRecord


class FileReleaseStore:
    """One JSON file per model, replaced atomically (write, fsync, rename) under a lock."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def _path(self, model: str) -> Path:
        return self.directory / f"{model}.json"

    def read(self, model: str) -> ReleaseRecord:
        path = self._path(model)
        if not path.is_file():
            return ReleaseRecord(model=model)
        return ReleaseRecord.model_validate_json(path.read_text())

    def write(self, record: ReleaseRecord) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        with locked(self.directory / f".{record.model}.lock"):
            write_atomically(self._path(record.model), record.model_dump_json(indent=1))
