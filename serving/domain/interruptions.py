"""Findings about a bake that was interrupted, beside the gates on its measurements
(serving.domain.analysis): what happened to the processes during the window decides first.

    the canary's engine crashed   fail, even if it was restarted and its numbers look fine
    the router restarted          inconclusive: its measurements of the window are lost, and a
                                  canary is never promoted on missing data (nor is the bake
                                  extended: a longer window has the same hole)
"""

from __future__ import annotations

from serving.domain.analysis import ROUTER_RESTARTED, Analysis, GateResult, Window


def crash_finding(crashes: int, running: bool) -> GateResult | None:
    """The canary's engine crashes during the bake (`running`: the release still runs)."""
    if crashes == 0 and running:
        return None
    if not running:
        detail = "the canary stopped running during the bake"
    else:
        detail = f"the canary's engine crashed {crashes}x during the bake (restarted)"
    return GateResult(gate="engine_crashes", passed=False, observed=crashes, limit=0,
                      detail=detail)  # fmt: skip


def router_restart_finding(
    measured_since: float | None, window_started: float
) -> GateResult | None:
    """`measured_since`: when the router's measurements begin (its start), from its stats."""
    if measured_since is None or measured_since <= window_started:
        return None
    lost = measured_since - window_started
    return GateResult(
        gate=ROUTER_RESTARTED, passed=False, observed=round(lost, 3), limit=0,
        detail=f"the router restarted {lost:.1f} s into the window: its measurements are lost",
        inconclusive=True,
    )  # fmt: skip


def interrupted(
    canary: Window, stable: Window | None, crash: GateResult | None,
    router_restart: GateResult | None,
) -> Analysis | None:
    """The verdict an interruption imposes, or None when the gates may judge the window."""
    if crash is not None:
        return Analysis(verdict="fail", canary=canary, stable=stable, gates=[crash])
    if router_restart is not None:
        return Analysis(verdict="inconclusive", canary=canary, stable=stable,
                        gates=[router_restart])  # fmt: skip
    return None
