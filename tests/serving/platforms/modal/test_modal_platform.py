"""ModalPlatform and the Modal function bodies, offline.

- The bodies in serving.platforms.modal.bodies are module-level functions: they run here against
  a temporary directory (the "volume"), a FakeVolume that records reload/commit, and the
  local mirror.
- ModalPlatform talks to Modal only through its Gateway; FakeModalGateway stands in for it and
  runs the same bodies as the "containers", so sharding, merge and re-attach are exercised with
  real files.
- conftest.py refuses any connection past loopback: a Modal or Hub call fails these tests.
"""

from __future__ import annotations

import socket
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import modal.exception
import modal.volume
import pytest

from serving.config.layout import deepgemm_dir, weights_dir
from serving.config.loader import load_profile
from serving.config.profile import Profile
from serving.engines.deepgemm import CompileFailed, marker_path
from serving.platforms.modal import bodies, resources
from serving.platforms.modal.calls import (
    CallKey,
    CallRecord,
    CallState,
    CallStore,
    ModalCallError,
    Poll,
)
from serving.platforms.modal.gateway import ModalGateway
from serving.platforms.modal.platform import ModalPlatform
from serving.platforms.modal.prep import shard_count
from serving.platforms.modal.resources import VolumeVersionMismatch
from serving.weights.download import read_sentinel
from serving.weights.hub import HIGH_PERFORMANCE_ENV, fetch_files
from serving.weights.models import FileEntry, Progress, WeightsError
from tests.mirror_fixtures import SyntheticRepo
from tests.modal_fixtures import (
    FakeCompileRun,
    FakeVolume,
    cpu_profile,
    gpu_profile,
    no_gpu_check,
)

TOKEN = "hf_test_SECRET_token_value_0987654321"
MISSING_SHA = "f" * 40
COMPILE_TIMEOUT_S = 60


# --------------------------------------------------------------------------------------------
# ModalPlatform with a fake gateway
# --------------------------------------------------------------------------------------------


class SimulatedCrash(BaseException):
    """The orchestrator process dies while it waits."""


class FakeModalGateway:
    """Stands in for Modal: spawned calls run the real bodies against `root` (the volumes) and
    the mirror. `script[call_id]` overrides what polls of a call see, one Poll per poll (the
    last one repeats); `crash_on_wait` raises SimulatedCrash on the first blocking poll."""

    # More blocking polls of one call than this: the platform would wait forever.
    MAX_WAITS = 50

    def __init__(
        self, root: Path, endpoint: str, profile: Profile, first_call_number: int = 1
    ) -> None:
        self.root = root
        self.first_call_number = first_call_number
        self.waits = 0
        self.endpoint = endpoint
        self.profile = profile
        self.deployed: list[str] = []
        self.spawned: list[tuple[str, str, tuple[Any, ...]]] = []
        self.called: list[tuple[str, str]] = []
        self.results: dict[str, Any] = {}
        self.script: dict[str, list[Poll]] = {}
        self.crash_on_wait = False
        self.compile_run = FakeCompileRun()
        self.volume_events: list[tuple[str, str]] = []

    def volume_root(self, name: str) -> Path:
        return self.root / name

    def deploy(self, app: Any) -> None:
        self.deployed.append(app.name)

    def _run(self, function: str, args: tuple[Any, ...]) -> Any:
        profile = self.profile
        weights = self.volume_root(profile.volumes.weights)
        volume = FakeVolume(profile.volumes.weights, self.volume_events)
        if function == resources.DOWNLOAD_FUNCTION:
            revision, *rest = args
            paths, files = [*rest, None, None][:2]
            return bodies.download_body(
                profile, revision, root=weights, volume=volume, paths=paths, files=files,
                endpoint=self.endpoint,
            )  # fmt: skip
        if function == resources.MERGE_FUNCTION:
            revision, shards, files = args
            return bodies.merge_body(
                profile, revision, shards, root=weights, volume=volume, files=files,
                endpoint=self.endpoint,
            )  # fmt: skip
        if function == resources.VERIFY_FUNCTION:
            return bodies.verify_body(
                profile, args[0], weights_root=weights, weights_volume=volume,
                endpoint=self.endpoint,
            )  # fmt: skip
        if function == resources.COMPILE_FUNCTION:
            assert profile.volumes.deepgemm is not None
            return bodies.compile_body(
                profile, args[0], deepgemm_root=self.volume_root(profile.volumes.deepgemm),
                deepgemm_volume=FakeVolume(profile.volumes.deepgemm, self.volume_events),
                timeout_seconds=COMPILE_TIMEOUT_S, endpoint=self.endpoint,
                run=self.compile_run, unavailable=no_gpu_check, log=lambda line: None,
            )  # fmt: skip
        raise AssertionError(f"unknown function {function}")

    def spawn(self, app_name: str, function: str, *args: Any) -> str:
        call_id = f"fc-fake-{self.first_call_number + len(self.spawned)}"
        self.spawned.append((app_name, function, args))
        self.results[call_id] = self._run(function, args)
        return call_id

    def call(self, app_name: str, function: str, *args: Any) -> Any:
        self.called.append((app_name, function))
        return self._run(function, args)

    def poll(self, call_id: str, timeout: float = 0) -> Poll:
        if timeout and self.crash_on_wait:
            raise SimulatedCrash()
        if timeout:
            self.waits += 1
            assert self.waits <= self.MAX_WAITS, f"waited forever for {call_id}"
        script = self.script.get(call_id)
        if script:
            return script.pop(0) if len(script) > 1 else script[0]
        return Poll(CallState.SUCCEEDED, result=self.results[call_id])

    def read_volume_file(self, volume: str, path: str) -> bytes | None:
        file = self.volume_root(volume) / path.lstrip("/")
        return file.read_bytes() if file.is_file() else None


def platform(home: Path, gateway: FakeModalGateway, **options: Any) -> ModalPlatform:
    return ModalPlatform(
        home, environment="test", endpoint=gateway.endpoint, gateway=gateway,
        sleep=lambda seconds: None, **options,
    )  # fmt: skip


@pytest.fixture(autouse=True)
def _no_high_performance_leak(monkeypatch: pytest.MonkeyPatch) -> None:
    # The download body sets HF_XET_HIGH_PERFORMANCE for its process; keep it to the test.
    monkeypatch.setenv(HIGH_PERFORMANCE_ENV, "0")


def test_small_repo_download_is_one_recorded_call_and_a_rerun_starts_nothing(
    mirror: Any, synthetic_repo: SyntheticRepo, tmp_path: Path
) -> None:
    profile = cpu_profile(synthetic_repo.repo_id)
    gateway = FakeModalGateway(tmp_path / "volumes", mirror.url, profile)
    seen: list[Progress] = []
    assert not platform(tmp_path / "home", gateway).has_weights(profile, synthetic_repo.v1)

    result = platform(tmp_path / "home", gateway).download(profile, synthetic_repo.v1, seen.append)

    every_file = fetch_files(profile.hub.repo, synthetic_repo.v1, endpoint=mirror.url)
    assert not result.cached and len(result.manifest.files) == len(every_file)
    assert [(app, fn) for app, fn, _ in gateway.spawned] == [("smollm2-135m-weights", "download")]
    assert gateway.deployed == ["smollm2-135m-weights"]
    [stored] = CallStore(tmp_path / "home" / "state" / "modal-calls.json").records()
    assert (stored.key.stage, stored.call_id) == ("download", "fc-fake-1")
    assert [p.bytes_done for p in seen] == [0, result.manifest.bytes_total]

    # The sentinel is read from the volume: no container, no deploy.
    rerun_gateway = FakeModalGateway(tmp_path / "volumes", mirror.url, profile)
    again = platform(tmp_path / "home", rerun_gateway).download(profile, synthetic_repo.v1)
    assert again.cached and again.manifest == result.manifest
    assert platform(tmp_path / "home", rerun_gateway).has_weights(profile, synthetic_repo.v1)
    assert rerun_gateway.spawned == [] and rerun_gateway.deployed == []


def test_big_repo_is_sharded_then_merged(
    mirror: Any, synthetic_repo: SyntheticRepo, tmp_path: Path
) -> None:
    profile = cpu_profile(synthetic_repo.repo_id)
    gateway = FakeModalGateway(tmp_path / "volumes", mirror.url, profile)
    seen: list[Progress] = []

    result = platform(tmp_path / "home", gateway, shard_min_files=2, max_shards=2).download(
        profile, synthetic_repo.v2, seen.append
    )

    functions = [fn for _, fn, _ in gateway.spawned]
    assert functions == ["download", "download"]
    shard_paths = [args[1] for _, _, args in gateway.spawned]
    assert sorted(p for paths in shard_paths for p in paths) == sorted(
        e.path for e in result.manifest.files
    )
    assert gateway.called == [("smollm2-135m-weights", "merge")]
    directory = weights_dir(
        gateway.volume_root(profile.volumes.weights), profile, synthetic_repo.v2
    )
    assert read_sentinel(directory, profile.hub.repo, synthetic_repo.v2) == result.manifest
    done = [p.bytes_done for p in seen]
    assert done == sorted(done) and done[-1] == result.manifest.bytes_total
    keys = [r.key.detail for r in CallStore(tmp_path / "home/state/modal-calls.json").records()]
    assert sorted(keys) == ["1-of-2", "2-of-2"]


def test_after_a_restart_only_the_failed_shard_is_spawned_again(
    mirror: Any, synthetic_repo: SyntheticRepo, tmp_path: Path
) -> None:
    profile = cpu_profile(synthetic_repo.repo_id)
    home = tmp_path / "home"
    first = FakeModalGateway(tmp_path / "volumes", mirror.url, profile)
    first.crash_on_wait = True
    # The shards are polled without blocking: the first one fails, the second keeps running.
    first.script = {"fc-fake-1": [Poll(CallState.RUNNING), Poll(CallState.FAILED,
                                  error=WeightsError("HTTP 503 from the hub: unavailable"))],
                    "fc-fake-2": [Poll(CallState.RUNNING)]}  # fmt: skip
    with pytest.raises(ModalCallError, match=r"shard 1-of-2: call fc-fake-1 failed: .*503"):
        platform(home, first, shard_min_files=2, max_shards=2).download(profile, synthetic_repo.v2)
    assert len(first.spawned) == 2

    second = FakeModalGateway(tmp_path / "volumes", mirror.url, profile, first_call_number=3)
    second.results["fc-fake-2"] = first.results["fc-fake-2"]  # shard 2 finished meanwhile
    second.script = {"fc-fake-1": [Poll(CallState.FAILED, error=WeightsError("503"))]}

    result = platform(home, second, shard_min_files=2, max_shards=2).download(
        profile, synthetic_repo.v2
    )

    assert [args[1] for _, _, args in second.spawned] == [first.spawned[0][2][1]]
    assert second.called == [("smollm2-135m-weights", "merge")]
    assert not result.cached
    records = {
        r.key.detail: r.call_id for r in CallStore(home / "state/modal-calls.json").records()
    }
    assert records == {"1-of-2": "fc-fake-3", "2-of-2": "fc-fake-2"}


def compile_then_crash(
    profile: Profile, revision: str, home: Path, tmp_path: Path, endpoint: str
) -> FakeModalGateway:
    """An orchestrator that spawned the compile and died while waiting on it; the call's
    marker is not committed yet as far as the next orchestrator can see."""
    first = FakeModalGateway(tmp_path / "volumes", endpoint, profile)
    first.crash_on_wait = True
    with pytest.raises(SimulatedCrash):
        platform(home, first).compile(profile, revision)
    marker_dir = deepgemm_dir(first.volume_root(str(profile.volumes.deepgemm)), profile)
    for marker in (marker_dir / "markers").glob("*.json"):
        marker.unlink()
    return first


def test_a_restarted_orchestrator_reattaches_to_the_running_compile(
    mirror: Any, synthetic_repo: SyntheticRepo, tmp_path: Path
) -> None:
    profile = gpu_profile(synthetic_repo.repo_id)
    home = tmp_path / "home"
    first = compile_then_crash(profile, synthetic_repo.v1, home, tmp_path, mirror.url)
    assert [fn for _, fn, _ in first.spawned] == ["compile"]
    [stored] = CallStore(home / "state" / "modal-calls.json").records()
    assert stored.call_id == "fc-fake-1" and stored.key.stage == "compile"

    second = FakeModalGateway(tmp_path / "volumes", mirror.url, profile)
    second.script = {
        "fc-fake-1": [
            Poll(CallState.RUNNING),  # the probe: still compiling
            Poll(CallState.SUCCEEDED, result=first.results["fc-fake-1"]),  # the wait
        ]
    }
    result = platform(home, second).compile(profile, synthetic_repo.v1)

    assert result.status == "compiled" and result.key == stored.key.detail
    assert second.spawned == [] and second.deployed == []  # no second 8-GPU job


def test_an_unanswered_poll_backs_off_and_waits_on_the_same_compile(
    mirror: Any, synthetic_repo: SyntheticRepo, tmp_path: Path
) -> None:
    profile = gpu_profile(synthetic_repo.repo_id)
    home = tmp_path / "home"
    first = compile_then_crash(profile, synthetic_repo.v1, home, tmp_path, mirror.url)

    second = FakeModalGateway(tmp_path / "volumes", mirror.url, profile)
    unavailable = Poll(CallState.UNKNOWN, error=modal.exception.ServiceError("UNAVAILABLE"))
    second.script = {"fc-fake-1": [
        unavailable,  # the probe after the restart
        unavailable, unavailable,  # two waits Modal's API does not answer
        Poll(CallState.SUCCEEDED, result=first.results["fc-fake-1"]),
    ]}  # fmt: skip
    slept: list[float] = []
    restarted = ModalPlatform(home, environment="test", endpoint=second.endpoint,
                              gateway=second, sleep=slept.append)  # fmt: skip
    result = restarted.compile(profile, synthetic_repo.v1)

    assert result.status == "compiled"
    assert second.spawned == [] and second.deployed == []  # no second 8-GPU job
    assert slept == [5.0, 10.0]  # backed off, did not spin


def test_a_failed_compile_is_spawned_anew_and_the_record_replaced(
    mirror: Any, synthetic_repo: SyntheticRepo, tmp_path: Path
) -> None:
    profile = gpu_profile(synthetic_repo.repo_id)
    home = tmp_path / "home"
    gateway = FakeModalGateway(tmp_path / "volumes", mirror.url, profile)
    key = platform(home, gateway).prep._cache_key(profile, synthetic_repo.v1)
    store = CallStore(home / "state" / "modal-calls.json")
    old = CallRecord(
        key=CallKey(stage="compile", model=profile.name, revision=synthetic_repo.v1,
                    detail=key, environment="test"),
        call_id="fc-old", app="glm-5.1-compile", function="compile",
        spawned_at=datetime(2026, 11, 1, tzinfo=UTC),
    )  # fmt: skip
    store.put(old)
    gateway.script = {"fc-old": [Poll(CallState.FAILED, error=CompileFailed("server died"))]}

    result = platform(home, gateway).compile(profile, synthetic_repo.v1)

    assert result.status == "compiled"
    assert [fn for _, fn, _ in gateway.spawned] == ["compile"]
    assert store.get(old.key).call_id == "fc-fake-1"  # type: ignore[union-attr]


def test_an_expired_or_finished_compile_record(
    mirror: Any, synthetic_repo: SyntheticRepo, tmp_path: Path
) -> None:
    profile = gpu_profile(synthetic_repo.repo_id)
    home = tmp_path / "home"
    gateway = FakeModalGateway(tmp_path / "volumes", mirror.url, profile)
    key = platform(home, gateway).prep._cache_key(profile, synthetic_repo.v1)
    call_key = CallKey(
        stage="compile", model=profile.name, revision=synthetic_repo.v1, detail=key,
        environment="test",
    )  # fmt: skip
    store = CallStore(home / "state" / "modal-calls.json")
    store.put(CallRecord(key=call_key, call_id="fc-done", app="a", function="compile",
                         spawned_at=datetime(2026, 11, 1, tzinfo=UTC)))  # fmt: skip
    finished = {"status": "compiled", "reason": "compiled", "key": key, "marker": "/m",
                "seconds": 1.0}  # fmt: skip
    gateway.script = {"fc-done": [Poll(CallState.SUCCEEDED, result=finished)]}

    assert platform(home, gateway).compile(profile, synthetic_repo.v1).marker == "/m"
    assert gateway.spawned == []

    gateway.script = {"fc-done": [Poll(CallState.EXPIRED)]}
    assert platform(home, gateway).compile(profile, synthetic_repo.v1).status == "compiled"
    assert [fn for _, fn, _ in gateway.spawned] == ["compile"]


def test_a_changed_kernel_flag_does_not_attach_to_the_old_compile(
    mirror: Any, synthetic_repo: SyntheticRepo, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    profile = gpu_profile(synthetic_repo.repo_id)
    gateway = FakeModalGateway(tmp_path / "volumes", mirror.url, profile)
    gateway.crash_on_wait = True
    with pytest.raises(SimulatedCrash):
        platform(home, gateway).compile(profile, synthetic_repo.v1)

    changed = gpu_profile(synthetic_repo.repo_id, **{"moe-runner-backend": "triton"})
    other = FakeModalGateway(tmp_path / "volumes", mirror.url, changed, first_call_number=2)
    other.script = {"fc-fake-1": [Poll(CallState.RUNNING)]}  # would be attached to if keys matched
    result = platform(home, other).compile(changed, synthetic_repo.v1)

    assert [fn for _, fn, _ in other.spawned] == ["compile"]
    assert other.waits == 1  # waited on its own new call, fc-fake-2, not the old one
    assert result.key != CallStore(home / "state/modal-calls.json").records()[0].key.detail


def test_a_compiled_marker_on_the_volume_starts_no_gpu_container(
    mirror: Any, synthetic_repo: SyntheticRepo, tmp_path: Path
) -> None:
    profile = gpu_profile(synthetic_repo.repo_id)
    gateway = FakeModalGateway(tmp_path / "volumes", mirror.url, profile)
    first = platform(tmp_path / "home", gateway).compile(profile, synthetic_repo.v1)
    assert first.status == "compiled"

    rerun = FakeModalGateway(tmp_path / "volumes", mirror.url, profile)
    again = platform(tmp_path / "home", rerun).compile(profile, synthetic_repo.v1)

    assert again.status == "cached" and again.key == first.key
    assert again.marker == str(
        marker_path(deepgemm_dir(Path("/deepgemm"), profile), str(first.key))
    )
    assert rerun.spawned == [] and rerun.deployed == []


def test_a_failing_call_raises_one_line_and_keeps_its_record(
    mirror: Any, synthetic_repo: SyntheticRepo, tmp_path: Path
) -> None:
    profile = gpu_profile(synthetic_repo.repo_id)
    gateway = FakeModalGateway(tmp_path / "volumes", mirror.url, profile)
    gateway.script = {
        "fc-fake-1": [Poll(CallState.FAILED, error=CompileFailed("exit 1 without success\nlog"))]
    }
    with pytest.raises(ModalCallError) as failure:
        platform(tmp_path / "home", gateway).compile(profile, synthetic_repo.v1)
    assert str(failure.value) == (
        "compile: call fc-fake-1 failed: CompileFailed: exit 1 without success"
    )
    assert isinstance(failure.value.__cause__, CompileFailed)
    assert [r.call_id for r in CallStore(tmp_path / "home/state/modal-calls.json").records()] == [
        "fc-fake-1"
    ]


def test_verify_runs_on_the_deployed_weights_app(
    mirror: Any, synthetic_repo: SyntheticRepo, tmp_path: Path
) -> None:
    profile = cpu_profile(synthetic_repo.repo_id)
    gateway = FakeModalGateway(tmp_path / "volumes", mirror.url, profile)
    modal_platform = platform(tmp_path / "home", gateway)
    modal_platform.download(profile, synthetic_repo.v1)

    result = modal_platform.verify(profile, synthetic_repo.v1)

    assert result.passed and result.compile_status == "not-required"
    assert gateway.called == [("smollm2-135m-weights", "verify")]
    assert gateway.deployed == ["smollm2-135m-weights"]  # once per process


def test_resolve_is_a_local_call_and_refs_must_be_resolved_first(
    mirror: Any, synthetic_repo: SyntheticRepo, tmp_path: Path
) -> None:
    profile = cpu_profile(synthetic_repo.repo_id)
    gateway = FakeModalGateway(tmp_path / "volumes", mirror.url, profile)
    modal_platform = platform(tmp_path / "home", gateway)
    assert modal_platform.resolve(profile, "v1") == synthetic_repo.v1
    with pytest.raises(WeightsError, match="must be resolved"):
        modal_platform.download(profile, "main")
    assert gateway.spawned == [] and gateway.called == []


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


class FakeAppMeetingAnOldVolume:
    """FAKE: an App whose deploy meets the profile's weights volume as v1 where v2 is asked
    for. The error is the SDK's own (modal.volume._validate_volume_version, which a deploy
    calls while hydrating the volume); only a Modal server holding such a volume produces it."""

    def __init__(self, error: Exception | None = None) -> None:
        self.error = error

    def deploy(self, environment_name: str | None = None) -> None:
        if self.error is not None:
            raise self.error
        modal.volume._validate_volume_version(2, 1, "glm51-weights")


def test_a_weights_volume_of_another_version_fails_the_deploy_with_what_to_do() -> None:
    with pytest.raises(VolumeVersionMismatch) as failure:
        ModalGateway().deploy(FakeAppMeetingAnOldVolume())  # type: ignore[arg-type]
    message = str(failure.value)
    assert "\n" not in message
    assert "'glm51-weights' is v1, but rollout needs v2" in message
    assert "volumes.weights" in message and "`modal volume delete glm51-weights`" in message
    assert isinstance(failure.value.__cause__, modal.exception.InvalidError)


def test_other_deploy_errors_pass_unchanged() -> None:
    other = modal.exception.InvalidError("Deployment strategy must be 'rolling' or 'recreate'")
    with pytest.raises(modal.exception.InvalidError) as failure:
        ModalGateway().deploy(FakeAppMeetingAnOldVolume(other))  # type: ignore[arg-type]
    assert failure.value is other
