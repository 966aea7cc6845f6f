"""outbox: events, outbox_consumers, outbox_consumer_claims, outbox_dead_letters, outbox_inbox.

Revision ID: outbox_0001
Revises:
Create Date: 2026-11-27

Frozen copy of the schema of ``outbox.Event`` at this revision; later changes get new revisions.
Dialect-specific parts: PostgreSQL gets an identity ``seq``, ``txid`` defaulting to the inserting
transaction id, per-table autovacuum settings and the NOTIFY trigger; SQLite numbers ``seq`` with a
trigger; MariaDB/MySQL with AUTO_INCREMENT.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql, postgresql

revision: str = "outbox_0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = ("outbox",)
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
TEXT = sa.Text().with_variant(sa.String(255), "mysql", "mariadb")
# Event types compare byte-wise on PostgreSQL so pattern prefixes are index ranges.
TYPE_TEXT = (
    sa.Text()
    .with_variant(postgresql.TEXT(collation="C"), "postgresql")
    .with_variant(sa.String(255), "mysql", "mariadb")
)
TS = sa.DateTime(timezone=True).with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")

PENDING = sa.text("status = 'pending'")
UNFINISHED_WITH_KEY = sa.text("status <> 'completed' AND ordering_key IS NOT NULL")
NOT_COMPLETED = sa.text("status <> 'completed'")
HAS_USER = sa.text("user_id IS NOT NULL")
HAS_SESSION = sa.text("session_id IS NOT NULL")
HAS_ENTITY = sa.text("entity IS NOT NULL OR entity_id IS NOT NULL")

PG_NOTIFY_FUNCTION = """
CREATE OR REPLACE FUNCTION outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF coalesce(current_setting('outbox.notify', true), '') NOT IN ('off', 'false', '0') THEN
        PERFORM pg_notify(TG_ARGV[0], '');
    END IF;
    RETURN NULL;
END
$$
"""


def upgrade() -> None:
    dialect = op.get_bind().dialect.name
    # SQLite: a random negative placeholder, renumbered by the events_assign_seq trigger.
    seq_default: sa.Identity | sa.DefaultClause = (
        sa.DefaultClause(sa.text("(-abs(random()) - 1)"))
        if dialect == "sqlite"
        else sa.Identity(always=False)
    )
    op.create_table(
        "events",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column(
            "seq",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            seq_default,
            nullable=False,
        ),
        sa.Column("source", TEXT, nullable=False),
        sa.Column("type", TYPE_TEXT, nullable=False),
        sa.Column("status", TEXT, nullable=False),
        sa.Column("payload", JSON, nullable=False),
        sa.Column("user_id", TEXT, nullable=True),
        sa.Column("session_id", TEXT, nullable=True),
        sa.Column("instance_id", TEXT, nullable=False),
        sa.Column("schema_name", TEXT, nullable=True),
        sa.Column("entity", TEXT, nullable=True),
        sa.Column("entity_id", TEXT, nullable=True),
        sa.Column("operation", TEXT, nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("processed_at", TS, nullable=True),
        sa.Column("completed_at", TS, nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("metadata", JSON, nullable=False),
        sa.Column("retry_count", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", TS, nullable=False),
        sa.Column("ordering_key", TEXT, nullable=True),
        sa.Column("lease_owner", TEXT, nullable=True),
        sa.Column("lease_token", sa.Uuid(), nullable=True),
        sa.Column("lease_expires_at", TS, nullable=True),
        sa.Column("txid", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_events"),
        sa.UniqueConstraint("seq", name="uq_events_seq"),
    )
    # Partial where the dialect allows it (not MariaDB): every status change of an event writes
    # an entry into each index whose predicate the new row version satisfies (see Event).
    op.create_index("ix_events_pending", "events", ["seq", "next_attempt_at"],
                    postgresql_where=PENDING, sqlite_where=PENDING)
    op.create_index("ix_events_unfinished_key", "events", ["ordering_key", "seq"],
                    postgresql_where=UNFINISHED_WITH_KEY, sqlite_where=UNFINISHED_WITH_KEY)
    op.create_index("ix_events_status_created_at", "events", ["status", "created_at"],
                    postgresql_where=NOT_COMPLETED)
    op.create_index("ix_events_type_created_at", "events", ["type", "created_at"])
    op.create_index("ix_events_entity_entity_id", "events", ["entity", "entity_id"],
                    postgresql_where=HAS_ENTITY)
    op.create_index("ix_events_user_id", "events", ["user_id"],
                    postgresql_where=HAS_USER, sqlite_where=HAS_USER)
    op.create_index("ix_events_session_id", "events", ["session_id"],
                    postgresql_where=HAS_SESSION, sqlite_where=HAS_SESSION)
    op.create_index("ix_events_instance_id_created_at", "events", ["instance_id", "created_at"])
    op.create_index("ix_events_created_at", "events", ["created_at"])
    op.create_index("ix_events_txid_seq", "events", ["txid", "seq"],
                    postgresql_where=sa.text("txid IS NOT NULL"))

    if dialect == "postgresql":
        op.execute(
            "ALTER TABLE events ALTER COLUMN txid SET DEFAULT (pg_current_xact_id()::text::bigint)"
        )
        op.execute(
            "ALTER TABLE events SET (autovacuum_vacuum_scale_factor = 0.0, "
            "autovacuum_vacuum_threshold = 5000, autovacuum_vacuum_insert_scale_factor = 0.0, "
            "autovacuum_vacuum_insert_threshold = 20000, autovacuum_analyze_scale_factor = 0.0, "
            "autovacuum_analyze_threshold = 20000)"
        )
        op.execute(PG_NOTIFY_FUNCTION)
        op.execute(
            "CREATE TRIGGER outbox_notify AFTER INSERT ON events "
            "FOR EACH STATEMENT EXECUTE FUNCTION outbox_notify('outbox_events')"
        )
    elif dialect == "sqlite":
        op.execute(
            """
            CREATE TRIGGER events_assign_seq AFTER INSERT ON events
            FOR EACH ROW WHEN NEW.seq < 0
            BEGIN
                UPDATE events SET seq = (SELECT coalesce(max(seq), 0) + 1 FROM events
                                         WHERE seq > 0)
                WHERE id = NEW.id;
            END
            """
        )
    elif dialect in ("mysql", "mariadb"):
        op.execute("ALTER TABLE events MODIFY seq BIGINT NOT NULL AUTO_INCREMENT")

    op.create_table(
        "outbox_consumers",
        sa.Column("group_name", TEXT, nullable=False),
        sa.Column("position", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("position_txid", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("claimed", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("claimed_txid", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("start_snapshot", sa.Text(), nullable=True),
        sa.Column("start_time", TS, nullable=True),
        sa.Column("cluster_id", TEXT, nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("group_name", name="pk_outbox_consumers"),
    )
    op.create_table(
        "outbox_consumer_claims",
        sa.Column("group_name", TEXT, nullable=False),
        sa.Column("hi_txid", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("hi_seq", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("lo_txid", sa.BigInteger(), nullable=False),
        sa.Column("lo_seq", sa.BigInteger(), nullable=False),
        sa.Column("consumer", TEXT, nullable=False),
        sa.Column("token", sa.Uuid(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("lease_expires_at", TS, nullable=False),
        sa.Column("claimed_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("group_name", "hi_txid", "hi_seq",
                                name="pk_outbox_consumer_claims"),
    )
    op.create_table(
        "outbox_dead_letters",
        sa.Column("group_name", TEXT, nullable=False),
        sa.Column("event_id", sa.Uuid(), nullable=False),
        sa.Column("error", sa.Text(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("parked_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("group_name", "event_id", name="pk_outbox_dead_letters"),
    )
    op.create_table(
        "outbox_inbox",
        sa.Column("group_name", TEXT, nullable=False),
        sa.Column("event_id", sa.Uuid(), nullable=False),
        sa.Column("handled_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("group_name", "event_id", name="pk_outbox_inbox"),
    )


def downgrade() -> None:
    dialect = op.get_bind().dialect.name
    op.drop_table("outbox_inbox")
    op.drop_table("outbox_dead_letters")
    op.drop_table("outbox_consumer_claims")
    op.drop_table("outbox_consumers")
    op.drop_table("events")  # drops its indexes and triggers
    if dialect == "postgresql":
        op.execute("DROP FUNCTION IF EXISTS outbox_notify()")
