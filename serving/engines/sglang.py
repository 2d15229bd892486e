"""The SGLang command lines: `sglang serve` and `sglang.compile_deep_gemm`, built from a profile.

Two facts shape this module (see REFERENCE.md):
- compile_deep_gemm IGNORES `--config`, so every flag is passed on the command line, and the
  compile run gets exactly the serve run's flags; kernels compiled for other shapes are useless.
- The DeepGEMM cache is only worth something if serving finds it: its key names everything that
  changes which kernels get compiled.

Profiles are checked against a table of SGLang's options
(serving/config/sglang_flags/<version>.json, dumped from SGLang's own parser;
tests/test_sglang_contract.py keeps it honest), so a renamed or misspelled flag fails when the
profile loads, without importing SGLang or torch (serving/config/flags.py).
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import PurePath

from pydantic import BaseModel

from serving.config.profile import FlagValue, Profile

SERVE_ENTRYPOINT = ["sglang", "serve"]
COMPILE_ENTRYPOINT = ["python3", "-m", "sglang.compile_deep_gemm"]
COMPILE_SUCCESS_LINE = "DeepGEMM Kernels compilation finished successfully."
# The compile server needs the model's shapes, not its weights or tokenizer (its one request
# is token ids): it can start as soon as config.json is on the volume.
DUMMY_WEIGHTS_FLAGS = ["--load-format", "dummy"]
COMPILE_ONLY_FLAGS = [*DUMMY_WEIGHTS_FLAGS, "--skip-tokenizer-init"]

# Flags that change which GEMM kernels are built (shapes, dtypes, backends, parallel layout).
# Part of the DeepGEMM cache key; flags outside this set (parsers, metrics, timeouts) are
# passed to the compile run too, but changing them does not invalidate compiled kernels.
KERNEL_SHAPING_FLAGS = frozenset(
    {
        "attention-backend",
        "dsa-decode-backend",
        "dsa-prefill-backend",
        "moe-runner-backend",
        "moe-a2a-backend",
        "fp8-gemm-backend",
        "quantization",
        "dtype",
        "kv-cache-dtype",
        "dp-size",
        "enable-dp-attention",
        "enable-flashinfer-allreduce-fusion",
        "speculative-algorithm",
        "speculative-num-steps",
        "speculative-eagle-topk",
        "speculative-num-draft-tokens",
        "chunked-prefill-size",
        "max-prefill-tokens",
        "max-running-requests",
        "cuda-graph-max-bs-decode",
        "cuda-graph-max-bs-prefill",
    }
)


class Command(BaseModel):
    """A process to start: its argv and the environment it adds to the container's."""

    argv: list[str]
    env: dict[str, str]


def _flag_args(flags: dict[str, FlagValue]) -> list[str]:
    args: list[str] = []
    for name, value in flags.items():
        args.append(f"--{name}")
        if value is not True:
            args.append(str(value))
    return args


def _model_args(profile: Profile, weights_path: PurePath) -> list[str]:
    return [
        "--model-path", str(weights_path),
        "--tp-size", str(profile.resources.tp),
        "--ep-size", str(profile.resources.ep),
    ]  # fmt: skip


def serve_command(
    profile: Profile,
    *,
    weights_path: PurePath,
    deepgemm_path: PurePath | None,
    port: int,
    host: str = "0.0.0.0",
    secrets_config: PurePath | None = None,
) -> Command:
    """`sglang serve` for a release. The API key never goes on the argv (it would show in `ps`
    and in logs): the supervisor writes it to a private YAML file passed as `--config`."""
    argv = [
        *SERVE_ENTRYPOINT,
        *_model_args(profile, weights_path),
        "--served-model-name", profile.served_model_name,
        "--host", host,
        "--port", str(port),
        *_flag_args(profile.engine.flags),
        *(DUMMY_WEIGHTS_FLAGS if profile.dummy_weights else []),
    ]  # fmt: skip
    if secrets_config is not None:
        argv += ["--config", str(secrets_config)]
    # Weights are on the volume, verified; reaching for the Hub at serve time is a bug.
    env = {**profile.engine.env, "HF_HUB_OFFLINE": "1"}
    if deepgemm_path is not None:
        env["SGLANG_DG_CACHE_DIR"] = str(deepgemm_path)
    return Command(argv=argv, env=env)


def compile_command(
    profile: Profile,
    *,
    weights_path: PurePath,
    deepgemm_path: PurePath,
    port: int,
    timeout_seconds: int,
) -> Command:
    """compile_deep_gemm with the serve flags, spelled out (it ignores `--config`).

    `weights_path` needs only config.json: kernel shapes come from the config, so the compile
    runs on dummy weights and may start before the download finishes.
    """
    argv = [
        *COMPILE_ENTRYPOINT,
        *_model_args(profile, weights_path),
        "--host", "127.0.0.1",
        "--port", str(port),
        *_flag_args(profile.engine.flags),
        *COMPILE_ONLY_FLAGS,
        "--timeout", str(timeout_seconds),
    ]  # fmt: skip
    env = {**profile.engine.env, "HF_HUB_OFFLINE": "1", "SGLANG_DG_CACHE_DIR": str(deepgemm_path)}
    return Command(argv=argv, env=env)


def deepgemm_cache_key(profile: Profile, model_config: bytes) -> str:
    """What the compiled kernels depend on: a different key means a different cache entry.

    `model_config` is the raw bytes of the revision's config.json (hidden sizes, expert counts
    and quantization decide the GEMM shapes).
    """
    kernel_flags = {
        name: value
        for name, value in sorted(profile.engine.flags.items())
        if name in KERNEL_SHAPING_FLAGS
    }
    material = {
        "sglang": profile.engine.version,
        "image": profile.engine.image,
        "gpu": profile.resources.gpu,
        "architecture": profile.resources.architecture,
        "tp": profile.resources.tp,
        "ep": profile.resources.ep,
        "model_config_sha256": hashlib.sha256(model_config).hexdigest(),
        "kernel_flags": kernel_flags,
        "engine_env": dict(sorted(profile.engine.env.items())),
    }
    digest = hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()
    return digest[:32]


def sglang_parser() -> tuple[str, argparse.ArgumentParser]:
    """SGLang's own server argument parser (needs sglang importable, e.g. in the engine image).

    allow_abbrev=False: "--tp" must not silently mean "--tp-size" in our command lines.
    """
    import sglang
    from sglang.srt.server_args import ServerArgs

    parser = argparse.ArgumentParser(allow_abbrev=False, exit_on_error=False)
    ServerArgs.add_cli_args(parser)
    return sglang.__version__, parser


def parse_serve_argv(argv: list[str]) -> str | None:
    """What SGLang's parser says about a serve argv: None if accepted, else its complaint."""
    version, parser = sglang_parser()
    try:
        _, unknown = parser.parse_known_args(argv[len(SERVE_ENTRYPOINT) :])
    except argparse.ArgumentError as exc:
        return f"SGLang {version} rejects the serve command: {exc}"
    if unknown:
        return f"SGLang {version} rejects the serve command: unrecognized {unknown}"
    return None
