"""FAKE containers for the Modal double: what Modal would run for the project's Apps, run here
from the project's own container bodies, as the Apps' functions and Server classes call them.

`PrepContainers` answers the calls of the weights and compile Apps (the double's `run`) with
serving.platforms.modal.bodies, each call in a directory of its own where the volumes are
mounted: the double's files reloaded in, the container's files committed back.

`ServingContainers` runs the Servers (tests.modal_double.servers.Containers) on loopback from
serving.platforms.modal.server_bodies:

- A release App `<model>-<rev8>` (or `<model>-<rev8>-dummy`, on the dummy-weights profile, as
  its Server class loads it): the real supervisor (start_release, resume_release) over a FAKE
  engine (tests/fake_engine.py or tests/engines/fake_engine.py), on the weights volume as
  the container mounts it: the double's files of that volume, copied to a directory on every
  reload. `seed_verified_weights` leaves there what a finished download would. The engine
  command the container would have run instead is kept in `commands`.
- The router App `<model>-router`: the real router (router_config, start_router) polling the
  model's routes Dict through the real modal SDK, against the double.
- Stopping an App runs its container's exit body (stop_release, stop_router).

The container's environment is this process's: ROUTER_ADMIN_TOKEN and the API key come from
os.environ here, where Modal would inject the Secrets.
"""

from __future__ import annotations

import itertools
import sys
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

import modal
from modal_proto import api_pb2

from serving.config.layout import SENTINEL_NAME, weights_dir
from serving.config.profile import Profile
from serving.core.procs import free_port
from serving.engines.engine import engine_command as real_engine_command
from serving.engines.sglang import Command
from serving.platforms.modal import bodies, resources, server_bodies
from serving.supervisor.supervisor import EngineFailed
from serving.weights.models import Manifest
from tests.modal_double.servicer import ModalDouble

FAKE_ENGINE = Path(__file__).parent / "fake_engine.py"
# The FAKE engine's command line for a release, given its port and the release's name.
EngineCommand = Callable[[int, str], Command]
# The compile body's own deadline; the stand-in for compile_deep_gemm returns at once.
COMPILE_TIMEOUT_SECONDS = 60
# What runs compile_deep_gemm's command line (serving.engines.deepgemm.run_compile's shape).
CompileRun = Callable[[Command, float, Callable[[str], None]], None]
# A stopped release gets this long to drain: nothing is in flight by then (retire waited).
STOP_DRAIN_SECONDS = 5.0


def seed_verified_weights(
    double: ModalDouble, profile: Profile, revisions: list[str], environment: str = ""
) -> None:
    """What earlier downloads left on the profile's weights volume: each revision's sentinel."""
    double.create_volume(profile.volumes.weights, api_pb2.VOLUME_FS_VERSION_V2, environment)
    moment = datetime(2026, 11, 1, tzinfo=UTC)
    for revision in revisions:
        manifest = Manifest(repo=profile.hub.repo, revision=revision, files=[], bytes_total=0,
                            started_at=moment, finished_at=moment)  # fmt: skip
        path = weights_dir(PurePosixPath("/"), profile, revision) / SENTINEL_NAME
        double.write_volume_file(profile.volumes.weights, str(path),
                                 manifest.model_dump_json().encode(), environment)  # fmt: skip


class MountedVolume:
    """A read-only volume as a container mounts it: `reload()` shows the volume's committed
    files (the double's) under `root`."""

    def __init__(self, double: ModalDouble, name: str, environment: str, root: Path) -> None:
        self.double, self.name, self.environment, self.root = double, name, environment, root

    def reload(self) -> None:
        for path, data in self.double.volumes[(self.environment, self.name)].files.items():
            target = self.root / path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)

    def commit(self) -> None:
        raise AssertionError(f"a read-only mount of {self.name} was committed")


class WritableVolume(MountedVolume):
    """A read-write mount: `commit()` publishes the container's files to the volume (new and
    changed ones; a deletion is not carried over)."""

    def commit(self) -> None:
        files = self.double.volumes[(self.environment, self.name)].files
        for path in self.root.rglob("*"):
            if path.is_file():
                files[path.relative_to(self.root).as_posix()] = path.read_bytes()


class PrepContainers:
    """The weights and compile Apps' functions of one profile, answered by the real bodies
    against the Hub at `endpoint`. `compile_run` stands in for compile_deep_gemm (no GPU)."""

    def __init__(
        self,
        double: ModalDouble,
        profile: Profile,
        root: Path,
        endpoint: str,
        environment: str,
        compile_run: CompileRun,
    ) -> None:
        self.double, self.profile, self.root = double, profile, root
        self.endpoint, self.environment = endpoint, environment
        self.compile_run = compile_run
        self._containers = itertools.count(1)
        weights = resources.weights_app_name(profile)
        double.run(weights, resources.DOWNLOAD_FUNCTION, self.download)
        double.run(weights, resources.MERGE_FUNCTION, self.merge)
        double.run(weights, resources.VERIFY_FUNCTION, self.verify)
        double.run(weights, resources.SERVING_CONFIG_FUNCTION, self.serving_config)
        if profile.deepgemm:
            double.run(resources.compile_app_name(profile), resources.COMPILE_FUNCTION,
                       self.compile)  # fmt: skip

    def _mount(self, volume: str | None, *, writable: bool = True) -> tuple[Path, MountedVolume]:
        assert volume is not None
        root = self.root / f"container-{next(self._containers)}" / volume
        kind = WritableVolume if writable else MountedVolume
        return root, kind(self.double, volume, self.environment, root)

    def download(
        self, revision: str, paths: list[str] | None = None, files: list[dict] | None = None
    ) -> dict[str, Any]:
        root, volume = self._mount(self.profile.volumes.weights)
        return bodies.download_body(self.profile, revision, root=root, volume=volume,
                                    paths=paths, files=files, endpoint=self.endpoint)  # fmt: skip

    def merge(
        self, revision: str, shards: list[dict], files: list[dict] | None = None
    ) -> dict[str, Any]:
        root, volume = self._mount(self.profile.volumes.weights)
        return bodies.merge_body(self.profile, revision, shards, root=root, volume=volume,
                                 files=files, endpoint=self.endpoint)  # fmt: skip

    def verify(self, revision: str) -> dict[str, Any]:
        root, volume = self._mount(self.profile.volumes.weights)
        kernels: tuple[Path | None, MountedVolume | None] = (None, None)
        if self.profile.deepgemm:
            kernels = self._mount(self.profile.volumes.deepgemm, writable=False)
        return bodies.verify_body(self.profile, revision, weights_root=root,
                                  weights_volume=volume, deepgemm_root=kernels[0],
                                  deepgemm_volume=kernels[1], endpoint=self.endpoint)  # fmt: skip

    def serving_config(self, revision: str) -> dict[str, Any]:
        root, volume = self._mount(self.profile.volumes.weights)
        return bodies.serving_config_body(self.profile, revision, root=root, volume=volume,
                                          endpoint=self.endpoint)  # fmt: skip

    def compile(self, revision: str) -> dict[str, Any]:
        root, volume = self._mount(self.profile.volumes.deepgemm)
        return bodies.compile_body(
            self.profile, revision, deepgemm_root=root, deepgemm_volume=volume,
            timeout_seconds=COMPILE_TIMEOUT_SECONDS, endpoint=self.endpoint,
            run=self.compile_run, unavailable=lambda: None, log=lambda line: None,
        )  # fmt: skip


def fake_engine(config: str = "{}") -> EngineCommand:
    """tests/fake_engine.py with a FakeConfig (JSON): faults on demand (a 5xx rate, delays)."""

    def command(port: int, name: str) -> Command:
        argv = [sys.executable, str(FAKE_ENGINE), "--port", str(port), "--name", name]
        return Command(argv=[*argv, "--config", config], env={})

    return command


class ServingContainers:
    """One model's release and router containers. `engines` maps a revision to the FAKE
    engine its release runs. A release App of a revision not listed runs nothing (its URL
    serves nothing)."""

    def __init__(
        self,
        double: ModalDouble,
        profile: Profile,
        root: Path,
        engines: dict[str, EngineCommand],
        environment: str = "",
    ) -> None:
        self.double, self.profile, self.root = double, profile, root
        self.engines = engines
        self.environment = environment
        self.running: dict[str, Callable[[], None]] = {}  # App name -> its exit body
        # App name -> the engine command its container would run (the FAKE engine runs instead)
        self.commands: dict[str, Command] = {}
        self.started: list[str] = []
        self.stopped: list[str] = []
        self.crashes: list[EngineFailed] = []  # engines that died serving (Modal would restart)
        self.router_url: str | None = None  # while the router runs
        self._lock = threading.Lock()

    def start(self, app_name: str, server: str) -> str | None:
        if app_name == resources.router_app_name(self.profile):
            return self._start_router(app_name)
        served = next(
            ((profile, rev) for rev in self.engines
             for profile in (self.profile, self.profile.with_dummy_weights())
             if resources.release_app_name(profile, rev) == app_name),
            None,
        )  # fmt: skip
        if served is None:
            return None
        return self._start_release(app_name, *served)

    def stop(self, app_name: str) -> None:
        with self._lock:
            exit_body = self.running.pop(app_name, None)
        if exit_body is not None:
            exit_body()
            self.stopped.append(app_name)

    def close(self) -> None:
        for name in list(self.running):
            self.stop(name)

    def _started(self, app_name: str, exit_body: Callable[[], None]) -> None:
        with self._lock:
            self.running[app_name] = exit_body
        self.started.append(app_name)

    def _start_router(self, app_name: str) -> str:
        routes = modal.Dict.from_name(
            resources.routes_dict_name(self.profile),
            environment_name=self.environment or None,
            create_if_missing=True,
        )
        router = server_bodies.start_router(
            server_bodies.router_config(self.profile, routes), host="127.0.0.1", port=0
        )

        def exit_body() -> None:
            self.router_url = None
            server_bodies.stop_router(router)

        self._started(app_name, exit_body)
        self.router_url = f"http://127.0.0.1:{router.port}"
        return self.router_url

    def _start_release(self, app_name: str, profile: Profile, revision: str) -> str:
        weights = self.root / app_name / "weights"
        volume = MountedVolume(self.double, self.profile.volumes.weights, self.environment,
                               weights)  # fmt: skip
        engine = self.engines[revision]

        def engine_command(served: Profile, **options: Any) -> Command:
            # serving.engines.engine's engine_command, for the FAKE engine: the same port.
            self.commands[app_name] = real_engine_command(served, **options)
            return engine(options["port"], app_name)

        supervisor = server_bodies.start_release(
            profile, revision, weights_root=weights, deepgemm_root=None, volumes=[volume],
            private_dir=self.root / app_name / "private",
            api_key=server_bodies.container_api_key(self.profile), port=free_port(),
            bind_host="127.0.0.1", on_crash=self.crashes.append, build_command=engine_command,
        )  # fmt: skip
        server_bodies.resume_release(supervisor)
        self._started(app_name, lambda: server_bodies.stop_release(supervisor, STOP_DRAIN_SECONDS))
        return supervisor.base_url
