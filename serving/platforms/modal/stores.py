"""Release records on Modal."""

from __future__ import annotations

from serving.domain.records import ReleaseRecord


class DictReleaseStore:
    """The same record in a `modal.Dict` (or any mapping with get/put), one key per model.

    A Dict write of one key is atomic; entries expire after 7 days without access, which the
    router's and refresh's regular reads prevent.
    """

    def __init__(self, mapping: object) -> None:
        self.mapping = mapping

    def read(self, model: str) -> ReleaseRecord:
        raw = self.mapping.get(model)  # type: ignore[attr-defined]
        return ReleaseRecord(model=model) if raw is None else ReleaseRecord.model_validate_json(raw)

    def write(self, record: ReleaseRecord) -> None:
        self.mapping.put(record.model, record.model_dump_json())  # type: ignore[attr-defined]
