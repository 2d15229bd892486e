"""Routing control, written once for both platforms: what a change of a model's routes is, and
how it reaches the router.

A change is a read-modify-write of the whole RoutingTable in the platform's RouteStore (the
routes file locally, the model's modal.Dict on Modal). The store is the router's source of
truth across restarts, and every write carries the next generation. The same table is then
pushed (PUT /admin/routes) so it applies at once, and the router's answer decides:

- it serves our generation with our weights for the model: applied;
- it holds a newer generation (409, or a 200 after someone else's push): a newer change won,
  which read the store after ours: fine;
- it cannot be asked (no admin token here, no answer): pending. Both routers re-read their
  store every second, so this is logged, not raised: raising would fail a rollback exactly
  while the router restarts. Whoever must know when it applies (a drain) waits
  PROPAGATION_SECONDS first;
- anything else (a refusal, other weights at our generation): RoutesNotApplied.

The router ignores a table older than the one it has, so a poll that read the store just before
a change cannot undo it once the push landed: there is nothing to read back or push again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from enum import StrEnum
from typing import Protocol

from serving.config.profile import Profile, Shadow
from serving.control.router_client import (
    PushAnswer,
    RouterAdminError,
    RouterClient,
    RouterUnreachable,
)
from serving.domain.release import Release
from serving.domain.traffic import traffic_plan
from serving.router.table import Backend, RoutingTable, ShadowCopy

logger = logging.getLogger(__name__)

# Both routers re-read their store every second; two intervals cover a read that had just
# begun when the store changed.
PROPAGATION_SECONDS = 2.0

TableChange = Callable[[RoutingTable], RoutingTable]
BackendsChange = Callable[[list[Backend]], list[Backend]]


class RoutesNotApplied(RouterAdminError):
    """The router answered, and serves neither this change nor a newer one."""


class Outcome(StrEnum):
    APPLIED = "applied"
    SUPERSEDED = "superseded"
    PENDING = "pending"


class RouteStore(Protocol):
    """Where a platform keeps the routing table its router polls."""

    def table(self) -> RoutingTable: ...

    def update(self, change: TableChange) -> RoutingTable:
        """`change` applied to the stored table and written as the next generation, under the
        store's lock (see `rewrite`); the table the store holds afterwards."""
        ...


def rewrite(
    read: Callable[[], RoutingTable], write: Callable[[RoutingTable], None], change: TableChange
) -> RoutingTable:
    """The body of every store's `update`, run under its lock: the changed routes written at
    the next generation. A change that changes nothing writes nothing (a re-run then pushes the
    table as it is). Returns the table the store holds afterwards."""
    current = read()
    models = change(current).models
    if models == current.models:
        return current
    following = RoutingTable(models=models, generation=current.generation + 1)
    write(following)
    return following


def release_backend(
    release: Release, weight: int, key_env: str | None, shadow: Shadow | None = None
) -> Backend:
    """A release as the router's backend. The router reads the engine's key from its own
    environment: the store holds the variable's name (`key_env`), never the key."""
    copies = (
        ShadowCopy(percent=shadow.percent, max_in_flight=shadow.max_in_flight, send=shadow.send)
        if shadow else None
    )
    return Backend(name=release.id, url=release.url, weight=weight, api_key_env=key_env,
                   shadow=copies)  # fmt: skip


def traffic_backends(
    profile: Profile,
    weights: dict[str, int],
    running: list[Release],
    key_env: str | None,
    shadow: dict[str, Shadow] | None = None,
) -> list[Backend]:
    """The backends of a traffic step: every running release, at its weight of `weights`, with
    its shadow copies of `shadow` (release id → shadow step), if any; no other has one."""
    return [
        release_backend(release, weight, key_env, (shadow or {}).get(release.id))
        for release, weight in traffic_plan(profile, weights, running)
    ]


def with_backend(backends: list[Backend], backend: Backend) -> list[Backend]:
    """`backend` added, or its URL and key refreshed where it is already routed, keeping the
    weight it has: a re-run of a deploy never takes traffic away from a release."""
    for index, current in enumerate(backends):
        if current.name == backend.name:
            kept = backend.model_copy(update={"weight": current.weight})
            return [*backends[:index], kept, *backends[index + 1 :]]
    return [*backends, backend]


def without_backend(backends: list[Backend], name: str) -> list[Backend]:
    return [backend for backend in backends if backend.name != name]


class ModelRoutes:
    """One model's routes: written to the store, pushed to the router, the answer checked."""

    def __init__(self, store: RouteStore, router: RouterClient, model: str) -> None:
        self.store = store
        self.router = router
        self.model = model

    def weights(self) -> dict[str, int]:
        """The weights the store holds for the model."""
        return self.store.table().weights(self.model)

    def set(self, backends: list[Backend]) -> Outcome:
        return self._change(lambda _current: backends)

    def add(self, backend: Backend) -> Outcome:
        return self._change(lambda current: with_backend(current, backend))

    def unroute(self, name: str) -> Outcome:
        """Out of the table in one update: the router sends it no new request from then on."""
        return self._change(lambda current: without_backend(current, name))

    def take_out(self, name: str) -> Outcome:
        """`unroute` for a retire, which must go on whatever the router says: a release that
        cannot be unrouted still costs money. A refusal is logged and counts as pending."""
        try:
            return self.unroute(name)
        except RouterAdminError as exc:
            logger.warning("%s: routing not updated: %s", name, exc)
            return Outcome.PENDING

    def _change(self, change: BackendsChange) -> Outcome:
        def on_table(table: RoutingTable) -> RoutingTable:
            current = list(table.models.get(self.model, []))
            return table.with_backends(self.model, change(current))

        return self.publish(self.store.update(on_table))

    def publish(self, table: RoutingTable) -> Outcome:
        """Push a table the store holds and check the router's answer (see the module doc)."""
        try:
            answer = self.router.push(table)
        except RouterUnreachable as exc:
            logger.warning(
                "routes of %s (generation %d) not pushed: %s; the router applies them when it "
                "next reads its store", self.model, table.generation, exc,
            )  # fmt: skip
            return Outcome.PENDING
        return self._verdict(table, answer)

    def _verdict(self, table: RoutingTable, answer: PushAnswer) -> Outcome:
        ours = table.weights(self.model)
        if answer.generation > table.generation:
            logger.info("routes of %s: generation %d superseded by %d at the router",
                        self.model, table.generation, answer.generation)  # fmt: skip
            return Outcome.SUPERSEDED
        if (
            answer.routes is not None
            and answer.generation == table.generation
            and answer.routes.weights(self.model) == ours
        ):
            return Outcome.APPLIED
        reported = answer.routes.weights(self.model) if answer.routes is not None else None
        raise RoutesNotApplied(
            f"router at {self.router.url} does not serve the routes of {self.model}: wrote "
            f"generation {table.generation} with {ours}, it reports generation "
            f"{answer.generation} with {reported}"
        )
