"""`rollout abort` against a promotion, 50 times, on the real local platform: the real file
store, the real router, real release processes (the FAKE engine: probes pass at once, so the
two releases start in a second and are reused for every race).

Each race starts mid-canary (record: stable + canary; routes: 50/50), then two threads leave a
barrier together: one promotes the canary (the flow's promote), one reverts it (what
`rollout abort` does). The race is on the record and the routes: the retirement that follows
a decision drains and stops a release, so it runs once, after the last race. The loser of
each race (a release left running, out of routing) is the next race's canary.
"""

from __future__ import annotations

import json
import shutil
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from serving.config.layout import weights_dir
from serving.config.loader import DEFAULT_MODELS_DIR, load_profile
from serving.config.profile import Profile
from serving.control import lifecycle
from serving.core.home import REPO_ROOT
from serving.core.procs import free_port
from serving.domain.records import HistoryEntry
from serving.domain.release import Release, release_id
from serving.engines.engine import FAULT_ENGINES_ENV
from serving.platforms.local.platform import LocalPlatform
from tests.local_fixtures import processes_under

MODEL = "race"
FAKE_ENGINE = REPO_ROOT / "tests" / "fake_engine.py"
RACES = 50
# A route write costs as much as a race (each admin call builds an HTTP client), so only every
# fifth race starts from a split.
SPLIT_EVERY = 5
ABORT_REASON = "aborted (rollout abort)"
PROMOTE_REASON = "every gate passed"
RUN_ID = "0f9d6a0e-0000-4000-8000-000000000001"


@pytest.fixture
def platform(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[LocalPlatform]:
    models = tmp_path / "models"
    shutil.copytree(DEFAULT_MODELS_DIR / "shared", models / "shared")
    profile = yaml.safe_load((DEFAULT_MODELS_DIR / "smollm2-135m.yaml").read_text())
    profile |= {"name": MODEL, "served_model_name": MODEL, "probes": ["no-thinking"],
                "startup_budget_seconds": 30}  # fmt: skip
    profile["canary"] |= {"golden_prompts": [], "retire_grace_seconds": 1}
    (models / f"{MODEL}.yaml").write_text(yaml.safe_dump(profile))
    monkeypatch.setenv("ROLLOUT_MODELS_DIR", str(models))
    home = tmp_path / "home"
    platform = LocalPlatform(home, router_port=free_port())
    yield platform
    platform.stop_all()
    assert processes_under(home) == []


def deploy_fake(platform: LocalPlatform, profile: Profile, revisions: list[str],
                monkeypatch: pytest.MonkeyPatch) -> list[Release]:  # fmt: skip
    engines = {}
    for revision in revisions:
        weights_dir(platform.volume(profile.volumes.weights), profile, revision).mkdir(parents=True)
        rid = release_id(profile, revision)
        engines[rid] = [sys.executable, str(FAKE_ENGINE), "--port", "{port}", "--name", rid]
    monkeypatch.setenv(FAULT_ENGINES_ENV, json.dumps(engines))
    return [platform.deploy(profile, revision) for revision in revisions]


def routes(platform: LocalPlatform) -> dict[str, int]:
    """The routes as last written, which set_traffic has seen the router report."""
    table = json.loads((platform.home / "state" / "routes.json").read_text())
    return {backend["name"]: backend["weight"] for backend in table["models"][MODEL]}


def race(
    profile: Profile, platform: LocalPlatform, canary: Release
) -> tuple[HistoryEntry | None, HistoryEntry | None]:
    """(promotion's entry, abort's entry), each None where it lost."""
    start = threading.Barrier(2)

    def promote() -> HistoryEntry | None:
        start.wait()
        return lifecycle.promote(profile, platform, canary, PROMOTE_REASON, RUN_ID)

    def abort() -> HistoryEntry | None:
        start.wait()
        return lifecycle.revert(profile, platform, ABORT_REASON, flow_run_id=None)

    with ThreadPoolExecutor(2) as pool:
        promoted, aborted = pool.submit(promote), pool.submit(abort)
        return promoted.result(), aborted.result()


def test_abort_against_promotion_exactly_one_wins_every_time(
    platform: LocalPlatform, monkeypatch: pytest.MonkeyPatch
) -> None:
    profile = load_profile(MODEL)
    store = platform.release_store()
    a, b = deploy_fake(platform, profile, ["a" * 40, "b" * 40], monkeypatch)
    stable, canary = a, b
    expected: list[tuple[str, str, str | None]] = []
    for number in range(RACES):
        # The canary as deploy_canary leaves it: at 0% (the previous race's routes), and
        # every few races mid-canary at 50%, so a revert must move the routes too.
        store.update(MODEL, lambda record, s=stable, c=canary: record.model_copy(
            update={"stable": s, "canary": c, "canary_owner": RUN_ID, "retiring": []}
        ))  # fmt: skip
        if number % SPLIT_EVERY == 0:
            platform.set_traffic(profile, {stable.id: 50, canary.id: 50})

        promoted, aborted = race(profile, platform, canary)

        assert (promoted is None) != (aborted is None), f"race {number}: {promoted} {aborted}"
        winner, loser = (canary, stable) if promoted else (stable, canary)
        expected.append(
            ("promoted", PROMOTE_REASON, RUN_ID) if promoted else
            ("rolled-back", ABORT_REASON, RUN_ID)  # the aborted canary's run ended so
        )  # fmt: skip
        record = store.read(MODEL)
        assert record.stable == winner and record.canary is None and record.canary_owner is None
        assert record.retiring == [loser]
        history = [(e.outcome, e.reason, e.flow_run_id) for e in record.history]
        assert history == expected
        assert record.history[-1].revision == canary.revision
        assert routes(platform) == {winner.id: 100, loser.id: 0}
        running = {release.id for release in platform.running_releases(profile)}
        assert running == {a.id, b.id}
        stable, canary = winner, loser  # the loser, still running, is the next canary

    outcomes = {outcome for outcome, _, _ in expected}
    assert outcomes == {"promoted", "rolled-back"}, "one side won every race: no race was run"
    assert lifecycle.retire_released(profile, platform) == [canary]
    assert store.read(MODEL) == record.model_copy(update={"retiring": []})
    assert [release.id for release in platform.running_releases(profile)] == [stable.id]
    assert platform._router().client().routes().weights(MODEL) == {stable.id: 100}
