"""Fixtures for the engine supervisor tests (tests/test_server.py). Import them by module
attribute; the shared conftest.py stays untouched.

- `tiny_model_dir`: a real, tiny Llama (hidden size 32, 2 layers) with a word-level tokenizer
  and a chat template, built offline in a fraction of a second. It answers nonsense words, and
  cannot say "Paris" (not in its vocabulary), but it is a real model for `transformers serve`.
- `supervisors`: a factory of Supervisors that are all stopped at teardown, even on failure.
- `fake_command`: the FAKE engine (tests/engines/fake_engine.py) as a Command.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from serving.config.loader import load_profile
from serving.config.profile import ChatMessage, Probe, Profile
from serving.core.procs import free_port
from serving.engines.sglang import Command
from serving.supervisor.supervisor import Supervisor

# How often tests poll a condition they wait for.
POLL_SECONDS = 0.05
REPO_ROOT = Path(__file__).resolve().parents[1]
FAKE_ENGINE = Path(__file__).parent / "engines" / "fake_engine.py"
DEMO_PROFILE = "smollm2-135m"
# The demo profile minus its "capital" probe, which a tiny random model cannot pass.
PASSABLE_PROFILE = "tiny-test"

# Every word the tiny model knows; "Paris" is deliberately not among them.
TINY_CORPUS = [
    "hello world the quick brown fox jumps over the lazy dog",
    "say hello explain quicksort in one sentence summarise the following text",
]
TINY_SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def process_gone(pid: int) -> bool:
    """True when `pid` no longer runs. A zombie counts as gone: it runs no code, holds no
    port, and only waits for its (possibly absent) init to reap it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def probe(name: str, content: str, **fields: object) -> Probe:
    return Probe.model_validate(
        {"name": name, "messages": [ChatMessage(role="user", content=content)], **fields}
    )


def fake_command(*args: str, env: dict[str, str] | None = None) -> Command:
    return Command(argv=[sys.executable, str(FAKE_ENGINE), *args], env=env or {})


def build_tiny_model(directory: Path, seed: int = 0) -> Path:
    """Save a tiny Llama and its tokenizer to `directory` (offline, deterministic per seed:
    another seed is another model, which answers differently)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.decoder = decoders.WordPiece()  # joins words with spaces
    core.train_from_iterator(
        TINY_CORPUS, trainers.WordLevelTrainer(special_tokens=TINY_SPECIAL_TOKENS)
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<unk>",
    )
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    tokenizer.save_pretrained(directory)

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    # A random model mostly emits special tokens, which decode to "": zero their output rows so
    # it emits words (the probes check for non-empty content) and never ends early.
    special_ids = tokenizer.convert_tokens_to_ids(TINY_SPECIAL_TOKENS)
    with torch.no_grad():
        model.lm_head.weight[special_ids] = 0
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def models_dir_with_tiny_profile(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models directory holding the real demo profiles plus `tiny-test`: the demo profile
    without the probe that needs a real model."""
    directory = tmp_path_factory.mktemp("models")
    source = REPO_ROOT / "models"
    shutil.copytree(source / "shared", directory / "shared")
    shutil.copy(source / f"{DEMO_PROFILE}.yaml", directory)
    text = (source / f"{DEMO_PROFILE}.yaml").read_text()
    text = text.replace(f"name: {DEMO_PROFILE}", f"name: {PASSABLE_PROFILE}", 1)
    text = text.replace("  - capital\n", "", 1)
    (directory / f"{PASSABLE_PROFILE}.yaml").write_text(text)
    assert "capital" not in [p.name for p in load_profile(PASSABLE_PROFILE, directory).probes]
    return directory


@pytest.fixture(scope="session")
def demo_profile() -> Profile:
    return load_profile(DEMO_PROFILE)


SupervisorFactory = Callable[..., Supervisor]


def _supervisor_factory() -> Iterator[SupervisorFactory]:
    started: list[Supervisor] = []

    def make(profile: Profile, command: Command, **kwargs: object) -> Supervisor:
        kwargs.setdefault("port", free_port())
        supervisor = Supervisor(profile, command, **kwargs)  # type: ignore[arg-type]
        started.append(supervisor)
        return supervisor

    yield make
    for supervisor in started:
        supervisor.stop(drain_seconds=0)


@pytest.fixture
def supervisors() -> Iterator[SupervisorFactory]:
    yield from _supervisor_factory()


@pytest.fixture(scope="module")
def module_supervisors() -> Iterator[SupervisorFactory]:
    yield from _supervisor_factory()

