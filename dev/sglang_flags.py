"""Dump SGLang's option table from its own argument parser into serving/config/sglang_flags/.

    python -m dev.sglang_flags      # needs the `contract` extra (sglang --no-deps, torch CPU)

The table lets `rollout plan` reject a misspelled or renamed flag without importing SGLang;
tests/test_sglang_contract.py fails when the table and the installed parser disagree.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib.util
import json
from pathlib import Path

from serving.config.flags import FLAG_TABLES
from serving.engines.sglang import sglang_parser


def compile_parser() -> argparse.ArgumentParser:
    """compile_deep_gemm's parser: the serve options plus its own `CompileArgs`.

    Importing sglang.compile_deep_gemm pulls in the whole server (and torchvision, which has
    no CPU wheel here), so SGLang's CompileArgs class is executed alone from its source.
    """
    spec = importlib.util.find_spec("sglang.compile_deep_gemm")
    if spec is None or spec.origin is None:
        raise ImportError("sglang.compile_deep_gemm is not installed")
    tree = ast.parse(Path(spec.origin).read_text())
    (node,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "CompileArgs"]
    namespace: dict[str, object] = {"argparse": argparse, "dataclasses": dataclasses}
    exec(compile(ast.Module(body=[node], type_ignores=[]), spec.origin, "exec"), namespace)
    _, parser = sglang_parser()
    namespace["CompileArgs"].add_cli_args(parser)  # type: ignore[attr-defined]
    return parser


def option_table(parser: argparse.ArgumentParser) -> dict[str, dict[str, object]]:
    table: dict[str, dict[str, object]] = {}
    for action in parser._actions:
        for option in action.option_strings:
            if not option.startswith("--"):
                continue
            choices = sorted(str(choice) for choice in action.choices) if action.choices else None
            table[option] = {"takes_value": action.nargs != 0, "choices": choices}
    return dict(sorted(table.items()))


def main() -> None:
    version, parser = sglang_parser()
    path = FLAG_TABLES / f"{version}.json"
    path.write_text(json.dumps(option_table(parser), indent=1) + "\n")
    print(f"wrote {len(option_table(parser))} options to {path}")


if __name__ == "__main__":
    main()
