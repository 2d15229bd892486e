"""When a dead process is started again: the policy of the local "containers" (an engine under
its supervisor, the router under its keeper), which stand in for Modal replacing a container.

A crash is restarted after a backoff that doubles with each crash in a row, up to a limit; a
process that ran long enough before it died starts a new row (a crash a day is not a loop).
The policy only decides, as data; the caller waits and restarts.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

MINUTES = 60.0
# Three quick crashes in a row are a crash loop, not bad luck: the release is dead.
DEFAULT_RESTART_LIMIT = 3
FIRST_BACKOFF_SECONDS = 1.0
MAX_BACKOFF_SECONDS = 30.0
# A process that served this long before dying starts a new row of crashes.
HEALTHY_RUN_SECONDS = 10 * MINUTES


class Restart(BaseModel):
    """The decision after one crash."""

    restart: bool
    attempt: int  # the crash's number in the current row (1: the first)
    delay_seconds: float
    reason: str


class RestartPolicy(BaseModel):
    model_config = ConfigDict(frozen=True)

    limit: int = Field(default=DEFAULT_RESTART_LIMIT, ge=0)
    first_backoff_seconds: float = Field(default=FIRST_BACKOFF_SECONDS, ge=0)
    max_backoff_seconds: float = Field(default=MAX_BACKOFF_SECONDS, ge=0)
    healthy_run_seconds: float = Field(default=HEALTHY_RUN_SECONDS, gt=0)

    def after_crash(self, crashes_in_row: int, ran_seconds: float) -> Restart:
        """`crashes_in_row`: the crashes before this one in the current row; `ran_seconds`:
        how long the process ran before this crash."""
        attempt = 1 if ran_seconds >= self.healthy_run_seconds else crashes_in_row + 1
        if attempt > self.limit:
            return Restart(
                restart=False, attempt=attempt, delay_seconds=0,
                reason=f"crashed {attempt} times in a row; restart limit {self.limit} reached",
            )  # fmt: skip
        delay = min(self.first_backoff_seconds * 2 ** (attempt - 1), self.max_backoff_seconds)
        return Restart(
            restart=True, attempt=attempt, delay_seconds=delay,
            reason=f"restart {attempt} of {self.limit} in {delay:g} s",
        )  # fmt: skip
