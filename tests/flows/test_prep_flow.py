"""The `prep` flow on the local target: real Prefect, real huggingface_hub, the real mirror.

The synthetic GPU profile (DeepGEMM required, tests/flows/synthetic_fixtures.py) exercises the
compile stage; since there is no GPU here, compile_deep_gemm is a FAKE that fails on demand.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from prefect.client.schemas.objects import StateType

from dev.mirror import MirrorServer
from flows.prep import prep
from serving.core.home import REPO_ROOT
from tasks import weights as weight_tasks
from tests.flows.synthetic_fixtures import SYNTHETIC_MODEL, compile_attempts, task_states
from tests.mirror_fixtures import SyntheticRepo

MODEL = SYNTHETIC_MODEL


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
    assert compile_attempts(workspace) == 1  # the compile marker held
    # Prefect handed back the first run's DownloadResult; this run transferred nothing.
    states = task_states(state.state_details.flow_run_id)
    assert "Cached" in states["download"]
    assert "resolve" not in states  # a commit needs no resolving (the rollout's prep gets one)
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
    states = task_states(state.state_details.flow_run_id)["download"]
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
    states = task_states(state.state_details.flow_run_id)["download"]
    assert StateType.COMPLETED in states and "Cached" not in states
    assert [r for r in mirror.requests if "/resolve/" in r.path]
    # The fresh result replaced the stale one: the next run is Cached again.
    third = prep(MODEL, synthetic_repo.v1, return_state=True)
    assert "Cached" in task_states(third.state_details.flow_run_id)["download"]


def test_kernels_deleted_after_a_cached_prep_are_compiled_again(
    workspace: Path, mirror: MirrorServer, synthetic_repo: SyntheticRepo
) -> None:
    prep(MODEL, synthetic_repo.v1)
    shutil.rmtree(workspace / "home/volumes/dg")  # the cache volume, by hand or a cleanup
    state = prep(MODEL, synthetic_repo.v1, return_state=True)
    again = state.result()
    assert again.verified and again.compile_status == "compiled"
    assert compile_attempts(workspace) == 2
    states = task_states(state.state_details.flow_run_id)
    assert StateType.COMPLETED in states["compile"] and "Cached" not in states["compile"]
    assert "Cached" in states["download"]  # the weights are still there
    # The fresh result replaced the stale one: the next run is Cached again.
    third = prep(MODEL, synthetic_repo.v1, return_state=True)
    assert "Cached" in task_states(third.state_details.flow_run_id)["compile"]
    assert compile_attempts(workspace) == 2


def test_compile_failing_twice_is_retried(
    workspace: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_COMPILE_FAILURES", "2")
    report = prep(MODEL)
    assert report.compile_status == "compiled"
    assert compile_attempts(workspace) == 3


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
    # One more compile, and it succeeded (if not, the retry's own log says why).
    assert compile_attempts(workspace) == 4, retry.stdout[-3000:] + retry.stderr[-3000:]

    states = task_states(flow_run_id)
    assert StateType.COMPLETED in states["compile"]
    assert "Cached" in states["download"]  # the download was not redone
    assert not [r for r in mirror.requests if "/resolve/" in r.path]


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
