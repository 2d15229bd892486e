"""Shared test setup: no test may reach past loopback (no Hub, no Modal API), and the shared
fixtures, registered once here (tests use them by name; helpers are imported as functions)."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterator
from typing import Any

import pytest

pytest_plugins = [  # a module that another imports comes first, so pytest can rewrite it
    "tests.server_fixtures",
    "tests.mirror_fixtures",
    "tests.prefect_fixtures",
    "tests.weights_fixtures",
    "tests.router_fixtures",
    "tests.local_fixtures",
    "tests.modal_serving_fixtures",
    "tests.modal_double.fixtures",
    "tests.flows.synthetic_fixtures",
    "tests.flows.tiny_chat_fixtures",
]

_original_connect = socket.socket.connect


def _is_loopback(address: Any) -> bool:
    if isinstance(address, str | bytes):  # AF_UNIX path
        return True
    host = address[0]
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a hostname that is not localhost: a real network name


def _guarded_connect(self: socket.socket, address: Any) -> Any:
    if not _is_loopback(address):
        raise ConnectionRefusedError(f"tests may not leave loopback (tried {address!r})")
    return _original_connect(self, address)


@pytest.fixture(autouse=True, scope="session")
def _loopback_only() -> Iterator[None]:
    socket.socket.connect = _guarded_connect  # type: ignore[method-assign]
    yield
    socket.socket.connect = _original_connect  # type: ignore[method-assign]
