"""Processes: identity from /proc, spawning, signalling and tearing down process groups.

The one place that reads /proc/<pid>/stat and tears a process group down (SIGTERM, deadline,
SIGKILL, reap). The local platform spawns its containers here and stops them by their records
(serving.platforms.local.inventory) with `stop_process`; the engine supervisor, the DeepGEMM
compile runner and `make serve` stop their own children with `stop_group`.

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
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, NamedTuple

PROC = Path("/proc")
# Between SIGKILL and the kernel removing a process: only uninterruptible sleep (e.g. a stuck
# GPU driver call) lasts longer.
KILL_REAP_SECONDS = 10.0
EXIT_POLL_SECONDS = 0.05
ZOMBIE = "Z"


# --------------------------------------------------------------------------------------------
# /proc
# --------------------------------------------------------------------------------------------


class Stat(NamedTuple):
    """The fields of /proc/<pid>/stat this project reads."""

    pid: int
    state: str
    ppid: int
    pgrp: int
    start_ticks: int  # since boot

    @property
    def runs(self) -> bool:
        # A zombie runs no code and holds no port: it only waits to be reaped.
        return self.state != ZOMBIE


def read_stat(pid: int) -> Stat:
    """Raises OSError (FileNotFoundError: no such process) when it cannot be read."""
    text = (PROC / str(pid) / "stat").read_text()
    # The command name (field 2) may hold spaces and parentheses: split after the last ")".
    fields = text.rsplit(")", 1)[1].split()
    return Stat(pid, fields[0], int(fields[1]), int(fields[2]), int(fields[19]))


def all_stats() -> Iterator[Stat]:
    """Every process /proc shows (none without /proc); one that exits meanwhile is skipped."""
    if not PROC.is_dir():
        return
    for entry in PROC.iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                yield read_stat(int(entry.name))


def start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot, or None when it does not run (a
    zombie counts as gone)."""
    reap_children()
    if not PROC.is_dir():
        return _start_ticks_without_proc(pid)
    try:
        stat = read_stat(pid)
    except (FileNotFoundError, ProcessLookupError):
        return None
    except OSError:
        return _start_ticks_without_proc(pid)
    return stat.start_ticks if stat.runs else None


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


def group_members(pgid: int) -> set[int]:
    """The running pids of process group `pgid` (empty without /proc)."""
    return {stat.pid for stat in all_stats() if stat.pgrp == pgid and stat.runs}


def child_groups(pid: int) -> set[int]:
    """Process groups of `pid`'s direct children. Collected before the parent is signalled:
    once it is gone, its children belong to init and can no longer be found this way."""
    return {stat.pgrp for stat in all_stats() if stat.ppid == pid}


# --------------------------------------------------------------------------------------------
# Spawning
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


# --------------------------------------------------------------------------------------------
# Stopping
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Teardown:
    drained: bool  # it exited within its deadline, on SIGTERM or on its own
    gone: bool  # False: it survived SIGKILL for KILL_REAP_SECONDS


def signal_group(pgid: int, signum: signal.Signals) -> None:
    # ProcessLookupError: the whole group is already gone.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


def stop_group(process: subprocess.Popen[Any], term_seconds: float) -> Teardown:
    """Tear down the process group `process` leads (started with start_new_session, so its pid
    is the group id): SIGTERM while any of it runs, up to `term_seconds` for the leader to exit
    and the group to empty, then SIGKILL the group whatever happened — no worker outlives its
    leader — and reap the leader. Programs that drain with no deadline of their own (SGLang)
    get this one."""
    pgid = process.pid

    def gone() -> bool:
        return process.poll() is not None and not group_members(pgid)

    return _tear_down(pgid, gone, term_seconds, kill={pgid})


def stop_process(pid: int, ticks: int | None, *, groups: set[int], term_seconds: float) -> bool:
    """Like stop_group for a process this interpreter may not have started (a record's), known
    by (pid, start ticks): its group gets SIGTERM and `term_seconds`, then SIGKILL along with
    every extra group (an engine runs in a session of its own) and its children's. True when
    it is gone."""
    if is_running(pid, ticks):
        groups = groups | child_groups(pid) | {pid}
    # else its pid may be another program's by now; its extra groups are still ours to kill:
    # an engine whose supervisor was SIGKILLed.
    return _tear_down(pid, lambda: not is_running(pid, ticks), term_seconds, kill=groups).gone


def _tear_down(
    pgid: int, gone: Callable[[], bool], term_seconds: float, *, kill: set[int]
) -> Teardown:
    drained = gone()
    if not drained:
        signal_group(pgid, signal.SIGTERM)
        drained = wait_for(gone, term_seconds, EXIT_POLL_SECONDS)
    for group in kill:
        signal_group(group, signal.SIGKILL)
    return Teardown(drained, wait_for(gone, KILL_REAP_SECONDS, EXIT_POLL_SECONDS))


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
        wait_for(lambda pid=pid: not is_running(pid, None), KILL_REAP_SECONDS, EXIT_POLL_SECONDS)
    return pids


# --------------------------------------------------------------------------------------------
# Ports and waiting
# --------------------------------------------------------------------------------------------


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
