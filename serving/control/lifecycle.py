"""The release lifecycle: every change of a model's release record, and what follows from it
for the routes and the running releases.

    start_canary     a release deployed at 0% becomes the record's canary
    promote          the canary becomes stable and takes all the traffic; the old stable retires
    revert           all the traffic back to stable; the canary retires; the reason recorded
                     (a dummy-weights canary ends this way, recorded as `dummy`)
    retire_released  drain and stop what a promotion or a revert took out of routing
    record_outcome   a rollout that deployed nothing still leaves a line in the history
    record_failure   a run that failed, crashed or was cancelled leaves one, unless it wrote it
    reconcile        the run marked as begun; what a killed orchestrator left: a line for the
                     run, its canary reverted, its retirements done, a stable release that no
                     longer runs forgotten

Each transition decides on the record as it is under the store's lock (ReleaseStore.update):
promote only while the record's canary is still this canary, revert only while there is a
canary. Of a promotion and an abort that race, exactly one wins, and the loser changes nothing:
neither the record nor the routes. The winner routes after its decision; the retirement comes
last and apart (a drain lasts up to the profile's grace), and until it is done the record names
the release as `retiring`, so a crash in between leaves it to the next reconcile, not running
unaccounted for.

The flow run that decides is passed in as `flow_run_id` and kept in every history entry: serving
never imports Prefect, the task layer reads it.
"""

from __future__ import annotations

from collections.abc import Callable

from pydantic import BaseModel

from serving.config.profile import Profile
from serving.domain.records import HistoryEntry, Outcome, ReleaseRecord, RunMark, now
from serving.domain.release import Release
from serving.platform import Serving

# The reason `rollout abort` records; the flow that owned the canary then ends with it too.
ABORT_REASON = "aborted (rollout abort)"


def start_canary(platform: Serving, release: Release, owner: str) -> ReleaseRecord:
    """The release, deployed at 0%, is the model's canary, owned by flow run `owner`."""
    return platform.release_store().update(
        release.model,
        lambda record: record.model_copy(update={"canary": release, "canary_owner": owner}),
    )


def promote(
    profile: Profile, platform: Serving, canary: Release, reason: str, flow_run_id: str | None
) -> HistoryEntry | None:
    """`canary` becomes stable and takes all the traffic; the old stable is left to
    `retire_released`. None, and nothing changed, when the record's canary is no longer this
    one (an abort won)."""
    entry = HistoryEntry.stamped(canary.revision, "promoted", reason, flow_run_id)

    def decide(record: ReleaseRecord) -> ReleaseRecord | None:
        if record.canary is None or record.canary.id != canary.id:
            return None
        old = record.stable
        retiring = record.retiring
        if old is not None and old.id != canary.id:
            retiring = [*retiring, old]
        change = {"stable": canary, "canary": None, "canary_owner": None, "retiring": retiring}
        return record.model_copy(update=change).with_history(entry)

    if _transition(platform, profile.name, decide) is None:
        return None
    platform.set_traffic(profile, {canary.id: 100})
    return entry


def revert(
    profile: Profile,
    platform: Serving,
    reason: str,
    flow_run_id: str | None,
    *,
    owner: str | None = None,
    interrupted: bool = False,
) -> HistoryEntry | None:
    """All the traffic back to stable, the canary out of routing (left to `retire_released`),
    the reason in the history. None, and nothing changed, when there is no canary any more (a
    promotion or another revert won), or, given `owner`, when that flow run does not own it.
    `interrupted`: the canary's run was killed before it decided (see HistoryEntry)."""

    def decide(record: ReleaseRecord) -> ReleaseRecord | None:
        canary = record.canary
        if canary is None or (owner is not None and record.canary_owner != owner):
            return None
        change = {"canary": None, "canary_owner": None, "retiring": [*record.retiring, canary]}
        # A dummy-weights release always ends so, served and probed, and is no failure of
        # its revision.
        outcome: Outcome = "dummy" if canary.dummy_weights else "rolled-back"
        # `rollout abort` runs in no flow run of its own: its line ends the run that owns the
        # canary, whose mark would otherwise read as interrupted at the next reconcile.
        ended = flow_run_id if flow_run_id is not None else record.canary_owner
        entry = HistoryEntry.stamped(canary.revision, outcome, reason, ended, interrupted)
        return record.model_copy(update=change).with_history(entry)

    after = _transition(platform, profile.name, decide)
    if after is None:
        return None
    platform.set_traffic(profile, {after.stable.id: 100} if after.stable else {})
    return after.history[-1]


def retire_released(profile: Profile, platform: Serving) -> list[Release]:
    """Drain and stop each release the record names as retiring, within the profile's grace,
    and strike it off once it is stopped. Safe to repeat: retiring a stopped release is a
    no-op on both platforms."""
    store = platform.release_store()
    retired = []
    for release in store.read(profile.name).retiring:
        platform.retire(profile, release, drain_seconds=profile.canary.retire_grace_seconds)
        store.update(profile.name, lambda record, gone=release.id: record.model_copy(
            update={"retiring": [other for other in record.retiring if other.id != gone]}
        ))  # fmt: skip
        retired.append(release)
    return retired


def record_outcome(
    platform: Serving,
    model: str,
    revision: str,
    outcome: Outcome,
    reason: str,
    flow_run_id: str | None,
) -> HistoryEntry:
    """A line in the history for a rollout that changed no release (no-op, failed early)."""
    entry = HistoryEntry.stamped(revision, outcome, reason, flow_run_id)
    platform.release_store().update(model, lambda record: record.with_history(entry))
    return entry


def record_failure(
    platform: Serving, model: str, revision: str, reason: str, flow_run_id: str
) -> HistoryEntry | None:
    """A "failed" line for a run that ended (failed, crashed, cancelled) before writing its
    own (it failed before its canary); None, and nothing written, if it had written one."""
    after = _transition(platform, model, lambda record: (
        None if record.recorded(flow_run_id)
        else record.with_failure(flow_run_id, revision, reason)
    ))  # fmt: skip
    return after.history[-1] if after is not None else None


class Reconciled(BaseModel):
    """What `reconcile` found and did, for the run's log."""

    record: ReleaseRecord
    interrupted: HistoryEntry | None  # the line written for a run killed before its end
    orphans_stopped: list[str]
    reverted: HistoryEntry | None
    retired: list[Release]
    forgotten: Release | None


def reconcile(
    profile: Profile, platform: Serving, flow_run_id: str | None, revision: str
) -> Reconciled:
    """Mark run `flow_run_id` (of `revision`) as begun, and finish what a killed orchestrator
    left: its run gets a "failed" line, processes it started are stopped, its canary is
    reverted, its retirements are done, and a stable release that no longer runs is forgotten
    (nothing can be compared against it)."""
    interrupted: HistoryEntry | None = None
    if flow_run_id is not None:
        mark = RunMark(flow_run_id=flow_run_id, revision=revision, at=now())

        def begin(record: ReleaseRecord) -> ReleaseRecord:
            nonlocal interrupted
            after = record.beginning(mark)
            if after.history[-1:] != record.history[-1:]:
                interrupted = after.history[-1]
            return after

        platform.release_store().update(profile.name, begin)
    orphans = platform.reconcile_orphans()
    owner = platform.release_store().read(profile.name).canary_owner
    reason = f"reconciled: canary left behind by flow run {owner}"
    reverted = revert(profile, platform, reason, flow_run_id, interrupted=True)
    retired = retire_released(profile, platform)
    running = {release.id for release in platform.running_releases(profile)}
    forgotten: list[Release] = []

    def forget_stopped_stable(record: ReleaseRecord) -> ReleaseRecord | None:
        if record.stable is None or record.stable.id in running:
            return None
        forgotten.append(record.stable)
        return record.model_copy(update={"stable": None})

    record = _transition(platform, profile.name, forget_stopped_stable)
    return Reconciled(
        record=record or platform.release_store().read(profile.name), interrupted=interrupted,
        orphans_stopped=orphans, reverted=reverted, retired=retired,
        forgotten=forgotten[0] if forgotten else None,
    )  # fmt: skip


def _transition(
    platform: Serving, model: str, decide: Callable[[ReleaseRecord], ReleaseRecord | None]
) -> ReleaseRecord | None:
    """Apply `decide` to the record under the store's lock; it returns None to change nothing.
    The record as written, or None when nothing changed."""
    decided = False

    def change(record: ReleaseRecord) -> ReleaseRecord:
        nonlocal decided
        after = decide(record)
        decided = after is not None
        return record if after is None else after

    after = platform.release_store().update(model, change)
    return after if decided else None
