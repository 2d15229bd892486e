"""LocalReleases: the serving half of the embedded target, processes as containers. Everything a
decision about traffic needs (deploy, route, retire, the release store) and nothing that
prepares weights: `rollout abort` and `rollout status` start with only this half imported, not
the Hub client, the verification or the DeepGEMM compile (platform.py adds those).

    $ROLLOUT_HOME/volumes/<volume name>/...   weights and DeepGEMM caches, same layout as Modal
    $ROLLOUT_HOME/state/...                   release records, routing state, call ids
    $ROLLOUT_HOME/state/processes/*.json      one record per running process (inventory)
    $ROLLOUT_HOME/releases/<release id>/      a release's working directory (see deploy)
    $ROLLOUT_HOME/logs/<release id>.log       a release's supervisor and engine output

ROLLOUT_HOME defaults to `.rollout/` in the repository.

Serving: each release is a `python -m serving.supervisor` process (own session, so its group
can be signalled whole) behind one router per home (router_process.py). Processes outlive the
orchestrator only when asked (ROLLOUT_KEEP_SERVING=1); those of a SIGKILLed orchestrator are
found through their inventory records and stopped by the next run's `reconcile` task
(`reconcile_orphans`).
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import time
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any, Self, TypedDict

from serving.config.layout import deepgemm_dir, dummy_weights_dir, weights_dir
from serving.config.profile import Profile, Shadow
from serving.control.drain import drain
from serving.control.router_client import RouterAdminError
from serving.control.routes import release_backend, traffic_backends
from serving.core.errors import DeployFailed, one_line
from serving.core.home import rollout_home
from serving.core.procs import free_port, spawn, start_ticks, stop_process, sweep
from serving.core.restarts import RestartPolicy
from serving.domain.records import ReleaseStore
from serving.domain.release import Release, release_id
from serving.platform import Target
from serving.platforms.local.engine_env import engine_env, engine_threads
from serving.platforms.local.inventory import Inventory, Owner, ProcessRecord
from serving.platforms.local.release_events import (
    crashes_since,
    events_path,
    last_event,
)
from serving.platforms.local.router_process import (
    DEFAULT_ROUTER_PORT,
    ROUTER_PORT_ENV,
    ROUTER_RECORD,
    LocalRouter,
    RouterUnavailable,
)
from serving.platforms.local.stores import FileReleaseStore
from serving.supervisor.events import ServerEvent

KEEP_SERVING_ENV = "ROLLOUT_KEEP_SERVING"

logger = logging.getLogger(__name__)


class ServingSettings(TypedDict):
    keep_serving: bool
    router_port: int


def serving_settings_from_env() -> ServingSettings:
    return {
        "keep_serving": os.environ.get(KEEP_SERVING_ENV) == "1",
        "router_port": int(os.environ.get(ROUTER_PORT_ENV) or DEFAULT_ROUTER_PORT),
    }


class LocalReleases:
    target: Target = "local"

    def __init__(
        self,
        home: Path,
        *,
        keep_serving: bool = False,
        router_port: int = DEFAULT_ROUTER_PORT,
        restarts: RestartPolicy | None = None,
    ) -> None:
        self.home = home
        self.keep_serving = keep_serving
        self.router_port = router_port
        # How a crashed engine or router is started again (each by the process that runs it).
        self.restarts = restarts or RestartPolicy()
        self.inventory = Inventory(home / "state" / "processes")
        # Every process this platform starts names this interpreter as its owner: any
        # LocalPlatform of the same process (each Prefect task builds one) may stop it.
        self.owner = Owner.current()

    @classmethod
    def from_env(cls) -> Self:
        return cls(rollout_home(), **serving_settings_from_env())

    def volume(self, name: str) -> Path:
        return self.home / "volumes" / name

    def _weights_root(self, profile: Profile) -> Path:
        return self.volume(profile.volumes.weights)

    def _deepgemm_root(self, profile: Profile) -> Path | None:
        return self.volume(profile.volumes.deepgemm) if profile.volumes.deepgemm else None

    # -- serving ------------------------------------------------------------------------------
    def deploy(self, profile: Profile, revision: str) -> Release:
        """Start the release's supervisor, wait for `ready` (healthy and probes passed), and
        register it with the router at weight 0. A release already running is returned as is
        (a re-run converges). On failure nothing is left running: DeployFailed, one line."""
        rid = release_id(profile, revision)
        for release in self.running_releases(profile):
            if release.id == rid:
                return release
        place = dummy_weights_dir if profile.dummy_weights else weights_dir
        weights = place(self._weights_root(profile), profile, revision)
        if not weights.is_dir():
            raise DeployFailed(f"{rid}: no weights at {weights} (download and verify first)")
        router = self._router(profile.router.replicas)
        try:
            router.ensure_running()  # fails before an engine is paid for
        except RouterUnavailable as exc:
            raise DeployFailed(f"{rid}: {exc}") from None
        leftover = self.inventory.get(rid)
        if leftover is not None:  # a dead or half-started earlier attempt
            self._stop(leftover, drain_seconds=0)
        record = self._start_server(profile, revision, weights)
        try:
            ready = self._await_ready(record, profile)
            release = Release(
                model=profile.name, revision=revision, id=rid, url=str(ready.url),
                deployed_at=datetime.now(UTC), dummy_weights=profile.dummy_weights,
            )  # fmt: skip
            record = record.model_copy(
                update={
                    "engine_pid": ready.engine_pid,
                    "engine_ticks": start_ticks(ready.engine_pid) if ready.engine_pid else None,
                    "release": release,
                }
            )
            self.inventory.write(record)
            backend = release_backend(release, 0, profile.secrets.api_key)
            router.routes(profile.served_model_name).add(backend)
        except BaseException as exc:
            self._stop(record, drain_seconds=0)
            if isinstance(exc, RouterUnavailable | RouterAdminError):
                raise DeployFailed(f"{rid}: {exc}") from None
            raise
        logger.info("%s: ready at %s (0%% traffic)", rid, release.url)
        return release

    def set_traffic(
        self, profile: Profile, weights: dict[str, int], shadow: dict[str, Shadow] | None = None
    ) -> None:
        """Route `weights` (release id → percent) for the model, to the running releases; a
        running release not named gets 0. Written to the state file and pushed to the router,
        whose answer is checked (serving.control.routes). In-flight requests keep their
        backend."""
        backends = traffic_backends(
            profile, weights, self.running_releases(profile), profile.secrets.api_key, shadow
        )
        router = self._router(profile.router.replicas)
        router.ensure_running()
        router.routes(profile.served_model_name).set(backends)

    def retire(self, profile: Profile, release: Release, drain_seconds: float) -> None:
        """Out of routing (removed in one update), wait for the router's in-flight requests
        up to the deadline, SIGTERM the supervisor (which drains the engine), SIGKILL both
        process groups at the deadline. Idempotent."""
        record = self.inventory.get(release.id)
        if record is None:
            self._router().routes(profile.served_model_name).take_out(release.id)
            return
        self._stop(record, drain_seconds)
        logger.info("%s: retired", release.id)

    def router_url(self, profile: Profile) -> str:
        return self._router().url

    def stats(self, profile: Profile, since: float) -> dict[str, Any]:
        """The model's window since `since` (unix time), merged from every router replica:
        per-backend requests, errors, TTFT and latency percentiles, in-flight counts and
        weights (serving.control.measured)."""
        # An unanswered query is an error, never an empty window: empty reads as "no traffic".
        return self._router().replicas().window(profile.served_model_name, since)

    def ask(
        self, profile: Profile, release_id: str, chat: dict[str, Any], timeout: float
    ) -> dict[str, Any]:
        return self._router().client().ask(release_id, chat, timeout)

    def running_releases(self, profile: Profile) -> list[Release]:
        """Releases whose supervisor runs: serving, or restarting a crashed engine (a release
        keeps its traffic meanwhile, as a Modal App whose container is being replaced)."""
        return [
            record.release
            for record in self.inventory.records()
            if record.kind == "release"
            and record.model == profile.name
            and record.release is not None
            and record.running()
        ]

    def engine_crashes(self, profile: Profile, release_id: str, since: float) -> int:
        """The release's engine crashes since `since` (unix time), as its supervisor reported
        them: each was restarted, or the last one ended the release."""
        return crashes_since(events_path(self.home / "logs", release_id), since)

    def release_store(self) -> ReleaseStore:
        return FileReleaseStore(self.home / "state" / "releases")

    def shutdown(self) -> None:
        """Stop what this process started (releases, then the router if no one else still
        uses it); with keep_serving, mark it all `keep` instead, for a later run to reuse."""
        mine = [record for record in self.inventory.records() if record.owner == self.owner]
        if self.keep_serving:
            for record in mine:
                self.inventory.write(record.model_copy(update={"keep": True}))
            return
        for record in mine:
            if record.kind == "release":
                self._stop(record, SHUTDOWN_DRAIN_SECONDS)
        if any(record.kind == "router" for record in mine):
            self._release_router()

    def reconcile_orphans(self) -> list[str]:
        """Stop the processes of dead orchestrators (not kept), drop records of processes that
        are gone. Returns the names of the records it stopped or dropped."""
        handled: list[str] = []
        for record in self.inventory.records():
            if record.kind == "release" and (not record.running() or record.orphaned()):
                logger.warning("%s: %s; stopping it", record.name, _orphan_reason(record))
                self._stop(record, drain_seconds=0)
                handled.append(record.name)
        router = self.inventory.get(ROUTER_RECORD)
        if router is not None and (not router.running() or router.orphaned()):
            self._release_router()
            handled.append(router.name)
        return handled

    def stop_all(self) -> None:
        """Stop every process of this home, whoever started it and whether kept or not."""
        for record in self.inventory.records():
            if record.kind == "release":
                self._stop(record, drain_seconds=0)
        router = self.inventory.get(ROUTER_RECORD)
        if router is not None:
            self._stop(router, drain_seconds=0)

    # -- serving internals ----------------------------------------------------------------------

    def _router(self, replicas: int = 1) -> LocalRouter:
        # A live router of this home is used where it runs, even if the configured port
        # changed since it started: one router per home.
        record = self.inventory.get(ROUTER_RECORD)
        port = record.port if record is not None and record.running() else self.router_port
        return LocalRouter(self.home, port, self.inventory, self.owner, keep=self.keep_serving,
                           restarts=self.restarts, replicas=replicas)

    def _release_workdir(self, profile: Profile, rid: str, weights: Path) -> Path:
        """The release's working directory, where the served model name is a symlink to the
        weights: `transformers serve <served name>` run here loads the weights and answers to
        the name clients send through the router (a pinned server accepts exactly its model
        argument as `model`, and keeps an existing local path as its model id)."""
        workdir = self.home / "releases" / rid
        shutil.rmtree(workdir, ignore_errors=True)
        link = workdir / _served_path(profile)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(weights.resolve(), target_is_directory=True)
        return workdir

    def _start_server(self, profile: Profile, revision: str, weights: Path) -> ProcessRecord:
        rid = release_id(profile, revision)
        workdir = self._release_workdir(profile, rid, weights)
        # SGLang serves the profile's served name itself: it gets the real directory.
        weights_arg = (
            str(_served_path(profile)) if profile.engine.kind == "transformers" else str(weights)
        )
        port = free_port()
        argv = [
            sys.executable, "-m", "serving.supervisor",
            "--model", profile.name,
            "--weights", weights_arg,
            "--port", str(port),
            # The supervisor labels its log lines <profile>-<id>: the release id.
            "--release-id", rid.removeprefix(f"{profile.name}-"),
            "--drain-seconds", f"{profile.canary.retire_grace_seconds:g}",
            "--startup-budget", f"{profile.startup_budget_seconds:g}",
            "--restart-limit", str(self.restarts.limit),
            "--restart-backoff", f"{self.restarts.first_backoff_seconds:g}",
        ]  # fmt: skip
        if profile.secrets.api_key:
            argv += ["--api-key-env", profile.secrets.api_key]  # a variable name, not the key
        if profile.dummy_weights:
            argv.append("--dummy-weights")
        deepgemm_root = self._deepgemm_root(profile)
        if profile.deepgemm and deepgemm_root is not None:
            # the kernels compile() prepared for this GPU (SGLANG_DG_CACHE_DIR)
            argv += ["--deepgemm", str(deepgemm_dir(deepgemm_root, profile))]
        logs = self.home / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        log_path = logs / f"{rid}.log"
        events = events_path(logs, rid)
        # Events go to a file, not a pipe: a kept release outlives this process, and a server
        # writing to a closed pipe would fail at its next event.
        threads = engine_threads(profile, running=self._running_engines())
        with log_path.open("ab") as log, events.open("wb") as out:
            process = spawn(argv, cwd=workdir, env=engine_env(threads), stdout=out, stderr=log)
        record = ProcessRecord(
            kind="release", name=rid, pid=process.pid, pgid=process.pid,
            ticks=start_ticks(process.pid), port=port, owner=self.owner, keep=self.keep_serving,
            log=str(log_path), release_id=rid, model=profile.name, revision=revision,
            route=profile.served_model_name,
        )  # fmt: skip
        self.inventory.write(record)
        return record

    def _running_engines(self) -> int:
        """Releases of any model whose supervisor runs in this home: they share its cores."""
        return sum(1 for record in self.inventory.records()
                   if record.kind == "release" and record.running())  # fmt: skip

    def _await_ready(self, record: ProcessRecord, profile: Profile) -> ServerEvent:
        """The supervisor's `ready` event; DeployFailed on `failed`, an exit, or the budget."""
        budget = profile.startup_budget_seconds + DEPLOY_MARGIN_SECONDS
        events = events_path(Path(record.log).parent, record.name)
        deadline = time.monotonic() + budget
        while True:
            exited = start_ticks(record.pid) != record.ticks  # read before the events: no race
            event = last_event(events)
            if event is not None and event.event == "ready":
                return event
            if event is not None:
                reason = one_line(event.error or event.event)
                raise DeployFailed(f"{record.name}: {reason} (log: {record.log})")
            if exited:
                raise DeployFailed(
                    f"{record.name}: the server exited before it was ready (log: {record.log})"
                )
            if time.monotonic() >= deadline:
                raise DeployFailed(
                    f"{record.name}: not ready within {budget:g} s (log: {record.log})"
                )
            time.sleep(EVENT_POLL_SECONDS)

    def _stop(self, record: ProcessRecord, drain_seconds: float) -> None:
        """Retire one record's process: out of routing, router drain, SIGTERM, SIGKILL at the
        deadline (never sooner than a short grace for a clean stop), record removed."""
        deadline = time.monotonic() + drain_seconds
        if record.kind == "release" and record.route is not None:
            router = self._router()
            unrouted = router.routes(record.route).take_out(record.name)
            # Unlike a Modal router, a local one that does not answer carries no requests:
            # there is nothing to drain through it.
            if record.running() and router.answers():
                replicas = router.replicas()
                drain(replicas, record.route, record.name, deadline,
                      unrouted=replicas.unrouted(unrouted),
                      poll_seconds=DRAIN_POLL_SECONDS)  # fmt: skip
        grace = max(deadline - time.monotonic(), STOP_GRACE_SECONDS)
        gone = stop_process(record.pid, record.ticks, groups=record.extra_groups(),
                            term_seconds=grace)  # fmt: skip
        if not gone:
            logger.error("%s: pid %d survived SIGKILL", record.name, record.pid)
        if record.kind == "release":
            workdir = self.home / "releases" / record.name
            # Everything of a release works in its directory, the engine included.
            if stray := sweep(workdir):
                logger.warning("%s: killed stray processes %s", record.name, stray)
            shutil.rmtree(workdir, ignore_errors=True)
        self.inventory.remove(record.name)

    def _release_router(self) -> None:
        """Stop the router unless running releases still need it; then hand it to them."""
        record = self.inventory.get(ROUTER_RECORD)
        if record is None:
            return
        users = [
            other for other in self.inventory.records()
            if other.kind == "release" and other.running() and not other.orphaned()
        ]  # fmt: skip
        if users and record.running():
            keep = any(user.keep for user in users)
            self.inventory.write(record.model_copy(update={"owner": users[0].owner, "keep": keep}))
            return
        self._stop(record, drain_seconds=0)



# Beyond the profile's startup budget: interpreter start, and the probes after /health.
DEPLOY_MARGIN_SECONDS = 60.0
EVENT_POLL_SECONDS = 0.1
DRAIN_POLL_SECONDS = 0.1
# A SIGTERMed supervisor stops its engine gracefully; this long even when the drain is over.
STOP_GRACE_SECONDS = 5.0
# Requests in flight when the orchestrator finishes get this long to complete.
SHUTDOWN_DRAIN_SECONDS = 5.0


def _served_path(profile: Profile) -> PurePosixPath:
    """The served model name as a relative path, refused when it would not round-trip (the
    engine must report exactly the name the router routes on)."""
    name = profile.served_model_name
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or str(path) != name:
        raise DeployFailed(f"{profile.name}: served_model_name {name!r} is not a plain name")
    return path


def _orphan_reason(record: ProcessRecord) -> str:
    if not record.running():
        return "its process is gone"
    return f"its orchestrator (pid {record.owner.pid}) is gone"
