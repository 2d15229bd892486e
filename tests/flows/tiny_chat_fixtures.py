"""The tiny-chat world of the rollout flow tests (registered in tests/conftest.py): the
`test-org/tiny-chat` repo in a mirror, its profiles, a fresh ROLLOUT_HOME that the local target
serves from, and what the tests ask of it.

Revisions of `test-org/tiny-chat` in the mirror:
    v1  tiny model, seed 0
    v2  same weights, another generation_config: answers like v1 (a healthy canary)
    v3  tiny model, seed 1: different weights, different answers (golden prompts disagree)
Canaries with a 5xx rate, a slow first token or a crash are the FAKE engine, injected through
ROLLOUT_FAULT_ENGINES (`inject_fake_engines`): no real engine produces those on demand. So are
both releases where a test needs engines of a known capacity (saturated, or serving a thin
trickle).
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from dev.mirror import MirrorServer, run_mirror
from dev.mirror_store import MirrorStore
from serving.config.loader import DEFAULT_MODELS_DIR, load_profile
from serving.core.home import REPO_ROOT
from serving.core.procs import free_port
from serving.domain.release import release_id
from serving.engines.engine import FAULT_ENGINES_ENV
from serving.platforms.local.platform import LocalPlatform
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
def tiny_revisions(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
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
def tiny_mirror(tiny_revisions: dict[str, str]) -> Iterator[MirrorServer]:
    with run_mirror(Path(tiny_revisions["root"])) as server:
        yield server


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
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
def tiny_home(
    tmp_path: Path,
    tiny_models: Path,
    tiny_mirror: MirrorServer,
    prefect_server: str,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Path]:
    monkeypatch.setenv("ROLLOUT_HOME", str(tmp_path))
    monkeypatch.setenv("ROLLOUT_MODELS_DIR", str(tiny_models))
    monkeypatch.setenv("HF_ENDPOINT", tiny_mirror.url)
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
