"""Drive the canary state machine (serving.canary) with the release tasks.

Not a task itself: an approval pauses the flow run (`pause_flow_run`), which needs the flow's
context, so the flow calls `CanaryRun.drive()` directly.
"""

from __future__ import annotations

from prefect import get_run_logger
from prefect.exceptions import FlowPauseTimeout
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput
from pydantic import BaseModel

from serving.config.loader import load_profile
from serving.config.profile import Shadow
from serving.control.lifecycle import ABORT_REASON
from serving.domain.analysis import Analysis
from serving.domain.canary import Action, Outcome, canary_machine
from serving.domain.release import Release
from serving.platform import Target
from serving.platforms import get_platform
from tasks.release import Bake, analyse_canary, bake, set_weight

HOURS = 60 * 60
# A paused rollout holds a canary (GPU money) while it waits; a day is the longest it may.
APPROVAL_TIMEOUT_SECONDS = 24 * HOURS


class Approval(RunInput):
    """What a human answers when a rollout pauses (UI or `resume_flow_run(run_input=...)`)."""

    approve: bool
    note: str = ""


class StepRecord(BaseModel):
    weight: int
    seconds: float
    analysis: Analysis
    shadow: Shadow | None = None  # how a shadow step copied stable's requests


class CanaryRun:
    def __init__(
        self, model: str, target: Target, canary: Release, stable: Release | None, approve: bool
    ) -> None:
        self.model, self.target, self.canary, self.stable = model, target, canary, stable
        self.pre_approved = approve
        self.steps: list[StepRecord] = []
        self._bake: Bake | None = None

    def drive(self) -> Action:
        """Run the profile's steps; the final action is `promote` or `rollback`."""
        profile = load_profile(self.model)
        machine = canary_machine(profile.canary, has_stable=self.stable is not None)
        action = next(machine)
        while action.kind not in ("promote", "rollback"):
            if self._aborted():
                return Action(kind="rollback", reason=ABORT_REASON)
            action = machine.send(self._perform(action))
        return action

    def _aborted(self) -> bool:
        """`rollout abort` reverts the canary from another process; the record shows it."""
        record = get_platform(self.target).release_store().read(self.model)
        return record.canary is None or record.canary.id != self.canary.id

    def _perform(self, action: Action) -> Outcome:
        if action.kind == "set_weight":
            set_weight(self.model, self.target, self.canary, self.stable, action.weight,
                       action.shadow)  # fmt: skip
        elif action.kind == "bake":
            self._bake = bake(self.model, self.target, self.canary, action.weight, action.seconds)
        elif action.kind == "extend_bake":
            assert self._bake is not None
            get_run_logger().info("%s at %d%%: baking %.0f s more: %s", self.model,
                                  action.weight, action.seconds, action.reason)  # fmt: skip
            more = bake(self.model, self.target, self.canary, action.weight, action.seconds)
            # The window grows: the next analysis covers it all and supersedes the last one.
            self._bake = self._bake.model_copy(update={
                "ended": more.ended, "crashes": self._bake.crashes + more.crashes,
                "stopped": more.stopped,
            })  # fmt: skip
            self.steps.pop()
        elif action.kind == "analyse":
            assert self._bake is not None
            analysis = analyse_canary(self.model, self.target, self.canary, self.stable,
                                      self._bake, shadow=action.shadow is not None)  # fmt: skip
            seconds = self._bake.ended - self._bake.started
            self.steps.append(StepRecord(weight=self._bake.weight, seconds=seconds,
                                         analysis=analysis, shadow=action.shadow))  # fmt: skip
            return analysis
        elif action.kind == "await_approval":
            return self.pre_approved or self._ask(action.reason)
        return None

    def _ask(self, reason: str) -> bool:
        get_run_logger().warning("%s: waiting for approval (%s)", self.model, reason)
        try:
            answer = pause_flow_run(
                wait_for_input=Approval.with_initial_data(
                    description=f"Canary {self.canary.id}: {reason}. Approve to continue?",
                    approve=False,
                ),
                timeout=APPROVAL_TIMEOUT_SECONDS,
            )
        except FlowPauseTimeout:
            return False
        return bool(answer and answer.approve)
