"""The `rollout` and `refresh` flows end to end on the local target: real Prefect, real
huggingface_hub against the mirror, real engine processes (tiny transformers models), the real
router, real HTTP load.

Revisions of `test-org/tiny-chat` in the mirror:
    v1  tiny model, seed 0
    v2  same weights, another generation_config: answers like v1 (a healthy canary)
    v3  tiny model, seed 1: different weights, different answers (golden prompts disagree)
Canaries with a 5xx rate, a slow first token or a crash are the FAKE engine, injected through
ROLLOUT_FAULT_ENGINES: no real engine produces those on demand. So are both releases where the
test needs engines of a known capacity (saturated, or serving a thin trickle).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterKey,
    DeploymentFilter,
    DeploymentFilterId,
    FlowRunFilter,
    FlowRunFilterId,
)
from prefect.events import Event
from prefect.events.filters import (
    EventFilter,
    EventNameFilter,
    EventOccurredFilter,
    EventResourceFilter,
)

from dev.load import ChatLoad
from dev.mirror import MirrorServer, run_mirror
from dev.mirror_store import MirrorStore
from flows.refresh import refresh
from flows.rollout import DUMMY_REASON, rollout
from serving.config.layout import dummy_weights_dir, weights_dir
from serving.config.loader import DEFAULT_MODELS_DIR, load_profile
from serving.core.home import REPO_ROOT
from serving.core.procs import free_port, wait_for
from serving.domain.release import release_id
from serving.engines.engine import FAULT_ENGINES_ENV
from serving.platforms.local.platform import LocalPlatform
from tasks.release import analyse_canary, bake, deploy_canary, promote, rollback, set_weight
from tests.local_fixtures import processes_under
from tests.server_fixtures import build_tiny_model

REPO = "test-org/tiny-chat"
MODEL = "tiny-chat"
QUIET_MODEL = "tiny-chat-no-golden"  # the fault canaries: golden prompts would fail them anyway
OVERLOADED_MODEL = "tiny-chat-overloaded"  # golden answers within 1 s
THIN_MODEL = "tiny-chat-thin"  # 6 canary requests a step, a 2 s bake that may grow to 15 s
SHADOW_MODEL = "tiny-chat-shadow"  # a shadow step at 0%, then 100%: no golden prompts
FAKE_ENGINE = REPO_ROOT / "tests" / "fake_engine.py"
EVENTS_PAGE = 50  # the most the Prefect API returns at once
ROOT = REPO_ROOT


@pytest.fixture(scope="module")
def revisions(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    store = MirrorStore(tmp_path_factory.mktemp("mirror"))
    first = build_tiny_model(tmp_path_factory.mktemp("tiny-seed-0"), seed=0)
    other = build_tiny_model(tmp_path_factory.mktemp("tiny-seed-1"), seed=1)

    def files(directory: Path, **generation: object) -> dict[str, Path | bytes]:
        found: dict[str, Path | bytes] = {p.name: p for p in directory.iterdir() if p.is_file()}
        found["generation_config.json"] = json.dumps({"do_sample": False, **generation}).encode()
        return found

    shas = {
        "v1": store.add_revision(REPO, files(first), tags=["v1"]),
        "v2": store.add_revision(REPO, files(first, temperature=0.7), tags=["v2"]),
        "v3": store.add_revision(REPO, files(other), tags=["v3"]),
    }
    shas["root"] = str(store.root)
    return shas


@pytest.fixture(scope="module")
def mirror(revisions: dict[str, str]) -> Iterator[MirrorServer]:
    with run_mirror(Path(revisions["root"])) as server:
        yield server


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("models")
    shutil.copytree(DEFAULT_MODELS_DIR / "shared", directory / "shared")
    base = yaml.safe_load((DEFAULT_MODELS_DIR / "smollm2-135m.yaml").read_text())
    base |= {
        "hub": {"repo": REPO, "revision": "main"},
        "volumes": {"weights": "tiny-weights"},
        # probes a random tiny model (and the fake engine) can pass: any non-empty content
        "probes": ["no-thinking"],
        "startup_budget_seconds": 60,
    }
    base["canary"] = {
        "steps": [{"weight": 50, "bake_seconds": 4}, {"weight": 100, "bake_seconds": 0}],
        # Tiny CPU engines answer in milliseconds: TTFT ratios between two of them are noise,
        # so the healthy margin is wide. On a busy host stable's p50 nears 0.3 s, so the slow
        # canary below (1.5 s) can sit within the ratio: the absolute SLO catches it.
        "gates": {"min_requests": 4, "max_error_rate": 0.05, "max_ttft_p50_ratio": 5,
                  "max_ttft_p99_ratio": 20, "max_ttft_p50_seconds": 1.0,
                  "min_golden_agreement": 1.0},
        "golden_prompts": ["capital", "arithmetic"],
        "retire_grace_seconds": 3,
    }  # fmt: skip
    short = [{"weight": 50, "bake_seconds": 2}, {"weight": 100, "bake_seconds": 0}]
    # FAKE engines of a chosen capacity on both sides: latency ratios are not the point, and
    # what they have in flight at a retirement need not finish
    loose = {"max_ttft_p50_ratio": 100, "max_ttft_p99_ratio": 100}
    fakes = {**base["canary"], "steps": short, "retire_grace_seconds": 0}
    canaries = {
        MODEL: base["canary"],
        QUIET_MODEL: {**base["canary"], "golden_prompts": []},
        # may extend to 8 s: on a busy host the saturated canary can finish no request in 2 s
        OVERLOADED_MODEL: {**fakes, "max_bake_seconds": 8, "golden_prompts": ["capital"],
                           "gates": {**loose, "min_requests": 1, "max_golden_answer_seconds": 1}},
        THIN_MODEL: {**fakes, "max_bake_seconds": 15, "golden_prompts": [],
                     "gates": {**loose, "min_requests": 6}},
        SHADOW_MODEL: {**base["canary"], "golden_prompts": [], "steps": [
            {"shadow": {"percent": 100, "seconds": 4}}, {"weight": 100, "bake_seconds": 0}]},
    }  # fmt: skip
    for name, canary in canaries.items():
        profile = {**base, "name": name, "served_model_name": name, "canary": canary}
        (directory / f"{name}.yaml").write_text(yaml.safe_dump(profile))
    return directory


@pytest.fixture
def home(
    tmp_path: Path,
    models_dir: Path,
    mirror: MirrorServer,
    prefect_server: str,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Path]:
    monkeypatch.setenv("ROLLOUT_HOME", str(tmp_path))
    monkeypatch.setenv("ROLLOUT_MODELS_DIR", str(models_dir))
    monkeypatch.setenv("HF_ENDPOINT", mirror.url)
    monkeypatch.setenv("ROLLOUT_ROUTER_PORT", str(free_port()))
    monkeypatch.delenv(FAULT_ENGINES_ENV, raising=False)
    yield tmp_path
    LocalPlatform.from_env().stop_all()
    assert processes_under(tmp_path) == []


def router(model: str = MODEL) -> str:
    return LocalPlatform.from_env().router_url(load_profile(model))


def history(model: str = MODEL) -> list[tuple[str, str]]:
    record = LocalPlatform.from_env().release_store().read(model)
    return [(entry.outcome, entry.reason) for entry in record.history]


def inject_fake_engines(monkeypatch: pytest.MonkeyPatch, model: str,
                        faults: dict[str, dict[str, object]]) -> None:  # fmt: skip
    """The releases of these revisions are the FAKE engine, with these faults."""
    engines = {}
    for revision, config in faults.items():
        release = release_id(load_profile(model), revision)
        engines[release] = [sys.executable, str(FAKE_ENGINE), "--port", "{port}",
                            "--name", release, "--config", json.dumps(config)]  # fmt: skip
    monkeypatch.setenv(FAULT_ENGINES_ENV, json.dumps(engines))


def dummy_rollout_is_served_and_probed_and_never_stable(home: Path, revision: str) -> None:
    """`rollout run --dummy-weights`: config and tokenizer only, random weights served and
    probed, then retired; the record keeps no stable."""
    profile = load_profile(MODEL)
    dummy = rollout(MODEL, "v1", dummy_weights=True)
    assert dummy.decision == "dummy" and dummy.dummy_weights and dummy.bytes_downloaded == 0
    assert "(dummy weights)" in dummy.markdown()
    # nothing was downloaded where real weights go
    volume = home / "volumes" / profile.volumes.weights
    assert not weights_dir(volume, profile, revision).exists()
    fetched = dummy_weights_dir(volume, profile, revision)
    assert (fetched / "config.json").is_file() and (fetched / "tokenizer.json").is_file()
    # its probes ran against an engine serving the random weights it built from the config
    log = (home / "logs" / f"{release_id(profile.with_dummy_weights(), revision)}.log")
    assert "probe 'no-thinking' passed" in log.read_text()
    record = LocalPlatform.from_env().release_store().read(MODEL)
    assert (record.stable, record.canary) == (None, None)
    assert history() == [("dummy", DUMMY_REASON)]


def test_first_rollout_then_a_canary_promotes_with_no_failed_request(
    home: Path, revisions: dict[str, str]
) -> None:
    dummy_rollout_is_served_and_probed_and_never_stable(home, revisions["v1"])
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
    assert record.stable is not None and record.stable.revision == revisions["v2"]
    running = LocalPlatform.from_env().running_releases(load_profile(MODEL))
    assert [release.revision for release in running] == [revisions["v2"]]  # v1 retired
    with get_client(sync_client=True) as client:
        (artifact, *_) = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[f"rollout-{MODEL}"])),
            sort="CREATED_DESC",
        )
    assert "**Decision: promoted**" in str(artifact.data) and "| 50% |" in str(artifact.data)


def test_rollout_of_the_stable_revision_is_a_no_op(home: Path) -> None:
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
    home: Path, revisions: dict[str, str]
) -> None:
    rollout(MODEL, "v1")
    with ChatLoad(router(), MODEL, workers=3, limit_s=120) as load:
        started = time.time()
        report = rollout(MODEL, "v3")
    assert report.decision == "rolled-back"
    assert "golden agreement" in report.reason
    assert [r for r in load.since(started) if r.status != 200] == []
    record = LocalPlatform.from_env().release_store().read(MODEL)
    assert record.stable is not None and record.stable.revision == revisions["v1"]
    assert record.canary is None
    assert history()[-1][0] == "rolled-back"
    running = LocalPlatform.from_env().running_releases(load_profile(MODEL))
    assert [release.revision for release in running] == [revisions["v1"]]


def test_shadow_step_rolls_back_a_different_canary_before_it_serves_anyone(
    home: Path, revisions: dict[str, str]
) -> None:
    """v3 (other weights) at 0% gets copies of stable's deterministic requests, disagrees and is
    rolled back having answered no user; v2 (v1's weights) agrees and is promoted."""
    rollout(SHADOW_MODEL, "v1")
    stable = release_id(load_profile(SHADOW_MODEL), revisions["v1"])
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
    assert "**Shadow at 0%**" in different.markdown()
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
    home: Path,
    revisions: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    faults: dict[str, object],
    reason: str,
) -> None:
    rollout(QUIET_MODEL, "v1")
    inject_fake_engines(monkeypatch, QUIET_MODEL, {revisions["v2"]: faults})
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


@contextmanager
def rollout_of_v2_in_another_process(
    argv: list[str], api_url: str, stdout: int = subprocess.DEVNULL
) -> Iterator[subprocess.Popen[str]]:
    """Start `argv` (a rollout of v2) with a 120 s first bake, so it is surely mid-canary;
    yield it once its canary is deployed. The profile's bake is restored on the way out."""
    profile_path = Path(os.environ["ROLLOUT_MODELS_DIR"]) / f"{MODEL}.yaml"
    original = profile_path.read_text()
    slow = yaml.safe_load(original)
    slow["canary"]["steps"][0]["bake_seconds"] = 120
    profile_path.write_text(yaml.safe_dump(slow))
    env = {**os.environ, "PREFECT_API_URL": api_url}
    child = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=stdout,
                             stderr=subprocess.DEVNULL, text=True)  # fmt: skip
    try:
        store = LocalPlatform.from_env().release_store()
        deadline = time.monotonic() + 120
        while store.read(MODEL).canary is None and time.monotonic() < deadline:
            time.sleep(0.5)
        assert store.read(MODEL).canary is not None
        yield child
    finally:
        profile_path.write_text(original)
        if child.poll() is None:
            child.kill()
            child.wait()


ROLLOUT_V2 = [sys.executable, "-c", f"from flows.rollout import rollout; rollout({MODEL!r}, 'v2')"]


def assert_stable_alone(revision: str) -> None:
    """v1 is stable with all the traffic, no canary is recorded or running."""
    record = LocalPlatform.from_env().release_store().read(MODEL)
    assert record.canary is None and record.stable is not None
    assert record.stable.revision == revision
    running = LocalPlatform.from_env().running_releases(load_profile(MODEL))
    assert [release.id for release in running] == [record.stable.id]
    routes = json.loads((Path(os.environ["ROLLOUT_HOME"]) / "state" / "routes.json").read_text())
    assert [(b["name"], b["weight"]) for b in routes["models"][MODEL] if b["weight"]] == [
        (record.stable.id, 100)
    ]


def test_killed_orchestrator_mid_canary_is_reconciled_by_the_next_run(
    home: Path, revisions: dict[str, str], prefect_server: str
) -> None:
    rollout(MODEL, "v1")
    canary_dir = home / "releases" / release_id(load_profile(MODEL), revisions["v2"])
    with rollout_of_v2_in_another_process(ROLLOUT_V2, prefect_server) as child:
        time.sleep(2)  # into the bake
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert processes_under(canary_dir)  # the orphaned canary is still running

    report = rollout(MODEL, "v1")  # the next run
    assert report.decision == "no-op"
    assert processes_under(canary_dir) == []
    assert_stable_alone(revisions["v1"])
    assert any("reconciled" in why for _, why in history())
    # The killed run wrote no line of its own: the next run's reconcile wrote it for it.
    assert any(outcome == "failed" and why.startswith("interrupted: flow run")
               for outcome, why in history())  # fmt: skip


def test_terminated_orchestrator_rolls_back_its_own_canary(
    home: Path, revisions: dict[str, str], prefect_server: str
) -> None:
    """SIGTERM (a worker stopping, a pod evicted): the transaction's rollback hook reverts."""
    rollout(MODEL, "v1")
    with rollout_of_v2_in_another_process(ROLLOUT_V2, prefect_server) as child:
        time.sleep(2)  # into the bake
        child.send_signal(signal.SIGTERM)
        child.wait(timeout=120)
    canary_dir = home / "releases" / release_id(load_profile(MODEL), revisions["v2"])
    assert processes_under(canary_dir) == []
    assert_stable_alone(revisions["v1"])
    outcome, why = history()[-1]
    assert outcome == "rolled-back", why
    assert why.startswith("the rollout stopped after its canary was deployed: TerminationSignal")


def test_a_run_that_fails_before_its_canary_still_leaves_a_line_in_the_history(
    home: Path, revisions: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A canary whose engine dies during startup: the deploy fails, no canary is recorded, and
    the failed flow run's hook writes its line (found missing by `make chaos`)."""
    rollout(QUIET_MODEL, "v1")
    canary = release_id(load_profile(QUIET_MODEL), revisions["v2"])
    dies_at_once = [sys.executable, "-c", "raise SystemExit(3)"]
    monkeypatch.setenv(FAULT_ENGINES_ENV, json.dumps({canary: dies_at_once}))
    state = rollout(QUIET_MODEL, revisions["v2"], return_state=True)
    assert state.is_failed()
    outcome, why = history(QUIET_MODEL)[-1]
    assert outcome == "failed" and "DeployFailed" in why, why
    record = LocalPlatform.from_env().release_store().read(QUIET_MODEL)
    assert record.history[-1].flow_run_id == str(state.state_details.flow_run_id)
    assert record.history[-1].revision == revisions["v2"]


def test_refresh_starts_one_rollout_per_new_commit(
    home: Path, revisions: dict[str, str], mirror: MirrorServer
) -> None:
    deployment_id = rollout.to_deployment(name=MODEL, parameters={"model": MODEL}).apply()
    rollout(MODEL, "v1")
    store = MirrorStore(Path(revisions["root"]))
    refs = store.refs(REPO)
    store_main = refs.branches["main"]
    try:
        # main → v1 (stable): nothing to do
        _move_main(store, revisions["v1"])
        started = time.monotonic()
        assert refresh(MODEL).action == "up-to-date"
        assert time.monotonic() - started < 5
        # main moves to v2: exactly one rollout, however many refreshes
        _move_main(store, revisions["v2"])
        first, second = refresh(MODEL), refresh(MODEL)
        assert first.action == second.action == "started"
        assert first.flow_run_id == second.flow_run_id
        with get_client(sync_client=True) as client:
            runs = client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id]))
            )
        assert len(runs) == 1 and runs[0].parameters["revision"] == revisions["v2"]
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
    home: Path, models_dir: Path, args: list[str], message: str
) -> None:
    broken = yaml.safe_load((DEFAULT_MODELS_DIR / "glm-5.1.yaml").read_text())
    broken["name"] = "broken"
    broken["engine"]["flags"]["nsa-decode-backend"] = "trtllm"
    (models_dir / "broken.yaml").write_text(yaml.safe_dump(broken))
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "rollout.cli", *args], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and message in result.stderr
    assert time.monotonic() - started < 15
    assert not (home / "volumes").exists() and not (home / "state").exists()


def test_abort_rolls_back_a_running_canary_and_status_shows_it(
    home: Path, revisions: dict[str, str], prefect_server: str
) -> None:
    rollout(MODEL, "v1")
    began = datetime.now(UTC)
    env = {**os.environ, "PREFECT_API_URL": prefect_server}
    cli = [sys.executable, "-m", "rollout.cli"]
    run_v2 = [*cli, "run", MODEL, "--revision", "v2"]
    with rollout_of_v2_in_another_process(run_v2, prefect_server, subprocess.PIPE) as running:
        status = json.loads(subprocess.run([*cli, "status", MODEL, "--json"], cwd=ROOT,
                                           env=env, capture_output=True, text=True,
                                           timeout=60).stdout)  # fmt: skip
        assert status["canary"]["revision"] == revisions["v2"]
        assert status["stable"]["revision"] == revisions["v1"]
        aborted = subprocess.run([*cli, "abort", MODEL], cwd=ROOT, env=env,
                                 capture_output=True, text=True, timeout=120)  # fmt: skip
        assert aborted.returncode == 0 and "rolled back" in aborted.stdout
        output, _ = running.communicate(timeout=120)  # the run notices within a bake tick
    assert running.returncode == 1 and "rolled-back" in output
    assert history()[-1] == ("rolled-back", "aborted (rollout abort)")
    assert_stable_alone(revisions["v1"])
    # The run that lost its canary announced the abort, as a gate's rollback is announced.
    assert wait_for(lambda: [e.payload for e in rolled_back_events(MODEL, began)] == [
        {"revision": revisions["v2"], "reason": "aborted (rollout abort)"}
    ], timeout=30, interval=0.5), [e.payload for e in rolled_back_events(MODEL, began)]


def rolled_back_events(model: str, since: datetime) -> list[Event]:
    """The `rollout.rolled-back` events of a model the Prefect API stored since a moment."""
    with get_client(sync_client=True) as client:
        return client.read_events(EventFilter(
            occurred=EventOccurredFilter(since=since),
            event=EventNameFilter(name=["rollout.rolled-back"]),
            resource=EventResourceFilter(id=[f"rollout.model.{model}"]),
        ), limit=EVENTS_PAGE).events  # fmt: skip


@contextmanager
def open_loop(router_url: str, model: str, per_second: float) -> Iterator[None]:
    """Chats sent at a fixed rate whatever the answers (an open loop, as real clients are):
    engines that serve fewer grow queues without bound."""
    stop = threading.Event()
    body = {"model": model, "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}

    async def send(client: httpx.AsyncClient) -> None:
        with suppress(httpx.HTTPError):
            await client.post(f"{router_url}/v1/chat/completions", json=body)

    async def load() -> None:
        async with httpx.AsyncClient(timeout=None, limits=httpx.Limits(max_connections=None),
                                     trust_env=False) as client:  # fmt: skip
            sent = []
            while not stop.is_set():
                sent.append(asyncio.create_task(send(client)))
                await asyncio.sleep(1 / per_second)
            for request in sent:
                request.cancel()
            await asyncio.gather(*sent, return_exceptions=True)

    thread = threading.Thread(target=asyncio.run, args=(load(),))
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def test_overloaded_engines_end_the_gate_in_a_decision_and_nothing_runs_after_the_revert(
    home: Path, revisions: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both engines serve one request a second; clients send six: the golden prompt waits in
    their queues past its limit. Before: the analyse task raised, the transaction's hook
    retired the canary, Prefect retried analyse against it, and the flow run failed."""
    saturated = {"delay_s": 1.0, "capacity": 1}
    inject_fake_engines(monkeypatch, OVERLOADED_MODEL,
                        {revisions["v1"]: saturated, revisions["v2"]: saturated})  # fmt: skip
    rollout(OVERLOADED_MODEL, "v1")
    with open_loop(router(OVERLOADED_MODEL), OVERLOADED_MODEL, per_second=6):
        state = rollout(OVERLOADED_MODEL, "v2", return_state=True)
    assert state.is_completed(), state.message
    report = state.result()
    assert report.decision == "rolled-back"
    assert "did not answer golden prompt 1 within 1 s" in report.reason, report.reason
    outcome, why = history(OVERLOADED_MODEL)[-1]
    assert (outcome, why) == ("rolled-back", report.reason)  # by decision, not by the hook
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(
            id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))  # fmt: skip
    assert runs and all(run.state is not None and run.state.is_completed() for run in runs)
    assert [run.name for run in runs if run.run_count != 1] == []  # no Prefect retry
    last = max(runs, key=lambda run: run.start_time or 0)
    assert last.name.startswith("rollback")


def test_no_task_inside_the_transaction_is_retried_by_prefect() -> None:
    """Its rollback hook retires the canary on the first failure: a retry would run after."""
    inside = (deploy_canary, set_weight, bake, analyse_canary, promote, rollback)
    assert {task.name: task.retries for task in inside} == {task.name: 0 for task in inside}


def test_thin_traffic_extends_the_bake_until_enough_requests_arrive(
    home: Path, revisions: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """One client of engines that take 0.4 s a chat: at most 5 requests in a 2 s bake, about
    half of them to the canary. Before: two separate 2 s windows, both short of 6, rolled the
    canary back as inconclusive. The extension is sized from the canary's rate so far: at
    least 1.25 x 2 s x 1/5 = 0.5 s when the drawn split sent all 5 to the canary."""
    slow = {"delay_s": 0.4}
    inject_fake_engines(monkeypatch, THIN_MODEL, {revisions["v1"]: slow, revisions["v2"]: slow})
    rollout(THIN_MODEL, "v1")
    with ChatLoad(router(THIN_MODEL), THIN_MODEL, workers=1, limit_s=120):
        report = rollout(THIN_MODEL, "v2")
    assert report.decision == "promoted", report.reason
    [step] = report.steps  # the extended window's analysis supersedes the short one's
    assert step.analysis.canary.requests >= 6 and step.seconds > 2 + 0.4
