"""outbox: PostgreSQL's events partitioned by status (events_live, events_done); gated NOTIFY.

Revision ID: outbox_0002
Revises: outbox_0001
Create Date: 2026-12-04

PostgreSQL only (SQLite and MariaDB/MySQL keep the single table). ``events`` becomes a table
LIST-partitioned by ``status``: the existing table, with the completed rows and its audit indexes,
becomes the partition ``events_done`` (renamed, not copied); the unfinished rows move to the new
partition ``events_live``, which has the relay's indexes only. Rows, ids, ``seq`` values and
``txid`` values are kept; new rows continue the ``seq`` numbering. ``ordering_key`` compares
byte-wise (collation "C", like ``type``). docs/relay.md ("Storage") explains the layout and how
long the upgrade locks the table.

The NOTIFY trigger notifies only while a listener waits (it tests an advisory lock that waiting
listeners hold, see ``outbox/_wakeup.py``).

Frozen: this revision does not read the current mapping; later changes get new revisions.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "outbox_0002"
down_revision: str | Sequence[str] | None = "outbox_0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

QUEUE_VACUUM = (
    "autovacuum_vacuum_scale_factor = 0.0, autovacuum_vacuum_threshold = 5000, "
    "autovacuum_vacuum_insert_scale_factor = 0.0, autovacuum_vacuum_insert_threshold = 20000, "
    "autovacuum_analyze_scale_factor = 0.0, autovacuum_analyze_threshold = 20000"
)
HISTORY_VACUUM = (
    "autovacuum_vacuum_insert_scale_factor = 0.0, autovacuum_vacuum_insert_threshold = 100000, "
    "autovacuum_analyze_scale_factor = 0.0, autovacuum_analyze_threshold = 100000"
)
QUEUE_VACUUM_KEYS = (
    "autovacuum_vacuum_scale_factor, autovacuum_vacuum_threshold, "
    "autovacuum_vacuum_insert_scale_factor, autovacuum_vacuum_insert_threshold, "
    "autovacuum_analyze_scale_factor, autovacuum_analyze_threshold"
)
# The relay's indexes of revision outbox_0001 (the history partition does not need them).
RELAY_INDEXES_0001 = (
    "CREATE INDEX ix_events_pending ON events (seq, next_attempt_at) WHERE status = 'pending'",
    "CREATE INDEX ix_events_unfinished_key ON events (ordering_key, seq) "
    "WHERE status <> 'completed' AND ordering_key IS NOT NULL",
    "CREATE INDEX ix_events_status_created_at ON events (status, created_at) "
    "WHERE status <> 'completed'",
)
LIVE_INDEXES = (
    "ALTER TABLE events_live ADD CONSTRAINT pk_events_live PRIMARY KEY (id)",
    "CREATE INDEX ix_events_live_seq ON events_live (seq, next_attempt_at)",
    "CREATE INDEX ix_events_live_key ON events_live (ordering_key, seq) "
    "WHERE ordering_key IS NOT NULL",
    "CREATE INDEX ix_events_live_txid_seq ON events_live (txid, seq) WHERE txid IS NOT NULL",
)
WAKE_LOCK = "1869574000, hashtext(TG_ARGV[0]) & 2147483647"
NOTIFY_FUNCTION = f"""
CREATE OR REPLACE FUNCTION outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF coalesce(current_setting('outbox.notify', true), '') NOT IN ('off', 'false', '0')
       AND NOT pg_try_advisory_xact_lock_shared({WAKE_LOCK}) THEN
        PERFORM pg_notify(TG_ARGV[0], '');
    END IF;
    RETURN NULL;
END
$$
"""
NOTIFY_FUNCTION_0001 = """
CREATE OR REPLACE FUNCTION outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF coalesce(current_setting('outbox.notify', true), '') NOT IN ('off', 'false', '0') THEN
        PERFORM pg_notify(TG_ARGV[0], '');
    END IF;
    RETURN NULL;
END
$$
"""
NOTIFY_TRIGGER = (
    "CREATE TRIGGER outbox_notify AFTER INSERT ON events "
    "FOR EACH STATEMENT EXECUTE FUNCTION outbox_notify('outbox_events')"
)
# The next value the seq identity would hand out, from its sequence.
NEXT_SEQ = """
SELECT CASE WHEN is_called THEN last_value + 1 ELSE last_value END
FROM {sequence}
"""


def _next_seq(table: str) -> int:
    bind = op.get_bind()
    sequence = bind.exec_driver_sql(
        f"SELECT pg_get_serial_sequence('{table}', 'seq')"  # constant table names
    ).scalar_one()
    value: int = bind.exec_driver_sql(NEXT_SEQ.format(sequence=sequence)).scalar_one()
    return value


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("LOCK TABLE events IN ACCESS EXCLUSIVE MODE")
    start = _next_seq("events")
    # The existing table becomes the history partition: its rows and audit indexes stay put.
    op.execute("ALTER TABLE events RENAME TO events_done")
    op.execute("ALTER TABLE events_done RENAME CONSTRAINT pk_events TO pk_events_done")
    op.execute("DROP TRIGGER outbox_notify ON events_done")
    op.execute("ALTER TABLE events_done ALTER COLUMN seq DROP IDENTITY")
    # Ordering keys are compared for equality only: byte-wise. (Without an index on the column
    # this rewrites nothing.)
    op.execute("DROP INDEX ix_events_unfinished_key")
    op.execute('ALTER TABLE events_done ALTER COLUMN ordering_key TYPE text COLLATE "C"')
    op.execute("CREATE TABLE events (LIKE events_done INCLUDING DEFAULTS) "
               "PARTITION BY LIST (status)")
    op.execute(f"ALTER TABLE events ALTER COLUMN seq ADD GENERATED BY DEFAULT AS IDENTITY "
               f"(START WITH {int(start)})")
    op.execute("CREATE TABLE events_live PARTITION OF events "
               "FOR VALUES IN ('pending', 'processing', 'failed') "
               f"WITH (fillfactor = 50, {QUEUE_VACUUM})")
    for ddl in LIVE_INDEXES:
        op.execute(ddl)
    # The unfinished rows (few, found through the old status index) move to events_live; a
    # status outside the four fails here, and the whole upgrade is rolled back.
    op.execute("INSERT INTO events_live SELECT * FROM events_done WHERE status <> 'completed'")
    op.execute("DELETE FROM events_done WHERE status <> 'completed'")
    for name in ("ix_events_pending", "ix_events_status_created_at"):
        op.execute(f"DROP INDEX {name}")
    op.execute("ALTER TABLE events_done DROP CONSTRAINT uq_events_seq")
    # One scan proves the constraint, so ATTACH needs none.
    op.execute("ALTER TABLE events_done ADD CONSTRAINT events_done_completed "
               "CHECK (status = 'completed')")
    op.execute("ALTER TABLE events ATTACH PARTITION events_done FOR VALUES IN ('completed')")
    op.execute("ALTER TABLE events_done DROP CONSTRAINT events_done_completed")
    op.execute(f"ALTER TABLE events_done RESET ({QUEUE_VACUUM_KEYS})")
    op.execute(f"ALTER TABLE events_done SET ({HISTORY_VACUUM})")
    op.execute(NOTIFY_FUNCTION)
    op.execute(NOTIFY_TRIGGER)


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("LOCK TABLE events IN ACCESS EXCLUSIVE MODE")
    start = _next_seq("events")
    op.execute("ALTER TABLE events DETACH PARTITION events_done")
    op.execute("INSERT INTO events_done SELECT * FROM events_live")
    op.execute("DROP TABLE events")  # the parent, events_live, the trigger, the identity
    op.execute("ALTER TABLE events_done RENAME TO events")
    op.execute("ALTER TABLE events RENAME CONSTRAINT pk_events_done TO pk_events")
    op.execute('ALTER TABLE events ALTER COLUMN ordering_key TYPE text COLLATE "default"')
    op.execute(f"ALTER TABLE events ALTER COLUMN seq ADD GENERATED BY DEFAULT AS IDENTITY "
               f"(START WITH {int(start)})")
    op.execute("ALTER TABLE events ADD CONSTRAINT uq_events_seq UNIQUE (seq)")
    for ddl in RELAY_INDEXES_0001:
        op.execute(ddl)
    op.execute(f"ALTER TABLE events RESET ({QUEUE_VACUUM_KEYS})")
    op.execute(f"ALTER TABLE events SET ({QUEUE_VACUUM})")
    op.execute(NOTIFY_FUNCTION_0001)
    op.execute(NOTIFY_TRIGGER)
