"""Publishing, streams and the event store: behaviour every provider shares (the ports in
``outbox/providers/base.py``). Consumer groups: ``test_groups.py``.

See ``conftest.py`` for how a provider joins the suite.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import pytest

from outbox import Event, EventFilter, EventSource, EventStatus, new_event
from outbox.exceptions import EventNotFound, ProviderError
from outbox.providers.base import EventStore, Provider, ProviderStats, StartPosition
from tests.conformance.conftest import Backend, ProviderFactory

pytestmark = pytest.mark.anyio

#: Fields a provider must give back exactly as stored.
FIELDS = (
    "id", "source", "type", "payload", "user_id", "session_id", "instance_id", "schema_name",
    "entity", "entity_id", "operation", "created_at", "meta",
)
T0 = dt.datetime(2030, 1, 2, 3, 4, 5, 123456, tzinfo=dt.UTC)
WAIT = 15.0  # seconds a stream may take to deliver (real brokers over loopback)


def make(type_: str = "test.created", *, offset: float = 0.0, **kwargs: Any) -> Event:
    payload = kwargs.pop("payload", {"n": 1, "nested": {"list": [1, "two", None]}})
    return new_event(
        kwargs.pop("source", EventSource.SYSTEM),
        type_,
        payload,
        created_at=T0 + dt.timedelta(seconds=offset),
        **kwargs,
    )


def same(a: Event, b: Event) -> bool:
    return all(getattr(a, f) == getattr(b, f) for f in FIELDS)


def require(provider: Provider, capability: str) -> None:
    """The test runs only where :data:`~tests.conformance.conftest.CLAIMS` says the provider
    claims ``capability`` (``needs`` marker); the provider must agree."""
    assert getattr(provider.capabilities, capability), f"{provider.name}: {capability}"


def require_store(provider: Provider) -> EventStore:
    """The provider as an event store (tests marked ``needs("store")`` run only on those)."""
    assert isinstance(provider, EventStore), f"{provider.name} keeps no events"
    return provider


# -- stream reading helpers ---------------------------------------------------------------------


class Reader:
    """Collects what a stream delivers, in a task of its own."""

    def __init__(self) -> None:
        self.received: list[Event] = []
        self._arrived = anyio.Event()

    async def run(self, iterator: AsyncIterator[Event]) -> None:
        async for event in iterator:
            self.received.append(event)
            self._arrived.set()
            self._arrived = anyio.Event()

    async def wait_for(self, predicate: Callable[[Event], bool]) -> Event:
        with anyio.fail_after(WAIT):
            while True:
                for event in self.received:
                    if predicate(event):
                        return event
                await self._arrived.wait()

    def ids(self, *, without: str = ".probe") -> list[uuid.UUID]:
        return [e.id for e in self.received if not e.type.endswith(without)]


@contextlib.asynccontextmanager
async def reading(provider: Provider, pattern: str, probe_type: str) -> AsyncIterator[Reader]:
    """A live subscription: yields once a probe event published on it came back.

    Providers may start listening lazily (on the first iteration); the probe handshake makes the
    tests independent of that. Probes are ignored by :meth:`Reader.ids`.
    """
    reader = Reader()
    iterator = provider.stream(pattern)
    async with anyio.create_task_group() as tg:
        tg.start_soon(reader.run, iterator)
        await anyio.wait_all_tasks_blocked()
        with anyio.fail_after(WAIT):
            while True:
                probe = make(probe_type)
                await provider.publish(probe)
                with anyio.move_on_after(0.5):
                    await reader.wait_for(lambda e, p=probe: e.id == p.id)
                    break
        yield reader
        tg.cancel_scope.cancel()
    aclose = getattr(iterator, "aclose", None)
    if aclose is not None:
        await aclose()


# -- store / get ---------------------------------------------------------------------------------


@pytest.mark.needs("store")
async def test_store_then_get_returns_an_equal_event(provider: Provider) -> None:
    store = require_store(provider)
    event = make(user_id=7, session_id="s1", schema_name="public", entity="users", entity_id=42,
                 operation="create", metadata={"trace": {"id": "abc"}})
    await store.store(event)
    got = await store.get(event.id)
    assert got is not None and same(got, event)
    assert got.status == EventStatus.PENDING
    by_text = await store.get(str(event.id))
    assert by_text is not None and by_text.id == event.id


@pytest.mark.needs("store")
async def test_get_of_an_unknown_id_is_none(provider: Provider) -> None:
    assert await require_store(provider).get(uuid.uuid4()) is None


@pytest.mark.needs("store")
async def test_store_is_idempotent_by_id(provider: Provider) -> None:
    store = require_store(provider)
    event = make("test.once")
    await store.store(event)
    await store.store(event)
    await store.store(event.copy())
    assert await store.get(event.id) is not None
    assert [e.id for e in await store.list(EventFilter(type="test.once"))] == [event.id]


@pytest.mark.needs("store")
async def test_events_handed_out_are_copies(provider: Provider) -> None:
    store = require_store(provider)
    event = make(payload={"items": [1, 2]})
    await store.store(event)
    event.payload["items"].append(3)  # the caller keeps mutating its object
    first = await store.get(event.id)
    assert first is not None and first.payload == {"items": [1, 2]}
    first.payload["items"].append(99)
    first.meta["x"] = 1
    again = await store.get(event.id)
    assert again is not None and again.payload == {"items": [1, 2]} and "x" not in again.meta


# -- update_status / delete ----------------------------------------------------------------------


@pytest.mark.needs("store")
async def test_update_status_sets_status_timestamps_and_error(provider: Provider) -> None:
    store = require_store(provider)
    event = make()
    await store.store(event)
    await store.update_status(event.id, EventStatus.PROCESSING)
    processing = await store.get(event.id)
    assert processing is not None and processing.status == "processing"
    assert processing.processed_at is not None and processing.completed_at is None

    await store.update_status(str(event.id), "failed", "handler x: boom")
    failed = await store.get(event.id)
    assert failed is not None and failed.status == "failed"
    assert failed.error == "handler x: boom" and failed.completed_at is not None

    await store.update_status(event.id, EventStatus.PENDING)  # replay
    replayed = await store.get(event.id)
    assert replayed is not None and replayed.status == "pending"
    assert replayed.completed_at is None

    await store.update_status(event.id, EventStatus.COMPLETED)
    done = await store.get(event.id)
    assert done is not None and done.status == "completed" and done.completed_at is not None
    assert done.processed_at is not None and done.processed_at <= done.completed_at

    await store.update_status(event.id, EventStatus.PROCESSING)  # taken up again
    again = await store.get(event.id)
    assert again is not None and again.status == "processing" and again.completed_at is None


@pytest.mark.needs("store")
async def test_update_status_of_unknown_id_or_status(provider: Provider) -> None:
    store = require_store(provider)
    with pytest.raises(EventNotFound):
        await store.update_status(uuid.uuid4(), EventStatus.COMPLETED)
    event = make()
    await store.store(event)
    with pytest.raises((ValueError, ProviderError)):
        await store.update_status(event.id, "sleeping")


@pytest.mark.needs("store")
async def test_delete(provider: Provider) -> None:
    store = require_store(provider)
    event = make()
    await store.store(event)
    await store.delete(event.id)
    assert await store.get(event.id) is None
    with pytest.raises(EventNotFound):
        await store.delete(event.id)


# -- list ----------------------------------------------------------------------------------------


@pytest.fixture
async def history(provider: Provider) -> list[Event]:
    """Six stored events with distinct attributes, created one second apart."""
    store = require_store(provider)
    events = [
        make("public.users.create", offset=0, source="database", user_id="1", session_id="a",
             schema_name="public", entity="users", entity_id="1", operation="create",
             instance_id="api-1"),
        make("public.users.update", offset=1, source="database", user_id="1", session_id="a",
             schema_name="public", entity="users", entity_id="1", operation="update",
             instance_id="api-1"),
        make("public.orders.create", offset=2, source="database", user_id="2", session_id="b",
             schema_name="public", entity="orders", entity_id="9", operation="create",
             instance_id="api-2"),
        make("chat.message", offset=3, source="websocket", user_id="2", instance_id="api-2"),
        make("ui.click", offset=4, source="frontend", instance_id="web"),
        make("system.tick", offset=5, source="system", instance_id="worker"),
    ]
    for e in events:
        await store.store(e)
    await store.update_status(events[1].id, EventStatus.COMPLETED)
    await store.update_status(events[2].id, EventStatus.FAILED, "boom")
    return events


@pytest.mark.parametrize(
    ("filter_", "expected"),
    [
        (EventFilter(), [0, 1, 2, 3, 4, 5]),
        (EventFilter(source="database"), [0, 1, 2]),
        (EventFilter(source=EventSource.WEBSOCKET), [3]),
        (EventFilter(status="completed"), [1]),
        (EventFilter(status=EventStatus.FAILED), [2]),
        (EventFilter(status="pending"), [0, 3, 4, 5]),
        (EventFilter(user_id="2"), [2, 3]),
        (EventFilter(session_id="a"), [0, 1]),
        (EventFilter(instance_id="api-2"), [2, 3]),
        (EventFilter(schema_name="public"), [0, 1, 2]),
        (EventFilter(entity="users", entity_id="1"), [0, 1]),
        (EventFilter(operation="create"), [0, 2]),
        (EventFilter(type="public.*.create"), [0, 2]),
        (EventFilter(type="public.>"), [0, 1, 2]),
        (EventFilter(type="*"), [0, 1, 2, 3, 4, 5]),
        (EventFilter(start_time=T0 + dt.timedelta(seconds=2)), [2, 3, 4, 5]),
        (EventFilter(end_time=T0 + dt.timedelta(seconds=2)), [0, 1]),
        (EventFilter(start_time=T0 + dt.timedelta(seconds=1),
                     end_time=T0 + dt.timedelta(seconds=3)), [1, 2]),
        (EventFilter(source="database", status="pending", user_id="1"), [0]),
        (EventFilter(limit=2), [0, 1]),
        (EventFilter(limit=2, offset=2), [2, 3]),
        (EventFilter(offset=5), [5]),
        (EventFilter(limit=0), []),
        (EventFilter(user_id="nobody"), []),
    ],
    ids=lambda v: repr(v) if isinstance(v, EventFilter) else None,
)
@pytest.mark.needs("store")
async def test_list_filters(
    provider: Provider, history: list[Event], filter_: EventFilter, expected: list[int]
) -> None:
    got = await require_store(provider).list(filter_)
    assert [e.id for e in got] == [history[i].id for i in expected]


@pytest.mark.needs("store")
async def test_list_order_is_stable_for_equal_created_at(provider: Provider) -> None:
    store = require_store(provider)
    events = [make("test.same", offset=0) for _ in range(6)]
    for e in events:
        await store.store(e)
    everything = [e.id for e in await store.list(EventFilter(type="test.same"))]
    assert sorted(everything, key=str) == sorted((e.id for e in events), key=str)
    pages = []
    for offset in range(0, 6, 2):
        page = await store.list(EventFilter(type="test.same", limit=2, offset=offset))
        pages.extend(e.id for e in page)
    assert pages == everything  # pages neither repeat nor skip events


# -- publish and stream --------------------------------------------------------------------------


@pytest.mark.needs("total_order")
async def test_publish_delivers_to_matching_streams(provider: Provider) -> None:
    async with reading(provider, "test.*", "test.probe") as tests, \
            reading(provider, "other.*", "other.probe") as others:
        first = make("test.created")
        second = make("other.created")
        third = make("test.updated")
        for e in (first, second, third):
            await provider.publish(e)
        await tests.wait_for(lambda e: e.id == third.id)
        await others.wait_for(lambda e: e.id == second.id)
        assert tests.ids() == [first.id, third.id]
        assert others.ids() == [second.id]
        delivered = next(e for e in tests.received if e.id == first.id)
        assert same(delivered, first)
    if isinstance(provider, EventStore):  # publishing stores as well
        stored = await provider.get(first.id)
        assert stored is not None and same(stored, first)


@pytest.mark.needs("store", "silent_store")
async def test_store_alone_does_not_deliver(provider: Provider, backend: Backend) -> None:
    store = require_store(provider)
    assert backend.store_is_silent
    async with reading(provider, "test.*", "test.probe") as reader:
        quiet = make("test.stored")
        await store.store(quiet)
        marker = make("test.marker")
        await provider.publish(marker)
        await reader.wait_for(lambda e: e.id == marker.id)
        assert reader.ids() == [marker.id]


async def test_stream_does_not_replay_older_events(provider: Provider) -> None:
    old = make("test.old")
    await provider.publish(old)
    async with reading(provider, "test.*", "test.probe") as reader:
        new = make("test.new")
        await provider.publish(new)
        await reader.wait_for(lambda e: e.id == new.id)
        assert reader.ids() == [new.id]


async def test_publish_is_idempotent_by_id(provider: Provider) -> None:
    async with reading(provider, "test.*", "test.probe") as reader:
        event = make("test.once")
        await provider.publish(event)
        await provider.publish(event)
        await provider.publish(event.copy())
        marker = make("test.marker")
        await provider.publish(marker)
        await reader.wait_for(lambda e: e.id == marker.id)
        assert reader.ids() == [event.id, marker.id]


@pytest.mark.needs("total_order")
async def test_publish_many_reports_per_event_in_order(provider: Provider) -> None:
    async with reading(provider, "test.*", "test.probe") as reader:
        a, b = make("test.a"), make("test.b")
        results = await provider.publish_many([a, b, a])
        assert results == [None, None, None]
        marker = make("test.marker")
        await provider.publish(marker)
        await reader.wait_for(lambda e: e.id == marker.id)
        assert reader.ids() == [a.id, b.id, marker.id]


# -- life cycle, stats ---------------------------------------------------------------------------


async def test_close_is_idempotent(provider_factory: ProviderFactory) -> None:
    async with provider_factory() as provider:
        await provider.close()
        await provider.close()


async def test_the_ports(provider: Provider) -> None:
    """Every provider publishes and consumes; the memory and database providers keep events
    as well, the transports (Redis, NATS) do not."""
    assert isinstance(provider, Provider)
    assert isinstance(provider, EventStore) == (provider.name in ("memory", "database"))


async def test_ping_answers_while_the_backend_is_up(provider: Provider) -> None:
    """Every provider can be probed cheaply (the relay's outage probe, ``/readyz``)."""
    await provider.ping()


async def test_stats(provider: Provider) -> None:
    for i in range(3):
        await provider.publish(make("test.stats", offset=i))
    stats = await provider.stats()
    # What the counters count differs by backend (stored events, stream entries): only the
    # shape is common.
    assert isinstance(stats, ProviderStats) and stats.provider == provider.name


@pytest.mark.needs("store", "persistent")
async def test_stored_events_survive_a_new_instance(provider_factory: ProviderFactory) -> None:
    async with provider_factory() as first:
        require(first, "persistent")
        event = make()
        await require_store(first).store(event)
    async with provider_factory() as second:
        got = await require_store(second).get(event.id)
        assert got is not None and same(got, event)


@pytest.mark.needs("persistent")
async def test_published_events_survive_a_new_instance(provider_factory: ProviderFactory) -> None:
    async with provider_factory() as first:
        require(first, "persistent")
        event = make("test.kept")
        await first.publish(event)
    async with provider_factory() as second, \
            second.consume("test.*", group="late", start=StartPosition.BEGINNING) as member:
        with anyio.fail_after(WAIT):
            delivery = await member.__anext__()
        assert same(delivery.event, event)
        await delivery.ack()


@pytest.mark.needs("cross_instance")
async def test_cross_instance_delivery(provider_factory: ProviderFactory) -> None:
    async with provider_factory() as publisher, provider_factory() as subscriber:
        require(publisher, "cross_instance")
        async with reading(subscriber, "test.*", "test.probe") as reader:
            event = make("test.far")
            await publisher.publish(event)
            got = await reader.wait_for(lambda e: e.id == event.id)
            assert same(got, event)
