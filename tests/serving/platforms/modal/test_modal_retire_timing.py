"""ModalPlatform's retire and ask where timing must be exact (drain deadlines, health waits):
the router and the releases are httpx.MockTransport handlers and the clock is fake."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from serving.control.router_client import RouterAdminError
from serving.core.errors import DeployFailed
from serving.domain.release import Release
from serving.platforms.modal import resources, server_bodies
from serving.platforms.modal.platform import ModalPlatform
from serving.router.table import Backend, RoutingTable
from tests.modal_fixtures import FakeClock, FakeDict, serving_profile
from tests.modal_serving_fixtures import REV_A, weights_of

# --------------------------------------------------------------------------------------------
# Exact timing: MockTransport router and releases, fake clock
# --------------------------------------------------------------------------------------------


@dataclass
class MockModal:
    """A gateway whose Apps are URLs answered by `handle` (httpx.MockTransport)."""

    handle: Callable[[httpx.Request], httpx.Response]
    apps: list[str] = field(default_factory=list)
    deployed: list[str] = field(default_factory=list)
    stopped: list[str] = field(default_factory=list)
    dicts: dict[str, FakeDict] = field(default_factory=dict)

    def deploy(self, app: Any) -> None:
        self.deployed.append(str(app.name))
        self.apps.append(str(app.name))

    def deployed_apps(self) -> list[str]:
        return list(self.apps)

    def server_url(self, app_name: str, server_name: str) -> str | None:
        return f"https://{app_name}.modal.test"

    def stop_app(self, app_name: str) -> None:
        self.stopped.append(app_name)
        if app_name in self.apps:
            self.apps.remove(app_name)

    def dict(self, name: str) -> FakeDict:
        return self.dicts.setdefault(name, FakeDict())

    def platform(self, home: Path, clock: FakeClock) -> ModalPlatform:
        return ModalPlatform(
            home, environment="test", gateway=self, sleep=clock.sleep, clock=clock,
            http=httpx.Client(transport=httpx.MockTransport(self.handle)),
        )  # fmt: skip


def router_answer(request: httpx.Request) -> httpx.Response:
    """The router's answer to the admin calls a test does not look at: a pushed table is
    taken (PUT /admin/routes answers with the table it now serves), anything else is a 200."""
    if (request.method, request.url.path) == ("PUT", "/admin/routes"):
        table = RoutingTable.model_validate_json(request.content)
        return httpx.Response(200, json=table.public())
    return httpx.Response(200, json={})


def stats_handler(in_flight: list[int], seen: list[httpx.Request]) -> Callable[..., Any]:
    """The router: in-flight counts of release A, one per stats read (the last repeats)."""

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.path == "/admin/stats":
            count = in_flight.pop(0) if len(in_flight) > 1 else in_flight[0]
            backends = {"qwen3-8b-aaaaaaaa": {"in_flight": count}}
            return httpx.Response(200, json={"model": "qwen3-8b", "backends": backends})
        return router_answer(request)

    return handle


def release_a() -> Release:
    return Release(
        model="qwen3-8b", revision=REV_A, id="qwen3-8b-aaaaaaaa",
        url="https://qwen3-8b-aaaaaaaa.modal.test", deployed_at=datetime(2026, 11, 1, tzinfo=UTC),
    )  # fmt: skip


def test_retire_stops_the_app_once_the_router_counts_nothing_in_flight(
    tmp_path: Path, admin_token: str
) -> None:
    profile = serving_profile(snapshot=False, api_key=False)
    seen: list[httpx.Request] = []
    modal = MockModal(stats_handler([2, 1, 0], seen), apps=["qwen3-8b-router", "qwen3-8b-aaaaaaaa"])
    routed = RoutingTable(models={"qwen3-8b": [Backend(name="qwen3-8b-aaaaaaaa", weight=100,
                                                       url=release_a().url)]})  # fmt: skip
    modal.dict("qwen3-8b-routes").put(resources.ROUTES_KEY, routed.model_dump_json())
    clock = FakeClock()

    modal.platform(tmp_path, clock).retire(profile, release_a(), drain_seconds=60)

    stats_reads = [r for r in seen if r.url.path == "/admin/stats"]
    assert len(stats_reads) == 3
    assert all(r.headers["authorization"] == f"Bearer {admin_token}" for r in seen)
    # Out of routing before anything else: the whole table pushed, without the release.
    assert (seen[0].method, seen[0].url.path) == ("PUT", "/admin/routes")
    assert "qwen3-8b-aaaaaaaa" not in seen[0].content.decode()
    assert modal.stopped == ["qwen3-8b-aaaaaaaa"]
    assert sum(clock.sleeps) < 60


def test_ask_goes_through_the_router_admin_api_to_the_named_release(
    tmp_path: Path, admin_token: str
) -> None:
    seen: list[httpx.Request] = []

    def router(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"choices": [{"message": {"content": "Paris"}}]})

    profile = serving_profile(snapshot=False, api_key=True)
    modal = MockModal(router, apps=["qwen3-8b-router"])
    chat = {"model": "qwen3-8b", "messages": [{"role": "user", "content": "capital?"}]}

    answer = modal.platform(tmp_path, FakeClock()).ask(profile, "qwen3-8b-aaaaaaaa", chat, 5.0)

    assert answer["choices"][0]["message"]["content"] == "Paris"
    [request] = seen
    assert (request.method, request.url.path) == ("POST", "/admin/ask/qwen3-8b-aaaaaaaa")
    assert request.headers["authorization"] == f"Bearer {admin_token}"  # never the API key
    assert json.loads(request.content) == chat


def test_retire_stops_at_the_deadline_when_requests_do_not_finish(
    tmp_path: Path, admin_token: str, caplog: pytest.LogCaptureFixture
) -> None:
    profile = serving_profile(snapshot=False, api_key=False)
    modal = MockModal(stats_handler([3], []), apps=["qwen3-8b-router", "qwen3-8b-aaaaaaaa"])
    clock = FakeClock()
    with caplog.at_level(logging.WARNING):
        modal.platform(tmp_path, clock).retire(profile, release_a(), drain_seconds=10)
    assert modal.stopped == ["qwen3-8b-aaaaaaaa"]
    assert sum(clock.sleeps) == pytest.approx(10)
    assert "3 requests still in flight at the drain deadline" in caplog.text
    assert admin_token not in caplog.text


def test_without_the_admin_token_routing_still_moves_and_retire_waits_out_the_deadline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv(resources.ROUTER_ADMIN_TOKEN_ENV, raising=False)
    profile = serving_profile(snapshot=False, api_key=False)
    seen: list[httpx.Request] = []
    modal = MockModal(stats_handler([0], seen), apps=["qwen3-8b-router", "qwen3-8b-aaaaaaaa"])
    clock = FakeClock()
    platform = modal.platform(tmp_path, clock)

    platform.set_traffic(profile, {"qwen3-8b-aaaaaaaa": 100})
    assert weights_of(server_bodies.routes_poll(modal.dict("qwen3-8b-routes"))(), profile) == {
        "qwen3-8b-aaaaaaaa": 100
    }
    with pytest.raises(RouterAdminError, match="ROUTER_ADMIN_TOKEN is not set"):
        platform.stats(profile, since=0)
    with caplog.at_level(logging.WARNING):
        platform.retire(profile, release_a(), drain_seconds=20)

    assert seen == []  # nothing sent without the token
    assert sum(clock.sleeps) == pytest.approx(20)  # unknown in-flight: the whole deadline
    assert modal.stopped == ["qwen3-8b-aaaaaaaa"]
    assert "in-flight requests unknown" in caplog.text


def test_a_release_that_never_gets_healthy_is_stopped_and_fails_the_deploy(
    tmp_path: Path, admin_token: str
) -> None:
    profile = serving_profile(snapshot=False, api_key=False)
    health: list[str] = []

    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/health":
            health.append(request.url.host)
            return httpx.Response(503)  # Modal's answer while no container is up
        return router_answer(request)

    modal = MockModal(handle, apps=["qwen3-8b-router"])
    clock = FakeClock()
    with pytest.raises(DeployFailed, match=r"not healthy .* within 630 s \(last: HTTP 503\)"):
        modal.platform(tmp_path, clock).deploy(profile, REV_A)
    assert modal.deployed == ["qwen3-8b-aaaaaaaa"]  # the running router was not redeployed
    assert modal.stopped == ["qwen3-8b-aaaaaaaa"]  # no GPU left running
    assert set(health) == {"qwen3-8b-aaaaaaaa.modal.test"} and len(health) > 1
    assert (
        weights_of(
            server_bodies.routes_poll(modal.dict("qwen3-8b-routes"))() or RoutingTable(), profile
        )
        == {}
    )


def test_deploy_waits_through_cold_start_answers(tmp_path: Path, admin_token: str) -> None:
    profile = serving_profile(snapshot=False, api_key=False)
    answers = [httpx.ConnectTimeout("cold"), httpx.Response(503), httpx.Response(200)]

    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/health":
            answer = answers.pop(0)
            if isinstance(answer, Exception):
                raise answer
            return answer
        return router_answer(request)

    modal = MockModal(handle)
    release = modal.platform(tmp_path, FakeClock()).deploy(profile, REV_A)
    assert modal.deployed == ["qwen3-8b-router", "qwen3-8b-aaaaaaaa"] and answers == []
    assert release.url == "https://qwen3-8b-aaaaaaaa.modal.test"
    assert modal.stopped == []


def test_refs_are_refused_before_anything_is_deployed(tmp_path: Path) -> None:
    modal = MockModal(lambda request: httpx.Response(500))
    with pytest.raises(Exception, match="must be resolved"):
        modal.platform(tmp_path, FakeClock()).deploy(
            serving_profile(snapshot=False, api_key=False), "main"
        )
    assert modal.deployed == []
