"""ReleaseStore.update: a read-modify-write under the store's lock, on both targets.

Local: the real file store, written from several threads at once. Modal: the Dict store over
FakeDict (tests/test_modal_serving.py), which stands in for a modal.Dict (get, put with
skip_if_exists, pop); a writer that died holding its lease is a lease entry nobody releases,
and a fake clock lets its expiry pass without waiting.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from serving.domain.records import HistoryEntry, ReleaseRecord, now
from serving.platforms.local.stores import FileReleaseStore
from serving.platforms.modal.stores import (
    LEASE_SECONDS,
    LEASE_WAIT_SECONDS,
    DictReleaseStore,
    Lease,
    LeaseTimeout,
)
from tests.modal_fixtures import FakeDict

MODEL = "m"
# A modal.Dict call is a network round trip; without one, a thread switch would rarely fall
# between a read and its write, and a store without a lease would pass by luck.
ROUND_TRIP_SECONDS = 0.002
WRITERS = 4
# Writers x updates stays within the record's history limit (50), so none is dropped.
UPDATES_PER_WRITER = 12


def one_more_entry(writer: int, update: int) -> object:
    def add(record: ReleaseRecord) -> ReleaseRecord:
        entry = HistoryEntry(revision=f"{writer}-{update}", at=now(), outcome="no-op", reason="")
        return record.with_history(entry)

    return add


def update_from_threads(store: FileReleaseStore | DictReleaseStore) -> ReleaseRecord:
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


class RemoteDict(FakeDict):
    def get(self, key: str, default: object = None) -> object:
        time.sleep(ROUND_TRIP_SECONDS)
        return super().get(key, default)

    def put(self, key: str, value: object, *, skip_if_exists: bool = False) -> bool:
        time.sleep(ROUND_TRIP_SECONDS)
        return super().put(key, value, skip_if_exists=skip_if_exists)


def test_dict_store_updates_from_many_writers_lose_nothing_and_leave_no_lease() -> None:
    mapping = RemoteDict()
    assert_no_update_lost(update_from_threads(DictReleaseStore(mapping)))
    assert list(mapping.data) == [MODEL]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def time(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_a_dead_writers_lease_is_broken_once_it_expires() -> None:
    mapping, clock = FakeDict(), FakeClock()
    dead = Lease(token="dead", expires=clock.now + LEASE_SECONDS)
    mapping.put(f"{MODEL}.lease", dead.model_dump_json())
    store = DictReleaseStore(mapping, clock=clock.time, sleep=clock.sleep)
    started = clock.now

    store.update(MODEL, one_more_entry(0, 0))  # type: ignore[arg-type]

    assert LEASE_SECONDS <= clock.now - started < LEASE_SECONDS + 1
    assert [entry.revision for entry in store.read(MODEL).history] == ["0-0"]
    assert f"{MODEL}.lease" not in mapping.data


def test_a_held_lease_makes_a_writer_wait_a_bounded_time_then_fail() -> None:
    mapping, clock = FakeDict(), FakeClock()
    live = Lease(token="live", expires=clock.now + 10 * LEASE_WAIT_SECONDS)
    mapping.put(f"{MODEL}.lease", live.model_dump_json())
    store = DictReleaseStore(mapping, clock=clock.time, sleep=clock.sleep)
    started = clock.now

    with pytest.raises(LeaseTimeout, match="stayed leased by another writer"):
        store.update(MODEL, one_more_entry(0, 0))  # type: ignore[arg-type]

    assert LEASE_WAIT_SECONDS <= clock.now - started < LEASE_WAIT_SECONDS + 1
    assert MODEL not in mapping.data
    assert Lease.model_validate_json(mapping.data[f"{MODEL}.lease"]) == live  # not ours to drop


def test_a_failed_change_releases_the_lease() -> None:
    mapping = FakeDict()
    store = DictReleaseStore(mapping)

    def fail(record: ReleaseRecord) -> ReleaseRecord:
        raise RuntimeError("decided nothing")

    with pytest.raises(RuntimeError, match="decided nothing"):
        store.update(MODEL, fail)
    assert mapping.data == {}
    store.update(MODEL, one_more_entry(0, 0))  # type: ignore[arg-type]  # at once, no wait
    assert len(store.read(MODEL).history) == 1
