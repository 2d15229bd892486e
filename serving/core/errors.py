"""How an exception is told in one line: to a terminal, a release history, a log."""

from __future__ import annotations

# A reason another process reported (an engine's last words) is cut here in a one-line message.
ONE_LINE_CHARS = 500


def one_line(error: BaseException | str | None) -> str:
    """`Type: first line of the message` -- tracebacks and multi-line engine output stay in
    the logs they came from. A text, an error another process reported (a supervisor's event),
    is `first line … last line`: what failed, then the engine's last word about why."""
    if error is None:
        return "unknown error"
    if isinstance(error, str):
        return _first_and_last(error)
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


def _first_and_last(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return "no reason given"
    line = lines[0] if len(lines) == 1 else f"{lines[0]} … {lines[-1]}"
    return line if len(line) <= ONE_LINE_CHARS else line[:ONE_LINE_CHARS] + "…"


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
