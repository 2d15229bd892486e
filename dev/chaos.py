"""`make chaos`: kill a local rollout anywhere, N times, and show that it converges.

    python -m dev.chaos [--trials 20] [--seed 1] [--engine real|fake] [--prefect-api URL]

Setup: a fresh world (dev/chaos_world.py), v1 rolled out as the first release, then v2 as a
canary without a fault, which measures how long a whole rollout takes. Each trial then rolls
out the revision that is not stable (every trial is a real canary) with `rollout run`, under
steady `openai` SDK load through the router, and fires one fault (dev/chaos_faults.py) at a
uniformly random moment of that flow's duration (resolve to retire; the CLI's start-up
before it is not drawn over). A recovery run of the same revision follows; then
the invariants (dev/chaos_checks.py) give one table row. Exit 1 if any trial did not converge.

Without --prefect-api (or PREFECT_API_URL), each `rollout run` serves Prefect's API in its own
process, as it does for users (rollout/orchestration.py): whatever a killed run leaves running
is counted, a Prefect server included.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import openai

from dev.chaos_checks import (
    Check,
    become_subreaper,
    check,
    clients_check,
    failure_causes,
    kill_leftovers,
    reap_orphans,
)
from dev.chaos_faults import (
    FAULT_KINDS,
    FaultKind,
    Rollout,
    Shot,
    fire,
    fresh_results,
    mirror_settled,
    wrap,
)
from dev.chaos_world import Engine, World, open_world, orchestrator_env
from dev.load import ChatLoad
from serving.core.home import REPO_ROOT

DEFAULT_HOME = REPO_ROOT / ".rollout" / "chaos"
DEFAULT_TRIALS = 20
DEFAULT_SEED = 1
# A rollout that has not ended in this long is hung: it is killed and the trial fails.
RUN_TIMEOUT_SECONDS = 15 * 60
CLIENTS = {"real": 3, "fake": 2}
# Clients as users run them: the openai SDK's default retries (a connection reset while a
# SIGKILLed router's requests were in flight is retried, as it is for any SDK user). Each
# retried attempt is still shown, by cause, under the table.
CLIENT_RETRIES = openai.DEFAULT_MAX_RETRIES
# FAKE engines answer at once: a pause keeps two clients from taking the CPU's every cycle.
CLIENT_PAUSE_SECONDS = {"real": 0.0, "fake": 0.1}
DECISIONS = ("promoted", "rolled-back", "no-op")
POLL_SECONDS = 0.1
OUTCOME_CHARS = 60


@dataclass
class Run:
    """One orchestrator's end, as its caller saw it."""

    outcome: str
    seconds: float
    decided: bool  # it ended with a rollout decision


@dataclass
class Row:
    index: int
    kind: FaultKind
    shot: Shot
    interrupted: Run
    recovery: Run
    checks: list[Check]
    sent: int
    causes: Counter[str] = field(default_factory=Counter)
    retried: Counter[str] = field(default_factory=Counter)  # attempts the SDK retried

    @property
    def converged(self) -> bool:
        return self.recovery.decided and all(c.ok for c in self.checks)


# -- orchestrators -----------------------------------------------------------------------------


def start(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[str]:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.with_suffix(".out").open("w") as out, log.with_suffix(".err").open("w") as err:
        return subprocess.Popen(argv, cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL,
                                stdout=out, stderr=err, text=True)  # fmt: skip


def finish(process: subprocess.Popen[str], log: Path, started: float) -> Run:
    try:
        process.wait(RUN_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        return Run(f"hung; killed after {RUN_TIMEOUT_SECONDS}s", RUN_TIMEOUT_SECONDS, False)
    seconds = time.monotonic() - started
    if process.returncode < 0:
        return Run(f"killed ({signal.Signals(-process.returncode).name})", seconds, False)
    for line in reversed(log.with_suffix(".out").read_text().splitlines()):
        try:
            decision = json.loads(line)["decision"]
        except (ValueError, KeyError, TypeError):
            continue
        return Run(decision, seconds, decision in DECISIONS)
    said = [line for line in log.with_suffix(".err").read_text().splitlines()
            if line.startswith("rollout:")]  # fmt: skip
    return Run(said[-1][:OUTCOME_CHARS] if said else f"exit {process.returncode}", seconds, False)


def run_began(world: World, process: subprocess.Popen[str]) -> tuple[float, str] | None:
    """When the orchestrator's flow run marked itself begun in the release record (its first
    task does), and that run's id; None if it ended before."""
    store = world.platform.release_store()
    before = store.read(world.profile.name).run
    while True:
        ended = process.poll() is not None
        mark = store.read(world.profile.name).run
        if mark is not None and mark != before:
            return time.monotonic(), mark.flow_run_id
        if ended:
            return None
        time.sleep(POLL_SECONDS)


def run_to_end(world: World, revision: str, log: Path) -> Run:
    started = time.monotonic()
    process = start(world.rollout_argv(revision), orchestrator_env(world), log)
    return finish(process, log, started)


# -- one trial ---------------------------------------------------------------------------------


def trial(world: World, load: ChatLoad, index: int, kind: FaultKind, moment: float) -> Row:
    revision = world.not_stable()
    window = time.time()
    logs = world.home / "chaos" / f"trial-{index:02d}"

    argv = wrap(kind, world, world.rollout_argv(revision))
    env = orchestrator_env(world) | fresh_results(kind, world, index)
    started = time.monotonic()
    process = start(argv, env, logs / "interrupted")
    began = run_began(world, process)
    if began is None:
        shot = Shot(False, 0.0, "the run ended before its flow began")
    else:
        rollout = Rollout(world, process, began[0], revision)
        shot = fire(kind, rollout, moment)
    interrupted = finish(process, logs / "interrupted", started)
    if began is not None:
        time.sleep(mirror_settled(kind, shot, rollout))

    recovery = run_to_end(world, revision, logs / "recovery")
    reap_orphans()
    verdict = check(world, began[1] if began else None)
    kill_leftovers(verdict.leftovers)
    results = load.since(window, time.time())
    causes = failure_causes(results)
    checks = [*verdict.checks, clients_check(causes)]
    retried = Counter(cause for result in results for cause in result.retried)
    return Row(index, kind, shot, interrupted, recovery, checks, len(results), causes, retried)


def schedule(trials: int, seed: int, rollout_seconds: float,
             faults: tuple[FaultKind, ...]) -> list[tuple[FaultKind, float]]:  # fmt: skip
    """Faults drawn without replacement (every kind once per len(faults) trials), each at a
    uniformly random moment of a whole rollout."""
    rng = random.Random(seed)
    kinds: list[FaultKind] = []
    while len(kinds) < trials:
        kinds += rng.sample(faults, len(faults))
    return [(kind, rng.uniform(0, rollout_seconds)) for kind in kinds[:trials]]


# -- the table ---------------------------------------------------------------------------------

HEADER = (f"{'#':>2} {'fault':<21} {'at':>5} {'interrupted run':<28} {'recovery':<12} "
          f"{'rec s':>5}  canary router procs dl  hist clients  requests")  # fmt: skip


def render(row: Row) -> str:
    marks = " ".join(f"{'ok' if c.ok else 'FAIL':<{width}}"
                     for c, width in zip(row.checks, (6, 6, 5, 3, 4, 7), strict=True))  # fmt: skip
    at = f"{row.shot.at:4.0f}s" if row.shot.landed else "miss"
    failed = sum(row.causes.values())
    return (f"{row.index:>2} {row.kind:<21} {at:>5} {row.interrupted.outcome[:28]:<28} "
            f"{row.recovery.outcome[:12]:<12} {row.recovery.seconds:5.0f}  {marks} "
            f"{row.sent - failed}/{row.sent}")  # fmt: skip


def explain(row: Row) -> list[str]:
    lines = [f"   {row.index}: fault: {row.shot.note}"]
    if row.causes:
        failed = ", ".join(f"{count} {cause}" for cause, count in row.causes.most_common())
        lines.append(f"   {row.index}: client requests failed: {failed}")
    if row.retried:
        retried = ", ".join(f"{count} {cause}" for cause, count in row.retried.most_common())
        lines.append(f"   {row.index}: attempts the SDK retried (the user saw the retry's "
                     f"answer): {retried}")  # fmt: skip
    if not row.recovery.decided:
        lines.append(f"   {row.index}: recovery run: {row.recovery.outcome}")
    # The clients' check is the causes line above.
    lines += [f"   {row.index}: {c.name}: {c.detail}" for c in row.checks
              if not c.ok and c.name != "clients"]  # fmt: skip
    return lines


def summary(rows: list[Row]) -> str:
    sent = sum(row.sent for row in rows)
    causes = sum((row.causes for row in rows), Counter())
    failed = sum(causes.values())
    split = ", ".join(f"{count} {cause}" for cause, count in causes.most_common())
    retried = sum((row.retried for row in rows), Counter())
    worst = max((row.recovery.seconds for row in rows), default=0.0)
    return (f"trials {len(rows)}, converged {sum(row.converged for row in rows)}, "
            f"client requests sent {sent} / failed {failed}{f' ({split})' if split else ''}, "
            f"attempts retried by the SDK {sum(retried.values())}, "
            f"worst recovery {worst:.0f}s")  # fmt: skip


# -- main --------------------------------------------------------------------------------------


def setup(world: World, flow_seconds: float | None) -> float:
    """v1 as the first release, then (unless `flow_seconds` is given) v2 as a canary with no
    fault: how long a rollout's flow takes, from its first stage to its last."""
    v1, v2 = world.revisions
    logs = world.home / "chaos" / "setup"
    first = run_to_end(world, v1, logs / "first")
    if first.outcome != "promoted":
        raise SystemExit(f"chaos: the first release did not come up: {first.outcome} "
                         f"(logs: {logs})")  # fmt: skip
    if flow_seconds is not None:
        return flow_seconds
    router = world.platform.router_url(world.profile)
    with ChatLoad(router, world.profile.served_model_name, workers=CLIENTS[world.engine],
                  pause_s=CLIENT_PAUSE_SECONDS[world.engine]):  # fmt: skip
        log = logs / "calibration"
        process = start(world.rollout_argv(v2), orchestrator_env(world), log)
        began = run_began(world, process)
        canary = finish(process, log, began[0] if began else time.monotonic())
    if not canary.decided:
        raise SystemExit(f"chaos: the fault-free canary did not end: {canary.outcome} "
                         f"(logs: {logs})")  # fmt: skip
    return canary.seconds


def chaos(trials: int, seed: int, engine: Engine, home: Path, prefect_api: str | None,
          flow_seconds: float | None, faults: tuple[FaultKind, ...]) -> int:  # fmt: skip
    become_subreaper()
    with open_world(home, engine, prefect_api) as world:
        rollout_seconds = setup(world, flow_seconds)
        print(f"chaos: {trials} trials, seed {seed}, {engine} engines; faults drawn over "
              f"{rollout_seconds:.0f}s of a rollout's flow; logs in {world.home / 'chaos'}",
              flush=True)  # fmt: skip
        print(HEADER, flush=True)
        rows: list[Row] = []
        router = world.platform.router_url(world.profile)
        with ChatLoad(router, world.profile.served_model_name, workers=CLIENTS[engine],
                      pause_s=CLIENT_PAUSE_SECONDS[engine],
                      max_retries=CLIENT_RETRIES) as load:  # fmt: skip
            plan = schedule(trials, seed, rollout_seconds, faults)
            for index, (kind, moment) in enumerate(plan, 1):
                row = trial(world, load, index, kind, moment)
                rows.append(row)
                print(render(row), flush=True)
        for row in rows:
            if not row.converged or row.causes or row.retried:
                print("\n".join(explain(row)))
        print(summary(rows), flush=True)
    return 0 if all(row.converged for row in rows) else 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=DEFAULT_TRIALS)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--engine", choices=["real", "fake"], default="real",
                        help="real: the demo model; fake: tests/fake_engine.py (CI)")
    parser.add_argument("--home", type=Path, default=DEFAULT_HOME)
    parser.add_argument("--prefect-api", default=os.environ.get("PREFECT_API_URL"),
                        help="a running Prefect API for every run (default: PREFECT_API_URL)")
    parser.add_argument("--flow-seconds", type=float,
                        help="a rollout flow's duration, measured before: no fault-free canary")
    parser.add_argument("--faults", default=",".join(FAULT_KINDS),
                        help="the kinds to draw from, comma-separated (default: all)")
    args = parser.parse_args()
    if args.trials < 1:
        parser.error("--trials must be at least 1")
    faults = tuple(kind for kind in FAULT_KINDS if kind in args.faults.split(","))
    if unknown := set(args.faults.split(",")) - set(FAULT_KINDS):
        parser.error(f"unknown fault kinds {sorted(unknown)}; known: {', '.join(FAULT_KINDS)}")
    sys.exit(chaos(args.trials, args.seed, args.engine, args.home, args.prefect_api,
                   args.flow_seconds, faults))  # fmt: skip


if __name__ == "__main__":
    main()
