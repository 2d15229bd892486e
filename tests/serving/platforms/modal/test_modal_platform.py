"""ModalPlatform's preparation through the real modal SDK against the TEST DOUBLE of Modal's
API (tests/modal_double): the weights and compile Apps are deployed, their calls spawned,
recorded, polled and re-attached as on Modal. Each call is answered by the project's own body
(tests/modal_containers.PrepContainers: download, merge, verify and compile against the local
mirror, on the double's volumes), or ends as a test scripts it. conftest.py refuses any
connection past loopback: a real Modal or Hub call fails these tests.
"""

from __future__ import annotations

import socket
import threading
from pathlib import Path
from typing import Any

import pytest

from serving.config.layout import deepgemm_dir
from serving.config.loader import load_profile
from serving.config.profile import Profile
from serving.core.procs import wait_for
from serving.engines.deepgemm import CompileFailed, marker_path
from serving.platforms.modal.calls import CallStore, ModalCallError
from serving.platforms.modal.gateway import ModalGateway
from serving.platforms.modal.platform import ModalPlatform
from serving.platforms.modal.prep import shard_count
from serving.weights.hub import HIGH_PERFORMANCE_ENV, fetch_files
from serving.weights.models import FileEntry, Progress, WeightsError
from tests.mirror_fixtures import SyntheticRepo
from tests.modal_containers import PrepContainers
from tests.modal_double.calls import API_FAILING, EXPIRED, RUNNING, Call, raised, returned
from tests.modal_double.servicer import ModalDouble
from tests.modal_fixtures import FakeCompileRun, cpu_profile, gpu_profile
from tests.server_fixtures import POLL_SECONDS

ENVIRONMENT = "test"
WEIGHTS_APP = "smollm2-135m-weights"
COMPILE_APP = "glm-5.1-compile"
CALLS = Path("state") / "modal-calls.json"
# A restarted orchestrator's wait on a call, as seen by the double.
WAIT_TIMEOUT_S = 20.0


class SimulatedCrash(BaseException):
    """The orchestrator process dies while it waits."""


class DiesWhileWaiting(ModalGateway):
    """FAULT: the real gateway in an orchestrator that is killed at its first wait on a call,
    after the spawn was recorded (a killed process is nothing the double can produce)."""

    def poll(self, call_id: str, timeout: float = 0) -> Any:
        if timeout:
            raise SimulatedCrash()
        return super().poll(call_id, timeout)


def platform(home: Path, endpoint: str, **options: Any) -> ModalPlatform:
    options.setdefault("sleep", lambda seconds: None)
    return ModalPlatform(home, environment=ENVIRONMENT, endpoint=endpoint, **options)


@pytest.fixture(autouse=True)
def _no_high_performance_leak(monkeypatch: pytest.MonkeyPatch) -> None:
    # The download body sets HF_XET_HIGH_PERFORMANCE for its process; keep it to the test.
    monkeypatch.setenv(HIGH_PERFORMANCE_ENV, "0")


def containers(double: ModalDouble, profile: Profile, root: Path, endpoint: str) -> PrepContainers:
    return PrepContainers(double, profile, root / "containers", endpoint, ENVIRONMENT,
                          FakeCompileRun())  # fmt: skip


@pytest.fixture
def cpu(
    modal_double: ModalDouble, mirror: Any, synthetic_repo: SyntheticRepo, tmp_path: Path
) -> Profile:
    """smollm2-135m on the synthetic repo, its weights App answered by the real bodies."""
    profile = cpu_profile(synthetic_repo.repo_id)
    containers(modal_double, profile, tmp_path, mirror.url)
    return profile


@pytest.fixture
def gpu(
    modal_double: ModalDouble, mirror: Any, synthetic_repo: SyntheticRepo, tmp_path: Path
) -> PrepContainers:
    """glm-5.1 (DeepGEMM) on the synthetic repo, its compile App answered by the real body."""
    return containers(modal_double, gpu_profile(synthetic_repo.repo_id), tmp_path, mirror.url)


def shards(double: ModalDouble) -> list[list[str]]:
    """The paths each download call of the weights App was given, in spawn order."""
    return [call.arguments[0][1] for call in double.calls_of(WEIGHTS_APP, "download")]


def test_small_repo_download_is_one_recorded_call_and_a_rerun_starts_nothing(
    modal_double: ModalDouble, mirror: Any, synthetic_repo: SyntheticRepo, cpu: Profile,
    tmp_path: Path,
) -> None:  # fmt: skip
    seen: list[Progress] = []
    assert not platform(tmp_path / "home", mirror.url).has_weights(cpu, synthetic_repo.v1)

    result = platform(tmp_path / "home", mirror.url).download(cpu, synthetic_repo.v1, seen.append)

    every_file = fetch_files(cpu.hub.repo, synthetic_repo.v1, endpoint=mirror.url)
    assert not result.cached and len(result.manifest.files) == len(every_file)
    [call] = modal_double.calls_of(WEIGHTS_APP, "download")
    assert call.arguments == ((synthetic_repo.v1,), {})
    assert modal_double.publishes == [WEIGHTS_APP]
    [stored] = CallStore(tmp_path / "home" / CALLS).records()
    assert (stored.key.stage, stored.call_id) == ("download", call.call_id)
    assert [p.bytes_done for p in seen] == [0, result.manifest.bytes_total]

    # The sentinel the body committed is read from the volume: no container, no deploy.
    again = platform(tmp_path / "home", mirror.url).download(cpu, synthetic_repo.v1)
    assert again.cached and again.manifest == result.manifest
    assert platform(tmp_path / "home", mirror.url).has_weights(cpu, synthetic_repo.v1)
    assert len(modal_double.calls) == 1 and modal_double.publishes == [WEIGHTS_APP]


def test_weights_deleted_from_the_volume_are_downloaded_by_a_new_call(
    modal_double: ModalDouble, mirror: Any, synthetic_repo: SyntheticRepo, cpu: Profile,
    tmp_path: Path,
) -> None:  # fmt: skip
    home = tmp_path / "home"
    platform(home, mirror.url).download(cpu, synthetic_repo.v1)
    files = modal_double.volumes[(ENVIRONMENT, cpu.volumes.weights)].files
    for path in [p for p in files if p.startswith(f"{cpu.hub.repo}/{synthetic_repo.v1}/")]:
        del files[path]  # by hand, or a volume cleanup
    assert not platform(home, mirror.url).has_weights(cpu, synthetic_repo.v1)

    # The recorded call finished, but what it made is gone: its result no longer holds.
    again = platform(home, mirror.url).download(cpu, synthetic_repo.v1)

    assert not again.cached and len(modal_double.calls_of(WEIGHTS_APP, "download")) == 2
    assert platform(home, mirror.url).has_weights(cpu, synthetic_repo.v1)


def test_big_repo_is_sharded_then_merged(
    modal_double: ModalDouble, mirror: Any, synthetic_repo: SyntheticRepo, cpu: Profile,
    tmp_path: Path,
) -> None:  # fmt: skip
    seen: list[Progress] = []
    sharded = platform(tmp_path / "home", mirror.url, shard_min_files=2, max_shards=2)

    result = sharded.download(cpu, synthetic_repo.v2, seen.append)

    given = shards(modal_double)
    assert len(given) == 2
    assert sorted(p for paths in given for p in paths) == sorted(
        e.path for e in result.manifest.files
    )
    [merge] = modal_double.calls_of(WEIGHTS_APP, "merge")
    assert [len(shard["files"]) for shard in merge.arguments[0][1]] == [len(p) for p in given]
    done = [p.bytes_done for p in seen]
    assert done == sorted(done) and done[-1] == result.manifest.bytes_total
    keys = [r.key.detail for r in CallStore(tmp_path / "home" / CALLS).records()]
    assert sorted(keys) == ["1-of-2", "2-of-2"]
    # The merge committed the sentinel: the next run reads it back and starts nothing.
    again = sharded.download(cpu, synthetic_repo.v2)
    assert again.cached and again.manifest == result.manifest
    assert len(modal_double.calls) == 3


def test_after_a_restart_only_the_failed_shard_is_spawned_again(
    modal_double: ModalDouble, mirror: Any, synthetic_repo: SyntheticRepo, cpu: Profile,
    tmp_path: Path,
) -> None:  # fmt: skip
    home = tmp_path / "home"
    # The first shard fails, the second keeps running.
    modal_double.script(WEIGHTS_APP, "download",
                        raised(WeightsError("HTTP 503 from the hub: unavailable")), RUNNING)
    with pytest.raises(ModalCallError, match=r"shard 1-of-2: call fc-\S+ failed: .*503"):
        platform(home, mirror.url, shard_min_files=2, max_shards=2).download(
            cpu, synthetic_repo.v2
        )
    failed, running = modal_double.calls_of(WEIGHTS_APP, "download")
    # The second shard finishes while no orchestrator watches.
    args, kwargs = running.arguments
    modal_double.settle(running.call_id, returned(modal_double.bodies[running.function](
        *args, **kwargs)))  # fmt: skip

    result = platform(home, mirror.url, shard_min_files=2, max_shards=2).download(
        cpu, synthetic_repo.v2
    )

    *_, again = modal_double.calls_of(WEIGHTS_APP, "download")
    assert len(shards(modal_double)) == 3 and again.arguments == failed.arguments
    assert len(modal_double.calls_of(WEIGHTS_APP, "merge")) == 1
    assert not result.cached
    records = {r.key.detail: r.call_id for r in CallStore(home / CALLS).records()}
    assert records == {"1-of-2": again.call_id, "2-of-2": running.call_id}


def compile_then_crash(
    double: ModalDouble, profile: Profile, revision: str, home: Path, endpoint: str
) -> Call:
    """An orchestrator that spawned the compile and was killed while waiting on it."""
    with pytest.raises(SimulatedCrash):
        platform(home, endpoint, gateway=DiesWhileWaiting(ENVIRONMENT)).compile(profile, revision)
    [call] = double.calls_of(COMPILE_APP, "compile")
    [stored] = CallStore(home / CALLS).records()
    assert (stored.call_id, stored.key.stage) == (call.call_id, "compile")
    return call


def finish_while_waited_on(double: ModalDouble, call: Call, compile_once: Any) -> Any:
    """Run `compile_once` (a restarted orchestrator) until it waits on `call`, then let the
    call finish as the real body would; what `compile_once` returned."""
    results: list[Any] = []
    waiter = threading.Thread(target=lambda: results.append(compile_once()))
    waiter.start()
    assert wait_for(lambda: call.waits > 0, WAIT_TIMEOUT_S, POLL_SECONDS)
    args, kwargs = call.arguments
    double.settle(call.call_id, returned(double.bodies[call.function](*args, **kwargs)))
    waiter.join(WAIT_TIMEOUT_S)
    return results[0]


def test_a_restarted_orchestrator_reattaches_to_the_running_compile(
    modal_double: ModalDouble, mirror: Any, synthetic_repo: SyntheticRepo, gpu: PrepContainers,
    tmp_path: Path,
) -> None:  # fmt: skip
    home, profile = tmp_path / "home", gpu.profile
    modal_double.script(COMPILE_APP, "compile", RUNNING)
    running = compile_then_crash(modal_double, profile, synthetic_repo.v1, home, mirror.url)
    deploys = list(modal_double.publishes)

    result = finish_while_waited_on(
        modal_double, running, lambda: platform(home, mirror.url).compile(profile,
                                                                          synthetic_repo.v1))

    assert result.status == "compiled"
    assert result.key == CallStore(home / CALLS).records()[0].key.detail
    # No second 8-GPU job, no redeploy.
    assert len(modal_double.calls) == 1 and modal_double.publishes == deploys


def test_an_unanswered_poll_backs_off_and_waits_on_the_same_compile(
    modal_double: ModalDouble, mirror: Any, synthetic_repo: SyntheticRepo, gpu: PrepContainers,
    tmp_path: Path,
) -> None:  # fmt: skip
    home, profile = tmp_path / "home", gpu.profile
    modal_double.script(COMPILE_APP, "compile", RUNNING)
    running = compile_then_crash(modal_double, profile, synthetic_repo.v1, home, mirror.url)
    modal_double.settle(running.call_id, API_FAILING)  # Modal's API answers INTERNAL
    slept: list[float] = []

    def back_off(seconds: float) -> None:
        slept.append(seconds)
        if len(slept) == 2:  # the API answers again, and the compile has finished
            args, kwargs = running.arguments
            modal_double.settle(running.call_id, returned(gpu.compile(*args, **kwargs)))

    result = platform(home, mirror.url, sleep=back_off).compile(profile, synthetic_repo.v1)

    assert result.status == "compiled"
    assert len(modal_double.calls) == 1  # no second 8-GPU job
    assert slept == [5.0, 10.0]  # backed off, did not spin


def test_a_failed_compile_is_spawned_anew_and_the_record_replaced(
    modal_double: ModalDouble, mirror: Any, synthetic_repo: SyntheticRepo, gpu: PrepContainers,
    tmp_path: Path,
) -> None:  # fmt: skip
    home = tmp_path / "home"
    modal_double.script(COMPILE_APP, "compile", raised(CompileFailed("server died")))
    failed = compile_then_crash(modal_double, gpu.profile, synthetic_repo.v1, home, mirror.url)

    result = platform(home, mirror.url).compile(gpu.profile, synthetic_repo.v1)

    assert result.status == "compiled"
    first, anew = modal_double.calls_of(COMPILE_APP, "compile")
    assert first is failed
    assert [r.call_id for r in CallStore(home / CALLS).records()] == [anew.call_id]


def test_an_expired_or_finished_compile_record(
    modal_double: ModalDouble, mirror: Any, synthetic_repo: SyntheticRepo, gpu: PrepContainers,
    tmp_path: Path,
) -> None:  # fmt: skip
    home, profile = tmp_path / "home", gpu.profile
    modal_double.script(COMPILE_APP, "compile", RUNNING)
    recorded = compile_then_crash(modal_double, profile, synthetic_repo.v1, home, mirror.url)
    key = CallStore(home / CALLS).records()[0].key.detail
    # Finished without kernels to check for (a "compiled" one would have its marker on the
    # volume, or be stale: see test_kernels_are_there_while_their_marker_is_on_the_volume).
    finished = {"status": "skipped", "reason": "no GPU", "key": key, "marker": None,
                "seconds": 1.0}  # fmt: skip
    modal_double.settle(recorded.call_id, returned(finished))

    assert platform(home, mirror.url).compile(profile, synthetic_repo.v1).reason == "no GPU"
    assert len(modal_double.calls) == 1

    modal_double.settle(recorded.call_id, EXPIRED)
    assert platform(home, mirror.url).compile(profile, synthetic_repo.v1).status == "compiled"
    assert len(modal_double.calls_of(COMPILE_APP, "compile")) == 2


def test_a_changed_kernel_flag_does_not_attach_to_the_old_compile(
    modal_double: ModalDouble, mirror: Any, synthetic_repo: SyntheticRepo, gpu: PrepContainers,
    tmp_path: Path,
) -> None:  # fmt: skip
    home = tmp_path / "home"
    modal_double.script(COMPILE_APP, "compile", RUNNING)
    old = compile_then_crash(modal_double, gpu.profile, synthetic_repo.v1, home, mirror.url)

    changed = gpu_profile(synthetic_repo.repo_id, **{"moe-runner-backend": "triton"})
    containers(modal_double, changed, tmp_path / "changed", mirror.url)
    result = platform(home, mirror.url).compile(changed, synthetic_repo.v1)

    _, own = modal_double.calls_of(COMPILE_APP, "compile")
    assert old.waits == 0 and own.waits == 1  # waited on its own new call only
    assert result.key != CallStore(home / CALLS).records()[0].key.detail


def test_a_compiled_marker_on_the_volume_starts_no_gpu_container(
    modal_double: ModalDouble, mirror: Any, synthetic_repo: SyntheticRepo, gpu: PrepContainers,
    tmp_path: Path,
) -> None:  # fmt: skip
    first = platform(tmp_path / "home", mirror.url).compile(gpu.profile, synthetic_repo.v1)
    assert first.status == "compiled"
    deploys = list(modal_double.publishes)

    again = platform(tmp_path / "home", mirror.url).compile(gpu.profile, synthetic_repo.v1)

    assert again.status == "cached" and again.key == first.key
    assert again.marker == str(
        marker_path(deepgemm_dir(Path("/deepgemm"), gpu.profile), str(first.key))
    )
    assert len(modal_double.calls) == 1 and modal_double.publishes == deploys


def test_kernels_are_there_while_their_marker_is_on_the_volume(
    modal_double: ModalDouble, mirror: Any, synthetic_repo: SyntheticRepo, gpu: PrepContainers,
    tmp_path: Path,
) -> None:  # fmt: skip
    home = tmp_path / "home"
    assert not platform(home, mirror.url).has_kernels(gpu.profile, synthetic_repo.v1)
    first = platform(home, mirror.url).compile(gpu.profile, synthetic_repo.v1)
    assert platform(home, mirror.url).has_kernels(gpu.profile, synthetic_repo.v1)

    # The cache volume loses the marker (a cleanup): the kernels are gone, a compile runs.
    files = modal_double.volumes[(ENVIRONMENT, str(gpu.profile.volumes.deepgemm))].files
    del files[str(marker_path(deepgemm_dir(Path(""), gpu.profile), str(first.key)))]
    assert not platform(home, mirror.url).has_kernels(gpu.profile, synthetic_repo.v1)
    assert platform(home, mirror.url).compile(gpu.profile, synthetic_repo.v1).status == "compiled"
    assert len(modal_double.calls_of(COMPILE_APP, "compile")) == 2


def test_a_failing_call_raises_one_line_and_keeps_its_record(
    modal_double: ModalDouble, mirror: Any, synthetic_repo: SyntheticRepo, gpu: PrepContainers,
    tmp_path: Path,
) -> None:  # fmt: skip
    modal_double.script(COMPILE_APP, "compile",
                        raised(CompileFailed("exit 1 without success\nlog")))  # fmt: skip
    with pytest.raises(ModalCallError) as failure:
        platform(tmp_path / "home", mirror.url).compile(gpu.profile, synthetic_repo.v1)
    [call] = modal_double.calls_of(COMPILE_APP, "compile")
    assert str(failure.value) == (
        f"compile: call {call.call_id} failed: CompileFailed: exit 1 without success"
    )
    assert isinstance(failure.value.__cause__, CompileFailed)
    assert [r.call_id for r in CallStore(tmp_path / "home" / CALLS).records()] == [call.call_id]


def test_verify_runs_on_the_deployed_weights_app(
    modal_double: ModalDouble, mirror: Any, synthetic_repo: SyntheticRepo, cpu: Profile,
    tmp_path: Path,
) -> None:  # fmt: skip
    modal_platform = platform(tmp_path / "home", mirror.url)
    modal_platform.download(cpu, synthetic_repo.v1)

    result = modal_platform.verify(cpu, synthetic_repo.v1)

    assert result.passed and result.compile_status == "not-required"
    [call] = modal_double.calls_of(WEIGHTS_APP, "verify")
    assert call.arguments == ((synthetic_repo.v1,), {})
    assert modal_double.publishes == [WEIGHTS_APP]  # once per platform


def test_resolve_is_a_local_call_and_refs_must_be_resolved_first(
    modal_double: ModalDouble, mirror: Any, synthetic_repo: SyntheticRepo, cpu: Profile,
    tmp_path: Path,
) -> None:  # fmt: skip
    modal_platform = platform(tmp_path / "home", mirror.url)
    assert modal_platform.resolve(cpu, "v1") == synthetic_repo.v1
    with pytest.raises(WeightsError, match="must be resolved"):
        modal_platform.download(cpu, "main")
    assert modal_double.calls == {} and modal_double.publishes == []


def test_a_profile_without_deepgemm_compiles_nothing(tmp_path: Path) -> None:
    profile = load_profile("smollm2-135m")
    result = ModalPlatform(tmp_path, gateway=None).compile(profile, "a" * 40)
    assert result.status == "skipped" and result.key is None


def test_shard_thresholds() -> None:
    small = [FileEntry(path=f"f{i}", size=10, lfs=False, blob_id="b") for i in range(16)]
    assert shard_count(small) == 1
    many = [*small, FileEntry(path="f16", size=10, lfs=False, blob_id="b")]
    assert shard_count(many, bytes_per_shard=100) == 2
    huge = [FileEntry(path="big", size=700 * 10**9, lfs=True, sha256="0" * 64)] * 160
    assert shard_count(huge) == 16


def test_the_default_platform_makes_no_modal_call_and_tests_cannot_leave_loopback(
    tmp_path: Path,
) -> None:
    modal_platform = ModalPlatform(tmp_path)  # as get_platform("modal") builds it
    assert isinstance(modal_platform.gateway, ModalGateway)
    assert modal_platform.cache_scope.startswith("modal:")
    with pytest.raises(ConnectionRefusedError, match="may not leave loopback"):
        socket.create_connection(("192.0.2.1", 443), timeout=1)
