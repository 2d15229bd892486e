"""Warmup probes (serving/supervisor/probes.py): each probe's answer checked for shape and
content, against the FAKE engine's canned answers; and what that engine, supervised, refuses."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from serving.config.profile import Profile
from serving.core.procs import free_port
from serving.supervisor.supervisor import ProbeFailed, Supervisor
from tests.server_fixtures import (
    SupervisorFactory,
    fake_command,
    probe,
)

API_KEY = "sk-test-7f3a9c1e5b2d4f6a8c0e"


def read_records(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


# --------------------------------------------------------------------------------------------
# Probe answers, against the fake's canned answers
# --------------------------------------------------------------------------------------------

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
CALLS_WEATHER = {"expect": "tool_call", "tools": [WEATHER_TOOL]}


@pytest.fixture(scope="module")
def fake_records(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fake") / "requests.jsonl"


@pytest.fixture(scope="module")
def fake_engine(
    demo_profile: Profile, module_supervisors: SupervisorFactory, fake_records: Path
) -> Supervisor:
    port = free_port()
    command = fake_command("--port", str(port), "--record", str(fake_records))
    supervisor = module_supervisors(demo_profile, command, port=port, api_key=API_KEY)
    supervisor.start()
    supervisor.wait_ready(budget_seconds=30)
    return supervisor


@pytest.mark.parametrize(
    ("canned", "fields"),
    [
        ("tool_ok", {"expect": "tool_call", "tools": [WEATHER_TOOL], "tool_name": "get_weather"}),
        ("tool_ok", {"expect": "tool_call", "tools": [WEATHER_TOOL]}),
        ("reasoning_only", {"expect": "reasoning"}),
        ("reasoning_only", {"expect": "content_or_reasoning"}),
        ("reasoning_and_content", {"expect": "content", "contains": "paris"}),
        ("reasoning_and_content", {"expect": "reasoning", "contains": "PARIS"}),
        ("content", {"expect": "content_or_reasoning", "contains": "fake"}),
    ],
)
def test_valid_answers_pass(fake_engine: Supervisor, canned: str, fields: dict[str, Any]) -> None:
    fake_engine.run_probe(probe("p", f"canned:{canned}", **fields))


@pytest.mark.parametrize(
    ("canned", "fields", "problem"),
    [
        ("tool_bad_json", {**CALLS_WEATHER, "tool_name": "get_weather"},
         "tool call 'get_weather': arguments are not JSON"),
        ("tool_not_object", {"expect": "tool_call", "tools": [WEATHER_TOOL]},
         "tool call 'get_weather': arguments are not a JSON object"),
        ("tool_wrong_name", {**CALLS_WEATHER, "tool_name": "get_weather"},
         "called ['get_time'], not 'get_weather'"),
        ("content", {"expect": "tool_call", "tools": [WEATHER_TOOL]},
         "no tool call (content: 'Hello from the fake.')"),
        ("reasoning_only", {"expect": "content"}, "empty content (the model only reasoned)"),
        ("content", {"expect": "reasoning"}, "no reasoning_content"),
        ("empty", {"expect": "content_or_reasoning"}, "neither content nor reasoning_content"),
        ("empty", {"expect": "content"}, "empty content"),
        ("content", {"expect": "content", "contains": "Paris"}, "answer does not contain 'Paris'"),
        ("error", {"expect": "content"}, "HTTP 500: {\"detail\": \"fake internal error\"}"),
    ],
)  # fmt: skip
def test_answers_violating_the_expectation_fail(
    fake_engine: Supervisor, canned: str, fields: dict[str, Any], problem: str
) -> None:
    with pytest.raises(ProbeFailed) as failure:
        fake_engine.run_probe(probe("checked", f"canned:{canned}", **fields))
    assert str(failure.value).startswith(f"probe 'checked': {problem}")


def test_probe_requests_carry_the_key_and_the_probe_settings(
    fake_engine: Supervisor, fake_records: Path
) -> None:
    long = probe(
        "long-context", "canned:content The quick brown fox. ", expect="content",
        pad_to_chars=5000, max_tokens=7, chat_template_kwargs={"enable_thinking": False},
        tools=[WEATHER_TOOL],
    )  # fmt: skip
    fake_engine.run_probe(long)
    record = read_records(fake_records)[-1]
    assert record["path"] == "/v1/chat/completions"
    assert record["authorization"] == f"Bearer {API_KEY}"
    body = record["body"]
    assert body["temperature"] == 0 and body["max_tokens"] == 7 and body["stream"] is False
    assert body["chat_template_kwargs"] == {"enable_thinking": False}
    assert body["tools"] == [WEATHER_TOOL]
    assert body["model"] == fake_engine.profile.served_model_name
    content = body["messages"][-1]["content"]
    assert 5000 <= len(content) < 5000 + len("canned:content The quick brown fox. ")
    assert content.count("The quick brown fox.") == content.count("canned:content")


def test_snapshot_needs_a_snapshot_profile(fake_engine: Supervisor) -> None:
    with pytest.raises(ValueError, match="does not use memory snapshots"):
        fake_engine.prepare_snapshot()
