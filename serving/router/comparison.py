"""A canary's answer compared with stable's for the same chat request (shadow traffic), and a
window of comparisons summarised. Pure functions over pydantic data; no I/O.

By kind of request:

    deterministic (temperature 0, or a seed)  the texts match exactly; else the position of the
                                              first differing token (a word or a punctuation
                                              mark: the router has no tokenizer)
    tool calls (either answer calls a tool)   the same tool names, arguments that parse as JSON
                                              objects with the same keys
    response_format json                      both answers parse as JSON
    any                                       the same finish reason; the answer-length ratio
                                              (shorter / longer: 1 is the same length)

A comparison *agrees* when every check that applies holds. The gate judges the deterministic
ones (serving.domain.analysis); the others are shown, since sampled answers differ anyway.

A window's comparisons are summed up in a ShadowTally: counters that add and the worst few
disagreements, so that the tallies of N router replicas merge into exactly the summary one
router would make of the same comparisons (serving.router.slices, replicas).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from typing import Any

from pydantic import BaseModel, Field

from serving.router.windows import Percentiles, percentiles

TOKEN = re.compile(r"\w+|[^\w\s]")
# How much of a prompt and of each answer a disagreement shows.
HEAD_CHARS = 80
WORST_SHOWN = 3
JSON_FORMATS = frozenset({"json_object", "json_schema"})
SSE_DATA = b"data:"
SSE_DONE = b"[DONE]"

Mask = Callable[[str], str]


class Answer(BaseModel):
    """What a chat completion said, from a JSON body or from its server-sent events."""

    text: str = ""
    tool_calls: list[tuple[str, str]] = Field(default_factory=list, description="(name, args)")
    finish_reason: str | None = None

    @classmethod
    def parse(cls, body: bytes, streamed: bool) -> Answer:
        """Raises ValueError when the body is not a chat completion."""
        return _from_events(body) if streamed else _from_completion(json.loads(body))

    def shown(self) -> str:
        """The answer as a person reads it: its text, else its tool calls."""
        if self.text or not self.tool_calls:
            return self.text
        return " ".join(f"{name}({arguments})" for name, arguments in self.tool_calls)


class Comparison(BaseModel):
    """One request answered by both releases."""

    at: float = Field(description="unix time the client's request started")
    deterministic: bool
    agree: bool
    exact: bool | None = Field(description="deterministic requests: the texts are the same")
    first_difference: int | None = Field(description="token index where the texts part")
    tools_match: bool | None = Field(description="when either answer calls a tool")
    json_valid: bool | None = Field(description="response_format json: both answers parse")
    finish_reasons: tuple[str | None, str | None] = Field(description="(stable, canary)")
    length_ratio: float = Field(ge=0, le=1)
    similarity: float = Field(ge=0, le=1, description="1 is identical; orders disagreements")
    prompt: str = Field(description=f"the last user message's first {HEAD_CHARS} chars, masked")
    stable: str
    canary: str


class ShadowStats(BaseModel):
    """One canary's shadow copies over a window (GET /admin/stats, `shadow`)."""

    copies: int = Field(0, description="sent to the canary: compared + errors")
    compared: int = 0
    errors: int = Field(0, description="failed copies; never in the client-facing error rate")
    error_rate: float = 0.0
    skipped: int = Field(0, description="not sent: the cap on copies in flight was reached")
    in_flight: int = 0
    latency_s: Percentiles = Field(
        default_factory=lambda: percentiles([]),
        description="compared copies: from the send to the canary's whole answer, seconds",
    )
    deterministic: int = 0
    agreement: float | None = Field(None, description="share of deterministic copies agreeing")
    tool_calls: int = 0
    tool_agreement: float | None = None
    json_requests: int = 0
    json_agreement: float | None = None
    finish_reason_agreement: float | None = None
    length_ratio_mean: float | None = None
    worst: list[Comparison] = Field(default_factory=list, description="least similar first")


def compare(request: dict[str, Any], stable: Answer, canary: Answer, *, at: float,
            mask: Mask) -> Comparison:  # fmt: skip
    deterministic = request.get("temperature") == 0 or request.get("seed") is not None
    exact = first_difference = None
    similarity = ratio = _length_ratio(stable.shown(), canary.shown())
    if deterministic:
        exact = (stable.text, stable.tool_calls) == (canary.text, canary.tool_calls)
        if not exact:
            first_difference, similarity = _first_difference(stable.shown(), canary.shown())
    tools_match = None
    if stable.tool_calls or canary.tool_calls:
        tools_match = _same_tools(stable.tool_calls, canary.tool_calls)
    json_valid = None
    if _response_format(request) in JSON_FORMATS:
        json_valid = _parses(stable.text) and _parses(canary.text)
    if tools_match is False or json_valid is False:
        similarity = 0.0
    checks = (exact, tools_match, json_valid, stable.finish_reason == canary.finish_reason)
    return Comparison(
        at=at, deterministic=deterministic, agree=all(check is not False for check in checks),
        exact=exact, first_difference=first_difference, tools_match=tools_match,
        json_valid=json_valid, finish_reasons=(stable.finish_reason, canary.finish_reason),
        length_ratio=ratio, similarity=similarity, prompt=_head(_prompt(request), mask),
        stable=_head(stable.shown(), mask), canary=_head(canary.shown(), mask),
    )  # fmt: skip


class ShadowTally:
    """The comparisons, failed copies and skipped copies of one canary: of a window of one
    router, or of one time slice that replicas publish and the orchestrator adds up."""

    FIELDS = ("compared", "errors", "skipped", "deterministic", "deterministic_agreeing",
              "tool_calls", "tools_agreeing", "json_requests", "json_agreeing",
              "finish_agreeing")  # fmt: skip
    __slots__ = (*FIELDS, "length_ratio_sum", "worst")

    def __init__(self, values: tuple[int, ...] | None = None, length_ratio_sum: float = 0.0,
                 worst: Iterable[Comparison] = ()) -> None:  # fmt: skip
        for name, value in zip(self.FIELDS, values or (0,) * len(self.FIELDS), strict=True):
            setattr(self, name, value)
        self.length_ratio_sum = length_ratio_sum
        self.worst: list[Comparison] = []
        self._keep_worst(worst)

    def note(self, comparison: Comparison | None, skipped: bool) -> None:
        """A copy compared, or failed, or skipped at the cap on copies in flight."""
        if comparison is not None:
            self._count(comparison)
        elif skipped:
            self.skipped += 1
        else:
            self.errors += 1

    def _count(self, comparison: Comparison) -> None:
        self.compared += 1
        if comparison.deterministic:
            self.deterministic += 1
            self.deterministic_agreeing += comparison.agree
        if comparison.tools_match is not None:
            self.tool_calls += 1
            self.tools_agreeing += comparison.tools_match
        if comparison.json_valid is not None:
            self.json_requests += 1
            self.json_agreeing += comparison.json_valid
        self.finish_agreeing += comparison.finish_reasons[0] == comparison.finish_reasons[1]
        self.length_ratio_sum += comparison.length_ratio
        if not comparison.agree:
            self._keep_worst([comparison])

    def add(self, other: ShadowTally) -> None:
        for name in self.FIELDS:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.length_ratio_sum += other.length_ratio_sum
        self._keep_worst(other.worst)

    def values(self) -> tuple[int, ...]:
        return tuple(getattr(self, name) for name in self.FIELDS)

    def stats(self, in_flight: int, latency: Percentiles) -> ShadowStats:
        copies = self.compared + self.errors
        compared = self.compared
        return ShadowStats(
            copies=copies, compared=compared, errors=self.errors,
            error_rate=self.errors / copies if copies else 0.0, skipped=self.skipped,
            in_flight=in_flight, latency_s=latency,
            deterministic=self.deterministic,
            agreement=_share(self.deterministic_agreeing, self.deterministic),
            tool_calls=self.tool_calls, tool_agreement=_share(self.tools_agreeing, self.tool_calls),
            json_requests=self.json_requests,
            json_agreement=_share(self.json_agreeing, self.json_requests),
            finish_reason_agreement=_share(self.finish_agreeing, compared),
            length_ratio_mean=self.length_ratio_sum / compared if compared else None,
            worst=self.worst,
        )  # fmt: skip

    def _keep_worst(self, more: Iterable[Comparison]) -> None:
        # Least similar first, then earliest: a total order, so the worst of a union of
        # slices are the worst of the whole, whichever replica compared them.
        self.worst = sorted([*self.worst, *more], key=lambda c: (c.similarity, c.at))
        del self.worst[WORST_SHOWN:]


# -- answers -------------------------------------------------------------------------------


def _from_completion(payload: Any) -> Answer:
    try:
        choice = payload["choices"][0]
        message = choice["message"]
        calls = message.get("tool_calls") or []
        return Answer(
            text=message.get("content") or "",
            tool_calls=[(c["function"]["name"], c["function"].get("arguments") or "")
                        for c in calls],
            finish_reason=choice.get("finish_reason"),
        )  # fmt: skip
    except (KeyError, IndexError, TypeError, AttributeError):
        raise ValueError("not a chat completion") from None


def _from_events(body: bytes) -> Answer:
    """A streamed answer put back together: content deltas in order, tool-call deltas by index
    (the name once, the arguments in pieces), the last finish reason."""
    text: list[str] = []
    calls: dict[int, list[str]] = {}
    finish: str | None = None
    for line in body.splitlines():
        data = line.removeprefix(SSE_DATA).strip() if line.startswith(SSE_DATA) else b""
        if not data or data == SSE_DONE:
            continue
        try:
            choice = json.loads(data)["choices"][0]
        except (ValueError, KeyError, IndexError, TypeError):
            raise ValueError("not a chat completion stream") from None
        delta = choice.get("delta") or {}
        text.append(delta.get("content") or "")
        for call in delta.get("tool_calls") or []:
            name, arguments = calls.setdefault(call.get("index", 0), ["", ""])
            function = call.get("function") or {}
            calls[call.get("index", 0)] = [function.get("name") or name,
                                           arguments + (function.get("arguments") or "")]
        finish = choice.get("finish_reason") or finish
    return Answer(text="".join(text), tool_calls=[(n, a) for n, a in calls.values()],
                  finish_reason=finish)  # fmt: skip


# -- checks --------------------------------------------------------------------------------


def _first_difference(stable: str, canary: str) -> tuple[int, float]:
    """The index of the first differing token, and the share of the longer answer before it."""
    ours, theirs = TOKEN.findall(stable), TOKEN.findall(canary)
    index = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b),
                 min(len(ours), len(theirs)))  # fmt: skip
    return index, index / max(len(ours), len(theirs), 1)


def _same_tools(stable: list[tuple[str, str]], canary: list[tuple[str, str]]) -> bool:
    if [name for name, _ in stable] != [name for name, _ in canary]:
        return False
    for (_, ours), (_, theirs) in zip(stable, canary, strict=True):
        mine, yours = _object(ours), _object(theirs)
        if mine is None or yours is None or mine.keys() != yours.keys():
            return False
    return True


def _object(arguments: str) -> dict[str, Any] | None:
    try:
        parsed = json.loads(arguments)
    except ValueError:
        return None
    return parsed if isinstance(parsed, dict) else None


def _parses(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def _response_format(request: dict[str, Any]) -> str | None:
    wanted = request.get("response_format")
    return wanted.get("type") if isinstance(wanted, dict) else None


def _length_ratio(stable: str, canary: str) -> float:
    longer = max(len(stable), len(canary))
    return min(len(stable), len(canary)) / longer if longer else 1.0


def _prompt(request: dict[str, Any]) -> str:
    """The last user message's text (a list of parts: its text parts)."""
    for message in reversed(request.get("messages") or []):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, list):
                return " ".join(str(part.get("text", "")) for part in content
                                if isinstance(part, dict))  # fmt: skip
            return str(content or "")
    return ""


def _head(text: str, mask: Mask) -> str:
    # Masked whole, then cut: a secret across the cut would otherwise show its first half.
    return mask(text)[:HEAD_CHARS]


def _share(part: int, whole: int) -> float | None:
    return part / whole if whole else None
