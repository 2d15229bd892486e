"""What the Modal serving and routing tests share: a fake clock, a dict-backed stand-in for
modal.Dict, and qwen3-8b made servable by the FAKE engine."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

from serving.config.loader import load_profile
from serving.config.profile import HubSource, Profile, Secrets
from serving.engines.deepgemm import CompileFailed
from serving.engines.sglang import Command
from tests.server_fixtures import probe


def serving_profile(*, snapshot: bool, api_key: bool) -> Profile:
    """qwen3-8b (SGLang, memory snapshots) with a probe the FAKE engine passes."""
    base = load_profile("qwen3-8b")
    return base.model_copy(
        update={
            "engine": base.engine.model_copy(update={"memory_snapshot": snapshot}),
            "probes": [probe("chat", "Say hello.", expect="content")],
            "secrets": Secrets(api_key="test-api-key" if api_key else None),
            "startup_budget_seconds": 30.0,
        }
    )




class FakeClock:
    """Time that moves only when the code under test sleeps: its waits cost no real time."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


class FakeDict:
    """Stands in for a modal.Dict: get/put of JSON strings, thread-safe like the real one."""

    def __init__(self) -> None:
        self.data: dict[str, Any] = {}
        self.lock = threading.Lock()

    def get(self, key: str, default: Any = None) -> Any:
        with self.lock:
            return self.data.get(key, default)

    def put(self, key: str, value: Any, *, skip_if_exists: bool = False) -> bool:
        with self.lock:
            if skip_if_exists and key in self.data:
                return False
            self.data[key] = value
        return True

    def pop(self, key: str, default: Any = None) -> Any:
        with self.lock:
            return self.data.pop(key, default)

    def keys(self) -> list[str]:
        with self.lock:
            return list(self.data)


class FakeVolume:
    """Records reload/commit in a shared event list, like a mounted modal.Volume would see them."""

    def __init__(self, name: str, events: list[tuple[str, str]] | None = None) -> None:
        self.name = name
        self.events = events if events is not None else []

    def reload(self) -> None:
        self.events.append(("reload", self.name))

    def commit(self) -> None:
        self.events.append(("commit", self.name))


def cpu_profile(repo_id: str) -> Profile:
    """A profile without DeepGEMM, pointed at the mirror's synthetic repo."""
    return load_profile("smollm2-135m").model_copy(
        update={"hub": HubSource(repo=repo_id, revision="main"), "secrets": Secrets()}
    )


def gpu_profile(repo_id: str, **flags: Any) -> Profile:
    """GLM-5.1 (precompiles DeepGEMM) pointed at the synthetic repo."""
    base = load_profile("glm-5.1")
    engine = base.engine.model_copy(update={"flags": {**base.engine.flags, **flags}})
    return base.model_copy(
        update={
            "hub": HubSource(repo=repo_id, revision="main"),
            "secrets": Secrets(),
            "engine": engine,
        }
    )


class FakeCompileRun:
    """Stands in for run_compile (no GPU here): records the command, optionally fails."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.commands: list[Command] = []

    def __call__(self, command: Command, timeout: float, log: Callable[[str], None]) -> None:
        self.commands.append(command)
        if self.fail:
            raise CompileFailed("DeepGEMM compile failed: the compile server process died")


def no_gpu_check() -> None:
    return None


def metadata_requests(mirror: Any) -> list[str]:
    return [r.path for r in mirror.requests if r.path.startswith("/api/models/")]


def remote_wait_for_timeout() -> TimeoutError:
    """What a remote body's `asyncio.wait_for` raises: a bare TimeoutError, like Modal's own."""

    async def too_slow() -> None:
        await asyncio.wait_for(asyncio.sleep(1), timeout=0)

    try:
        asyncio.run(too_slow())
    except TimeoutError as exc:
        return exc
    raise AssertionError("wait_for did not time out")
