"""The local platform's router: one `python -m serving.router` per ROLLOUT_HOME.

Routing state lives in `$ROLLOUT_HOME/state/routes.json` (a RoutingTable, replaced atomically
under a lock): the router polls it every second, so a restarted router comes back with the
right weights. Every change is also pushed through the admin API, so it applies at once, and
read back until the router reports it.

The admin token is generated once per home, stored 0600 in `state/router-admin-token`, and
reaches the router through an environment variable: never on an argv, never in a log line.
"""

from __future__ import annotations

import logging
import os
import secrets
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from serving.core.constants import ASK_TIMEOUT_SECONDS
from serving.core.files import locked, write_atomically
from serving.core.home import REPO_ROOT, repo_pythonpath
from serving.core.procs import port_is_free, spawn, start_ticks, stop_process, wait_for
from serving.platforms.local.inventory import Inventory, Owner, ProcessRecord
from serving.router.table import Backend, RoutingTable

logger = logging.getLogger(__name__)

ROUTER_PORT_ENV = "ROLLOUT_ROUTER_PORT"
DEFAULT_ROUTER_PORT = 8400
# The variable the router process reads its admin token from (--admin-token-env).
ADMIN_TOKEN_ENV = "ROLLOUT_ROUTER_ADMIN_TOKEN"
ADMIN_TOKEN_FILE = "router-admin-token"
ROUTES_FILE = "routes.json"
ROUTER_RECORD = "router"
PRIVATE_FILE_MODE = 0o600
ADMIN_TOKEN_BYTES = 32

ROUTER_STARTUP_SECONDS = 20.0
# Two CPU engines under load can starve the router for seconds; an admin call waits it out.
ADMIN_TIMEOUT_SECONDS = 20.0
STARTUP_POLL_SECONDS = 0.1
# A pushed table is read back until the router reports it; a concurrent state-file poll can
# briefly install an older table, so a mismatch is pushed again a few times.
VERIFY_ATTEMPTS = 5
VERIFY_RETRY_SECONDS = 0.1
LOG_TAIL_CHARS = 1500


Mutation = Callable[[list[Backend]], list[Backend]]


class RouterUnavailable(RuntimeError):
    """The home's router cannot be started, reached, or does not apply a routing change."""


class LocalRouter:
    def __init__(
        self, home: Path, port: int, inventory: Inventory, owner: Owner, *, keep: bool
    ) -> None:
        # Absolute: the router process runs in another working directory.
        self.state = home.absolute() / "state"
        self.logs = home.absolute() / "logs"
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.inventory = inventory
        self.owner = owner
        self.keep = keep
        self.routes_file = self.state / ROUTES_FILE

    # -- the process ---------------------------------------------------------------------------

    def ensure_running(self) -> None:
        """Reuse this home's router if it answers on the port, else start one."""
        with locked(self.state / ".router.lock"):
            if self.answers():
                return
            record = self.inventory.get(ROUTER_RECORD)
            if record is not None:
                # Its process is dead or hung: clear it out before taking the port.
                stop_process(record.pid, record.ticks, groups=set(), term_seconds=0)
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

    def answers(self) -> bool:
        """True when a router holding this home's admin token listens on the port."""
        try:
            return self._admin("GET", "/admin/routes").status_code == 200
        except httpx.HTTPError:
            return False

    def _start(self) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        log_path = self.logs / "router.log"
        argv = [
            sys.executable, "-m", "serving.router",
            "--port", str(self.port),
            "--state-file", str(self.routes_file),
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

    def table(self) -> RoutingTable:
        try:
            return RoutingTable.model_validate_json(self.routes_file.read_bytes())
        except FileNotFoundError:
            return RoutingTable()

    def backends(self, model: str) -> list[Backend]:
        return list(self.table().models.get(model, []))

    def update(self, model: str, mutate: Mutation, *, push: bool = True) -> list[Backend]:
        """Apply `mutate` to the model's backends: state file first (the router's source of
        truth across restarts), then the admin API (so it applies now), then read back.
        With push=False, or no router running, only the state file changes."""
        with locked(self.state / ".routes.lock"):
            table = self.table()
            backends = mutate(list(table.models.get(model, [])))
            self._write_table(table.with_backends(model, backends))
            if push and self.answers():
                self._push(model, backends)
        return backends

    def _write_table(self, table: RoutingTable) -> None:
        # Backends carry api_key_env names only, never keys: the file holds no secret.
        write_atomically(self.routes_file, table.model_dump_json(exclude_none=True))

    def _push(self, model: str, backends: list[Backend]) -> None:
        expected = {backend.name: backend.weight for backend in backends}
        for _ in range(VERIFY_ATTEMPTS):
            if backends:
                payload = [backend.model_dump(exclude_none=True) for backend in backends]
                response = self._admin("PUT", f"/admin/routes/{model}", json=payload)
            else:
                response = self._admin("DELETE", f"/admin/routes/{model}")
            if response.status_code not in (200, 404):
                raise RouterUnavailable(
                    f"router refused the routes of {model}: HTTP {response.status_code}: "
                    f"{response.text[:200]}"
                )
            if self.reported_weights(model) == expected:
                return
            time.sleep(VERIFY_RETRY_SECONDS)
        raise RouterUnavailable(
            f"router does not report the routes of {model}: expected {expected}, "
            f"got {self.reported_weights(model)}"
        )

    def reported_weights(self, model: str) -> dict[str, int]:
        response = self._admin("GET", "/admin/routes")
        response.raise_for_status()
        entries = response.json()["models"].get(model, [])
        return {entry["name"]: entry["weight"] for entry in entries}

    # -- measurements --------------------------------------------------------------------------

    def stats(self, model: str, since: float) -> dict[str, Any]:
        response = self._admin("GET", "/admin/stats", params={"model": model, "since": since})
        response.raise_for_status()
        return dict(response.json())

    def ask(self, backend: str, chat: dict[str, Any]) -> dict[str, Any]:
        response = self._admin("POST", f"/admin/ask/{backend}", json=chat,
                               timeout=ASK_TIMEOUT_SECONDS)  # fmt: skip
        response.raise_for_status()
        return dict(response.json())

    def in_flight(self, model: str, backend: str) -> int:
        # since=now: an empty window; in_flight is counted outside the window.
        stats = self.stats(model, time.time())
        return int(stats.get("backends", {}).get(backend, {}).get("in_flight", 0))

    # -- internals -----------------------------------------------------------------------------

    def _admin(self, method: str, path: str, timeout: float = ADMIN_TIMEOUT_SECONDS,
               **kwargs: Any) -> httpx.Response:  # fmt: skip
        headers = {"Authorization": f"Bearer {self.admin_token()}"}
        # trust_env=False: a proxy from the environment must never see the admin token.
        with httpx.Client(timeout=timeout, trust_env=False) as client:
            return client.request(method, self.url + path, headers=headers, **kwargs)


