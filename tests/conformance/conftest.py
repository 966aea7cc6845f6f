"""The provider conformance suite: every provider passes the same behavioural tests.

``test_provider.py`` checks the publisher, the streams and (for providers that keep events) the
event store; ``test_groups.py`` checks consumer groups. Each provider joins the suite with a
:class:`Backend`: how to make the provider, and how a test looks inside its backend (its dead
letters, what a group still holds, how to write a malformed message, how a child process makes
the same provider). Adding a provider takes a fixture here:

1. Write a fixture named ``backend_<name>`` that returns a :class:`Backend`. Its ``make`` is a
   factory ``make(*, claim_timeout=..., max_deliveries=..., prefetch=...)`` returning an async
   context manager that yields a provider (and closes it on exit). Every provider one backend
   makes must share one backend namespace (the same stream, key prefix or database), so the
   suite can check persistence and cross-instance delivery with two of them; use the per-test
   fixtures of ``tests/conftest.py`` (``redis_url`` + ``redis_prefix``, ``nats_url`` +
   ``nats_names``, ``pg_engine``, ``sqlite_url``) so each test gets a namespace of its own,
   cleaned up afterwards.
2. Add ``"<name>"`` to :data:`PROVIDERS`.

Which tests apply follows from the provider: ``isinstance(provider, EventStore)`` for the store
tests, and its ``capabilities`` (``outbox.providers.base.Capabilities``): ``persistent`` for the
restart tests, ``cross_instance`` for delivery between instances and for a member that dies,
``bounded_redelivery`` for parking after ``max_deliveries`` nacks; a backend without
``inject_malformed`` skips the malformed-message test. Run one provider with
``pytest tests/conformance -k memory``.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import pytest
import sqlalchemy as sa

import outbox
from outbox import wire
from outbox.exceptions import MalformedMessage
from outbox.providers.base import Provider
from outbox.providers.memory import MemoryProvider

#: Providers the suite runs against: each needs a ``backend_<name>`` fixture.
PROVIDERS = ["memory", "redis", "redis_sharded", "nats", "database", "sqlite"]

#: What each provider under test claims: ``store`` (an ``EventStore``), its ``capabilities``
#: (``persistent``, ``cross_instance``, ``bounded_redelivery``), ``malformed`` (its backend can
#: write a malformed message), ``silent_store`` (``store`` keeps an event off the bus),
#: ``total_order`` (one publisher's events reach a group in its order, any member may take any
#: event; sharded Redis keeps the order per ordering key and deals shards out by lease). A test
#: marked ``@pytest.mark.needs(...)`` is collected only for the providers that claim all it
#: needs (the others are deselected, not skipped); inside, the test asserts the provider agrees.
CLAIMS: dict[str, frozenset[str]] = {
    "memory": frozenset({"store", "bounded_redelivery", "silent_store", "total_order"}),
    "redis": frozenset({"persistent", "cross_instance", "bounded_redelivery", "malformed",
                        "total_order"}),
    "redis_sharded": frozenset({"persistent", "cross_instance", "bounded_redelivery",
                                "malformed"}),
    "nats": frozenset({"persistent", "cross_instance", "bounded_redelivery", "malformed",
                       "total_order"}),
    "database": frozenset({"store", "persistent", "cross_instance", "silent_store",
                           "total_order"}),
    "sqlite": frozenset({"store", "persistent", "cross_instance", "total_order"}),
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    keep: list[pytest.Item] = []
    drop: list[pytest.Item] = []
    for item in items:
        needs = {n for m in item.iter_markers("needs") for n in m.args}
        callspec = getattr(item, "callspec", None)
        name = callspec.params.get("backend") if callspec is not None else None
        (drop if needs and name is not None and not needs <= CLAIMS[name] else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


class ProviderFactory(Protocol):
    """``make(claim_timeout=..., max_deliveries=..., prefetch=...)``: a provider in a context.

    ``claim_timeout``: seconds after which what a dead member held goes to the others (Redis and
    NATS ``claim_idle``, the database ``lease``); ``prefetch``: deliveries fetched at once
    (``prefetch``, the database ``batch_size``).
    """

    def __call__(self, *, claim_timeout: float = ..., max_deliveries: int = ...,
                 prefetch: int = ...) -> AbstractAsyncContextManager[Provider]: ...


class DeadLetter(NamedTuple):
    """A parked message as every backend can tell it: the event id (``None`` for a message that
    is no event), the group, the error and how often it had been delivered."""

    event_id: str | None
    group: str
    error: str
    deliveries: int


@dataclass(frozen=True)
class Backend:
    """One provider under test (see the module docstring)."""

    name: str
    make: ProviderFactory
    #: The group's dead letters, oldest first.
    dead_letters: Callable[[Any], Awaitable[list[DeadLetter]]]
    #: Deliveries the group has handed out or buffered and not settled (0: all settled).
    unsettled: Callable[[Any, str], Awaitable[int]]
    #: Writes malformed messages on the bus; returns a fragment of each one's park error.
    inject_malformed: Callable[[Any], Awaitable[list[str]]] | None = None
    #: Python source that imports and builds the provider as ``provider`` in a child process,
    #: with ``claim_timeout`` of one second (a member that dies, tests/conformance/test_groups).
    child: str | None = None
    #: ``store`` keeps an event off the bus (on SQLite every row is on the bus).
    store_is_silent: bool = True
    #: One publisher's events arrive in its order per ordering key only (sharded streams).
    order_per_key_only: bool = False


def _document_id(document: str | bytes | None) -> str | None:
    if document is None:
        return None
    try:
        return str(wire.decode(document).id)
    except MalformedMessage:
        return None


@pytest.fixture
def backend_memory() -> Backend:
    @contextlib.asynccontextmanager
    async def make(*, claim_timeout: float = 30.0, max_deliveries: int = 10,
                   prefetch: int = 32) -> AsyncIterator[Provider]:
        provider = MemoryProvider(max_deliveries=max_deliveries)
        try:
            yield provider
        finally:
            await provider.close()

    async def dead_letters(p: MemoryProvider) -> list[DeadLetter]:
        return [DeadLetter(str(r["event_id"]), r["group_name"], r["error"], r["attempt"])
                for r in await p.dead_letters()]

    async def unsettled(p: MemoryProvider, group: str) -> int:
        info = (await p.stats()).extra["groups"][group]
        return int(info["waiting"] + info["delayed"] + info["held"])

    return Backend("memory", make, dead_letters, unsettled)


@pytest.fixture
def backend_redis(redis_url: str, redis_prefix: str) -> Backend:
    return _redis_backend("redis", redis_url, redis_prefix, shards=1)


@pytest.fixture
def backend_redis_sharded(redis_url: str, redis_prefix: str) -> Backend:
    """Redis with ``shards`` = 3: each shard read by one member of a group at a time."""
    return _redis_backend("redis_sharded", redis_url, redis_prefix, shards=3)


def _redis_backend(name: str, redis_url: str, redis_prefix: str, *, shards: int) -> Backend:
    from outbox.providers.redis import RedisProvider

    stream = f"{redis_prefix}:events"

    @contextlib.asynccontextmanager
    async def make(*, claim_timeout: float = 30.0, max_deliveries: int = 10,
                   prefetch: int = 32) -> AsyncIterator[Provider]:
        provider = RedisProvider(redis_url, stream_name=stream, block=0.2,
                                 claim_idle=claim_timeout, max_deliveries=max_deliveries,
                                 prefetch=prefetch, shards=shards)
        try:
            yield provider
        finally:
            await provider.close()

    async def dead_letters(p: RedisProvider) -> list[DeadLetter]:
        out = []
        for row in await p.dead_letters():
            carried = _document_id(row.get("event"))
            if carried is not None:  # the entry's own id field names the same event
                assert row["id"] == carried
            out.append(DeadLetter(carried or row.get("id"), row["group"], row["error"],
                                  int(row["deliveries"])))
        return out

    async def unsettled(p: RedisProvider, group: str) -> int:
        return sum([int((await p._client.xpending(s, group))["pending"]) for s in p.streams])

    async def inject_malformed(p: RedisProvider) -> list[str]:
        stream = p.streams[-1]
        await p._client.xadd(stream, {"id": "x", "type": "t", "event": b"\xff not json"})
        await p._client.xadd(stream, {"type": "t", "source": "s"})  # no event field
        await p._client.xadd(stream, {"event": json.dumps({"specversion": "0.3"})})
        return ["not JSON", "no 'event' field", "specversion"]

    child = ("from outbox.providers.redis import RedisProvider\n"
             f"provider = RedisProvider({redis_url!r}, stream_name={stream!r}, claim_idle=1.0, "
             f"block=0.2, shards={shards})\n")
    return Backend(name, make, dead_letters, unsettled, inject_malformed, child,
                   order_per_key_only=shards > 1)


@pytest.fixture
def backend_nats(nats_url: str, nats_names: Any) -> Backend:
    from outbox.providers.nats import NATSProvider

    @contextlib.asynccontextmanager
    async def make(*, claim_timeout: float = 30.0, max_deliveries: int = 10,
                   prefetch: int = 32) -> AsyncIterator[Provider]:
        provider = NATSProvider(nats_url, stream_name=nats_names.stream,
                                subject_prefix=nats_names.subject_prefix, block=0.2,
                                claim_idle=claim_timeout, max_deliveries=max_deliveries,
                                prefetch=prefetch)
        try:
            yield provider
        finally:
            await provider.close()

    async def dead_letters(p: NATSProvider) -> list[DeadLetter]:
        out = []
        for row in await p.dead_letters():
            msg_id = row.get("Nats-Msg-Id")  # "{group}:{event id}" when the id was known
            named = msg_id.split(":", 1)[1] if msg_id else None
            carried = _document_id(row["event"])
            if carried is not None and named is not None:
                assert named == carried
            out.append(DeadLetter(carried or named, row["Outbox-Group"], row["Outbox-Error"],
                                  int(row["Outbox-Deliveries"])))
        return out

    async def unsettled(p: NATSProvider, group: str) -> int:
        info = await p._js.consumer_info(p.stream_name, group)
        return int(info.num_ack_pending + info.num_pending)

    async def inject_malformed(p: NATSProvider) -> list[str]:
        subject = f"{p.subject_prefix}.database.public.users.create"
        await p._js.publish(subject, b"\xff not json")
        await p._js.publish(subject, json.dumps({"specversion": "0.3"}).encode())
        return ["not JSON", "specversion"]

    child = ("from outbox.providers.nats import NATSProvider\n"
             f"provider = NATSProvider({nats_url!r}, stream_name={nats_names.stream!r}, "
             f"subject_prefix={nats_names.subject_prefix!r}, claim_idle=1.0, block=0.2)\n")
    return Backend("nats", make, dead_letters, unsettled, inject_malformed, child)


def _database_backend(name: str, engine: sa.Engine, *, store_is_silent: bool) -> Backend:
    from outbox.providers.database import DatabaseProvider

    @contextlib.asynccontextmanager
    async def make(*, claim_timeout: float = 30.0, max_deliveries: int = 10,
                   prefetch: int = 100) -> AsyncIterator[Provider]:
        provider = DatabaseProvider(engine, poll_interval=0.05, lease=claim_timeout,
                                    max_deliveries=max_deliveries, batch_size=prefetch)
        try:
            yield provider
        finally:
            await provider.close()

    async def dead_letters(p: DatabaseProvider) -> list[DeadLetter]:
        return [DeadLetter(str(r["event_id"]), r["group_name"], r["error"], r["attempt"])
                for r in await p.dead_letters()]

    async def unsettled(p: DatabaseProvider, group: str) -> int:
        info = {g.name: g for g in await p.groups()}[group]
        # Claims in flight: a claimed event stays in its claim until it is settled.
        return info.claims

    url = engine.url.render_as_string(hide_password=False)
    child = ("from outbox.providers.database import DatabaseProvider\n"
             f"provider = DatabaseProvider({url!r}, lease=1.0, poll_interval=0.05)\n")
    return Backend(name, make, dead_letters, unsettled, None, child,
                   store_is_silent=store_is_silent)


@pytest.fixture
def backend_database(pg_engine: sa.Engine) -> Backend:
    return _database_backend("database", pg_engine, store_is_silent=True)


@pytest.fixture
def backend_sqlite(sqlite_url: str) -> Iterator[Backend]:
    engine = outbox.sqlite.sqlite_savepoints(sa.create_engine(sqlite_url))
    outbox.create_schema(engine)
    yield _database_backend("sqlite", engine, store_is_silent=False)
    engine.dispose()


@pytest.fixture(params=PROVIDERS)
def backend(request: pytest.FixtureRequest) -> Backend:
    """The provider under test (parametrised over :data:`PROVIDERS`)."""
    found: Backend = request.getfixturevalue(f"backend_{request.param}")
    return found


@pytest.fixture
def provider_factory(backend: Backend) -> ProviderFactory:
    """The factory of the provider under test."""
    return backend.make


@pytest.fixture
async def provider(provider_factory: ProviderFactory) -> AsyncIterator[Provider]:
    """One open provider of the kind under test."""
    async with provider_factory() as p:
        yield p
