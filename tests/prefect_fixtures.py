"""A real Prefect server for the session (prefect_test_harness), shared by flow tests
(registered in conftest.py)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from prefect.settings import PREFECT_API_URL
from prefect.testing.utilities import prefect_test_harness


@pytest.fixture(scope="session")
def prefect_server() -> Iterator[str]:
    """The harness's API URL (subprocesses such as the `prefect` CLI need it)."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    with prefect_test_harness(server_startup_timeout=60):
        yield str(PREFECT_API_URL.value())
