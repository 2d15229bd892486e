"""`rollout prep|run` and Prefect: which server the flow runs report to, what a SIGKILL leaves,
and an expected failure told in one line.

Real parts: the CLI as a subprocess, the mirror as the Hub, the session's Prefect server, and
/proc (serving.core.procs) for what outlives the CLI.
"""

from __future__ import annotations

import secrets
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowFilter, FlowFilterName, LogFilter, LogFilterFlowRunId
from prefect.client.schemas.objects import FlowRun

from dev.mirror import MirrorServer
from rollout.orchestration import API_URL_ENV, SERVE_PORT_ENV
from serving.config.loader import DEFAULT_MODELS_DIR
from serving.core.home import REPO_ROOT
from serving.core.procs import all_stats, free_port, start_ticks, wait_for
from tests.mirror_fixtures import SyntheticRepo, hf_env

MODEL = "tiny-local"
CLI = [sys.executable, "-m", "rollout.cli"]
# Start-up and one resolve on a busy 2-core machine; the CLI takes a few seconds when idle.
CLI_SECONDS = 120.0
# After SIGKILL: a child that dies with its parent is gone at once; this bounds the reaping.
GONE_SECONDS = 10.0
POLL_SECONDS = 0.05


@pytest.fixture(scope="module")
def prefect_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shared by the in-process servers here: the database is migrated once, as a user's is."""
    return tmp_path_factory.mktemp("prefect-home")


@pytest.fixture
def cli_env(
    tmp_path: Path, prefect_home: Path, mirror: MirrorServer, synthetic_repo: SyntheticRepo
) -> dict[str, str]:
    """The demo model's profile on the mirror's synthetic repo; no Prefect API set, and no
    `make serve` server where the CLI looks for one."""
    models = tmp_path / "models"
    shutil.copytree(DEFAULT_MODELS_DIR, models)
    profile = yaml.safe_load((models / "smollm2-135m.yaml").read_text())
    profile |= {"name": MODEL, "hub": {"repo": synthetic_repo.repo_id, "revision": "main"}}
    (models / f"{MODEL}.yaml").write_text(yaml.safe_dump(profile))
    env = {k: v for k, v in hf_env(mirror.url, tmp_path / "hf").items()
           if not k.startswith("PREFECT_")}  # fmt: skip
    env |= {
        "ROLLOUT_MODELS_DIR": str(models),
        "ROLLOUT_HOME": str(tmp_path / "home"),
        "PREFECT_HOME": str(prefect_home),
        SERVE_PORT_ENV: str(free_port()),
        "PYTHONPATH": str(REPO_ROOT),
    }
    return env


def _prep_unknown_revision(env: dict[str, str]) -> tuple[subprocess.CompletedProcess[str], str]:
    """A valid 40-hex commit the Hub does not have: an expected failure."""
    sha = secrets.token_hex(20)
    result = subprocess.run([*CLI, "prep", MODEL, "--revision", sha], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=CLI_SECONDS)  # fmt: skip
    return result, sha


def _assert_told_in_one_line(result: subprocess.CompletedProcess[str], sha: str) -> None:
    assert result.returncode == 1, result.stderr[-3000:]
    assert result.stderr.splitlines() == [
        f"rollout: prep failed: WeightsError: revision '{sha}' not found in test-org/tiny-model"
    ], result.stderr[-3000:]


def test_an_unknown_revision_is_one_line_with_the_in_process_server(
    cli_env: dict[str, str],
) -> None:
    """No server runs: the CLI's own, with nothing else on stderr (no telemetry offline)."""
    _assert_told_in_one_line(*_prep_unknown_revision(cli_env))


@pytest.mark.parametrize("found_by", ["PREFECT_API_URL", "make serve's port"])
def test_the_cli_reports_to_a_running_server(
    cli_env: dict[str, str], prefect_server: str, found_by: str
) -> None:
    """The flow run is on that server, and its logs (what a worker ships) tell the expected
    failure without a traceback."""
    if found_by == "PREFECT_API_URL":
        cli_env[API_URL_ENV] = prefect_server
    else:
        cli_env[SERVE_PORT_ENV] = str(urlsplit(prefect_server).port)
    result, sha = _prep_unknown_revision(cli_env)
    _assert_told_in_one_line(result, sha)

    run = _prep_run_of(sha)
    assert run.state is not None and run.state.is_failed(), run.state
    with get_client(sync_client=True) as client:
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])))
    messages = [log.message for log in logs]
    assert any(f"revision '{sha}' not found" in message for message in messages), messages
    assert not [message for message in messages if "Traceback" in message], messages


def _prep_run_of(sha: str) -> FlowRun:
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["prep"])))
    matching = [run for run in runs if run.parameters.get("revision") == sha]
    assert len(matching) == 1, [(run.name, run.parameters) for run in runs]
    return matching[0]


def test_a_prefect_api_url_that_does_not_answer_is_one_line_and_exit_2(
    cli_env: dict[str, str],
) -> None:
    dead = f"http://127.0.0.1:{free_port()}/api"
    result = subprocess.run([*CLI, "run", MODEL], cwd=REPO_ROOT, env=cli_env | {API_URL_ENV: dead},
                            capture_output=True, text=True, timeout=CLI_SECONDS)  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"rollout: error: no Prefect API answers at {dead} (PREFECT_API_URL)"
    ]


def test_a_sigkilled_cli_leaves_no_process_behind(
    cli_env: dict[str, str], mirror: MirrorServer
) -> None:
    """Killed once its flow run has started work (the first Hub call), when the Prefect server
    it relies on must be up: nothing the CLI started outlives it."""
    cli = subprocess.Popen([*CLI, "prep", MODEL], cwd=REPO_ROOT, env=cli_env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    try:
        wait_for(lambda: bool(mirror.requests) or cli.poll() is not None, CLI_SECONDS,
                 POLL_SECONDS)  # fmt: skip
        working = bool(mirror.requests) and cli.poll() is None
        started = _descendants(cli.pid)
    finally:
        cli.kill()
        _, stderr = cli.communicate(timeout=GONE_SECONDS)
    assert working, f"the CLI did no work before it ended:\n{stderr.decode()[-2000:]}"

    def left() -> dict[int, str]:
        return {pid: name for pid, (ticks, name) in started.items() if start_ticks(pid) == ticks}

    assert wait_for(lambda: not left(), GONE_SECONDS, POLL_SECONDS), (
        f"still running after the CLI's SIGKILL: {left()}\n{stderr.decode()[-2000:]}"
    )


def _descendants(pid: int) -> dict[int, tuple[int, str]]:
    """Every process below `pid`: (start ticks, command line) by pid."""
    stats = list(all_stats())
    found: dict[int, tuple[int, str]] = {}
    parents = {pid}
    while parents:
        children = [stat for stat in stats if stat.ppid in parents and stat.pid not in found]
        for stat in children:
            found[stat.pid] = (stat.start_ticks, _cmdline(stat.pid))
        parents = {stat.pid for stat in children}
    return found


def _cmdline(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return "?"
