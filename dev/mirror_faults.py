"""The mirror's fault knobs: throttle, cut, 5xx and corruption, per path glob and method."""

from __future__ import annotations

import fnmatch
import threading
from typing import Literal

from pydantic import BaseModel, Field

FaultKind = Literal["cut", "error", "corrupt"]

class PathFault(BaseModel):
    # fnmatch glob over the decoded URL path, e.g. "*/resolve/*.safetensors"; "*" matches "/" too.
    paths: str = "*"
    # Apply to the first `times` matching requests only; None = every time.
    times: int | None = Field(default=None, ge=1)
    # Only these HTTP methods (e.g. ["GET"] to fail downloads but not HEAD); None = all.
    methods: list[str] | None = None


class CutFault(PathFault):
    after_bytes: int = Field(ge=0)


class ErrorFault(PathFault):
    status: int = Field(default=500, ge=400, le=599)


class CorruptFault(PathFault):
    pass


class Faults(BaseModel):
    throttle_bytes_per_s: int | None = Field(default=None, gt=0)  # per connection
    cut: CutFault | None = None
    error: ErrorFault | None = None
    corrupt: CorruptFault | None = None


class FaultState:
    """The active knobs plus how many more times each limited fault may fire."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._faults = Faults()
        self._fired: dict[FaultKind, int] = {}

    def set(self, faults: Faults) -> None:
        with self._lock:
            self._faults = faults
            self._fired = {}

    @property
    def current(self) -> Faults:
        with self._lock:
            return self._faults

    def take(self, kind: FaultKind, method: str, path: str) -> PathFault | None:
        """This kind of fault if it applies to the request now; firing counts toward `times`."""
        with self._lock:
            fault: PathFault | None = getattr(self._faults, kind)
            if fault is None or not fnmatch.fnmatchcase(path, fault.paths):
                return None
            if fault.methods is not None and method.upper() not in fault.methods:
                return None
            fired = self._fired.get(kind, 0)
            if fault.times is not None and fired >= fault.times:
                return None
            self._fired[kind] = fired + 1
            return fault
