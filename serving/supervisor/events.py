"""What a release's supervisor reports to the process that started it, one JSON line each."""

from __future__ import annotations

import time
from typing import Literal

from pydantic import BaseModel, Field

EventKind = Literal["ready", "failed", "restarting", "crashed", "stopped"]


class ServerEvent(BaseModel):
    """One JSON line on stdout, read by the local platform: `ready`, or `failed` instead; then
    for each engine crash `restarting` and `ready` again (a new engine_pid), until `stopped`,
    or `crashed` once the restart limit is reached."""

    event: EventKind
    model: str
    release_id: str
    at: float = Field(default_factory=time.time)  # unix time
    url: str | None = None
    pid: int | None = None
    engine_pid: int | None = None
    startup_seconds: float | None = None
    restarts: int = 0  # engine restarts so far
    error: str | None = None
