"""No-op paths: a refresh with no upstream change, and a rollout of the revision already stable.

Both should cost seconds, download nothing and start no engine. The baseline, measured in the
same run against the same real Prefect server, is an empty flow run: Prefect's own floor.

    .venv/bin/python bench/noop.py
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
MODEL = "smollm2-135m"
ROUNDS = 5


def timed(call: object) -> float:
    started = time.perf_counter()
    call()  # type: ignore[operator]
    return time.perf_counter() - started


def main() -> None:
    home = Path(tempfile.mkdtemp(prefix="rollout-bench-noop-"))
    os.environ |= {"ROLLOUT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                   "ROLLOUT_ROUTER_PORT": "8471"}  # fmt: skip
    from prefect import flow
    from prefect.testing.utilities import prefect_test_harness

    from dev.demo_model import publish_demo_model
    from dev.mirror import run_mirror
    from dev.mirror_store import MirrorStore

    store = MirrorStore(ROOT / ".rollout" / "demo" / "mirror")
    publish_demo_model(store)
    with prefect_test_harness(server_startup_timeout=60), run_mirror(store) as mirror:
        os.environ["HF_ENDPOINT"] = mirror.url
        from flows.refresh import refresh
        from flows.rollout import rollout
        from serving.config.loader import load_profile
        from serving.platforms.local.platform import LocalPlatform

        @flow(name="empty")
        def empty() -> None:
            """Prefect's floor: one flow run that does nothing."""

        platform = LocalPlatform.from_env()
        profile = load_profile(MODEL)
        try:
            first = rollout(MODEL)  # the stable release (main), not timed
            assert first.decision == "promoted", first.reason
            mirror.clear_requests()
            running_before = len(platform.running_releases(profile))
            results = {"empty flow (baseline)": [timed(empty) for _ in range(ROUNDS)]}
            noop_rollouts, noop_refreshes = [], []
            for _ in range(ROUNDS):
                noop_rollouts.append(timed(lambda: _expect(rollout(MODEL).decision, "no-op")))
                noop_refreshes.append(
                    timed(lambda: _expect(refresh(MODEL).action, "up-to-date"))
                )
            results["no-op rollout"] = noop_rollouts
            results["no-op refresh"] = noop_refreshes
            engines_started = len(platform.running_releases(profile)) - running_before
            downloads = [r for r in mirror.requests if "/resolve/" in r.path]
        finally:
            platform.stop_all()

    baseline = statistics.median(results["empty flow (baseline)"])
    print(f"{'path':24} {'median s':>9} {'max s':>7} {'x empty flow':>13}")
    for name, times in results.items():
        median = statistics.median(times)
        print(f"{name:24} {median:9.2f} {max(times):7.2f} {median / baseline:13.1f}")
    print(f"file downloads during no-ops: {len(downloads)}; engines started: {engines_started}; "
          f"hub calls: {len(mirror.requests)} (one cheap head lookup per run)")  # fmt: skip
    rollout_ok = max(results["no-op rollout"]) <= 10
    refresh_ok = max(results["no-op refresh"]) <= 5
    print(f"targets: no-op rollout <= 10 s {'MET' if rollout_ok else 'MISSED'}, "
          f"no-op refresh <= 5 s {'MET' if refresh_ok else 'MISSED'}")


def _expect(actual: str, expected: str) -> None:
    if actual != expected:
        raise SystemExit(f"expected {expected}, got {actual}")


if __name__ == "__main__":
    main()
