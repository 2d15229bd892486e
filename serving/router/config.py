"""The router's settings: timeouts, pool sizes, secrets and where the routing table comes from."""

from __future__ import annotations

from collections.abc import Callable

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from serving.router.measurements import DEFAULT_RETENTION_S
from serving.router.slices import Published
from serving.router.table import RoutingTable

DEFAULT_CONNECT_TIMEOUT_S = 3.0
# A non-streamed completion sends its first byte only when generation ends.
DEFAULT_FIRST_BYTE_TIMEOUT_S = 300.0
DEFAULT_TOTAL_TIMEOUT_S = 1800.0
DEFAULT_POLL_INTERVAL_S = 1.0
# serving.router.replicas judges a replica gone after STALE_AFTER_SECONDS without a snapshot.
DEFAULT_PUBLISH_INTERVAL_S = 1.0
DEFAULT_MAX_CONNECTIONS = 1024
DEFAULT_MAX_KEEPALIVE = 512


class RouterConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    # SecretStr accepts a plain str and keeps it out of reprs and logs.
    admin_token: SecretStr | None = None
    client_api_key: SecretStr | None = None
    connect_timeout_s: float = Field(default=DEFAULT_CONNECT_TIMEOUT_S, gt=0)
    # Also bounds each idle gap between chunks of a stream (read timeout); the total
    # deadline bounds the whole request including retry.
    first_byte_timeout_s: float = Field(default=DEFAULT_FIRST_BYTE_TIMEOUT_S, gt=0)
    total_timeout_s: float = Field(default=DEFAULT_TOTAL_TIMEOUT_S, gt=0)
    retention_s: float = Field(default=DEFAULT_RETENTION_S, gt=0)
    # Called in a worker thread every poll_interval_s; None means "no change".
    routing_poll: Callable[[], RoutingTable | None] | None = None
    poll_interval_s: float = Field(default=DEFAULT_POLL_INTERVAL_S, gt=0)
    # Called in a worker thread every publish_interval_s, and once more as the router stops,
    # with what changed of this replica's measurements (serving.router.slices.Published): the
    # platform stores it where the orchestrator merges every replica's. None: not published.
    stats_publish: Callable[[Published], None] | None = None
    publish_interval_s: float = Field(default=DEFAULT_PUBLISH_INTERVAL_S, gt=0)
    # per backend origin
    max_connections: int = Field(default=DEFAULT_MAX_CONNECTIONS, gt=0)
    max_keepalive_connections: int = Field(default=DEFAULT_MAX_KEEPALIVE, gt=0)
