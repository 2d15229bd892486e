"""Canary analysis: the router's measurements of canary vs stable over the same window, and the
golden prompts asked of both, turned into a verdict with the numbers behind it. A shadow step is
judged on the router's comparisons of the canary's answers to copies of stable's requests.

    pass          every gate holds
    fail          a gate is broken: roll back
    inconclusive  a gate cannot be judged: too few canary requests in the window, no
                  measurements from the router, stable silent on a golden prompt

Trouble measuring is a finding, never an exception: a release that does not answer a golden
prompt in time is judged by it (canary silent: the golden gate fails; stable silent: nothing to
compare with), and a router that gives no measurements leaves the window unjudged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, Field

from serving.config.profile import Gates, GoldenPrompt
from serving.router.comparison import ShadowStats

Verdict = Literal["pass", "fail", "inconclusive"]
Side = Literal["canary", "stable"]
# The finding of a window the router restarted in (serving.domain.interruptions).
ROUTER_RESTARTED = "router_restarted"


class Window(BaseModel):
    """One backend's measurements over the analysis window (from the router's /admin/stats)."""

    requests: int = 0
    errors: int = 0
    error_rate: float = 0.0
    ttft_p50: float | None = None
    ttft_p99: float | None = None

    @classmethod
    def from_router_stats(cls, stats: dict) -> Window:
        ttft = stats.get("ttft_s") or {}
        return cls(
            requests=stats.get("requests", 0),
            errors=(stats.get("errors") or {}).get("total", 0),
            error_rate=stats.get("error_rate", 0.0),
            ttft_p50=ttft.get("p50"),
            ttft_p99=ttft.get("p99"),
        )


class GateResult(BaseModel):
    gate: str
    passed: bool
    observed: float | None
    limit: float
    detail: str
    # Not passed and not broken either: the window cannot be judged on this gate.
    inconclusive: bool = False


class Unanswered(Exception):
    """A release gave no answer to a golden prompt: timed out, refused, or unreachable."""


class Silence(BaseModel):
    """Who gave no answer to which golden prompt (1-based), and why."""

    releases: list[Side]
    prompt: int
    why: str


class GoldenResult(BaseModel):
    agreement: float = Field(ge=0, le=1)
    answers: list[tuple[str, str]] = Field(description="(canary, stable) per prompt")
    # The asking stops at the first prompt a release leaves unanswered.
    silence: Silence | None = None


class Analysis(BaseModel):
    verdict: Verdict
    canary: Window
    stable: Window | None
    gates: list[GateResult]
    golden: GoldenResult | None = None
    shadow: ShadowStats | None = None

    @property
    def reason(self) -> str:
        unjudged = self.verdict == "inconclusive"
        told = [g.detail for g in self.gates if not g.passed and g.inconclusive == unjudged]
        return "; ".join(told) if told else "all gates held"

    @property
    def short_of_requests(self) -> bool:
        """Inconclusive only for want of canary requests: more bake time can fix it."""
        return [g.gate for g in self.gates if not g.passed] == ["min_requests"]

    @property
    def lost_for_good(self) -> bool:
        """Inconclusive because part of the window was never measured (the router restarted
        in it): a longer bake keeps the same start, so no more bake time can fix it."""
        return any(g.gate == ROUTER_RESTARTED for g in self.gates if not g.passed)


def enough_requests(gates: Gates, canary: Window) -> bool:
    return canary.requests >= gates.min_requests


def unmeasured(why: str) -> Analysis:
    """The router gave no measurements of the window: nothing to judge, nothing to blame."""
    missing = GateResult(gate="measurements", passed=False, observed=None, limit=1,
                         detail=f"no measurements from the router: {why}",
                         inconclusive=True)  # fmt: skip
    return Analysis(verdict="inconclusive", canary=Window(), stable=None, gates=[missing])


def analyse(
    gates: Gates, canary: Window, stable: Window | None, golden: GoldenResult | None = None
) -> Analysis:
    if not enough_requests(gates, canary):
        enough = GateResult(
            gate="min_requests",
            passed=False,
            observed=canary.requests,
            limit=gates.min_requests,
            detail=f"only {canary.requests} canary requests (need {gates.min_requests})",
            inconclusive=True,
        )
        return Analysis(
            verdict="inconclusive", canary=canary, stable=stable, gates=[enough], golden=golden
        )
    results = [
        _at_most("error_rate", canary.error_rate, gates.max_error_rate, "canary error rate")
    ]
    if stable is not None and stable.requests and stable.error_rate > 0:
        results.append(
            _at_most(
                "error_rate_ratio",
                canary.error_rate / stable.error_rate,
                gates.max_error_rate_ratio,
                "canary/stable error rate",
            )
        )
    for name, limit, ours, theirs in (
        ("ttft_p50_ratio", gates.max_ttft_p50_ratio, canary.ttft_p50, _get(stable, "ttft_p50")),
        ("ttft_p99_ratio", gates.max_ttft_p99_ratio, canary.ttft_p99, _get(stable, "ttft_p99")),
    ):
        if ours is not None and theirs:
            results.append(_at_most(name, ours / theirs, limit, f"canary/stable {name[:8]}"))
    for name, slo, ours in (
        ("ttft_p50_seconds", gates.max_ttft_p50_seconds, canary.ttft_p50),
        ("ttft_p99_seconds", gates.max_ttft_p99_seconds, canary.ttft_p99),
    ):
        if slo is not None and ours is not None:
            results.append(_at_most(name, ours, slo, f"canary {name[:8]} seconds"))
    if golden is not None:
        results.append(_golden_gate(gates, golden))
    return Analysis(verdict=_verdict(results), canary=canary, stable=stable, gates=results,
                    golden=golden)  # fmt: skip


def _verdict(results: list[GateResult]) -> Verdict:
    """A broken gate fails the canary even when another cannot be judged."""
    if any(not result.passed and not result.inconclusive for result in results):
        return "fail"
    return "pass" if all(result.passed for result in results) else "inconclusive"


def _golden_gate(gates: Gates, golden: GoldenResult) -> GateResult:
    limit = gates.min_golden_agreement
    if golden.silence is not None:
        silent = golden.silence
        who = " and ".join(silent.releases)
        detail = (f"{who} did not answer golden prompt {silent.prompt} within"
                  f" {gates.max_golden_answer_seconds:g} s: {silent.why}")  # fmt: skip
        # Stable silent too: the host is overloaded, not the canary broken.
        return GateResult(gate="golden_agreement", passed=False, observed=None, limit=limit,
                          detail=detail, inconclusive="stable" in silent.releases)  # fmt: skip
    passed = golden.agreement >= limit
    return GateResult(
        gate="golden_agreement",
        passed=passed,
        observed=golden.agreement,
        limit=limit,
        detail=f"golden agreement {golden.agreement:.0%} ({'≥' if passed else '<'} {limit:.0%})",
    )


def analyse_shadow(gates: Gates, shadow: ShadowStats, canary: Window) -> Analysis:
    """A shadow step. Failed copies are held to `max_error_rate` on their own (they never reach
    the canary's client-facing error rate); agreement is judged over the deterministic copies,
    the only ones whose answers must match."""
    judged: list[GateResult] = []
    if shadow.copies >= gates.min_requests:
        judged.append(_at_most("shadow_error_rate", shadow.error_rate, gates.max_error_rate,
                               "shadow copy error rate"))  # fmt: skip
    if shadow.deterministic >= gates.min_requests and shadow.agreement is not None:
        passed = shadow.agreement >= gates.min_shadow_agreement
        judged.append(GateResult(
            gate="shadow_agreement", passed=passed, observed=shadow.agreement,
            limit=gates.min_shadow_agreement,
            detail=f"shadow agreement {shadow.agreement:.0%} over {shadow.deterministic} "
                   f"deterministic requests ({'≥' if passed else '<'} "
                   f"{gates.min_shadow_agreement:.0%})",
        ))  # fmt: skip
    elif all(gate.passed for gate in judged):
        enough = GateResult(
            gate="min_requests", passed=False, observed=shadow.deterministic,
            limit=gates.min_requests,
            detail=f"only {shadow.deterministic} deterministic shadow copies compared "
                   f"(need {gates.min_requests})",
            inconclusive=True,
        )  # fmt: skip
        return Analysis(verdict="inconclusive", canary=canary, stable=None,
                        gates=[enough, *judged], shadow=shadow)  # fmt: skip
    verdict: Verdict = "pass" if all(gate.passed for gate in judged) else "fail"
    return Analysis(verdict=verdict, canary=canary, stable=None, gates=judged, shadow=shadow)


def _get(window: Window | None, field: str) -> float | None:
    return getattr(window, field) if window is not None else None


def _at_most(gate: str, observed: float, limit: float, what: str) -> GateResult:
    passed = observed <= limit
    return GateResult(
        gate=gate,
        passed=passed,
        observed=round(observed, 6),
        limit=limit,
        detail=f"{what} {observed:.3g} ({'≤' if passed else '>'} {limit:g})",
    )


# One chat completion request → its response (Platform.ask bound to one release); raises
# Unanswered when the release gives none.
Ask = Callable[[dict[str, Any]], dict[str, Any]]


def golden_agreement(
    prompts: list[GoldenPrompt], *, model: str, canary: Ask, stable: Ask
) -> GoldenResult:
    """Ask both releases the same prompts at temperature 0; agreement is the share of
    identical answers (after trimming whitespace and case). Both are asked each prompt, so a
    silence names every release that kept it; the asking stops there."""
    answers: list[tuple[str, str]] = []
    for number, prompt in enumerate(prompts, start=1):
        chat = {
            "model": model,
            "messages": [message.model_dump() for message in prompt.messages],
            "max_tokens": prompt.max_tokens,
            "temperature": 0,
        }
        replies: dict[Side, str | Unanswered] = {
            "canary": _answer(canary, chat), "stable": _answer(stable, chat)
        }  # fmt: skip
        silent = {who: reply for who, reply in replies.items() if isinstance(reply, Unanswered)}
        if silent:
            why = "; ".join(dict.fromkeys(str(error) for error in silent.values()))
            silence = Silence(releases=list(silent), prompt=number, why=why)
            return GoldenResult(agreement=0.0, answers=answers, silence=silence)
        answers.append((str(replies["canary"]), str(replies["stable"])))
    same = sum(_normal(ours) == _normal(theirs) for ours, theirs in answers)
    return GoldenResult(agreement=same / len(answers) if answers else 1.0, answers=answers)


def _answer(ask: Ask, chat: dict[str, Any]) -> str | Unanswered:
    try:
        completion = ask(chat)
    except Unanswered as silent:
        return silent
    try:
        return completion["choices"][0]["message"].get("content") or ""
    except (KeyError, IndexError, TypeError, AttributeError):
        return Unanswered("its answer is not a chat completion")


def _normal(answer: str) -> str:
    return " ".join(answer.split()).lower()
