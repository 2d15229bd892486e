"""The `modal_double` fixture: the real modal SDK pointed at a TEST DOUBLE of Modal's API."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import modal
import pytest
from modal._utils.async_utils import synchronizer
from modal.client import _Client

from tests.modal_double.server import serve
from tests.modal_double.servicer import ModalDouble


def forget_client() -> None:
    """modal caches one client per process (from MODAL_SERVER_URL and the token, at first
    use): close it, so the next client talks to the current double, as a new process would."""
    client = _Client._client_from_env
    if client is not None:
        wrapped: modal.Client = synchronizer._translate_out(client)
        wrapped.close()
    _Client._set_env_client(None)


@contextmanager
def _pointed_at_a_double(monkeypatch: pytest.MonkeyPatch) -> Iterator[ModalDouble]:
    double = ModalDouble()
    with serve(double) as port:
        monkeypatch.setenv("MODAL_SERVER_URL", f"http://127.0.0.1:{port}")
        monkeypatch.setenv("MODAL_TOKEN_ID", "ak-modal-double")
        monkeypatch.setenv("MODAL_TOKEN_SECRET", "as-modal-double")
        forget_client()
        try:
            yield double
        finally:
            forget_client()
    # An RPC reached in the background (a heartbeat, a retry) fails no call: fail the test.
    if double.unimplemented:
        pytest.fail(f"reached RPCs the Modal double does not implement: {double.unimplemented}")


@pytest.fixture
def modal_double(monkeypatch: pytest.MonkeyPatch) -> Iterator[ModalDouble]:
    with _pointed_at_a_double(monkeypatch) as double:
        yield double


@pytest.fixture(scope="module")
def module_modal_double() -> Iterator[ModalDouble]:
    """One double for a whole module, where deploying the same Apps for every test would be
    most of the time taken: the module's tests share what it holds."""
    with pytest.MonkeyPatch.context() as monkeypatch, _pointed_at_a_double(monkeypatch) as double:
        yield double
