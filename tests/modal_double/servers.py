"""The double's App and Server RPCs: deployed Apps listed, looked up by name and stopped, and
the URL of each `@app.server` function.

No container runs in the double. A test that needs a deployed Server to answer attaches
`Containers` (its own stand-in for what Modal runs): the double asks it to start a Server when
its App is published and to stop an App's containers when the App is stopped, and hands out
the URL it answers on. Without one, a Server gets a URL shaped like Modal's that nothing
serves (and that no test may reach: it is not loopback).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol

from google.protobuf import empty_pb2
from grpclib import GRPCError, Status
from grpclib.server import Stream
from modal_proto import api_pb2

from tests.modal_double.state import App

DEPLOYED = api_pb2.APP_STATE_DEPLOYED
STOPPED = api_pb2.APP_STATE_STOPPED
CREATE_IF_MISSING = api_pb2.OBJECT_CREATION_TYPE_CREATE_IF_MISSING


class Containers(Protocol):
    """What runs a deployed App's Servers, for a test."""

    def start(self, app_name: str, server: str) -> str | None:
        """Start the Server's container and return the URL it answers on once it is ready
        (None: nothing runs this Server here)."""
        ...

    def stop(self, app_name: str) -> None:
        """Stop the App's containers: SIGTERM, then their exit handlers run to the end."""
        ...


class ServerRpcs:
    """Mixed into the servicer, whose state it shares."""

    apps: dict[str, App]
    functions: dict[str, api_pb2.Function]
    containers: Containers | None
    urls: dict[str, str]  # a Server's function id -> its URL

    _new_id: Callable[[str], str]
    _app: Callable[[str], App]
    deployed: Callable[..., App]

    def server_urls(self, function_id: str) -> list[str]:
        url = self.urls.get(function_id)
        return [url] if url else []

    async def _serve(self, app: App) -> None:
        """A published App's Servers get their URLs; attached Containers start them (a
        redeploy replaces the running ones). Run off the event loop: a starting container
        may itself call the API (the router reads its routes Dict)."""
        servers = [tag for tag, fid in app.function_ids.items() if self.functions[fid].is_server]
        if not servers:
            return
        if self.containers is not None:
            await asyncio.to_thread(self.containers.stop, app.name)
        for tag in servers:
            url = None
            if self.containers is not None:
                try:
                    url = await asyncio.to_thread(self.containers.start, app.name, tag)
                except Exception as exc:
                    # Modal would deploy and retry the container; a test wants the cause now.
                    raise GRPCError(
                        Status.FAILED_PRECONDITION,
                        f"the test's container for {app.name}.{tag} did not start: {exc!r}",
                    ) from exc
            self.urls[app.function_ids[tag]] = url or _modal_shaped_url(app, tag)

    # RPCs.

    async def AppGetOrCreate(self, stream: Stream) -> None:
        request = await stream.recv_message()
        try:
            app = self.deployed(request.app_name, request.environment_name)
        except KeyError:
            if request.object_creation_type != CREATE_IF_MISSING:
                raise GRPCError(Status.NOT_FOUND, f"App {request.app_name!r} not found") from None
            # Modal creates a named App as deployed, with no functions yet.
            app = App(self._new_id("ap"), request.app_name, request.environment_name,
                      name=request.app_name, state=DEPLOYED)  # fmt: skip
            self.apps[app.app_id] = app
        await stream.send_message(api_pb2.AppGetOrCreateResponse(app_id=app.app_id))

    async def AppList(self, stream: Stream) -> None:
        request = await stream.recv_message()
        items = [
            api_pb2.AppListResponse.AppListItem(
                app_id=app.app_id,
                # A deployed App is described by its name (modal.experimental reads it).
                description=app.name or app.description,
                name=app.name,
                state=app.state,
                n_running_tasks=self._running(app),
            )
            for app in self.apps.values()
            if app.environment == request.environment_name
        ]
        await stream.send_message(api_pb2.AppListResponse(apps=items))

    def _running(self, app: App) -> int:
        """Servers with a URL: one container each as far as the listing tells."""
        return len([fid for fid in app.function_ids.values() if fid in self.urls])

    async def AppStop(self, stream: Stream) -> None:
        request = await stream.recv_message()
        app = self._app(request.app_id)
        app.state = STOPPED
        # Modal answers at once and stops the containers behind it; the double waits for
        # them, so a test sees them gone when stop() returns.
        if self.containers is not None:
            await asyncio.to_thread(self.containers.stop, app.name)
        for function_id in app.function_ids.values():
            self.urls.pop(function_id, None)
        await stream.send_message(empty_pb2.Empty())


def _modal_shaped_url(app: App, tag: str) -> str:
    return f"https://double-{app.environment or 'main'}--{app.name}-{tag.lower()}.modal.run"
