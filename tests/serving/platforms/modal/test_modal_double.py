"""The project's Modal Apps deployed through the real modal SDK (ModalGateway.deploy), against a
TEST DOUBLE of Modal's API on loopback (tests/modal_double): unlike `.info()`, a deploy loads
every image, uploads the local files and resolves every Volume and Secret by name."""

from __future__ import annotations

import io
import os

import modal
import modal.exception
import pytest
from modal._serialization import deserialize
from modal.volume import BLOCK_SIZE
from modal_proto import api_pb2

from serving.config.layout import DEEPGEMM_MOUNT as DEEPGEMM_PATH
from serving.config.layout import WEIGHTS_MOUNT as WEIGHTS_PATH
from serving.config.loader import available_models, load_profile, models_dir
from serving.config.profile import Profile
from serving.core.home import REPO_ROOT
from serving.platforms.modal import apps, resources
from serving.platforms.modal.calls import CallRecord, CallState, attach_or_spawn, probe_call
from serving.platforms.modal.gateway import ModalGateway
from tests.modal_double.calls import API_FAILING, EXPIRED, RUNNING, Outcome, raised, returned
from tests.modal_double.servicer import ModalDouble

REVISION = "0123456789abcdef0123456789abcdef01234567"
DEPLOYED = api_pb2.APP_STATE_DEPLOYED
V2 = api_pb2.VOLUME_FS_VERSION_V2
# modal's own message, raised when the image loads (modal._image).
LAYER_ORDER_ERROR = r"build step after using `image\.add_local_\*`"
# Mount paths as the API carries them.
WEIGHTS_MOUNT = str(WEIGHTS_PATH)
DEEPGEMM_MOUNT = str(DEEPGEMM_PATH)


def _create_secrets(double: ModalDouble, profile: Profile) -> None:
    """What the README's one-time setup creates with `modal secret create`."""
    double.create_secret(resources.ROUTER_ADMIN_SECRET, {"ROUTER_ADMIN_TOKEN": "admin"})
    for name in (profile.secrets.hf_token, profile.secrets.api_key):
        if name:
            double.create_secret(name, {})


@pytest.fixture
def glm(modal_double: ModalDouble) -> Profile:
    profile = load_profile("glm-5.1")
    _create_secrets(modal_double, profile)
    return profile


def test_weights_app_deploys_four_cpu_functions_on_a_v2_weights_volume(
    modal_double: ModalDouble, glm: Profile
) -> None:
    ModalGateway().deploy(apps.build_weights_app(glm).app)

    app = modal_double.deployed("glm-5.1-weights")
    assert sorted(app.function_ids) == ["download", "merge", "serving-config", "verify"]
    assert modal_double.volume_version("glm51-weights") == V2
    for tag in ("download", "merge", "serving-config"):
        function = modal_double.function("glm-5.1-weights", tag)
        assert function.resources.gpu_config.count == 0
        assert modal_double.volume_mounts(function) == {WEIGHTS_MOUNT: ("glm51-weights", False)}
        assert modal_double.secret_names(function) == ["huggingface-secret"]
    verify = modal_double.function("glm-5.1-weights", "verify")
    assert modal_double.volume_mounts(verify) == {
        WEIGHTS_MOUNT: ("glm51-weights", False),
        DEEPGEMM_MOUNT: ("glm51-deepgemm-cache", True),
    }


def test_compile_app_asks_for_eight_b200_and_ships_the_project_files(
    modal_double: ModalDouble, glm: Profile
) -> None:
    ModalGateway().deploy(apps.build_compile_app(glm).app)

    compile_fn = modal_double.function("glm-5.1-compile", resources.COMPILE_FUNCTION)
    gpu = compile_fn.resources.gpu_config
    assert (gpu.gpu_type, gpu.count) == ("B200", 8)
    assert modal_double.volume_mounts(compile_fn) == {
        DEEPGEMM_MOUNT: ("glm51-deepgemm-cache", False)
    }
    assert modal_double.secret_names(compile_fn) == ["huggingface-secret"]
    assert compile_fn.retry_policy.retries == 0
    assert compile_fn.timeout_secs == resources.COMPILE_TIMEOUT
    commands = modal_double.image_commands(compile_fn.image_id)
    assert commands[0] == "FROM lmsysorg/sglang:v0.5.23"
    assert commands[-1] == f"ENV ROLLOUT_MODELS_DIR={resources.CONTAINER_MODELS_DIR}"
    # The local files travel as mounts, uploaded byte for byte.
    files = modal_double.mounted_files(compile_fn)
    body = REPO_ROOT / "serving/platforms/modal/bodies.py"
    assert files["/root/serving/platforms/modal/bodies.py"] == body.read_bytes()
    profile_path = f"{resources.CONTAINER_MODELS_DIR}/glm-5.1.yaml"
    assert files[profile_path] == (models_dir() / "glm-5.1.yaml").read_bytes()
    assert not [path for path in files if "__pycache__" in path or path.endswith(".pyc")]


def test_release_app_is_one_gpu_server_on_read_only_volumes(
    modal_double: ModalDouble, glm: Profile
) -> None:
    ModalGateway().deploy(apps.build_release_app(glm, REVISION).app)

    name = f"glm-5.1-{REVISION[:8]}"
    assert list(modal_double.deployed(name).function_ids) == [resources.SERVER_NAME]
    server = modal_double.function(name, resources.SERVER_NAME)
    assert server.is_server and server.is_class
    gpu = server.resources.gpu_config
    assert (gpu.gpu_type, gpu.count) == ("B200", 8)
    assert modal_double.volume_mounts(server) == {
        WEIGHTS_MOUNT: ("glm51-weights", True),
        DEEPGEMM_MOUNT: ("glm51-deepgemm-cache", True),
    }
    assert modal_double.secret_names(server) == ["glm51-api-key"]


def test_router_app_is_one_cpu_server_with_the_admin_and_api_key_secrets(
    modal_double: ModalDouble, glm: Profile
) -> None:
    ModalGateway().deploy(apps.build_router_app(glm).app)

    router = modal_double.function("glm-5.1-router", resources.ROUTER_NAME)
    assert router.is_server
    assert router.resources.gpu_config.count == 0
    assert modal_double.volume_mounts(router) == {}
    assert modal_double.secret_names(router) == [resources.ROUTER_ADMIN_SECRET, "glm51-api-key"]


@pytest.mark.parametrize("model", available_models())
def test_every_profile_deploys_the_apps_it_uses(modal_double: ModalDouble, model: str) -> None:
    profile = load_profile(model)
    _create_secrets(modal_double, profile)
    built = [apps.build_weights_app(profile).app, apps.build_router_app(profile).app]
    if profile.deepgemm:
        built.append(apps.build_compile_app(profile).app)
    if profile.engine.image is not None:  # an engine Modal can run (not the local demo's)
        built.append(apps.build_release_app(profile, REVISION).app)
    gateway = ModalGateway()
    for app in built:
        gateway.deploy(app)
    assert sorted(a.name for a in modal_double.apps.values() if a.state == DEPLOYED) == sorted(
        app.name for app in built
    )


def test_a_build_step_after_local_files_fails_the_deploy(modal_double: ModalDouble) -> None:
    """The bug `.info()` let through: Modal refuses the image when it loads, at deploy."""
    wrong = (
        modal.Image.debian_slim(python_version=resources.PYTHON_VERSION)
        .add_local_python_source("serving", ignore=["**/__pycache__"])
        .env({"ROLLOUT_MODELS_DIR": resources.CONTAINER_MODELS_DIR})
    )
    app = modal.App("wrong-layer-order")
    app.function(image=wrong, serialized=True, name="noop")(lambda: None)

    with pytest.raises(modal.exception.InvalidError, match=LAYER_ORDER_ERROR):
        ModalGateway().deploy(app)
    assert [a.name for a in modal_double.apps.values() if a.state == DEPLOYED] == []


def test_a_missing_secret_fails_the_deploy_naming_it(modal_double: ModalDouble) -> None:
    profile = load_profile("glm-5.1")  # no secrets created

    with pytest.raises(modal.exception.NotFoundError, match="huggingface-secret"):
        ModalGateway().deploy(apps.build_compile_app(profile).app)


def test_a_v1_weights_volume_fails_the_deploy_with_what_to_do(
    modal_double: ModalDouble, glm: Profile
) -> None:
    modal_double.create_volume("glm51-weights", api_pb2.VOLUME_FS_VERSION_V1)

    with pytest.raises(resources.VolumeVersionMismatch) as failure:
        ModalGateway().deploy(apps.build_weights_app(glm).app)

    message = str(failure.value)
    assert "\n" not in message
    assert "'glm51-weights' is v1, but rollout needs v2" in message
    assert "volumes.weights" in message and "`modal volume delete glm51-weights`" in message
    # modal's own error, raised while the deploy hydrates the volume, is the cause.
    assert isinstance(failure.value.__cause__, modal.exception.InvalidError)


def test_an_rpc_the_double_lacks_fails_the_call_naming_it(modal_double: ModalDouble) -> None:
    queue = modal.Queue.from_name("not-used-by-the-project", create_if_missing=True)

    with pytest.raises(modal.exception.UnimplementedError, match="QueueGetOrCreate"):
        queue.put("item")
    assert modal_double.unimplemented == ["QueueGetOrCreate"]
    modal_double.unimplemented.clear()  # reached on purpose: not a failure of this test


def test_dict_put_get_pop_round_trip_through_the_sdk(modal_double: ModalDouble) -> None:
    routes = ModalGateway().dict("glm-5.1-routes")

    assert routes.get("routes") is None
    assert routes.put("routes", '{"generation": 1}') is True
    assert routes.put("routes", '{"generation": 2}', skip_if_exists=True) is False
    assert routes.get("routes") == '{"generation": 1}'
    assert routes.pop("routes", None) == '{"generation": 1}'
    assert routes.pop("routes", None) is None
    assert [name for _, name in modal_double.dicts] == ["glm-5.1-routes"]


def test_volume_upload_then_read_round_trip_through_the_sdk(modal_double: ModalDouble) -> None:
    marker = b'{"key": "sm_100f-tp8"}'
    cache = modal.Volume.from_name("glm51-deepgemm-cache", create_if_missing=True)
    with cache.batch_upload() as batch:
        batch.put_file(io.BytesIO(marker), "/markers/glm-5.1.json")

    gateway = ModalGateway()
    assert gateway.read_volume_file("glm51-deepgemm-cache", "markers/glm-5.1.json") == marker
    assert gateway.read_volume_file("glm51-deepgemm-cache", "markers/other.json") is None
    with pytest.raises(FileExistsError), cache.batch_upload() as batch:
        batch.put_file(io.BytesIO(b"{}"), "/markers/glm-5.1.json")


def test_a_file_of_several_blocks_reads_back_whole_from_a_v2_volume(
    modal_double: ModalDouble, glm: Profile
) -> None:
    ModalGateway().deploy(apps.build_weights_app(glm).app)  # creates the v2 weights volume
    sentinel = os.urandom(BLOCK_SIZE + 4096)
    modal_double.write_volume_file("glm51-weights", f"{REVISION}/.sentinel.json", sentinel)

    read = ModalGateway().read_volume_file("glm51-weights", f"{REVISION}/.sentinel.json")

    assert read == sentinel


@pytest.fixture
def compile_app(modal_double: ModalDouble, glm: Profile) -> str:
    ModalGateway().deploy(apps.build_compile_app(glm).app)
    return "glm-5.1-compile"


def test_a_spawned_compile_runs_until_it_returns(
    modal_double: ModalDouble, compile_app: str
) -> None:
    gateway = ModalGateway()
    call_id = gateway.spawn(compile_app, resources.COMPILE_FUNCTION, REVISION)

    assert call_id.startswith("fc-")
    call = modal_double.calls[call_id]
    assert call.function_id == modal_double.deployed(compile_app).function_ids["compile"]
    assert deserialize(call.args, None) == ((REVISION,), {})
    assert gateway.poll(call_id).state is CallState.RUNNING
    assert gateway.poll(call_id, timeout=0.2).state is CallState.RUNNING

    modal_double.settle(call_id, returned({"compiled": True}))
    poll = gateway.poll(call_id)
    assert (poll.state, poll.result) == (CallState.SUCCEEDED, {"compiled": True})


@pytest.mark.parametrize(
    ("outcome", "state", "action"),
    [
        (RUNNING, CallState.RUNNING, "attach"),
        (returned({"compiled": True}), CallState.SUCCEEDED, "use-result"),
        (raised(RuntimeError("nvcc exited 1")), CallState.FAILED, "spawn"),
        # The body's own TimeoutError arrives as the same type as modal's "no output yet".
        (raised(TimeoutError("compile_deep_gemm timed out")), CallState.FAILED, "spawn"),
        (EXPIRED, CallState.EXPIRED, "spawn"),
        (API_FAILING, CallState.UNKNOWN, "attach"),
    ],
    ids=["running", "returned", "raised", "raised-timeout", "expired", "api-failing"],
)
def test_a_recorded_call_is_attached_or_respawned_by_what_modal_says(
    modal_double: ModalDouble, compile_app: str, outcome: Outcome, state: CallState, action: str
) -> None:
    modal_double.script(compile_app, resources.COMPILE_FUNCTION, outcome)
    gateway = ModalGateway()
    call_id = gateway.spawn(compile_app, resources.COMPILE_FUNCTION, REVISION)

    poll = gateway.poll(call_id)
    record = CallRecord.model_validate({
        "key": {"stage": "compile", "model": "glm-5.1", "revision": REVISION},
        "call_id": call_id, "app": compile_app, "function": "compile",
        "spawned_at": "2026-12-01T00:00:00Z",
    })  # fmt: skip
    decision = attach_or_spawn(record, gateway.poll)

    assert poll.state is state
    assert decision.action == action
    if outcome.kind == "raised":
        assert type(poll.error) is type(outcome.value)
        assert str(poll.error) == str(outcome.value)


def test_an_unknown_call_id_reads_as_expired(modal_double: ModalDouble) -> None:
    poll = probe_call(modal.FunctionCall.from_id("fc-never-spawned"))

    assert poll.state is CallState.EXPIRED
