"""Release records on Modal through the real modal SDK, against the TEST DOUBLE of Modal's API
(tests/modal_double): whole JSON files on the v2 state Volume (uploaded block by block, read back
over HTTP), leases in the Dict, whose entries the double forgets after a week idle as Modal does.

Writers that race each get their own modal client, as a worker and a laptop running
`rollout abort` would.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import modal
import pytest
from modal._serialization import deserialize
from modal.volume import BLOCK_SIZE
from modal_proto import api_pb2

from serving.control import lifecycle
from serving.domain.records import HistoryEntry, ReleaseRecord, now
from serving.domain.release import Release
from serving.platforms.modal import resources
from serving.platforms.modal.gateway import ModalGateway, VolumeFiles
from serving.platforms.modal.platform import ModalPlatform
from serving.platforms.modal.stores import (
    LEASE_POLL_MAX_SECONDS,
    LEASE_SECONDS,
    LEASE_WAIT_SECONDS,
    Lease,
    LeaseTimeout,
    VolumeReleaseStore,
    record_path,
)
from tests.modal_double.servicer import ModalDouble
from tests.modal_double.storage import DAYS
from tests.modal_fixtures import FakeClock

MODEL = "qwen3-8b"
STABLE = Release(
    model=MODEL, revision="a" * 40, id="qwen3-8b-aaaaaaaa", url="https://a.modal.run",
    deployed_at=datetime(2026, 11, 1, tzinfo=UTC),
)  # fmt: skip
CANARY = Release(
    model=MODEL, revision="b" * 40, id="qwen3-8b-bbbbbbbb", url="https://b.modal.run",
    deployed_at=datetime(2026, 11, 8, tzinfo=UTC),
)  # fmt: skip
RACES = 2
# A dead writer took its lease this long before the test's writer arrives: it expires in 1 s.
DIED_AGO_SECONDS = LEASE_SECONDS - 1


@pytest.fixture
def platform(modal_double: ModalDouble, tmp_path: Path) -> ModalPlatform:
    return ModalPlatform(tmp_path / "home")


def own_client_store(clock: FakeClock | None = None) -> VolumeReleaseStore:
    """A release store on a modal client of its own (its own connection to the API)."""
    client = modal.Client.from_credentials("ak-modal-double", "as-modal-double")
    volume = modal.Volume.from_name(
        resources.STATE_VOLUME_NAME, create_if_missing=True, version=2, client=client
    )
    leases = modal.Dict.from_name(resources.RELEASES_DICT_NAME, create_if_missing=True,
                                  client=client)  # fmt: skip
    if clock is None:  # real time: racing writers wait for each other
        return VolumeReleaseStore(VolumeFiles(volume), leases)
    return VolumeReleaseStore(VolumeFiles(volume), leases, clock=clock, sleep=clock.sleep)


def dict_keys(double: ModalDouble, name: str) -> list[str]:
    (named,) = [named for (_, dict_name), named in double.dicts.items() if dict_name == name]
    return sorted(deserialize(key, None) for key in named.data)


def state_file(double: ModalDouble, path: str) -> bytes | None:
    volume = double.volumes.get(("", resources.STATE_VOLUME_NAME))
    return None if volume is None else volume.files.get(path)


def with_stable(record: ReleaseRecord) -> ReleaseRecord:
    return record.model_copy(update={"stable": STABLE})


# Where records live.


def test_a_record_is_one_json_file_on_the_v2_state_volume(
    modal_double: ModalDouble, platform: ModalPlatform
) -> None:
    store = platform.release_store()
    assert store.read(MODEL) == ReleaseRecord(model=MODEL)

    written = store.update(MODEL, with_stable)

    assert modal_double.volume_version(resources.STATE_VOLUME_NAME) == api_pb2.VOLUME_FS_VERSION_V2
    assert state_file(modal_double, record_path(MODEL)) == written.model_dump_json().encode()
    assert own_client_store().read(MODEL).stable == STABLE  # another client reads it back
    assert dict_keys(modal_double, resources.RELEASES_DICT_NAME) == []  # the lease is gone


def test_a_file_of_several_blocks_is_uploaded_whole_and_replaced_whole(
    modal_double: ModalDouble,
) -> None:
    files = ModalGateway().volume_files(resources.STATE_VOLUME_NAME)
    # Blocks of mostly zeros: uploads and downloads leave out a block's trailing zeros.
    first = b"head".ljust(BLOCK_SIZE, b"\0") + b"tail" + b"\0" * 100
    second = first[:BLOCK_SIZE] + b"other tail"

    assert files.write("big.bin", first) is True
    assert files.read("big.bin") == first
    assert files.write("big.bin", second, replace=False) is False  # create-only: it exists
    assert state_file(modal_double, "big.bin") == first
    assert files.write("big.bin", second) is True
    assert state_file(modal_double, "big.bin") == second
    assert files.read("missing.bin") is None


# The week the Dict forgets.


def test_the_double_forgets_a_dict_entry_after_seven_idle_days(modal_double: ModalDouble) -> None:
    entries = ModalGateway().dict("scratch")
    entries.put("read-often", "1")
    entries.put("idle", "2")
    modal_double.advance_clock(6 * DAYS)
    assert entries.get("read-often") == "1"  # a read restarts its week

    modal_double.advance_clock(2 * DAYS)

    assert entries.get("idle") is None
    assert entries.get("read-often") == "1"


def test_a_record_untouched_for_eight_days_is_still_there_for_the_next_rollout(
    modal_double: ModalDouble, platform: ModalPlatform
) -> None:
    platform.release_store().update(MODEL, with_stable)
    forgotten = ModalGateway().dict(resources.RELEASES_DICT_NAME)
    forgotten.put("glm-5.1", ReleaseRecord(model="glm-5.1", stable=STABLE).model_dump_json())

    modal_double.advance_clock(8 * DAYS)

    assert forgotten.get("glm-5.1") is None  # what a record kept in the Dict would have become
    assert platform.release_store().read(MODEL).stable == STABLE
    # The next rollout's canary goes in beside the stable release, not in its place.
    after = lifecycle.start_canary(platform, CANARY, owner="next-run")
    assert (after.stable, after.canary) == (STABLE, CANARY)


# Writers racing on one model.


def test_a_promotion_and_an_abort_racing_from_two_clients_decide_once(
    modal_double: ModalDouble,
) -> None:
    promoter, aborter = own_client_store(), own_client_store()
    start = threading.Barrier(2)
    decided: list[str] = []

    def promote(record: ReleaseRecord) -> ReleaseRecord:
        if record.canary is None:
            return record
        decided.append("promoted")
        entry = HistoryEntry(revision=record.canary.revision, at=now(), outcome="promoted",
                             reason="gates passed")  # fmt: skip
        change = {"stable": record.canary, "canary": None, "retiring": [record.stable]}
        return record.model_copy(update=change).with_history(entry)

    def abort(record: ReleaseRecord) -> ReleaseRecord:
        if record.canary is None:
            return record
        decided.append("rolled-back")
        entry = HistoryEntry(revision=record.canary.revision, at=now(), outcome="rolled-back",
                             reason="rollout abort")  # fmt: skip
        change = {"canary": None, "retiring": [record.canary]}
        return record.model_copy(update=change).with_history(entry)

    def race(store: VolumeReleaseStore, decide: Callable[..., ReleaseRecord]) -> None:
        start.wait()
        store.update(MODEL, decide)

    for number in range(RACES):
        promoter.update(MODEL, lambda r: r.model_copy(update={"stable": STABLE, "canary": CANARY}))
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(race, [promoter, aborter], [promote, abort]))

        record = promoter.read(MODEL)
        # Exactly one decided; the other saw the record as the winner left it: no canary.
        assert len(decided) == number + 1
        assert [entry.outcome for entry in record.history] == decided
        assert record.canary is None
        assert record.retiring == ([STABLE] if record.history[-1].outcome == "promoted"
                                   else [CANARY])  # fmt: skip


def test_a_dead_writers_lease_is_broken_lease_seconds_after_it_was_taken(
    modal_double: ModalDouble,
) -> None:
    clock = FakeClock()
    taken = clock.now - DIED_AGO_SECONDS
    dead = Lease(token="dead", expires=taken + LEASE_SECONDS)
    ModalGateway().dict(resources.RELEASES_DICT_NAME).put(f"{MODEL}.lease", dead.model_dump_json())
    store = own_client_store(clock)

    store.update(MODEL, with_stable)

    assert LEASE_SECONDS <= clock.now - taken < LEASE_SECONDS + LEASE_POLL_MAX_SECONDS
    assert store.read(MODEL).stable == STABLE
    # Only the marker that its lease was broken is left, to expire with the Dict's idle entries.
    assert dict_keys(modal_double, resources.RELEASES_DICT_NAME) == [f"{MODEL}.lease.broken.dead"]


def test_a_live_lease_makes_a_writer_fail_after_a_bounded_wait(modal_double: ModalDouble) -> None:
    clock = FakeClock()
    live = Lease(token="live", expires=clock.now + 10 * LEASE_WAIT_SECONDS)
    leases = ModalGateway().dict(resources.RELEASES_DICT_NAME)
    leases.put(f"{MODEL}.lease", live.model_dump_json())
    store = own_client_store(clock)
    started = clock.now

    with pytest.raises(LeaseTimeout, match="stayed leased by another writer"):
        store.update(MODEL, with_stable)

    assert LEASE_WAIT_SECONDS <= clock.now - started < LEASE_WAIT_SECONDS + LEASE_POLL_MAX_SECONDS
    assert state_file(modal_double, record_path(MODEL)) is None
    assert Lease.model_validate_json(leases.get(f"{MODEL}.lease")) == live  # not ours to drop


def test_a_failed_change_releases_the_lease(modal_double: ModalDouble) -> None:
    store = own_client_store()

    def fail(record: ReleaseRecord) -> ReleaseRecord:
        raise RuntimeError("decided nothing")

    with pytest.raises(RuntimeError, match="decided nothing"):
        store.update(MODEL, fail)
    assert dict_keys(modal_double, resources.RELEASES_DICT_NAME) == []
    with pytest.raises(ValueError, match="cannot become"):
        store.update(MODEL, lambda _: ReleaseRecord(model="other"))
    assert store.update(MODEL, with_stable).stable == STABLE  # at once: no lease left behind


# Records an earlier version kept in the Dict.


def test_a_record_found_only_in_the_old_dict_moves_to_the_volume_when_first_read(
    modal_double: ModalDouble, platform: ModalPlatform
) -> None:
    old = ReleaseRecord(model=MODEL, stable=STABLE)
    legacy = ModalGateway().dict(resources.RELEASES_DICT_NAME)
    legacy.put(MODEL, old.model_dump_json())  # as the Dict store wrote it

    assert platform.release_store().read(MODEL) == old

    assert state_file(modal_double, record_path(MODEL)) == old.model_dump_json().encode()
    assert legacy.get(MODEL) is None
    after = lifecycle.start_canary(platform, CANARY, owner="next-run")
    assert (after.stable, after.canary) == (STABLE, CANARY)
