"""``DatabaseProvider``: the ``events`` table as the bus between instances.

Storage (``store``/``get``/``list``/``update_status``/``delete``/``stats``) is plain SQL on the
events table. Transport: ``publish`` inserts the event (idempotent by id) and every process that
reads the table — ``stream()`` or ``consume(group=...)`` — receives it; see
``docs/database-provider.md`` for the batches between snapshots that keep late commits from being
skipped (and long transactions from stalling the bus), consumer groups, and what is supported on
SQLite and MariaDB.

The provider runs SQL on a *synchronous* SQLAlchemy engine in worker threads (psycopg 3 on
PostgreSQL); an ``AsyncEngine`` or URL is accepted and turned into a sync engine on the same
database. Handlers that write through an ``AsyncConnection``/``AsyncSession`` can still take the
exactly-once path (:meth:`DatabaseDelivery.ack_with`).
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import datetime as dt
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from types import TracebackType
from typing import Any, ClassVar, TypeVar

import anyio
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from outbox._engines import create_engine, engine_args
from outbox._patterns import compile_pattern
from outbox._redact import url_text
from outbox._sql import bus as sql
from outbox._sql import events as event_sql
from outbox._txretry import retrying
from outbox._wakeup import Idle, IdleLock
from outbox.events import Event, EventStatus, get_instance_id
from outbox.exceptions import ConfigError, ProviderError, ProviderUnavailable, SchemaMissing
from outbox.providers._bus import GroupRegistry, config_section, validate_group
from outbox.providers.base import (
    Capabilities,
    EventFilter,
    EventNotFound,
    ProviderStats,
    StartPosition,
    as_event_id,
    parse_start,
    publish_each,
)
from outbox.providers.database.consumer import Signal, _GroupReader, _Tail
from outbox.providers.database.keeper import run_keeper
from outbox.providers.database.subscription import Deliveries, GroupStream, TailStream
from outbox.schema import MIGRATE_HINT

__all__ = ["DatabaseProvider", "parse_start"]

log = logging.getLogger("outbox.providers.database")

T = TypeVar("T")

_ASYNC_DRIVERS = {
    "postgresql+asyncpg": "postgresql+psycopg",
    "postgresql+psycopg_async": "postgresql+psycopg",
    "sqlite+aiosqlite": "sqlite+pysqlite",
    "mysql+asyncmy": "mysql+pymysql",
    "mysql+aiomysql": "mysql+pymysql",
    "mariadb+asyncmy": "mariadb+pymysql",
    "mariadb+aiomysql": "mariadb+pymysql",
}


def _translate(exc: BaseException) -> BaseException:
    """SQLAlchemy/driver errors as the provider contract's errors."""
    if isinstance(exc, sa.exc.DBAPIError):
        orig = exc.orig
        text = str(orig).strip().splitlines()[0] if str(orig).strip() else type(orig).__name__
        sqlstate = getattr(orig, "sqlstate", None) or ""
        code = orig.args[0] if orig is not None and orig.args else None
        if sqlstate == "42P01" or "no such table" in text or code == 1146:
            return SchemaMissing(f"outbox tables not found ({text}): {MIGRATE_HINT}")
        if (exc.connection_invalidated
                or isinstance(exc, sa.exc.OperationalError | sa.exc.InterfaceError)
                or sqlstate[:2] in ("08", "53", "57")):
            return ProviderUnavailable(f"database unavailable: {text}")
        return ProviderError(f"database error: {text}")
    if isinstance(exc, sa.exc.TimeoutError | OSError):
        return ProviderUnavailable(f"database unavailable: {exc}")
    return exc


def _select_one(conn: sa.Connection) -> None:
    conn.execute(sa.select(1))


class DatabaseProvider:
    """Events table as storage and bus. See the module docstring and docs/database-provider.md.

    ``engine``: a SQLAlchemy ``Engine`` (shared with the caller, not disposed by ``close``), an
    ``AsyncEngine`` or a URL (an engine of the provider's own). ``poll_interval``: seconds between
    looks for new events when no notification arrives. ``batch_size``: events per claim.
    ``lease``: seconds a member may hold a claim without renewing it (renewed every ``lease/3``
    while the process lives); a dead member's events are redelivered after it. ``notify``: wake
    on PostgreSQL LISTEN/NOTIFY. ``max_claims``: claims one member holds at once (prefetch).
    ``max_deliveries``: how often an event may be taken over from members that died without
    settling it (a handler that crashes its process every time) before it is parked in
    ``outbox_dead_letters`` (the same default as the Redis and NATS providers; at least three
    takes in effect, the last of them with the event handed out alone).
    ``pgbouncer``/``listen_url``: PgBouncer mode for a URL (see :mod:`outbox._engines`): no
    prepared statements, LISTEN only on ``listen_url`` (a direct connection), else polling.
    """

    name: ClassVar[str] = "database"
    capabilities: ClassVar[Capabilities] = Capabilities(
        persistent=True, cross_instance=True, relay_table=True,
    )

    def __init__(
        self,
        engine: Engine | Any,
        *,
        poll_interval: float = 1.0,
        batch_size: int = 100,
        lease: float = 30.0,
        notify: bool = True,
        max_claims: int = 2,
        max_deliveries: int = 10,
        pgbouncer: bool = False,
        listen_url: str | sa.URL | None = None,
    ) -> None:
        if poll_interval <= 0:
            raise ValueError("database.poll_interval must be > 0 seconds")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError("database.batch_size must be an integer >= 1")
        if lease <= 0:
            raise ValueError("database.lease must be > 0 seconds")
        if not isinstance(max_claims, int) or max_claims < 1:
            raise ValueError("max_claims must be an integer >= 1")
        if not isinstance(max_deliveries, int) or max_deliveries < 1:
            raise ValueError("database.max_deliveries must be an integer >= 1")
        self.engine, self._owns_engine = self._sync_engine(engine, pgbouncer)
        # LISTEN needs a session of its own: not through PgBouncer, only on a direct URL.
        self.listen_url = (engine_args(listen_url)[0] if listen_url is not None
                           else None if pgbouncer else self.engine.url)
        self.poll_interval = float(poll_interval)
        self.batch_size = batch_size
        self.lease = float(lease)
        self.notify = bool(notify)
        self.max_claims = max_claims
        self.max_deliveries = max_deliveries
        self.dialect = self.engine.dialect.name
        self._readers: set[_GroupReader] = set()
        self._tails: set[_Tail] = set()
        self._groups = GroupRegistry()
        self._keeper: asyncio.Task[None] | None = None
        self._wakeup: IdleLock | None = None  # the keeper's, while it listens
        self._resting = 0  # readers waiting for a wake-up or their poll interval
        self._cluster_cached: str | None = None
        self._cluster_known = False
        self._closed = False
        self._published = 0
        self._consumed = 0
        self._parked = 0

    @staticmethod
    def _sync_engine(engine: Engine | Any, pgbouncer: bool = False) -> tuple[Engine, bool]:
        if isinstance(engine, Engine):
            return engine, False
        if isinstance(engine, str | sa.URL):
            url = sa.make_url(engine)
        else:
            sync = getattr(engine, "sync_engine", None)
            if not isinstance(sync, Engine):
                raise TypeError("DatabaseProvider needs a SQLAlchemy Engine, AsyncEngine or URL, "
                                f"not {type(engine).__qualname__}")
            url = engine.url
        name = f"{url.get_backend_name()}+{url.get_driver_name()}"
        if name in _ASYNC_DRIVERS:
            url = url.set(drivername=_ASYNC_DRIVERS[name])
        options: dict[str, Any] = {"pool_pre_ping": True}
        if url.get_backend_name() != "sqlite":
            options.update(pool_size=5, max_overflow=10)
        return create_engine(url, pgbouncer=pgbouncer, **options), True

    @classmethod
    def from_config(cls, config: Any) -> DatabaseProvider:
        """Build from an outbox Config's ``database`` section (``url``, ``poll_interval``,
        ``batch_size``, ``lease``, ``notify``, ``max_deliveries``)."""
        section = config_section(config, "database")
        url = section.get("url")
        if not url:
            raise ConfigError("event_broker.database.url", "is required by the database provider")
        known = ("poll_interval", "batch_size", "lease", "notify", "max_deliveries",
                 "pgbouncer", "listen_url")
        options = {k: section[k] for k in known if section.get(k) is not None}
        return cls(url, **options)

    def __repr__(self) -> str:
        return f"<DatabaseProvider {url_text(self.engine.url)}>"

    async def __aenter__(self) -> DatabaseProvider:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    # -- running SQL -------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise ProviderError("DatabaseProvider is closed")

    def _tx_sync(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(conn, *args)`` in one transaction, errors as the provider contract's."""
        return self._call_sync(fn, *args, transaction=True)

    def _call_sync(self, fn: Callable[..., T], *args: Any, transaction: bool = False) -> T:
        """``fn(conn, *args)`` on a connection (in a transaction of its own with
        ``transaction``), errors as the provider contract's."""
        def run() -> T:
            with self.engine.begin() if transaction else self.engine.connect() as conn:
                return fn(conn, *args)

        try:
            # A whole transaction is run again when a concurrent one moved a row it wanted
            # (events are partitioned by status on PostgreSQL) or deadlocked with it.
            return retrying(run, what="database provider") if transaction else run()
        except Exception as exc:
            translated = _translate(exc)
            if translated is exc:
                raise
            raise translated from exc

    async def _tx(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(conn, *args)`` in one transaction, in a worker thread."""
        return await anyio.to_thread.run_sync(self._tx_sync, fn, *args)

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(conn, *args)`` on a connection (``fn`` manages its transactions)."""
        return await anyio.to_thread.run_sync(self._call_sync, fn, *args)

    async def _cluster(self) -> str | None:
        if not self._cluster_known:
            self._cluster_cached = await self._call(sql.cluster_id)
            self._cluster_known = True
        return self._cluster_cached

    def _forget_cluster(self) -> None:
        self._cluster_known = False

    async def ping(self) -> None:
        """Raise :class:`ProviderUnavailable` unless the database answers ``SELECT 1``."""
        self._check_open()
        await self._call(_select_one)

    # -- storage -----------------------------------------------------------------------------

    def _checked(self, event: Event) -> Event:
        self._check_open()
        if not isinstance(event, Event):
            raise TypeError(f"expected an outbox.Event, got {type(event).__qualname__}")
        return event

    async def store(self, event: Event) -> None:
        """Keep ``event`` without putting it on the bus (idempotent by id).

        On PostgreSQL the row gets no txid, so consumers never receive it; on SQLite every row is
        on the bus (there is no transaction id to tell them apart).
        """
        await self._tx(event_sql.insert_events, [self._checked(event)], False)

    async def publish(self, event: Event) -> None:
        """Insert ``event`` (idempotent by id) and so deliver it to every consumer group and
        stream; returns after the commit. An event stored before joins the bus now."""
        await self._tx(event_sql.insert_events, [self._checked(event)], True)
        self._published += 1

    async def publish_many(self, events: Sequence[Event]) -> builtins.list[BaseException | None]:
        """Publish ``events`` in one statement and one transaction (see ``base.publish_many``).

        When the statement fails for a reason other than an outage, each event is retried alone
        so the error lands in the slot of the event that caused it.
        """
        batch = [self._checked(e) for e in events]
        if not batch:
            return []
        try:
            await self._tx(event_sql.insert_events, batch, True)
        except ProviderUnavailable:
            raise
        except Exception:
            return await publish_each(self, batch)
        self._published += len(batch)
        return [None] * len(batch)

    async def get(self, event_id: uuid.UUID | str) -> Event | None:
        self._check_open()
        return await self._tx(event_sql.get_event, as_event_id(event_id))

    async def list(self, filter: EventFilter | None = None) -> list[Event]:
        """Events matching ``filter`` ordered by ``created_at``, ``seq``, ``id`` (indexes: see
        docs/database-provider.md, 'Queries')."""
        self._check_open()
        return await self._tx(event_sql.list_events, filter or EventFilter())

    async def update_status(
        self, event_id: uuid.UUID | str, status: EventStatus | str, error: str | None = None
    ) -> None:
        self._check_open()
        key = as_event_id(event_id)
        if not await self._tx(event_sql.update_status, key, EventStatus(status), error):
            raise EventNotFound(f"no event with id {key}")

    async def delete(self, event_id: uuid.UUID | str) -> None:
        self._check_open()
        key = as_event_id(event_id)
        if not await self._tx(event_sql.delete_event, key):
            raise EventNotFound(f"no event with id {key}")

    async def stats(self) -> ProviderStats:
        """Counts by status (exact: one indexed scan of the table) and the consumer groups."""
        self._check_open()
        counts = await self._tx(event_sql.count_by_status)
        groups = await self._tx(sql.list_groups)
        return ProviderStats(
            provider=self.name,
            total_events=sum(counts.values()),
            pending_events=counts.get(EventStatus.PENDING.value, 0),
            processing_events=counts.get(EventStatus.PROCESSING.value, 0),
            completed_events=counts.get(EventStatus.COMPLETED.value, 0),
            failed_events=counts.get(EventStatus.FAILED.value, 0),
            events_published=self._published,
            events_consumed=self._consumed,
            active_subscribers=len(self._readers) + len(self._tails),
            extra={
                "dialect": self.dialect,
                "dead_lettered_here": self._parked,
                "groups": {
                    g.name: {"position": list(g.position), "snapshot": g.cursor.snapshot,
                             "batch": g.cursor.batch, "claimed": g.cursor.seq,
                             "claims": g.claims, "updated_at": g.updated_at.isoformat()}
                    for g in groups
                },
            },
        )

    # -- groups and dead letters --------------------------------------------------------------

    async def groups(self) -> builtins.list[sql.GroupInfo]:
        """The consumer groups with their positions and claims in flight."""
        self._check_open()
        return await self._tx(sql.list_groups)

    async def delete_group(self, group: str) -> bool:
        """Forget ``group`` (its position and claims); the next consumer starts it anew."""
        self._check_open()
        return await self._tx(sql.delete_group, validate_group(group))

    async def dead_letters(
        self, group: str | None = None, limit: int = 100
    ) -> builtins.list[dict[str, Any]]:
        """Parked events (``group_name``, ``event_id``, ``error``, ``attempt``, ``parked_at``)."""
        self._check_open()
        return await self._tx(sql.dead_letters, group, limit)

    # -- transport ---------------------------------------------------------------------------

    def _require_bus(self) -> None:
        if self.dialect not in ("postgresql", "sqlite"):
            raise ProviderError(
                f"the database bus needs PostgreSQL (snapshots) or SQLite (one "
                f"writer at a time); on {self.dialect} concurrent transactions commit out of "
                "sequence order and nothing tells a reader which are still running, so consumers "
                "could skip events. Use the redis or nats provider for consumers there "
                "(docs/database-provider.md, 'Dialects')."
            )

    def stream(self, pattern: str = "*", *, group: str | None = None,
               start: StartPosition | dt.datetime = StartPosition.NOW) -> AsyncIterator[Event]:
        """Events committed from now on whose type matches ``pattern``.

        Without ``group``: a cursor in memory, from the moment of this call (nothing is
        acknowledged or redelivered). With ``group``: :meth:`consume`, each event acknowledged
        when the loop asks for the next one (an exception in the loop body leaves it to be
        redelivered).
        """
        self._check_open()
        self._require_bus()
        compile_pattern(pattern)
        if group is not None:  # consume() now: the group exists from this call on
            reader = self._group_reader(pattern, group, None, start)
            return GroupStream(self, reader)
        tail = _Tail(self, pattern, self._tx_sync(sql.start_cursor, StartPosition.NOW))
        self._tails.add(tail)
        return TailStream(self, tail)

    def consume(
        self,
        pattern: str = "*",
        *,
        group: str,
        consumer: str | None = None,
        start: StartPosition | dt.datetime = StartPosition.NOW,
    ) -> Deliveries:
        """Deliveries for consumer group ``group``: members share the work, each group gets
        every event (docs/database-provider.md, 'Consumer groups').

        ``consumer`` names this member (default: the instance id). ``start`` applies when the
        group does not exist yet: ``NOW`` (default), ``BEGINNING`` or an aware datetime. The group
        is created by this call when the database is reachable (else by the first iteration).
        Close the iterator (``aclose()`` or ``async with``) to give back what it holds at once;
        otherwise other members take it over when its lease runs out.
        """
        return Deliveries(self, self._group_reader(pattern, group, consumer, start))

    def _group_reader(self, pattern: str, group: str, consumer: str | None,
                      start: StartPosition | dt.datetime) -> _GroupReader:
        self._check_open()
        self._require_bus()
        validate_group(group)
        compile_pattern(pattern)
        start = parse_start(start)
        reader = _GroupReader(self, pattern, group, consumer or get_instance_id(), start)
        try:
            cluster = self._call_sync(sql.cluster_id)
            self._cluster_cached, self._cluster_known = cluster, True
            self._tx_sync(sql.ensure_group, group, start, cluster)
            reader.group_ready = True
        except ProviderUnavailable as exc:
            log.warning("consumer group %r: database unavailable (%s); retrying when iterated",
                        group, exc)
        self._groups.acquire(group, pattern)
        self._readers.add(reader)
        return reader

    def _forget(self, reader: _GroupReader | _Tail) -> None:
        """An iterator was closed or dropped: stop renewing and waking its reader."""
        reader.closed = True
        if isinstance(reader, _GroupReader):
            if reader in self._readers:
                self._readers.discard(reader)
                self._groups.release(reader.group)
        else:
            self._tails.discard(reader)
        if not self._readers and not self._tails and self._keeper is not None:
            self._keeper.cancel()
            self._keeper = None

    # -- wake-ups ------------------------------------------------------------------------------

    def _listen_args(self) -> dict[str, Any] | None:
        """psycopg connection arguments for LISTEN (None: not PostgreSQL with psycopg)."""
        if (self.dialect != "postgresql" or self.engine.dialect.driver != "psycopg"
                or self.listen_url is None):
            return None
        _args, kwargs = self.engine.dialect.create_connect_args(self.listen_url)
        kwargs = dict(kwargs)
        kwargs.pop("context", None)
        return kwargs

    async def _rest(self, signal: Signal, seen: int, wait: float) -> None:
        """A reader found nothing to do: wait for a wake-up (or ``wait`` seconds), holding the
        wake-up lock meanwhile, so that writers notify (outbox/_wakeup.py)."""
        wakeup = self._wakeup
        if wakeup is not None and wait >= self.poll_interval:  # idle, not a short re-look
            found = await wakeup.enter()
            if found is Idle.TAKEN:
                return  # look once more: a writer may have committed just before
            if found is Idle.WRITERS:
                wait = wakeup.writers_backoff()  # they commit soon, without notifying
        self._resting += 1
        try:
            await signal.wait(seen, wait)
        finally:
            self._resting -= 1

    async def _busy(self) -> None:
        """A reader has work: writers need not wake this provider unless another reader rests."""
        wakeup = self._wakeup
        if wakeup is not None and wakeup.held and not self._resting:
            await wakeup.leave()

    def _wake_all(self) -> None:
        for reader in self._readers:
            reader.signal.fire()
        for tail in self._tails:
            tail.signal.fire()

    def _ensure_keeper(self) -> None:
        if self._keeper is None or self._keeper.done():
            self._keeper = asyncio.get_running_loop().create_task(run_keeper(self))

    # -- lifecycle ---------------------------------------------------------------------------

    async def close(self) -> None:
        """Give back what consumers of this provider hold, stop the listener, release the
        engine when the provider created it. Idempotent."""
        if self._closed:
            return
        for reader in list(self._readers):
            await reader.close()
            self._forget(reader)
        for tail in list(self._tails):
            await tail.close()
            self._forget(tail)
        self._closed = True
        keeper, self._keeper = self._keeper, None
        if keeper is not None:
            keeper.cancel()
            with contextlib.suppress(BaseException):
                await keeper
        if self._owns_engine:
            await anyio.to_thread.run_sync(self.engine.dispose)

