"""`prefect deployment run rollout/smollm2-135m` to the canary's first answer, for
bench/decisions.py: the real command, the real `rollout` deployment of prefect.yaml, a worker of
the `rollout` process pool started as `make serve` starts it, the weights already prepared.

Each run is split by what the Prefect API and the release's supervisor recorded:

  prefect CLI       the command, until it has created the flow run and exited
  worker pickup     until the flow run is Running (the worker's poll, its flow-run process, imports)
  before prep       reconcile and resolve
  prep (cached)     the prep subflow, every stage cached
  engine start      the engine's own start: spawned → /health answers (the supervisor's count)
  deploy, other     the rest of deploy-canary: supervisor start, probes, routing at 0%
  to first answer   set-weight, then the first request the router sends the canary
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from typing import Any
from uuid import UUID

DEPLOYMENT = "rollout/smollm2-135m"
FLOW_RUN_ID = re.compile(r"UUID: ([0-9a-f-]{36})")
RUN_TIMEOUT_SECONDS = 300.0
POLL_SECONDS = 0.2
WORKER_STOP_SECONDS = 20.0


class DeployRuns:
    def __init__(self, bench: Any, model: str, api_url: str, load: Any) -> None:
        self.bench, self.model, self.load = bench, model, load
        self.env = {**os.environ, "PREFECT_API_URL": api_url, "ROLLOUT_KEEP_SERVING": "1"}

    def measure(self, runs: int) -> dict[str, list[float]]:
        self._prefect("work-pool", "create", "rollout", "--type", "process", "--overwrite")
        self._prefect("--no-prompt", "deploy", "--name", DEPLOYMENT)
        worker = self._start_worker()
        results: dict[str, list[float]] = {}
        try:
            for _ in range(runs):
                for name, seconds in self._once().items():
                    results.setdefault(f"deploy: {name}", []).append(seconds)
        finally:
            worker.terminate()
            try:
                worker.wait(WORKER_STOP_SECONDS)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()
        return results

    def _start_worker(self) -> subprocess.Popen[bytes]:
        import dev.serve

        # The settings `make serve` gives its worker (none in trees older than this bench).
        env = self.env | getattr(dev.serve, "WORKER_ENV", {})
        log = (self.bench.root / "worker.log").open("ab")
        return subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool",
                                 "rollout"], env=env, stdout=log, stderr=log)  # fmt: skip

    def _prefect(self, *args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "prefect", *args], env=self.env,
                              capture_output=True, text=True)  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"prefect {' '.join(args)}: {done.stdout[-2000:]}{done.stderr}")
        return done.stdout

    def _once(self) -> dict[str, float]:
        from serving.platforms.local.release_events import events_path, last_event

        revision = self.bench.other(self.model)
        canary = f"{self.model}-{revision[:8]}"
        started = time.time()
        out = self._prefect("deployment", "run", DEPLOYMENT, "-p", f"revision={revision}")
        created = time.time()
        match = FLOW_RUN_ID.search(out)
        if match is None:
            raise RuntimeError(f"no flow run id in: {out}")
        first = self._first_answer(canary, started)
        run, tasks = self._finished(UUID(match[1]))
        ready = last_event(events_path(self.bench.home / "logs", canary))
        engine = ready.startup_seconds if ready is not None else None
        if engine is None:
            raise RuntimeError(f"{canary}: no ready event with its startup time")
        prep, deploy = tasks["prep"], tasks["deploy-canary"]
        return {
            "total": first - started,
            "prefect CLI": created - started,
            "worker pickup": run.start_time.timestamp() - created,
            "before prep": prep[0] - run.start_time.timestamp(),
            "prep (cached)": prep[1] - prep[0],
            "engine start": engine,
            "deploy, other": deploy[1] - deploy[0] - engine,
            "to first answer": first - deploy[1],
        }

    def _first_answer(self, canary: str, after: float) -> float:
        deadline = time.time() + RUN_TIMEOUT_SECONDS
        while time.time() < deadline:
            if (answer := self.load.first_from(canary, after)) is not None:
                return float(answer.scheduled)
            time.sleep(POLL_SECONDS)
        raise TimeoutError(f"{canary} answered nothing within {RUN_TIMEOUT_SECONDS:g} s")

    def _finished(self, flow_run_id: UUID) -> tuple[Any, dict[str, tuple[float, float]]]:
        """The flow run once final, and its task runs' (start, end) by task name."""
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

        with get_client(sync_client=True) as client:
            deadline = time.time() + RUN_TIMEOUT_SECONDS
            run = client.read_flow_run(flow_run_id)
            while not (run.state and run.state.is_final()):
                if time.time() > deadline:
                    raise TimeoutError(f"flow run {flow_run_id} did not finish")
                time.sleep(POLL_SECONDS)
                run = client.read_flow_run(flow_run_id)
            if not run.state.is_completed():
                raise RuntimeError(f"flow run {flow_run_id}: {run.state.name}: "
                                   f"{run.state.message}")  # fmt: skip
            flow_filter = FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
            tasks = {
                task.name.rsplit("-", 1)[0]: (task.start_time.timestamp(),
                                              task.end_time.timestamp())
                for task in client.read_task_runs(flow_run_filter=flow_filter)
                if task.start_time and task.end_time
            }  # fmt: skip
        return run, tasks
