"""The Modal container bodies of prep (download, merge, verify, compile), run here against a
temporary directory as the volume, a FakeVolume that records reload/commit, and the local
mirror."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import modal.exception
import modal.volume
import pytest
from modal._utils.async_utils import synchronizer

from dev.demo_model import make_synthetic_repo
from dev.mirror_store import KiB, MirrorStore
from serving.config.layout import (
    SENTINEL_NAME,
    compile_model_dir,
    deepgemm_dir,
    dummy_weights_dir,
    weights_dir,
)
from serving.config.loader import load_profile
from serving.domain.release import VerifyResult
from serving.engines.deepgemm import CompileFailed, CompileResult, read_marker
from serving.engines.sglang import deepgemm_cache_key
from serving.platforms.modal import apps, bodies
from serving.verification import ServingConfigCheck
from serving.weights.download import plan_shards, read_sentinel
from serving.weights.hub import HIGH_PERFORMANCE_ENV, fetch_files
from serving.weights.models import DownloadResult, ShardResult, WeightsError
from tests.mirror_fixtures import SyntheticRepo
from tests.modal_fixtures import (
    FakeCompileRun,
    FakeVolume,
    cpu_profile,
    gpu_profile,
    metadata_requests,
    no_gpu_check,
)

TOKEN = "hf_test_SECRET_token_value_0987654321"
MISSING_SHA = "f" * 40
BROKEN_CONFIG_REPO = "test-org/broken-config"
COMPILE_TIMEOUT_S = 60


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


def test_serving_config_body_fetches_config_only_and_reports_a_config_that_does_not_parse(
    mirror: Any, mirror_store: MirrorStore, tmp_path: Path
) -> None:
    """Dummy weights' verify: the config SGLang builds the random model from must parse; the
    directory is the dummy one, with no weight file and no sentinel."""
    profile = cpu_profile(BROKEN_CONFIG_REPO)
    sha = make_synthetic_repo(mirror_store, BROKEN_CONFIG_REPO, [KiB], seed=3,
                              extra_files={"config.json": b"{not json"})  # fmt: skip
    volume = FakeVolume("weights")

    check = ServingConfigCheck.model_validate(bodies.serving_config_body(
        profile, sha, root=tmp_path, volume=volume, endpoint=mirror.url,
    ))  # fmt: skip

    assert check.directory == str(dummy_weights_dir(tmp_path, profile, sha))
    assert check.files == ["config.json", "generation_config.json"]
    assert volume.events == [("reload", "weights"), ("commit", "weights")]
    assert not weights_dir(tmp_path, profile, sha).exists()
    with pytest.raises(WeightsError, match=r"^dummy weights at .*: no readable config.json"):
        check.proven()


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
    profile, the revision, volume and Dict names) and switches (dummy weights), never a Modal
    object or a profile."""
    profile = load_profile("glm-5.1")
    revision = "0123456789abcdef0123456789abcdef01234567"
    release = apps.build_release_app(profile, revision)
    dummy = apps.build_release_app(profile.with_dummy_weights(), revision)
    router = apps.build_router_app(profile)
    for server, methods in ((release.server, {"start", "serve", "stop"}),
                            (dummy.server, {"start", "serve", "stop"}),
                            (router.server, {"start", "stop"})):  # fmt: skip
        user_cls = synchronizer._translate_in(server)._user_cls
        found = set()
        for name, value in vars(user_cls).items():
            raw = getattr(synchronizer._translate_in(value), "raw_f", None)
            if raw is None:
                continue
            found.add(name)
            cells = [cell.cell_contents for cell in raw.__closure__ or ()]
            assert all(isinstance(value, str | bool) for value in cells), (user_cls.__name__, name)
        assert found == methods
