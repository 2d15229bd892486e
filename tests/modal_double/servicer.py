"""The double's servicer: every RPC of the ModalClient service answers UNIMPLEMENTED naming
itself, except those the project's deploy path reaches, which keep honest in-memory state:
what was created is recorded, what is looked up must exist (or is created when asked)."""

from __future__ import annotations

import hashlib
import itertools
import time
from collections import defaultdict, deque
from collections.abc import Callable, Coroutine
from typing import Any

from google.protobuf import empty_pb2
from grpclib import GRPCError, Status
from grpclib.server import Stream
from modal_proto import api_grpc, api_pb2

from tests.modal_double.calls import Call, CallRpcs, Outcome
from tests.modal_double.faults import Faults
from tests.modal_double.servers import Containers, ServerRpcs
from tests.modal_double.state import App, Named, function_data
from tests.modal_double.storage import StorageRpcs

Handler = Callable[[Any, Stream], Coroutine[Any, Any, None]]

CREATE_IF_MISSING = api_pb2.OBJECT_CREATION_TYPE_CREATE_IF_MISSING
# One of the builder versions modal 1.6.4 supports; images are "built" with it.
IMAGE_BUILDER_VERSION = "2025.06"
# The client reads an unset volume version as v1 (modal.volume._validate_volume_version).
DEFAULT_VOLUME_VERSION = api_pb2.VOLUME_FS_VERSION_V1


def _unimplemented(rpc: str) -> Handler:
    async def handler(self: Any, stream: Stream) -> None:
        self.unimplemented.append(rpc)
        raise GRPCError(Status.UNIMPLEMENTED, f"the Modal double does not implement {rpc}")

    handler.__name__ = rpc
    return handler


# Built from the generated base, so a new RPC in a newer modal_proto is covered too.
_UnimplementedRpcs: type[api_grpc.ModalClientBase] = type(
    "_UnimplementedRpcs",
    (api_grpc.ModalClientBase,),
    {rpc: _unimplemented(rpc) for rpc in api_grpc.ModalClientBase.__abstractmethods__},
)


class ModalDouble(Faults, ServerRpcs, StorageRpcs, CallRpcs, _UnimplementedRpcs):  # type: ignore[misc, valid-type]
    """State a test may read: apps (and `publishes`, one name per deploy), functions (their
    api_pb2.Function definitions), images, mounts (path -> sha256) and uploaded files
    (sha256 -> bytes), volumes, secrets, dicts, calls (ended as scripted or answered by a body,
    see tests.modal_double.calls) and Server URLs (run by attached `containers`, see
    tests.modal_double.servers). `fail_next` injects gRPC faults per RPC, and `requests`
    counts the RPCs reached (tests.modal_double.faults)."""

    def __init__(self) -> None:
        super().__init__()
        self.unimplemented: list[str] = []
        self._ids = itertools.count(1)
        self.apps: dict[str, App] = {}
        self.publishes: list[str] = []  # App names, one per deploy
        self.functions: dict[str, api_pb2.Function] = {}
        self.images: dict[str, api_pb2.Image] = {}
        self.mounts: dict[str, dict[str, str]] = {}
        self.files: dict[str, bytes] = {}
        self.volumes: dict[tuple[str, str], Named] = {}
        self.secrets: dict[tuple[str, str], Named] = {}
        self.dicts: dict[tuple[str, str], Named] = {}
        self.blocks: dict[str, bytes] = {}
        self.block_url = ""  # set by tests.modal_double.server.serve
        self.calls: dict[str, Call] = {}
        self.scripts: defaultdict[tuple[str, str], deque[Outcome]] = defaultdict(deque)
        self.bodies: dict[tuple[str, str], Callable[..., Any]] = {}
        self.containers: Containers | None = None  # see tests.modal_double.servers
        self.urls: dict[str, str] = {}

    def _new_id(self, prefix: str) -> str:
        return f"{prefix}-double{next(self._ids):06d}"

    # What a test sets up, as `modal secret create` would.

    def create_secret(self, name: str, env: dict[str, str], environment: str = "") -> None:
        self.secrets[(environment, name)] = Named(self._new_id("st"), name, env=env)

    def create_volume(self, name: str, version: int, environment: str = "") -> None:
        self.volumes[(environment, name)] = Named(self._new_id("vo"), name, version=version)

    def write_volume_file(self, name: str, path: str, data: bytes, environment: str = "") -> None:
        """A file committed to a volume, as a container's write and `commit()` leave it."""
        self.volumes[(environment, name)].files[path.lstrip("/")] = data

    # What a test reads.

    def deployed(self, name: str, environment: str = "") -> App:
        for app in self.apps.values():
            deployed = app.state == api_pb2.APP_STATE_DEPLOYED
            if deployed and app.name == name and app.environment == environment:
                return app
        raise KeyError(f"no deployed app {name!r} in the double")

    def function(self, app_name: str, tag: str) -> api_pb2.Function:
        return self.functions[self.deployed(app_name).function_ids[tag]]

    def volume_mounts(self, function: api_pb2.Function) -> dict[str, tuple[str, bool]]:
        """Mount path -> (volume name, read only)."""
        names = {v.object_id: v.name for v in self.volumes.values()}
        return {m.mount_path: (names[m.volume_id], m.read_only) for m in function.volume_mounts}

    def volume_version(self, name: str, environment: str = "") -> int:
        return self.volumes[(environment, name)].version

    def secret_names(self, function: api_pb2.Function) -> list[str]:
        names = {s.object_id: s.name for s in self.secrets.values()}
        return [names[secret_id] for secret_id in function.secret_ids]

    def mounted_files(self, function: api_pb2.Function) -> dict[str, bytes]:
        """Container path -> content of every file the function's mounts carry."""
        return {
            path: self.files[digest]
            for mount_id in function.mount_ids
            for path, digest in self.mounts[mount_id].items()
        }

    def image_commands(self, image_id: str) -> list[str]:
        """The Dockerfile commands of an image and its bases, base first."""
        image = self.images[image_id]
        bases = [command for base in image.base_images
                 for command in self.image_commands(base.image_id)]  # fmt: skip
        return bases + list(image.dockerfile_commands)

    # Client and environment.

    async def ClientHello(self, stream: Stream) -> None:
        await stream.recv_message()
        await stream.send_message(api_pb2.ClientHelloResponse())

    async def EnvironmentGetOrCreate(self, stream: Stream) -> None:
        request = await stream.recv_message()
        name = request.deployment_name or "main"
        await stream.send_message(api_pb2.EnvironmentGetOrCreateResponse(
            environment_id=f"en-{name}",
            metadata=api_pb2.EnvironmentMetadata(
                name=name,
                settings=api_pb2.EnvironmentSettings(image_builder_version=IMAGE_BUILDER_VERSION),
            ),
        ))  # fmt: skip

    # Apps.

    async def AppGetByDeploymentName(self, stream: Stream) -> None:
        request = await stream.recv_message()
        try:
            app_id = self.deployed(request.name, request.environment_name).app_id
        except KeyError:
            app_id = ""
        await stream.send_message(api_pb2.AppGetByDeploymentNameResponse(app_id=app_id))

    async def AppCreate(self, stream: Stream) -> None:
        request = await stream.recv_message()
        app = App(self._new_id("ap"), request.description, request.environment_name,
                  state=request.app_state)  # fmt: skip
        self.apps[app.app_id] = app
        await stream.send_message(api_pb2.AppCreateResponse(app_id=app.app_id))

    async def AppGetLayout(self, stream: Stream) -> None:
        request = await stream.recv_message()
        app = self._app(request.app_id)
        layout = api_pb2.AppLayout(function_ids=app.function_ids, class_ids=app.class_ids)
        await stream.send_message(api_pb2.AppGetLayoutResponse(app_layout=layout))

    async def AppHeartbeat(self, stream: Stream) -> None:
        request = await stream.recv_message()
        self._app(request.app_id)
        await stream.send_message(empty_pb2.Empty())

    async def AppPublish(self, stream: Stream) -> None:
        request = await stream.recv_message()
        app = self._app(request.app_id)
        missing = [f for f in request.function_ids.values() if f not in self.functions]
        if missing:
            raise GRPCError(Status.NOT_FOUND, f"AppPublish: unknown functions {missing}")
        app.name = request.name
        app.state = request.app_state
        app.function_ids = dict(request.function_ids)
        app.class_ids = dict(request.class_ids)
        self.publishes.append(app.name)
        await self._serve(app)
        await stream.send_message(api_pb2.AppPublishResponse(deployed_at=time.time()))

    async def AppClientDisconnect(self, stream: Stream) -> None:
        request = await stream.recv_message()
        app = self._app(request.app_id)
        if app.state != api_pb2.APP_STATE_DEPLOYED:
            app.state = api_pb2.APP_STATE_STOPPED
        await stream.send_message(empty_pb2.Empty())

    def _app(self, app_id: str) -> App:
        if app_id not in self.apps:
            raise GRPCError(Status.NOT_FOUND, f"no app {app_id!r}")
        return self.apps[app_id]

    # Images and mounts: an image is "built" as soon as it is defined, once its base images
    # and context mount exist.

    async def ImageGetOrCreate(self, stream: Stream) -> None:
        request = await stream.recv_message()
        image = request.image
        unknown = [b.image_id for b in image.base_images if b.image_id not in self.images]
        if unknown or (image.context_mount_id and image.context_mount_id not in self.mounts):
            raise GRPCError(Status.NOT_FOUND, f"ImageGetOrCreate: unknown base/mount {unknown}")
        digest = hashlib.sha256(image.SerializeToString(deterministic=True)).hexdigest()[:12]
        image_id = f"im-{digest}"
        self.images[image_id] = image
        await stream.send_message(api_pb2.ImageGetOrCreateResponse(
            image_id=image_id,
            result=api_pb2.GenericResult(status=api_pb2.GenericResult.GENERIC_STATUS_SUCCESS),
            metadata=api_pb2.ImageMetadata(image_builder_version=request.builder_version),
        ))  # fmt: skip

    async def MountBatchedCheckExistence(self, stream: Stream) -> None:
        request = await stream.recv_message()
        missing = [h for h in request.sha256_hex_hashes if h not in self.files]
        await stream.send_message(
            api_pb2.MountBatchedCheckExistenceResponse(missing_sha256_hex_hashes=missing)
        )

    async def MountPutFile(self, stream: Stream) -> None:
        request = await stream.recv_message()
        if request.WhichOneof("data_oneof") == "data":
            if hashlib.sha256(request.data).hexdigest() != request.sha256_hex:
                raise GRPCError(Status.INVALID_ARGUMENT, "MountPutFile: sha256 does not match")
            self.files[request.sha256_hex] = request.data
        exists = request.sha256_hex in self.files
        await stream.send_message(api_pb2.MountPutFileResponse(exists=exists))

    async def MountGetOrCreate(self, stream: Stream) -> None:
        request = await stream.recv_message()
        missing = [f.filename for f in request.files if f.sha256_hex not in self.files]
        if missing:
            raise GRPCError(Status.FAILED_PRECONDITION, f"MountGetOrCreate: not uploaded {missing}")
        mount_id = self._new_id("mo")
        self.mounts[mount_id] = {f.filename: f.sha256_hex for f in request.files}
        await stream.send_message(api_pb2.MountGetOrCreateResponse(mount_id=mount_id))

    # Named objects.

    def _named(self, table: dict[tuple[str, str], Named], request: Any, prefix: str,
               kind: str) -> Named:  # fmt: skip
        key = (request.environment_name, request.deployment_name)
        if key not in table:
            if request.object_creation_type != CREATE_IF_MISSING:
                raise GRPCError(Status.NOT_FOUND, f"{kind} {request.deployment_name!r} not found")
            table[key] = Named(self._new_id(prefix), request.deployment_name)
        return table[key]

    async def VolumeGetOrCreate(self, stream: Stream) -> None:
        request = await stream.recv_message()
        key = (request.environment_name, request.deployment_name)
        created = key not in self.volumes
        volume = self._named(self.volumes, request, "vo", "Volume")
        if created:
            volume.version = request.version or DEFAULT_VOLUME_VERSION
        await stream.send_message(api_pb2.VolumeGetOrCreateResponse(
            volume_id=volume.object_id,
            version=volume.version,
            metadata=api_pb2.VolumeMetadata(name=volume.name, version=volume.version),
        ))  # fmt: skip

    async def SecretGetOrCreate(self, stream: Stream) -> None:
        request = await stream.recv_message()
        secret = self._named(self.secrets, request, "st", "Secret")
        missing = [k for k in request.required_keys if k not in secret.env]
        if missing:
            raise GRPCError(Status.NOT_FOUND, f"Secret {secret.name!r} lacks keys {missing}")
        await stream.send_message(api_pb2.SecretGetOrCreateResponse(
            secret_id=secret.object_id, metadata=api_pb2.SecretMetadata(name=secret.name)
        ))  # fmt: skip

    async def DictGetOrCreate(self, stream: Stream) -> None:
        request = await stream.recv_message()
        store = self._named(self.dicts, request, "di", "Dict")
        await stream.send_message(api_pb2.DictGetOrCreateResponse(
            dict_id=store.object_id, metadata=api_pb2.DictMetadata(name=store.name)
        ))  # fmt: skip

    # Functions and classes.

    async def FunctionPrecreate(self, stream: Stream) -> None:
        request = await stream.recv_message()
        self._app(request.app_id)
        function_id = request.existing_function_id or self._new_id("fu")
        await stream.send_message(api_pb2.FunctionPrecreateResponse(
            function_id=function_id,
            handle_metadata=self._handle(request.function_name, request.function_type),
        ))  # fmt: skip

    async def FunctionCreate(self, stream: Stream) -> None:
        request = await stream.recv_message()
        self._app(request.app_id)
        if not request.HasField("function"):
            self.unimplemented.append("FunctionCreate(function_data)")
            raise GRPCError(Status.UNIMPLEMENTED,
                            "the Modal double does not implement FunctionCreate with function_data "
                            "(ranked GPU fallbacks)")  # fmt: skip
        definition = request.function
        self._check_references(definition)
        function_id = request.existing_function_id or self._new_id("fu")
        self.functions[function_id] = definition
        await stream.send_message(api_pb2.FunctionCreateResponse(
            function_id=function_id,
            function=definition,
            function_data=function_data(definition),
            handle_metadata=self._handle(definition.function_name, definition.function_type),
        ))  # fmt: skip

    async def ClassCreate(self, stream: Stream) -> None:
        request = await stream.recv_message()
        self._app(request.app_id)
        class_id = request.existing_class_id or self._new_id("cs")
        await stream.send_message(api_pb2.ClassCreateResponse(class_id=class_id))

    def _handle(self, name: str, function_type: int) -> api_pb2.FunctionHandleMetadata:
        return api_pb2.FunctionHandleMetadata(function_name=name, function_type=function_type)

    def _check_references(self, definition: api_pb2.Function) -> None:
        """A function may only name images, mounts, secrets and volumes that exist."""
        known = {
            *self.images,
            *self.mounts,
            *(volume.object_id for volume in self.volumes.values()),
            *(secret.object_id for secret in self.secrets.values()),
        }
        named = [
            definition.image_id,
            *definition.mount_ids,
            *definition.secret_ids,
            *(mount.volume_id for mount in definition.volume_mounts),
        ]
        unknown = [object_id for object_id in named if object_id not in known]
        if unknown:
            raise GRPCError(Status.NOT_FOUND, f"FunctionCreate: unknown objects {unknown}")
