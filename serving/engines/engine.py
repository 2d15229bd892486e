"""The engine process for a release, whichever engine the profile names.

- sglang: `sglang serve` (serving/engines/sglang.py), on GPUs in a Modal container.
- transformers: `transformers serve`, on the CPU, for the local target and its demo model;
  with dummy weights, on random weights built from the config (serving/engines/random_weights).

The supervisor (serving/supervisor/) runs the Command this module builds; it does not care which
engine it is, except for what goes in a request's `model` field (`request_model`).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path, PurePath

import yaml

from serving.config.profile import FlagValue, Profile
from serving.engines.sglang import Command, serve_command

# The CLI module behind the `transformers` console script. Run through this interpreter, so the
# engine is the transformers installed next to the supervisor, whatever PATH says.
TRANSFORMERS_CLI_MODULE = "transformers.cli.transformers"
RANDOM_WEIGHTS_MODULE = "serving.engines.random_weights"
SECRETS_CONFIG_NAME = "engine-secrets.yaml"
PRIVATE_FILE_MODE = 0o600


def engine_command(
    profile: Profile,
    *,
    weights_path: PurePath,
    deepgemm_path: PurePath | None = None,
    port: int,
    host: str = "127.0.0.1",
    secrets_config: PurePath | None = None,
) -> Command:
    """The argv and extra environment that start `profile`'s engine on host:port."""
    if profile.engine.kind == "sglang":
        return serve_command(
            profile,
            weights_path=weights_path,
            deepgemm_path=deepgemm_path,
            port=port,
            host=host,
            secrets_config=secrets_config,
        )
    return transformers_command(profile, weights_path=weights_path, port=port, host=host)


def transformers_command(
    profile: Profile, *, weights_path: PurePath, port: int, host: str
) -> Command:
    """`transformers serve` pinned to the release's weights. It has no API key option: it only
    ever listens on the local machine."""
    # Dummy weights: the random weights are built first, in the engine's own process.
    runner = [RANDOM_WEIGHTS_MODULE, str(weights_path), "--"] if profile.dummy_weights else []
    argv = [
        sys.executable, "-m", *runner, TRANSFORMERS_CLI_MODULE, "serve", str(weights_path),
        "--device", "cpu",
        "--host", host,
        "--port", str(port),
        *_transformers_flag_args(profile.engine.flags),
    ]  # fmt: skip
    # The weights are local and verified; reaching for the Hub at serve time is a bug.
    env = {**profile.engine.env, "HF_HUB_OFFLINE": "1"}
    return Command(argv=argv, env=env)


def _transformers_flag_args(flags: dict[str, FlagValue]) -> list[str]:
    # `transformers serve` is a typer CLI: switches come in --name / --no-name pairs.
    args: list[str] = []
    for name, value in flags.items():
        if value is True:
            args.append(f"--{name}")
        elif value is False:
            args.append(f"--no-{name}")
        else:
            args += [f"--{name}", str(value)]
    return args


def request_model(profile: Profile, weights_path: PurePath) -> str:
    """The `model` a chat request must name: SGLang serves the profile's served name;
    `transformers serve` pinned to a directory answers 400 to anything but that path."""
    if profile.engine.kind == "sglang":
        return profile.served_model_name
    return str(weights_path)


def write_secrets_config(directory: Path, api_key: str | None) -> Path | None:
    """A private SGLang `--config` YAML holding the API key, so the key is never on an argv
    (visible in `ps` and in logs). None when there is no key to protect the engine with."""
    if not api_key:
        return None
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / SECRETS_CONFIG_NAME
    # Created with its final mode: the key is never readable by others, not even briefly.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE_FILE_MODE)
    with os.fdopen(fd, "w") as config:
        yaml.safe_dump({"api-key": api_key}, config)
    os.chmod(path, PRIVATE_FILE_MODE)  # an existing file keeps its old mode through O_CREAT
    return path


# FAULT INJECTION, for tests only: maps a release id to the argv of a fake engine ("{port}"
# is replaced), because a real engine cannot produce a 5xx rate, a slow first token or a crash
# on demand. Unset in production; the supervisor logs loudly when it applies.
FAULT_ENGINES_ENV = "ROLLOUT_FAULT_ENGINES"


def fault_engine_command(release_id: str, port: int) -> Command | None:
    faults = json.loads(os.environ.get(FAULT_ENGINES_ENV) or "{}")
    if release_id not in faults:
        return None
    argv = [part.replace("{port}", str(port)) for part in faults[release_id]]
    return Command(argv=argv, env={})
