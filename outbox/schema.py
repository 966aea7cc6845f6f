"""The outbox's other tables, and creating / checking the schema from code.

Production databases get their schema from Alembic (``alembic upgrade head``; the versions ship in
``outbox/migrations/versions``). :func:`create_schema` builds the same schema directly from the
mapping: for the embedded SQLite default and for tests. ``tests/migration`` proves both agree.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from outbox.events import JSONType, OutboxBase, ShortText, UTCDateTime  # noqa: F401
from outbox.exceptions import SchemaMissing

__all__ = [
    "MIGRATE_HINT",
    "check_schema",
    "consumers_table",
    "create_schema",
    "drop_schema",
    "inbox_table",
]

metadata = OutboxBase.metadata

#: Per-group cursors of the database provider's consumer groups.
consumers_table = sa.Table(
    "outbox_consumers",
    metadata,
    sa.Column("group_name", ShortText, primary_key=True),
    sa.Column("position", sa.BigInteger(), nullable=False, server_default="0",
              doc="seq of the last event handled by the group"),
    sa.Column("position_txid", sa.BigInteger(), nullable=True,
              doc="txid of that event (PostgreSQL watermark cursor)"),
    sa.Column("updated_at", UTCDateTime(), nullable=False),
)

#: Ids of events already handled by a consumer group, written in the handler's transaction.
inbox_table = sa.Table(
    "outbox_inbox",
    metadata,
    sa.Column("group_name", ShortText, primary_key=True),
    sa.Column("event_id", sa.Uuid(), primary_key=True),
    sa.Column("handled_at", UTCDateTime(), nullable=False),
)

MIGRATE_HINT = "run `alembic upgrade head` (see README: Database schema)"


def create_schema(bind: Engine | Connection, *, checkfirst: bool = True) -> None:
    """Create every outbox table, index and trigger that does not exist yet.

    Meant for SQLite (the embedded default) and tests; use Alembic for databases you deploy.
    """
    if isinstance(bind, Engine):
        with bind.begin() as conn:
            metadata.create_all(conn, checkfirst=checkfirst)
    else:
        metadata.create_all(bind, checkfirst=checkfirst)


def drop_schema(bind: Engine | Connection) -> None:
    """Drop the outbox tables (tests)."""
    if isinstance(bind, Engine):
        with bind.begin() as conn:
            drop_schema(conn)
        return
    metadata.drop_all(bind)
    if bind.dialect.name == "postgresql":
        bind.exec_driver_sql("DROP FUNCTION IF EXISTS outbox_notify() CASCADE")


def check_schema(bind: Engine | Connection, tables: tuple[str, ...] = ("events",)) -> None:
    """Raise :class:`SchemaMissing` (one line: what to run) when a table is missing."""
    if isinstance(bind, Engine):
        with bind.connect() as conn:
            check_schema(conn, tables)
        return
    inspector = sa.inspect(bind)
    missing = [t for t in tables if not inspector.has_table(t)]
    if missing:
        raise SchemaMissing(
            f"table {', '.join(missing)} not found in {bind.engine.url.render_as_string()}: "
            f"{MIGRATE_HINT}"
        )
