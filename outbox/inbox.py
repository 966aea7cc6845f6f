"""The inbox: handled event ids per consumer group, written in the handler's own transaction.

Every bus delivers at least once: a consumer that crashes between its handler's commit and the
ack sees the event again. With an inbox the handler's database work and the row
``outbox_inbox(group_name, event_id)`` commit together, so the redelivery finds the row and is
skipped: an exactly-once *effect* for handlers whose effects live in that database.

Two ways to use it:

1. Let :class:`outbox.Consumer` run handlers inside the inbox transaction
   (``Consumer(..., inbox=Inbox(engine))`` or ``python -m outbox.consume
   --inbox-database-url URL``). For each delivery it opens a transaction, inserts the inbox row
   (``INSERT … ON CONFLICT DO NOTHING``; zero rows = already handled → ack and skip), runs every
   matching handler, and commits only when all of them succeeded (then acks). A failing handler
   rolls back the inbox row *and* what every handler of that event wrote, so the retry starts
   clean. Handlers reach the transaction through a context-local::

       from outbox.inbox import current_session

       @outbox.subscribe("public.orders.create")
       def reserve_stock(event):
           session = current_session()          # sqlalchemy.orm.Session, in the transaction
           session.add(Reservation(order_id=event.payload["id"]))   # no commit: the consumer does

   With a sync engine the session is a :class:`~sqlalchemy.orm.Session`; sync handlers (run in
   worker threads by the broker) use it directly, async handlers should wrap blocking calls in
   ``anyio.to_thread.run_sync``. With an :class:`~sqlalchemy.ext.asyncio.AsyncEngine` (URL
   with an async driver: ``postgresql+psycopg_async``, ``postgresql+asyncpg``,
   ``sqlite+aiosqlite``) it is an :class:`~sqlalchemy.ext.asyncio.AsyncSession` for async
   handlers. :func:`current_connection` gives the Core connection of the same transaction.
   Handlers must not commit or roll back themselves.

2. Handlers that manage their own transaction (another database, their own session) call
   :func:`record` / :func:`record_async` inside it: it returns ``False`` when the event was
   already handled by that group, and the handler then does nothing.

Concurrent deliveries of one event (two consumers after a reclaim) are serialised by the primary
key: the second insert waits for the first transaction and sees its row once it commits.

Rows are never removed by the consumer; remove old ones with :meth:`Inbox.cleanup` once no
redelivery can come any more (older than the stream's retention).
"""

from __future__ import annotations

import contextvars
import datetime as dt
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import Session, scoped_session

from outbox._engines import engine_args
from outbox._redact import url_text
from outbox._sql import inbox as inbox_sql
from outbox.events import utcnow
from outbox.exceptions import NoInboxTransaction
from outbox.schema import check_schema, create_schema

__all__ = [
    "Inbox",
    "InboxTransaction",
    "NoInboxTransaction",
    "current_connection",
    "current_session",
    "record",
    "record_async",
]

#: URL drivers that need create_async_engine.
_ASYNC_DRIVERS = frozenset({"asyncpg", "psycopg_async", "aiosqlite", "asyncmy", "aiomysql"})


@dataclass
class InboxTransaction:
    """One delivery's transaction: ``duplicate`` when the group handled this event before."""

    session: Session | AsyncSession
    duplicate: bool
    rollback_only: bool = field(default=False)

    def rollback(self) -> None:
        """Roll back instead of committing when the block ends (a handler failed)."""
        self.rollback_only = True

    @property
    def commits(self) -> bool:
        """True when the block's end commits (not a duplicate, no rollback asked for)."""
        return not (self.duplicate or self.rollback_only)


_current: contextvars.ContextVar[InboxTransaction | None] = contextvars.ContextVar(
    "outbox_inbox_transaction", default=None
)


@contextmanager
def _made_current(tx: InboxTransaction) -> Iterator[InboxTransaction]:
    """``tx`` is :func:`current_session`'s inside the block; an error in it means rollback."""
    token = _current.set(tx)
    try:
        yield tx
    except BaseException:
        tx.rollback_only = True
        raise
    finally:
        _current.reset(token)


def current_session() -> Session | AsyncSession:
    """The session of the inbox transaction around the running handler (see module docs)."""
    tx = _current.get()
    if tx is None:
        raise NoInboxTransaction(
            "no inbox transaction here: current_session() works inside handlers run by "
            "outbox.Consumer with an inbox (python -m outbox.consume --inbox-database-url URL)"
        )
    return tx.session


def current_connection() -> Connection | AsyncConnection:
    """The Core connection of the inbox transaction around the running handler."""
    session = current_session()
    if isinstance(session, AsyncSession):
        raise NoInboxTransaction("the inbox runs on an AsyncEngine: use "
                                 "`await current_session().connection()`")
    return session.connection()


def _as_uuid(event_id: uuid.UUID | str) -> uuid.UUID:
    return event_id if isinstance(event_id, uuid.UUID) else uuid.UUID(str(event_id))


def _statement(dialect: sa.Dialect, group: str, event_id: uuid.UUID | str
               ) -> tuple[sa.Insert, bool]:
    return inbox_sql.record_statement(dialect, group, _as_uuid(event_id))


def record(bind: Session | scoped_session[Any] | Connection, group: str,
           event_id: uuid.UUID | str) -> bool:
    """Insert the inbox row in ``bind``'s transaction; ``False`` when it was already there.

    Call it first thing inside the transaction that holds the handler's effects. ``bind``: a
    session, a ``scoped_session`` (Flask-SQLAlchemy's ``db.session``) or a connection.
    """
    target: Session | Connection = bind() if isinstance(bind, scoped_session) else bind
    dialect = target.get_bind().dialect if isinstance(target, Session) else target.dialect
    statement, returning = _statement(dialect, group, event_id)
    result = target.execute(statement)
    return result.first() is not None if returning else _rowcount(result) > 0


async def record_async(bind: AsyncSession | AsyncConnection, group: str,
                       event_id: uuid.UUID | str) -> bool:
    """:func:`record` for an async session or connection."""
    if isinstance(bind, AsyncSession):
        dialect = bind.sync_session.get_bind().dialect
    else:
        dialect = bind.dialect
    statement, returning = _statement(dialect, group, event_id)
    result = await bind.execute(statement)
    return result.first() is not None if returning else _rowcount(result) > 0


def _rowcount(result: Any) -> int:
    return int(result.rowcount)


class Inbox:
    """Runs a consumer's handlers inside a transaction that also records the event id.

    ``bind``: an :class:`~sqlalchemy.engine.Engine`, an
    :class:`~sqlalchemy.ext.asyncio.AsyncEngine`, or a URL (an async driver in the URL makes an
    async engine). :meth:`check` verifies the ``outbox_inbox`` table exists (created by
    ``alembic upgrade head``; on SQLite it is created if missing). ``pgbouncer``: the URL is
    PgBouncer in transaction pooling (no prepared statements, see :mod:`outbox._engines`).
    """

    def __init__(self, bind: Engine | AsyncEngine | str | sa.URL, *,
                 pgbouncer: bool = False) -> None:
        self._owns_engine = isinstance(bind, str | sa.URL)
        if isinstance(bind, str | sa.URL):
            url, connect_args = engine_args(bind, pgbouncer=pgbouncer)
            if url.get_driver_name() in _ASYNC_DRIVERS:
                bind = create_async_engine(url, pool_pre_ping=True, connect_args=connect_args)
            else:
                bind = sa.create_engine(url, pool_pre_ping=True, connect_args=connect_args)
        self.engine: Engine | AsyncEngine = bind
        self.is_async = isinstance(bind, AsyncEngine)

    def __repr__(self) -> str:
        return f"<Inbox {url_text(self.engine.url)}>"

    @property
    def dialect_name(self) -> str:
        return self.engine.dialect.name

    def same_database(self, engine: Engine | AsyncEngine | None) -> bool:
        """True when ``engine`` points at the database this inbox writes to."""
        if engine is None:
            return False
        mine, theirs = self.engine.url, engine.url
        return (mine.get_backend_name(), mine.host, mine.port, mine.database) == (
            theirs.get_backend_name(), theirs.host, theirs.port, theirs.database)

    async def check(self) -> None:
        """Raise :class:`SchemaMissing` (one line) unless ``outbox_inbox`` exists."""
        if isinstance(self.engine, AsyncEngine):
            async with self.engine.begin() as conn:
                await conn.run_sync(_check_tables)
            return
        engine = self.engine

        def run() -> None:
            with engine.begin() as conn:
                _check_tables(conn)

        await anyio.to_thread.run_sync(run)

    @asynccontextmanager
    async def transaction(self, group: str, event_id: uuid.UUID | str, *,
                          delivery: Any = None) -> AsyncIterator[InboxTransaction]:
        """Open the transaction, insert the inbox row and make the session current.

        Commits when the block ends unless ``duplicate``, ``tx.rollback()`` was called or the
        block raised (then it rolls back). A failed commit raises (nothing was recorded).

        ``delivery``: a delivery of the database provider *on this same database*; its
        ``ack_in``/``ack_with`` records the inbox row and moves the group's cursor in this
        transaction (see ``DatabaseDelivery.ack_in``).
        """
        key = _as_uuid(event_id)
        if isinstance(self.engine, AsyncEngine):
            async with self._async_transaction(self.engine, group, key, delivery) as tx:
                yield tx
            return
        engine = self.engine
        session = Session(engine)

        def insert() -> bool:
            if delivery is not None:
                return bool(delivery.ack_in(session))
            return record(session, group, key)

        try:
            inserted = await anyio.to_thread.run_sync(insert)
            tx = InboxTransaction(session=session, duplicate=not inserted)
            with _made_current(tx):
                yield tx
            await anyio.to_thread.run_sync(session.commit if tx.commits else session.rollback)
        finally:
            with anyio.CancelScope(shield=True):  # close (and so roll back) even when cancelled
                await anyio.to_thread.run_sync(session.close)

    @asynccontextmanager
    async def _async_transaction(self, engine: AsyncEngine, group: str, key: uuid.UUID,
                                 delivery: Any) -> AsyncIterator[InboxTransaction]:
        async with AsyncSession(engine) as session:
            if delivery is not None:
                inserted = bool(await delivery.ack_with(session))
            else:
                inserted = await record_async(session, group, key)
            tx = InboxTransaction(session=session, duplicate=not inserted)
            with _made_current(tx):  # an error: the session's end rolls back
                yield tx
            await (session.commit() if tx.commits else session.rollback())

    async def handled(self, group: str, event_id: uuid.UUID | str) -> bool:
        """True when ``group`` recorded ``event_id`` (a committed handling)."""
        query = inbox_sql.handled_statement(group, _as_uuid(event_id))
        if isinstance(self.engine, AsyncEngine):
            async with self.engine.connect() as conn:
                return (await conn.execute(query)).first() is not None
        engine = self.engine

        def run() -> bool:
            with engine.connect() as conn:
                return conn.execute(query).first() is not None

        return await anyio.to_thread.run_sync(run)

    async def cleanup(self, older_than: dt.timedelta, *, batch_size: int = 1000) -> int:
        """Delete rows handled more than ``older_than`` ago, in small batches; returns count."""
        cutoff = utcnow() - older_than
        old = inbox_sql.old_rows(cutoff, batch_size)
        total = 0
        while True:
            keys = await self._fetch(old)
            if not keys:
                return total
            total += await self._execute(inbox_sql.delete_rows(keys))

    async def _fetch(self, query: sa.Select[Any]) -> list[tuple[Any, ...]]:
        if isinstance(self.engine, AsyncEngine):
            async with self.engine.connect() as conn:
                return [tuple(r) for r in (await conn.execute(query)).all()]
        engine = self.engine

        def run() -> list[tuple[Any, ...]]:
            with engine.connect() as conn:
                return [tuple(r) for r in conn.execute(query).all()]

        return await anyio.to_thread.run_sync(run)

    async def _execute(self, statement: sa.Delete) -> int:
        if isinstance(self.engine, AsyncEngine):
            async with self.engine.begin() as conn:
                return int((await conn.execute(statement)).rowcount)
        engine = self.engine

        def run() -> int:
            with engine.begin() as conn:
                return int(conn.execute(statement).rowcount)

        return await anyio.to_thread.run_sync(run)

    async def close(self) -> None:
        """Dispose of the engine when the inbox created it from a URL."""
        if not self._owns_engine:
            return
        if isinstance(self.engine, AsyncEngine):
            await self.engine.dispose()
        else:
            await anyio.to_thread.run_sync(self.engine.dispose)


def _check_tables(conn: Connection) -> None:
    if conn.dialect.name == "sqlite":
        create_schema(conn)  # the embedded default creates its own schema
    check_schema(conn, ("outbox_inbox",))
