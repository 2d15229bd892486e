"""Which Prefect API the CLI's flow runs report to, chosen before Prefect is imported.

1. PREFECT_API_URL, when set: it must answer, or the command fails in one line.
2. The server `make serve` runs (dev/serve.py), when it answers on its port: runs show up there.
3. Otherwise a Prefect server inside this process, on a thread. Prefect's own fallback is a
   temporary server in a subprocess: it re-imports Prefect before any work starts, and a
   SIGKILLed CLI leaves it running. A thread cannot outlive its process.

Telemetry is off unless the caller's environment turns it on: offline it only logs failures.
"""

from __future__ import annotations

import atexit
import os
import socket
import threading
import time

import httpx

API_URL_ENV = "PREFECT_API_URL"
# Where `make serve` runs its Prefect server (4200 is Prefect's own default).
SERVE_PORT_ENV = "ROLLOUT_PREFECT_PORT"
SERVE_PORT = 4200
QUIET = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
# A server on loopback answers /health in milliseconds; this only bounds a stuck port.
PROBE_SECONDS = 1.0
# Generous for a busy 2-core machine: the first start migrates a fresh database.
STARTUP_SECONDS = 90.0
STOP_SECONDS = 10.0
POLL_SECONDS = 0.02


class NoPrefectApi(RuntimeError):
    """PREFECT_API_URL names a server that does not answer."""


def connect() -> str:
    """Point this process's Prefect at an API, starting one in-process if none runs; its URL."""
    for key, value in QUIET.items():
        os.environ.setdefault(key, value)
    given = os.environ.get(API_URL_ENV)
    if given:
        # Any answer will do (Prefect Cloud wants a key for /health): only silence fails.
        if _health(given, via_proxy=True) is None:
            raise NoPrefectApi(f"no Prefect API answers at {given} ({API_URL_ENV})")
        return given
    served = serve_api_url()
    if _health(served, via_proxy=False) == httpx.codes.OK:
        os.environ[API_URL_ENV] = served
        return served
    listener = socket.create_server(("127.0.0.1", 0))
    api_url = f"http://127.0.0.1:{listener.getsockname()[1]}/api"
    # Set before Prefect is imported, so every client of this process (flow engine, task
    # threads, log and event workers) reads it from the environment.
    os.environ[API_URL_ENV] = api_url
    _serve_in_process(listener, api_url)
    return api_url


def serve_api_url() -> str:
    return f"http://127.0.0.1:{os.environ.get(SERVE_PORT_ENV) or SERVE_PORT}/api"


def _health(api_url: str, *, via_proxy: bool) -> int | None:
    """The status of `/health`, or None when nothing answers."""
    try:
        response = httpx.get(f"{api_url}/health", timeout=PROBE_SECONDS, trust_env=via_proxy)
    except httpx.HTTPError:
        return None
    return response.status_code


def _serve_in_process(listener: socket.socket, api_url: str) -> None:
    import uvicorn
    from prefect.server.api.server import create_app

    # ephemeral: no UI, and only the services a short-lived server needs (no scheduler).
    config = uvicorn.Config(
        create_app(ephemeral=True, final=True), log_level="error", lifespan="on"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [listener]}, name="prefect-server", daemon=True
    )
    thread.start()
    deadline = time.monotonic() + STARTUP_SECONDS
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the in-process Prefect server did not start at {api_url}")
        time.sleep(POLL_SECONDS)

    def stop() -> None:
        # Registered before Prefect's own exit handlers, so it runs after them: the log and
        # event workers flush to this server first.
        server.should_exit = True
        thread.join(STOP_SECONDS)

    atexit.register(stop)
