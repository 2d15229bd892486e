"""What a trial must find once its recovery run is over, and the process accounting it needs.

Every process a rollout starts descends from the chaos run: it makes itself the child
subreaper, so a release, a router or a temporary Prefect server orphaned by a killed
orchestrator is re-parented to it rather than to init. "Nothing else running" is then exact:
every live descendant is the stable release's supervisor or engine, the router, or theirs.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from dev.chaos_world import World
from dev.load import Result
from serving.config.layout import SENTINEL_NAME
from serving.control.router_client import RouterAdminError
from serving.core.procs import Stat, all_stats
from serving.domain.records import ReleaseRecord
from serving.platforms.local.inventory import Owner
from serving.platforms.local.router_process import ROUTER_RECORD, LocalRouter
from serving.platforms.local.routes import FileRouteStore
from serving.weights.models import INCOMPLETE_SUFFIX

PR_SET_CHILD_SUBREAPER = 36
FULL_WEIGHT = 100
# The one cause of a failed client request a rollout may show: the one serving release down,
# nothing else to send to, and the router saying so at once.
ACCEPTABLE_CAUSE = "503+Retry-After"
ARGV_CHARS = 90


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str = ""


# -- processes ---------------------------------------------------------------------------------


def become_subreaper() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def reap_orphans() -> None:
    """Orphans re-parented here that exited: reaped, so they do not linger as zombies. Called
    only while no orchestrator runs: one that exited unwaited would lose its exit code."""
    mine = os.getpid()
    for stat in all_stats():
        if stat.ppid == mine and not stat.runs:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(stat.pid, os.WNOHANG)


def descendants() -> dict[int, Stat]:
    """Every running process below this one."""
    stats = {stat.pid: stat for stat in all_stats() if stat.runs}
    found: dict[int, Stat] = {}
    frontier = [os.getpid()]
    while frontier:
        parent = frontier.pop()
        for stat in stats.values():
            if stat.ppid == parent and stat.pid not in found:
                found[stat.pid] = stat
                frontier.append(stat.pid)
    return found


def _with_descendants(roots: set[int], tree: dict[int, Stat]) -> set[int]:
    allowed = set(roots)
    grew = True
    while grew:
        more = {pid for pid, stat in tree.items() if stat.ppid in allowed} - allowed
        allowed |= more
        grew = bool(more)
    return allowed


def argv_of(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "(gone)"
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()[:ARGV_CHARS]


def kill_leftovers(pids: Iterable[int]) -> None:
    """SIGKILL what a trial left behind (after it was counted), its group with it unless
    that is this run's own group: the next trial starts clean."""
    own_group = os.getpgrp()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            group = os.getpgid(pid)
            if group != own_group:
                os.killpg(group, signal.SIGKILL)
            else:
                os.kill(pid, signal.SIGKILL)


# -- the invariants ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    checks: list[Check]
    leftovers: list[int]

    @property
    def ok(self) -> bool:
        return all(check.ok for check in self.checks)


def check(world: World, interrupted_run: str | None) -> Verdict:
    """`interrupted_run`: the flow run the fault was fired at, None if it never began."""
    record = world.platform.release_store().read(world.profile.name)
    processes, leftovers = _processes(world, record)
    checks = [
        _no_canary(record),
        _router_matches(world, record),
        processes,
        _downloads(world),
        _history(record, interrupted_run),
    ]
    return Verdict(checks, leftovers)


def _no_canary(record: ReleaseRecord) -> Check:
    if record.canary is not None:
        return Check("no canary", False, f"canary {record.canary.id} still recorded")
    if record.stable is None:
        return Check("no canary", False, "no stable release recorded")
    return Check("no canary", True)


def _router_matches(world: World, record: ReleaseRecord) -> Check:
    """The live router's table and the route store both say: the stable release, 100%."""
    name = "router = record"
    want = {record.stable.id: FULL_WEIGHT} if record.stable else {}
    model = world.profile.served_model_name
    router = world.platform.inventory.get(ROUTER_RECORD)
    if router is None:
        return Check(name, False, "no router recorded")
    local = LocalRouter(world.home, router.port, world.platform.inventory, Owner.current(),
                        keep=False)  # fmt: skip
    try:
        live = local.client().routes().weights(model)
    except RouterAdminError as exc:
        return Check(name, False, f"router does not answer: {exc}")
    stored = {b.name: b.weight for b in FileRouteStore(local.routes_file).table().models.get(
        model, [])}  # fmt: skip
    if live != want or stored != want:
        return Check(name, False, f"record {want}, router {live}, store {stored}")
    return Check(name, True)


def _processes(world: World, record: ReleaseRecord) -> tuple[Check, list[int]]:
    """Exactly the stable release (supervisor and engine) and the router run, and nothing
    else any run started."""
    name = "processes"
    problems: list[str] = []
    wanted = {ROUTER_RECORD} | ({record.stable.id} if record.stable else set())
    records = {r.name: r for r in world.platform.inventory.records()}
    if extra := sorted(set(records) - wanted):
        problems.append(f"also recorded: {', '.join(extra)}")
    roots: set[int] = set()
    for wanted_name in sorted(wanted):
        found = records.get(wanted_name)
        if found is None or not found.running():
            problems.append(f"{wanted_name} not running")
            continue
        roots |= {found.pid} | ({found.engine_pid} if found.engine_pid else set())
    tree = descendants()
    leftovers = sorted(set(tree) - _with_descendants(roots, tree))
    problems += [f"left running: {pid} {argv_of(pid)}" for pid in leftovers]
    return Check(name, not problems, "; ".join(problems)), leftovers


def _downloads(world: World) -> Check:
    """Every revision directory of the weights volume is complete (its sentinel), and no
    partial file of an interrupted download is left."""
    problems = []
    for revision in world.revisions:
        directory = world.weights(revision)
        if directory.exists() and not (directory / SENTINEL_NAME).is_file():
            problems.append(f"{revision[:8]} has no sentinel")
    root = world.weights_root()
    partials = list(root.rglob(f"*{INCOMPLETE_SUFFIX}")) if root.is_dir() else []
    if partials:
        problems.append(f"{len(partials)} partial file(s), e.g. {partials[0].relative_to(root)}")
    return Check("downloads", not problems, "; ".join(problems))


def _history(record: ReleaseRecord, interrupted_run: str | None) -> Check:
    """A line for the interrupted run: its own, its failure hook's, or (SIGKILLed) the one the
    recovery run's reconcile writes for it."""
    if interrupted_run is None:
        return Check("history", True, "its flow never began")
    if record.recorded(interrupted_run):
        return Check("history", True)
    return Check("history", False, f"no line for the interrupted flow run {interrupted_run}")


def failure_causes(results: Iterable[Result]) -> Counter[str]:
    causes: Counter[str] = Counter()
    for result in results:
        if result.ok:
            continue
        if result.status == 503 and result.retry_after:
            causes[ACCEPTABLE_CAUSE] += 1
        elif result.status:
            causes[f"HTTP {result.status}"] += 1
        else:
            causes[result.error or "no answer"] += 1
    return causes


def clients_check(causes: Counter[str]) -> Check:
    bad = {cause: count for cause, count in causes.items() if cause != ACCEPTABLE_CAUSE}
    detail = ", ".join(f"{count} {cause}" for cause, count in sorted(bad.items()))
    return Check("clients", not bad, detail)
