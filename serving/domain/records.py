"""The release record of a model: what is stable, what is canary, and what happened before.

Written by the release lifecycle (serving.control.lifecycle), from a rollout flow or from
`rollout abort`; read by `rollout status`, by the reconcile step at the start of every run (a
SIGKILLed orchestrator leaves `canary` set, and its run's mark with no line in the history),
and by `refresh` (which skips the revision that last failed, unless its run was killed).
Durable and atomic on both targets: a JSON file replaced atomically under a file lock locally;
on Modal a JSON file written whole to the state Volume under a lease (a Dict entry would
expire after a week idle).

Every write is a read-modify-write under the store's lock (`ReleaseStore.update`): two writers
(a promotion and an abort) each decide on the record as the other left it, never on a copy
read before the other wrote.

A release on dummy (random) weights is never stable: a store refuses to write such a record
(`checked`), and one read that names it as stable reads as having no stable, so a real
rollout never compares against it (it is a first release).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Literal, Protocol

from pydantic import BaseModel, Field, field_validator

from serving.domain.release import Release

# Enough history to see a model's recent rollouts; older entries are dropped.
HISTORY_LIMIT = 50

# dummy: a dummy-weights release was served and probed, then retired (never a failure: a
# refresh does not skip its revision)
Outcome = Literal["promoted", "rolled-back", "no-op", "failed", "dummy"]


class HistoryEntry(BaseModel):
    revision: str
    at: datetime
    outcome: Outcome
    reason: str
    flow_run_id: str | None = None
    # Written for a run that was killed before it decided (its line, or its canary's revert by
    # the next run's reconcile): no verdict on the revision, so a refresh rolls it out again.
    interrupted: bool = False

    @classmethod
    def stamped(cls, revision: str, outcome: Outcome, reason: str, flow_run_id: str | None,
                interrupted: bool = False) -> HistoryEntry:  # fmt: skip
        """The line for what happened just now."""
        return cls(revision=revision, at=now(), outcome=outcome, reason=reason,
                   flow_run_id=flow_run_id, interrupted=interrupted)  # fmt: skip


class RunMark(BaseModel):
    """A rollout flow run that began, marked at its start: a run ends by writing its own line
    in the history, so a mark with no line after it is a run that was killed."""

    flow_run_id: str
    revision: str  # as the run was asked for it (it may not have resolved it yet)
    at: datetime


class ReleaseRecord(BaseModel):
    model: str
    stable: Release | None = None
    canary: Release | None = None
    # The flow run that owns the canary: a run that finds someone else's canary reconciles it.
    canary_owner: str | None = None
    # Out of routing by a promotion or a rollback, still running until retired: named here so
    # that a crash between the decision and the retirement leaves nothing running unaccounted.
    retiring: list[Release] = Field(default_factory=list)
    history: list[HistoryEntry] = Field(default_factory=list)
    # The last rollout run that began (see RunMark).
    run: RunMark | None = None

    @field_validator("stable")
    @classmethod
    def _never_a_dummy_stable(cls, stable: Release | None) -> Release | None:
        return None if stable is not None and stable.dummy_weights else stable

    def with_history(self, entry: HistoryEntry) -> ReleaseRecord:
        history = [*self.history, entry][-HISTORY_LIMIT:]
        return self.model_copy(update={"history": history})

    def recorded(self, flow_run_id: str) -> bool:
        return any(entry.flow_run_id == flow_run_id for entry in self.history)

    def with_failure(self, flow_run_id: str, revision: str, reason: str,
                     interrupted: bool = False) -> ReleaseRecord:  # fmt: skip
        return self.with_history(
            HistoryEntry.stamped(revision, "failed", reason, flow_run_id, interrupted)
        )

    def beginning(self, run: RunMark) -> ReleaseRecord:
        """`run` marked as begun; the run marked before it, if it never wrote its line (it was
        SIGKILLed), gets a "failed" line saying it was interrupted."""
        record = self
        before = self.run
        if (before is not None and before.flow_run_id != run.flow_run_id
                and not self.recorded(before.flow_run_id)):  # fmt: skip
            reason = (f"interrupted: flow run {before.flow_run_id} ended without a decision "
                      f"(found by flow run {run.flow_run_id})")  # fmt: skip
            record = self.with_failure(before.flow_run_id, before.revision, reason,
                                       interrupted=True)
        return record.model_copy(update={"run": run})

    def last_failed_revision(self) -> str | None:
        """The revision of the last rollout judged bad since the last promotion, if any."""
        for entry in reversed(self.history):
            if entry.interrupted:
                continue
            if entry.outcome in ("rolled-back", "failed"):
                return entry.revision
            if entry.outcome == "promoted":
                return None
        return None


class ReleaseStore(Protocol):
    def read(self, model: str) -> ReleaseRecord: ...

    def update(self, model: str, fn: Callable[[ReleaseRecord], ReleaseRecord]) -> ReleaseRecord:
        """Apply `fn` to the record as it is now and store the result, holding the store's lock
        from the read to the write; returns the record as stored. An `fn` that returns the
        record unchanged writes nothing."""
        ...


class RecordRefused(ValueError):
    """A release store will not write this record."""


def checked(model: str, record: ReleaseRecord) -> ReleaseRecord:
    """The record a store's update may write for `model`, or RecordRefused."""
    if record.model != model:
        raise RecordRefused(f"the record of {model} cannot become {record.model}'s")
    if record.stable is not None and record.stable.dummy_weights:
        raise RecordRefused(f"{record.stable.id} serves dummy weights: it never becomes stable")
    return record


def now() -> datetime:
    return datetime.now(UTC)
