"""Release records on Modal: one `modal.Dict` entry per model, written under a lease.

A Dict has no lock, but `put(key, value, skip_if_exists=True)` is an atomic create that says
whether it created the key (modal 1.6.4). A writer holds the lease key of a model from reading
its record to writing it back, so a promotion and an abort never decide on stale copies.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from pydantic import BaseModel

from serving.domain.records import ReleaseRecord

# A record write takes a few Dict calls (well under a second). A lease older than this belongs
# to a writer that died holding it.
LEASE_SECONDS = 30.0
# How long a writer waits for a live lease, then for a dead writer's lease to expire.
LEASE_WAIT_SECONDS = 2 * LEASE_SECONDS
LEASE_POLL_SECONDS = 0.05


class LeaseTimeout(TimeoutError):
    pass


class LeasableDict(Protocol):
    """What the store needs of a modal.Dict."""

    def get(self, key: str, default: Any = None) -> Any: ...

    def put(self, key: str, value: Any, *, skip_if_exists: bool = False) -> bool: ...

    def pop(self, key: str, default: Any = None) -> Any: ...


class Lease(BaseModel):
    token: str
    expires: float  # unix time: the clocks of orchestrators and containers agree closely enough


class DictReleaseStore:
    """The record of a model under its name; its lease under `<model>.lease` while written.

    Entries expire after 7 days without access, which the router's and refresh's regular reads
    prevent.
    """

    def __init__(
        self,
        mapping: LeasableDict,
        *,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.mapping = mapping
        self.clock, self.sleep = clock, sleep

    def read(self, model: str) -> ReleaseRecord:
        raw = self.mapping.get(model)
        return ReleaseRecord(model=model) if raw is None else ReleaseRecord.model_validate_json(raw)

    def update(self, model: str, fn: Callable[[ReleaseRecord], ReleaseRecord]) -> ReleaseRecord:
        with self._lease(model):
            current = self.read(model)
            updated = fn(current)
            if updated.model != model:
                raise ValueError(f"the record of {model} cannot become {updated.model}'s")
            if updated != current:
                self.mapping.put(model, updated.model_dump_json())
            return updated

    @contextlib.contextmanager
    def _lease(self, model: str) -> Iterator[None]:
        key = f"{model}.lease"
        token = uuid.uuid4().hex
        deadline = self.clock() + LEASE_WAIT_SECONDS
        while True:
            lease = Lease(token=token, expires=self.clock() + LEASE_SECONDS)
            if self.mapping.put(key, lease.model_dump_json(), skip_if_exists=True):
                break
            self._break_if_stale(key)
            if self.clock() > deadline:
                raise LeaseTimeout(
                    f"{model}: the release record stayed leased by another writer for"
                    f" {LEASE_WAIT_SECONDS:.0f} s"
                )
            self.sleep(LEASE_POLL_SECONDS)
        try:
            yield
        finally:
            held = self._current(key)
            # Past its expiry the lease may have been broken and taken by another writer.
            if held is not None and held.token == token:
                self.mapping.pop(key, None)

    def _current(self, key: str) -> Lease | None:
        raw = self.mapping.get(key)
        return None if raw is None else Lease.model_validate_json(raw)

    def _break_if_stale(self, key: str) -> None:
        lease = self._current(key)
        if lease is None or lease.expires > self.clock():
            return
        # Only the writer that wins this marker breaks this lease: two writers breaking it one
        # after the other would remove the lease the first of them took meanwhile. The markers
        # are left to expire with the Dict's idle entries; only a dead writer leaves one.
        if self.mapping.put(f"{key}.broken.{lease.token}", "", skip_if_exists=True):
            self.mapping.pop(key, None)
