"""Contract: SGLang 0.5.23's own argument parser accepts every command line we generate.

Abbreviations are disabled, so a renamed (`--nsa-decode-backend`), ambiguous
(`--cuda-graph-max-bs`) or abbreviated (`--tp`) flag fails here rather than on an 8-GPU box.
This needs the `contract` extra (sglang --no-deps + torch CPU); it fails, never skips, without.
"""

from __future__ import annotations

import argparse
import json
from pathlib import PurePosixPath

import pytest

from dev.sglang_flags import compile_parser, option_table
from serving.config.flags import FLAG_TABLES
from serving.config.loader import load_profile
from serving.engines.sglang import (
    COMPILE_ENTRYPOINT,
    SERVE_ENTRYPOINT,
    compile_command,
    serve_command,
    sglang_parser,
)
from tests.command_fixtures import DEEPGEMM, SGLANG_MODELS, WEIGHTS


@pytest.fixture(scope="module")
def parser() -> argparse.ArgumentParser:
    version, parser = sglang_parser()
    assert version == "0.5.23"
    return parser


@pytest.fixture(scope="module", name="compile_parser")
def compile_parser_fixture() -> argparse.ArgumentParser:
    return compile_parser()


def parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    namespace, unknown = parser.parse_known_args(argv)
    if unknown:
        raise argparse.ArgumentError(None, f"unrecognized arguments: {unknown}")
    return namespace


def test_all_four_gpu_profiles_are_checked() -> None:
    assert sorted(SGLANG_MODELS) == ["deepseek-v4-pro", "glm-4.7", "glm-5.1", "qwen3-8b"]


@pytest.mark.parametrize("name", SGLANG_MODELS)
def test_serve_argv_parses(parser: argparse.ArgumentParser, name: str) -> None:
    profile = load_profile(name)
    argv = serve_command(
        profile,
        weights_path=WEIGHTS,
        deepgemm_path=DEEPGEMM,
        port=8000,
        secrets_config=PurePosixPath("/tmp/secrets.yaml"),
    ).argv
    assert argv[: len(SERVE_ENTRYPOINT)] == SERVE_ENTRYPOINT
    args = parse(parser, argv[len(SERVE_ENTRYPOINT) :])
    assert args.tp_size == profile.resources.tp
    assert args.served_model_name == profile.served_model_name
    for flag, value in profile.engine.flags.items():
        parsed = getattr(args, flag.replace("-", "_"))
        assert parsed == value or str(parsed) == str(value), flag


def test_dummy_weights_reach_sglang_as_load_format_dummy(parser: argparse.ArgumentParser) -> None:
    profile = load_profile("qwen3-8b")
    for served, load_format in ((profile, "auto"), (profile.with_dummy_weights(), "dummy")):
        argv = serve_command(served, weights_path=WEIGHTS, deepgemm_path=None, port=8000).argv
        assert parse(parser, argv[len(SERVE_ENTRYPOINT) :]).load_format == load_format


def test_glm51_dsa_backends_reach_sglang(parser: argparse.ArgumentParser) -> None:
    argv = serve_command(
        load_profile("glm-5.1"), weights_path=WEIGHTS, deepgemm_path=DEEPGEMM, port=8000
    ).argv
    args = parse(parser, argv[len(SERVE_ENTRYPOINT) :])
    assert (args.attention_backend, args.dsa_decode_backend, args.dsa_prefill_backend) == (
        "dsa",
        "trtllm",
        "trtllm",
    )
    assert args.kv_cache_dtype == "bf16"


@pytest.mark.parametrize("name", [n for n in SGLANG_MODELS if load_profile(n).deepgemm])
def test_compile_argv_parses(compile_parser: argparse.ArgumentParser, name: str) -> None:
    argv = compile_command(
        load_profile(name),
        weights_path=WEIGHTS,
        deepgemm_path=DEEPGEMM,
        port=9000,
        timeout_seconds=1200,
    ).argv
    assert argv[: len(COMPILE_ENTRYPOINT)] == COMPILE_ENTRYPOINT
    args = parse(compile_parser, argv[len(COMPILE_ENTRYPOINT) :])
    assert args.timeout == 1200


@pytest.mark.parametrize(
    "bad",
    [
        ["--nsa-decode-backend", "trtllm"],  # renamed to --dsa-decode-backend
        ["--cuda-graph-max-bs", "32"],  # ambiguous since the decode/prefill split
        ["--tp", "8"],  # only an abbreviation of --tp-size
        ["--collect-tokens-histogram"],  # gone
    ],
)
def test_parser_rejects_what_old_recipes_use(
    parser: argparse.ArgumentParser, bad: list[str]
) -> None:
    with pytest.raises(argparse.ArgumentError):
        parse(parser, ["--model-path", "/m", *bad])


def test_flag_table_matches_the_installed_parser(parser: argparse.ArgumentParser) -> None:
    table = json.loads((FLAG_TABLES / "0.5.23.json").read_text())
    assert table == option_table(parser), "regenerate with: python -m dev.sglang_flags"
