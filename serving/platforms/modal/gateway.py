"""The gateway: everything the platform asks of Modal, behind one small protocol.

ModalPlatform talks to Modal only through a Gateway: `ModalGateway` here. Tests drive it
against a gRPC double of Modal's API (tests/modal_double); the seam remains for a fault no API
can produce, such as an orchestrator killed while it waits on a call.
"""

from __future__ import annotations

import io
from typing import Any, Protocol

import modal
import modal.exception
import modal.experimental

from serving.platforms.modal.calls import Poll, probe_call
from serving.platforms.modal.resources import KeyValue, WholeFiles, volume_version_mismatch


class Gateway(Protocol):
    def deploy(self, app: modal.App) -> None: ...

    def spawn(self, app_name: str, function: str, *args: Any) -> str:
        """Start a call on a deployed App; its call id."""
        ...

    def call(self, app_name: str, function: str, *args: Any) -> Any:
        """Run a short call on a deployed App and return its result."""
        ...

    def poll(self, call_id: str, timeout: float = 0) -> Poll: ...

    def read_volume_file(self, volume: str, path: str) -> bytes | None:
        """A small file from a volume, or None if it is not there."""
        ...

    def deployed_apps(self) -> list[str]:
        """Names of the deployed (not stopped) Apps of the environment."""
        ...

    def server_url(self, app_name: str, server_name: str) -> str | None:
        """The URL of a deployed App's Server."""
        ...

    def stop_app(self, app_name: str) -> None:
        """Stop a deployed App (its containers get SIGTERM and their exit grace); no error
        when there is no such App."""
        ...

    def dict(self, name: str) -> KeyValue:
        """A named modal.Dict, created if missing."""
        ...

    def volume_files(self, name: str) -> WholeFiles:
        """Whole files of a named v2 Volume, created if missing."""
        ...


class ModalGateway:
    def __init__(self, environment: str | None = None) -> None:
        self.environment = environment

    def deploy(self, app: modal.App) -> None:
        # A no-op deploy does not bump the version; a changed one rolls the App.
        try:
            app.deploy(environment_name=self.environment)
        except modal.exception.InvalidError as exc:
            # A volume of another version fails every deploy with a message that does not
            # say what to do about it.
            mismatch = volume_version_mismatch(exc)
            if mismatch is None:
                raise
            raise mismatch from exc

    def _function(self, app_name: str, function: str) -> modal.Function:
        return modal.Function.from_name(app_name, function, environment_name=self.environment)

    def spawn(self, app_name: str, function: str, *args: Any) -> str:
        return self._function(app_name, function).spawn(*args).object_id

    def call(self, app_name: str, function: str, *args: Any) -> Any:
        return self._function(app_name, function).remote(*args)

    def poll(self, call_id: str, timeout: float = 0) -> Poll:
        return probe_call(modal.FunctionCall.from_id(call_id), timeout)

    def read_volume_file(self, volume: str, path: str) -> bytes | None:
        return _read_file(modal.Volume.from_name(volume, environment_name=self.environment), path)

    def deployed_apps(self) -> list[str]:
        # For a deployed App, the listing's name (its description) is the App's name.
        apps = modal.experimental.list_deployed_apps(environment_name=self.environment or "")
        return [app.name for app in apps]

    def server_url(self, app_name: str, server_name: str) -> str | None:
        server = modal.Server.from_name(app_name, server_name, environment_name=self.environment)
        return server.get_url()

    def stop_app(self, app_name: str) -> None:
        try:
            app = modal.App.lookup(app_name, environment_name=self.environment)
        except modal.exception.NotFoundError:
            return
        app.stop()

    def dict(self, name: str) -> KeyValue:
        return modal.Dict.from_name(name, environment_name=self.environment, create_if_missing=True)

    def volume_files(self, name: str) -> WholeFiles:
        return VolumeFiles(
            modal.Volume.from_name(
                name, environment_name=self.environment, create_if_missing=True, version=2
            )
        )


class VolumeFiles:
    """Files of a Volume through Modal's API, from outside any container: an upload is
    committed when its call returns, and a read fetches what is committed."""

    def __init__(self, volume: modal.Volume) -> None:
        self.volume = volume

    def read(self, path: str) -> bytes | None:
        return _read_file(self.volume, path)

    def write(self, path: str, data: bytes, *, replace: bool = True) -> bool:
        try:
            with self.volume.batch_upload(force=replace) as batch:
                batch.put_file(io.BytesIO(data), path)
        except FileExistsError:
            return False
        return True


def _read_file(volume: modal.Volume, path: str) -> bytes | None:
    try:
        return b"".join(volume.read_file(path))
    except (FileNotFoundError, modal.exception.NotFoundError):
        return None

