"""What a release's supervisor reports to the process that started it, one JSON line each."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel


class ServerEvent(BaseModel):
    """One JSON line on stdout, read by the local platform: `ready` once, then `stopped` or
    `crashed`; or `failed` instead of `ready`."""

    event: Literal["ready", "failed", "crashed", "stopped"]
    model: str
    release_id: str
    url: str | None = None
    pid: int | None = None
    engine_pid: int | None = None
    startup_seconds: float | None = None
    error: str | None = None
