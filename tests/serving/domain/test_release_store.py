"""ReleaseStore.update: a read-modify-write under the store's lock, here the local target's file
store written from several threads at once. The Modal store (a Volume file under a Dict lease)
is tested through the real SDK against the Modal double:
tests/serving/platforms/modal/test_modal_release_store.py.
"""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from serving.domain.records import HistoryEntry, RecordRefused, ReleaseRecord, now
from serving.domain.release import Release
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


def _release(revision: str, dummy: bool) -> Release:
    return Release(model=MODEL, revision=revision, id=f"{MODEL}-{revision[:8]}", url="http://x",
                   deployed_at=now(), dummy_weights=dummy)  # fmt: skip


def test_the_store_refuses_a_dummy_weights_release_as_stable(tmp_path: Path) -> None:
    store = FileReleaseStore(tmp_path)
    real, dummy = _release("a" * 40, dummy=False), _release("b" * 40, dummy=True)
    store.update(MODEL, lambda record: record.model_copy(update={"stable": real}))
    with pytest.raises(RecordRefused, match="dummy weights: it never becomes stable"):
        store.update(MODEL, lambda record: record.model_copy(update={"stable": dummy}))
    assert store.read(MODEL).stable == real  # nothing written
    # ...while it may be the canary: served and probed beside stable
    store.update(MODEL, lambda record: record.model_copy(update={"canary": dummy}))
    assert store.read(MODEL).canary == dummy


def test_a_record_naming_a_dummy_stable_reads_as_having_none(tmp_path: Path) -> None:
    # written by hand, or by a version that did not refuse it
    dummy = _release("b" * 40, dummy=True)
    raw = ReleaseRecord(model=MODEL).model_dump(mode="json") | {
        "stable": dummy.model_dump(mode="json")}
    (tmp_path / f"{MODEL}.json").write_text(json.dumps(raw))
    assert FileReleaseStore(tmp_path).read(MODEL).stable is None
