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

import asyncio
import os
import socket
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import modal.exception
import modal.volume
import pytest
from modal._functions import _Invocation
from modal._utils.async_utils import synchronizer
from modal_proto import api_pb2

from serving.config.layout import SENTINEL_NAME, compile_model_dir, deepgemm_dir, weights_dir
from serving.config.loader import load_profile
from serving.config.profile import HubSource, Profile, Secrets
from serving.domain.release import VerifyResult
from serving.engines.deepgemm import CompileFailed, CompileResult, marker_path, read_marker
from serving.engines.sglang import Command, deepgemm_cache_key
from serving.platforms.modal import apps, bodies, resources
from serving.platforms.modal.calls import (
    CallKey,
    CallRecord,
    CallState,
    CallStore,
    CallStoreError,
    ModalCallError,
    Poll,
    attach_or_spawn,
    probe_call,
)
from serving.platforms.modal.gateway import ModalGateway
from serving.platforms.modal.platform import ModalPlatform
from serving.platforms.modal.prep import shard_count
from serving.platforms.modal.resources import VolumeVersionMismatch
from serving.weights.download import plan_shards, read_sentinel
from serving.weights.hub import HIGH_PERFORMANCE_ENV, fetch_files
from serving.weights.models import DownloadResult, FileEntry, Progress, ShardResult, WeightsError
from tests.mirror_fixtures import SyntheticRepo

TOKEN = "hf_test_SECRET_token_value_0987654321"
MISSING_SHA = "f" * 40
COMPILE_TIMEOUT_S = 60


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


class FakeVolume:
    """Records reload/commit in a shared event list, like a mounted modal.Volume would see them."""

    def __init__(self, name: str, events: list[tuple[str, str]] | None = None) -> None:
        self.name = name
        self.events = events if events is not None else []

    def reload(self) -> None:
        self.events.append(("reload", self.name))

    def commit(self) -> None:
        self.events.append(("commit", self.name))


def cpu_profile(repo_id: str) -> Profile:
    """A profile without DeepGEMM, pointed at the mirror's synthetic repo."""
    return load_profile("smollm2-135m").model_copy(
        update={"hub": HubSource(repo=repo_id, revision="main"), "secrets": Secrets()}
    )


def gpu_profile(repo_id: str, **flags: Any) -> Profile:
    """GLM-5.1 (precompiles DeepGEMM) pointed at the synthetic repo."""
    base = load_profile("glm-5.1")
    engine = base.engine.model_copy(update={"flags": {**base.engine.flags, **flags}})
    return base.model_copy(
        update={
            "hub": HubSource(repo=repo_id, revision="main"),
            "secrets": Secrets(),
            "engine": engine,
        }
    )


class FakeCompileRun:
    """Stands in for run_compile (no GPU here): records the command, optionally fails."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.commands: list[Command] = []

    def __call__(self, command: Command, timeout: float, log: Callable[[str], None]) -> None:
        self.commands.append(command)
        if self.fail:
            raise CompileFailed("DeepGEMM compile failed: the compile server process died")


def no_gpu_check() -> None:
    return None


def metadata_requests(mirror: Any) -> list[str]:
    return [r.path for r in mirror.requests if r.path.startswith("/api/models/")]


# --------------------------------------------------------------------------------------------
# The bodies, against the mirror
# --------------------------------------------------------------------------------------------


def test_download_body_writes_the_sentinel_between_reload_and_commit(
    mirror: Any, synthetic_repo: SyntheticRepo, tmp_path: Path
) -> None:
    profile = cpu_profile(synthetic_repo.repo_id)
    volume = FakeVolume("weights")

    result = DownloadResult.model_validate(
        bodies.download_body(
            profile, synthetic_repo.v1, root=tmp_path, volume=volume, endpoint=mirror.url
        )
    )

    directory = weights_dir(tmp_path, profile, synthetic_repo.v1)
    assert result.directory == directory and not result.cached
    assert read_sentinel(directory, synthetic_repo.repo_id, synthetic_repo.v1) == result.manifest
    assert volume.events == [("reload", "weights"), ("commit", "weights")]
    assert os.environ[HIGH_PERFORMANCE_ENV] == "1"  # hf_xet's high-performance mode was asked for


def test_shards_then_merge_give_one_sentinel_and_no_extra_metadata_calls(
    mirror: Any, synthetic_repo: SyntheticRepo, tmp_path: Path
) -> None:
    profile = cpu_profile(synthetic_repo.repo_id)
    sha = synthetic_repo.v2
    all_files = fetch_files(profile.hub.repo, sha, endpoint=mirror.url)  # the orchestrator's
    files = [entry.model_dump(mode="json") for entry in all_files]
    shards = plan_shards(all_files, 2)
    assert len(shards) == 2
    events: list[tuple[str, str]] = []
    mirror.clear_requests()

    results = [
        bodies.download_body(
            profile,
            sha,
            root=tmp_path,
            volume=FakeVolume(f"shard-{i}", events),
            paths=paths,
            files=files,
            endpoint=mirror.url,
        )
        for i, paths in enumerate(shards)
    ]
    directory = weights_dir(tmp_path, profile, sha)
    assert not (directory / SENTINEL_NAME).exists()  # only the merge writes it
    assert metadata_requests(mirror) == []  # the shards used the file list they were given
    assert [ShardResult.model_validate(r).files != [] for r in results] == [True, True]

    merged = DownloadResult.model_validate(
        bodies.merge_body(
            profile,
            sha,
            results,
            root=tmp_path,
            volume=FakeVolume("merge", events),
            files=files,
            endpoint=mirror.url,
        )
    )

    assert sorted(e.path for e in merged.manifest.files) == sorted(e.path for e in all_files)
    assert read_sentinel(directory, profile.hub.repo, sha) == merged.manifest
    assert events == [
        ("reload", "shard-0"), ("commit", "shard-0"),
        ("reload", "shard-1"), ("commit", "shard-1"),
        ("reload", "merge"), ("commit", "merge"),
    ]  # fmt: skip


def test_merge_with_a_shard_missing_writes_no_sentinel_and_commits_nothing(
    mirror: Any, synthetic_repo: SyntheticRepo, tmp_path: Path
) -> None:
    profile = cpu_profile(synthetic_repo.repo_id)
    sha = synthetic_repo.v1
    all_files = fetch_files(profile.hub.repo, sha, endpoint=mirror.url)
    files = [entry.model_dump(mode="json") for entry in all_files]
    first, _ = plan_shards(all_files, 2)
    one = bodies.download_body(
        profile, sha, root=tmp_path, volume=FakeVolume("shard"), paths=first, files=files,
        endpoint=mirror.url,
    )  # fmt: skip
    volume = FakeVolume("merge")

    with pytest.raises(WeightsError, match="shards did not verify"):
        bodies.merge_body(
            profile, sha, [one], root=tmp_path, volume=volume, files=files, endpoint=mirror.url
        )

    assert not (weights_dir(tmp_path, profile, sha) / SENTINEL_NAME).exists()
    assert volume.events == [("reload", "merge")]


def test_a_failed_download_commits_what_it_has_and_never_shows_the_token(
    mirror: Any, synthetic_repo: SyntheticRepo, tmp_path: Path
) -> None:
    volume = FakeVolume("weights")
    with pytest.raises(WeightsError) as failure:
        bodies.download_body(
            cpu_profile(synthetic_repo.repo_id), MISSING_SHA, root=tmp_path, volume=volume,
            token=TOKEN, endpoint=mirror.url,
        )  # fmt: skip
    assert TOKEN not in str(failure.value)
    # Modal retries the input: files that finished stay on the volume for it.
    assert volume.events == [("reload", "weights"), ("commit", "weights")]


def test_verify_body_refetches_a_corrupted_file_and_commits_the_repair(
    mirror: Any, synthetic_repo: SyntheticRepo, tmp_path: Path
) -> None:
    profile = cpu_profile(synthetic_repo.repo_id)
    sha = synthetic_repo.v1
    download = DownloadResult.model_validate(
        bodies.download_body(
            profile, sha, root=tmp_path, volume=FakeVolume("w"), endpoint=mirror.url
        )
    )
    victim = max(download.manifest.files, key=lambda entry: entry.size).path
    target = download.directory / victim
    target.write_bytes(b"\0" * target.stat().st_size)  # same size, wrong content
    volume = FakeVolume("weights")

    result = VerifyResult.model_validate(
        bodies.verify_body(
            profile, sha, weights_root=tmp_path, weights_volume=volume, endpoint=mirror.url
        )
    )

    assert result.passed and result.repaired == [victim]
    assert result.compile_status == "not-required"
    assert volume.events == [("reload", "weights"), ("commit", "weights")]


def test_compile_body_fetches_the_config_compiles_and_commits_only_on_success(
    mirror: Any, synthetic_repo: SyntheticRepo, tmp_path: Path
) -> None:
    profile = gpu_profile(synthetic_repo.repo_id)
    sha = synthetic_repo.v1
    root = tmp_path / "deepgemm"
    options = {"unavailable": no_gpu_check, "log": lambda line: None}

    failing_volume = FakeVolume("cache")
    with pytest.raises(CompileFailed):
        bodies.compile_body(
            profile, sha, deepgemm_root=root, deepgemm_volume=failing_volume,
            timeout_seconds=COMPILE_TIMEOUT_S, endpoint=mirror.url,
            run=FakeCompileRun(fail=True), **options,
        )  # fmt: skip
    assert failing_volume.events == [("reload", "cache")]  # half-built kernels never committed

    run = FakeCompileRun()
    volume = FakeVolume("cache")
    result = CompileResult.model_validate(
        bodies.compile_body(
            profile,
            sha,
            deepgemm_root=root,
            deepgemm_volume=volume,
            timeout_seconds=COMPILE_TIMEOUT_S,
            endpoint=mirror.url,
            run=run,
            **options,
        )
    )

    model_dir = compile_model_dir(root, profile, sha)
    key = deepgemm_cache_key(profile, (model_dir / "config.json").read_bytes())
    assert result.status == "compiled" and result.key == key
    assert read_marker(deepgemm_dir(root, profile), key) is not None
    [command] = run.commands
    assert str(model_dir) in command.argv  # compiled from the config, not the weights volume
    assert volume.events == [("reload", "cache"), ("commit", "cache")]

    again = CompileResult.model_validate(
        bodies.compile_body(
            profile,
            sha,
            deepgemm_root=root,
            deepgemm_volume=FakeVolume("cache"),
            timeout_seconds=COMPILE_TIMEOUT_S,
            endpoint=mirror.url,
            run=run,
            **options,
        )
    )
    assert again.status == "cached" and len(run.commands) == 1


def test_verify_body_checks_the_marker_of_the_current_cache_key(
    mirror: Any, synthetic_repo: SyntheticRepo, tmp_path: Path
) -> None:
    profile = gpu_profile(synthetic_repo.repo_id)
    sha = synthetic_repo.v2
    weights_root, cache_root = tmp_path / "weights", tmp_path / "deepgemm"
    bodies.download_body(
        profile, sha, root=weights_root, volume=FakeVolume("w"), endpoint=mirror.url
    )

    def verify() -> VerifyResult:
        return VerifyResult.model_validate(
            bodies.verify_body(
                profile,
                sha,
                weights_root=weights_root,
                weights_volume=FakeVolume("weights"),
                deepgemm_root=cache_root,
                deepgemm_volume=cache_volume,
                endpoint=mirror.url,
            )
        )

    cache_volume = FakeVolume("cache")
    before = verify()
    assert before.compile_status == "missing" and not before.passed
    assert any(str(before.compile_key) in problem for problem in before.problems)

    bodies.compile_body(
        profile, sha, deepgemm_root=cache_root, deepgemm_volume=FakeVolume("cache"),
        timeout_seconds=COMPILE_TIMEOUT_S, endpoint=mirror.url, run=FakeCompileRun(),
        unavailable=no_gpu_check, log=lambda line: None,
    )  # fmt: skip
    after = verify()
    assert after.passed and after.compile_status == "compiled"
    assert after.compile_key == before.compile_key
    # The cache is mounted read-only in verify: reloaded, never committed.
    assert ("commit", "cache") not in cache_volume.events
    assert ("reload", "cache") in cache_volume.events


class FakeRefusingVolume(FakeVolume):
    """FAKE: a read-only mount whose reload() the server refuses, a fault a local directory
    cannot produce (modal 1.6.4 does not check the flag client side)."""

    def reload(self) -> None:
        super().reload()
        raise modal.exception.InvalidError("volume is mounted read-only")


def test_verify_body_survives_a_refused_reload_of_the_read_only_cache(
    mirror: Any, synthetic_repo: SyntheticRepo, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The same guard as a release container's start: a fresh container already mounts the
    latest commit, so verification goes on against the mounted cache, with a warning."""
    profile = gpu_profile(synthetic_repo.repo_id)
    sha = synthetic_repo.v2
    weights_root, cache_root = tmp_path / "weights", tmp_path / "deepgemm"
    bodies.download_body(
        profile, sha, root=weights_root, volume=FakeVolume("w"), endpoint=mirror.url
    )
    bodies.compile_body(
        profile, sha, deepgemm_root=cache_root, deepgemm_volume=FakeVolume("cache"),
        timeout_seconds=COMPILE_TIMEOUT_S, endpoint=mirror.url, run=FakeCompileRun(),
        unavailable=no_gpu_check, log=lambda line: None,
    )  # fmt: skip
    cache_volume = FakeRefusingVolume("cache")
    result = VerifyResult.model_validate(
        bodies.verify_body(
            profile,
            sha,
            weights_root=weights_root,
            weights_volume=FakeVolume("weights"),
            deepgemm_root=cache_root,
            deepgemm_volume=cache_volume,
            endpoint=mirror.url,
        )
    )
    assert result.passed and result.compile_status == "compiled"
    assert cache_volume.events == [("reload", "cache")]
    assert "volume reload failed (InvalidError)" in caplog.text


def test_the_modal_closures_carry_only_strings_into_the_container() -> None:
    """Serialized functions are pickled with their closure: a captured Modal object (an
    unhydrated Volume) would fail the deploy. Reads modal's private `_raw_f` (modal 1.6.4)."""
    weights = apps.build_weights_app(load_profile("glm-5.1"))
    compile_app = apps.build_compile_app(load_profile("glm-5.1"))
    for function in (weights.download, weights.merge, weights.verify, compile_app.compile):
        raw = synchronizer._translate_in(function)._raw_f
        cells = [cell.cell_contents for cell in raw.__closure__ or ()]
        assert cells and all(isinstance(value, str) for value in cells), raw.__name__


def test_the_release_and_router_classes_carry_only_strings_into_the_container() -> None:
    """The same for the Server classes: every lifecycle method closes over names only (the
    profile, the revision, volume and Dict names), never a Modal object or a profile."""
    profile = load_profile("glm-5.1")
    release = apps.build_release_app(profile, "0123456789abcdef0123456789abcdef01234567")
    router = apps.build_router_app(profile)
    for server, methods in ((release.server, {"start", "serve", "stop"}),
                            (router.server, {"start", "stop"})):  # fmt: skip
        user_cls = synchronizer._translate_in(server)._user_cls
        found = set()
        for name, value in vars(user_cls).items():
            raw = getattr(synchronizer._translate_in(value), "raw_f", None)
            if raw is None:
                continue
            found.add(name)
            cells = [cell.cell_contents for cell in raw.__closure__ or ()]
            assert all(isinstance(value, str) for value in cells), (user_cls.__name__, name)
        assert found == methods


# --------------------------------------------------------------------------------------------
# CallStore
# --------------------------------------------------------------------------------------------


def record(call_id: str, stage: str = "compile", detail: str = "key1") -> CallRecord:
    return CallRecord(
        key=CallKey(stage=stage, model="glm-5.1", revision="a" * 40, detail=detail),  # type: ignore[arg-type]
        call_id=call_id,
        app="glm-5.1-compile",
        function="compile",
        spawned_at=datetime(2026, 11, 1, tzinfo=UTC),
    )


def test_call_store_survives_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "state" / "modal-calls.json"
    CallStore(path).put(record("fc-1"))
    CallStore(path).put(record("fc-2", stage="download", detail=""))

    reopened = CallStore(path)  # a new process after a crash reads the same file
    assert reopened.get(record("x").key) == record("fc-1")
    assert reopened.get(record("x", stage="download", detail="").key) == record(
        "fc-2", stage="download", detail=""
    )
    assert reopened.get(record("x", detail="other-key").key) is None
    reopened.remove(record("x").key)
    assert [r.call_id for r in CallStore(path).records()] == ["fc-2"]


def test_call_store_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "modal-calls.json"
    store = CallStore(path)
    store.put(record("fc-1"))
    before = path.read_text()

    def crash(*args: object) -> None:
        raise OSError("simulated crash before the rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        store.put(record("fc-2", detail="key2"))
    monkeypatch.undo()

    assert path.read_text() == before  # the old file, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "modal-calls.json",
        "modal-calls.json.lock",
    ]
    assert CallStore(path).get(record("x").key) == record("fc-1")


def test_call_store_loses_no_record_to_concurrent_writers(tmp_path: Path) -> None:
    path = tmp_path / "modal-calls.json"
    writers = 16
    barrier = threading.Barrier(writers)

    def write(i: int) -> None:
        barrier.wait()
        CallStore(path).put(record(f"fc-{i}", detail=f"key{i}"))

    threads = [threading.Thread(target=write, args=(i,)) for i in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(r.call_id for r in CallStore(path).records()) == sorted(
        f"fc-{i}" for i in range(writers)
    )


def test_an_unreadable_call_store_stops_rather_than_respawning(tmp_path: Path) -> None:
    path = tmp_path / "modal-calls.json"
    path.write_text("{not json")
    with pytest.raises(CallStoreError, match=r"modal-calls\.json is unreadable"):
        CallStore(path).get(record("x").key)


# --------------------------------------------------------------------------------------------
# attach_or_spawn and probe_call
# --------------------------------------------------------------------------------------------


class FakeCallProbe:
    """Answers a probe with a fixed Poll and remembers which call ids were asked about."""

    def __init__(self, poll: Poll) -> None:
        self.poll = poll
        self.asked: list[str] = []

    def __call__(self, call_id: str) -> Poll:
        self.asked.append(call_id)
        return self.poll


def test_no_record_spawns_without_probing() -> None:
    probe = FakeCallProbe(Poll(CallState.RUNNING))
    decision = attach_or_spawn(None, probe)
    assert decision.action == "spawn" and probe.asked == []


def test_a_running_call_is_attached_to() -> None:
    probe = FakeCallProbe(Poll(CallState.RUNNING))
    decision = attach_or_spawn(record("fc-7"), probe)
    assert (decision.action, decision.call_id) == ("attach", "fc-7")
    assert probe.asked == ["fc-7"]


def test_a_finished_call_gives_its_result() -> None:
    decision = attach_or_spawn(
        record("fc-7"), FakeCallProbe(Poll(CallState.SUCCEEDED, result={"status": "compiled"}))
    )
    assert (decision.action, decision.result) == ("use-result", {"status": "compiled"})


def test_a_failed_call_is_spawned_anew() -> None:
    failed = Poll(CallState.FAILED, error=CompileFailed("the compile server process died\ntail"))
    decision = attach_or_spawn(record("fc-7"), FakeCallProbe(failed))
    assert decision.action == "spawn"
    assert decision.reason == "call fc-7 failed: CompileFailed: the compile server process died"


def test_an_expired_call_is_spawned_anew() -> None:
    decision = attach_or_spawn(record("fc-7"), FakeCallProbe(Poll(CallState.EXPIRED)))
    assert decision.action == "spawn" and "expired" in decision.reason


class FakeFunctionCall:
    """A modal.FunctionCall stand-in: get() raises or returns what it was given."""

    def __init__(self, outcome: object) -> None:
        self.outcome = outcome
        self.timeouts: list[float | None] = []

    def get(self, timeout: float | None = None) -> object:
        self.timeouts.append(timeout)
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        return self.outcome


@pytest.mark.parametrize(
    ("outcome", "state"),
    [
        # Modal's own bare TimeoutError (running) is told apart by where it was raised: see
        # test_modal_s_still_running_is_read_from_where_modal_raises_it.
        (modal.exception.OutputExpiredError(), CallState.EXPIRED),
        (modal.exception.FunctionTimeoutError("ran past its timeout"), CallState.FAILED),
        (TimeoutError("timed out"), CallState.FAILED),  # raised BY the remote function
        (WeightsError("repo x/y not found"), CallState.FAILED),
        (modal.exception.RemoteError("boom"), CallState.FAILED),
        ({"status": "compiled"}, CallState.SUCCEEDED),
    ],
)
def test_probe_call_reads_modal_outcomes(outcome: object, state: CallState) -> None:
    call = FakeFunctionCall(outcome)
    poll = probe_call(call)
    assert poll.state is state
    assert call.timeouts == [0]  # a probe never blocks
    if state is CallState.SUCCEEDED:
        assert poll.result == outcome
    if state is CallState.FAILED:
        assert poll.error is outcome


class ModalStillRunning:
    """get() runs modal's own poll_function on an empty answer with one input unfinished:
    the TimeoutError modal 1.6.4 raises while a call runs, from where it raises it."""

    def get(self, timeout: float | None = None) -> object:
        invocation = _Invocation.__new__(_Invocation)

        async def no_output_yet(**_: object) -> api_pb2.FunctionGetOutputsResponse:
            return api_pb2.FunctionGetOutputsResponse(num_unfinished_inputs=1)

        invocation.pop_function_call_outputs = no_output_yet  # type: ignore[method-assign]
        return asyncio.run(invocation.poll_function(timeout=timeout))


def remote_wait_for_timeout() -> TimeoutError:
    """What a remote body's `asyncio.wait_for` raises: a bare TimeoutError, like Modal's own."""

    async def too_slow() -> None:
        await asyncio.wait_for(asyncio.sleep(1), timeout=0)

    try:
        asyncio.run(too_slow())
    except TimeoutError as exc:
        return exc
    raise AssertionError("wait_for did not time out")


def test_modal_s_still_running_is_read_from_where_modal_raises_it() -> None:
    assert probe_call(ModalStillRunning()).state is CallState.RUNNING


def test_a_remote_bare_timeout_error_is_a_failed_call_not_a_running_one() -> None:
    exc = remote_wait_for_timeout()
    assert type(exc) is TimeoutError and not exc.args  # indistinguishable by type and message
    poll = probe_call(FakeFunctionCall(exc))
    assert poll.state is CallState.FAILED and poll.error is exc


@pytest.mark.parametrize(
    "error",
    [
        modal.exception.ServiceError("UNAVAILABLE"),
        modal.exception.InternalError("INTERNAL"),
        modal.exception.ResourceExhaustedError("RESOURCE_EXHAUSTED"),
    ],
)
def test_a_transient_api_error_is_unknown_and_never_spawns_again(error: Exception) -> None:
    poll = probe_call(FakeFunctionCall(error))
    assert poll.state is CallState.UNKNOWN and poll.error is error
    decision = attach_or_spawn(record("fc-7"), FakeCallProbe(poll))
    assert (decision.action, decision.call_id) == ("attach", "fc-7")


def test_the_same_error_raised_by_the_remote_function_is_a_failure() -> None:
    error = modal.exception.InternalError("raised by the body")
    error.__line_cache__ = {}  # type: ignore[attr-defined]  # as modal marks a remote exception
    assert probe_call(FakeFunctionCall(error)).state is CallState.FAILED


def test_probe_call_reraises_local_modal_trouble() -> None:
    # No token here is not "the call failed": that would start a second job.
    with pytest.raises(modal.exception.AuthError):
        probe_call(FakeFunctionCall(modal.exception.AuthError("token missing")))


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
