"""The DeepGEMM compile stage: precompile kernels into the cache volume, once per cache key.

`python -m sglang.compile_deep_gemm` starts a real server in a child process, sends it one
request and prints a success line. Its own supervision is weak: if the server child crashes,
the parent keeps polling until its timeout (an hour of 8 idle GPUs). So this module watches the
whole process group itself, and calls it a success only on exit 0 AND the success line.

A marker file named by the cache key (serving.sglang.deepgemm_cache_key) records a finished
compile; a second run for the same key costs one stat.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ValidationError

from serving.config.profile import Profile
from serving.core.files import write_atomically
from serving.core.procs import group_members, stop_group
from serving.core.redaction import SECRET_ENV_VARS, Redactor, secrets_in_env
from serving.engines.sglang import (
    COMPILE_SUCCESS_LINE,
    Command,
    compile_command,
    deepgemm_cache_key,
)

# compile_deep_gemm's own timeout. Platforms give their job a margin beyond it, so the child
# gives up first and its log says why.
COMPILE_TIMEOUT_SECONDS = 170 * 60
# How often the group is checked for a dead server child.
WATCH_INTERVAL = 0.5
# compile_deep_gemm stops its server itself once done, then exits: a parent still running this
# long after its server is gone is polling a dead one.
SERVER_GONE_GRACE_SECONDS = 5.0
# After SIGTERM, the compile server gets this long to exit before its group is SIGKILLed.
TERM_GRACE_SECONDS = 10.0
LOG_TAIL_LINES = 40

Log = Callable[[str], None]


class CompileFailed(RuntimeError):
    """The compile did not produce kernels; the message says why and ends with the log tail."""


class CompileResult(BaseModel):
    status: Literal["compiled", "cached", "skipped"]
    reason: str
    key: str | None
    marker: str | None
    seconds: float

    @classmethod
    def not_required(cls) -> CompileResult:
        return cls(status="skipped", reason="the profile does not precompile kernels",
                   key=None, marker=None, seconds=0.0)  # fmt: skip


class Marker(BaseModel):
    key: str
    model: str
    revision: str
    sglang: str
    gpu: str | None
    compiled_at: datetime
    seconds: float


def marker_path(cache_dir: Path, key: str) -> Path:
    return cache_dir / "markers" / f"{key}.json"


def parse_marker(raw: bytes | str) -> Marker | None:
    """The one rule for "compiled": a marker that parses. A torn or foreign file is not one,
    wherever it is read (the orchestrator, the compile container, verification)."""
    try:
        return Marker.model_validate_json(raw)
    except ValidationError:
        return None


def read_marker(cache_dir: Path, key: str) -> Marker | None:
    path = marker_path(cache_dir, key)
    return parse_marker(path.read_bytes()) if path.is_file() else None


def unavailable_reason() -> str | None:
    """Why kernels cannot be compiled on this machine, or None if they can."""
    if importlib.util.find_spec("sglang") is None:
        return "SGLang is not installed"
    if shutil.which("nvidia-smi") is None:
        return "no NVIDIA GPU here (nvidia-smi not found)"
    listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    if listed.returncode != 0 or "GPU" not in listed.stdout:
        return "no NVIDIA GPU visible to nvidia-smi"
    return None


def compile_kernels(
    profile: Profile,
    *,
    revision: str,
    weights_path: Path,
    cache_dir: Path,
    timeout_seconds: int,
    port: int = 30500,
    log: Log = print,
    run: Callable[[Command, float, Log], None] | None = None,
    unavailable: Callable[[], str | None] = unavailable_reason,
) -> CompileResult:
    """Compile the kernels of `revision` unless its cache key is already marked done.

    Needs only the revision's config.json, so it may start while the shards still download.
    """
    started = time.monotonic()
    key = deepgemm_cache_key(profile, (weights_path / "config.json").read_bytes())
    marker = marker_path(cache_dir, key)
    if read_marker(cache_dir, key) is not None:
        return CompileResult(
            status="cached", reason="marker found", key=key, marker=str(marker), seconds=0.0
        )
    reason = unavailable()
    if reason is not None:
        # Never a fake success: serving will JIT-compile (slowly) and the report says why.
        log(f"[compile] skipped: {reason}")
        return CompileResult(status="skipped", reason=reason, key=key, marker=None, seconds=0.0)
    command = compile_command(
        profile,
        weights_path=weights_path,
        deepgemm_path=cache_dir,
        port=port,
        timeout_seconds=timeout_seconds,
    )
    (run or run_compile)(command, timeout_seconds, log)
    seconds = time.monotonic() - started
    _write_marker(
        marker,
        Marker(
            key=key,
            model=profile.name,
            revision=revision,
            sglang=profile.engine.version,
            gpu=profile.resources.gpu,
            compiled_at=datetime.now(UTC),
            seconds=seconds,
        ),
    )
    return CompileResult(
        status="compiled", reason="compiled", key=key, marker=str(marker), seconds=seconds
    )


def run_compile(command: Command, timeout_seconds: float, log: Log) -> None:
    """Run compile_deep_gemm in its own process group; raise CompileFailed unless it exits 0
    having printed the success line. A dead server child, the timeout, or an exception in the
    caller (cancellation) kill the whole group."""
    # The compile runs offline (HF_HUB_OFFLINE=1): it gets no secret, and its output, which
    # goes to the logs and into CompileFailed, is masked for any it could still echo.
    env = {**os.environ, **command.env}
    redact = Redactor(secrets_in_env(env))
    process = subprocess.Popen(
        command.argv,
        env={name: value for name, value in env.items() if name not in SECRET_ENV_VARS},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
        start_new_session=True,
    )
    tail: deque[str] = deque(maxlen=LOG_TAIL_LINES)
    succeeded = threading.Event()
    reader = threading.Thread(
        target=_stream, args=(process, tail, succeeded, log, redact), daemon=True,
        name="compile-log",
    )
    reader.start()
    try:
        failure = _watch(process, timeout_seconds)
    finally:
        stop_group(process, TERM_GRACE_SECONDS)
        reader.join(timeout=5)
    if failure is None and not succeeded.is_set():
        failure = f"exit {process.returncode} without {COMPILE_SUCCESS_LINE!r}"
    if failure is not None:
        raise CompileFailed(f"DeepGEMM compile failed: {failure}\n" + "\n".join(tail))


def _stream(process: subprocess.Popen[str], tail: deque[str], succeeded: threading.Event,
            log: Log, redact: Redactor) -> None:  # fmt: skip
    assert process.stdout is not None
    for raw in process.stdout:
        line = redact(raw.rstrip("\n"))
        tail.append(line)
        log(f"[compile] {line}")
        if COMPILE_SUCCESS_LINE in line:
            succeeded.set()


def _watch(process: subprocess.Popen[str], timeout_seconds: float) -> str | None:
    """Wait for the compile to end; the failure reason, or None when it exited 0."""
    deadline = time.monotonic() + timeout_seconds
    saw_child = False
    while True:
        try:
            code = process.wait(timeout=WATCH_INTERVAL)
        except subprocess.TimeoutExpired:
            code = None
        if code is not None:
            return None if code == 0 else f"exit {code}"
        children = group_members(process.pid) - {process.pid}
        if children:
            saw_child = True
        elif saw_child:
            # Finished (it stopped its server) or not: its own exit tells, within a grace.
            # compile_deep_gemm would poll a dead server until the timeout; we don't.
            try:
                code = process.wait(timeout=SERVER_GONE_GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                return "the compile server process died"
            return None if code == 0 else f"exit {code}"
        if time.monotonic() > deadline:
            return f"timed out after {timeout_seconds:.0f} s"


def _write_marker(path: Path, marker: Marker) -> None:
    write_atomically(path, marker.model_dump_json(indent=1))
