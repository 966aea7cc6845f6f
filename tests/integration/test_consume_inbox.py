"""The inbox: handled ids recorded in the handler's own transaction, redeliveries skipped."""

from __future__ import annotations

import contextlib
import datetime as dt
import uuid
from collections.abc import AsyncIterator, Iterator

import anyio
import pytest
import redis.asyncio as aioredis
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import Session

import outbox
from outbox import Broker, MemoryProvider, RetryPolicy, new_event, wire
from outbox.consume import Consumer
from outbox.events import Event
from outbox.exceptions import SchemaMissing
from outbox.inbox import (
    Inbox,
    NoInboxTransaction,
    current_connection,
    current_session,
    record,
    record_async,
)
from outbox.providers.redis import RedisProvider
from tests.helpers import eventually

pytestmark = pytest.mark.anyio

effects = sa.Table(
    "test_effects", sa.MetaData(),
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("event_id", sa.Uuid, nullable=False),
    sa.Column("note", sa.Text, nullable=False),
)


@pytest.fixture
def app_engine(engine: sa.Engine) -> Iterator[sa.Engine]:
    """The outbox schema plus a table the handlers write to (PostgreSQL and SQLite)."""
    effects.create(engine)
    yield engine


def _count(engine: sa.Engine, event_id: uuid.UUID | None = None) -> int:
    query = sa.select(sa.func.count()).select_from(effects)
    if event_id is not None:
        query = query.where(effects.c.event_id == event_id)
    with engine.connect() as conn:
        return int(conn.execute(query).scalar_one())


def test_record_returns_false_the_second_time(app_engine: sa.Engine) -> None:
    event_id = uuid.uuid4()
    with Session(app_engine) as session, session.begin():
        assert record(session, "g", event_id) is True
    with app_engine.begin() as conn:
        assert record(conn, "g", event_id) is False
        assert record(conn, "other-group", event_id) is True
    scoped = sa.orm.scoped_session(sa.orm.sessionmaker(app_engine))  # Flask-SQLAlchemy's kind
    try:
        assert record(scoped, "g", event_id) is False
        assert record(scoped, "third-group", event_id) is True
        scoped.commit()
    finally:
        scoped.remove()


async def test_inbox_on_mariadb(mariadb_url: str) -> None:
    engine = sa.create_engine(mariadb_url)
    try:
        outbox.create_schema(engine)
        effects.create(engine)
        inbox = Inbox(engine)
        await inbox.check()
        event_id = uuid.uuid4()
        for _ in range(2):
            async with inbox.transaction("g", event_id) as tx:
                if not tx.duplicate:
                    current_connection().execute(effects.insert().values(event_id=event_id,
                                                                         note="m"))
        assert _count(engine, event_id) == 1
    finally:
        engine.dispose()


async def test_transaction_commits_effects_with_the_inbox_row(app_engine: sa.Engine) -> None:
    inbox = Inbox(app_engine)
    await inbox.check()
    event_id = uuid.uuid4()
    async with inbox.transaction("g", event_id) as tx:
        assert not tx.duplicate
        session = current_session()
        assert session is tx.session

        def write() -> None:
            session.execute(effects.insert().values(event_id=event_id, note="done"))

        await anyio.to_thread.run_sync(write)  # a sync handler runs in a worker thread
    assert _count(app_engine, event_id) == 1
    assert await inbox.handled("g", event_id)
    async with inbox.transaction("g", event_id) as tx:
        assert tx.duplicate
    with pytest.raises(NoInboxTransaction):
        current_session()


async def test_rollback_undoes_effects_and_the_inbox_row(app_engine: sa.Engine) -> None:
    inbox = Inbox(app_engine)
    event_id = uuid.uuid4()
    async with inbox.transaction("g", event_id) as tx:
        current_connection().execute(effects.insert().values(event_id=event_id, note="x"))
        tx.rollback()  # a handler failed
    with pytest.raises(RuntimeError):
        async with inbox.transaction("g", event_id):
            current_connection().execute(effects.insert().values(event_id=event_id, note="y"))
            raise RuntimeError("boom")
    assert _count(app_engine, event_id) == 0
    assert not await inbox.handled("g", event_id)


async def test_concurrent_deliveries_have_one_effect(pg_engine: sa.Engine) -> None:
    """Two members handling the same event at once: the second waits, then sees the row."""
    effects.create(pg_engine)
    inbox = Inbox(pg_engine)
    event_id = uuid.uuid4()
    ran: list[str] = []
    first_inside = anyio.Event()

    async def member(name: str, hold: float) -> None:
        async with inbox.transaction("g", event_id) as tx:
            if tx.duplicate:
                return
            if name == "first":
                first_inside.set()
            ran.append(name)
            current_connection().execute(effects.insert().values(event_id=event_id, note=name))
            await anyio.sleep(hold)

    async with anyio.create_task_group() as tg:
        tg.start_soon(member, "first", 0.5)
        await first_inside.wait()
        tg.start_soon(member, "second", 0.0)
    assert ran == ["first"]
    assert _count(pg_engine, event_id) == 1


async def test_async_engine_gives_async_sessions(pg_url: str, pg_engine: sa.Engine) -> None:
    effects.create(pg_engine)
    async_url = sa.make_url(pg_url).set(drivername="postgresql+psycopg_async")
    inbox = Inbox(async_url.render_as_string(hide_password=False))
    assert inbox.is_async
    event_id = uuid.uuid4()
    try:
        await inbox.check()
        async with inbox.transaction("g", event_id) as tx:
            session = current_session()
            assert isinstance(session, AsyncSession) and not tx.duplicate
            await session.execute(effects.insert().values(event_id=event_id, note="async"))
        async with inbox.transaction("g", event_id) as tx:
            assert tx.duplicate
        engine = create_async_engine(async_url)
        async with engine.begin() as conn:
            assert await record_async(conn, "g", event_id) is False
            assert await record_async(conn, "h", event_id) is True
        await engine.dispose()
    finally:
        await inbox.close()
    assert _count(pg_engine, event_id) == 1


async def test_check_names_the_missing_table(pg_url: str) -> None:
    inbox = Inbox(pg_url)
    try:
        with pytest.raises(SchemaMissing, match=r"outbox_inbox.*alembic upgrade head"):
            await inbox.check()
    finally:
        await inbox.close()


async def test_cleanup_removes_old_rows(app_engine: sa.Engine) -> None:
    inbox = Inbox(app_engine)
    ids = [uuid.uuid4() for _ in range(5)]
    for event_id in ids:
        async with inbox.transaction("g", event_id):
            pass
    assert await inbox.cleanup(dt.timedelta(hours=1)) == 0
    with app_engine.begin() as conn:
        conn.execute(sa.update(outbox.schema.inbox_table).where(
            outbox.schema.inbox_table.c.event_id.in_(ids[:3])).values(
            handled_at=outbox.events.utcnow() - dt.timedelta(days=2)))
    assert await inbox.cleanup(dt.timedelta(days=1), batch_size=2) == 3
    assert [await inbox.handled("g", i) for i in ids] == [False] * 3 + [True] * 2


# -- through the consumer ------------------------------------------------------------------------


@pytest.fixture
async def redis_bus(redis_url: str, redis_prefix: str) -> AsyncIterator[RedisProvider]:
    provider = RedisProvider(redis_url, stream_name=f"{redis_prefix}:events", block=0.1)
    yield provider
    await provider.close()


@contextlib.asynccontextmanager
async def running(consumer: Consumer) -> AsyncIterator[Consumer]:
    async with anyio.create_task_group() as tg:
        tg.start_soon(consumer.run)
        with anyio.fail_after(10):
            await consumer.wait_started()
        try:
            yield consumer
        finally:
            consumer.stop()


async def test_redelivered_event_has_no_second_effect(app_engine: sa.Engine,
                                                      redis_bus: RedisProvider,
                                                      redis_url: str) -> None:
    broker = Broker(MemoryProvider(), retry_policy=RetryPolicy(initial_delay=0.05, jitter=0))
    calls: list[uuid.UUID] = []

    def reserve(event: Event) -> None:  # a sync handler, run in a worker thread
        calls.append(event.id)
        session = current_session()
        assert isinstance(session, Session)
        session.execute(effects.insert().values(event_id=event.id, note="reserved"))

    broker.subscribe("public.orders.create", reserve)
    event = new_event(source="database", type="public.orders.create", payload={"id": 1})
    first = Consumer(redis_bus, group="stock", broker=broker, inbox=Inbox(app_engine),
                     start="beginning")
    async with running(first):
        await redis_bus.publish(event)
        await eventually(lambda: first.stats.handled == 1)
    # The same event again, as after a consumer died between its commit and its ack; another
    # consumer process (nothing in memory) gets it. The relay's dedupe key does not help here:
    # this is a second stream entry of the same id.
    raw = aioredis.Redis.from_url(redis_url)
    try:
        await raw.xadd(redis_bus.stream_name, {"id": str(event.id), "type": event.type,
                                               "source": event.source,
                                               "event": wire.encode(event)})
    finally:
        await raw.aclose()
    second = Consumer(redis_bus, group="stock", broker=broker, inbox=Inbox(app_engine))
    async with running(second):
        await eventually(lambda: second.stats.duplicates == 1)
    assert second.stats.handled == 0
    assert calls == [event.id]
    assert _count(app_engine, event.id) == 1


async def test_failed_attempt_leaves_nothing_behind(app_engine: sa.Engine,
                                                    redis_bus: RedisProvider) -> None:
    broker = Broker(MemoryProvider(), sync_handlers="inline",
                    retry_policy=RetryPolicy(initial_delay=0.05, jitter=0))
    attempts: list[int] = []

    def write(event: Event) -> None:
        current_connection().execute(effects.insert().values(event_id=event.id, note="a"))

    def flaky(event: Event) -> None:
        attempts.append(1)
        current_connection().execute(effects.insert().values(event_id=event.id, note="b"))
        if len(attempts) == 1:
            raise RuntimeError("first attempt fails after writing")

    broker.subscribe("*", write, name="write")
    broker.subscribe("*", flaky, name="flaky")
    consumer = Consumer(redis_bus, group="g", broker=broker, inbox=Inbox(app_engine),
                        start="beginning")
    event = new_event(source="database", type="public.orders.create")
    async with running(consumer):
        await redis_bus.publish(event)
        await eventually(lambda: consumer.stats.handled == 1)
    assert consumer.stats.retried == 1
    # Both handlers ran twice; the first attempt's writes were rolled back with it.
    with app_engine.connect() as conn:
        notes = sorted(conn.execute(sa.select(effects.c.note)).scalars())
    assert notes == ["a", "b"]


async def test_database_provider_acks_in_the_handlers_transaction(pg_url: str,
                                                                  pg_engine: sa.Engine) -> None:
    """--provider database with the inbox on the same database: the inbox row and the group's
    cursor move in the handler's transaction (DatabaseDelivery.ack_in)."""
    from outbox.providers.database import DatabaseProvider

    effects.create(pg_engine)
    provider = DatabaseProvider(pg_url, poll_interval=0.1)
    inbox = Inbox(pg_engine)
    assert inbox.same_database(provider.engine)
    broker = Broker(MemoryProvider(), retry_policy=RetryPolicy(initial_delay=0.05, jitter=0))
    calls: list[uuid.UUID] = []

    def write(event: Event) -> None:
        calls.append(event.id)
        current_connection().execute(effects.insert().values(event_id=event.id, note="db"))

    broker.subscribe("public.orders.*", write)
    consumer = Consumer(provider, group="db-group", broker=broker, inbox=inbox)
    events = [new_event(source="database", type="public.orders.create", payload={"i": i})
              for i in range(5)]
    try:
        async with running(consumer):
            for event in events:
                await provider.publish(event)
            await eventually(lambda: consumer.stats.handled == 5)
        assert consumer._ack_in_transaction
    finally:
        await provider.close()
    assert sorted(calls) == sorted(e.id for e in events)
    with pg_engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(
            outbox.schema.inbox_table)).scalar_one() == 5
    assert _count(pg_engine) == 5
