"""The outbox's other tables, and creating / checking the schema from code.

Production databases get their schema from Alembic (``alembic upgrade head``; the versions ship in
``outbox/migrations/versions``). :func:`create_schema` builds the same schema directly from the
mapping: for the embedded SQLite default and for tests. ``tests/migration`` proves both agree.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from outbox._redact import url_text
from outbox._sql import ddl
from outbox.events import JSONType, OutboxBase, ShortText, UTCDateTime  # noqa: F401
from outbox.exceptions import SchemaMissing

__all__ = [
    "MIGRATE_HINT",
    "check_schema",
    "consumer_claims_table",
    "consumers_table",
    "create_schema",
    "dead_letters_table",
    "drop_schema",
    "inbox_table",
]

metadata = OutboxBase.metadata

#: Consumer groups of the database provider: one row per group (docs/database-provider.md).
#: A group reads the bus in batches between snapshots (PostgreSQL); SQLite uses ``claimed`` alone.
consumers_table = sa.Table(
    "outbox_consumers",
    metadata,
    sa.Column("group_name", ShortText, primary_key=True),
    sa.Column("snapshot", sa.Text(), nullable=True,
              doc="pg_current_snapshot() every transaction visible in which is claimed or "
                  "settled for the group (NULL: none yet)"),
    sa.Column("batch", sa.Text(), nullable=True,
              doc="the open batch: rows visible in this snapshot and not in `snapshot`"),
    sa.Column("claimed", sa.BigInteger(), nullable=False, server_default="0",
              doc="seq up to which the open batch is claimed (SQLite: the whole bus)"),
    sa.Column("batch_end", sa.BigInteger(), nullable=True,
              doc="highest seq of the open batch (NULL: the batch is empty)"),
    sa.Column("start_time", UTCDateTime(), nullable=True,
              doc="a group started at a time: its first batch holds the rows created since"),
    sa.Column("cluster_id", ShortText, nullable=True,
              doc="PostgreSQL system identifier of the cluster whose snapshots the group holds"),
    sa.Column("created_at", UTCDateTime(), nullable=False),
    sa.Column("updated_at", UTCDateTime(), nullable=False),
)

#: Events a member of a group is working on, leased: ``event_ids`` in bus order, ``hi`` the last
#: one's position, ``lo`` the last one of the acknowledged prefix.
consumer_claims_table = sa.Table(
    "outbox_consumer_claims",
    metadata,
    sa.Column("group_name", ShortText, primary_key=True),
    sa.Column("hi_txid", sa.BigInteger(), primary_key=True, autoincrement=False),
    sa.Column("hi_seq", sa.BigInteger(), primary_key=True, autoincrement=False),
    sa.Column("lo_txid", sa.BigInteger(), nullable=False,
              doc="the last event of the acknowledged prefix (the claim's start before any)"),
    sa.Column("lo_seq", sa.BigInteger(), nullable=False),
    sa.Column("event_ids", sa.Text(), nullable=False, server_default="",
              doc="the claimed events' ids, comma-separated, in bus order"),
    sa.Column("consumer", ShortText, nullable=False),
    sa.Column("token", sa.Uuid(), nullable=False, doc="fences a consumer that lost the lease"),
    sa.Column("attempt", sa.Integer(), nullable=False, doc="times the range was handed out"),
    sa.Column("lease_expires_at", UTCDateTime(), nullable=False),
    sa.Column("claimed_at", UTCDateTime(), nullable=False),
    # Looking for expired claims reads only those: the claims of a busy group that a long
    # transaction elsewhere keeps from being cleaned up still have their leases ahead.
    sa.Index("ix_outbox_consumer_claims_expiry", "group_name", "lease_expires_at"),
)

#: Events a consumer group gave up on (``Delivery.park``), with the error.
dead_letters_table = sa.Table(
    "outbox_dead_letters",
    metadata,
    sa.Column("group_name", ShortText, primary_key=True),
    sa.Column("event_id", sa.Uuid(), primary_key=True),
    sa.Column("error", sa.Text(), nullable=False),
    sa.Column("attempt", sa.Integer(), nullable=False),
    sa.Column("parked_at", UTCDateTime(), nullable=False),
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
    ddl.drop_functions(bind)


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
            f"table {', '.join(missing)} not found in {url_text(bind.engine.url)}: "
            f"{MIGRATE_HINT}"
        )
