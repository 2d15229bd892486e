"""Pytest fixtures for the local HF mirror (dev.mirror), registered in conftest.py.

In-process clients pass `endpoint=mirror.url`; subprocess clients get `hf_env(mirror.url, home)`,
because huggingface_hub reads HF_ENDPOINT once, at import time.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import BaseModel

from dev.demo_model import make_synthetic_repo, shard_name
from dev.mirror import MirrorServer, run_mirror
from dev.mirror_store import KiB, MiB, MirrorStore

SYNTHETIC_REPO_ID = "test-org/tiny-model"
# Two LFS shards by size, one LFS by suffix only (< 1 MiB): all three LFS paths of the mirror.
SYNTHETIC_SHARDS = [3 * MiB, 1 * MiB + 512 * KiB, 200 * KiB]
SHARD_COUNT = len(SYNTHETIC_SHARDS)
BIG_SHARD = shard_name(0, SHARD_COUNT)  # 3 MiB
MID_SHARD = shard_name(1, SHARD_COUNT)  # 1.5 MiB
SMALL_SHARD = shard_name(2, SHARD_COUNT)  # 200 KiB, LFS by suffix
SYNTHETIC_EXTRA = {
    "tokenizer_config.json": b'{"model_max_length": 2048}',
    "nested/notes.txt": b"a file in a sub-directory, so trees have a folder\n",
}


class SyntheticRepo(BaseModel):
    repo_id: str
    v1: str  # tag v1
    v2: str  # tag v2, and the head of main


def hf_env(endpoint: str, home: Path) -> dict[str, str]:
    """Environment for a subprocess running huggingface_hub against the mirror, isolated from
    any user token or cache."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env |= {
        "HF_ENDPOINT": endpoint,
        "HF_HOME": str(home),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    }
    return env


@pytest.fixture(scope="session")
def mirror_store(tmp_path_factory: pytest.TempPathFactory) -> MirrorStore:
    return MirrorStore(tmp_path_factory.mktemp("mirror-store"))


@pytest.fixture(scope="session")
def synthetic_repo(mirror_store: MirrorStore) -> SyntheticRepo:
    v1 = make_synthetic_repo(
        mirror_store, SYNTHETIC_REPO_ID, SYNTHETIC_SHARDS, seed=1, tags=["v1"],
        extra_files=SYNTHETIC_EXTRA,
    )  # fmt: skip
    v2 = make_synthetic_repo(
        mirror_store, SYNTHETIC_REPO_ID, SYNTHETIC_SHARDS, seed=2, tags=["v2"],
        extra_files=SYNTHETIC_EXTRA,
    )  # fmt: skip
    return SyntheticRepo(repo_id=SYNTHETIC_REPO_ID, v1=v1, v2=v2)


@pytest.fixture(scope="session")
def mirror_server(mirror_store: MirrorStore) -> Iterator[MirrorServer]:
    with run_mirror(mirror_store) as server:
        yield server


@pytest.fixture
def mirror(mirror_server: MirrorServer, synthetic_repo: SyntheticRepo) -> Iterator[MirrorServer]:
    """The shared mirror with the synthetic repo published, no faults and an empty request log."""
    mirror_server.clear_faults()
    mirror_server.clear_requests()
    yield mirror_server
    mirror_server.clear_faults()
