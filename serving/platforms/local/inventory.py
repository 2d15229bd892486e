"""What the local platform started: one record per long-running process, so a later run can
find, adopt or stop it."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ValidationError

from serving.core.files import write_atomically
from serving.core.procs import group_members, is_running, start_ticks
from serving.domain.release import Release
from serving.platforms.local.release_events import current_engine, events_path

RECORD_SUFFIX = ".json"
ProcessKind = Literal["release", "router"]


class Owner(BaseModel):
    """The orchestrator process that started a record's process."""

    pid: int
    ticks: int | None

    @classmethod
    def current(cls) -> Owner:
        return cls(pid=os.getpid(), ticks=start_ticks(os.getpid()))

    def alive(self) -> bool:
        return is_running(self.pid, self.ticks)


class ProcessRecord(BaseModel):
    """One running process of the local platform, as $ROLLOUT_HOME/state/processes/<name>.json."""

    kind: ProcessKind
    name: str  # the release id, or "router"
    pid: int
    pgid: int
    ticks: int | None
    port: int
    owner: Owner
    keep: bool = False
    log: str
    release_id: str | None = None
    model: str | None = None  # profile name
    route: str | None = None  # the router's model key: the profile's served_model_name
    revision: str | None = None
    # Set once the release is ready, and to each restarted engine: the engine runs in its own
    # session, so stopping the supervisor's group alone could leave it behind.
    engine_pid: int | None = None
    engine_ticks: int | None = None
    release: Release | None = None

    def running(self) -> bool:
        """The process runs. A release's supervisor restarts a crashed engine and exits once
        it gives up, so its own life is the release's, as a container's on Modal."""
        return is_running(self.pid, self.ticks)

    def orphaned(self) -> bool:
        return not self.keep and not self.owner.alive()

    def extra_groups(self) -> set[int]:
        if self.kind == "router":
            # A router outlives a SIGKILLed keeper in the keeper's group, still on the port.
            return {self.pgid} if group_members(self.pgid) else set()
        engine_alive = self.engine_pid is not None and is_running(
            self.engine_pid, self.engine_ticks
        )
        return {self.engine_pid} if engine_alive and self.engine_pid is not None else set()


class Inventory:
    """The records of one ROLLOUT_HOME, one JSON file each, replaced atomically."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def _path(self, name: str) -> Path:
        return self.directory / f"{name}{RECORD_SUFFIX}"

    def write(self, record: ProcessRecord) -> None:
        write_atomically(self._path(record.name), record.model_dump_json(indent=1))

    def get(self, name: str) -> ProcessRecord | None:
        try:
            record = ProcessRecord.model_validate_json(self._path(name).read_text())
        except FileNotFoundError:
            return None
        except ValidationError:
            return None  # a record from another version of this code: not ours to manage
        return _with_current_engine(record)

    def remove(self, name: str) -> None:
        self._path(name).unlink(missing_ok=True)

    def records(self) -> Iterator[ProcessRecord]:
        if not self.directory.is_dir():
            return
        for path in sorted(self.directory.glob(f"*{RECORD_SUFFIX}")):
            record = self.get(path.name.removesuffix(RECORD_SUFFIX))
            if record is not None:
                yield record



def _with_current_engine(record: ProcessRecord) -> ProcessRecord:
    """A release's record names the engine its supervisor last reported ready: a restart
    starts another one, which the record written at deploy cannot know."""
    if record.kind != "release" or record.engine_pid is None:
        return record
    engine = current_engine(events_path(Path(record.log).parent, record.name))
    if engine is None or engine == record.engine_pid:
        return record
    return record.model_copy(update={"engine_pid": engine, "engine_ticks": start_ticks(engine)})
