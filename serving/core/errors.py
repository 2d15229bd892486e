"""How an exception is told in one line: to a terminal, a release history, a log."""

from __future__ import annotations


def one_line(error: BaseException | None) -> str:
    """`Type: first line of the message` -- tracebacks and multi-line engine output stay in
    the logs they came from."""
    if error is None:
        return "unknown error"
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


class ExpectedFailure(RuntimeError):
    """An outcome the rollout plans for (the Hub has no such revision, a proof failed, a release
    never became ready): its message says it all, so it is told in one line, never with a
    traceback. Any other exception is a bug, and keeps its traceback."""


# Set on the log record of an ExpectedFailure that lost its traceback (tasks/outcomes.py), for
# a console whose caller tells the failure itself (the `rollout` CLI).
EXPECTED_FAILURE_RECORD = "rollout_expected_failure"


class DeployFailed(ExpectedFailure):
    """A release did not become ready; the message is one line with the supervisor's reason
    and the log file. Nothing of the release is left running."""
