"""SQLite: savepoints (``Session.begin_nested()``) that keep capture's guarantee.

pysqlite (the ``sqlite3`` module) begins a transaction only before the first INSERT/UPDATE/DELETE
and commits on its own before DDL. A ``SAVEPOINT`` issued first then starts a transaction itself
and its ``RELEASE`` commits everything — the outer rollback no longer undoes the change *or its
event*. :func:`sqlite_savepoints` applies SQLAlchemy's documented recipe ("Serializable isolation /
Savepoints / Transactional DDL"): the driver's own transaction handling is switched off on
connect and SQLAlchemy emits ``BEGIN`` when a transaction begins.

Apply it to the engine of an application that uses ``begin_nested()`` on SQLite (the test suite's
``engine`` fixture has it). The outbox's own SQLite engines (the embedded relay, the database
provider, the CLI) never open a savepoint and keep pysqlite's behaviour, which takes the write
lock only when a statement writes.
"""

from __future__ import annotations

from typing import Any, TypeVar

import sqlalchemy as sa

__all__ = ["sqlite_savepoints"]

E = TypeVar("E")


def _driver_transactions_off(dbapi_connection: Any, _record: Any) -> None:
    dbapi_connection.isolation_level = None  # no implicit BEGIN / COMMIT from pysqlite


def _begin(conn: sa.Connection) -> None:
    conn.exec_driver_sql("BEGIN")


def sqlite_savepoints(engine: E) -> E:
    """Make ``begin_nested()`` work on a SQLite ``Engine`` or ``AsyncEngine`` (aiosqlite); returns
    ``engine``. Other dialects are left alone; applying it twice changes nothing. Apply it before
    the engine's first use: connections a (sync) engine pooled before are discarded."""
    sync: sa.Engine = getattr(engine, "sync_engine", None) or engine  # type: ignore[assignment]
    if sync.dialect.name != "sqlite" or sa.event.contains(sync, "connect",
                                                          _driver_transactions_off):
        return engine
    sa.event.listen(sync, "connect", _driver_transactions_off)
    sa.event.listen(sync, "begin", _begin)
    if sync is engine:  # pooled connections were opened with the driver's handling
        sync.dispose()
    return engine
