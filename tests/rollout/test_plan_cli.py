"""`rollout plan`: the whole plan offline, and one line + exit 2 on bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from rollout.plan import build_plan, render_text
from serving.config.loader import available_models, load_profile
from serving.config.profile import CanaryStep, Shadow

ROLLOUT = [sys.executable, "-m", "rollout.cli"]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*ROLLOUT, *args], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("name", available_models())
def test_plan_json_for_every_profile(name: str) -> None:
    result = run("plan", name, "--json")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["model"] == name
    assert plan["serve"]["argv"]
    assert plan["probes"] and plan["canary_steps"][-1]["weight"] == 100


def test_glm51_plan_has_the_dsa_flags_and_the_compile_line() -> None:
    plan = json.loads(run("plan", "glm-5.1", "--json").stdout)
    argv = plan["serve"]["argv"]
    assert argv[argv.index("--attention-backend") + 1] == "dsa"
    assert argv[argv.index("--dsa-decode-backend") + 1] == "trtllm"
    assert plan["compile"]["argv"][:3] == ["python3", "-m", "sglang.compile_deep_gemm"]
    assert plan["gpu"] == "B200:8"
    assert plan["revision"]["policy"] == "follow"


def test_pinned_revision_shows_in_paths_and_app_names() -> None:
    sha = "f" * 40
    plan = json.loads(run("plan", "glm-4.7", "--revision", sha, "--json").stdout)
    assert plan["revision"]["policy"] == "pinned"
    assert f"glm-4.7-{sha[:8]}" in plan["apps"]
    assert any(arg.endswith(f"/{sha}") for arg in plan["serve"]["argv"])


def test_plan_shows_how_long_a_thin_bake_may_go_on() -> None:
    demo = build_plan(load_profile("smollm2-135m"))
    assert demo.max_bake_seconds == 120
    assert "8 canary requests a step: its bake extends up to 120s for them" in render_text(demo)
    assert "extends up to twice its length" in render_text(build_plan(load_profile("glm-5.1")))


@pytest.mark.parametrize(("send", "shown"), [
    ("after", "sent once stable had answered"), ("parallel", "sent alongside stable's request"),
])
def test_plan_shows_a_shadow_step(send: str, shown: str) -> None:
    profile = load_profile("smollm2-135m")
    shadow = Shadow.model_validate({"percent": 10, "seconds": 60, "send": send})
    steps = [CanaryStep(shadow=shadow), *profile.canary.steps]
    shadowed = profile.model_copy(
        update={"canary": profile.canary.model_copy(update={"steps": steps})}
    )
    text = render_text(build_plan(shadowed))
    assert (f"canary    shadow 10% of stable's requests for 60s ({shown}, ≤ 8 in flight)"
            " → 25% for 30s") in text
    assert "shadow ≥ 95% agreement" in text


def test_text_plan_is_readable() -> None:
    result = run("plan", "qwen3-8b")
    assert result.returncode == 0
    assert "H100!:1" in result.stdout and "canary" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["plan", "glm-9"], "unknown model 'glm-9'"),
        (["plan", "glm-5.1", "--revision", "abc1234"], "looks like a commit"),
        (["plan", "glm-5.1", "--revision", "x..y"], "neither a 40-hex commit nor a branch"),
        (["plan"], "the following arguments are required: model"),
        (["plan", "glm-5.1", "--colour"], "unrecognized arguments: --colour"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args: list[str], message: str) -> None:
    result = run(*args)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0]


def test_text_plan_shows_an_absolute_ttft_slo_when_the_profile_sets_one() -> None:
    profile = load_profile("qwen3-8b")
    gates = profile.canary.gates.model_copy(update={"max_ttft_p99_seconds": 2.5})
    slo = profile.model_copy(update={"canary": profile.canary.model_copy(update={"gates": gates})})
    assert "p99 ≤ 2.0x," in render_text(build_plan(profile))
    assert "p99 ≤ 2.0x and ≤ 2.5s," in render_text(build_plan(slo))


def test_a_dummy_weights_plan_serves_with_load_format_dummy() -> None:
    plan = json.loads(run("plan", "qwen3-8b", "--dummy-weights", "--json").stdout)
    assert plan["dummy_weights"] is True
    argv = plan["serve"]["argv"]
    assert argv[argv.index("--load-format") + 1] == "dummy"
    # Served from the config alone, in its own directory; nothing compiled ahead, no canary.
    assert argv[argv.index("--model-path") + 1].startswith("/weights/.dummy/")
    assert plan["compile"] is None
    assert plan["apps"] == ["qwen3-8b-weights", "qwen3-8b-220b46e3-dummy"]
    real = build_plan(load_profile("qwen3-8b"))
    assert not real.dummy_weights and "--load-format" not in real.serve.argv
    assert real.compile is not None and "qwen3-8b-compile" in real.apps
    assert "canary" not in render_text(build_plan(load_profile("qwen3-8b").with_dummy_weights()))
    assert "DUMMY" in render_text(build_plan(load_profile("qwen3-8b").with_dummy_weights()))
