"""Stable's latency at the router while a canary of the real demo model loads and runs its
probes, with three thread budgets for the local engines, in one run:

  per core    OMP/MKL/OpenBLAS threads = the host's cores for every engine (torch's default:
              what the issue saw), set in the environment, which the platform respects
  baseline    the code of --baseline (git archive), whatever budget it gives
  project     this working tree: the profile's resources.cpu capped by the shared cores

    .venv/bin/python bench/threads.py [--rate 1] [--rounds 2] [--baseline main]

Each config runs in a child process on the local platform (no Prefect): stable SmolLM2-135M
(`transformers serve`, dev/demo_model.py) takes all the traffic at a fixed open-loop rate; after
a quiet window alone, the canary (same weights, another revision) is deployed at 0%: its engine
loads and its probes run while stable serves. Reported: stable's answer times (from each
request's scheduled moment, so client-side queueing counts) alone and during that deploy.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from decisions import export
from openloop import OpenLoop, p50_p99

PROJECT = Path(__file__).resolve().parent.parent
MODEL = "smollm2-135m"
REVISION_STABLE = "a" * 40
REVISION_CANARY = "b" * 40
ALONE_SECONDS = 30.0
# Answers already due when a window closes may take this long to arrive.
SETTLE_SECONDS = 30.0
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=1.0, help="requests per second")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--baseline", default="main")
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)  # child: write here
    args = parser.parse_args()
    if args.measure is not None:
        args.measure.write_text(json.dumps(measure(args.rate)))
        return
    from dev.demo_model import build_demo_model

    weights = build_demo_model()  # once, before any child: every config uses the same files
    cores = str(len(os.sched_getaffinity(0)))
    results: dict[str, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-threads-") as scratch:
        baseline = Path(scratch) / "baseline"
        export(args.baseline, baseline)
        configs = {
            "per core": (PROJECT, dict.fromkeys(THREAD_ENV, cores)),
            f"baseline ({args.baseline})": (baseline, {}),
            "project": (PROJECT, {}),
        }
        for round_ in range(args.rounds):
            for name, (tree, extra) in configs.items():
                print(f"round {round_ + 1}: {name} ...", flush=True)
                out = Path(scratch) / "out.json"
                env = {**os.environ, **extra, "PYTHONPATH": str(tree),
                       "BENCH_DEMO_WEIGHTS": str(weights)}  # fmt: skip
                subprocess.run([sys.executable, __file__, "--measure", str(out),
                                "--rate", str(args.rate)], cwd=tree, env=env,
                               check=True)  # fmt: skip
                for window, seconds in json.loads(out.read_text()).items():
                    results.setdefault(name, {}).setdefault(window, []).extend(seconds)
    report(results, args.rate, cores)


def report(results: dict[str, dict[str, list[float]]], rate: float, cores: str) -> None:
    print(f"\nstable's answer time at {rate:g} req/s, {cores} cores (seconds)")
    print(f"{'config':20} {'window':22} {'n':>4} {'p50':>7} {'p99':>7} {'p99 vs per core':>16}")
    reference = results["per core"]
    for name, windows in results.items():
        for window in ("alone", "during canary deploy"):
            answers = windows.get(window, [])
            if not answers:
                print(f"{name:20} {window:22}    0")
                continue
            p50, p99 = p50_p99(answers)
            ratio = p99 / p50_p99(reference[window])[1] if reference.get(window) else 0.0
            print(f"{name:20} {window:22} {len(answers):4d} {p50:7.2f} {p99:7.2f} "
                  f"{ratio:15.2f}x")  # fmt: skip
        failed = windows.get("failed", [])
        deploys = windows.get("deploy seconds", [])
        print(f"{'':20} {len(failed)} failed answers; canary deploys took "
              f"{', '.join(f'{s:.0f}' for s in deploys)} s")  # fmt: skip


def measure(rate: float) -> dict[str, list[float]]:
    """In a child: one stable, one canary deploy under load; the windows' answer times."""
    from serving.config.layout import weights_dir
    from serving.config.loader import load_profile
    from serving.core.procs import free_port
    from serving.platforms.local.platform import LocalPlatform

    home = Path(tempfile.mkdtemp(prefix="bench-threads-home-"))
    platform = LocalPlatform(home, router_port=free_port())
    profile = load_profile(MODEL)
    for revision in (REVISION_STABLE, REVISION_CANARY):
        target = weights_dir(platform.volume(profile.volumes.weights), profile, revision)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(os.environ["BENCH_DEMO_WEIGHTS"], target_is_directory=True)
    try:
        stable = platform.deploy(profile, REVISION_STABLE)
        platform.set_traffic(profile, {stable.id: 100})
        with OpenLoop(platform.router_url(profile), profile.served_model_name, rate) as load:
            time.sleep(ALONE_SECONDS)
            started = time.time()
            platform.deploy(profile, REVISION_CANARY)
            ended = time.time()
            time.sleep(SETTLE_SECONDS)
        alone = load.since(started - ALONE_SECONDS / 2, started)  # past stable's warm-up
        during = load.since(started, ended)
        return {
            "alone": _seconds(alone, stable.id),
            "during canary deploy": _seconds(during, stable.id),
            "failed": [a.seconds for a in alone + during if a.status != 200],
            "deploy seconds": [ended - started],
        }
    finally:
        platform.stop_all()
        shutil.rmtree(home, ignore_errors=True)


def _seconds(answers: list[Any], backend: str) -> list[float]:
    return [a.seconds for a in answers if a.status == 200 and a.backend == backend]


if __name__ == "__main__":
    main()
