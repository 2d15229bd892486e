"""How fast a decision reaches the router, and how fast a deployment run reaches its canary.

    .venv/bin/python bench/decisions.py [--runs 10] [--rounds 2] [--baseline main]
                                        [--only rollback,promote,abort,deploy]

Local target, real Prefect server, real router, FAKE engines (tests/fake_engine.py) for every
release, 10 chats/s open-loop through the router. Measured, over --runs x --rounds rollouts:

  rollback  a gate fails (the analyse task logs `fail`) → the router's table has the canary at 0%
  promote   the canary passes its last gate (`pass`) → the router's table has it at 100%
  abort     `python -m rollout.cli abort` is started → the router's table has the canary at 0%;
            and what the abort pays before it can act, as wall and CPU seconds (steadier on a
            busy machine) of an abort with nothing to do
  deploy    `prefect deployment run rollout/smollm2-135m` (weights cached, worker running) → the
            canary's first answer through the router, split into Prefect (command, worker
            pickup, flow-run start, task overheads), prep, and the engine's own start

The router's table is watched from outside (GET /admin/routes every 20 ms). Both code trees are
measured in the same run, each in a child process with its own Prefect server and home: the
baseline is `git archive <--baseline>` of this repository, the project is this working tree.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

PROJECT = Path(__file__).resolve().parent.parent
KINDS = ("rollback", "promote", "abort", "deploy")
TARGET_P99_SECONDS = 1.0
MODEL = "smollm2-135m"  # the deployment the issue names; its profile is rewritten for FAKE engines
ABORT_MODEL = "bench-abort"  # a long bake: the abort lands in it however busy the machine
REPO_ID = "bench-org/fake-smollm"
SHARD_BYTES = 1 << 20
RATE_PER_SECOND = 10.0
WATCH_SECONDS = 0.02
# What a rollout may take here at most (deploy, bakes, retire), before the bench gives up.
RUN_TIMEOUT_SECONDS = 180.0
ABORT_AFTER_SECONDS = 0.3
# The abort's canary bakes this long: the abort lands in the bake however slowly it starts on a
# busy machine (6 s was too short for a niced abort there), and the run ends at the abort.
ABORT_BAKE_SECONDS = 30.0
GATE_LINE = re.compile(r"^(?P<model>\S+) at (?P<weight>\d+)%: (?P<verdict>pass|fail) ")


# --------------------------------------------------------------------------------------------
# The parent: one child per code tree, then the table
# --------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10, help="per kind, tree and round")
    parser.add_argument("--deploy-runs", type=int, default=3, help="per tree and round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--baseline", default="main", help="git ref measured as the baseline")
    parser.add_argument("--only", default=",".join(KINDS))
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)  # child: write here
    args = parser.parse_args()
    kinds = [kind for kind in args.only.split(",") if kind]
    if unknown := set(kinds) - set(KINDS):
        raise SystemExit(f"decisions: unknown kinds {sorted(unknown)}; known: {KINDS}")
    if args.measure is not None:
        args.measure.write_text(json.dumps(measure(kinds, args.runs, args.deploy_runs)))
        return
    with tempfile.TemporaryDirectory(prefix="bench-decisions-") as scratch:
        baseline_tree = Path(scratch) / "baseline"
        export(args.baseline, baseline_tree)
        results: dict[str, dict[str, list[float]]] = {"baseline": {}, "project": {}}
        # The trees take turns, so a machine whose load drifts weighs on both alike.
        for _ in range(args.rounds):
            for tree, path in (("baseline", baseline_tree), ("project", PROJECT)):
                measured = run_child(path, kinds, args, Path(scratch) / f"{tree}.json")
                for name, seconds in measured.items():
                    results[tree].setdefault(name, []).extend(seconds)
    print_table(results, args.baseline)


def export(ref: str, into: Path) -> None:
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(PROJECT), "archive", ref], check=True,
                             capture_output=True).stdout  # fmt: skip
    with tarfile.open(fileobj=__import__("io").BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")


def run_child(tree: Path, kinds: list[str], args: argparse.Namespace,
              out: Path) -> dict[str, list[float]]:  # fmt: skip
    print(f"measuring {tree} ...", flush=True)
    env = {**os.environ, "PYTHONPATH": str(tree), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    subprocess.run([sys.executable, __file__, "--measure", str(out), "--runs", str(args.runs),
                    "--deploy-runs", str(args.deploy_runs), "--only", ",".join(kinds)],
                   cwd=tree, env=env, check=True)  # fmt: skip
    return json.loads(out.read_text())


def print_table(results: dict[str, dict[str, Any]], ref: str) -> None:
    from openloop import p50_p99

    print(f"\n{'seconds':34} {'baseline (' + ref + ')':>20} {'project':>17} {'ratio p50':>10}")
    print(f"{'':34} {'p50':>9} {'p99':>10} {'p50':>8} {'p99':>8}")
    for name in results["project"]:
        base, ours = results["baseline"].get(name), results["project"][name]
        if not base or not ours:
            continue
        (b50, b99), (p50, p99) = p50_p99(base), p50_p99(ours)
        ratio = f"{p50 / b50:9.2f}x" if b50 else "-"
        print(f"{name:34} {b50:9.3f} {b99:10.3f} {p50:8.3f} {p99:8.3f} {ratio:>10}  "
              f"(n={len(base)}/{len(ours)})")  # fmt: skip
    for name in ("rollback", "promote", "abort"):
        if ours := results["project"].get(name):
            met = p50_p99(ours)[1] <= TARGET_P99_SECONDS
            print(f"target {name} p99 <= {TARGET_P99_SECONDS:g} s: {'MET' if met else 'MISSED'}")


# --------------------------------------------------------------------------------------------
# The child: runs in one code tree (PYTHONPATH), with its own Prefect server and home
# --------------------------------------------------------------------------------------------


def measure(kinds: list[str], runs: int, deploy_runs: int) -> dict[str, list[float]]:
    from deploy_run import DeployRuns
    from openloop import OpenLoop
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    from dev.mirror import run_mirror
    from dev.mirror_store import MirrorStore

    scratch = Path(tempfile.mkdtemp(prefix="bench-decisions-home-"))
    bench = BenchHome(scratch)
    bench.publish(MirrorStore(scratch / "mirror"))
    results: dict[str, list[float]] = {}
    with prefect_test_harness(server_startup_timeout=120), run_mirror(scratch / "mirror") as hub:
        os.environ |= bench.env(hub.url)
        from serving.platforms.local.platform import LocalPlatform

        platform = LocalPlatform.from_env()
        try:
            bench.rollout(MODEL, bench.revisions["a"])  # first releases: stable, not timed
            bench.rollout(ABORT_MODEL, bench.revisions["a"])
            # Only now: Prefect configures its loggers anew while the first flow run imports.
            gates = GateLog()
            with OpenLoop(bench.router_url, MODEL, RATE_PER_SECOND) as load, \
                    OpenLoop(bench.router_url, ABORT_MODEL, RATE_PER_SECOND), \
                    RouterWatch(bench) as watch:  # fmt: skip
                for _ in range(runs):
                    if "promote" in kinds:
                        results.setdefault("promote", []).append(
                            bench.promote_once(watch, gates))
                    if "rollback" in kinds:
                        results.setdefault("rollback", []).append(
                            bench.rollback_once(watch, gates))
                    if "abort" in kinds:
                        results.setdefault("abort", []).append(bench.abort_once(watch))
                        wall, cpu = abort_startup()
                        results.setdefault("abort startup: wall", []).append(wall)
                        results.setdefault("abort startup: CPU", []).append(cpu)
                if "deploy" in kinds:
                    api_url = str(PREFECT_API_URL.value())
                    results |= DeployRuns(bench, MODEL, api_url, load).measure(deploy_runs)
        finally:
            platform.stop_all()
    shutil.rmtree(scratch, ignore_errors=True)
    return results


def abort_startup() -> tuple[float, float]:
    """What `rollout abort` pays before it can act, in wall and CPU seconds: the interpreter,
    the imports of the abort's path and one read of the record (MODEL has no canary now)."""
    started = time.time()
    with tempfile.TemporaryFile() as errors:
        process = subprocess.Popen([sys.executable, "-m", "rollout.cli", "abort", MODEL],
                                   stdout=subprocess.DEVNULL, stderr=errors)  # fmt: skip
        # wait4, not wait: this child's own usage, not that of every child the bench reaped.
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.time() - started
        process.returncode = os.waitstatus_to_exitcode(status)
        if process.returncode != 0:
            errors.seek(0)
            raise RuntimeError(f"abort exited {process.returncode}: {errors.read().decode()}")
    return wall, usage.ru_utime + usage.ru_stime


@dataclass
class Change:
    at: float
    weights: dict[str, dict[str, int]]  # model → release id → weight


class RouterWatch:
    """The router's table as a client sees it, polled every WATCH_SECONDS: each change kept
    with the moment it was first seen."""

    def __init__(self, bench: BenchHome) -> None:
        self.bench = bench
        self.changes: list[Change] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> RouterWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()

    def first(self, after: float, model: str, holds: Callable[[dict[str, int]], bool],
              timeout: float = RUN_TIMEOUT_SECONDS) -> float:  # fmt: skip
        """When the table first showed `holds` for the model, at or after `after`."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            for change in list(self.changes):
                if change.at >= after and holds(change.weights.get(model, {})):
                    return change.at
            time.sleep(WATCH_SECONDS)
        raise TimeoutError(f"the router never showed the expected table for {model}")

    def _watch(self) -> None:
        token_file = self.bench.home / "state" / "router-admin-token"
        with httpx.Client(timeout=5, trust_env=False) as http:
            while not self._stop.wait(WATCH_SECONDS):
                try:
                    headers = {"Authorization": f"Bearer {token_file.read_text().strip()}"}
                    view = http.get(f"{self.bench.router_url}/admin/routes", headers=headers)
                    models = view.json()["models"]
                except (OSError, httpx.HTTPError, ValueError, KeyError):
                    continue
                weights = {model: {b["name"]: b["weight"] for b in backends}
                           for model, backends in models.items()}  # fmt: skip
                if not self.changes or self.changes[-1].weights != weights:
                    self.changes.append(Change(time.time(), weights))


class GateLog(logging.Handler):
    """The analyse task's verdict lines (`<model> at <w>%: pass|fail — ...`), with the moment
    each was logged: when a gate failed or passed."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.verdicts: list[tuple[float, str, str]] = []  # (at, model, verdict)
        logging.getLogger("prefect.task_runs").addHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        if match := GATE_LINE.match(record.getMessage()):
            self.verdicts.append((record.created, match["model"], match["verdict"]))

    def last(self, model: str, verdict: str, after: float) -> float:
        found = [at for at, m, v in self.verdicts if m == model and v == verdict and at >= after]
        if not found:
            raise RuntimeError(f"no `{verdict}` verdict was logged for {model}: {self.verdicts}")
        return found[-1]


@dataclass
class BenchHome:
    """A ROLLOUT_HOME, its profiles and mirror revisions, and which FAKE engine each release
    runs."""

    root: Path
    revisions: dict[str, str] = field(default_factory=dict)
    router_port: int = 0

    @property
    def home(self) -> Path:
        return self.root / "home"

    @property
    def router_url(self) -> str:
        return f"http://127.0.0.1:{self.router_port}"

    def publish(self, store: Any) -> None:
        from dev.demo_model import make_synthetic_repo

        # a, b: healthy canaries taking turns; c: every second answer a 500 (its one probe passes)
        for seed, name in enumerate(("a", "b", "c")):
            self.revisions[name] = make_synthetic_repo(store, REPO_ID, [SHARD_BYTES], seed=seed)

    def env(self, hub_url: str) -> dict[str, str]:
        from serving.core.procs import free_port

        self.router_port = free_port()
        models = self.root / "models"
        self._write_profiles(models)
        return {
            "ROLLOUT_HOME": str(self.home), "ROLLOUT_MODELS_DIR": str(models),
            "HF_ENDPOINT": hub_url, "ROLLOUT_ROUTER_PORT": str(self.router_port),
            "ROLLOUT_FAULT_ENGINES": json.dumps(self._fake_engines()),
        }  # fmt: skip

    def _write_profiles(self, models: Path) -> None:
        from serving.config.loader import DEFAULT_MODELS_DIR

        models.mkdir(parents=True)
        (models / "shared").symlink_to(DEFAULT_MODELS_DIR / "shared")
        base = yaml.safe_load((DEFAULT_MODELS_DIR / f"{MODEL}.yaml").read_text())
        base |= {"hub": {"repo": REPO_ID, "revision": "main"}, "probes": ["no-thinking"],
                 "startup_budget_seconds": 60}  # fmt: skip
        canary = {"gates": {"min_requests": 3, "max_error_rate": 0.05, "max_ttft_p50_ratio": 50,
                            "max_ttft_p99_ratio": 100},
                  "golden_prompts": [], "retire_grace_seconds": 1}  # fmt: skip
        for name, bake in ((MODEL, 1.5), (ABORT_MODEL, ABORT_BAKE_SECONDS)):
            steps = [{"weight": 50, "bake_seconds": bake}, {"weight": 100, "bake_seconds": 0}]
            profile = {**base, "name": name, "served_model_name": name,
                       "canary": {**canary, "steps": steps},
                       "volumes": {"weights": f"{name}-weights"}}  # fmt: skip
            (models / f"{name}.yaml").write_text(yaml.safe_dump(profile))

    def _fake_engines(self) -> dict[str, list[str]]:
        fake = str(PROJECT / "tests" / "fake_engine.py")
        engines = {}
        for model in (MODEL, ABORT_MODEL):
            for name, sha in self.revisions.items():
                release = f"{model}-{sha[:8]}"
                faults = {"error_rate": 0.5} if name == "c" else {}
                engines[release] = [sys.executable, fake, "--port", "{port}", "--name", release,
                                    "--config", json.dumps(faults)]  # fmt: skip
        return engines

    def rollout(self, model: str, revision: str) -> str:
        from flows.rollout import rollout

        return str(rollout(model, revision=revision, target="local").decision)

    def stable(self, model: str) -> str:
        from serving.platforms.local.platform import LocalPlatform

        stable = LocalPlatform.from_env().release_store().read(model).stable
        assert stable is not None
        return stable.revision

    def other(self, model: str) -> str:
        return next(sha for name, sha in self.revisions.items()
                    if name in "ab" and sha != self.stable(model))  # fmt: skip

    def promote_once(self, watch: RouterWatch, gates: GateLog) -> float:
        revision, started = self.other(MODEL), time.time()
        canary = f"{MODEL}-{revision[:8]}"
        expect(self.rollout(MODEL, revision), "promoted")
        passed = gates.last(MODEL, "pass", started)
        return watch.first(passed, MODEL, lambda w: w.get(canary) == 100) - passed

    def rollback_once(self, watch: RouterWatch, gates: GateLog) -> float:
        started, canary = time.time(), f"{MODEL}-{self.revisions['c'][:8]}"
        expect(self.rollout(MODEL, self.revisions["c"]), "rolled-back")
        failed = gates.last(MODEL, "fail", started)
        return watch.first(failed, MODEL, lambda w: w.get(canary, 0) == 0) - failed

    def abort_once(self, watch: RouterWatch) -> float:
        revision = self.other(ABORT_MODEL)
        canary = f"{ABORT_MODEL}-{revision[:8]}"
        aborted: list[float] = []

        def abort_when_serving() -> None:
            serving = watch.first(time.time(), ABORT_MODEL, lambda w: w.get(canary, 0) > 0)
            time.sleep(max(0.0, serving + ABORT_AFTER_SECONDS - time.time()))
            aborted.append(time.time())
            subprocess.run([sys.executable, "-m", "rollout.cli", "abort", ABORT_MODEL],
                           check=True, capture_output=True)  # fmt: skip

        aborter = threading.Thread(target=abort_when_serving)
        aborter.start()
        expect(self.rollout(ABORT_MODEL, revision), "rolled-back")
        aborter.join()
        return watch.first(aborted[0], ABORT_MODEL, lambda w: w.get(canary, 0) == 0) - aborted[0]


def expect(actual: str, wanted: str) -> None:
    if actual != wanted:
        raise RuntimeError(f"expected the rollout to end {wanted}, it ended {actual}")


if __name__ == "__main__":
    main()
