"""The CLI's Prefect start-up: time to first work, and what a SIGKILL leaves behind.

With no PREFECT_API_URL, the baseline is what `rollout prep` did before: the flow called
directly, so Prefect starts its temporary server (a uvicorn subprocess). The project is
`rollout prep` itself. Each round starts one, times it until its first Hub call reaches the
mirror (resolve: the first work), SIGKILLs that one process as `kill -9` would, and counts the
processes it started that are still alive a few seconds later. The CLI looks for `make serve`
on a port where nothing listens, so a server someone runs on 4200 does not stand in.

    .venv/bin/python bench/cli_start.py
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
MODEL = "smollm2-135m"
ROUNDS = 5
FIRST_WORK_TIMEOUT_SECONDS = 180.0
# Time for an orphan to show itself: a server that dies with its parent is gone well before.
ORPHAN_GRACE_SECONDS = 3.0
POLL_SECONDS = 0.02
MARK = "ROLLOUT_BENCH_MARK"
BASELINE = "flow + Prefect's temporary server (baseline)"

MODES = {
    BASELINE: [sys.executable, "-c", f"from flows.prep import prep; prep({MODEL!r})"],
    "rollout prep": [sys.executable, "-m", "rollout.cli", "prep", MODEL],
}


class Round(NamedTuple):
    first_work: float  # seconds from start to the first Hub call
    left_behind: int  # processes alive after the SIGKILL


def main() -> None:
    from dev.demo_model import make_synthetic_repo
    from dev.mirror import run_mirror
    from dev.mirror_store import KiB, MirrorStore
    from rollout.orchestration import SERVE_PORT_ENV
    from serving.config.loader import load_profile
    from serving.core.procs import free_port

    scratch = Path(tempfile.mkdtemp(prefix="rollout-bench-cli-"))
    store = MirrorStore(scratch / "mirror")
    profile = load_profile(MODEL)
    make_synthetic_repo(store, profile.hub.repo, [16 * KiB], branch=profile.hub.revision)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "HF_"))}
    # One Prefect home for every round, warmed by an untimed round of each mode: a user's
    # database is migrated once, not per command. The temporary server's default 20 s to
    # start is too short for a first migration on a busy machine.
    env |= {
        "PREFECT_HOME": str(scratch / "prefect"),
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
        "HF_HOME": str(scratch / "hf"),
        "PYTHONPATH": str(ROOT),
        SERVE_PORT_ENV: str(free_port()),
    }
    rounds: dict[str, list[Round]] = {name: [] for name in MODES}
    with run_mirror(store) as mirror:
        env["HF_ENDPOINT"] = mirror.url
        for warm in [True] + [False] * ROUNDS:
            for name, argv in MODES.items():
                mirror.clear_requests()
                measured = _round(name, argv, env, scratch, lambda: bool(mirror.requests))
                if not warm:
                    rounds[name].append(measured)

    baseline = statistics.median(r.first_work for r in rounds[BASELINE])
    print(f"{'mode':46} {'first work s':>12} {'max s':>6} {'x baseline':>10}  left after kill -9")
    for name, measured in rounds.items():
        times = [r.first_work for r in measured]
        median, left = statistics.median(times), sum(r.left_behind for r in measured)
        print(f"{name:46} {median:12.2f} {max(times):6.2f} {median / baseline:10.2f}  "
              f"{left} processes after {ROUNDS} kills")  # fmt: skip


def _round(
    name: str, argv: list[str], env: dict[str, str], scratch: Path, worked: Callable[[], bool]
) -> Round:
    from serving.core.procs import wait_for

    mark = uuid.uuid4().hex
    log = scratch / f"{mark}.log"
    started = time.perf_counter()
    with log.open("wb") as out:
        process = subprocess.Popen(
            argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
            env=env | {MARK: mark, "ROLLOUT_HOME": str(scratch / f"home-{mark}")},
        )  # fmt: skip
    if not wait_for(lambda: worked() or process.poll() is not None,
                    FIRST_WORK_TIMEOUT_SECONDS, POLL_SECONDS):  # fmt: skip
        raise SystemExit(f"{name}: no Hub call in {FIRST_WORK_TIMEOUT_SECONDS} s")
    if not worked():
        raise SystemExit(f"{name}: exited {process.returncode} before any work:\n"
                         f"{log.read_text()[-3000:]}")  # fmt: skip
    first_work = time.perf_counter() - started
    process.send_signal(signal.SIGKILL)
    process.wait()
    time.sleep(ORPHAN_GRACE_SECONDS)
    orphans = _marked(mark)
    for pid in orphans:  # the baseline's: a bench leaves nothing behind either
        os.kill(pid, signal.SIGKILL)
    return Round(first_work, len(orphans))


def _marked(mark: str) -> list[int]:
    """Live processes whose environment carries this round's mark: what the round started."""
    needle = f"{MARK}={mark}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


if __name__ == "__main__":
    main()
