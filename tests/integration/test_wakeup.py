"""The wake-up lock (outbox/_wakeup.py): writers notify only while a listener waits, and a
listener that goes idle while writers are between insert and commit never sleeps past them."""

from __future__ import annotations

from collections.abc import Iterator

import anyio
import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

import outbox
from outbox._sql.ddl import NOTIFY_CHANNEL, WAKE_LOCK_CLASS
from outbox._wakeup import Idle, IdleLock
from outbox.relay.listener import conninfo_from_url
from tests.helpers import eventually
from tests.integration.test_relay import counts, idle, make

pytestmark = pytest.mark.anyio


def write_event(engine: sa.Engine) -> None:
    with Session(engine) as s:
        s.add(outbox.new_event("system", "test.wake.create", {}))
        s.commit()


@pytest.fixture
def listen(pg_engine: sa.Engine) -> Iterator[psycopg.Connection[tuple[object, ...]]]:
    with psycopg.connect(conninfo_from_url(pg_engine.url), autocommit=True) as conn:
        conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
        yield conn


def notified(conn: psycopg.Connection[tuple[object, ...]], timeout: float = 0.5) -> int:
    return sum(1 for _ in conn.notifies(timeout=timeout))


async def test_writers_notify_only_while_a_listener_waits(
    pg_engine: sa.Engine, listen: psycopg.Connection[tuple[object, ...]]
) -> None:
    write_event(pg_engine)
    assert notified(listen) == 0  # nobody waits: no NOTIFY, no commit-time lock

    idle = IdleLock(conninfo_from_url(pg_engine.url))
    try:
        assert await idle.enter() is Idle.TAKEN
        assert await idle.enter() is Idle.HELD
        write_event(pg_engine)
        write_event(pg_engine)
        assert notified(listen) == 2

        await idle.leave()
        write_event(pg_engine)
        assert notified(listen) == 0
    finally:
        await idle.close()


async def test_a_listener_sees_writers_between_insert_and_commit(pg_engine: sa.Engine) -> None:
    idle = IdleLock(conninfo_from_url(pg_engine.url))
    try:
        with Session(pg_engine) as writer:
            writer.add(outbox.new_event("system", "test.wake.create", {}))
            writer.flush()  # the trigger ran: the writer holds the lock shared until commit
            assert await idle.enter() is Idle.WRITERS
            writer.commit()  # without a NOTIFY: nobody was waiting when it inserted
        assert await idle.enter() is Idle.TAKEN  # and now the listener looks once more
        assert idle.writers_backoff() == 0.001
        assert idle.writers_backoff() == 0.002
    finally:
        await idle.close()


async def test_one_listener_holds_the_lock_the_others_see_it(
    pg_engine: sa.Engine, listen: psycopg.Connection[tuple[object, ...]]
) -> None:
    first = IdleLock(conninfo_from_url(pg_engine.url))
    second = IdleLock(conninfo_from_url(pg_engine.url))
    try:
        assert await first.enter() is Idle.TAKEN
        assert await second.enter() is Idle.OTHER
        write_event(pg_engine)
        assert notified(listen) == 1  # reaches every listener of the channel

        # The lock goes with its connection: a dead holder leaves it to the next one. (This
        # database's lock only: idle relays of other databases on the server hold theirs.)
        with psycopg.connect(conninfo_from_url(pg_engine.url), autocommit=True) as admin:
            pid = admin.execute(
                "SELECT pid FROM pg_locks WHERE locktype = 'advisory' "
                "AND mode = 'ExclusiveLock' AND granted AND classid::bigint = %s "
                "AND database = (SELECT oid FROM pg_database "
                "WHERE datname = current_database())", (WAKE_LOCK_CLASS,)).fetchone()
            assert pid is not None
            admin.execute("SELECT pg_terminate_backend(%s)", (pid[0],))
        async def second_takes_it() -> bool:
            return await second.enter() is Idle.TAKEN

        await eventually(second_takes_it, within=10, every=0.01,
                         what="the lock to be free for the second listener")
        assert await first.enter() is Idle.OTHER  # reconnected, and someone else holds it now
    finally:
        await first.close()
        await second.close()


async def test_an_unreachable_database_means_polling() -> None:
    idle = IdleLock("host=127.0.0.1 port=1 connect_timeout=1")
    assert await idle.enter() is Idle.UNAVAILABLE
    assert not idle.held


async def test_relay_idle_while_a_writer_commits_late_is_not_left_sleeping(
    pg_engine: sa.Engine,
) -> None:
    """The writer inserts before the relay goes idle and commits after: it sends no NOTIFY, yet
    the relay (polling once an hour) delivers the event at once."""
    relay, _rec, _ = make(pg_engine, poll_interval=3600)
    relay.rescan_interval = 3600
    async with anyio.create_task_group() as tg:
        with Session(pg_engine) as writer:
            writer.add(outbox.new_event("system", "test.wake.create", {}))
            writer.flush()
            tg.start_soon(relay.run)
            await eventually(lambda: relay.stats.listener_connected)
            looks = relay.stats.claims
            # The relay found nothing and tried to go idle (the writer keeps it from that).
            await eventually(lambda: relay.stats.claims >= looks + 2)
            woken = relay.stats.notifications  # (one on connecting: look for missed events)
            writer.commit()
        await eventually(lambda: counts(pg_engine) == {"completed": 1}, within=5)
        assert relay.stats.notifications == woken
        # Idle now, holding the lock: the next writer notifies.
        await eventually(lambda: idle(relay))
        write_event(pg_engine)
        await eventually(lambda: counts(pg_engine) == {"completed": 2}, within=5)
        assert relay.stats.notifications == woken + 1
        relay.stop()
