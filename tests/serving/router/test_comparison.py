"""Comparing two chat answers by kind of request, and summarising a window: pure functions."""

from __future__ import annotations

import json
from typing import Any

from serving.router.comparison import Answer, Comparison, ShadowStats, ShadowTally, compare
from serving.router.windows import percentiles

QUESTION = {"messages": [{"role": "system", "content": "be brief"},
                         {"role": "user", "content": "What is 2+2?"}]}  # fmt: skip


def answer(text: str = "", *calls: tuple[str, str], finish: str = "stop") -> Answer:
    return Answer(text=text, tool_calls=list(calls), finish_reason=finish)


def check(stable: Answer, canary: Answer, **request: Any) -> Comparison:
    return compare({**QUESTION, **request}, stable, canary, at=0.0, mask=str.upper)


def summarise(comparisons: list[Comparison], errors: int, skipped: int) -> ShadowStats:
    tally = ShadowTally()
    for comparison in comparisons:
        tally.note(comparison, skipped=False)
    for failed in [True] * errors + [False] * skipped:
        tally.note(None, skipped=not failed)
    return tally.stats(in_flight=0, latency=percentiles([]))


def test_deterministic_answers_match_exactly_or_show_where_they_part() -> None:
    same = check(answer("It is 4."), answer("It is 4."), temperature=0)
    assert (same.agree, same.exact, same.first_difference, same.similarity) == (True, True, None, 1)
    parted = check(answer("It is 4, I think."), answer("It is 5, I think."), seed=7)
    assert (parted.agree, parted.exact, parted.first_difference) == (False, False, 2)
    assert parted.similarity == 2 / 7  # It · is · 4 · , · I · think · .


def test_sampled_answers_are_not_held_to_the_same_text() -> None:
    sampled = check(answer("Four."), answer("It is four."), temperature=0.7)
    assert (sampled.deterministic, sampled.exact, sampled.agree) == (False, None, True)
    assert sampled.length_ratio == len("Four.") / len("It is four.")


def test_tool_calls_need_the_same_names_and_argument_keys() -> None:
    paris = ("get_weather", '{"city": "Paris"}')
    assert check(answer("", paris), answer("", ("get_weather", '{"city": "Lyon"}'))).tools_match
    renamed = check(answer("", paris), answer("", ("get_weather", '{"town": "Paris"}')))
    assert (renamed.tools_match, renamed.agree, renamed.similarity) == (False, False, 0)
    assert not check(answer("", paris), answer("", ("get_weather", "{city"))).tools_match
    assert not check(answer("", paris), answer("It is sunny.")).tools_match
    assert check(answer("a"), answer("b")).tools_match is None


def test_json_answers_must_both_parse() -> None:
    wanted = {"response_format": {"type": "json_object"}}
    assert check(answer('{"a": 1}'), answer('{"b": 2}'), **wanted).json_valid is True
    assert check(answer('{"a": 1}'), answer('{"a": 1'), **wanted).json_valid is False
    assert check(answer("{"), answer("{")).json_valid is None


def test_another_finish_reason_disagrees() -> None:
    cut = check(answer("It is"), answer("It is 4.", finish="length"), temperature=0.5)
    assert cut.finish_reasons == ("stop", "length") and not cut.agree


def test_heads_are_masked_then_cut() -> None:
    long = "x" * 200
    shown = check(answer(long), answer("y"), temperature=0)
    assert shown.prompt == "WHAT IS 2+2?" and shown.stable == "X" * 80


def test_a_stream_is_put_back_together() -> None:
    events = [
        {"choices": [{"delta": {"role": "assistant", "content": "It "}}]},
        {"choices": [{"delta": {"content": "is"}}]},
        {"choices": [{"delta": {"tool_calls": [{"index": 0, "function": {
            "name": "f", "arguments": '{"a"'}}]}}]},
        {"choices": [{"delta": {"tool_calls": [{"index": 0, "function": {
            "arguments": ": 1}"}}]}, "finish_reason": "tool_calls"}]},
    ]
    body = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
    assert Answer.parse(body.encode(), streamed=True) == Answer(
        text="It is", tool_calls=[("f", '{"a": 1}')], finish_reason="tool_calls")


def test_a_window_counts_agreement_over_deterministic_requests_and_keeps_the_worst() -> None:
    comparisons = [
        check(answer("a b c d"), answer("a b c d"), temperature=0),
        check(answer("a b c d"), answer("a b c x"), temperature=0),
        check(answer("a b c d"), answer("x b c d"), temperature=0),
        check(answer("a b c d"), answer("a x c d"), temperature=0),
        check(answer("a"), answer("b"), temperature=1),
    ]
    stats = summarise(comparisons, errors=1, skipped=2)
    assert (stats.copies, stats.compared, stats.errors, stats.skipped) == (6, 5, 1, 2)
    assert (stats.deterministic, stats.agreement) == (4, 0.25)
    assert [c.first_difference for c in stats.worst] == [0, 1, 3]
