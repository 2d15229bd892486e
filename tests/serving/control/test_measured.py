"""How the orchestrator reads N router replicas (serving.control.measured): it waits for every
replica still publishing to publish past the question, not for one that is gone; it counts
their in-flight requests together; and a push that reached one of several replicas is not yet
applied everywhere. Snapshots are real ones (Measurements.snapshot), on a clock that moves only
when the code waits."""

from __future__ import annotations

from collections.abc import Callable

from serving.control.measured import Replicas
from serving.control.router_client import RouterClient
from serving.control.routes import Outcome
from serving.router.measurements import Measurements
from serving.router.replicas import STALE_AFTER_SECONDS, Head
from tests.modal_fixtures import FakeClock

MODEL, BACKEND = "m", "canary"
# Never asked: every replica here publishes, so the admin API is not the fallback.
UNASKED = RouterClient("http://127.0.0.1:9", lambda: "unused")


class Store:
    """A StatsStore in memory, as the directory or the Dict holds what replicas publish."""

    def __init__(self) -> None:
        self.heads_by_replica: dict[str, bytes] = {}

    def heads(self) -> dict[str, bytes]:
        return dict(self.heads_by_replica)

    def chunk(self, replica: str, chunk: int) -> bytes | None:
        return None  # in-flight counts and routing need heads only

    def forget(self, replica: str, chunks: list[int]) -> None:
        self.heads_by_replica.pop(replica, None)


def publish(store: Store, replica: str, measurements: Measurements, at: float) -> None:
    head = Head.model_validate_json(measurements.publication(replica).encode().head)
    head.published_at = at
    store.heads_by_replica[replica] = head.model_dump_json().encode()


def busy(requests: int, started_at: float) -> Measurements:
    measurements = Measurements()
    measurements.started_at = started_at
    for _ in range(requests):
        measurements.started(MODEL, BACKEND)
    return measurements


def replicas_on(clock: FakeClock, store: Store, on_sleep: Callable[[], None]) -> Replicas:
    def sleep(seconds: float) -> None:
        clock.sleep(seconds)
        on_sleep()

    return Replicas(UNASKED, store, clock=clock, sleep=sleep)


def test_in_flight_waits_for_every_live_replica_to_publish_after_the_question() -> None:
    clock, store = FakeClock(), Store()
    first, second = busy(2, clock.now - 60), busy(3, clock.now - 60)
    publish(store, "a", first, clock.now - 0.5)
    publish(store, "b", second, clock.now - 0.5)
    asked = clock.now

    def second_publishes_later() -> None:
        publish(store, "a", first, clock.now)
        if clock.now > asked + 0.5:
            publish(store, "b", second, clock.now)

    replicas = replicas_on(clock, store, second_publishes_later)
    assert replicas.in_flight(MODEL, BACKEND) == 5
    assert asked + 0.5 < clock.now < asked + STALE_AFTER_SECONDS  # it waited for b, no longer


def test_a_replica_silent_for_longer_than_stale_is_gone_and_not_waited_for() -> None:
    clock, store = FakeClock(), Store()
    alive, dead = busy(1, clock.now - 60), busy(4, clock.now - 60)
    publish(store, "alive", alive, clock.now)
    publish(store, "dead", dead, clock.now - STALE_AFTER_SECONDS - 1)
    replicas = replicas_on(clock, store, lambda: None)
    asked = clock.now
    assert replicas.in_flight(MODEL, BACKEND) == 1
    assert clock.now == asked


def test_a_replica_that_stops_publishing_is_waited_for_at_most_stale_seconds() -> None:
    clock, store = FakeClock(), Store()
    alive, hung = busy(1, clock.now - 60), busy(4, clock.now - 60)
    publish(store, "hung", hung, clock.now - 0.5)
    replicas = replicas_on(clock, store, lambda: publish(store, "alive", alive, clock.now))
    publish(store, "alive", alive, clock.now)
    asked = clock.now
    assert replicas.in_flight(MODEL, BACKEND) == 1  # its requests died with it
    assert asked + STALE_AFTER_SECONDS <= clock.now <= asked + STALE_AFTER_SECONDS + 1


def test_a_push_to_one_of_several_replicas_is_pending_on_the_others() -> None:
    clock, store = FakeClock(), Store()
    replicas = replicas_on(clock, store, lambda: None)
    publish(store, "a", busy(0, clock.now), clock.now)
    assert replicas.unrouted(Outcome.APPLIED) is Outcome.APPLIED
    publish(store, "b", busy(0, clock.now), clock.now)
    assert replicas.unrouted(Outcome.APPLIED) is Outcome.PENDING
    assert replicas.unrouted(Outcome.SUPERSEDED) is Outcome.PENDING
