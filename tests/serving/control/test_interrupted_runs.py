"""A run SIGKILLed before it wrote its line in the history (before its canary, even before its
download) still gets one: `reconcile` marks each run as begun in the release record, and the
next run's reconcile writes "failed: interrupted" for a mark with no line. Here on the local
platform's real file store with nothing running: the mark is platform-independent
(serving.domain.records, serving.control.lifecycle), the same on Modal's store.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from serving.config.loader import load_profile
from serving.config.profile import Profile
from serving.control import lifecycle
from serving.core.procs import free_port
from serving.platforms.local.platform import LocalPlatform

MODEL = "smollm2-135m"
KILLED = "0f9d6a0e-0000-4000-8000-00000000000a"
NEXT = "0f9d6a0e-0000-4000-8000-00000000000b"
REVISION = "v2"


@pytest.fixture
def platform(tmp_path: Path) -> LocalPlatform:
    return LocalPlatform(tmp_path / "home", router_port=free_port())


@pytest.fixture
def profile() -> Profile:
    return load_profile(MODEL)


def test_a_run_killed_before_its_line_gets_one_from_the_next_runs_reconcile(
    platform: LocalPlatform, profile: Profile
) -> None:
    lifecycle.reconcile(profile, platform, KILLED, REVISION)  # ... and then SIGKILL: no line
    assert platform.release_store().read(MODEL).history == []

    done = lifecycle.reconcile(profile, platform, NEXT, REVISION)

    record = platform.release_store().read(MODEL)
    assert [(e.flow_run_id, e.outcome, e.revision) for e in record.history] == [
        (KILLED, "failed", REVISION)
    ]
    assert record.history[0].reason.startswith(f"interrupted: flow run {KILLED}")
    assert done.interrupted == record.history[0]
    assert record.run is not None and record.run.flow_run_id == NEXT
    # A killed run judged nothing: a refresh rolls its revision out again.
    assert record.history[0].interrupted and record.last_failed_revision() is None


def test_a_refresh_skips_a_revision_judged_bad_even_after_a_later_run_of_it_was_killed(
    platform: LocalPlatform, profile: Profile
) -> None:
    lifecycle.reconcile(profile, platform, KILLED, REVISION)
    lifecycle.record_failure(platform, MODEL, REVISION, "flow run failed: VerifyFailed", KILLED)
    lifecycle.reconcile(profile, platform, NEXT, REVISION)  # ... and then SIGKILL
    lifecycle.reconcile(profile, platform, "0f9d6a0e-0000-4000-8000-00000000000c", REVISION)

    record = platform.release_store().read(MODEL)
    assert [(e.flow_run_id, e.interrupted) for e in record.history] == [
        (KILLED, False), (NEXT, True)
    ]
    assert record.last_failed_revision() == REVISION


def test_a_run_that_wrote_its_own_line_is_not_called_interrupted(
    platform: LocalPlatform, profile: Profile
) -> None:
    lifecycle.reconcile(profile, platform, KILLED, REVISION)
    lifecycle.record_outcome(platform, MODEL, REVISION, "no-op", "already stable", KILLED)
    # Its failure hook, after the line: nothing more.
    assert lifecycle.record_failure(platform, MODEL, REVISION, "flow run failed", KILLED) is None

    done = lifecycle.reconcile(profile, platform, NEXT, REVISION)
    # The same run again (`prefect flow-run retry`) does not find itself interrupted.
    again = lifecycle.reconcile(profile, platform, NEXT, REVISION)

    history = platform.release_store().read(MODEL).history
    assert [(e.flow_run_id, e.outcome) for e in history] == [(KILLED, "no-op")]
    assert done.interrupted is None and again.interrupted is None


def test_a_run_that_failed_before_its_canary_gets_one_failed_line(
    platform: LocalPlatform, profile: Profile
) -> None:
    lifecycle.reconcile(profile, platform, KILLED, REVISION)
    entry = lifecycle.record_failure(platform, MODEL, REVISION, "flow run failed: x", KILLED)
    assert entry is not None and entry.outcome == "failed"
    lifecycle.reconcile(profile, platform, NEXT, REVISION)

    history = platform.release_store().read(MODEL).history
    assert [(e.flow_run_id, e.reason) for e in history] == [(KILLED, "flow run failed: x")]
