"""Random weights for `transformers serve`, built from a revision's config alone: the local
counterpart of SGLang's `--load-format dummy`.

    python -m serving.engines.random_weights DIR -- MODULE ARGS...

writes DIR/model.safetensors once (seeded: an engine restarted by its supervisor serves the
same model), then runs the engine's MODULE as `python -m MODULE ARGS...` in this process:
torch and transformers, already imported, are not imported twice (seconds each on a busy
CPU), and the supervisor's engine pid stays right.
"""

from __future__ import annotations

import os
import runpy
import sys
import tempfile
from pathlib import Path

WEIGHTS_NAME = "model.safetensors"
SEED = 0


def materialize(directory: Path) -> Path:
    """DIR/model.safetensors: the model of DIR/config.json with random weights."""
    weights = directory / WEIGHTS_NAME
    if weights.is_file():
        return weights
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(SEED)
    config = AutoConfig.from_pretrained(directory)
    model = AutoModelForCausalLM.from_config(config)
    # Saved aside, then moved in whole: a crash never leaves half a weights file to serve.
    with tempfile.TemporaryDirectory(dir=directory, prefix=".random-") as scratch:
        model.save_pretrained(scratch)
        os.replace(Path(scratch) / WEIGHTS_NAME, weights)
    return weights


def main(argv: list[str]) -> None:
    directory, separator, *engine = argv
    if separator != "--" or not engine:
        raise SystemExit("usage: python -m serving.engines.random_weights DIR -- MODULE ARGS...")
    materialize(Path(directory))
    module = engine[0]
    sys.argv = engine
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
