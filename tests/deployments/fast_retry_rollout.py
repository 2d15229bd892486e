"""The `rollout` flow, as the compile-retry deployment test's worker runs it: FOR TESTS ONLY.

Identical to flows/rollout.py:rollout except that the compile task's retry WAITS are dropped
(their count is kept). A worker's flow-run process cannot be monkeypatched, and the three
failed compiles the test needs would otherwise wait 30 s + 60 s between them.
"""

from __future__ import annotations

from flows.rollout import rollout
from tasks import weights

weights.compile_kernels.retry_delay_seconds = [0, 0]

__all__ = ["rollout"]
