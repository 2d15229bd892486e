"""The engine supervisor: one release's engine process, from start to a graceful stop.

The same code runs inside a Modal container and as a local process (`python -m serving.supervisor`):

1. `start()`    launch the engine in its own process group, stream its output line by line
                (prefixed with the release, secrets redacted), keep the last lines for errors;
2. `wait_ready()` poll `/health` until 200, failing at once if the engine exits meanwhile;
3. `run_probes()` the profile's probes: real chat requests whose answers must meet their
                expectation, or the release fails before it takes traffic;
4. `watch()`    a crash monitor: an engine exit after startup calls `on_crash` (in a Modal
                container `exit_process_on_crash`, so Modal replaces the container);
5. `stop()`     SIGTERM the group, wait for the drain deadline (SGLang drains with no deadline
                of its own), SIGKILL the group, reap.

Memory-snapshot profiles add `prepare_snapshot()` (warm up, release GPU memory) and
`restore_snapshot()` (resume it), around Modal's CPU+GPU snapshot.

No prefect or modal import here: this module is also the container's entry point.
"""

from __future__ import annotations

import logging
import os
import subprocess
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from typing import TextIO

import httpx
from pydantic import ValidationError

from serving.config.profile import Probe, Profile
from serving.core.procs import KILL_REAP_SECONDS, stop_group
from serving.core.redaction import Redactor, secrets_in_env
from serving.engines.sglang import Command
from serving.supervisor.probes import (
    AssistantMessage,
    ChatCompletion,
    _snippet,
    check_answer,
    probe_payload,
)

logger = logging.getLogger(__name__)

LOG_TAIL_LINES = 50

HEALTH_PATH = "/health"
CHAT_PATH = "/v1/chat/completions"
RELEASE_MEMORY_PATH = "/release_memory_occupation"
RESUME_MEMORY_PATH = "/resume_memory_occupation"

HEALTH_POLL_SECONDS = 0.25
# SGLang's /health generates one token; a busy engine may take a moment to answer it.
HEALTH_REQUEST_TIMEOUT_SECONDS = 5.0
CONNECT_TIMEOUT_SECONDS = 5.0
# The first requests after startup pay for graph capture and JIT (the GLM guide allows 300 s).
PROBE_REQUEST_TIMEOUT_SECONDS = 300.0
# Releasing or resuming GPU memory moves weights between GPU and CPU: tens of GB.
SNAPSHOT_REQUEST_TIMEOUT_SECONDS = 300.0
CRASH_POLL_SECONDS = 0.5
DEFAULT_DRAIN_SECONDS = 30.0
# Output still in the pipe when the engine exits belongs in the error message.
LOG_DRAIN_SECONDS = 2.0


class EngineFailed(RuntimeError):
    """The engine could not start, exited, or refused a control request. The message carries
    the engine's last log lines, secrets redacted."""


class ProbeFailed(RuntimeError):
    """A probe's answer violated its expectation; the message names the probe and the fault."""


class ShutdownRequested(BaseException):
    """SIGTERM or SIGINT arrived while the release was still starting.

    A BaseException, like KeyboardInterrupt, because the signal handler raises it wherever the
    start happens to be: `logging` swallows an Exception raised inside a handler's write, and
    the start would go on to "ready" after the signal.
    """


# --------------------------------------------------------------------------------------------
# The supervisor
# --------------------------------------------------------------------------------------------


CrashCallback = Callable[[EngineFailed], None]


def new_release_id() -> str:
    return uuid.uuid4().hex[:8]


def exit_process_on_crash(failure: EngineFailed) -> None:
    """The crash callback in a Modal container: die, so Modal replaces the container instead
    of routing requests to a dead engine (502s). os._exit: no cleanup may block it."""
    logger.critical("%s; exiting the container", failure)
    logging.shutdown()
    os._exit(1)


class Supervisor:
    """One engine process: start, readiness, probes, crash monitor, graceful stop."""

    def __init__(
        self,
        profile: Profile,
        command: Command,
        *,
        port: int,
        host: str = "127.0.0.1",
        model: str | None = None,
        api_key: str | None = None,
        release_id: str | None = None,
        on_crash: CrashCallback | None = None,
        probe_timeout_seconds: float = PROBE_REQUEST_TIMEOUT_SECONDS,
    ) -> None:
        self.profile = profile
        self.command = command
        self.release_id = release_id or new_release_id()
        self.label = f"{profile.name}-{self.release_id}"
        self.base_url = f"http://{host}:{port}"
        self.model = model or profile.served_model_name
        self._env = {**os.environ, "PYTHONUNBUFFERED": "1", **command.env}
        self._redact = Redactor([api_key, *secrets_in_env(self._env)])
        self._on_crash = on_crash
        self._probe_timeout = probe_timeout_seconds
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # trust_env=False: a proxy from the environment must never see engine traffic.
        self._http = httpx.Client(
            base_url=self.base_url,
            headers=headers,
            timeout=httpx.Timeout(HEALTH_REQUEST_TIMEOUT_SECONDS, connect=CONNECT_TIMEOUT_SECONDS),
            trust_env=False,
        )
        self._process: subprocess.Popen[str] | None = None
        self._tail: deque[str] = deque(maxlen=LOG_TAIL_LINES)
        self._tail_lock = threading.Lock()
        self._log_reader: threading.Thread | None = None
        self._monitor: threading.Thread | None = None
        self._stopping = threading.Event()
        self._stop_lock = threading.Lock()
        self._stopped = False

    # -- state ---------------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def returncode(self) -> int | None:
        return self._process.poll() if self._process else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def log_tail(self) -> list[str]:
        """The engine's last output lines, secrets redacted."""
        with self._tail_lock:
            return list(self._tail)

    # -- lifecycle -----------------------------------------------------------------------------

    def startup(self, budget_seconds: float | None = None) -> float:
        """start → wait_ready → run_probes → watch. Returns seconds until healthy. On any
        failure (or an interrupt) the engine is killed before the exception propagates."""
        try:
            self.start()
            ready_after = self.wait_ready(budget_seconds)
            self.run_probes()
            self.watch()
        except BaseException:
            self.stop(drain_seconds=0)  # nothing routes to a release that never got ready
            raise
        return ready_after

    def start(self) -> None:
        if self._process is not None:
            raise RuntimeError(f"{self.label}: already started")
        logger.info("[%s] starting: %s", self.label, self._redact(" ".join(self.command.argv)))
        try:
            self._process = subprocess.Popen(
                self.command.argv,
                env=self._env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                encoding="utf-8",
                errors="replace",
                bufsize=1,
                # Its own process group: stop() signals the engine and every worker it spawned,
                # and a terminal's Ctrl-C reaches the supervisor only.
                start_new_session=True,
            )
        except OSError as exc:
            raise EngineFailed(
                self._redact(f"{self.label}: cannot start the engine: {exc}")
            ) from None
        self._log_reader = threading.Thread(
            target=self._pump_logs,
            args=(self._process.stdout,),
            name=f"logs-{self.label}",
            daemon=True,
        )
        self._log_reader.start()

    def wait_ready(self, budget_seconds: float | None = None) -> float:
        """Poll /health until 200; returns the seconds it took since this call. Raises
        EngineFailed as soon as the engine exits, or when the budget runs out."""
        budget = (
            budget_seconds if budget_seconds is not None else self.profile.startup_budget_seconds
        )
        started = time.monotonic()
        deadline = started + budget
        while True:
            self._raise_if_exited("during startup")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise EngineFailed(self._with_tail(f"not healthy within {budget:g} s"))
            if self._healthy(min(HEALTH_REQUEST_TIMEOUT_SECONDS, remaining)):
                elapsed = time.monotonic() - started
                logger.info("[%s] healthy after %.1f s", self.label, elapsed)
                return elapsed
            time.sleep(max(0.0, min(HEALTH_POLL_SECONDS, deadline - time.monotonic())))

    def run_probes(self) -> None:
        for probe in self.profile.probes:
            self.run_probe(probe)

    def run_probe(self, probe: Probe) -> AssistantMessage:
        """Send one probe; raise ProbeFailed unless its answer meets the expectation."""
        started = time.monotonic()
        try:
            response = self._http.post(
                CHAT_PATH, json=probe_payload(probe, self.model), timeout=self._probe_timeout
            )
        except httpx.TransportError as exc:
            self._raise_if_exited(f"during probe {probe.name!r}")
            raise ProbeFailed(
                self._redact(f"probe {probe.name!r}: request failed: {exc!r}")
            ) from None
        if response.status_code != 200:
            raise ProbeFailed(
                self._redact(
                    f"probe {probe.name!r}: HTTP {response.status_code}: {_snippet(response.text)}"
                )
            )
        try:
            message = ChatCompletion.model_validate_json(response.content).choices[0].message
        except ValidationError as exc:
            error = exc.errors()[0]
            where = ".".join(str(part) for part in error["loc"])
            raise ProbeFailed(
                self._redact(f"probe {probe.name!r}: malformed response: {where}: {error['msg']}")
            ) from None
        problem = check_answer(probe, message)
        if problem:
            raise ProbeFailed(self._redact(f"probe {probe.name!r}: {problem}"))
        logger.info(
            "[%s] probe %r passed (%.1f s)", self.label, probe.name, time.monotonic() - started
        )
        return message

    def watch(self) -> None:
        """Start the crash monitor: from now on an engine exit is a failed replica."""
        if self._monitor is not None:
            return
        self._monitor = threading.Thread(
            target=self._monitor_crashes, name=f"monitor-{self.label}", daemon=True
        )
        self._monitor.start()

    def stop(self, drain_seconds: float = DEFAULT_DRAIN_SECONDS) -> int | None:
        """SIGTERM the engine's process group, let it drain up to `drain_seconds`, then SIGKILL
        the group. Take the release out of routing first: a draining engine refuses new work.
        Idempotent; always reaps. Returns the engine's exit code (negative: killed by signal)."""
        with self._stop_lock:
            if not self._stopped:
                self._stopping.set()  # before any signal, so the monitor sees no crash
                try:
                    if self._process is not None:
                        self._terminate(self._process, drain_seconds)
                finally:
                    self._stopped = True
                    self._http.close()
        return self.returncode

    def __enter__(self) -> Supervisor:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- memory snapshots ----------------------------------------------------------------------

    def prepare_snapshot(self) -> None:
        """Before Modal snapshots the container: warm up (the snapshot should hold an engine
        that has served), then release GPU memory so the snapshot can be taken."""
        self._require_memory_snapshot()
        self.run_probes()
        self._control(RELEASE_MEMORY_PATH)

    def restore_snapshot(self) -> None:
        """After Modal restored the container: take the GPU memory back."""
        self._require_memory_snapshot()
        self._control(RESUME_MEMORY_PATH)

    def _require_memory_snapshot(self) -> None:
        if not self.profile.engine.memory_snapshot:
            raise ValueError(f"{self.profile.name} does not use memory snapshots")

    def _control(self, path: str) -> None:
        try:
            response = self._http.post(path, json={}, timeout=SNAPSHOT_REQUEST_TIMEOUT_SECONDS)
        except httpx.TransportError as exc:
            self._raise_if_exited(f"during {path}")
            raise EngineFailed(self._with_tail(f"{path} failed: {exc!r}")) from None
        if response.status_code != 200:
            raise EngineFailed(
                self._with_tail(f"{path}: HTTP {response.status_code}: {_snippet(response.text)}")
            )
        logger.info("[%s] %s done", self.label, path)

    # -- internals -----------------------------------------------------------------------------

    def _pump_logs(self, stream: TextIO) -> None:
        for raw in stream:
            # Progress bars redraw with \r: keep what a terminal would finally show.
            line = self._redact(raw.rstrip("\n").rsplit("\r", 1)[-1])
            if not line.strip():
                continue
            with self._tail_lock:
                self._tail.append(line)
            logger.info("[%s] %s", self.label, line)
        stream.close()

    def _drain_logs(self) -> None:
        # Only an exited engine has output left to collect; a running one would just stall us.
        # A worker still holding the pipe open keeps the reader alive: bounded wait.
        if self._log_reader is not None and self.returncode is not None:
            self._log_reader.join(LOG_DRAIN_SECONDS)

    def _with_tail(self, message: str) -> str:
        self._drain_logs()
        tail = "\n".join(f"  {line}" for line in self.log_tail()) or "  (no output)"
        return self._redact(f"{self.label}: {message}; last engine output:\n{tail}")

    def _raise_if_exited(self, when: str) -> None:
        code = self.returncode
        if code is not None:
            raise EngineFailed(self._with_tail(f"engine exited with code {code} {when}"))

    def _healthy(self, timeout: float) -> bool:
        try:
            return self._http.get(HEALTH_PATH, timeout=timeout).status_code == 200
        except httpx.TransportError:
            return False  # not listening yet

    def _monitor_crashes(self) -> None:
        process = self._process
        assert process is not None
        while not self._stopping.wait(CRASH_POLL_SECONDS):
            if process.poll() is None:
                continue
            if self._stopping.is_set():
                return  # a requested stop, not a crash
            failure = EngineFailed(self._with_tail(f"engine exited with code {process.returncode}"))
            logger.error("[%s] crashed: %s", self.label, failure)
            if self._on_crash is not None:
                self._on_crash(failure)
            return

    def _terminate(self, process: subprocess.Popen[str], drain_seconds: float) -> None:
        if process.poll() is None:
            logger.info("[%s] SIGTERM; draining up to %g s", self.label, drain_seconds)
        teardown = stop_group(process, drain_seconds)
        if not teardown.drained:
            logger.warning("[%s] still running after %g s: SIGKILL", self.label, drain_seconds)
        if not teardown.gone:
            logger.error(
                "[%s] pid %d survived SIGKILL for %g s", self.label, process.pid, KILL_REAP_SECONDS
            )
        self._drain_logs()
        logger.info("[%s] stopped (exit code %s)", self.label, process.poll())
