"""Fixtures for the local platform's serving tests (tests/test_local_serving.py).

- weights: the tiny real model of tests/server_fixtures.py, copied into a ROLLOUT_HOME's volume
  layout as the weights of fake 40-hex revisions (no download: a release only needs the dir);
- `processes_under`: every live process whose working directory or command line lies under a
  directory, which is how the tests see that nothing of a home is left running;
- run as a script, an orchestrator to SIGKILL: it deploys one release, routes all traffic to
  it, prints the pids as one JSON line, then holds (until killed, bounded) or shuts down.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script
    sys.path.insert(0, str(REPO_ROOT))

from serving.config.layout import weights_dir  # noqa: E402
from serving.config.loader import load_profile  # noqa: E402
from serving.config.profile import Profile  # noqa: E402
from serving.platforms.local.platform import LocalPlatform  # noqa: E402
from serving.platforms.local.router_process import ROUTER_RECORD  # noqa: E402

REVISION_A = "a" * 40
REVISION_B = "b" * 40
REVISION_C = "c" * 40
# The orchestrator script holds this long at most: a test that forgot it cannot leak it forever.
HOLD_SECONDS = 120.0
# Deploy (~4 s start, ~1 s probes here) plus interpreter start and imports, with room to spare.
DRIVER_READY_SECONDS = 90.0
LOAD_REQUEST_TIMEOUT = 30.0


# --------------------------------------------------------------------------------------------
# Homes and weights
# --------------------------------------------------------------------------------------------


def place_weights(home: Path, profile: Profile, revision: str, model_dir: Path) -> Path:
    target = weights_dir(home / "volumes" / profile.volumes.weights, profile, revision)
    if not target.exists():
        shutil.copytree(model_dir, target)
    return target


def platform_env(home: Path, models_dir: Path, router_port: int, *, keep: bool) -> dict[str, str]:
    return {
        **os.environ,
        "ROLLOUT_HOME": str(home),
        "ROLLOUT_MODELS_DIR": str(models_dir),
        "ROLLOUT_ROUTER_PORT": str(router_port),
        "ROLLOUT_KEEP_SERVING": "1" if keep else "0",
        "PYTHONPATH": str(REPO_ROOT),
    }


# --------------------------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------------------------


def processes_under(directory: Path) -> list[int]:
    """Live pids whose cwd or argv mention `directory` (zombies excluded: they run nothing)."""
    needle = str(directory.resolve())
    found: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            cwd = os.readlink(entry / "cwd")
            argv = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if state != "Z" and (cwd.startswith(needle) or needle in argv):
            found.append(int(entry.name))
    return found


def describe(pids: list[int]) -> str:
    """`ps`-like lines for an assertion message."""
    lines = []
    for pid in pids:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            argv = "(gone)"
        lines.append(f"{pid} {argv[:200]}")
    return "\n".join(lines)


def inventory_pids(home: Path) -> dict[str, list[int]]:
    """Record name → the pids it accounts for (supervisor and engine, or the router)."""
    platform = LocalPlatform(home)
    out: dict[str, list[int]] = {}
    for record in platform.inventory.records():
        out[record.name] = [pid for pid in (record.pid, record.engine_pid) if pid is not None]
    return out


@dataclass
class Driver:
    """An orchestrator process (this file run as a script) and what it printed when ready."""

    process: subprocess.Popen[str]
    ready: dict[str, Any]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.communicate(timeout=30)


def start_driver(env: dict[str, str], profile: str, revision: str, mode: str) -> Driver:
    process = subprocess.Popen(
        [sys.executable, __file__, profile, revision, mode],
        env=env, cwd=REPO_ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], DRIVER_READY_SECONDS)
    line = process.stdout.readline() if ready else ""
    if not line:
        process.kill()
        _, err = process.communicate(timeout=30)
        raise AssertionError(f"the orchestrator printed nothing; stderr:\n{err[-3000:]}")
    return Driver(process, json.loads(line))


def _drive(profile_name: str, revision: str, mode: str) -> None:
    platform = LocalPlatform.from_env()
    profile = load_profile(profile_name)
    release = platform.deploy(profile, revision)
    platform.set_traffic(profile, {release.id: 100})
    pids = inventory_pids(platform.home)
    print(
        json.dumps({"release": release.model_dump(mode="json"), "pids": pids,
                    "router_pid": pids[ROUTER_RECORD][0]}),
        flush=True,
    )  # fmt: skip
    if mode == "hold":
        time.sleep(HOLD_SECONDS)  # until SIGKILLed; bounded if not
    platform.shutdown()


# --------------------------------------------------------------------------------------------
# Traffic
# --------------------------------------------------------------------------------------------


def chat_body(model: str, *, max_tokens: int = 8, stream: bool = False) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": "say hello world"}],
        "max_tokens": max_tokens,
        "stream": stream,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description="an orchestrator for the orphan tests")
    parser.add_argument("profile")
    parser.add_argument("revision")
    parser.add_argument("mode", choices=["hold", "shutdown"])
    args = parser.parse_args()
    _drive(args.profile, args.revision, args.mode)


if __name__ == "__main__":
    main()
