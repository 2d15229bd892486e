"""Constants more than one package needs."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    pass


# A release's first answers may pay for graph capture and JIT compilation.
ASK_TIMEOUT_SECONDS = 120.0
