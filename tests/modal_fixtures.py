"""What the Modal serving and routing tests share: a dict-backed stand-in for modal.Dict, and
qwen3-8b made servable by the FAKE engine."""

from __future__ import annotations

import threading
from typing import Any

from serving.config.loader import load_profile
from serving.config.profile import Profile, Secrets
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
