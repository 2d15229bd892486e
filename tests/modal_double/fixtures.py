"""The `modal_double` fixture: the real modal SDK pointed at a TEST DOUBLE of Modal's API."""

from __future__ import annotations

from collections.abc import Iterator

import modal
import pytest
from modal._utils.async_utils import synchronizer
from modal.client import _Client

from tests.modal_double.server import serve
from tests.modal_double.servicer import ModalDouble


def _forget_client() -> None:
    """modal caches one client per process (from MODAL_SERVER_URL and the token, at first
    use): close it, so the next test's client talks to that test's double."""
    client = _Client._client_from_env
    if client is not None:
        wrapped: modal.Client = synchronizer._translate_out(client)
        wrapped.close()
    _Client._set_env_client(None)


@pytest.fixture
def modal_double(monkeypatch: pytest.MonkeyPatch) -> Iterator[ModalDouble]:
    double = ModalDouble()
    with serve(double) as port:
        monkeypatch.setenv("MODAL_SERVER_URL", f"http://127.0.0.1:{port}")
        monkeypatch.setenv("MODAL_TOKEN_ID", "ak-modal-double")
        monkeypatch.setenv("MODAL_TOKEN_SECRET", "as-modal-double")
        _forget_client()
        try:
            yield double
        finally:
            _forget_client()
    # An RPC reached in the background (a heartbeat, a retry) fails no call: fail the test.
    if double.unimplemented:
        pytest.fail(f"reached RPCs the Modal double does not implement: {double.unimplemented}")
