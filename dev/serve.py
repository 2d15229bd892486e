"""`make serve`: the flows as deployments on this machine, with schedules firing.

Starts, and stops on Ctrl-C (with every release it served):
  1. a Prefect server (schedules need a real one; the ephemeral API runs no scheduler),
  2. the `rollout` process work pool and every deployment of prefect.yaml, with the schedules
     of only what this machine can run: the local target's; the Modal targets' only with
     --hub (the real Hub, and a Modal token on this machine),
  3. a worker for the pool,
  4. unless --hub is given, the local Hugging Face mirror with the demo model's two revisions,
     so `prefect deployment run rollout/smollm2-135m` works with no network at all.

    prefect deployment run rollout/smollm2-135m          # from another shell, with:
    export PREFECT_API_URL=http://127.0.0.1:4200/api
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from dev.demo_model import publish_demo_model
from dev.mirror_store import MirrorStore
from rollout.orchestration import serve_api_url
from serving.core.home import rollout_home
from serving.core.procs import stop_group
from serving.platforms.local.platform import LocalPlatform

ROOT = Path(__file__).resolve().parent.parent
HOME = rollout_home()
MIRROR_PORT = 4280
# The targets whose scheduled runs can succeed here.
RUNNABLE = frozenset({"local"})
RUNNABLE_WITH_HUB = frozenset({"local", "modal"})
STARTUP_SECONDS = 90
# What the Prefect server, the worker and the mirror get to exit on SIGTERM.
STOP_SECONDS = 20.0
# The worker looks for runs to start every second, not every 10 s (Prefect's default): a
# `prefect deployment run` otherwise waits 5 s on average before anything happens.
WORKER_ENV = {"PREFECT_WORKER_QUERY_SECONDS": "1"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--hub", action="store_true", help="the real Hub, not the mirror; schedule Modal targets"
    )
    args = parser.parse_args()

    api_url = serve_api_url()  # where `rollout prep|run` look for this server
    env = {
        **os.environ,
        "PREFECT_API_URL": api_url,
        "PREFECT_HOME": str(HOME / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "ROLLOUT_HOME": str(HOME),
        # Releases outlive the worker's flow-run subprocess: the next rollout compares to them.
        "ROLLOUT_KEEP_SERVING": "1",
    }
    processes: list[subprocess.Popen[bytes]] = []
    # Ctrl-C or SIGTERM ends the wait below, and the finally block always stops the children
    # (they run in their own sessions, so nothing else would).
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    try:
        if not args.hub:
            store = MirrorStore(HOME / "mirror")
            revisions = publish_demo_model(store)
            mirror = [sys.executable, "-m", "dev.mirror", "--root", str(store.root),
                      "--port", str(MIRROR_PORT)]  # fmt: skip
            processes.append(_start(mirror, env))
            env["HF_ENDPOINT"] = f"http://127.0.0.1:{MIRROR_PORT}"
            print(f"mirror: {revisions.repo_id} v1={revisions.v1[:8]} v2={revisions.v2[:8]}")
        port = str(httpx.URL(api_url).port)
        processes.append(_start([sys.executable, "-m", "prefect", "server", "start",
                                 "--port", port], env))  # fmt: skip
        _wait_healthy(f"{api_url}/health")
        _run([sys.executable, "-m", "prefect", "work-pool", "create", "rollout",
              "--type", "process", "--overwrite"], env)  # fmt: skip
        paused = deploy(env, runnable=RUNNABLE_WITH_HUB if args.hub else RUNNABLE)
        if paused:
            print(f"schedules paused (no Modal here; --hub schedules them): {', '.join(paused)}")
        processes.append(_start([sys.executable, "-m", "prefect", "worker", "start",
                                 "--pool", "rollout"], env | WORKER_ENV))  # fmt: skip
        print(f"\nserving. In another shell:\n  export PREFECT_API_URL={api_url}\n"
              "  prefect deployment run rollout/smollm2-135m\n"
              "(Ctrl-C stops everything)")  # fmt: skip
        while not stop.wait(1) and all(process.poll() is None for process in processes):
            pass
    finally:
        for process in reversed(processes):
            stop_group(process, STOP_SECONDS)
        # Releases were kept serving between flow runs; with the server gone, nothing stays.
        LocalPlatform(HOME).stop_all()


def deploy(env: dict[str, str], runnable: frozenset[str]) -> list[str]:
    """Every deployment of prefect.yaml, each schedule active only if its `target` is one this
    machine runs (an hourly refresh of a Modal model fails every hour on a laptop). The names
    of the deployments whose schedules were paused; they still run when asked to."""
    _run([sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all"], env)
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    paused = []
    with temporary_settings(updates={PREFECT_API_URL: env["PREFECT_API_URL"]}), \
            get_client(sync_client=True) as client:  # fmt: skip
        for deployment in client.read_deployments():
            target = deployment.parameters.get("target", "local")
            active = [schedule for schedule in deployment.schedules if schedule.active]
            if target in runnable or not active:
                continue
            for schedule in active:
                client.update_deployment_schedule(deployment.id, schedule.id, active=False)
            paused.append(deployment.name)
    return sorted(paused)


def _start(argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(argv, env=env, cwd=ROOT, start_new_session=True)


def _run(argv: list[str], env: dict[str, str]) -> None:
    subprocess.run(argv, env=env, cwd=ROOT, check=True)


def _wait_healthy(url: str) -> None:
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"serve: the Prefect server did not answer {url} in {STARTUP_SECONDS} s")


if __name__ == "__main__":
    main()
