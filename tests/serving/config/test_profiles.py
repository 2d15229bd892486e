"""Profiles: every shipped profile loads; every kind of inconsistency is one clear line."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from serving.config.loader import DEFAULT_MODELS_DIR, available_models, load_profile
from serving.config.profile import ProfileError, check_revision

SHIPPED = ["deepseek-v4-pro", "glm-4.7", "glm-5.1", "qwen3-8b", "smollm2-135m"]


def test_every_target_model_has_a_profile() -> None:
    assert available_models() == SHIPPED


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_profile_loads(name: str) -> None:
    profile = load_profile(name)
    assert profile.name == name
    assert profile.canary.steps[-1].weight == 100
    assert profile.probes


def test_glm51_is_the_blackwell_recipe_with_bf16_kv() -> None:
    profile = load_profile("glm-5.1")
    flags = profile.engine.flags
    assert profile.resources.modal_gpu == "B200:8"
    assert (profile.resources.tp, profile.resources.ep) == (8, 1)
    assert flags["attention-backend"] == "dsa"
    assert flags["dsa-decode-backend"] == flags["dsa-prefill-backend"] == "trtllm"
    assert flags["moe-runner-backend"] == "flashinfer_trtllm"
    assert flags["enable-flashinfer-allreduce-fusion"] is True
    assert (
        flags["speculative-num-steps"],
        flags["speculative-eagle-topk"],
        flags["speculative-num-draft-tokens"],
    ) == (3, 1, 4)
    assert (flags["reasoning-parser"], flags["tool-call-parser"]) == ("glm45", "glm47")
    # fp8 KV loses GLM-5.1 accuracy (sglang #22671): it must stay BF16.
    assert flags["kv-cache-dtype"] == "bf16"
    assert profile.secrets.api_key
    assert {p.expect for p in profile.probes} >= {"content", "tool_call", "content_or_reasoning"}


def test_qwen3_is_pinned_with_memory_snapshots() -> None:
    profile = load_profile("qwen3-8b")
    assert profile.hub.pinned
    assert profile.hub.revision == "220b46e3b2180893580a4454f21f22d3ebb187d3"
    assert profile.engine.memory_snapshot
    assert profile.resources.modal_gpu == "H100!:1"
    assert profile.engine.flags["enable-memory-saver"] is True


def test_shared_probes_are_expanded_by_name() -> None:
    probe = {p.name: p for p in load_profile("glm-4.7").probes}["tool-call"]
    assert probe.tools and probe.tool_name == "get_weather"


@pytest.fixture
def models(tmp_path: Path) -> Path:
    shutil.copytree(DEFAULT_MODELS_DIR, tmp_path / "models")
    return tmp_path / "models"


def _edit(models: Path, name: str, change: Any) -> Path:
    path = models / f"{name}.yaml"
    data = yaml.safe_load(path.read_text())
    change(data)
    path.write_text(yaml.safe_dump(data))
    return path


def _set(*keys: str, value: Any) -> Any:
    def change(data: dict[str, Any]) -> None:
        for key in keys[:-1]:
            data = data[key]
        data[keys[-1]] = value

    return change


def _drop(*keys: str) -> Any:
    def change(data: dict[str, Any]) -> None:
        for key in keys[:-1]:
            data = data[key]
        del data[keys[-1]]

    return change


BAD_PROFILES = [
    (_set("resources", "tp", value=3), "resources: tp 3 does not divide gpu_count 8"),
    (_set("resources", "gpu", value="B300"), "resources.gpu: unknown GPU type 'B300'"),
    (_set("probes", value=[]), "probes: List should have at least 1 item"),
    (_drop("probes"), "probes: Field required"),
    (
        _set("canary", "steps", value=[{"weight": 10, "bake_seconds": -1}]),
        "canary.steps.0.bake_seconds: Input should be greater than or equal to 0",
    ),
    (
        _set("canary", "steps", value=[{"weight": 10, "bake_seconds": 5}]),
        "canary.steps: the last canary step must reach weight 100, not 10",
    ),
    (
        _set("canary", "steps", value=[{"weight": 100, "bake_seconds": 0},
                                       {"shadow": {"percent": 10, "seconds": 60}}]),
        "canary.steps: the last canary step must reach weight 100, not a shadow step",
    ),
    (
        _set("canary", "steps", value=[{"shadow": {"percent": 10, "seconds": 60}, "weight": 0},
                                       {"weight": 100, "bake_seconds": 0}]),
        "canary.steps.0: a shadow step keeps the canary's weight: no weight or bake_seconds",
    ),
    (
        _set("canary", "steps", value=[{"shadow": {"percent": 0, "seconds": 60}},
                                       {"weight": 100, "bake_seconds": 0}]),
        "canary.steps.0.shadow.percent: Input should be greater than 0",
    ),
    (
        _set("engine", "flags", "nsa-decode-backend", value="trtllm"),
        "engine.flags.nsa-decode-backend: SGLang 0.5.23 has no flag --nsa-decode-backend",
    ),
    (
        _set("engine", "flags", "cuda-graph-max-bs", value=32),
        "engine.flags.cuda-graph-max-bs: SGLang 0.5.23 has no flag --cuda-graph-max-bs",
    ),
    (
        _set("engine", "flags", "attention-backend", value="nope"),
        "engine.flags.attention-backend: 'nope' is not one of",
    ),
    (
        _set("engine", "flags", "tp-size", value=8),
        "engine.flags: 'tp-size' is set by the rollout from resources.tp",
    ),
    (
        _set("canary", "max_bake_seconds", value=1),
        "canary: max_bake_seconds 1 is shorter than a step's bake",
    ),
    (
        _set("engine", "flags", "load-format", value="dummy"),
        "engine.flags: 'load-format' is set by the rollout from dummy_weights",
    ),
    (_set("hub", "revision", value="abc1234"), "hub.revision: revision 'abc1234' looks like"),
    (_set("hub", "colour", value="blue"), "hub.colour: Extra inputs are not permitted"),
    (_set("probes", value=["chat", "smell"]), "probes.1: no shared probes 'smell'"),
]


@pytest.mark.parametrize(("change", "message"), BAD_PROFILES)
def test_inconsistent_profile_is_one_clear_line(models: Path, change: Any, message: str) -> None:
    path = _edit(models, "glm-5.1", change)
    with pytest.raises(ProfileError) as raised:
        load_profile("glm-5.1", models)
    text = str(raised.value)
    assert "\n" not in text
    assert text.startswith(f"{path}: ")
    assert message in text


def test_a_dummy_weights_profile_probes_only_for_an_answer(models: Path) -> None:
    _edit(models, "glm-5.1", _set("dummy_weights", value=True))
    dummy = load_profile("glm-5.1", models)
    assert {(p.expect, p.contains, p.tool_name) for p in dummy.probes} == {("answer", None, None)}
    real = load_profile("glm-5.1")
    assert not real.dummy_weights and any(p.expect == "tool_call" for p in real.probes)
    assert real.with_dummy_weights() == dummy


def test_invalid_yaml_names_the_line(models: Path) -> None:
    (models / "glm-5.1.yaml").write_text("name: glm-5.1\nhub: [unclosed\n")
    with pytest.raises(ProfileError, match=r"glm-5\.1\.yaml: line \d+ invalid YAML"):
        load_profile("glm-5.1", models)


def test_unknown_model_lists_the_known_ones() -> None:
    with pytest.raises(ProfileError, match=r"unknown model 'glm-9'.*glm-5\.1"):
        load_profile("glm-9")


@pytest.mark.parametrize("good", ["main", "v1.0", "refs-pr-3", "release/2026-11", "a" * 40])
def test_good_revisions(good: str) -> None:
    assert check_revision(good) == good


@pytest.mark.parametrize(
    "bad", ["", "a..b", "-x", "x.lock", "has space", "abc1234", "@{u}", "A" * 40, "a" * 41]
)
def test_bad_revisions(bad: str) -> None:
    with pytest.raises(ValueError):
        check_revision(bad)
