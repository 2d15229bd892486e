"""A rollout interrupted on the local target: its orchestrator killed or terminated, a run
that fails before its canary, `rollout abort`, engines overloaded past a gate's patience. Real
Prefect, engines, router and HTTP load (the tiny-chat world: tests/flows/tiny_chat_fixtures.py).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterId,
)
from prefect.events import Event
from prefect.events.filters import (
    EventFilter,
    EventNameFilter,
    EventOccurredFilter,
    EventResourceFilter,
)

from flows.rollout import rollout
from serving.config.loader import load_profile
from serving.core.procs import wait_for
from serving.domain.release import release_id
from serving.engines.engine import FAULT_ENGINES_ENV
from serving.platforms.local.platform import LocalPlatform
from tasks.release import analyse_canary, bake, deploy_canary, promote, rollback, set_weight
from tests.flows.tiny_chat_fixtures import (
    EVENTS_PAGE,
    MODEL,
    OVERLOADED_MODEL,
    QUIET_MODEL,
    ROOT,
    history,
    inject_fake_engines,
    router,
)
from tests.local_fixtures import processes_under


@contextmanager
def rollout_of_v2_in_another_process(
    argv: list[str], api_url: str, stdout: int = subprocess.DEVNULL
) -> Iterator[subprocess.Popen[str]]:
    """Start `argv` (a rollout of v2) with a 120 s first bake, so it is surely mid-canary;
    yield it once its canary is deployed. The profile's bake is restored on the way out."""
    profile_path = Path(os.environ["ROLLOUT_MODELS_DIR"]) / f"{MODEL}.yaml"
    original = profile_path.read_text()
    slow = yaml.safe_load(original)
    slow["canary"]["steps"][0]["bake_seconds"] = 120
    profile_path.write_text(yaml.safe_dump(slow))
    env = {**os.environ, "PREFECT_API_URL": api_url}
    child = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=stdout,
                             stderr=subprocess.DEVNULL, text=True)  # fmt: skip
    try:
        store = LocalPlatform.from_env().release_store()
        deadline = time.monotonic() + 120
        while store.read(MODEL).canary is None and time.monotonic() < deadline:
            time.sleep(0.5)
        assert store.read(MODEL).canary is not None
        yield child
    finally:
        profile_path.write_text(original)
        if child.poll() is None:
            child.kill()
            child.wait()


ROLLOUT_V2 = [sys.executable, "-c", f"from flows.rollout import rollout; rollout({MODEL!r}, 'v2')"]


def assert_stable_alone(revision: str) -> None:
    """v1 is stable with all the traffic, no canary is recorded or running."""
    record = LocalPlatform.from_env().release_store().read(MODEL)
    assert record.canary is None and record.stable is not None
    assert record.stable.revision == revision
    running = LocalPlatform.from_env().running_releases(load_profile(MODEL))
    assert [release.id for release in running] == [record.stable.id]
    routes = json.loads((Path(os.environ["ROLLOUT_HOME"]) / "state" / "routes.json").read_text())
    assert [(b["name"], b["weight"]) for b in routes["models"][MODEL] if b["weight"]] == [
        (record.stable.id, 100)
    ]


def test_killed_orchestrator_mid_canary_is_reconciled_by_the_next_run(
    tiny_home: Path, tiny_revisions: dict[str, str], prefect_server: str
) -> None:
    rollout(MODEL, "v1")
    canary_dir = tiny_home / "releases" / release_id(load_profile(MODEL), tiny_revisions["v2"])
    with rollout_of_v2_in_another_process(ROLLOUT_V2, prefect_server) as child:
        time.sleep(2)  # into the bake
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert processes_under(canary_dir)  # the orphaned canary is still running

    report = rollout(MODEL, "v1")  # the next run
    assert report.decision == "no-op"
    assert processes_under(canary_dir) == []
    assert_stable_alone(tiny_revisions["v1"])
    assert any("reconciled" in why for _, why in history())
    # The killed run wrote no line of its own: the next run's reconcile wrote it for it.
    assert any(outcome == "failed" and why.startswith("interrupted: flow run")
               for outcome, why in history())  # fmt: skip
    # Killed, v2 was never judged: a refresh would roll it out again.
    assert LocalPlatform.from_env().release_store().read(MODEL).last_failed_revision() is None


def test_terminated_orchestrator_rolls_back_its_own_canary(
    tiny_home: Path, tiny_revisions: dict[str, str], prefect_server: str
) -> None:
    """SIGTERM (a worker stopping, a pod evicted): the transaction's rollback hook reverts."""
    rollout(MODEL, "v1")
    with rollout_of_v2_in_another_process(ROLLOUT_V2, prefect_server) as child:
        time.sleep(2)  # into the bake
        child.send_signal(signal.SIGTERM)
        child.wait(timeout=120)
    canary_dir = tiny_home / "releases" / release_id(load_profile(MODEL), tiny_revisions["v2"])
    assert processes_under(canary_dir) == []
    assert_stable_alone(tiny_revisions["v1"])
    outcome, why = history()[-1]
    assert outcome == "rolled-back", why
    assert why.startswith("the rollout stopped after its canary was deployed: TerminationSignal")


def test_a_run_that_fails_before_its_canary_still_leaves_a_line_in_the_history(
    tiny_home: Path, tiny_revisions: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A canary whose engine dies during startup: the deploy fails, no canary is recorded, and
    the failed flow run's hook writes its line (found missing by `make chaos`)."""
    rollout(QUIET_MODEL, "v1")
    canary = release_id(load_profile(QUIET_MODEL), tiny_revisions["v2"])
    dies_at_once = [sys.executable, "-c", "raise SystemExit(3)"]
    monkeypatch.setenv(FAULT_ENGINES_ENV, json.dumps({canary: dies_at_once}))
    state = rollout(QUIET_MODEL, tiny_revisions["v2"], return_state=True)
    assert state.is_failed()
    outcome, why = history(QUIET_MODEL)[-1]
    assert outcome == "failed" and "DeployFailed" in why, why
    record = LocalPlatform.from_env().release_store().read(QUIET_MODEL)
    assert record.history[-1].flow_run_id == str(state.state_details.flow_run_id)
    assert record.history[-1].revision == tiny_revisions["v2"]


def test_abort_rolls_back_a_running_canary_and_status_shows_it(
    tiny_home: Path, tiny_revisions: dict[str, str], prefect_server: str
) -> None:
    rollout(MODEL, "v1")
    began = datetime.now(UTC)
    env = {**os.environ, "PREFECT_API_URL": prefect_server}
    cli = [sys.executable, "-m", "rollout.cli"]
    run_v2 = [*cli, "run", MODEL, "--revision", "v2"]
    with rollout_of_v2_in_another_process(run_v2, prefect_server, subprocess.PIPE) as running:
        status = json.loads(subprocess.run([*cli, "status", MODEL, "--json"], cwd=ROOT,
                                           env=env, capture_output=True, text=True,
                                           timeout=60).stdout)  # fmt: skip
        assert status["canary"]["revision"] == tiny_revisions["v2"]
        assert status["stable"]["revision"] == tiny_revisions["v1"]
        aborted = subprocess.run([*cli, "abort", MODEL], cwd=ROOT, env=env,
                                 capture_output=True, text=True, timeout=120)  # fmt: skip
        assert aborted.returncode == 0 and "rolled back" in aborted.stdout
        output, _ = running.communicate(timeout=120)  # the run notices within a bake tick
    assert running.returncode == 1 and "rolled-back" in output
    assert history()[-1] == ("rolled-back", "aborted (rollout abort)")
    assert_stable_alone(tiny_revisions["v1"])
    # The run that lost its canary announced the abort, as a gate's rollback is announced.
    assert wait_for(lambda: [e.payload for e in rolled_back_events(MODEL, began)] == [
        {"revision": tiny_revisions["v2"], "reason": "aborted (rollout abort)"}
    ], timeout=30, interval=0.5), [e.payload for e in rolled_back_events(MODEL, began)]


def rolled_back_events(model: str, since: datetime) -> list[Event]:
    """The `rollout.rolled-back` events of a model the Prefect API stored since a moment."""
    with get_client(sync_client=True) as client:
        return client.read_events(EventFilter(
            occurred=EventOccurredFilter(since=since),
            event=EventNameFilter(name=["rollout.rolled-back"]),
            resource=EventResourceFilter(id=[f"rollout.model.{model}"]),
        ), limit=EVENTS_PAGE).events  # fmt: skip


@contextmanager
def open_loop(router_url: str, model: str, per_second: float) -> Iterator[None]:
    """Chats sent at a fixed rate whatever the answers (an open loop, as real clients are):
    engines that serve fewer grow queues without bound."""
    stop = threading.Event()
    body = {"model": model, "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}

    async def send(client: httpx.AsyncClient) -> None:
        with suppress(httpx.HTTPError):
            await client.post(f"{router_url}/v1/chat/completions", json=body)

    async def load() -> None:
        async with httpx.AsyncClient(timeout=None, limits=httpx.Limits(max_connections=None),
                                     trust_env=False) as client:  # fmt: skip
            sent = []
            while not stop.is_set():
                sent.append(asyncio.create_task(send(client)))
                await asyncio.sleep(1 / per_second)
            for request in sent:
                request.cancel()
            await asyncio.gather(*sent, return_exceptions=True)

    thread = threading.Thread(target=asyncio.run, args=(load(),))
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def test_overloaded_engines_end_the_gate_in_a_decision_and_nothing_runs_after_the_revert(
    tiny_home: Path, tiny_revisions: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both engines serve one request a second; clients send six: the golden prompt waits in
    their queues past its limit. Before: the analyse task raised, the transaction's hook
    retired the canary, Prefect retried analyse against it, and the flow run failed."""
    saturated = {"delay_s": 1.0, "capacity": 1}
    engines = {tiny_revisions["v1"]: saturated, tiny_revisions["v2"]: saturated}
    inject_fake_engines(monkeypatch, OVERLOADED_MODEL, engines)
    rollout(OVERLOADED_MODEL, "v1")
    with open_loop(router(OVERLOADED_MODEL), OVERLOADED_MODEL, per_second=6):
        state = rollout(OVERLOADED_MODEL, "v2", return_state=True)
    assert state.is_completed(), state.message
    report = state.result()
    assert report.decision == "rolled-back"
    assert "did not answer golden prompt 1 within 1 s" in report.reason, report.reason
    outcome, why = history(OVERLOADED_MODEL)[-1]
    assert (outcome, why) == ("rolled-back", report.reason)  # by decision, not by the hook
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(
            id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))  # fmt: skip
    assert runs and all(run.state is not None and run.state.is_completed() for run in runs)
    assert [run.name for run in runs if run.run_count != 1] == []  # no Prefect retry
    last = max(runs, key=lambda run: run.start_time or 0)
    assert last.name.startswith("rollback")


def test_no_task_inside_the_transaction_is_retried_by_prefect() -> None:
    """Its rollback hook retires the canary on the first failure: a retry would run after."""
    inside = (deploy_canary, set_weight, bake, analyse_canary, promote, rollback)
    assert {task.name: task.retries for task in inside} == {task.name: 0 for task in inside}
