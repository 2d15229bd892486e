"""`rollout prep` and `rollout run` with `--target modal`, end to end: the command line, real
Prefect flows, the real modal SDK against the TEST DOUBLE of Modal's API (tests/modal_double),
the real HF client against the local mirror.

The double runs no containers. Calls of the weights and compile Apps are answered by the
project's own bodies (tests/modal_containers.py), or end as the test scripts them; the release
and router Servers run in-process from the project's own container bodies (the real supervisor
over the FAKE engine, the real router over the routes Dict). Each test has its own Modal
environment, so Prefect's stage cache (keyed on the environment) never carries a result from
one test, or one session, to another.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import httpx
import pytest
import yaml
from modal_proto import api_pb2
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.exceptions import ObjectAlreadyExists

from dev.demo_model import make_synthetic_repo
from dev.mirror import MirrorServer
from dev.mirror_store import KiB, MirrorStore
from rollout.cli import main
from serving.config.layout import SENTINEL_NAME, dummy_weights_dir, weights_dir
from serving.config.loader import DEFAULT_MODELS_DIR, load_profile
from serving.domain.release import VerifyResult
from serving.platforms.modal import resources
from serving.platforms.modal.calls import CallStore
from serving.platforms.modal.gateway import ModalGateway
from serving.platforms.modal.platform import ModalPlatform
from serving.weights.hub import fetch_files
from serving.weights.models import Manifest, VerifyReport
from tasks.weights import gpu_limit_name
from tests.modal_containers import (
    PrepContainers,
    ServingContainers,
    fake_engine,
    seed_verified_weights,
)
from tests.modal_double.calls import returned
from tests.modal_double.servicer import ModalDouble
from tests.modal_fixtures import FakeCompileRun

ADMIN_TOKEN = "admin-SECRET-token-e2e"
REV_A = "aaaaaaaa" + "0" * 32
REV_B = "bbbbbbbb" + "1" * 32
REV_C = "cccccccc" + "2" * 32
# Every second request fails: a canary no gate may let through.
FAILING_ENGINE = json.dumps({"error_rate": 0.5})
BAKE_SECONDS = 1.5
LOAD_INTERVAL_SECONDS = 0.05
# Enough for a verdict, few enough that a bake on a busy machine still sees them.
MIN_REQUESTS = 3
V2 = api_pb2.VOLUME_FS_VERSION_V2


@pytest.fixture
def environment(
    tmp_path: Path, modal_double: ModalDouble, prefect_server: str, monkeypatch: pytest.MonkeyPatch
) -> str:
    """A Modal environment of this test's own, a fresh ROLLOUT_HOME, the profiles in tmp_path
    (to be shortened), and the Secrets of the README's one-time setup."""
    name = f"e2e-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("MODAL_ENVIRONMENT", name)
    monkeypatch.setenv("ROLLOUT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv(resources.ROUTER_ADMIN_TOKEN_ENV, ADMIN_TOKEN)
    models = tmp_path / "models"
    shutil.copytree(DEFAULT_MODELS_DIR, models)
    monkeypatch.setenv("ROLLOUT_MODELS_DIR", str(models))
    modal_double.create_secret(resources.ROUTER_ADMIN_SECRET,
                               {resources.ROUTER_ADMIN_TOKEN_ENV: ADMIN_TOKEN}, name)  # fmt: skip
    modal_double.create_secret("huggingface-secret", {}, name)
    return name


def rollout(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, Any]]:
    """`rollout ARGS --json` in this process: its exit code and its JSON report."""
    code = 0
    try:
        main([*args, "--json"])
    except SystemExit as exit_:
        code = int(exit_.code or 0)
    out, err = capsys.readouterr()
    assert out.strip(), err[-3000:]
    return code, json.loads(out.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------
# rollout prep glm-5.1 --target modal
# --------------------------------------------------------------------------------------------

# More files than one container takes (SHARD_MIN_FILES): the download is sharded, in two.
GLM_SHARDS = [4 * KiB] * 17
GPU_BUDGET = 16  # the README's `prefect gcl create gpu-b200 --limit 16`


@pytest.fixture
def glm_main(mirror_store: MirrorStore, mirror: MirrorServer,
             monkeypatch: pytest.MonkeyPatch) -> str:  # fmt: skip
    """GLM-5.1's Hub repo in the mirror (tiny shards): the commit its `main` points at."""
    profile = load_profile("glm-5.1")
    sha = make_synthetic_repo(mirror_store, profile.hub.repo, GLM_SHARDS, seed=51)
    monkeypatch.setenv("HF_ENDPOINT", mirror.url)
    with get_client(sync_client=True) as client:
        limit = GlobalConcurrencyLimitCreate(name=gpu_limit_name(profile.resources.gpu),
                                             limit=GPU_BUDGET)  # fmt: skip
        with contextlib.suppress(ObjectAlreadyExists):
            client.create_global_concurrency_limit(limit)
    return sha


def test_prep_downloads_in_shards_compiles_and_verifies_on_modal(
    capsys: pytest.CaptureFixture[str], modal_double: ModalDouble, environment: str,
    glm_main: str, mirror: MirrorServer, tmp_path: Path,
) -> None:  # fmt: skip
    profile = load_profile("glm-5.1")
    compile_run = FakeCompileRun()  # no GPU here: compile_deep_gemm's command is recorded
    PrepContainers(modal_double, profile, tmp_path / "containers", mirror.url, environment,
                   compile_run)  # fmt: skip
    weights, compile_app = "glm-5.1-weights", "glm-5.1-compile"

    code, report = rollout(capsys, "prep", "glm-5.1", "--target", "modal")

    assert code == 0, report
    every_file = fetch_files(profile.hub.repo, glm_main, endpoint=mirror.url)
    assert (report["revision"], report["files"]) == (glm_main, len(every_file))
    assert report["verified"] and report["compile_status"] == "compiled"
    assert report["bytes_downloaded"] == report["bytes_total"] == sum(f.size for f in every_file)
    # Two shards between them took every file once, and the merge wrote one sentinel for all.
    shards = [c.arguments[0] for c in modal_double.calls_of(weights, resources.DOWNLOAD_FUNCTION)]
    paths = [path for _, given, _ in shards for path in given]
    assert len(shards) == 2 and sorted(paths) == sorted(f.path for f in every_file)
    assert len(modal_double.calls_of(weights, resources.MERGE_FUNCTION)) == 1
    sentinel = weights_dir(PurePosixPath("/"), profile, glm_main) / SENTINEL_NAME
    manifest = Manifest.model_validate_json(
        ModalGateway(environment).read_volume_file(profile.volumes.weights, str(sentinel)) or ""
    )
    assert sorted(f.path for f in manifest.files) == sorted(f.path for f in every_file)
    # The compile ran once, beside the download, on the GPU App, for the profile's TP.
    [compiled] = compile_run.commands
    tp = compiled.argv.index("--tp-size")
    assert compiled.argv[tp + 1] == str(profile.resources.tp)
    assert [c.arguments[0] for c in modal_double.calls_of(compile_app, "compile")] == [(glm_main,)]
    assert [c.arguments[0] for c in modal_double.calls_of(weights, "verify")] == [(glm_main,)]
    assert deployed(modal_double, environment) == [compile_app, weights]
    # Once each: the stages share the process's platform (no second deploy before verify).
    assert Counter(modal_double.publishes) == {compile_app: 1, weights: 1}
    assert modal_double.volume_version(profile.volumes.weights, environment) == V2
    # Each spawned call is on record, so a restarted orchestrator re-attaches to it.
    records = CallStore(tmp_path / "home/state/modal-calls.json").records()
    spawned = [*modal_double.calls_of(weights, "download"),
               *modal_double.calls_of(compile_app, "compile")]  # fmt: skip
    assert sorted(r.call_id for r in records) == sorted(call.call_id for call in spawned)
    assert sorted(r.key.stage for r in records) == ["compile", "download-shard", "download-shard"]


# --------------------------------------------------------------------------------------------
# rollout run qwen3-8b --target modal
# --------------------------------------------------------------------------------------------


def shorten(models: Path, name: str) -> None:
    """The profile with steps of seconds, gates a short bake can satisfy, and the parts the
    FAKE engine cannot play (probes beyond a chat, golden answers, memory snapshots, kernels)
    left out."""
    path = models / f"{name}.yaml"
    profile = yaml.safe_load(path.read_text())
    profile["engine"]["memory_snapshot"] = False
    profile["deepgemm"] = False
    profile["probes"] = ["chat"]
    profile["canary"] |= {
        "steps": [{"weight": 50, "bake_seconds": BAKE_SECONDS}, {"weight": 100, "bake_seconds": 0}],
        # Two identical FAKE engines: their latency ratio is the machine's noise (a busy one
        # saw a p99 ratio of 8.6); the error gate is what these runs decide on.
        "gates": {"min_requests": MIN_REQUESTS, "max_error_rate": 0.05,
                  "max_ttft_p50_ratio": 100, "max_ttft_p99_ratio": 100},
        "golden_prompts": [],
        "retire_grace_seconds": 20,
    }
    path.write_text(yaml.safe_dump(profile))


def passed_verification() -> dict[str, Any]:
    result = VerifyResult(weights=VerifyReport(ok=["config.json"]), repaired=[],
                          compile_status="not-required", compile_key=None, problems=[])  # fmt: skip
    return result.model_dump(mode="json")


class ClientLoad:
    """Clients of the model: chat requests to the router's URL, every LOAD_INTERVAL_SECONDS,
    from the moment the router serves until stopped."""

    def __init__(self, containers: ServingContainers) -> None:
        self.containers = containers
        self.statuses: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ClientLoad:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        with httpx.Client(timeout=10) as client:
            while not self._stop.wait(LOAD_INTERVAL_SECONDS):
                url = self.containers.router_url
                if url is None:
                    continue
                response = client.post(f"{url}/v1/chat/completions", json={
                    "model": "qwen3-8b", "messages": [{"role": "user", "content": "hi"}],
                })  # fmt: skip
                self.statuses.append(response.status_code)


@pytest.fixture
def serving(
    environment: str, modal_double: ModalDouble, tmp_path: Path
) -> Iterator[ServingContainers]:
    shorten(tmp_path / "models", "qwen3-8b")
    profile = load_profile("qwen3-8b")
    seed_verified_weights(modal_double, profile, [REV_A, REV_B, REV_C], environment)
    healthy = fake_engine()
    engines = {REV_A: healthy, REV_B: healthy, REV_C: fake_engine(FAILING_ENGINE)}
    containers = ServingContainers(modal_double, profile, tmp_path / "containers", engines,
                                   environment)  # fmt: skip
    modal_double.containers = containers
    try:
        yield containers
    finally:
        containers.close()


def deployed(double: ModalDouble, environment: str) -> list[str]:
    return sorted(
        app.name
        for app in double.apps.values()
        if app.environment == environment and app.state == api_pb2.APP_STATE_DEPLOYED
    )


def test_run_promotes_a_first_release_then_a_canary_and_rolls_a_failing_one_back(
    capsys: pytest.CaptureFixture[str], modal_double: ModalDouble, environment: str,
    serving: ServingContainers,
) -> None:  # fmt: skip
    modal_double.script("qwen3-8b-weights", resources.VERIFY_FUNCTION,
                        *[returned(passed_verification())] * 3)  # fmt: skip
    run = ("run", "qwen3-8b", "--target", "modal", "--revision")

    first_code, first = rollout(capsys, *run, REV_A)
    with ClientLoad(serving) as load:
        second_code, second = rollout(capsys, *run, REV_B)
        third_code, third = rollout(capsys, *run, REV_C)

    # The first release: nothing to compare, straight to 100%.
    assert (first_code, first["decision"]) == (0, "promoted"), first
    # The canary held at 50% against the stable under the clients' load, then took it all.
    assert (second_code, second["decision"]) == (0, "promoted"), second
    [step] = second["steps"]
    assert step["weight"] == 50 and step["analysis"]["verdict"] == "pass"
    assert step["analysis"]["canary"]["requests"] >= MIN_REQUESTS
    # The failing canary was judged on its errors and rolled back.
    assert (third_code, third["decision"]) == (1, "rolled-back"), third
    assert "error" in third["reason"]
    # What Modal holds now: the router, the weights App, and the one stable release.
    assert deployed(modal_double, environment) == [
        "qwen3-8b-bbbbbbbb", "qwen3-8b-router", "qwen3-8b-weights",
    ]  # fmt: skip
    assert serving.stopped == ["qwen3-8b-aaaaaaaa", "qwen3-8b-cccccccc"]
    assert serving.crashes == []
    assert [call.arguments[0] for call in modal_double.calls_of("qwen3-8b-weights", "verify")] == [
        (REV_A,), (REV_B,), (REV_C,),
    ]  # fmt: skip
    # The router retried the canary's failures on the stable release: clients saw none.
    assert load.statuses and set(load.statuses) == {200}, Counter(load.statuses)


# --------------------------------------------------------------------------------------------
# rollout run qwen3-8b --target modal --dummy-weights
# --------------------------------------------------------------------------------------------

QWEN_SHARDS = [4 * KiB] * 2
TOKENIZER = {"tokenizer.json": b'{"model": {"type": "BPE"}}'}


def test_a_dummy_rollout_fetches_config_only_serves_and_never_becomes_stable(
    capsys: pytest.CaptureFixture[str], modal_double: ModalDouble, environment: str,
    serving: ServingContainers, mirror_store: MirrorStore, mirror: MirrorServer,
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    profile = load_profile("qwen3-8b")
    sha = make_synthetic_repo(mirror_store, profile.hub.repo, QWEN_SHARDS, seed=8,
                              extra_files=TOKENIZER)  # fmt: skip
    monkeypatch.setenv("HF_ENDPOINT", mirror.url)
    PrepContainers(modal_double, profile, tmp_path / "prep", mirror.url, environment,
                   FakeCompileRun())  # fmt: skip
    serving.engines[sha] = fake_engine()
    weights, dummy_app = "qwen3-8b-weights", f"qwen3-8b-{sha[:8]}-dummy"
    run = ("run", "qwen3-8b", "--target", "modal", "--revision", sha)
    mirror.clear_requests()

    code, dummy = rollout(capsys, *run, "--dummy-weights")

    assert (code, dummy["decision"], dummy["dummy_weights"]) == (0, "dummy", True), dummy
    assert dummy["bytes_downloaded"] == 0
    # Config and tokenizer only, from the Hub into the volume's dummy directory: no download
    # call, no shard fetched, nothing where real weights go, no sentinel anywhere.
    assert modal_double.calls_of(weights, resources.DOWNLOAD_FUNCTION) == []
    fetched = {r.path.rsplit("/", 1)[1] for r in mirror.requests if "/resolve/" in r.path}
    assert fetched == {"config.json", "generation_config.json", "tokenizer.json"}
    files = modal_double.volumes[(environment, profile.volumes.weights)].files
    config_dir = dummy_weights_dir(PurePosixPath(), profile, sha).as_posix()
    assert {f"{config_dir}/{name}" for name in fetched} <= set(files)
    of_revision = [path for path in files if sha in path]
    assert [path for path in of_revision if not path.startswith(f"{config_dir}/")] == []
    assert [path for path in of_revision if path.endswith(SENTINEL_NAME)] == []
    # SGLang would serve random weights built from that config; the release was probed at 0%
    # (its container's enter ran the probes), then retired, recorded as dummy, never stable.
    argv = serving.commands[dummy_app].argv
    assert argv[argv.index("--load-format") + 1] == "dummy"
    assert argv[argv.index("--model-path") + 1].endswith(config_dir)
    assert serving.stopped == [dummy_app]
    stored = ModalGateway(environment).dict(resources.routes_dict_name(profile))
    assert json.loads(stored.get(f"{resources.RELEASE_KEY_PREFIX}{dummy_app}"))["dummy_weights"]
    record = ModalPlatform().release_store().read("qwen3-8b")
    assert (record.stable, record.canary, record.retiring) == (None, None, [])
    assert [(entry.revision, entry.outcome) for entry in record.history] == [(sha, "dummy")]

    code, real_run = rollout(capsys, *run)

    # The dummy release is no stable: the real rollout of the revision is a first release.
    assert (code, real_run["decision"]) == (0, "promoted"), real_run
    assert "first release" in real_run["reason"] and real_run["bytes_downloaded"] > 0
    stable_app = f"qwen3-8b-{sha[:8]}"
    assert "--load-format" not in serving.commands[stable_app].argv
    assert deployed(modal_double, environment) == [stable_app, "qwen3-8b-router", weights]
    record = ModalPlatform().release_store().read("qwen3-8b")
    assert record.stable is not None and record.stable.id == stable_app
    assert [entry.outcome for entry in record.history] == ["dummy", "promoted"]
