"""Writers and a relay through PgBouncer (transaction pooling): the test and bench/pgbouncer.py.

``run_load`` starts ``writers`` threads that commit captured rows through PgBouncer, and runs a
relay through the same PgBouncer until every event is completed, counting the database errors
the relay logs and the errors the writers hit (a writer's failed commit writes nothing: it is
counted and the writer goes on). ``pgbouncer_mode=False`` runs the same load the way it ran before
PgBouncer mode (psycopg's default prepared statements, session settings).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import anyio
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

import outbox
from outbox.providers.memory import MemoryProvider
from outbox.relay import Relay
from tests.helpers import eventually


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "load_items"
    id: Mapped[int] = mapped_column(primary_key=True)
    writer: Mapped[int]
    n: Mapped[int]


class LoadSession(Session):
    """Captured for this load only (not every Session of the process)."""


@dataclass
class LoadResult:
    events: int = 0
    completed: int = 0
    handled: int = 0
    seconds: float = 0.0
    relay_db_errors: list[str] = field(default_factory=list)
    writer_errors: list[str] = field(default_factory=list)


class _Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if "database error" in record.getMessage():
            self.messages.append(record.getMessage())


def run_load(
    pgbouncer_url: str,
    *,
    events: int,
    writers: int = 4,
    rows_per_commit: int = 5,
    pgbouncer_mode: bool = True,
    poll_interval: float = 0.05,
    timeout: float = 300.0,
) -> LoadResult:
    """Write ``events`` captured events with ``writers`` threads while a relay delivers them."""
    connect_args: dict[str, Any] = {"prepare_threshold": None} if pgbouncer_mode else {}
    setup = sa.create_engine(pgbouncer_url, connect_args=connect_args, poolclass=sa.NullPool)
    outbox.create_schema(setup)
    Base.metadata.create_all(setup)
    setup.dispose()
    result = LoadResult(events=events)
    commits = events // rows_per_commit
    engines = [sa.create_engine(pgbouncer_url, connect_args=connect_args, pool_size=1)
               for _ in range(writers)]

    def write(index: int) -> None:
        factory = sessionmaker(engines[index], class_=LoadSession)
        for c in range(index, commits, writers):
            try:
                with factory() as session:
                    session.add_all([Item(writer=index, n=c * rows_per_commit + r)
                                     for r in range(rows_per_commit)])
                    session.commit()
            except sa.exc.DBAPIError as exc:
                result.writer_errors.append(str(exc.orig).splitlines()[0])

    handled = 0

    async def count(_event: outbox.Event) -> None:
        nonlocal handled
        handled += 1

    errors = _Errors()
    relay_log = logging.getLogger("outbox.relay")
    relay_log.addHandler(errors)
    capture = outbox.capture(LoadSession)
    threads = [threading.Thread(target=write, args=(i,)) for i in range(writers)]
    started = time.perf_counter()
    try:
        for t in threads:
            t.start()

        async def relay_until_done() -> int:
            broker = outbox.Broker(MemoryProvider(max_events=events + 1000))
            broker.subscribe("public.load_items.create", count, threaded=False)
            relay = Relay(pgbouncer_url, broker=broker, provider=None, batch_size=200,
                          poll_interval=poll_interval, pgbouncer=pgbouncer_mode,
                          notify=False)
            async with anyio.create_task_group() as tg:
                tg.start_soon(relay.run)
                with anyio.fail_after(timeout):
                    for t in threads:
                        await anyio.to_thread.run_sync(t.join)
                    written = await anyio.to_thread.run_sync(_count, pgbouncer_url,
                                                             connect_args, False)
                    await eventually(lambda: relay.stats.completed >= written, within=timeout,
                                     every=0.05)
                relay.stop()
            return int(relay.stats.completed)

        anyio.run(relay_until_done)
    finally:
        for t in threads:
            t.join()
        capture.remove()
        relay_log.removeHandler(errors)
        for engine in engines:
            engine.dispose()
    result.seconds = time.perf_counter() - started
    result.handled = handled
    result.relay_db_errors = errors.messages
    result.events = _count(pgbouncer_url, connect_args, False)
    result.completed = _count(pgbouncer_url, connect_args, True)
    return result


def _count(url: str, connect_args: dict[str, Any], completed: bool) -> int:
    query = sa.select(sa.func.count()).select_from(outbox.Event)
    if completed:
        query = query.where(outbox.Event.status == "completed")
    engine = sa.create_engine(url, connect_args=connect_args, poolclass=sa.NullPool)
    try:
        with engine.connect() as conn:
            return int(conn.scalar(query) or 0)
    finally:
        engine.dispose()
