"""Release records on Modal: one JSON file per model on the state Volume, written under a lease.

A record must outlive any idle week: a `modal.Dict` entry expires after 7 days without reads or
writes, and a model that lost its record would be rolled out as new (straight to 100%, no
canary) while its old release kept its GPUs unrecorded. Volume files never expire. Each write
puts the whole file in one call (a reader sees the old record or the new one, never a mix); the
records are read and written only through Modal's API, by orchestrators and `rollout abort`,
never through a container's mount, so there is no commit or reload to miss.

A Volume has no lock. The lease lives in the `rollout-releases` Dict, where
`put(key, value, skip_if_exists=True)` is an atomic create that says whether it created the key
(modal 1.6.4): a writer holds the lease of a model from reading its record to writing it back,
so a promotion and an abort never decide on stale copies. A lease lives seconds, so the Dict's
expiry never matters to it.

That Dict held the records themselves before; a record found only there is moved to the Volume
the first time it is read.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Callable, Iterator

from pydantic import BaseModel

from serving.domain.records import ReleaseRecord, checked
from serving.platforms.modal.resources import KeyValue, WholeFiles

# A record write takes a few API calls (well under a second). A lease older than this belongs
# to a writer that died holding it.
LEASE_SECONDS = 30.0
# How long a writer waits for a live lease, then for a dead writer's lease to expire.
LEASE_WAIT_SECONDS = 2 * LEASE_SECONDS
# A live writer lets go within a second, a dead one's lease lasts LEASE_SECONDS: try again soon,
# then less and less often (each try is an API call).
LEASE_POLL_FIRST_SECONDS = 0.05
LEASE_POLL_MAX_SECONDS = 2.0
RECORDS_DIR = "releases"


class LeaseTimeout(TimeoutError):
    pass


class Lease(BaseModel):
    token: str
    expires: float  # unix time: the clocks of orchestrators and containers agree closely enough


def record_path(model: str) -> str:
    return f"{RECORDS_DIR}/{model}.json"


class VolumeReleaseStore:
    """The record of a model in `releases/<model>.json` of the state Volume; its lease under
    `<model>.lease` of the Dict while it is written."""

    def __init__(
        self,
        files: WholeFiles,
        leases: KeyValue,
        *,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.files, self.leases = files, leases
        self.clock, self.sleep = clock, sleep

    def read(self, model: str) -> ReleaseRecord:
        raw = self.files.read(record_path(model))
        if raw is None:
            raw = self._move_from_dict(model)
        return ReleaseRecord(model=model) if raw is None else ReleaseRecord.model_validate_json(raw)

    def update(self, model: str, fn: Callable[[ReleaseRecord], ReleaseRecord]) -> ReleaseRecord:
        with self._lease(model):
            current = self.read(model)
            updated = checked(model, fn(current))
            if updated != current:
                self.files.write(record_path(model), updated.model_dump_json().encode())
            return updated

    def _move_from_dict(self, model: str) -> bytes | None:
        """The record an earlier version left in the Dict (under the model's name), now on the
        Volume. Only created there, never replacing: a file that appeared meanwhile was written
        by an update, from this same Dict copy or a later one, and wins."""
        legacy = self.leases.get(model)
        if legacy is not None:
            self.files.write(record_path(model), str(legacy).encode(), replace=False)
            self.leases.pop(model, None)
        # Read again either way: another reader may have moved it between our two reads.
        return self.files.read(record_path(model))

    @contextlib.contextmanager
    def _lease(self, model: str) -> Iterator[None]:
        key = f"{model}.lease"
        token = uuid.uuid4().hex
        deadline = self.clock() + LEASE_WAIT_SECONDS
        poll = LEASE_POLL_FIRST_SECONDS
        other: Lease | None = None  # the lease in the way, as last read
        while True:
            lease = Lease(token=token, expires=self.clock() + LEASE_SECONDS)
            if self.leases.put(key, lease.model_dump_json(), skip_if_exists=True):
                break
            # No writer extends its lease: the one read need not be read again before it expires.
            if other is None or other.expires <= self.clock():
                other = self._current(key)
                if self._break_if_stale(key, other):
                    continue  # at once: another waiter may take it first, then this one waits
            if self.clock() > deadline:
                raise LeaseTimeout(
                    f"{model}: the release record stayed leased by another writer for"
                    f" {LEASE_WAIT_SECONDS:.0f} s"
                )
            self.sleep(poll)
            poll = min(2 * poll, LEASE_POLL_MAX_SECONDS)
        try:
            yield
        finally:
            held = self._current(key)
            # Past its expiry the lease may have been broken and taken by another writer.
            if held is not None and held.token == token:
                self.leases.pop(key, None)

    def _current(self, key: str) -> Lease | None:
        raw = self.leases.get(key)
        return None if raw is None else Lease.model_validate_json(raw)

    def _break_if_stale(self, key: str, lease: Lease | None) -> bool:
        """Whether this writer broke the lease, expired."""
        if lease is None or lease.expires > self.clock():
            return False
        # Only the writer that wins this marker breaks this lease: two writers breaking it one
        # after the other would remove the lease the first of them took meanwhile. The markers
        # are left to expire with the Dict's idle entries; only a dead writer leaves one.
        if not self.leases.put(f"{key}.broken.{lease.token}", "", skip_if_exists=True):
            return False
        self.leases.pop(key, None)
        return True
