"""ReleaseStore.update: a read-modify-write under the store's lock, here the local target's file
store written from several threads at once. The Modal store (a Volume file under a Dict lease)
is tested through the real SDK against the Modal double:
tests/serving/platforms/modal/test_modal_release_store.py.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from serving.domain.records import HistoryEntry, ReleaseRecord, now
from serving.platforms.local.stores import FileReleaseStore

MODEL = "m"
WRITERS = 4
# Writers x updates stays within the record's history limit (50), so none is dropped.
UPDATES_PER_WRITER = 12


def one_more_entry(writer: int, update: int) -> object:
    def add(record: ReleaseRecord) -> ReleaseRecord:
        entry = HistoryEntry(revision=f"{writer}-{update}", at=now(), outcome="no-op", reason="")
        return record.with_history(entry)

    return add


def update_from_threads(store: FileReleaseStore) -> ReleaseRecord:
    start = threading.Barrier(WRITERS)

    def writer(number: int) -> None:
        start.wait()
        for update in range(UPDATES_PER_WRITER):
            store.update(MODEL, one_more_entry(number, update))  # type: ignore[arg-type]

    with ThreadPoolExecutor(WRITERS) as pool:
        list(pool.map(writer, range(WRITERS)))
    return store.read(MODEL)


def assert_no_update_lost(record: ReleaseRecord) -> None:
    written = sorted(entry.revision for entry in record.history)
    expected = sorted(f"{w}-{u}" for w in range(WRITERS) for u in range(UPDATES_PER_WRITER))
    assert written == expected
    for writer in range(WRITERS):  # and each writer's updates in its order
        mine = [e.revision for e in record.history if e.revision.startswith(f"{writer}-")]
        assert mine == [f"{writer}-{u}" for u in range(UPDATES_PER_WRITER)]


def test_file_store_updates_from_many_writers_lose_nothing(tmp_path: Path) -> None:
    store = FileReleaseStore(tmp_path)
    assert_no_update_lost(update_from_threads(store))
    assert FileReleaseStore(tmp_path).read(MODEL) == store.read(MODEL)


def test_an_unchanged_record_is_not_written(tmp_path: Path) -> None:
    store = FileReleaseStore(tmp_path)
    assert store.update(MODEL, lambda record: record) == ReleaseRecord(model=MODEL)
    assert not (tmp_path / f"{MODEL}.json").exists()


def test_a_record_cannot_change_its_model(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="the record of m cannot become"):
        FileReleaseStore(tmp_path).update(MODEL, lambda _: ReleaseRecord(model="other"))
