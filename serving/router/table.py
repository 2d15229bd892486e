"""The routing table: pydantic only, all that the control plane needs of the router."""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)

MAX_WEIGHT = 100
MAX_PERCENT = 100
# When a shadow copy is sent: once the client has stable's whole answer, or with stable's
# request (serving.router.shadow; bench/shadow.py measures what each costs stable).
ShadowSend = Literal["after", "parallel"]
DEFAULT_SHADOW_SEND: ShadowSend = "after"


class ShadowCopy(BaseModel):
    """A backend's shadow: copies of `percent` of its model's chat requests answered by another
    backend, compared and dropped (serving.router.shadow); at most `max_in_flight` at once,
    each sent as `send` says."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    percent: float = Field(gt=0, le=MAX_PERCENT)
    max_in_flight: int = Field(ge=1)
    send: ShadowSend = DEFAULT_SHADOW_SEND


class Backend(BaseModel):
    """One release of a model behind the router."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200, description="release id")
    url: str = Field(description="base URL, e.g. http://127.0.0.1:30000")
    weight: int = Field(ge=0, le=MAX_WEIGHT)
    # Sent to the backend as Bearer; never logged, never returned by the admin API.
    api_key: SecretStr | None = None
    # Alternative to api_key for files on disk: name of an env var holding the key.
    api_key_env: str | None = None
    shadow: ShadowCopy | None = None

    @field_validator("url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        if not url.startswith(("http://", "https://")):
            raise ValueError("backend url must start with http:// or https://")
        return url.rstrip("/")

    def resolved_api_key(self) -> str | None:
        if self.api_key is not None:
            return self.api_key.get_secret_value()
        if self.api_key_env:
            return os.environ.get(self.api_key_env) or None
        return None

    def public(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "url": self.url,
            "weight": self.weight,
            "has_api_key": self.api_key is not None or bool(self.api_key_env),
            "shadow": self.shadow.model_dump() if self.shadow is not None else None,
        }


class RoutingTable(BaseModel):
    """Model name -> its backends. Weights are relative; they need not sum to 100."""

    model_config = ConfigDict(extra="forbid")

    models: dict[str, list[Backend]] = Field(default_factory=dict)
    # Rises with every change the control plane writes. The router ignores a table older than
    # the one it has, whether a poll of the store or an admin push brought it: a poll that
    # read the store just before a change must not undo the change once it has been pushed.
    generation: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _unique_names(self) -> RoutingTable:
        for model, backends in self.models.items():
            _check_unique(model, backends)
        return self

    def public(self) -> dict[str, Any]:
        return {
            "generation": self.generation,
            "models": {m: [b.public() for b in bs] for m, bs in self.models.items()},
        }

    def with_backends(self, model: str, backends: list[Backend]) -> RoutingTable:
        """The next generation of this table, with `model` routed to `backends` (no backends
        removes the model)."""
        models = {name: list(entries) for name, entries in self.models.items()}
        if backends:
            models[model] = backends
        else:
            models.pop(model, None)
        return RoutingTable(models=models, generation=self.generation + 1)

    def weights(self, model: str) -> dict[str, int]:
        return {backend.name: backend.weight for backend in self.models.get(model, [])}


def _check_unique(model: str, backends: list[Backend]) -> None:
    names = [b.name for b in backends]
    if len(names) != len(set(names)):
        raise ValueError(f"duplicate backend names for model {model!r}")
    if sum(b.shadow is not None for b in backends) > 1:
        raise ValueError(f"more than one shadow backend for model {model!r}")

