"""`rollout prep` and `rollout run` with `--target modal`, end to end: the command line, real
Prefect flows, the real modal SDK against the TEST DOUBLE of Modal's API (tests/modal_double),
the real HF client against the local mirror.

The double runs no containers. The bodies of spawned and `.remote()` calls end as each test
scripts them; the release and router Servers run in-process from the project's own container
bodies (tests/modal_containers.py: the real supervisor over the FAKE engine, the real router
over the routes Dict). Each test has its own Modal environment, so Prefect's stage cache (keyed
on the environment) never carries a result from one test, or one session, to another.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
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
from serving.config.loader import DEFAULT_MODELS_DIR, load_profile
from serving.domain.release import VerifyResult
from serving.engines.deepgemm import CompileResult
from serving.platforms.modal import resources
from serving.platforms.modal.calls import CallStore
from serving.weights.models import DownloadResult, FileEntry, Manifest, ShardResult, VerifyReport
from tasks.weights import gpu_limit_name
from tests.modal_containers import ServingContainers, fake_engine, seed_verified_weights
from tests.modal_double.calls import answered, returned
from tests.modal_double.servicer import ModalDouble

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


def shard_body(revision: str, paths: list[str], files: list[dict[str, Any]]) -> dict[str, Any]:
    """A shard's container: it proves the files it was given."""
    entries = [FileEntry.model_validate(f) for f in files if f["path"] in paths]
    moment = datetime.now(UTC)
    return ShardResult(
        repo="zai-org/GLM-5.1-FP8",
        revision=revision,
        files=entries,
        started_at=moment,
        finished_at=moment,
        bytes_downloaded=sum(e.size for e in entries),
    ).model_dump(mode="json")


def merge_body(revision: str, shards: list[dict[str, Any]],
               files: list[dict[str, Any]]) -> dict[str, Any]:  # fmt: skip
    """The merge container: one sentinel over the shards' files."""
    results = [ShardResult.model_validate(shard) for shard in shards]
    proven = sorted((e for r in results for e in r.files), key=lambda e: e.path)
    moment = datetime.now(UTC)
    manifest = Manifest(repo=results[0].repo, revision=revision, files=proven,
                        bytes_total=sum(e.size for e in proven), started_at=moment,
                        finished_at=moment)  # fmt: skip
    return DownloadResult(directory=Path("/weights") / manifest.repo / revision,
                          manifest=manifest, cached=False,
                          bytes_downloaded=sum(r.bytes_downloaded for r in results),
                          ).model_dump(mode="json")  # fmt: skip


def compiled(revision: str) -> dict[str, Any]:
    return CompileResult(
        status="compiled",
        reason="compiled on 8xB200",
        key="k" * 32,
        marker="/deepgemm/markers/k.json",
        seconds=60.0,
    ).model_dump(mode="json")


def test_prep_downloads_in_shards_compiles_and_verifies_on_modal(
    capsys: pytest.CaptureFixture[str], modal_double: ModalDouble, environment: str,
    glm_main: str, tmp_path: Path,
) -> None:  # fmt: skip
    weights, compile_app = "glm-5.1-weights", "glm-5.1-compile"
    modal_double.script(weights, resources.DOWNLOAD_FUNCTION, answered(shard_body),
                        answered(shard_body))  # fmt: skip
    modal_double.script(weights, resources.MERGE_FUNCTION, answered(merge_body))
    modal_double.script(compile_app, resources.COMPILE_FUNCTION, answered(compiled))
    modal_double.script(weights, resources.VERIFY_FUNCTION, returned(passed_verification()))

    code, report = rollout(capsys, "prep", "glm-5.1", "--target", "modal")

    assert code == 0, report
    every_file = modal_double.calls_of(weights, resources.DOWNLOAD_FUNCTION)[0].arguments[0][2]
    assert (report["revision"], report["files"]) == (glm_main, len(every_file))
    assert report["verified"] and report["compile_status"] == "compiled"
    assert report["bytes_downloaded"] == report["bytes_total"] == sum(f["size"] for f in every_file)
    # Two shards between them take every file once; the merge got both shards' proofs.
    shards = [c.arguments[0] for c in modal_double.calls_of(weights, resources.DOWNLOAD_FUNCTION)]
    paths = [path for _, given, _ in shards for path in given]
    assert len(shards) == 2 and sorted(paths) == sorted(f["path"] for f in every_file)
    [merge] = modal_double.calls_of(weights, resources.MERGE_FUNCTION)
    assert [len(shard["files"]) for shard in merge.arguments[0][1]] == [
        len(given) for _, given, _ in shards
    ]
    # The compile ran beside the download, once, on the GPU App; verify came last.
    assert [c.arguments[0] for c in modal_double.calls_of(compile_app, "compile")] == [(glm_main,)]
    assert [c.arguments[0] for c in modal_double.calls_of(weights, "verify")] == [(glm_main,)]
    assert deployed(modal_double, environment) == [compile_app, weights]
    assert modal_double.volume_version("glm51-weights", environment) == V2
    # Each spawned call is on record, so a restarted orchestrator re-attaches to it.
    records = {(r.key.stage, r.key.detail): r.call_id
               for r in CallStore(tmp_path / "home/state/modal-calls.json").records()}  # fmt: skip
    spawned = modal_double.calls_of(weights, "download") + modal_double.calls_of(
        compile_app, "compile"
    )
    assert sorted(records.values()) == sorted(call.call_id for call in spawned)
    assert sorted(stage for stage, _ in records) == ["compile", "download-shard", "download-shard"]


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
        "gates": {"min_requests": MIN_REQUESTS, "max_error_rate": 0.05},
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
