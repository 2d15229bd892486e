"""Modal Apps built offline from the profiles; specs asserted with `.info()`.

The loopback guard in conftest.py makes any attempt to reach Modal's API fail these tests.
"""

from __future__ import annotations

import pytest

from serving import modal_app
from serving.profile import load_profile

REVISION = "0123456789abcdef0123456789abcdef01234567"


def _mounts(info: object) -> dict[str, tuple[str, bool]]:
    volumes = info.volumes  # type: ignore[attr-defined]
    return {path: (mount.name, mount.read_only) for path, mount in volumes.items()}


def test_glm51_compile_asks_for_eight_b200_and_mounts_only_the_cache_volume() -> None:
    info = modal_app.build_compile_app(load_profile("glm-5.1")).compile.info()
    assert info.gpus == [("B200", 8)]
    # It compiles on dummy weights from the config it fetches into the cache volume: the
    # weights volume is not needed, so the compile never waits for the download.
    assert _mounts(info) == {"/deepgemm": ("glm51-deepgemm-cache", False)}
    assert info.timeout == modal_app.COMPILE_TIMEOUT
    assert info.max_retries == 0  # retries belong to the Prefect task, not a second GPU job
    assert info.secrets == ["modal.Secret.from_name('huggingface-secret')"]


def test_weights_functions_are_cpu_only_and_retried() -> None:
    app = modal_app.build_weights_app(load_profile("glm-5.1"))
    assert app.app.name == "glm-5.1-weights"
    for function in (app.download, app.merge, app.verify):
        info = function.info()
        assert info.gpus == []
        assert info.max_retries == 2
        assert info.secrets == ["modal.Secret.from_name('huggingface-secret')"]
    assert _mounts(app.download.info()) == {"/weights": ("glm51-weights", False)}
    assert _mounts(app.merge.info()) == {"/weights": ("glm51-weights", False)}
    assert app.download.info().memory_mib == modal_app.DOWNLOAD_MEMORY_MIB
    # Merging reads no weights: a small container.
    assert app.merge.info().memory_mib == modal_app.MERGE_MEMORY_MIB
    assert app.merge.info().timeout == modal_app.MERGE_TIMEOUT


def test_verify_reads_the_compile_marker_from_a_read_only_cache_mount() -> None:
    glm = modal_app.build_weights_app(load_profile("glm-5.1")).verify.info()
    assert _mounts(glm) == {
        "/weights": ("glm51-weights", False),  # verify re-fetches bad files
        "/deepgemm": ("glm51-deepgemm-cache", True),
    }
    smol = modal_app.build_weights_app(load_profile("smollm2-135m")).verify.info()
    assert _mounts(smol) == {"/weights": ("smollm2-weights", False)}


@pytest.mark.parametrize(
    ("name", "gpus", "startup"),
    [
        ("glm-5.1", [("B200", 8)], 1800),
        ("glm-4.7", [("H200", 4)], 1800),
        ("deepseek-v4-pro", [("B200", 8)], 2400),
        ("qwen3-8b", [("H100!", 1)], 600),
    ],
)
def test_release_server_spec(name: str, gpus: list[tuple[str, int]], startup: int) -> None:
    profile = load_profile(name)
    release = modal_app.build_release_app(profile, REVISION)
    info = release.server.info()
    assert release.app.name == f"{name}-{REVISION[:8]}"
    assert info.gpus == gpus
    assert info.startup_timeout == startup
    assert info.port == modal_app.ENGINE_PORT
    # Serving never writes the volumes.
    assert all(read_only for _, read_only in _mounts(info).values())
    assert ("/deepgemm" in _mounts(info)) == profile.deepgemm
    assert info.exit_grace_period == min(
        int(profile.canary.retire_grace_seconds), modal_app.MAX_EXIT_GRACE
    )


def test_release_secrets_carry_the_api_key_only_where_configured() -> None:
    glm = modal_app.build_release_app(load_profile("glm-5.1"), REVISION).server.info()
    qwen = modal_app.build_release_app(load_profile("qwen3-8b"), REVISION).server.info()
    assert glm.secrets == ["modal.Secret.from_name('glm51-api-key')"]
    assert qwen.secrets == []


def test_router_is_one_cpu_container_with_the_admin_secret() -> None:
    router = modal_app.build_router_app(load_profile("glm-5.1"))
    info = router.server.info()
    assert router.app.name == "glm-5.1-router"
    assert info.gpus == []
    assert f"modal.Secret.from_name('{modal_app.ROUTER_ADMIN_SECRET}')" in info.secrets


def test_cpu_profile_has_no_modal_engine() -> None:
    with pytest.raises(ValueError, match="no container image"):
        modal_app.build_release_app(load_profile("smollm2-135m"), REVISION)
    with pytest.raises(ValueError, match="does not precompile"):
        modal_app.build_compile_app(load_profile("smollm2-135m"))
