"""Header-pinned requests through the real router to FAKE engines, sent by the openai SDK."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from router_fixtures import (
    Proc,
    RouterProc,
    backend,
    configure_engine,
    new_secret,
    start_fake_engine,
    start_router,
)

MODEL = "pinned"
PINNED_REQUESTS = 4
WEIGHTED_REQUESTS = 3


@dataclass
class Dark:
    """A router with a client key and an admin token, stable at 100 and a dark canary at 0."""

    router: RouterProc
    stable: Proc
    canary: Proc

    def client(self) -> openai.OpenAI:
        assert self.router.client_key is not None
        # max_retries=0: the SDK's own retries would hide what the router did
        return openai.OpenAI(api_key=self.router.client_key, base_url=f"{self.router.url}/v1",
                             max_retries=0, timeout=10)

    def pin(self, release: str, token: str | None) -> dict[str, str]:
        headers = {"X-Rollout-Release": release}
        if token is not None:
            headers["X-Rollout-Admin-Token"] = token
        return headers

    def stats(self, since: float, traffic: str) -> dict[str, Any]:
        response = httpx.get(f"{self.router.url}/admin/stats", timeout=5,
                             params={"model": MODEL, "since": since, "traffic": traffic},
                             headers=self.router.admin_headers())
        response.raise_for_status()
        return dict(response.json()["backends"])

    def requests(self, since: float, traffic: str) -> dict[str, int]:
        """Requests per backend since then (a backend measured earlier shows 0)."""
        return {name: backend["requests"] for name, backend in self.stats(since, traffic).items()
                if backend["requests"]}


@pytest.fixture(scope="module")
def dark(log_dir: Path) -> Iterator[Dark]:
    stable = start_fake_engine("smollm2-135m-stab7777", log_dir)
    canary = start_fake_engine("smollm2-135m-dark8888", log_dir)
    router = start_router(log_dir, admin_token=new_secret(), client_key=new_secret())
    try:
        router.put_route(MODEL, [backend(stable, 100), backend(canary, 0)])
        yield Dark(router, stable, canary)
    finally:
        for proc in (router.proc, stable, canary):
            proc.stop()


def _ask(client: openai.OpenAI, headers: dict[str, str] | None = None) -> Any:
    return client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "What is 2+2?"}], max_tokens=8,
        extra_headers=headers)


def test_a_pinned_request_reaches_a_dark_canary_and_is_measured_apart(dark: Dark) -> None:
    client = dark.client()
    assert dark.router.admin_token is not None
    since = time.time()
    for _ in range(WEIGHTED_REQUESTS):
        assert _ask(client).headers["x-rollout-backend"] == dark.stable.name
    for _ in range(PINNED_REQUESTS):
        raw = _ask(client, dark.pin(dark.canary.name, dark.router.admin_token))
        assert raw.headers["x-rollout-backend"] == dark.canary.name
        assert raw.parse().choices[0].message.content
        # the admin token and the pin stop at the router
        seen = raw.headers["x-fake-request-headers"].split(",")
        assert "x-rollout-admin-token" not in seen and "x-rollout-release" not in seen

    # the canary's gate window sees only weighted traffic; pinned traffic is counted apart
    assert dark.requests(since, "weighted") == {dark.stable.name: WEIGHTED_REQUESTS}
    assert dark.requests(since, "pinned") == {dark.canary.name: PINNED_REQUESTS}


def test_pinning_needs_the_admin_token_not_the_client_key(dark: Dark) -> None:
    client = dark.client()
    assert dark.router.admin_token is not None and dark.router.client_key is not None
    since = time.time()
    for token in (None, dark.router.client_key, "not-the-token"):
        with pytest.raises(openai.PermissionDeniedError):
            _ask(client, dark.pin(dark.canary.name, token))
    with pytest.raises(openai.NotFoundError):
        _ask(client, dark.pin("smollm2-135m-nope0000", dark.router.admin_token))
    # the admin token alone is not a client key either
    admin_only = openai.OpenAI(api_key=dark.router.admin_token, max_retries=0,
                               base_url=f"{dark.router.url}/v1")
    with pytest.raises(openai.AuthenticationError):
        _ask(admin_only, dark.pin(dark.canary.name, dark.router.admin_token))
    assert dark.requests(since, "pinned") == {} and dark.requests(since, "weighted") == {}


def test_a_failing_pinned_release_is_not_retried_elsewhere(dark: Dark) -> None:
    client = dark.client()
    assert dark.router.admin_token is not None
    configure_engine(dark.canary, error_rate=1.0, error_status=503)
    try:
        since = time.time()
        with pytest.raises(openai.InternalServerError) as failed:
            _ask(client, dark.pin(dark.canary.name, dark.router.admin_token))
        assert failed.value.status_code == 503
        assert failed.value.response.headers["x-rollout-backend"] == dark.canary.name
    finally:
        configure_engine(dark.canary)
    pinned = dark.stats(since, "pinned")[dark.canary.name]
    assert pinned["errors"]["http_5xx"] == 1 and pinned["errors"]["retried"] == 0
    # stable never served it as a retry, and the canary's weighted record is clean
    assert dark.requests(since, "weighted") == {}


def test_the_admin_token_never_reaches_the_router_log(dark: Dark) -> None:
    assert dark.router.admin_token is not None
    _ask(dark.client(), dark.pin(dark.canary.name, dark.router.admin_token))
    assert dark.router.admin_token not in dark.router.proc.log()


def test_stats_reject_an_unknown_traffic_kind(dark: Dark) -> None:
    response = httpx.get(f"{dark.router.url}/admin/stats", params={"traffic": "shadow"},
                         headers=dark.router.admin_headers(), timeout=5)
    assert response.status_code == 422
