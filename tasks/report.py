"""The rollout report: a Prefect markdown artifact with stages, canary steps and the decision."""

from __future__ import annotations

from typing import Literal

from prefect.artifacts import create_markdown_artifact
from pydantic import BaseModel, Field

from serving.domain.analysis import Window
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
                lines.append(
                    f"| {step.weight}% | {step.seconds:.0f} | {analysis.verdict} "
                    f"| {_window(analysis.canary)} | {_window(analysis.stable)} "
                    f"| {analysis.reason} |"
                )
        return "\n".join(lines)


def _window(window: Window | None) -> str:
    if window is None:
        return "—"
    p50 = f"{window.ttft_p50 * 1000:.0f} ms" if window.ttft_p50 is not None else "—"
    p99 = f"{window.ttft_p99 * 1000:.0f} ms" if window.ttft_p99 is not None else "—"
    return f"{window.requests} / {window.errors} / {p50} / {p99}"


def publish(report: RolloutReport) -> None:
    create_markdown_artifact(
        markdown=report.markdown(),
        key=f"rollout-{report.model.replace('.', '-')}",
        description=f"{report.model}: {report.decision}",
    )
