"""The local platform's serving part with real processes over real HTTP: `python -m
serving.supervisor` releases running `transformers serve` on the tiny model of
tests/server_fixtures.py, behind the real router (`python -m serving.router`).

Two revisions of the same tiny model are deployed once for the module; the traffic, crash and
drain tests run in that order against them. The orchestrator tests (shutdown, SIGKILL, keep)
each run an orchestrator process of their own in a home of their own.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from dev.load import ChatLoad
from serving.config.loader import load_profile
from serving.config.profile import Profile
from serving.core.errors import DeployFailed
from serving.core.procs import free_port, is_running, processes_in, wait_for
from serving.core.restarts import RestartPolicy
from serving.domain.analysis import Window
from serving.domain.interruptions import interrupted, router_restart_finding
from serving.domain.release import Release, release_id
from serving.platforms.local.platform import LocalPlatform
from serving.platforms.local.router_process import ADMIN_TOKEN_FILE, ROUTER_RECORD
from serving.platforms.local.routes import FileRouteStore
from tests.local_fixtures import (
    REVISION_A,
    REVISION_B,
    REVISION_C,
    Driver,
    chat_body,
    describe,
    inventory_pids,
    place_weights,
    platform_env,
    processes_under,
    start_driver,
)
from tests.server_fixtures import DEMO_PROFILE, PASSABLE_PROFILE

# Fixtures are found by module attribute; the shared conftest.py stays untouched.

LOAD_WORKERS = 3
LOAD_LIMIT_SECONDS = 60.0
# Requests per traffic step: enough that a 10% or 50% split cannot be confused with another;
# an all-or-nothing step is exact, and fewer requests show it.
REQUESTS_PER_STEP = 80
REQUESTS_PER_EXACT_STEP = 30
# Generous: the machine may be shared with other benchmarks.
STEP_TIMEOUT_SECONDS = 20.0
# A stream this long takes ~2 s with the tiny model here: long enough to retire under it.
STREAM_TOKENS = 400
RETIRE_DRAIN_SECONDS = 30.0
GONE_SECONDS = 15.0
# A restart: the backoff, then a start (~4 s for the tiny engine, ~1 s for the router).
RESTART_SECONDS = 60.0
# The first restart waits this long: short, so the tests do not wait out a real backoff.
TEST_BACKOFF_SECONDS = 0.2


@dataclass
class Deployed:
    platform: LocalPlatform
    profile: Profile
    a: Release
    b: Release

    @property
    def model(self) -> str:
        return self.profile.served_model_name

    @property
    def router(self) -> str:
        return self.platform.router_url(self.profile)

    def engine_pid(self, release: Release) -> int:
        record = self.platform.inventory.get(release.id)
        assert record is not None and record.engine_pid is not None
        return record.engine_pid

    def reported_weights(self) -> dict[str, int]:
        return self.platform._router().client().routes().weights(self.model)


def requests_for(weight: int) -> int:
    return REQUESTS_PER_EXACT_STEP if weight in (0, 100) else REQUESTS_PER_STEP


def all_gone(pids: list[int]) -> bool:
    return all(not is_running(pid, None) for pid in pids)


def failures(results: list) -> list:
    return [r for r in results if r.status != 200 or r.error]


# --------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def homes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The parent of every ROLLOUT_HOME of this module. At the end, nothing may run under it
    (checked like `ps` would: by working directory and command line)."""
    base = tmp_path_factory.mktemp("homes")
    yield base
    leftovers = processes_under(base)
    listing = describe(leftovers)
    for home in base.iterdir():
        LocalPlatform(home).stop_all()
    for pid in processes_under(base):
        os.kill(pid, signal.SIGKILL)
    assert not leftovers, f"processes survived the tests:\n{listing}"


@pytest.fixture(scope="module")
def models_env(models_dir_with_tiny_profile: Path) -> Iterator[Path]:
    # The supervisors load their profile by name from here, like the orchestrator.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ROLLOUT_MODELS_DIR", str(models_dir_with_tiny_profile))
        yield models_dir_with_tiny_profile


@pytest.fixture(scope="module")
def deployed(homes: Path, models_env: Path, tiny_model_dir: Path) -> Iterator[Deployed]:
    home = homes / "main"
    platform = LocalPlatform(
        home, router_port=free_port(),
        restarts=RestartPolicy(first_backoff_seconds=TEST_BACKOFF_SECONDS),
    )  # fmt: skip
    profile = load_profile(PASSABLE_PROFILE, models_env)
    for revision in (REVISION_A, REVISION_B):
        place_weights(home, profile, revision, tiny_model_dir)
    try:
        a = platform.deploy(profile, REVISION_A)
        b = platform.deploy(profile, REVISION_B)
        yield Deployed(platform, profile, a, b)
    finally:
        platform.shutdown()


# --------------------------------------------------------------------------------------------
# Deploy, traffic, crash, drain (in this order, on the module's two releases)
# --------------------------------------------------------------------------------------------


def test_releases_start_at_zero_traffic_and_answer_to_the_served_name(
    deployed: Deployed,
) -> None:
    a, b = deployed.a, deployed.b
    assert (a.id, b.id) == (
        release_id(deployed.profile, REVISION_A),
        release_id(deployed.profile, REVISION_B),
    )
    running = {release.id for release in deployed.platform.running_releases(deployed.profile)}
    assert running == {a.id, b.id}
    assert deployed.reported_weights() == {a.id: 0, b.id: 0}
    # The engine answers to the name clients send (not its weights path) ...
    direct = httpx.post(f"{a.url}/v1/chat/completions", json=chat_body(deployed.model), timeout=30)
    assert direct.status_code == 200, direct.text
    # ... and at 0% the router sends it nothing.
    routed = httpx.post(
        f"{deployed.router}/v1/chat/completions", json=chat_body(deployed.model), timeout=30
    )
    assert routed.status_code == 503


def test_each_engine_gets_its_share_of_the_cores(deployed: Deployed) -> None:
    """Two releases on one host: each engine's numeric thread pools get its profile's CPUs,
    at most the cores split between the two (a thread per core each oversubscribes the CPU)."""
    cores = len(os.sched_getaffinity(0))
    threads = max(1, min(int(deployed.profile.resources.cpu), cores // 2))
    for release in (deployed.a, deployed.b):
        environ = Path(f"/proc/{deployed.engine_pid(release)}/environ").read_bytes().split(b"\0")
        for pool in (b"OMP_NUM_THREADS", b"MKL_NUM_THREADS", b"OPENBLAS_NUM_THREADS"):
            assert pool + b"=" + str(threads).encode() in environ


def test_the_admin_token_stays_private(deployed: Deployed) -> None:
    home = deployed.platform.home
    token_file = home / "state" / ADMIN_TOKEN_FILE
    token = token_file.read_text().strip()
    assert len(token) >= 32
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    router = deployed.platform.inventory.get(ROUTER_RECORD)
    assert router is not None
    argv = Path(f"/proc/{router.pid}/cmdline").read_bytes()
    assert token.encode() not in argv
    for log in (home / "logs").iterdir():
        assert token not in log.read_text(errors="replace"), log
    assert token not in (home / "state" / "routes.json").read_text()
    # Without the token the admin API refuses.
    assert httpx.get(f"{deployed.router}/admin/routes", timeout=5).status_code == 401


def test_weights_move_under_load_without_a_failed_request(deployed: Deployed) -> None:
    platform, profile, a, b = deployed.platform, deployed.profile, deployed.a, deployed.b
    steps = [0, 10, 50, 100, 0]  # percent on b; a gets the rest
    windows: dict[int, list] = {}
    platform.set_traffic(profile, {a.id: 100})  # from "deployed at 0%" to serving
    load_started = time.time()
    with ChatLoad(
        deployed.router, deployed.model, workers=LOAD_WORKERS, limit_s=LOAD_LIMIT_SECONDS
    ) as load:
        for index, weight in enumerate(steps):
            platform.set_traffic(profile, {a.id: 100 - weight, b.id: weight})
            assert deployed.reported_weights() == {a.id: 100 - weight, b.id: weight}
            # Requests started after set_traffic returned see the new table.
            started = time.time()
            windows[index] = load.wait_for_requests(
                started, requests_for(weight), STEP_TIMEOUT_SECONDS
            )
    results = load.results

    assert not failures(results), failures(results)[:5]
    for index, weight in enumerate(steps):
        window = windows[index]
        assert len(window) >= requests_for(weight), (weight, len(window))
        share = sum(r.backend == b.id for r in window) / len(window)
        if weight in (0, 100):
            assert share == weight / 100, (weight, share)
        else:
            assert abs(share - weight / 100) < 0.25, (weight, share)  # 4.5 sd at 50%, n=80
    # The router measured the same traffic, per release, for the canary analysis.
    backends = platform.stats(profile, since=load_started)["backends"]
    assert backends[a.id]["requests"] > 0 and backends[b.id]["requests"] > 0
    assert backends[a.id]["errors"]["total"] == backends[b.id]["errors"]["total"] == 0


def test_a_killed_engine_comes_back_with_its_weight_and_costs_no_request(
    deployed: Deployed,
) -> None:
    """As Modal replaces a dead container: the supervisor restarts the engine on its port,
    the release keeps its weight, and the router sends its share to the other meanwhile."""
    platform, profile, a, b = deployed.platform, deployed.profile, deployed.a, deployed.b
    platform.set_traffic(profile, {a.id: 50, b.id: 50})
    victim = deployed.engine_pid(b)
    with ChatLoad(
        deployed.router, deployed.model, workers=LOAD_WORKERS, limit_s=LOAD_LIMIT_SECONDS
    ) as load:
        load.wait_for_requests(time.time(), 20, STEP_TIMEOUT_SECONDS)
        killed_at = time.time()
        os.kill(victim, signal.SIGKILL)
        assert wait_for(lambda: platform.engine_crashes(profile, b.id, killed_at) == 1,
                        GONE_SECONDS, 0.1)  # fmt: skip
        # While b restarts it stays a running release at its weight; a takes its share.
        assert b.id in {r.id for r in platform.running_releases(profile)}
        assert deployed.reported_weights() == {a.id: 50, b.id: 50}
        assert wait_for(lambda: deployed.engine_pid(b) != victim and _serves(deployed, b),
                        RESTART_SECONDS, 0.2)  # fmt: skip
        back_at = time.time()
        after = load.wait_for_requests(back_at, REQUESTS_PER_STEP, STEP_TIMEOUT_SECONDS)
    assert not failures(load.results), failures(load.results)[:5]
    assert {r.backend for r in after} == {a.id, b.id}  # b has its share again
    assert deployed.reported_weights() == {a.id: 50, b.id: 50}
    # The kill did hit traffic: b failed attempts, and the router retried every one on a.
    b_stats = platform.stats(profile, since=killed_at)["backends"][b.id]
    assert b_stats["errors"]["total"] > 0
    assert b_stats["client_errors"] == 0


def _serves(deployed: Deployed, release: Release) -> bool:
    try:
        return httpx.get(f"{release.url}/health", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def test_a_killed_router_is_restarted_with_its_routes_and_its_window_is_inconclusive(
    deployed: Deployed,
) -> None:
    platform, profile, a = deployed.platform, deployed.profile, deployed.a
    platform.set_traffic(profile, {a.id: 100})
    router = platform._router()
    before = router.server_pid()
    assert before is not None
    window_started = time.time()
    os.kill(before, signal.SIGKILL)
    assert wait_for(lambda: not is_running(before, None), GONE_SECONDS, 0.05)

    # Restarted by its keeper, with no call of the platform's.
    assert wait_for(lambda: router.server_pid() not in (None, before) and router.answers(),
                    RESTART_SECONDS, 0.1)  # fmt: skip
    stored = FileRouteStore(platform.home / "state" / "routes.json").table()
    reported = router.client().routes()
    assert (reported.generation, reported.weights(deployed.model)) == (
        stored.generation, stored.weights(deployed.model)
    )
    assert reported.weights(deployed.model)[a.id] == 100
    # Its measurements begin after the window did: the bake is not judged on what is left.
    stats = platform.stats(profile, since=window_started)
    finding = router_restart_finding(stats["measured_since"], window_started)
    analysis = interrupted(Window(requests=100), None, None, finding)
    assert analysis is not None and analysis.verdict == "inconclusive"
    assert "router restarted" in analysis.reason
    response = httpx.post(
        f"{deployed.router}/v1/chat/completions", json=chat_body(deployed.model), timeout=30
    )
    assert response.status_code == 200 and response.headers["x-rollout-backend"] == a.id


def test_retire_drains_an_in_flight_stream_before_the_process_exits(
    deployed: Deployed,
) -> None:
    platform, profile, a = deployed.platform, deployed.profile, deployed.a
    platform.set_traffic(profile, {a.id: 100})
    record = platform.inventory.get(a.id)
    assert record is not None and record.engine_pid is not None
    pids = [record.pid, record.engine_pid]
    first_chunk = threading.Event()
    outcome: dict[str, object] = {}

    def stream() -> None:
        body = chat_body(deployed.model, max_tokens=STREAM_TOKENS, stream=True)
        chunks = 0
        with httpx.stream(
            "POST", f"{deployed.router}/v1/chat/completions", json=body, timeout=60
        ) as response:
            for line in response.iter_lines():
                if not line.startswith("data:") or line.strip() == "data: [DONE]":
                    continue
                chunks += 1
                first_chunk.set()
                # `transformers serve` ends a stream with a finish_reason, without [DONE].
                for choice in json.loads(line.removeprefix("data:"))["choices"]:
                    outcome["finish_reason"] = choice.get("finish_reason") or outcome.get(
                        "finish_reason"
                    )
        outcome.update(
            chunks=chunks,
            ended=time.monotonic(),
            engine_alive=all_alive(pids),
            # The supervisor logs this when the platform's SIGTERM reaches it.
            sigterm_sent="SIGTERM; draining" in Path(record.log).read_text(errors="replace"),
        )

    def all_alive(pids: list[int]) -> bool:
        return all(is_running(pid, None) for pid in pids)

    reader = threading.Thread(target=stream, daemon=True)
    reader.start()
    assert first_chunk.wait(30)
    retire_started = time.monotonic()
    platform.retire(profile, a, drain_seconds=RETIRE_DRAIN_SECONDS)
    retired = time.monotonic()
    reader.join(30)

    assert outcome.get("finish_reason") == "length", outcome  # the whole stream
    assert int(outcome["chunks"]) > STREAM_TOKENS  # type: ignore[call-overload]
    assert outcome["engine_alive"] is True  # the engine outlived the stream ...
    assert outcome["sigterm_sent"] is False  # ... because the router drained it first
    assert float(outcome["ended"]) <= retired  # type: ignore[arg-type]
    assert all_gone(pids)  # ... and not the retire
    assert retired - retire_started < RETIRE_DRAIN_SECONDS  # drained, not timed out
    assert platform.inventory.get(a.id) is None
    assert a.id not in {r.id for r in platform.running_releases(profile)}
    assert a.id not in deployed.reported_weights()


def test_a_deploy_whose_probe_fails_raises_one_line_and_leaves_nothing(
    deployed: Deployed, models_env: Path, tiny_model_dir: Path
) -> None:
    # The demo profile's "capital" probe wants "Paris", which the tiny model cannot say.
    profile = load_profile(DEMO_PROFILE, models_env)
    platform = deployed.platform
    place_weights(platform.home, profile, REVISION_C, tiny_model_dir)
    rid = release_id(profile, REVISION_C)
    with pytest.raises(DeployFailed) as failed:
        platform.deploy(profile, REVISION_C)
    message = str(failed.value)
    assert "\n" not in message
    assert message.startswith(rid) and "probe 'capital'" in message and "Paris" in message
    assert platform.inventory.get(rid) is None
    assert processes_under(platform.home / "releases" / rid) == []
    assert rid not in deployed.reported_weights()
    assert rid not in {r.id for r in platform.running_releases(profile)}


def test_a_supervisor_killed_during_startup_leaves_no_engine_behind(
    deployed: Deployed, tiny_model_dir: Path
) -> None:
    platform, profile = deployed.platform, deployed.profile
    place_weights(platform.home, profile, REVISION_C, tiny_model_dir)
    rid = release_id(profile, REVISION_C)
    workdir = platform.home / "releases" / rid
    with ThreadPoolExecutor(1) as pool:
        deploying = pool.submit(platform.deploy, profile, REVISION_C)
        # The engine is up (a second process in the release's directory) but not yet ready.
        assert wait_for(lambda: len(processes_in(workdir)) >= 2, STEP_TIMEOUT_SECONDS, 0.05)
        record = platform.inventory.get(rid)
        assert record is not None and record.engine_pid is None
        engines = [pid for pid in processes_in(workdir) if pid != record.pid]
        os.kill(record.pid, signal.SIGKILL)  # the engine's parent is gone: it is nobody's now
        with pytest.raises(DeployFailed, match="exited before it was ready"):
            deploying.result(timeout=60)
    assert all_gone(engines), describe(engines)
    assert processes_in(workdir) == []
    assert platform.inventory.get(rid) is None


def test_a_deploy_without_weights_fails_before_starting_anything(deployed: Deployed) -> None:
    with pytest.raises(DeployFailed, match="no weights at"):
        deployed.platform.deploy(deployed.profile, "d" * 40)
    assert deployed.platform.inventory.get(release_id(deployed.profile, "d" * 40)) is None


def test_bad_traffic_weights_are_refused_before_routing(deployed: Deployed) -> None:
    before = deployed.reported_weights()
    with pytest.raises(ValueError, match="bad traffic weights"):
        deployed.platform.set_traffic(deployed.profile, {deployed.a.id: 150})
    assert deployed.reported_weights() == before


def test_a_router_port_held_by_another_home_fails_the_deploy_clearly(
    deployed: Deployed, homes: Path, tiny_model_dir: Path
) -> None:
    home = homes / "other"
    place_weights(home, deployed.profile, REVISION_A, tiny_model_dir)
    router_port = deployed.platform.inventory.get(ROUTER_RECORD).port  # type: ignore[union-attr]
    other = LocalPlatform(home, router_port=router_port)
    with pytest.raises(DeployFailed, match=f"port {router_port} is taken .* ROLLOUT_ROUTER_PORT"):
        other.deploy(deployed.profile, REVISION_A)
    assert inventory_pids(home) == {}  # no engine was started for nothing


# --------------------------------------------------------------------------------------------
# Orchestrators: shutdown, SIGKILL, keep serving
# --------------------------------------------------------------------------------------------


@pytest.fixture
def orchestrator_home(homes: Path, request: pytest.FixtureRequest, tiny_model_dir: Path,
                      models_env: Path) -> Iterator[tuple[Path, int]]:  # fmt: skip
    home = homes / request.node.name
    profile = load_profile(PASSABLE_PROFILE, models_env)
    place_weights(home, profile, REVISION_A, tiny_model_dir)
    port = free_port()
    try:
        yield home, port
    finally:
        LocalPlatform(home, router_port=port).stop_all()


def all_pids(ready: dict) -> list[int]:
    return [pid for pids in ready["pids"].values() for pid in pids]


def drive(orchestrator_home: tuple[Path, int], models_env: Path, *, keep: bool,
          mode: str) -> tuple[Path, dict[str, str], Driver]:  # fmt: skip
    """An orchestrator process that deploys one release of PASSABLE_PROFILE, then `mode`."""
    home, port = orchestrator_home
    env = platform_env(home, models_env, port, keep=keep)
    return home, env, start_driver(env, PASSABLE_PROFILE, REVISION_A, mode)


def test_shutdown_stops_everything_the_orchestrator_started(
    orchestrator_home: tuple[Path, int], models_env: Path
) -> None:
    home, _, driver = drive(orchestrator_home, models_env, keep=False, mode="shutdown")
    try:
        pids = all_pids(driver.ready)
        assert len(pids) == 3  # router, supervisor, engine
        assert driver.process.wait(60) == 0
    finally:
        driver.stop()
    assert all_gone(pids), describe(pids)
    assert processes_under(home) == []
    assert inventory_pids(home) == {}


def test_a_sigkilled_orchestrator_leaves_orphans_the_next_platform_stops(
    orchestrator_home: tuple[Path, int], models_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home, env, driver = drive(orchestrator_home, models_env, keep=False, mode="hold")
    pids = all_pids(driver.ready)
    driver.process.send_signal(signal.SIGKILL)
    driver.stop()
    assert not all_gone(pids)  # its processes outlive it: there is something to clean up

    for name in ("ROLLOUT_HOME", "ROLLOUT_ROUTER_PORT", "ROLLOUT_KEEP_SERVING"):
        monkeypatch.setenv(name, env[name])
    platform = LocalPlatform.from_env()
    platform.reconcile_orphans()  # as the next run's reconcile task does

    assert all_gone(pids), describe(pids)
    assert processes_under(home) == []
    assert inventory_pids(home) == {}
    assert platform.running_releases(load_profile(PASSABLE_PROFILE, models_env)) == []


def test_keep_serving_outlives_the_orchestrator_and_the_router_is_reused(
    orchestrator_home: tuple[Path, int], models_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home, env, driver = drive(orchestrator_home, models_env, keep=True, mode="shutdown")
    try:
        assert driver.process.wait(60) == 0
    finally:
        driver.stop()
    pids = all_pids(driver.ready)
    release = Release.model_validate(driver.ready["release"])
    assert not any(not is_running(pid, None) for pid in pids), describe(pids)
    records = LocalPlatform(home).inventory.records()
    assert all(record.keep for record in records)

    for name in ("ROLLOUT_HOME", "ROLLOUT_ROUTER_PORT"):
        monkeypatch.setenv(name, env[name])
    monkeypatch.delenv("ROLLOUT_KEEP_SERVING", raising=False)
    later = LocalPlatform.from_env()
    later.reconcile_orphans()  # leaves kept processes alone
    profile = load_profile(PASSABLE_PROFILE, models_env)
    assert [r.id for r in later.running_releases(profile)] == [release.id]
    later.set_traffic(profile, {release.id: 100})
    assert inventory_pids(home)[ROUTER_RECORD] == [driver.ready["router_pid"]]  # reused
    response = httpx.post(
        f"{later.router_url(profile)}/v1/chat/completions",
        json=chat_body(profile.served_model_name),
        timeout=30,
    )
    assert response.status_code == 200 and response.headers["x-rollout-backend"] == release.id
    later.shutdown()  # started nothing: stops nothing
    assert not any(not is_running(pid, None) for pid in pids)

    later.stop_all()
    assert all_gone(pids), describe(pids)
    assert json.loads((home / "state" / "routes.json").read_text())["models"] == {}
