"""The `prep` flow on the local target: real Prefect, real huggingface_hub, the real mirror.

A synthetic GPU profile (DeepGEMM required) exercises the compile stage; since there is no GPU
here, compile_deep_gemm is replaced by a fake that fails on demand (fault injection only).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.client.schemas.objects import StateType

from dev.mirror import MirrorServer
from flows.prep import prep
from serving.config.loader import DEFAULT_MODELS_DIR
from serving.core.home import REPO_ROOT
from serving.platforms.local.platform import COMPILE_ENTRYPOINT_ENV
from tasks import weights as weight_tasks
from tests.mirror_fixtures import (
    SyntheticRepo,
)

FAKE_COMPILE = REPO_ROOT / "tests" / "engines" / "fake_compile_deep_gemm.py"
MODEL = "synthetic-fp8"


@pytest.fixture
def workspace(
    tmp_path: Path,
    mirror: MirrorServer,
    synthetic_repo: SyntheticRepo,
    prefect_server: str,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Path]:
    """Profiles with a synthetic DeepGEMM model, a fresh ROLLOUT_HOME, the mirror as the Hub."""
    models = tmp_path / "models"
    shutil.copytree(DEFAULT_MODELS_DIR, models)
    profile = yaml.safe_load((models / "qwen3-8b.yaml").read_text())
    profile |= {"name": MODEL, "volumes": {"weights": "w", "deepgemm": "dg"}}
    profile["hub"] = {"repo": synthetic_repo.repo_id, "revision": "main"}
    (models / f"{MODEL}.yaml").write_text(yaml.safe_dump(profile))
    monkeypatch.setenv("ROLLOUT_MODELS_DIR", str(models))
    monkeypatch.setenv("ROLLOUT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_ENDPOINT", mirror.url)
    monkeypatch.setenv(COMPILE_ENTRYPOINT_ENV, f"{sys.executable} {FAKE_COMPILE} flaky")
    monkeypatch.setenv("FAKE_COMPILE_COUNTER", str(tmp_path / "compile-attempts"))
    monkeypatch.setenv("FAKE_COMPILE_FAILURES", "0")
    # Retries keep their count; only the waiting is dropped, to keep the suite fast.
    monkeypatch.setattr(weight_tasks.compile_kernels, "retry_delay_seconds", [0, 0])
    yield tmp_path


def attempts(workspace: Path) -> int:
    return int((workspace / "compile-attempts").read_text())


def test_fresh_prep_downloads_compiles_and_verifies(
    workspace: Path, mirror: MirrorServer, synthetic_repo: SyntheticRepo
) -> None:
    report = prep(MODEL)
    assert report.revision == synthetic_repo.v2  # main → its commit
    assert report.verified and report.compile_status == "compiled"
    assert report.files == len(mirror.store.revision(synthetic_repo.repo_id, report.revision).files)
    assert report.bytes_downloaded == report.bytes_total > 4 * 2**20
    weights = Path(report.weights_path)
    assert weights == workspace / "home/volumes/w" / synthetic_repo.repo_id / report.revision
    assert (weights / ".rollout-manifest.json").is_file()
    assert list((workspace / "home/volumes/dg/sm_90/markers").glob("*.json"))
    assert set(report.seconds) == {"resolve", "download+compile", "verify"}


def test_rerun_of_a_commit_makes_no_hub_request(
    workspace: Path, mirror: MirrorServer, synthetic_repo: SyntheticRepo
) -> None:
    first = prep(MODEL, synthetic_repo.v1)
    assert first.bytes_downloaded == first.bytes_total
    mirror.clear_requests()
    state = prep(MODEL, synthetic_repo.v1, return_state=True)
    again = state.result()
    assert again.verified and again.compile_status in {"compiled", "cached"}
    assert mirror.requests == []
    assert attempts(workspace) == 1  # the compile marker held
    # Prefect handed back the first run's DownloadResult; this run transferred nothing.
    assert "Cached" in _task_states(state.state_details.flow_run_id)["download"]
    assert again.bytes_downloaded == 0


def test_a_sentinel_hit_reports_no_bytes_downloaded(
    workspace: Path,
    mirror: MirrorServer,
    synthetic_repo: SyntheticRepo,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    prep(MODEL, synthetic_repo.v1)
    # The task runs again (no Prefect cache) and finds the sentinel on disk.
    monkeypatch.setattr(
        weight_tasks, "download", weight_tasks.download.with_options(refresh_cache=True)
    )
    mirror.clear_requests()
    state = prep(MODEL, synthetic_repo.v1, return_state=True)
    again = state.result()
    states = _task_states(state.state_details.flow_run_id)["download"]
    assert StateType.COMPLETED in states and "Cached" not in states
    assert again.bytes_downloaded == 0 < again.bytes_total
    assert not [r for r in mirror.requests if "/resolve/" in r.path]


def test_weights_deleted_after_a_cached_prep_are_downloaded_again(
    workspace: Path, mirror: MirrorServer, synthetic_repo: SyntheticRepo
) -> None:
    first = prep(MODEL, synthetic_repo.v1)
    shutil.rmtree(first.weights_path)  # by hand, or a volume cleanup
    mirror.clear_requests()
    state = prep(MODEL, synthetic_repo.v1, return_state=True)
    again = state.result()
    assert again.verified and again.bytes_downloaded == again.bytes_total
    assert (Path(again.weights_path) / ".rollout-manifest.json").is_file()
    states = _task_states(state.state_details.flow_run_id)["download"]
    assert StateType.COMPLETED in states and "Cached" not in states
    assert [r for r in mirror.requests if "/resolve/" in r.path]
    # The fresh result replaced the stale one: the next run is Cached again.
    third = prep(MODEL, synthetic_repo.v1, return_state=True)
    assert "Cached" in _task_states(third.state_details.flow_run_id)["download"]


def test_compile_failing_twice_is_retried(
    workspace: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_COMPILE_FAILURES", "2")
    report = prep(MODEL)
    assert report.compile_status == "compiled"
    assert attempts(workspace) == 3


def test_flow_run_retry_after_a_compile_failure_resumes_at_compile(
    workspace: Path,
    prefect_server: str,
    mirror: MirrorServer,
    synthetic_repo: SyntheticRepo,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FAKE_COMPILE_FAILURES", "3")  # more than the task's 2 retries
    state = prep(MODEL, synthetic_repo.v1, return_state=True)
    assert state.is_failed()
    flow_run_id = state.state_details.flow_run_id
    mirror.clear_requests()

    retry = subprocess.run(
        [
            sys.executable, "-m", "prefect", "flow-run", "retry", str(flow_run_id),
            "--entrypoint", "flows/prep.py:prep",
        ],
        cwd=REPO_ROOT,
        env={**os.environ, "PREFECT_API_URL": prefect_server},
        capture_output=True,
        text=True,
        timeout=240,
    )  # fmt: skip
    assert retry.returncode == 0, retry.stdout[-2000:] + retry.stderr[-2000:]
    assert attempts(workspace) == 4  # one more compile, and it succeeded

    states = _task_states(flow_run_id)
    assert StateType.COMPLETED in states["compile"]
    assert "Cached" in states["download"]  # the download was not redone
    assert not [r for r in mirror.requests if "/resolve/" in r.path]


def _task_states(flow_run_id: object) -> dict[str, list[object]]:
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )
    states: dict[str, list[object]] = {}
    for run in runs:
        states.setdefault(run.name.rsplit("-", 1)[0], []).extend(
            [run.state.type, run.state.name] if run.state else []
        )
    return states


def test_unknown_revision_is_one_clear_line(
    workspace: Path, prefect_server: str
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "rollout.cli", "prep", MODEL, "--revision", "no-such-branch"],
        env={**os.environ, "PREFECT_API_URL": prefect_server},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    ours = [line for line in result.stderr.splitlines() if line.startswith("rollout:")]
    assert len(ours) == 1 and "no-such-branch" in ours[0], result.stderr[-2000:]
    assert not (workspace / "home" / "volumes").exists()  # nothing was prepared
