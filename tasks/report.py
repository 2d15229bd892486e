"""The rollout report: a Prefect markdown artifact with stages, canary steps and the decision;
for a shadow step, the agreement of the canary's answers and its worst disagreements."""

from __future__ import annotations

from typing import Literal

from prefect.artifacts import create_markdown_artifact
from pydantic import BaseModel, Field

from serving.config.profile import Shadow
from serving.domain.analysis import Window
from serving.router.comparison import ShadowStats
from tasks.canary import StepRecord

Decision = Literal["promoted", "rolled-back", "no-op", "failed", "dummy"]


class Stage(BaseModel):
    name: str
    seconds: float
    detail: str = ""


class RolloutReport(BaseModel):
    model: str
    revision: str | None = None
    decision: Decision | None = None
    reason: str = ""
    bytes_downloaded: int = 0
    dummy_weights: bool = False  # served random weights: never promoted
    stages: list[Stage] = Field(default_factory=list)
    steps: list[StepRecord] = Field(default_factory=list)

    def stage(self, name: str, seconds: float, detail: str = "") -> None:
        self.stages.append(Stage(name=name, seconds=seconds, detail=detail))

    def markdown(self) -> str:
        lines = [
            f"# Rollout of {self.model} @ {(self.revision or '?')[:12]}"
            + (" (dummy weights)" if self.dummy_weights else ""),
            f"**Decision: {self.decision}** — {self.reason}",
            "",
            "| stage | seconds | detail |",
            "|---|---:|---|",
            *(f"| {s.name} | {s.seconds:.1f} | {s.detail} |" for s in self.stages),
        ]
        if self.steps:
            lines += [
                "",
                "| weight | bake s | verdict | canary req / err / TTFT p50 / p99 "
                "| stable req / err / TTFT p50 / p99 | why |",
                "|---:|---:|---|---|---|---|",
            ]
            for step in self.steps:
                analysis = step.analysis
                weight = f"shadow {step.weight}%" if analysis.shadow else f"{step.weight}%"
                lines.append(
                    f"| {weight} | {step.seconds:.0f} | {analysis.verdict} "
                    f"| {_window(analysis.canary)} | {_window(analysis.stable)} "
                    f"| {analysis.reason} |"
                )
            for step in self.steps:
                if step.analysis.shadow is not None:
                    lines += ["", *_shadow(step.weight, step.analysis.shadow, step.shadow)]
        return "\n".join(lines)


def _window(window: Window | None) -> str:
    if window is None:
        return "—"
    p50 = f"{window.ttft_p50 * 1000:.0f} ms" if window.ttft_p50 is not None else "—"
    p99 = f"{window.ttft_p99 * 1000:.0f} ms" if window.ttft_p99 is not None else "—"
    return f"{window.requests} / {window.errors} / {p50} / {p99}"


def _shadow(weight: int, shadow: ShadowStats, step: Shadow | None) -> list[str]:
    """A shadow step's copies, how they were sent and answered, and its worst disagreements
    (texts masked by the router)."""
    sent = "" if step is None else f" of {step.percent:g}% of stable's requests, {step.how_sent},"
    latency = shadow.latency_s
    answered = ("" if latency.p50 is None or latency.p99 is None else
                f"; copies answered in {latency.p50 * 1000:.0f} ms p50, "
                f"{latency.p99 * 1000:.0f} ms p99")  # fmt: skip
    lines = [
        f"**Shadow at {weight}%**: {shadow.copies} copies{sent} ({shadow.errors} failed, "
        f"{shadow.skipped} skipped at the in-flight cap); agreement {_share(shadow.agreement)} "
        f"over {shadow.deterministic} deterministic requests; tool calls "
        f"{_share(shadow.tool_agreement)} of {shadow.tool_calls}; JSON "
        f"{_share(shadow.json_agreement)} of {shadow.json_requests}; finish reasons "
        f"{_share(shadow.finish_reason_agreement)}; mean length ratio "
        f"{'—' if shadow.length_ratio_mean is None else f'{shadow.length_ratio_mean:.2f}'}"
        f"{answered}",
    ]
    if shadow.worst:
        lines += ["", "| prompt | stable | canary | first differing token |", "|---|---|---|---:|"]
        lines += [
            f"| {_cell(c.prompt)} | {_cell(c.stable)} | {_cell(c.canary)} "
            f"| {'—' if c.first_difference is None else c.first_difference} |"
            for c in shadow.worst
        ]
    return lines


def _share(value: float | None) -> str:
    return "—" if value is None else f"{value:.0%}"


def _cell(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def publish(report: RolloutReport) -> None:
    create_markdown_artifact(
        markdown=report.markdown(),
        key=f"rollout-{report.model.replace('.', '-')}",
        description=f"{report.model}: {report.decision}",
    )
