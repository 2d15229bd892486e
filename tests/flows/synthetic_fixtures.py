"""The synthetic DeepGEMM model for flow and deployment tests, registered in conftest.py.

A profile copied from qwen3-8b (sglang, a GPU, DeepGEMM required) whose hub repo is the mirror's
synthetic repo, in a fresh ROLLOUT_HOME, with the mirror as the Hub. There is no GPU here, so
compile_deep_gemm is replaced by a FAKE that fails on demand (fault injection only), and the
probes are ones the FAKE engine (tests/fake_engine.py) can pass.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

from dev.mirror import MirrorServer
from serving.config.loader import DEFAULT_MODELS_DIR
from serving.core.home import REPO_ROOT
from serving.platforms.local.platform import COMPILE_ENTRYPOINT_ENV
from tasks import weights as weight_tasks
from tests.mirror_fixtures import SyntheticRepo

FAKE_COMPILE = REPO_ROOT / "tests" / "engines" / "fake_compile_deep_gemm.py"
SYNTHETIC_MODEL = "synthetic-fp8"


def add_profile(workspace: Path, name: str) -> Path:
    """Another model with the synthetic profile under `name` (its own deployments and runs)."""
    models = workspace / "models"
    profile = yaml.safe_load((models / f"{SYNTHETIC_MODEL}.yaml").read_text())
    path = models / f"{name}.yaml"
    path.write_text(yaml.safe_dump(profile | {"name": name}))
    return path


@pytest.fixture
def workspace(
    tmp_path: Path,
    mirror: MirrorServer,
    synthetic_repo: SyntheticRepo,
    prefect_server: str,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Path]:
    """Profiles with the synthetic model, a fresh ROLLOUT_HOME, the mirror as the Hub, a compile
    that fails the first $FAKE_COMPILE_FAILURES times (none unless a test says so)."""
    models = tmp_path / "models"
    shutil.copytree(DEFAULT_MODELS_DIR, models)
    profile = yaml.safe_load((models / "qwen3-8b.yaml").read_text())
    profile |= {
        "name": SYNTHETIC_MODEL,
        "volumes": {"weights": "w", "deepgemm": "dg"},
        "hub": {"repo": synthetic_repo.repo_id, "revision": "main"},
        "probes": ["no-thinking"],
        "startup_budget_seconds": 60,
    }
    (models / f"{SYNTHETIC_MODEL}.yaml").write_text(yaml.safe_dump(profile))
    monkeypatch.setenv("ROLLOUT_MODELS_DIR", str(models))
    monkeypatch.setenv("ROLLOUT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_ENDPOINT", mirror.url)
    monkeypatch.setenv(COMPILE_ENTRYPOINT_ENV, f"{sys.executable} {FAKE_COMPILE} flaky")
    monkeypatch.setenv("FAKE_COMPILE_COUNTER", str(tmp_path / "compile-attempts"))
    monkeypatch.setenv("FAKE_COMPILE_FAILURES", "0")
    # Retries keep their count; only the waiting is dropped, to keep the suite fast.
    monkeypatch.setattr(weight_tasks.compile_kernels, "retry_delay_seconds", [0, 0])
    yield tmp_path


def compile_attempts(workspace: Path) -> int:
    return int((workspace / "compile-attempts").read_text())


def task_states(flow_run_id: object) -> dict[str, list[object]]:
    """Each task's state types and names in one flow run, by task name."""
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
