"""The serve and compile command lines, their environments, and the DeepGEMM cache key."""

from __future__ import annotations

from pathlib import PurePosixPath

import pytest

from serving.config.loader import load_profile
from serving.engines.sglang import (
    KERNEL_SHAPING_FLAGS,
    compile_command,
    deepgemm_cache_key,
    serve_command,
)
from tests.command_fixtures import DEEPGEMM, SGLANG_MODELS, WEIGHTS

CONFIG = b'{"hidden_size": 6144, "num_hidden_layers": 78}'


def _options(argv: list[str]) -> dict[str, str | None]:
    """--flag value pairs of an argv (switches map to None)."""
    options: dict[str, str | None] = {}
    for index, arg in enumerate(argv):
        if arg.startswith("--"):
            following = argv[index + 1] if index + 1 < len(argv) else None
            options[arg] = None if following is None or following.startswith("--") else following
    return options


@pytest.mark.parametrize("name", SGLANG_MODELS)
def test_compile_gets_every_serve_flag_identically(name: str) -> None:
    profile = load_profile(name)
    serve = _options(
        serve_command(profile, weights_path=WEIGHTS, deepgemm_path=DEEPGEMM, port=8000).argv
    )
    compile_ = _options(
        compile_command(
            profile, weights_path=WEIGHTS, deepgemm_path=DEEPGEMM, port=9000, timeout_seconds=60
        ).argv
    )
    # compile_deep_gemm ignores --config: every flag must be spelled out, identically.
    for flag, value in serve.items():
        if flag not in {"--host", "--port", "--served-model-name"}:
            assert compile_.get(flag, "missing") == value, flag
    assert compile_["--timeout"] == "60"
    assert "--config" not in compile_


def test_serve_environment_points_at_the_architecture_cache_and_stays_offline() -> None:
    profile = load_profile("deepseek-v4-pro")
    command = serve_command(profile, weights_path=WEIGHTS, deepgemm_path=DEEPGEMM, port=8000)
    assert command.env["HF_HUB_OFFLINE"] == "1"
    assert command.env["SGLANG_DG_CACHE_DIR"] == "/deepgemm/sm_100"
    assert command.env["SGLANG_ENABLE_SPEC_V2"] == "1"
    assert command.argv[:2] == ["sglang", "serve"]
    assert _options(command.argv)["--tp-size"] == "8"


def test_api_key_never_goes_on_the_argv() -> None:
    profile = load_profile("glm-5.1")
    secrets = PurePosixPath("/run/secrets/sglang.yaml")
    command = serve_command(
        profile, weights_path=WEIGHTS, deepgemm_path=DEEPGEMM, port=8000, secrets_config=secrets
    )
    assert "--api-key" not in command.argv
    assert _options(command.argv)["--config"] == str(secrets)


def test_cache_key_follows_what_shapes_kernels() -> None:
    profile = load_profile("glm-5.1")
    key = deepgemm_cache_key(profile, CONFIG)
    assert key == deepgemm_cache_key(profile, CONFIG)
    assert len(key) == 32

    def changed(**update: object) -> str:
        return deepgemm_cache_key(profile.model_copy(update=update), CONFIG)

    def with_flags(**flags: object) -> str:
        engine = profile.engine.model_copy(update={"flags": {**profile.engine.flags, **flags}})
        return changed(engine=engine)

    assert deepgemm_cache_key(profile, CONFIG + b" ") != key
    assert changed(resources=profile.resources.model_copy(update={"tp": 4})) != key
    assert changed(resources=profile.resources.model_copy(update={"gpu": "H200"})) != key
    assert changed(engine=profile.engine.model_copy(update={"version": "0.5.24"})) != key
    assert with_flags(**{"moe-runner-backend": "triton"}) != key
    assert with_flags(**{"max-running-requests": 64}) != key
    # Parsers and metrics don't change kernels: the cache stays valid.
    assert with_flags(**{"tool-call-parser": "glm45", "enable-metrics": True}) == key


def test_kernel_shaping_flags_exist_in_sglang() -> None:
    from serving.config.flags import flag_table

    table = flag_table("0.5.23")
    assert {f"--{flag}" for flag in KERNEL_SHAPING_FLAGS} <= set(table)
