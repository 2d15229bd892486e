"""Modal Apps built offline from the profiles; specs asserted with `.info()`.

The loopback guard in conftest.py makes any attempt to reach Modal's API fail these tests.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import modal
import pytest
from modal._partial_function import _find_partial_methods_for_user_cls, _PartialFunctionFlags
from modal._serialization import serialize
from modal._utils.async_utils import synchronizer

from serving.config.loader import load_profile
from serving.core.home import REPO_ROOT
from serving.platforms.modal import apps, resources, server_bodies

REVISION = "0123456789abcdef0123456789abcdef01234567"


def _mounts(info: object) -> dict[str, tuple[str, bool]]:
    volumes = info.volumes  # type: ignore[attr-defined]
    return {path: (mount.name, mount.read_only) for path, mount in volumes.items()}


def _deprecated_read_only_mounts(function: object) -> list[str]:
    """Mounts made read-only with the deprecated `Volume.read_only()` (modal 1.6.4 sets the
    client-side `_read_only` flag only there; `with_mount_options` sets the mount options).
    Reads modal's private `_spec` and `_service_function`."""
    raw = synchronizer._translate_in(function)
    raw = getattr(raw, "_service_function", None) or raw
    return [str(path) for path, volume in raw._spec.volumes.items() if volume._read_only]


def test_glm51_compile_asks_for_eight_b200_and_mounts_only_the_cache_volume() -> None:
    info = apps.build_compile_app(load_profile("glm-5.1")).compile.info()
    assert info.gpus == [("B200", 8)]
    # It compiles on dummy weights from the config it fetches into the cache volume: the
    # weights volume is not needed, so the compile never waits for the download.
    assert _mounts(info) == {"/deepgemm": ("glm51-deepgemm-cache", False)}
    assert info.timeout == resources.COMPILE_TIMEOUT
    assert info.max_retries == 0  # retries belong to the Prefect task, not a second GPU job
    assert info.secrets == ["modal.Secret.from_name('huggingface-secret')"]


def test_weights_functions_are_cpu_only_and_retried() -> None:
    app = apps.build_weights_app(load_profile("glm-5.1"))
    assert app.app.name == "glm-5.1-weights"
    for function in (app.download, app.merge, app.verify, app.serving_config):
        info = function.info()
        assert info.gpus == []
        assert info.max_retries == 2
        assert info.secrets == ["modal.Secret.from_name('huggingface-secret')"]
    assert _mounts(app.download.info()) == {"/weights": ("glm51-weights", False)}
    assert _mounts(app.merge.info()) == {"/weights": ("glm51-weights", False)}
    assert app.download.info().memory_mib == resources.DOWNLOAD_MEMORY_MIB
    # Merging reads no weights: a small container.
    assert app.merge.info().memory_mib == resources.MERGE_MEMORY_MIB
    assert app.merge.info().timeout == resources.MERGE_TIMEOUT
    # Dummy weights' config and tokenizer go to the weights volume, a few MB in a small container.
    assert _mounts(app.serving_config.info()) == {"/weights": ("glm51-weights", False)}
    assert app.serving_config.info().memory_mib == resources.SERVING_CONFIG_MEMORY_MIB


def test_verify_reads_the_compile_marker_from_a_read_only_cache_mount() -> None:
    glm = apps.build_weights_app(load_profile("glm-5.1")).verify.info()
    assert _mounts(glm) == {
        "/weights": ("glm51-weights", False),  # verify re-fetches bad files
        "/deepgemm": ("glm51-deepgemm-cache", True),
    }
    verify = apps.build_weights_app(load_profile("glm-5.1")).verify
    assert _deprecated_read_only_mounts(verify) == []
    smol = apps.build_weights_app(load_profile("smollm2-135m")).verify.info()
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
    release = apps.build_release_app(profile, REVISION)
    info = release.server.info()
    assert release.app.name == f"{name}-{REVISION[:8]}"
    assert info.gpus == gpus
    assert info.startup_timeout == startup
    assert info.port == resources.ENGINE_PORT
    # Serving never writes the volumes.
    assert all(read_only for _, read_only in _mounts(info).values())
    assert _deprecated_read_only_mounts(release.server) == []
    assert ("/deepgemm" in _mounts(info)) == profile.deepgemm
    assert info.exit_grace_period == min(
        int(profile.canary.retire_grace_seconds), resources.MAX_EXIT_GRACE
    )
    # The engine's drain deadline leaves the supervisor time to SIGKILL within the grace.
    assert server_bodies.release_drain_seconds(profile) < info.exit_grace_period
    # The router reaches releases with the engine's Bearer key only (see build_release_app).
    assert info.unauthenticated


def _server_options(monkeypatch: pytest.MonkeyPatch, build: Any) -> dict[str, Any]:
    """What a factory asks of `app.server`: scaling and snapshot options are not in `.info()`
    (modal 1.6.4 builds them into the definition only at deploy time)."""
    seen: dict[str, Any] = {}
    real = modal.App.server

    def spy(self: modal.App, **options: Any) -> Any:
        seen.update(options)
        return real(self, **options)

    monkeypatch.setattr(modal.App, "server", spy)
    build()
    return seen


@pytest.mark.parametrize("name", ["glm-5.1", "qwen3-8b"])
def test_release_scaling_and_memory_snapshot_options(
    monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    profile = load_profile(name)
    options = _server_options(monkeypatch, lambda: apps.build_release_app(profile, REVISION))
    scaling = profile.scaling
    assert options["min_containers"] == scaling.min_containers
    assert options["max_containers"] == scaling.max_containers
    assert options["target_concurrency"] == scaling.target_inputs
    assert options["max_concurrency"] == scaling.max_inputs
    assert options["scaledown_window"] == scaling.scaledown_window_seconds
    assert options["serialized"] is True
    snapshot = profile.engine.memory_snapshot
    assert snapshot == (name == "qwen3-8b")
    assert options["enable_memory_snapshot"] is snapshot
    assert options["experimental_options"] == ({"enable_gpu_snapshot": True} if snapshot else None)


@pytest.mark.parametrize("name", ["glm-5.1", "qwen3-8b"])
def test_only_snapshot_profiles_start_the_engine_before_the_snapshot(name: str) -> None:
    """snap=True: the engine starts, warms up and releases its GPU memory before Modal takes
    the snapshot; `serve` (snap=False) resumes it and starts the crash monitor after."""
    profile = load_profile(name)
    server = apps.build_release_app(profile, REVISION).server
    user_cls = synchronizer._translate_in(server)._user_cls
    before = _find_partial_methods_for_user_cls(user_cls, _PartialFunctionFlags.ENTER_PRE_SNAPSHOT)
    after = _find_partial_methods_for_user_cls(user_cls, _PartialFunctionFlags.ENTER_POST_SNAPSHOT)
    exits = _find_partial_methods_for_user_cls(user_cls, _PartialFunctionFlags.EXIT)
    if profile.engine.memory_snapshot:
        assert (list(before), list(after)) == (["start"], ["serve"])
    else:
        # Both after the (absent) snapshot, in this order: start, then serve.
        assert (list(before), list(after)) == ([], ["start", "serve"])
    assert list(exits) == ["stop"]


def test_release_secrets_carry_the_api_key_only_where_configured() -> None:
    glm = apps.build_release_app(load_profile("glm-5.1"), REVISION).server.info()
    qwen = apps.build_release_app(load_profile("qwen3-8b"), REVISION).server.info()
    assert glm.secrets == ["modal.Secret.from_name('glm51-api-key')"]
    assert qwen.secrets == []


def test_router_is_one_cpu_container_with_the_admin_secret(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    glm = load_profile("glm-5.1")
    router = apps.build_router_app(glm)
    info = router.server.info()
    assert router.app.name == "glm-5.1-router" == resources.router_app_name(glm)
    assert info.gpus == []
    assert _mounts(info) == {}
    assert info.port == resources.ROUTER_PORT
    assert (info.cpu, info.memory_mib) == (resources.ROUTER_CPU, resources.ROUTER_MEMORY_MIB)
    assert info.startup_timeout == resources.ROUTER_STARTUP_TIMEOUT
    assert info.exit_grace_period == resources.ROUTER_EXIT_GRACE
    # uvicorn's graceful shutdown ends within the exit grace.
    assert resources.ROUTER_DRAIN_SECONDS < resources.ROUTER_EXIT_GRACE
    # Clients hold the model's API key, the orchestrator the admin token.
    assert info.unauthenticated
    assert info.secrets == [
        f"modal.Secret.from_name('{resources.ROUTER_ADMIN_SECRET}')",
        "modal.Secret.from_name('glm51-api-key')",
    ]
    qwen = apps.build_router_app(load_profile("qwen3-8b")).server.info()
    assert qwen.secrets == [f"modal.Secret.from_name('{resources.ROUTER_ADMIN_SECRET}')"]
    # Exactly one container: the canary gates compare measurements taken in one place.
    options = _server_options(monkeypatch, lambda: apps.build_router_app(glm))
    assert (options["min_containers"], options["max_containers"]) == (1, 1)
    assert options["serialized"] is True
    assert router.routes.name == resources.routes_dict_name(glm) == "glm-5.1-routes"


def test_cpu_profile_has_no_modal_engine() -> None:
    with pytest.raises(ValueError, match="no container image"):
        apps.build_release_app(load_profile("smollm2-135m"), REVISION)
    with pytest.raises(ValueError, match="does not precompile"):
        apps.build_compile_app(load_profile("smollm2-135m"))


def test_the_router_image_holds_what_the_router_imports() -> None:
    """The router container imports serving.router (and serving.router.upstream): their
    third-party modules must be in its image, pinned like the orchestrator's constraints."""
    pinned = {spec.split("==")[0].lower().replace("_", "-") for spec in resources.ROUTER_PACKAGES}
    needed = {"uvicorn", "prometheus-client", "certifi", "httptools", "httpx", "pydantic"}
    assert needed <= pinned
    assert all("==" in spec for spec in resources.ROUTER_PACKAGES)


def _build_steps_on_local_files(image: modal.Image) -> list[str]:
    """Build steps whose base is an `add_local_*` layer: Modal raises InvalidError for each
    when the image loads at deploy time, which `.info()` never reaches. Walks the image's
    dependency graph offline (modal 1.6.4 internals: `_deps`, `_rep`)."""
    local_files = "Image(local files)"
    offending, seen = [], set()
    stack = [synchronizer._translate_in(image)]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        bases = [dep for dep in node._deps() if type(dep).__name__ == "_Image"]
        if node._rep != local_files and any(base._rep == local_files for base in bases):
            offending.append(node._rep)
        stack.extend(bases)
    return offending


@pytest.mark.parametrize("model", ["glm-5.1", "glm-4.7", "deepseek-v4-pro", "qwen3-8b"])
def test_every_image_adds_its_local_files_last(model: str) -> None:
    images = [
        resources.weights_image(),
        resources.router_image(),
        resources.engine_image(load_profile(model)),
    ]
    for image in images:
        assert _build_steps_on_local_files(image) == []


def test_the_layer_check_catches_a_build_step_after_local_files() -> None:
    wrong = modal.Image.debian_slim().add_local_python_source("serving").env({"A": "1"})
    assert len(_build_steps_on_local_files(wrong)) == 1


# Unpickles its arguments' files in a process that imports only what a container's image
# ships: the copy of `serving` on its path. The editable install of this checkout is taken off
# the import system first, so `rollout`, `tests` or `dev` cannot be found by accident.
_CONTAINER_UNPICKLE = """
import json, sys
sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in repr(f)]
from modal._serialization import deserialize
for path in sys.argv[2:]:
    deserialize(open(path, "rb").read(), None)
import serving
assert serving.__file__.startswith(sys.argv[1]), serving.__file__
print(json.dumps(sorted({name.split(".")[0] for name in sys.modules})))
"""


def test_containers_unpickle_every_app_from_the_serving_package_alone(tmp_path: Path) -> None:
    """serialized=True: a container unpickles each function and Server class and imports what
    they name (the bodies, by module and name) from the image's `serving` package
    (add_local_python_source). A body moved out of `serving`, or into a module the closures
    cannot import there, fails this."""
    glm = load_profile("glm-5.1")
    weights, compiled = apps.build_weights_app(glm), apps.build_compile_app(glm)
    functions = [weights.download, weights.merge, weights.verify, compiled.compile]
    classes = [apps.build_release_app(glm, REVISION).server, apps.build_router_app(glm).server]
    blobs = [serialize(synchronizer._translate_in(fn)._raw_f) for fn in functions]
    blobs += [serialize(synchronizer._translate_in(cls)._user_cls) for cls in classes]
    image_root = tmp_path / "root"
    source = REPO_ROOT / "serving"
    shutil.copytree(source, image_root / "serving", ignore=shutil.ignore_patterns("__pycache__"))
    paths = []
    for index, blob in enumerate(blobs):
        paths.append(tmp_path / f"{index}.pkl")
        paths[-1].write_bytes(blob)
    done = subprocess.run(
        [sys.executable, "-c", _CONTAINER_UNPICKLE, str(image_root), *map(str, paths)],
        cwd=image_root, env={"PYTHONPATH": str(image_root)},
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    imported = set(json.loads(done.stdout))
    assert "serving" in imported
    assert not imported & {"rollout", "tests", "dev", "flows", "tasks", "prefect"}

