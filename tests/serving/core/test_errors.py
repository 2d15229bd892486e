"""One-line errors: an exception by its type and first line; a reason another process
reported (a supervisor's event) by its first and last lines."""

from __future__ import annotations

from serving.core.errors import ONE_LINE_CHARS, one_line
from serving.engines.deepgemm import CompileFailed


def test_an_exception_is_its_type_and_first_line() -> None:
    assert one_line(CompileFailed("exit 1 without success\nlog tail")) == (
        "CompileFailed: exit 1 without success"
    )


def test_a_reported_reason_keeps_the_engines_last_word_within_bounds() -> None:
    reported = "r1: engine exited with code 1; last engine output:\n  loading\n  CUDA OOM\n"
    assert one_line(reported) == "r1: engine exited with code 1; last engine output: … CUDA OOM"
    assert one_line("x" * (2 * ONE_LINE_CHARS)) == "x" * ONE_LINE_CHARS + "…"
    assert one_line(" \n") == "no reason given"
