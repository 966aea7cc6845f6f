"""DDL of the ``events`` table that SQLAlchemy Core cannot express portably, per dialect.

``outbox.Event``'s mapping creates the table (``create_schema``; the Alembic revisions issue the
same statements, frozen); :func:`after_create` lists what each dialect adds right after it:

- PostgreSQL: the partitions ``events_live`` and ``events_done`` with their keys and indexes,
  ``txid``'s default, and the wake-up trigger (docs/relay.md, "Storage" and "Wake-up");
- SQLite: the trigger that numbers ``seq``;
- MariaDB/MySQL: ``seq`` as ``AUTO_INCREMENT``.

Standalone (it imports nothing of the package): ``outbox.events`` runs it on ``after_create``.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "INDEX_PREFIX",
    "LIVE_STATUSES",
    "NOTIFY_CHANNEL",
    "PG_DONE_INDEXES",
    "PG_DONE_TABLE",
    "PG_LIVE_INDEXES",
    "PG_LIVE_TABLE",
    "PG_SECONDARY_INDEXES",
    "PREFIX_INDEXED",
    "WAKE_LOCK_CLASS",
    "after_create",
    "drop_functions",
    "storage_outdated",
]

#: Default LISTEN/NOTIFY channel.
NOTIFY_CHANNEL = "outbox_events"

# PostgreSQL layout (docs/relay.md, "Storage"). ``events`` is LIST-partitioned by status:
#
# - ``events_live`` holds the unfinished rows (pending, processing, failed) with only the relay's
#   indexes, none of which mentions a column that a claim or a renewal changes (status, lease):
#   those updates are HOT (no index entries) when the page has room, which the fill factor of 50
#   leaves for one new version of every row;
# - ``events_done`` holds the completed rows with the audit indexes. The relay's completion moves
#   a row there (an UPDATE of ``status`` across partitions is a delete plus an insert), so the
#   audit indexes are written once per event, by the relay, not by the writer.
#
# The parent has no keys or indexes of its own (a unique key of a partitioned table must contain
# the partition key, and an index declared on the parent would be built on both partitions): ids
# are unique per partition and by construction across them; ``seq`` is unique by its identity.
PG_LIVE_TABLE = "events_live"
PG_DONE_TABLE = "events_done"
#: Statuses of the rows in ``events_live``; ``completed`` rows are in ``events_done``.
LIVE_STATUSES: tuple[str, ...] = ("pending", "processing", "failed")
#: Fill factor of ``events_live``: room on each page for a second version of every row.
PG_LIVE_FILLFACTOR = 50
_PG_QUEUE_VACUUM = (  # many dead rows quickly: claims, moves to events_done
    "autovacuum_vacuum_scale_factor = 0.0, autovacuum_vacuum_threshold = 5000, "
    "autovacuum_vacuum_insert_scale_factor = 0.0, autovacuum_vacuum_insert_threshold = 20000, "
    "autovacuum_analyze_scale_factor = 0.0, autovacuum_analyze_threshold = 20000"
)
_PG_HISTORY_VACUUM = (  # insert-only until cleanup: vacuum for the visibility map and freezing
    "autovacuum_vacuum_insert_scale_factor = 0.0, autovacuum_vacuum_insert_threshold = 100000, "
    "autovacuum_analyze_scale_factor = 0.0, autovacuum_analyze_threshold = 100000"
)
_LIVE_IN = ", ".join(f"'{s}'" for s in LIVE_STATUSES)
#: The two partitions, their keys and indexes (the history partition's audit indexes keep the
#: names they had on the single table).
PG_PARTITIONS: tuple[str, ...] = (
    f"CREATE TABLE {PG_LIVE_TABLE} PARTITION OF events FOR VALUES IN ({_LIVE_IN}) "
    f"WITH (fillfactor = {PG_LIVE_FILLFACTOR}, {_PG_QUEUE_VACUUM})",
    f"CREATE TABLE {PG_DONE_TABLE} PARTITION OF events FOR VALUES IN ('completed') "
    f"WITH ({_PG_HISTORY_VACUUM})",
)
#: ``events_live``: the claim walks due rows in seq order; the per-key probe looks for an older
#: row of the key (every row here is unfinished); commit order for the bus. No predicate or key
#: mentions ``status``, the lease or ``completed_at``, so claims and renewals can be HOT updates:
#: status filters on unfinished rows read this partition, whose size is the backlog.
PG_LIVE_INDEXES: tuple[str, ...] = (
    f"ALTER TABLE {PG_LIVE_TABLE} ADD CONSTRAINT pk_events_live PRIMARY KEY (id)",
    f"CREATE INDEX ix_events_live_seq ON {PG_LIVE_TABLE} (seq, next_attempt_at)",
    f"CREATE INDEX ix_events_live_key ON {PG_LIVE_TABLE} (ordering_key, seq) "
    "WHERE ordering_key IS NOT NULL",
    f"CREATE INDEX ix_events_live_txid_seq ON {PG_LIVE_TABLE} (txid, seq) "
    "WHERE txid IS NOT NULL",
)
#: Text columns that any writer fills with any text and the history indexes. A btree entry holds
#: at most ~2.7 kB, and a longer value would make the row's move into ``events_done`` fail, so
#: their indexes cannot overflow: ``user_id``, ``session_id`` and ``entity_id``, looked up by
#: equality only, have hash indexes (plain ``column = value`` SQL uses them); ``instance_id``,
#: whose index also gives the order by time, a btree over ``left(instance_id, 200)``
#: (:data:`PREFIX_INDEXED`; lookups compare the prefix, then the whole value:
#: ``outbox._sql.events.equals``). ``type`` keeps a whole-value btree (its patterns are ranges).
PREFIX_INDEXED: frozenset[str] = frozenset({"instance_id"})
INDEX_PREFIX = 200

#: ``events_done``: the audit indexes (by type, entity, user, session, instance, time) and the
#: bus's two: ``(txid, seq)`` finds the rows of given transactions, ``seq`` reads a batch in order.
PG_DONE_INDEXES: tuple[str, ...] = (
    f"ALTER TABLE {PG_DONE_TABLE} ADD CONSTRAINT pk_events_done PRIMARY KEY (id)",
    f"CREATE INDEX ix_events_type_created_at ON {PG_DONE_TABLE} (type, created_at)",
    f"CREATE INDEX ix_events_entity_entity_id ON {PG_DONE_TABLE} USING hash (entity_id) "
    "WHERE entity_id IS NOT NULL",
    f"CREATE INDEX ix_events_user_id ON {PG_DONE_TABLE} USING hash (user_id) "
    "WHERE user_id IS NOT NULL",
    f"CREATE INDEX ix_events_session_id ON {PG_DONE_TABLE} USING hash (session_id) "
    "WHERE session_id IS NOT NULL",
    f"CREATE INDEX ix_events_instance_id_created_at ON {PG_DONE_TABLE} "
    f"(left(instance_id, {INDEX_PREFIX}), created_at)",
    f"CREATE INDEX ix_events_created_at ON {PG_DONE_TABLE} (created_at)",
    f"CREATE INDEX ix_events_txid_seq ON {PG_DONE_TABLE} (txid, seq) WHERE txid IS NOT NULL",
    f"CREATE INDEX ix_events_bus_seq ON {PG_DONE_TABLE} (seq) WHERE txid IS NOT NULL",
)
#: PostgreSQL's secondary indexes of both partitions, ``(name, CREATE INDEX statement)`` — for
#: bulk loads that drop them first and build them after (tests, benchmarks).
PG_SECONDARY_INDEXES: tuple[tuple[str, str], ...] = tuple(
    (ddl.split()[2], ddl) for ddl in (*PG_LIVE_INDEXES, *PG_DONE_INDEXES)
    if ddl.startswith("CREATE INDEX")
)
PG_TXID_DEFAULT = (
    "ALTER TABLE events ALTER COLUMN txid SET DEFAULT (pg_current_xact_id()::text::bigint)"
)

#: Advisory lock that an idle listener (a relay or a database-bus consumer waiting for work)
#: holds exclusively: ``(WAKE_LOCK_CLASS, hashtext(channel) & 2147483647)``. A writer notifies
#: only when it cannot take the lock shared, i.e. only while someone waits (outbox/_wakeup.py).
WAKE_LOCK_CLASS = 1_869_574_000
WAKE_LOCK_KEY_SQL = "hashtext({channel}) & 2147483647"

#: The writers' wake-up: a statement trigger on ``events``, at most one notification per
#: transaction (PostgreSQL folds identical notifications of one transaction into one), and only
#: while a listener is idle; ``SET outbox.notify = off`` (session, role or database) disables it.
#: The shared lock, once taken, is held to the end of the writer's transaction: a listener that
#: goes idle meanwhile sees it and looks again after the commit instead of sleeping.
_WAKE_LOCK_ARGS = f"{WAKE_LOCK_CLASS}, {WAKE_LOCK_KEY_SQL.format(channel='TG_ARGV[0]')}"
PG_NOTIFY_FUNCTION = f"""
CREATE OR REPLACE FUNCTION outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF coalesce(current_setting('outbox.notify', true), '') NOT IN ('off', 'false', '0')
       AND NOT pg_try_advisory_xact_lock_shared({_WAKE_LOCK_ARGS}) THEN
        PERFORM pg_notify(TG_ARGV[0], '');
    END IF;
    RETURN NULL;
END
$$
"""
PG_NOTIFY_TRIGGER = (
    "CREATE TRIGGER outbox_notify AFTER INSERT ON events "
    f"FOR EACH STATEMENT EXECUTE FUNCTION outbox_notify('{NOTIFY_CHANNEL}')"
)
#: SQLite cannot auto-increment a non-primary-key column: rows are inserted with a random
#: negative placeholder (the column default, see ``_sqlite_seq_default``) and numbered right after
#: insert, inside the same statement. SQLite has one writer at a time, so max + 1 is safe.
SQLITE_SEQ_DEFAULT = "(-abs(random()) - 1)"
SQLITE_SEQ_TRIGGER = """
CREATE TRIGGER events_assign_seq AFTER INSERT ON events
FOR EACH ROW WHEN NEW.seq < 0
BEGIN
    UPDATE events SET seq = (SELECT coalesce(max(seq), 0) + 1 FROM events WHERE seq > 0)
    WHERE id = NEW.id;
END
"""
MYSQL_SEQ = "ALTER TABLE events MODIFY seq BIGINT NOT NULL AUTO_INCREMENT"


def after_create(dialect_name: str) -> list[str]:
    """Statements to run after creating the ``events`` table on ``dialect_name``."""
    if dialect_name == "postgresql":
        return [*PG_PARTITIONS, *PG_LIVE_INDEXES, *PG_DONE_INDEXES, PG_TXID_DEFAULT,
                PG_NOTIFY_FUNCTION, PG_NOTIFY_TRIGGER]
    if dialect_name == "sqlite":
        return [SQLITE_SEQ_TRIGGER]
    if dialect_name in ("mysql", "mariadb"):
        return [MYSQL_SEQ]
    return []


def drop_functions(bind: Any) -> None:
    """Drop what ``DROP TABLE`` leaves behind (the trigger function on PostgreSQL)."""
    if bind.dialect.name == "postgresql":
        bind.exec_driver_sql("DROP FUNCTION IF EXISTS outbox_notify() CASCADE")


def storage_outdated(bind: Any) -> bool:
    """True on PostgreSQL when ``events`` is still the single table of revision ``outbox_0001``
    (not partitioned by status: docs/relay.md, "Storage"). Everything works on it, slower."""
    if bind.dialect.name != "postgresql":
        return False
    kind = bind.exec_driver_sql(
        "SELECT relkind FROM pg_class WHERE oid = to_regclass('events')"
    ).scalar()
    return kind is not None and kind != "p"
