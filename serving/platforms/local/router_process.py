"""The local platform's router: `python -m serving.router` per ROLLOUT_HOME, N replicas on one
listening socket under a keeper (router_keeper.py) that restarts each when it dies, as Modal
replaces a router container. The inventory's router record is the keeper; `server_pids()` finds
the router processes themselves. Each replica publishes its measurements to
`state/router-stats/` (stats.DirectoryStatsStore), where the gates' window is merged.

Routing state lives in `$ROLLOUT_HOME/state/routes.json` (routes.FileRouteStore): the router
polls it every second, so a restarted router comes back with the right weights. Changes are
made through serving.control.routes, which also pushes them to the admin API.

The admin token is generated once per home, stored 0600 in `state/router-admin-token`, and
reaches the router through an environment variable: never on an argv, never in a log line.
"""

from __future__ import annotations

import logging
import os
import secrets
import sys
import time
from pathlib import Path

from serving.control.measured import Replicas
from serving.control.router_client import RouterAdminError, RouterClient
from serving.control.routes import ModelRoutes
from serving.core.files import locked
from serving.core.home import REPO_ROOT, repo_pythonpath
from serving.core.procs import (
    group_members,
    port_is_free,
    spawn,
    start_ticks,
    stop_process,
    wait_for,
)
from serving.core.restarts import RestartPolicy
from serving.platforms.local.inventory import Inventory, Owner, ProcessRecord
from serving.platforms.local.routes import FileRouteStore
from serving.platforms.local.stats import DirectoryStatsStore

logger = logging.getLogger(__name__)

ROUTER_PORT_ENV = "ROLLOUT_ROUTER_PORT"
DEFAULT_ROUTER_PORT = 8400
# The variable the router process reads its admin token from (--admin-token-env).
ADMIN_TOKEN_ENV = "ROLLOUT_ROUTER_ADMIN_TOKEN"
ADMIN_TOKEN_FILE = "router-admin-token"
ROUTES_FILE = "routes.json"
STATS_DIR = "router-stats"
ROUTER_RECORD = "router"
PRIVATE_FILE_MODE = 0o600
ADMIN_TOKEN_BYTES = 32

ROUTER_STARTUP_SECONDS = 20.0
STARTUP_POLL_SECONDS = 0.1
LOG_TAIL_CHARS = 1500


class RouterUnavailable(RuntimeError):
    """The home's router cannot be started."""


class LocalRouter:
    def __init__(
        self, home: Path, port: int, inventory: Inventory, owner: Owner, *, keep: bool,
        restarts: RestartPolicy | None = None, replicas: int = 1,
    ) -> None:
        # Absolute: the router process runs in another working directory.
        self.state = home.absolute() / "state"
        self.logs = home.absolute() / "logs"
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.inventory = inventory
        self.owner = owner
        self.keep = keep
        self.restarts = restarts or RestartPolicy()
        self.routes_file = self.state / ROUTES_FILE
        self.stats_dir = self.state / STATS_DIR
        # Applies when this starts the home's router; a running one keeps its count.
        self.replicas_to_start = replicas

    # -- the process ---------------------------------------------------------------------------

    def ensure_running(self) -> None:
        """Reuse this home's router if it answers on the port, else start one."""
        with locked(self.state / ".router.lock"):
            if self.answers():
                return
            record = self.inventory.get(ROUTER_RECORD)
            if record is not None and record.running() and wait_for(
                self.answers, ROUTER_STARTUP_SECONDS, STARTUP_POLL_SECONDS
            ):
                return  # its keeper was restarting it
            if record is not None:
                # Its process is dead or hung: clear it out before taking the port.
                stop_process(record.pid, record.ticks, groups=record.extra_groups(), term_seconds=0)
                self.inventory.remove(ROUTER_RECORD)
            if not port_is_free(self.port):
                raise RouterUnavailable(
                    f"port {self.port} is taken by something that is not this home's router; "
                    f"set {ROUTER_PORT_ENV} to a free port"
                )
            self._start()

    def running(self) -> bool:
        record = self.inventory.get(ROUTER_RECORD)
        return record is not None and record.running()

    def server_pid(self) -> int | None:
        """A router process now running under its keeper (None while none runs)."""
        return next(iter(self.server_pids()), None)

    def server_pids(self) -> list[int]:
        """The router processes (replicas) now running under the keeper."""
        record = self.inventory.get(ROUTER_RECORD)
        if record is None or not record.running():
            return []
        return sorted(group_members(record.pgid) - {record.pid})

    def answers(self) -> bool:
        """True when a router holding this home's admin token listens on the port."""
        try:
            self.client().routes()
        except RouterAdminError:
            return False
        return True

    def _start(self) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        log_path = self.logs / "router.log"
        argv = [
            sys.executable, "-m", "serving.platforms.local.router_keeper",
            "--restart-limit", str(self.restarts.limit),
            "--restart-backoff", f"{self.restarts.first_backoff_seconds:g}",
            "--replicas", str(self.replicas_to_start),
            # The keeper holds the port: clients wait while it restarts the router.
            "--listen-port", str(self.port),
            "--", sys.executable, "-m", "serving.router",
            "--state-file", str(self.routes_file),
            "--stats-dir", str(self.stats_dir),
            "--admin-token-env", ADMIN_TOKEN_ENV,
        ]  # fmt: skip
        env = {**os.environ, ADMIN_TOKEN_ENV: self.admin_token(), "PYTHONPATH": repo_pythonpath()}
        with log_path.open("ab") as log:
            process = spawn(argv, cwd=REPO_ROOT, env=env, stdout=log, stderr=log)
        record = ProcessRecord(
            kind="router", name=ROUTER_RECORD, pid=process.pid, pgid=process.pid,
            ticks=start_ticks(process.pid), port=self.port, owner=self.owner, keep=self.keep,
            log=str(log_path),
        )  # fmt: skip
        self.inventory.write(record)
        ready = wait_for(
            lambda: process.poll() is not None or self.answers(),
            ROUTER_STARTUP_SECONDS,
            STARTUP_POLL_SECONDS,
        )
        if ready and process.poll() is None:
            logger.info("router of %s on %s (pid %d)", self.state.parent, self.url, process.pid)
            return
        stop_process(process.pid, record.ticks, groups=set(), term_seconds=0)
        self.inventory.remove(ROUTER_RECORD)
        why = f"exited with code {process.poll()}" if ready else "did not answer in time"
        tail = log_path.read_text(errors="replace")[-LOG_TAIL_CHARS:].strip().splitlines()
        raise RouterUnavailable(
            f"router on port {self.port} {why}: {tail[-1] if tail else 'no output'} "
            f"(log: {log_path})"
        )

    def admin_token(self) -> str:
        """This home's admin token, created on first use with mode 0600 from the start."""
        path = self.state / ADMIN_TOKEN_FILE
        if not path.exists():
            self.state.mkdir(parents=True, exist_ok=True)
            temporary = path.with_name(f".{ADMIN_TOKEN_FILE}.{os.getpid()}.{time.time_ns()}")
            # Created with its final mode: the token is never readable by others, not even
            # briefly; link() publishes it whole, and only once if two processes race here.
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE_MODE)
            with os.fdopen(fd, "w") as handle:
                handle.write(secrets.token_urlsafe(ADMIN_TOKEN_BYTES))
            try:
                os.link(temporary, path)
            except FileExistsError:
                pass
            finally:
                temporary.unlink()
        return path.read_text().strip()

    # -- routing -------------------------------------------------------------------------------

    def stats_store(self) -> DirectoryStatsStore:
        return DirectoryStatsStore(self.stats_dir)

    def replicas(self) -> Replicas:
        return Replicas(self.client(), self.stats_store())

    def client(self) -> RouterClient:
        return RouterClient(self.url, self.admin_token)

    def routes(self, model: str) -> ModelRoutes:
        """The model's routes: the state file (the router's source of truth across restarts)
        and this router's admin API."""
        return ModelRoutes(FileRouteStore(self.routes_file), self.client(), model)
