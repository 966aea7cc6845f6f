"""Rows that move between the partitions of ``events`` under a concurrent statement.

On PostgreSQL a completion moves its row from ``events_live`` to ``events_done``. A statement that
waits for such a row's lock and gets it after the mover committed fails with SQLSTATE 40001,
"tuple to be updated was already moved to another partition due to concurrent update". Each test
below provokes exactly that — a second connection moves the row and holds it, the statement under
test waits for it, the mover commits — and checks that the outbox runs the transaction again and
decides on the row where it is now (outbox/_txretry.py).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import anyio
import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

import outbox
from outbox import ops
from outbox._sql.ddl import PG_DONE_TABLE, PG_LIVE_TABLE
from outbox._sql.relay import Outcome
from outbox.events import Event
from outbox.providers.database import DatabaseProvider
from outbox.relay import RelayStore
from tests.helpers import eventually_sync

T = TypeVar("T")
events = Event.__table__


def add(engine: sa.Engine, status: str = "pending") -> uuid.UUID:
    e = outbox.new_event("system", "test.move.create", {}, status=status)
    if status == "failed":
        e.completed_at = e.created_at
    event_id = e.id
    with Session(engine) as s:
        s.add(e)
        s.commit()
    return event_id


def partition(engine: sa.Engine, event_id: uuid.UUID) -> str:
    with engine.connect() as conn:
        return str(conn.exec_driver_sql(
            "SELECT tableoid::regclass::text FROM events WHERE id = %(id)s",
            {"id": event_id}).scalar_one())


@contextlib.contextmanager
def moved_and_held(engine: sa.Engine, event_id: uuid.UUID) -> Iterator[Callable[[], None]]:
    """Move the row to events_done in an open transaction; yield the function that commits it."""
    conn = engine.connect()
    tx = conn.begin()
    conn.execute(sa.update(events).where(events.c.id == event_id).values(
        status="completed", lease_token=None, lease_expires_at=None,
        completed_at=sa.func.now()))
    try:
        yield tx.commit
    finally:
        if tx.is_active:
            tx.rollback()
        conn.close()


def blocked_on(engine: sa.Engine, thread: threading.Thread, timeout: float = 10.0) -> None:
    """Wait until some backend of the test database waits for a row lock (or ``thread`` ended:
    its error is reported by the caller)."""
    # Autocommit: within one transaction pg_stat_activity would show the same snapshot.
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:

        def waiting() -> bool:
            return not thread.is_alive() or bool(conn.exec_driver_sql(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                "AND datname = current_database()").scalar_one())

        eventually_sync(waiting, within=timeout, every=0.01,
                        what="the statement under test to wait for the row")


def run_against_a_move(engine: sa.Engine, event_id: uuid.UUID, fn: Callable[[], T]) -> T:
    """``fn()`` in a thread while another transaction moves ``event_id``: ``fn`` waits for the
    row, the mover commits, ``fn`` must not fail."""
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            result["value"] = fn()
        except BaseException as exc:  # reported below
            result["error"] = exc

    with moved_and_held(engine, event_id) as commit:
        thread = threading.Thread(target=target)
        thread.start()
        blocked_on(engine, thread)
        commit()
    thread.join(30)
    assert not thread.is_alive()
    if "error" in result:
        raise result["error"]
    return result["value"]  # type: ignore[no-any-return]


@pytest.fixture
def retries(caplog: pytest.LogCaptureFixture) -> Callable[[], int]:
    caplog.set_level(logging.DEBUG, logger="outbox")
    return lambda: sum("already moved to another partition" in r.getMessage()
                       for r in caplog.records)


def test_a_settle_after_its_row_moved_changes_nothing(
    pg_engine: sa.Engine, retries: Callable[[], int]
) -> None:
    event_id = add(pg_engine)
    store = RelayStore(pg_engine, owner="slow-relay")
    store.sync_clock()
    claim = store.claim(10, lease=30)
    assert [e.id for e in claim.events] == [event_id]

    def retry_it() -> Any:
        return store.finish(claim.token, [Outcome(claim.events[0], "pending", error="x",
                                                  retry_count=1)])

    result = run_against_a_move(pg_engine, event_id, retry_it)
    assert retries() >= 1
    assert result.settled == 0  # fenced: the row is completed by someone else now
    assert partition(pg_engine, event_id) == PG_DONE_TABLE
    with pg_engine.connect() as conn:
        row = conn.execute(sa.select(events.c.status, events.c.retry_count, events.c.error)
                           .where(events.c.id == event_id)).one()
    assert tuple(row) == ("completed", 0, None)


def test_a_lease_renewal_after_its_row_moved_reports_it_lost(
    pg_engine: sa.Engine, retries: Callable[[], int]
) -> None:
    event_id = add(pg_engine)
    store = RelayStore(pg_engine, owner="slow-relay")
    store.sync_clock()
    claim = store.claim(10, lease=30)
    held = run_against_a_move(pg_engine, event_id,
                              lambda: store.renew(claim.token, [event_id], lease=30))
    assert retries() >= 1
    assert held == 0


def test_a_replay_after_its_row_moved_skips_it(
    pg_engine: sa.Engine, retries: Callable[[], int]
) -> None:
    failed = add(pg_engine, "failed")
    assert partition(pg_engine, failed) == PG_LIVE_TABLE
    result = run_against_a_move(pg_engine, failed, lambda: ops.replay(pg_engine, ids=[failed]))
    assert retries() >= 1
    assert result.replayed == 0 and result.skipped == {failed: "completed"}


def test_a_replay_by_filter_after_a_row_moved_skips_it(
    pg_engine: sa.Engine, retries: Callable[[], int]
) -> None:
    failed = add(pg_engine, "failed")
    other = add(pg_engine, "failed")
    result = run_against_a_move(
        pg_engine, failed,
        lambda: ops.replay(pg_engine, filter=outbox.EventFilter(status="failed")))
    assert retries() >= 1
    assert result.replayed == 1
    with pg_engine.connect() as conn:
        statuses = dict(conn.execute(sa.select(events.c.id, events.c.status)).all())
    assert statuses == {failed: "completed", other: "pending"}


def test_a_status_update_through_the_database_provider_after_a_move(
    pg_engine: sa.Engine, retries: Callable[[], int]
) -> None:
    event_id = add(pg_engine)
    provider = DatabaseProvider(pg_engine)
    try:
        run_against_a_move(pg_engine, event_id, lambda: anyio.run(
            provider.update_status, event_id, "failed", "gave up"))
    finally:
        anyio.run(provider.close)
    assert retries() >= 1
    with pg_engine.connect() as conn:
        row = conn.execute(sa.select(events.c.status, events.c.error)
                           .where(events.c.id == event_id)).one()
    assert tuple(row) == ("failed", "gave up")  # the provider's update wins, applied afresh
    assert partition(pg_engine, event_id) == PG_LIVE_TABLE
