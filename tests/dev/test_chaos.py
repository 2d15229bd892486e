"""`make chaos` in CI: three seeded fault trials of a real local rollout, with FAKE engines
(tests/fake_engine.py) behind the real supervisor, router, flows and CLI, and the session's
Prefect server. The real demo model costs minutes per trial: that run is `make chaos`.

The run is `python -m dev.chaos` itself, in a process of its own: it makes itself the child
subreaper to count what killed orchestrators leave behind, which must not touch pytest.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from serving.core.home import REPO_ROOT

TRIALS = 3
# Seed 1 draws an orchestrator SIGTERM, a canary engine SIGKILL and an orchestrator SIGKILL:
# the last one's history line can only come from its run mark (serving.domain.records.RunMark).
SEED = 1
# A FAKE canary's flow, resolve to retire, as `python -m dev.chaos --engine fake` measured it
# on two busy cores (32 s; less when idle): CI skips that fault-free calibration run.
FLOW_SECONDS = 25
# Setup (a first release) plus three trials of two runs each.
CHAOS_TIMEOUT_SECONDS = 420
ROW = re.compile(r"^\s*\d+ [a-z-]+ ")


@pytest.mark.timeout(CHAOS_TIMEOUT_SECONDS + 30)
def test_three_seeded_faults_each_converge_with_nothing_left_behind(
    tmp_path: Path, prefect_server: str
) -> None:
    argv = [sys.executable, "-m", "dev.chaos", "--trials", str(TRIALS), "--seed", str(SEED),
            "--engine", "fake", "--home", str(tmp_path / "chaos"),
            "--prefect-api", prefect_server, "--flow-seconds", str(FLOW_SECONDS)]  # fmt: skip
    done = subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=CHAOS_TIMEOUT_SECONDS)  # fmt: skip
    report = f"{done.stdout}\n{done.stderr[-3000:]}"
    rows = [line for line in done.stdout.splitlines() if ROW.match(line)]
    assert len(rows) == TRIALS, report
    assert f"trials {TRIALS}, converged {TRIALS}," in done.stdout, report
    assert done.returncode == 0, report
