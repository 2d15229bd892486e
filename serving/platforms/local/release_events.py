"""A local release's events file, `$ROLLOUT_HOME/logs/<release id>.events.jsonl`: what its
supervisor reported (serving.supervisor.events), read back by the local platform."""

from __future__ import annotations

from pathlib import Path

from pydantic import ValidationError

from serving.supervisor.events import ServerEvent

# Each of these means the engine died after it had been ready.
CRASH_EVENTS = frozenset({"restarting", "crashed"})


def events_path(logs: Path, rid: str) -> Path:
    return logs / f"{rid}.events.jsonl"


def read_events(path: Path) -> list[ServerEvent]:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return []
    events = []
    for line in lines:
        try:
            events.append(ServerEvent.model_validate_json(line))
        except ValidationError:
            continue  # a partial last line, or not an event
    return events


def last_event(path: Path) -> ServerEvent | None:
    events = read_events(path)
    return events[-1] if events else None


def crashes_since(path: Path, since: float) -> int:
    """Engine crashes reported at or after `since` (unix time), restarted or not."""
    return sum(event.event in CRASH_EVENTS and event.at >= since for event in read_events(path))


def current_engine(path: Path) -> int | None:
    """The pid of the engine the supervisor last reported ready."""
    ready = [event for event in read_events(path) if event.event == "ready"]
    return ready[-1].engine_pid if ready else None
