"""Warmup probes: the request each probe sends, and the check of the answer's shape and content."""

from __future__ import annotations

import json
import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from serving.config.profile import Probe


class _Lenient(BaseModel):
    # Engines add fields of their own (usage, logprobs, ids); only these matter.
    model_config = ConfigDict(extra="ignore")


class FunctionCall(_Lenient):
    name: str
    arguments: Any = None  # a JSON string per OpenAI; some engines send the object itself


class ToolCall(_Lenient):
    function: FunctionCall


class AssistantMessage(_Lenient):
    content: str | None = None
    reasoning_content: str | None = None  # SGLang's reasoning parsers
    reasoning: str | None = None  # the newer OpenAI-compatible spelling
    tool_calls: list[ToolCall] | None = None


class Choice(_Lenient):
    message: AssistantMessage


class ChatCompletion(_Lenient):
    choices: list[Choice] = Field(min_length=1)


def probe_payload(probe: Probe, model: str) -> dict[str, Any]:
    """The chat request for a probe: deterministic (temperature 0), non-streaming."""
    messages = [message.model_dump() for message in probe.messages]
    if probe.pad_to_chars:
        messages[-1]["content"] = pad_text(messages[-1]["content"], probe.pad_to_chars)
    payload: dict[str, Any] = {
        "model": model,
        "messages": messages,
        "max_tokens": probe.max_tokens,
        "temperature": 0,
        "stream": False,
    }
    if probe.chat_template_kwargs is not None:
        payload["chat_template_kwargs"] = probe.chat_template_kwargs
    if probe.tools is not None:
        payload["tools"] = probe.tools
    return payload


def pad_text(text: str, chars: int) -> str:
    """The text repeated whole until it is at least `chars` long: a long, natural prompt."""
    return text * max(1, math.ceil(chars / len(text)))


def check_answer(probe: Probe, message: AssistantMessage) -> str | None:
    """What is wrong with the answer to `probe`, or None when it meets the expectation."""
    content = (message.content or "").strip()
    reasoning = (message.reasoning_content or message.reasoning or "").strip()
    if probe.expect == "tool_call":
        return _tool_call_problem(probe, message.tool_calls or [], content)
    if probe.expect == "content" and not content:
        return "empty content" + (" (the model only reasoned)" if reasoning else "")
    if probe.expect == "reasoning" and not reasoning:
        return f"no reasoning_content (content: {_snippet(content)!r})"
    if probe.expect == "content_or_reasoning" and not (content or reasoning):
        return "neither content nor reasoning_content"
    answer = {"content": content, "reasoning": reasoning}.get(
        probe.expect, f"{content}\n{reasoning}"
    )
    if probe.contains and probe.contains.lower() not in answer.lower():
        return f"answer does not contain {probe.contains!r}: {_snippet(answer)!r}"
    return None


def _tool_call_problem(probe: Probe, calls: list[ToolCall], content: str) -> str | None:
    if not calls:
        return f"no tool call (content: {_snippet(content)!r})"
    for call in calls:
        problem = _arguments_problem(call.function.arguments)
        if problem:
            return f"tool call {call.function.name!r}: {problem}"
    names = [call.function.name for call in calls]
    if probe.tool_name and probe.tool_name not in names:
        return f"called {names}, not {probe.tool_name!r}"
    return None


def _arguments_problem(arguments: Any) -> str | None:
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return f"arguments are not JSON: {_snippet(arguments)!r}"
    if not isinstance(arguments, dict):
        return f"arguments are not a JSON object: {_snippet(json.dumps(arguments))!r}"
    return None


def _snippet(text: str) -> str:
    return text if len(text) <= ANSWER_SNIPPET_CHARS else text[:ANSWER_SNIPPET_CHARS] + "…"


ANSWER_SNIPPET_CHARS = 200
