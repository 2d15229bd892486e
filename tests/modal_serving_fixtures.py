"""What the Modal serving tests share: release weights on a fake volume, the FAKE engine as a
release's engine, and the secrets a container would get (registered in conftest.py)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from serving.config.layout import weights_dir
from serving.config.profile import Profile
from serving.core.procs import free_port
from serving.engines.sglang import Command
from serving.platforms.modal import resources, server_bodies
from serving.router.table import RoutingTable
from serving.supervisor.supervisor import Supervisor
from serving.weights.download import write_sentinel
from serving.weights.models import Manifest
from tests.modal_fixtures import serving_profile
from tests.server_fixtures import fake_command

REV_A = "aaaaaaaa" + "0" * 32
REV_B = "bbbbbbbb" + "1" * 32
API_KEY = "sk-test-SECRET-engine-key-123456"
ADMIN_TOKEN = "admin-SECRET-token-abcdef"
# The FAKE engine streams this many chunks this far apart: a request that is in flight for a
# while, for the drain tests.
STREAM_CHUNKS = 6
STREAM_INTERVAL_S = 0.25



def verified_profile(tmp_path: Path, *, snapshot: bool, api_key: bool) -> Profile:
    """qwen3-8b for the FAKE engine, with verified weights of REV_A under tmp_path/weights."""
    profile = serving_profile(snapshot=snapshot, api_key=api_key)
    write_verified_weights(tmp_path / "weights", profile, REV_A)
    return profile


def write_verified_weights(root: Path, profile: Profile, revision: str) -> Path:
    directory = weights_dir(root, profile, revision)
    directory.mkdir(parents=True, exist_ok=True)
    moment = datetime(2026, 11, 1, tzinfo=UTC)
    manifest = Manifest(
        repo=profile.hub.repo, revision=revision, files=[], bytes_total=0,
        started_at=moment, finished_at=moment,
    )  # fmt: skip
    write_sentinel(directory, manifest)
    return directory


class FakeVolume:
    def __init__(self) -> None:
        self.reloads = 0

    def reload(self) -> None:
        self.reloads += 1

    def commit(self) -> None:
        raise AssertionError("a release never commits its read-only volumes")


class FakeEngineBuilder:
    """Stands in for serving.engine.engine_command: records what the body asked for and
    returns the FAKE engine's command line on the same port."""

    def __init__(self, record: Path) -> None:
        self.record = record
        self.calls: list[dict[str, Any]] = []

    def __call__(self, profile: Profile, **kwargs: Any) -> Command:
        self.calls.append(kwargs)
        return fake_command(
            "--port", str(kwargs["port"]), "--record", str(self.record),
            "--stream-chunks", str(STREAM_CHUNKS), "--stream-interval", str(STREAM_INTERVAL_S),
        )  # fmt: skip


def engine_requests(record: Path) -> list[str]:
    if not record.exists():
        return []
    return [json.loads(line)["path"] for line in record.read_text().splitlines()]


@pytest.fixture
def admin_token(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv(resources.ROUTER_ADMIN_TOKEN_ENV, ADMIN_TOKEN)
    return ADMIN_TOKEN


@pytest.fixture
def api_key(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv(resources.API_KEY_ENV, API_KEY)
    return API_KEY


@pytest.fixture
def started() -> Iterator[list[Supervisor]]:
    """Supervisors a test started, stopped at teardown even when it fails."""
    supervisors: list[Supervisor] = []
    yield supervisors
    for supervisor in supervisors:
        supervisor.stop(drain_seconds=0)


def start_fake_release(
    profile: Profile, revision: str, tmp_path: Path, **options: Any
) -> tuple[Supervisor, FakeEngineBuilder, FakeVolume]:
    builder = FakeEngineBuilder(tmp_path / f"engine-{revision[:8]}.jsonl")
    volume = FakeVolume()
    options.setdefault("on_crash", lambda failure: None)
    supervisor = server_bodies.start_release(
        profile,
        revision,
        weights_root=tmp_path / "weights",
        deepgemm_root=tmp_path / "deepgemm",
        volumes=[volume],
        private_dir=tmp_path / f"private-{revision[:8]}",
        api_key=options.pop("api_key", None),
        port=free_port(),
        bind_host="127.0.0.1",
        build_command=builder,
        **options,
    )
    return supervisor, builder, volume


def weights_of(table: RoutingTable | None, profile: Profile) -> dict[str, int]:
    assert table is not None
    return {b.name: b.weight for b in table.models.get(profile.served_model_name, [])}
