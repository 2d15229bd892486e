"""The `rollout` and `refresh` flows end to end on the local target: real Prefect, real
huggingface_hub against the mirror, real engine processes (tiny transformers models), the real
router, real HTTP load. The tiny-chat world (its revisions v1, v2, v3, its profiles and the FAKE
engines some tests inject) is tests/flows/tiny_chat_fixtures.py; a rollout interrupted, aborted
or overloaded is tests/flows/test_rollout_interrupted_flow.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterKey,
    DeploymentFilter,
    DeploymentFilterId,
)

from dev.load import ChatLoad
from dev.mirror import MirrorServer
from dev.mirror_store import MirrorStore
from flows.refresh import refresh
from flows.rollout import DUMMY_REASON, rollout
from serving.config.layout import dummy_weights_dir, weights_dir
from serving.config.loader import DEFAULT_MODELS_DIR, load_profile
from serving.domain.release import release_id
from serving.platforms.local.platform import LocalPlatform
from tests.flows.tiny_chat_fixtures import (
    MODEL,
    QUIET_MODEL,
    REPO,
    ROOT,
    SHADOW_MODEL,
    THIN_MODEL,
    history,
    inject_fake_engines,
    router,
)


def dummy_rollout_is_served_and_probed_and_never_stable(tiny_home: Path, revision: str) -> None:
    """`rollout run --dummy-weights`: config and tokenizer only, random weights served and
    probed, then retired; the record keeps no stable."""
    profile = load_profile(MODEL)
    dummy = rollout(MODEL, "v1", dummy_weights=True)
    assert dummy.decision == "dummy" and dummy.dummy_weights and dummy.bytes_downloaded == 0
    assert "(dummy weights)" in dummy.markdown()
    # nothing was downloaded where real weights go
    volume = tiny_home / "volumes" / profile.volumes.weights
    assert not weights_dir(volume, profile, revision).exists()
    fetched = dummy_weights_dir(volume, profile, revision)
    assert (fetched / "config.json").is_file() and (fetched / "tokenizer.json").is_file()
    # its probes ran against an engine serving the random weights it built from the config
    log = tiny_home / "logs" / f"{release_id(profile.with_dummy_weights(), revision)}.log"
    assert "probe 'no-thinking' passed" in log.read_text()
    record = LocalPlatform.from_env().release_store().read(MODEL)
    assert (record.stable, record.canary) == (None, None)
    assert history() == [("dummy", DUMMY_REASON)]


def test_first_rollout_then_a_canary_promotes_with_no_failed_request(
    tiny_home: Path, tiny_revisions: dict[str, str]
) -> None:
    dummy_rollout_is_served_and_probed_and_never_stable(tiny_home, tiny_revisions["v1"])
    # the dummy release is no stable: a real rollout of the same revision is a first release
    first = rollout(MODEL, "v1")
    assert first.decision == "promoted" and "first release" in first.reason
    assert first.bytes_downloaded > 0
    with ChatLoad(router(), MODEL, workers=3, limit_s=120) as load:
        started = time.time()
        second = rollout(MODEL, "v2")
    assert second.decision == "promoted", second.reason
    results = load.since(started)
    assert results and [r for r in results if r.status != 200] == []
    assert [step.weight for step in second.steps] == [50]
    assert second.steps[0].analysis.golden is not None
    assert second.steps[0].analysis.golden.agreement == 1.0
    record = LocalPlatform.from_env().release_store().read(MODEL)
    assert record.stable is not None and record.stable.revision == tiny_revisions["v2"]
    running = LocalPlatform.from_env().running_releases(load_profile(MODEL))
    assert [release.revision for release in running] == [tiny_revisions["v2"]]  # v1 retired
    with get_client(sync_client=True) as client:
        (artifact, *_) = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[f"rollout-{MODEL}"])),
            sort="CREATED_DESC",
        )
    assert "**Decision: promoted**" in str(artifact.data) and "| 50% |" in str(artifact.data)


def test_rollout_of_the_stable_revision_is_a_no_op(tiny_home: Path) -> None:
    first = rollout(MODEL, "v1", return_state=True)
    started = time.monotonic()
    second = rollout(MODEL, "v1", return_state=True)
    again = second.result()
    assert again.decision == "no-op" and again.bytes_downloaded == 0
    assert time.monotonic() - started < 10
    assert len(LocalPlatform.from_env().running_releases(load_profile(MODEL))) == 1
    # Each history entry names the flow run that decided it (its tasks read the run's id).
    record = LocalPlatform.from_env().release_store().read(MODEL)
    assert [(entry.outcome, entry.flow_run_id) for entry in record.history] == [
        ("promoted", str(first.state_details.flow_run_id)),
        ("no-op", str(second.state_details.flow_run_id)),
    ]


def test_canary_with_different_answers_is_rolled_back(
    tiny_home: Path, tiny_revisions: dict[str, str]
) -> None:
    rollout(MODEL, "v1")
    with ChatLoad(router(), MODEL, workers=3, limit_s=120) as load:
        started = time.time()
        report = rollout(MODEL, "v3")
    assert report.decision == "rolled-back"
    assert "golden agreement" in report.reason
    assert [r for r in load.since(started) if r.status != 200] == []
    record = LocalPlatform.from_env().release_store().read(MODEL)
    assert record.stable is not None and record.stable.revision == tiny_revisions["v1"]
    assert record.canary is None
    assert history()[-1][0] == "rolled-back"
    running = LocalPlatform.from_env().running_releases(load_profile(MODEL))
    assert [release.revision for release in running] == [tiny_revisions["v1"]]


def test_shadow_step_rolls_back_a_different_canary_before_it_serves_anyone(
    tiny_home: Path, tiny_revisions: dict[str, str]
) -> None:
    """v3 (other weights) at 0% gets copies of stable's deterministic requests, disagrees and is
    rolled back having answered no user; v2 (v1's weights) agrees and is promoted."""
    rollout(SHADOW_MODEL, "v1")
    stable = release_id(load_profile(SHADOW_MODEL), tiny_revisions["v1"])
    with ChatLoad(router(SHADOW_MODEL), SHADOW_MODEL, workers=2, limit_s=180,
                  temperature=0) as load:  # fmt: skip
        started = time.time()
        different = rollout(SHADOW_MODEL, "v3")
        between = time.time()
        identical = rollout(SHADOW_MODEL, "v2")
    assert different.decision == "rolled-back", different.reason
    assert "at the shadow step at 0%: shadow agreement" in different.reason
    served = load.since(started, between)
    assert served and {(r.status, r.backend) for r in served} == {(200, stable)}
    judged = different.steps[-1].analysis
    assert judged.canary.requests == 0  # no user request reached the canary
    assert judged.shadow is not None and judged.shadow.agreement is not None
    assert judged.shadow.agreement < 0.95 and len(judged.shadow.worst) == 3
    assert identical.decision == "promoted", identical.reason
    agreed = identical.steps[-1].analysis
    assert agreed.shadow is not None and agreed.shadow.agreement == 1.0, agreed.shadow
    assert agreed.shadow.deterministic >= 4 and agreed.canary.requests == 0
    shown = different.markdown()
    assert "**Shadow at 0%**" in shown and "of 100% of stable's requests, sent once" in shown
    assert "copies answered in" in shown
    print(f"shadow agreement: different canary {judged.shadow.agreement:.2f} over "
          f"{judged.shadow.deterministic}, identical {agreed.shadow.agreement:.2f} over "
          f"{agreed.shadow.deterministic}")


@pytest.mark.parametrize(
    ("faults", "reason"),
    [
        ({"error_rate": 0.2, "error_status": 500}, "error rate"),
        ({"delay_s": 1.5}, "ttft"),
        ({"die_after": 3}, "engine crashed"),
    ],
    ids=["5xx-rate", "slow-ttft", "crash"],
)
def test_faulty_canary_is_rolled_back_and_stable_keeps_serving(
    tiny_home: Path,
    tiny_revisions: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    faults: dict[str, object],
    reason: str,
) -> None:
    rollout(QUIET_MODEL, "v1")
    inject_fake_engines(monkeypatch, QUIET_MODEL, {tiny_revisions["v2"]: faults})
    with ChatLoad(router(QUIET_MODEL), QUIET_MODEL, workers=3, limit_s=120) as load:
        started = time.time()
        report = rollout(QUIET_MODEL, "v2")
        after = load.wait_for_requests(time.time(), 3, timeout=30)
    assert report.decision == "rolled-back", [step.analysis for step in report.steps]
    assert reason in report.reason.lower(), report.reason
    during = load.since(started)
    # The router retries a failed first byte on stable: clients see none of the canary's faults.
    assert [r for r in during if r.status != 200] == []
    assert after and all(r.status == 200 for r in after)  # stable kept serving
    outcome, why = history(QUIET_MODEL)[-1]
    assert outcome == "rolled-back" and reason in why.lower()


def test_thin_traffic_extends_the_bake_until_enough_requests_arrive(
    tiny_home: Path, tiny_revisions: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """One client of engines that take 0.6 s a chat: the 2 s bake's window, with the second or
    so that its 1 s slices and the analysis's start add, holds at most 5 requests, about half
    of them on the canary, never the 6 the gates need. Before: two separate 2 s windows, both
    short of 6, rolled the canary back as inconclusive. Now the window grows, by at least
    1.25 x 2 s x (6 - 5) / 5 = 0.5 s (the extension is sized from the canary's rate so far)."""
    slow = {"delay_s": 0.6}
    inject_fake_engines(monkeypatch, THIN_MODEL,
                        {tiny_revisions["v1"]: slow, tiny_revisions["v2"]: slow})  # fmt: skip
    rollout(THIN_MODEL, "v1")
    with ChatLoad(router(THIN_MODEL), THIN_MODEL, workers=1, limit_s=120):
        report = rollout(THIN_MODEL, "v2")
    assert report.decision == "promoted", report.reason
    [step] = report.steps  # the extended window's analysis supersedes the short one's
    assert step.analysis.canary.requests >= 6 and step.seconds > 2 + 0.4


def test_refresh_starts_one_rollout_per_new_commit(
    tiny_home: Path, tiny_revisions: dict[str, str], tiny_mirror: MirrorServer
) -> None:
    deployment_id = rollout.to_deployment(name=MODEL, parameters={"model": MODEL}).apply()
    rollout(MODEL, "v1")
    store = MirrorStore(Path(tiny_revisions["root"]))
    refs = store.refs(REPO)
    store_main = refs.branches["main"]
    try:
        # main → v1 (stable): nothing to do
        _move_main(store, tiny_revisions["v1"])
        started = time.monotonic()
        assert refresh(MODEL).action == "up-to-date"
        assert time.monotonic() - started < 5
        # main moves to v2: exactly one rollout, however many refreshes
        _move_main(store, tiny_revisions["v2"])
        first, second = refresh(MODEL), refresh(MODEL)
        assert first.action == second.action == "started"
        assert first.flow_run_id == second.flow_run_id
        with get_client(sync_client=True) as client:
            runs = client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id]))
            )
        assert len(runs) == 1 and runs[0].parameters["revision"] == tiny_revisions["v2"]
    finally:
        _move_main(store, store_main)


def _move_main(store: MirrorStore, sha: str) -> None:
    refs_file = store.repo_dir(REPO) / "refs.json"
    refs = json.loads(refs_file.read_text())
    refs["branches"]["main"] = sha
    refs_file.write_text(json.dumps(refs))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "glm-9"], "unknown model 'glm-9'"),
        (["run", MODEL, "--revision", "abc1234"], "looks like a commit"),
        (["run", "broken"], "engine.flags.nsa-decode-backend: SGLang 0.5.23 has no flag"),
    ],
)
def test_bad_input_fails_before_anything_starts(
    tiny_home: Path, tiny_models: Path, args: list[str], message: str
) -> None:
    broken = yaml.safe_load((DEFAULT_MODELS_DIR / "glm-5.1.yaml").read_text())
    broken["name"] = "broken"
    broken["engine"]["flags"]["nsa-decode-backend"] = "trtllm"
    (tiny_models / "broken.yaml").write_text(yaml.safe_dump(broken))
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "rollout.cli", *args], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and message in result.stderr
    assert time.monotonic() - started < 15
    assert not (tiny_home / "volumes").exists() and not (tiny_home / "state").exists()
