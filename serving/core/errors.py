"""How an exception is told in one line: to a terminal, a release history, a log."""

from __future__ import annotations


def one_line(error: BaseException | None) -> str:
    """`Type: first line of the message` -- tracebacks and multi-line engine output stay in
    the logs they came from."""
    if error is None:
        return "unknown error"
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


class DeployFailed(RuntimeError):
    """A release did not become ready; the message is one line with the supervisor's reason
    and the log file. Nothing of the release is left running."""
