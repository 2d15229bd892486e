"""The chaos run's faults: one per trial, fired at a chosen moment of a running rollout.

A fault whose target does not exist at its moment waits for it while the rollout runs (a canary
engine killed "during resolve" dies as soon as it exists); one whose rollout ended first has
missed, and the trial says so.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from dev.chaos_world import World
from dev.mirror_faults import CutFault
from dev.tmpfs import in_tiny_tmpfs
from serving.core.procs import is_running, read_stat
from serving.domain.release import release_id

FaultKind = Literal[
    "orchestrator-sigkill",
    "orchestrator-sigterm",
    "router-sigkill",
    "stable-engine-sigkill",
    "canary-engine-sigkill",
    "mirror-cut",
    "disk-full",
]
FAULT_KINDS: tuple[FaultKind, ...] = (
    "orchestrator-sigkill", "orchestrator-sigterm", "router-sigkill", "stable-engine-sigkill",
    "canary-engine-sigkill", "mirror-cut", "disk-full",
)  # fmt: skip

MIRROR_CUT_SECONDS = 10.0
POLL_SECONDS = 0.1
# The small filesystem holds one revision's download with this much room: the fault, not the
# size, is what fills it.
TMPFS_HEADROOM = 1.5
TMPFS_MIN_BYTES = 16 * 2**20
FILL_CHUNK = 2**20
FILLER = ".chaos-filler"

Fire = Callable[["Rollout"], str | None]


@dataclass(frozen=True)
class Shot:
    landed: bool
    at: float  # seconds after the rollout's flow began
    note: str


@dataclass
class Rollout:
    """The orchestrator under fire and what the fault needs to know about it."""

    world: World
    process: subprocess.Popen[str]
    started: float  # monotonic: when its flow began
    revision: str  # the canary's

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def ended(self) -> bool:
        return self.process.poll() is not None


def wrap(kind: FaultKind, world: World, argv: list[str]) -> list[str]:
    """The orchestrator's argv for this fault: disk-full runs it over a small weights volume."""
    if kind != "disk-full":
        return argv
    size = max(int(_bytes_under(world.weights(world.revisions[0])) * TMPFS_HEADROOM),
               TMPFS_MIN_BYTES)  # fmt: skip
    return in_tiny_tmpfs(world.weights_root(), size, argv)


def fresh_results(kind: FaultKind, world: World, trial: int) -> dict[str, str]:
    """Disk-full only: a result store of its own, so the download stage is not `Cached` from
    an earlier run and really writes into the small volume."""
    if kind != "disk-full":
        return {}
    return {"PREFECT_LOCAL_STORAGE_PATH": str(world.home / "chaos" / f"results-{trial}")}


def fire(kind: FaultKind, rollout: Rollout, moment: float) -> Shot:
    """Wait for `moment` seconds into the rollout, then fire `kind` (waiting for its target)."""
    while rollout.elapsed() < moment:
        if rollout.ended():
            return Shot(False, rollout.elapsed(), f"the run ended at {rollout.elapsed():.0f}s")
        time.sleep(POLL_SECONDS)
    while True:
        note = _FIRE[kind](rollout)
        if note is not None:
            return Shot(True, rollout.elapsed(), note)
        if rollout.ended():
            return Shot(False, rollout.elapsed(), "no target before the run ended")
        time.sleep(POLL_SECONDS)


# -- the faults: each returns what it did, or None while its target does not exist yet ----------


def _orchestrator(signum: signal.Signals) -> Fire:
    def send(rollout: Rollout) -> str | None:
        if rollout.ended():
            return None
        rollout.process.send_signal(signum)
        return f"{signum.name} to pid {rollout.process.pid}"

    return send


def _router(rollout: Rollout) -> str | None:
    """The router process itself, not its keeper (which restarts it, as Modal replaces a dead
    router container)."""
    pid = rollout.world.platform._router().server_pid()
    if pid is None:
        return None
    os.kill(pid, signal.SIGKILL)
    return f"SIGKILL to router pid {pid}"


def _engine(which: Literal["stable", "canary"]) -> Fire:
    def kill(rollout: Rollout) -> str | None:
        world = rollout.world
        if which == "canary":
            name = release_id(world.profile, rollout.revision)
        else:
            stable = world.platform.release_store().read(world.profile.name).stable
            if stable is None:
                return None
            name = stable.id
        pid = _engine_pid(world, name)
        if pid is None:
            return None
        os.kill(pid, signal.SIGKILL)
        return f"SIGKILL to {name}'s engine pid {pid}"

    return kill


def _engine_pid(world: World, name: str) -> int | None:
    """The engine of a release: recorded once it is ready; before, the supervisor's child."""
    record = world.platform.inventory.get(name)
    if record is None or not is_running(record.pid, record.ticks):
        return None
    if record.engine_pid is not None and is_running(record.engine_pid, record.engine_ticks):
        return record.engine_pid
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = read_stat(int(entry.name))
            except OSError:
                continue
            if stat.ppid == record.pid and stat.runs:
                return stat.pid
    return None


def _mirror_cut(rollout: Rollout) -> str:
    mirror = rollout.world.mirror
    mirror.set_faults(cut=CutFault(after_bytes=0))
    threading.Timer(MIRROR_CUT_SECONDS, mirror.clear_faults).start()
    return f"every connection cut for {MIRROR_CUT_SECONDS:g}s"


def mirror_settled(kind: FaultKind, shot: Shot, rollout: Rollout) -> float:
    """Seconds until a mirror cut is over (the recovery run starts after the fault, not in
    it)."""
    if kind != "mirror-cut" or not shot.landed:
        return 0.0
    return max(0.0, shot.at + MIRROR_CUT_SECONDS - rollout.elapsed())


def _disk_full(rollout: Rollout) -> str | None:
    if rollout.ended():
        return None
    # The orchestrator's own view of the filesystem, where the small volume is mounted.
    root = Path(f"/proc/{rollout.process.pid}/root")
    volume = root / rollout.world.weights_root().relative_to("/")
    written = 0
    try:
        with (volume / FILLER).open("wb", buffering=0) as filler:
            chunk = b"\0" * FILL_CHUNK
            while True:
                written += filler.write(chunk)
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            return f"could not fill the volume: {exc.strerror}"
    return f"weights volume filled ({written // 2**20} MiB more)"


_FIRE: dict[FaultKind, Fire] = {
    "orchestrator-sigkill": _orchestrator(signal.SIGKILL),
    "orchestrator-sigterm": _orchestrator(signal.SIGTERM),
    "router-sigkill": _router,
    "stable-engine-sigkill": _engine("stable"),
    "canary-engine-sigkill": _engine("canary"),
    "mirror-cut": _mirror_cut,
    "disk-full": _disk_full,
}


def _bytes_under(directory: Path) -> int:
    return sum(path.stat().st_size for path in directory.rglob("*") if path.is_file())
