"""serving.core.procs against real processes: /proc parsing, and tearing a process group down
(SIGTERM, deadline, SIGKILL, reap) when its leader or a worker ignores SIGTERM."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from serving.core.procs import (
    group_members,
    read_stat,
    start_ticks,
    stop_group,
    wait_for,
)

# A leader that starts one worker in its own group, then reports both pids once both have
# installed their SIGTERM handling. argv: leader's SIGTERM behaviour, worker's ("exit"|"ignore").
GROUP = r"""
import signal, subprocess, sys, time
leader, worker = sys.argv[1], sys.argv[2]
child = subprocess.Popen([sys.executable, "-c",
    "import signal, sys, time\n"
    + ("signal.signal(signal.SIGTERM, signal.SIG_IGN)\n" if worker == "ignore" else "")
    + "print('up', flush=True)\ntime.sleep(600)"], stdout=subprocess.PIPE, text=True)
child.stdout.readline()
if leader == "ignore":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
print(child.pid, flush=True)
time.sleep(600)
"""
# Under a core kept busy, a process may take this long to run its SIGTERM handling.
SLACK_SECONDS = 5.0
TERM_SECONDS = 1.0


def start_group(leader: str, worker: str) -> tuple[subprocess.Popen[str], int]:
    process = subprocess.Popen(
        [sys.executable, "-c", GROUP, leader, worker],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert process.stdout is not None
    worker_pid = int(process.stdout.readline())
    assert group_members(process.pid) == {process.pid, worker_pid}
    return process, worker_pid


def test_read_stat_survives_parentheses_and_spaces_in_the_command_name() -> None:
    name = "a) b (c"
    script = f"open('/proc/self/comm', 'w').write({name!r}); print(1, flush=True); input()"
    child = subprocess.Popen(
        [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        text=True, start_new_session=True,
    )  # fmt: skip
    try:
        assert child.stdout is not None and child.stdout.readline() == "1\n"
        stat = read_stat(child.pid)
        assert (stat.pid, stat.ppid, stat.pgrp) == (child.pid, os.getpid(), child.pid)
        assert stat.runs
        assert stat.start_ticks == start_ticks(child.pid)
        assert stat.start_ticks >= read_stat(os.getpid()).start_ticks  # started after us
    finally:
        child.kill()
        child.wait()


def test_a_zombie_does_not_run() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    # Not reaped: it stays a zombie until wait().
    assert wait_for(lambda: not read_stat(child.pid).runs, 30, 0.05)
    assert start_ticks(child.pid) is None
    assert group_members(os.getpgid(0)) and child.pid not in group_members(os.getpgid(0))
    child.wait()


def test_a_group_that_exits_on_sigterm_drains() -> None:
    process, worker = start_group("exit", "exit")
    started = time.monotonic()
    teardown = stop_group(process, term_seconds=30)
    assert (teardown.drained, teardown.gone) == (True, True)
    assert time.monotonic() - started < SLACK_SECONDS  # not the deadline: it exited
    assert process.returncode == -15
    assert group_members(process.pid) == set()
    assert start_ticks(worker) is None


def test_a_leader_that_ignores_sigterm_is_killed_at_the_deadline() -> None:
    process, worker = start_group("ignore", "ignore")
    started = time.monotonic()
    teardown = stop_group(process, term_seconds=TERM_SECONDS)
    elapsed = time.monotonic() - started
    assert (teardown.drained, teardown.gone) == (False, True)
    assert TERM_SECONDS <= elapsed < TERM_SECONDS + SLACK_SECONDS
    assert process.returncode == -9
    assert group_members(process.pid) == set()
    assert start_ticks(worker) is None


def test_no_worker_outlives_its_leader() -> None:
    # The leader goes at SIGTERM; its worker ignores it and would otherwise run on under init.
    process, worker = start_group("exit", "ignore")
    teardown = stop_group(process, term_seconds=TERM_SECONDS)
    assert (teardown.drained, teardown.gone) == (False, True)
    assert process.returncode == -15
    assert start_ticks(worker) is None
    assert group_members(process.pid) == set()
