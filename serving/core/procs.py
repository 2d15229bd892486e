"""Processes as containers, for the local platform: spawning, identity, stopping, inventory.

Every long-running process the local platform starts (a release's `python -m serving.supervisor`,
the router) gets a record in `$ROLLOUT_HOME/state/processes/<name>.json`, written atomically.
A record names its owner, the orchestrator process that started it, so a later orchestrator can
tell a process still in use from one whose orchestrator was SIGKILLed (an orphan).

Identity is (pid, start time): a pid reused by an unrelated program after a reboot or a long
pause is never signalled, because its start time differs from the recorded one.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

PROC = Path("/proc")
# Between SIGKILL and the kernel removing a process: only uninterruptible sleep lasts longer.
KILL_REAP_SECONDS = 10.0
EXIT_POLL_SECONDS = 0.05


# --------------------------------------------------------------------------------------------
# Identity
# --------------------------------------------------------------------------------------------


def start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot, or None when it does not run (a
    zombie runs no code and holds no port: it counts as gone)."""
    reap_children()
    try:
        stat = (PROC / str(pid) / "stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    except OSError:
        return _start_ticks_without_proc(pid)
    # The command name (field 2) may hold spaces and parentheses: split after the last ")".
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] == "Z":
        return None
    return int(fields[19])


def _start_ticks_without_proc(pid: int) -> int | None:
    # No /proc (macOS): liveness only; 0 stands for "alive, start time unknown".
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return 0
    return 0


def is_running(pid: int, ticks: int | None) -> bool:
    """True when `pid` runs and is the process that was recorded with `ticks`."""
    current = start_ticks(pid)
    return current is not None and (ticks is None or current == ticks or current == 0)


# --------------------------------------------------------------------------------------------
# Spawning and stopping
# --------------------------------------------------------------------------------------------

# Children of this interpreter, whatever LocalPlatform instance started them (the Prefect tasks
# each build their own): polled so an exited child never lingers as a zombie.
_children: dict[int, subprocess.Popen[bytes]] = {}
_children_lock = threading.Lock()


def spawn(
    argv: list[str], *, cwd: Path, env: dict[str, str], stdout: IO[bytes], stderr: IO[bytes]
) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        argv,
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=stdout,
        stderr=stderr,
        # Its own session: a terminal's Ctrl-C reaches the orchestrator only (which stops its
        # processes in order), and the whole group can be signalled as one.
        start_new_session=True,
    )
    with _children_lock:
        _children[process.pid] = process
    return process


def reap_children() -> None:
    with _children_lock:
        for pid, process in list(_children.items()):
            if process.poll() is not None:
                del _children[pid]


def child_groups(pid: int) -> set[int]:
    """Process groups of `pid`'s direct children. Collected before the parent is signalled:
    once it is gone, its children belong to init and can no longer be found this way."""
    groups: set[int] = set()
    if not PROC.is_dir():
        return groups
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            groups.add(int(fields[2]))
    return groups


def signal_group(pgid: int, signum: signal.Signals) -> None:
    # ProcessLookupError: the whole group is already gone.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


def wait_gone(pid: int, ticks: int | None, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while is_running(pid, ticks):
        if time.monotonic() >= deadline:
            return False
        time.sleep(EXIT_POLL_SECONDS)
    return True


def stop_process(pid: int, ticks: int | None, *, groups: set[int], term_seconds: float) -> bool:
    """SIGTERM `pid`'s group, give it `term_seconds` to exit on its own, then SIGKILL its group
    and every extra group (an engine runs in a session of its own). True when it is gone."""
    if not is_running(pid, ticks):
        # Gone already; its extra groups may not be: an engine whose supervisor was SIGKILLed.
        for group in groups:
            signal_group(group, signal.SIGKILL)
        return True
    groups = groups | child_groups(pid)
    signal_group(pid, signal.SIGTERM)
    wait_gone(pid, ticks, term_seconds)
    for group in {pid, *groups}:
        signal_group(group, signal.SIGKILL)
    return wait_gone(pid, ticks, KILL_REAP_SECONDS)


def processes_in(directory: Path) -> list[int]:
    """Live pids whose working directory is `directory` or below it (also once deleted)."""
    if not PROC.is_dir():
        return []
    root = str(directory.absolute())
    found = []
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cwd = os.readlink(entry / "cwd")
        except OSError:
            continue  # gone, a zombie, or not ours to inspect
        if cwd == root or cwd.startswith(root + "/") or cwd == f"{root} (deleted)":
            found.append(int(entry.name))
    return found


def sweep(directory: Path) -> list[int]:
    """SIGKILL the groups of every process still working in `directory`: the last resort for
    an engine whose supervisor died before naming it (its parent link is gone by then, its
    working directory is not)."""
    pids = processes_in(directory)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            signal_group(os.getpgid(pid), signal.SIGKILL)
    for pid in pids:
        wait_gone(pid, None, KILL_REAP_SECONDS)
    return pids


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_is_free(port: int) -> bool:
    """Nobody listens on the port. SO_REUSEADDR, as servers bind: connections of a previous
    listener still in TIME_WAIT do not make the port taken."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def wait_for(condition: Callable[[], bool], timeout: float, interval: float) -> bool:
    """Poll `condition` until true or `timeout`; returns its last value."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
    return True


# --------------------------------------------------------------------------------------------
# Inventory
# --------------------------------------------------------------------------------------------


