"""The compile stage: success only on exit 0 + the success line, dead children noticed at once,
the whole process group killed on timeout, markers keyed by the cache key."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from serving.config.loader import load_profile
from serving.config.profile import Profile
from serving.core.home import REPO_ROOT
from serving.engines.deepgemm import (
    CompileFailed,
    CompileResult,
    Log,
    compile_kernels,
    marker_path,
    read_marker,
    run_compile,
)
from serving.engines.sglang import COMPILE_SUCCESS_LINE, Command, deepgemm_cache_key

FAKE = REPO_ROOT / "tests" / "engines" / "fake_compile_deep_gemm.py"
REVISION = "c" * 40


def fake(mode: str) -> Command:
    return Command(argv=[sys.executable, str(FAKE), mode], env={})


def test_success_needs_exit_zero_and_the_success_line() -> None:
    lines: list[str] = []
    run_compile(fake("ok"), 60, lines.append)
    assert any(COMPILE_SUCCESS_LINE in line for line in lines)
    with pytest.raises(CompileFailed, match="exit 0 without"):
        run_compile(fake("no-success-line"), 60, lambda _: None)
    with pytest.raises(CompileFailed, match="exit 1"):
        run_compile(fake("exit-1"), 60, lambda _: None)


def test_a_server_stopped_by_a_finished_compile_is_no_failure() -> None:
    lines: list[str] = []
    run_compile(fake("slow-exit"), 60, lines.append)
    assert any(COMPILE_SUCCESS_LINE in line for line in lines)


def test_a_dead_server_child_fails_at_once_not_at_the_timeout() -> None:
    started = time.monotonic()
    with pytest.raises(CompileFailed, match="server process died") as raised:
        run_compile(fake("child-dies"), 600, lambda _: None)
    assert time.monotonic() - started < 15
    assert "capturing DeepGEMM calls" in str(raised.value)  # the log tail explains


def test_compile_gets_no_secret_and_its_output_is_masked(monkeypatch: pytest.MonkeyPatch) -> None:
    token = "hf_compile_secret_123"
    monkeypatch.setenv("HF_TOKEN", token)
    # The child prints what its environment holds, then echoes the value it got another way.
    script = ("import os, sys; print('env:', os.environ.get('HF_TOKEN'));"
              " print('argv:', sys.argv[1]); sys.exit(1)")  # fmt: skip
    lines: list[str] = []
    with pytest.raises(CompileFailed) as raised:
        run_compile(Command(argv=[sys.executable, "-c", script, token], env={}), 60, lines.append)
    assert "[compile] env: None" in lines
    assert "[compile] argv: [REDACTED]" in lines
    assert token not in str(raised.value) and "argv: [REDACTED]" in str(raised.value)


def _running_fakes(mode: str) -> list[int]:
    """PIDs of fake compile processes (parent or server child) still alive in MODE."""
    alive = []
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if str(FAKE).encode() in cmdline and mode.encode() in cmdline:
            alive.append(int(entry.name))
    return alive


def test_timeout_kills_the_whole_group() -> None:
    started = time.monotonic()
    with pytest.raises(CompileFailed, match="timed out"):
        run_compile(fake("hang"), 2, lambda _: None)
    assert time.monotonic() - started < 20
    assert _running_fakes("hang") == []


def test_cancellation_kills_the_group(monkeypatch: pytest.MonkeyPatch) -> None:
    import serving.engines.deepgemm as deepgemm

    def watch_then_cancel(process: object, timeout: float) -> None:
        time.sleep(1.5)  # long enough for the server child to exist
        raise KeyboardInterrupt  # what Prefect's cancellation or Ctrl-C looks like here

    monkeypatch.setattr(deepgemm, "_watch", watch_then_cancel)
    with pytest.raises(KeyboardInterrupt):
        run_compile(fake("hang"), 600, lambda _: None)
    assert _running_fakes("hang") == []


@pytest.fixture
def weights(tmp_path: Path) -> Path:
    directory = tmp_path / "weights"
    directory.mkdir()
    (directory / "config.json").write_text('{"hidden_size": 64}')
    return directory


Runner = Callable[[Command, float, Log], None]


def compile_on(profile: Profile, weights: Path, cache: Path, run: Runner) -> CompileResult:
    """A compile with a GPU taken as present, run by `run` instead of a process."""
    return compile_kernels(profile, revision=REVISION, weights_path=weights, cache_dir=cache,
                           timeout_seconds=600, run=run, unavailable=lambda: None)  # fmt: skip


def test_marker_makes_the_second_run_free(weights: Path, tmp_path: Path) -> None:
    profile = load_profile("glm-5.1")
    calls: list[Command] = []

    def run(command: Command, timeout: float, log: object) -> None:
        calls.append(command)

    first = compile_on(profile, weights, tmp_path / "sm_100", run)
    assert first.status == "compiled"
    assert calls[0].env["SGLANG_DG_CACHE_DIR"] == str(tmp_path / "sm_100")
    key = deepgemm_cache_key(profile, (weights / "config.json").read_bytes())
    marker = read_marker(tmp_path / "sm_100", key)
    assert marker is not None and marker.revision == REVISION
    second = compile_on(profile, weights, tmp_path / "sm_100", run)
    assert second.status == "cached" and len(calls) == 1
    # A different model config is a different key: compile again.
    (weights / "config.json").write_text('{"hidden_size": 128}')
    assert compile_on(profile, weights, tmp_path / "sm_100", run).status == "compiled"
    assert len(calls) == 2
    # A torn marker (a write cut short on the volume) is no marker: compile again.
    key = deepgemm_cache_key(profile, (weights / "config.json").read_bytes())
    marker_path(tmp_path / "sm_100", key).write_text('{"key": ')
    assert read_marker(tmp_path / "sm_100", key) is None
    assert compile_on(profile, weights, tmp_path / "sm_100", run).status == "compiled"
    assert len(calls) == 3


def test_failed_compile_writes_no_marker(weights: Path, tmp_path: Path) -> None:
    def run(command: Command, timeout: float, log: object) -> None:
        raise CompileFailed("boom")

    with pytest.raises(CompileFailed):
        compile_on(load_profile("glm-5.1"), weights, tmp_path / "sm_100", run)
    assert not (tmp_path / "sm_100" / "markers").exists()


def test_no_gpu_is_an_explicit_skip_never_a_fake_success(weights: Path, tmp_path: Path) -> None:
    result = compile_kernels(
        load_profile("glm-5.1"),
        revision=REVISION,
        weights_path=weights,
        cache_dir=tmp_path / "sm_100",
        timeout_seconds=600,
    )
    assert result.status == "skipped"
    assert "GPU" in result.reason
    assert not (tmp_path / "sm_100" / "markers").exists()
