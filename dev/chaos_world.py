"""The chaos run's world: a home of its own, a local mirror with two revisions of a model, the
`--fast` copy of the demo profile, and the command line of one orchestrator (`rollout run`).

Engines are the real demo model (SmolLM2-135M on the CPU) or, with `engine="fake"`, the FAKE
engine of tests/fake_engine.py behind the same supervisor, router and flows: the CI variant,
which cannot afford a real model's minutes. The FAKE engine is injected per release id through
ROLLOUT_FAULT_ENGINES, as the rollout flow tests do.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml

from dev.demo_model import make_synthetic_repo, publish_demo_model
from dev.mirror import MirrorServer, run_mirror
from dev.mirror_store import KiB, MirrorStore
from rollout.orchestration import SERVE_PORT_ENV
from serving.config.layout import weights_dir
from serving.config.loader import DEFAULT_MODELS_DIR, load_profile
from serving.config.profile import Profile
from serving.core.home import REPO_ROOT
from serving.core.procs import free_port
from serving.domain.release import release_id
from serving.engines.engine import FAULT_ENGINES_ENV
from serving.platforms.local.platform import LocalPlatform

Engine = Literal["real", "fake"]

DEMO_PROFILE = "smollm2-135m"
FAST_PROFILE = "smollm2-135m-fast"
FAKE_ENGINE = REPO_ROOT / "tests" / "fake_engine.py"
FAKE_REPO = "chaos/tiny-fake"
# The FAKE engine never reads its weights: a few small shards make a real download all the same.
FAKE_SHARDS = [256 * KiB, 128 * KiB]

# The demo profile's steps take minutes; a chaos trial needs the same stages in seconds.
REAL_STEPS = [{"weight": 50, "bake_seconds": 12}, {"weight": 100, "bake_seconds": 0}]
REAL_GATES = {"min_requests": 3, "max_ttft_p50_ratio": 5.0, "max_ttft_p99_ratio": 10.0}
FAKE_STEPS = [{"weight": 50, "bake_seconds": 3}, {"weight": 100, "bake_seconds": 0}]
FAKE_GATES = {"min_requests": 3, "max_ttft_p50_ratio": 20.0, "max_ttft_p99_ratio": 50.0}
RETIRE_GRACE_SECONDS = 5


@dataclass(frozen=True)
class World:
    home: Path
    engine: Engine
    profile: Profile
    revisions: tuple[str, str]  # v1, v2
    mirror: MirrorServer
    env: dict[str, str]  # for every orchestrator; os.environ is set alike for the checks

    @property
    def platform(self) -> LocalPlatform:
        return LocalPlatform.from_env()

    def weights_root(self) -> Path:
        return self.home / "volumes" / self.profile.volumes.weights

    def weights(self, revision: str) -> Path:
        return weights_dir(self.weights_root(), self.profile, revision)

    def rollout_argv(self, revision: str) -> list[str]:
        """One orchestrator, as users run it: the CLI, leaving the releases serving."""
        return [sys.executable, "-m", "rollout.cli", "run", self.profile.name,
                "--revision", revision, "--keep-serving", "--json"]  # fmt: skip

    def not_stable(self) -> str:
        stable = self.platform.release_store().read(self.profile.name).stable
        v1, v2 = self.revisions
        return v1 if stable is not None and stable.revision == v2 else v2


@contextmanager
def open_world(home: Path, engine: Engine, prefect_api: str | None) -> Iterator[World]:
    """A fresh world in `home` (the mirror and the built demo model are kept between runs):
    nothing is running and no release exists when it opens; everything is stopped when it
    closes."""
    home = home.resolve()
    _clear(home)
    models = _write_models(home / "models", engine)
    store = MirrorStore(home / "mirror")
    revisions = _publish(store, engine, home)
    with run_mirror(store) as mirror:
        env = _environment(home, models, mirror.url, prefect_api)
        os.environ |= env  # the checks read the same home, router and profiles
        if not prefect_api:
            os.environ.pop("PREFECT_API_URL", None)
        profile = load_profile(FAST_PROFILE)
        if engine == "fake":
            env[FAULT_ENGINES_ENV] = _fake_engines(profile, revisions)
        world = World(home, engine, profile, revisions, mirror, env)
        try:
            yield world
        finally:
            world.platform.stop_all()


def _clear(home: Path) -> None:
    """Whatever an earlier chaos run left in this home is stopped, and its state forgotten."""
    if (home / "state").is_dir():
        LocalPlatform(home).stop_all()
    for kept_between_runs in ("state", "volumes", "releases", "logs", "prefect", "models"):
        shutil.rmtree(home / kept_between_runs, ignore_errors=True)


def _write_models(directory: Path, engine: Engine) -> Path:
    """The repository's profiles plus the `--fast` copy of the demo profile."""
    shutil.copytree(DEFAULT_MODELS_DIR, directory)
    fast = yaml.safe_load((DEFAULT_MODELS_DIR / f"{DEMO_PROFILE}.yaml").read_text())
    fast |= {"name": FAST_PROFILE, "served_model_name": FAST_PROFILE}
    fast["canary"] |= {
        "steps": REAL_STEPS if engine == "real" else FAKE_STEPS,
        "gates": fast["canary"]["gates"] | (REAL_GATES if engine == "real" else FAKE_GATES),
        "retire_grace_seconds": RETIRE_GRACE_SECONDS,
    }
    if engine == "real":
        fast["probes"] = ["capital"]  # the long-context probe costs seconds per deploy
    else:
        # The FAKE engine's canned answer passes only probes that want any content.
        fast |= {"hub": {"repo": FAKE_REPO, "revision": "main"}, "probes": ["no-thinking"],
                 "volumes": {"weights": "chaos-fake-weights"}}  # fmt: skip
        fast["canary"]["golden_prompts"] = []
    (directory / f"{FAST_PROFILE}.yaml").write_text(yaml.safe_dump(fast, sort_keys=False))
    return directory


def _publish(store: MirrorStore, engine: Engine, home: Path) -> tuple[str, str]:
    if engine == "real":
        demo = publish_demo_model(store, home / "cache" / "demo-model")
        return demo.v1, demo.v2
    v1, v2 = (
        make_synthetic_repo(store, FAKE_REPO, FAKE_SHARDS, seed=seed, tags=[tag])
        for seed, tag in ((1, "v1"), (2, "v2"))
    )
    return v1, v2


def _environment(
    home: Path, models: Path, endpoint: str, prefect_api: str | None
) -> dict[str, str]:
    env = {
        "ROLLOUT_HOME": str(home),
        "ROLLOUT_MODELS_DIR": str(models),
        "ROLLOUT_ROUTER_PORT": str(free_port()),
        "HF_ENDPOINT": endpoint,
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "PREFECT_HOME": str(home / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        # Not the `make serve` server a user may run: each run is the CLI on its own, with its
        # in-process Prefect server (rollout/orchestration.py), unless `prefect_api` is given.
        SERVE_PORT_ENV: str(free_port()),
        "PYTHONPATH": str(REPO_ROOT),
    }
    if prefect_api:
        env["PREFECT_API_URL"] = prefect_api
    return env


def _fake_engines(profile: Profile, revisions: tuple[str, str]) -> str:
    engines = {}
    for revision in revisions:
        name = release_id(profile, revision)
        engines[name] = [sys.executable, str(FAKE_ENGINE), "--port", "{port}", "--name", name]
    return json.dumps(engines)


def orchestrator_env(world: World) -> dict[str, str]:
    """The environment of one orchestrator: this process's, minus a Prefect API the world does
    not name (then the CLI serves Prefect's API in its own process, as it does for users)."""
    env = {key: value for key, value in os.environ.items() if key != "PREFECT_API_URL"}
    return env | world.env
