"""Capture with AsyncSession on PostgreSQL (psycopg 3 async), and the context across awaits."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import anyio
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import Session

import outbox
from outbox.events import Event
from tests.integration.capture_models import Base, User

pytestmark = pytest.mark.anyio


@dataclass
class AsyncDb:
    engine: AsyncEngine
    Session: async_sessionmaker[AsyncSession]

    async def events(self) -> list[Event]:
        async with AsyncSession(self.engine) as s:
            return list(await s.scalars(sa.select(Event).order_by(Event.seq)))


@pytest.fixture
async def adb(pg_url: str) -> AsyncIterator[AsyncDb]:
    sync_engine = sa.create_engine(pg_url)
    outbox.create_schema(sync_engine)
    Base.metadata.create_all(sync_engine)
    sync_engine.dispose()
    engine = create_async_engine(pg_url)  # postgresql+psycopg:// -> psycopg 3 async
    yield AsyncDb(engine, async_sessionmaker(engine, expire_on_commit=True))
    await engine.dispose()


async def test_async_sessionmaker(adb: AsyncDb) -> None:
    handle = outbox.capture(adb.Session)
    try:
        async with adb.Session() as s:
            user = User(name="a")
            s.add(user)
            await s.flush()
            user_id = user.id
            await s.commit()
            user.name = "b"  # expired by the commit: the old value is read for the event
            await s.commit()
            s.add(User(name="rolled back"))
            await s.flush()
            await s.rollback()
            await s.delete(await s.get(User, user_id))
            await s.commit()
        # A plain AsyncSession is not captured: the sessionmaker got a Session class of its own.
        async with AsyncSession(adb.engine) as other:
            other.add(User(name="other"))
            await other.commit()
        # Capturing the same sessionmaker again is the same registration.
        assert outbox.capture(adb.Session) is handle
    finally:
        handle.remove()
    events = await adb.events()
    assert [(e.operation, e.payload["name"]) for e in events] == [
        ("create", "a"), ("update", "b"), ("delete", "b")
    ]
    assert events[1].meta["changes"] == {"name": {"old": "a", "new": "b"}}
    assert events[0].type == "public.cap_users.create"


async def test_async_session_instance_and_bulk(adb: AsyncDb) -> None:
    async with AsyncSession(adb.engine) as s:
        handle = outbox.capture(s)
        try:
            s.add_all([User(name="x"), User(name="y")])
            await s.commit()
            await s.execute(sa.update(User).where(User.name == "x").values(name="x2"))
            await s.execute(sa.delete(User).where(User.name == "y"))
            await s.commit()
        finally:
            handle.remove()
    assert [(e.operation, e.payload["name"]) for e in await adb.events()] == [
        ("create", "x"), ("create", "y"), ("update", "x2"), ("delete", "y")
    ]


async def test_context_follows_each_task_across_awaits(adb: AsyncDb) -> None:
    handle = outbox.capture(adb.Session)

    async def work(i: int) -> None:
        with outbox.context(user_id=f"user{i}", metadata={"task": i}):
            async with adb.Session() as s:
                s.add(User(name=f"n{i}"))
                await anyio.sleep(0.01)  # other tasks run and set their own context
                await s.flush()
                await anyio.sleep(0.01)
                s.add(User(name=f"m{i}"))
                await s.commit()

    try:
        async with anyio.create_task_group() as tg:
            for i in range(6):
                tg.start_soon(work, i)
    finally:
        handle.remove()
    events = await adb.events()
    assert len(events) == 12
    for ev in events:
        i = int(ev.payload["name"][1:])
        assert (ev.user_id, ev.meta) == (f"user{i}", {"task": i})


async def test_context_follows_into_worker_threads(adb: AsyncDb) -> None:
    sync_url = adb.engine.url
    engine = sa.create_engine(sync_url)
    handle = outbox.capture(Session)  # every sync Session of the process
    try:
        def write(name: str) -> None:
            with Session(engine) as s:
                s.add(User(name=name))
                s.commit()

        with outbox.context(user_id="req-1"):
            # anyio copies the caller's context into the worker thread.
            await anyio.to_thread.run_sync(write, "from thread")
        await anyio.to_thread.run_sync(write, "no context")
    finally:
        handle.remove()
        engine.dispose()
    by_name = {e.payload["name"]: e.user_id for e in await adb.events()}
    assert by_name == {"from thread": "req-1", "no context": None}


async def test_the_recorder_watches_an_async_engine(adb: AsyncDb) -> None:
    """``outbox_recorder.watch(async_engine)`` from an async test: the recorder's sync queries
    run on the same database through the driver's sync mode (it raised MissingGreenlet)."""
    handle = outbox.capture(adb.Session)
    async_url = adb.engine.url.set(drivername="postgresql+psycopg_async")
    spelled_async = create_async_engine(async_url)
    try:
        with outbox.testing.EventRecorder() as recorder:
            recorder.watch(adb.engine)
            recorder.watch(spelled_async)
            with outbox.context(user_id=5):
                async with adb.Session() as s:
                    s.add(User(name="watched"))
                    await s.commit()
            for watch in recorder._watches:  # each watch reports the row once
                assert [e.type for e in watch.new_rows()] == ["public.cap_users.create"]
            recorder.assert_emitted("public.cap_users.create", payload={"name": "watched"},
                                    user_id=5, count=1)  # one event, seen by both
    finally:
        handle.remove()
        await spelled_async.dispose()


async def test_an_async_applications_url_serves_the_relay(adb: AsyncDb) -> None:
    """The relay (a sync engine) takes the URL an async app gives create_async_engine:
    ``+psycopg_async`` runs psycopg in its sync mode; ``+asyncpg`` is refused in one line."""
    async with adb.Session() as s:
        s.add(outbox.new_event("system", "app.ping", {"n": 1}))
        await s.commit()
    async_url = adb.engine.url.set(drivername="postgresql+psycopg_async")
    broker = outbox.Broker(outbox.MemoryProvider())
    seen: list[str] = []
    broker.subscribe("app.*", lambda event: seen.append(event.type))
    relay = outbox.Relay(async_url.render_as_string(hide_password=False), broker=broker)
    assert relay.engine.dialect.driver == "psycopg" and not relay.engine.dialect.is_async
    await relay.drain()
    assert seen == ["app.ping"]
    with pytest.raises(outbox.exceptions.ConfigError) as error:
        outbox.Relay(adb.engine.url.set(drivername="postgresql+asyncpg", password="s3cret"))
    assert "s3cret" not in str(error.value)
    assert str(error.value).endswith("use postgresql+psycopg://… (create_async_engine takes "
                                     "that URL too)")
