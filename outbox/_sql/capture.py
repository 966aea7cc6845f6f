"""The statements capture runs on ``events`` (``outbox._capture`` builds the rows).

- :data:`INSERT_EVENTS`: the Core ``INSERT`` of event rows (every dialect but PostgreSQL on
  psycopg or psycopg2; an executemany for several rows).
- :data:`PG_INSERT_EVENTS`: PostgreSQL on psycopg or psycopg2: the rows of a flush travel as one
  JSON array and the server expands them (see the comment above it).
- :data:`SQLITE_TAKE_WRITE_LOCK`: a no-op write that starts SQLite's write transaction.
- :func:`pg_uuid7_sql`: a version-7 event id built by PostgreSQL (also used by ``bench/``).
"""

from __future__ import annotations

import sqlalchemy as sa

from outbox.events import Event

__all__ = ["INSERT_EVENTS", "PG_INSERT_EVENTS", "SQLITE_TAKE_WRITE_LOCK", "pg_uuid7_sql"]

_EVENTS: sa.Table = Event.__table__  # type: ignore[assignment]

#: Event rows as dicts of every column (sqlite3 runs an executemany in C; PyMySQL rewrites it
#: into one multi-row INSERT).
INSERT_EVENTS = sa.insert(_EVENTS)

#: Matches no row, so it changes nothing, but takes SQLite's single write lock: pysqlite begins
#: a transaction only at the first DML statement, and capture's old images of a bulk UPDATE must
#: stay true until the UPDATE runs.
SQLITE_TAKE_WRITE_LOCK = sa.update(_EVENTS).where(sa.false()).values(seq=_EVENTS.c.seq)


def pg_uuid7_sql(at: str) -> str:
    """SQL for a version-7 UUID whose time is the ``timestamptz`` SQL expression ``at``.

    Ids like :func:`outbox.events.new_event_id`'s (time-ordered: see there why), built by the
    server from ``gen_random_uuid()`` (PostgreSQL 13+): the time in milliseconds over the first
    48 bits, version bits 0111.
    """
    return (
        "encode(set_bit(set_bit(overlay(uuid_send(gen_random_uuid()) placing "
        f"substring(int8send(floor(extract(epoch FROM {at}) * 1000)::bigint) "
        "FROM 3) FROM 1 FOR 6), 52, 1), 53, 1), 'hex')::uuid"
    )


# PostgreSQL (psycopg, psycopg2): the rows of a flush travel as one JSON array (%(rows)s) and are
# expanded by the server. The statement text does not depend on the number of rows, so psycopg
# prepares it once per connection; the client does one json.dumps instead of adapting 17 values
# per row (psycopg2 interpolates the parameters in the client: five values, not 17 per row).
# Ids carry the flush's time; WITH ORDINALITY keeps seq in the flush's order.
_PG_EVENT_ID = pg_uuid7_sql("%(now)s::timestamptz")  # the flush's time
PG_INSERT_EVENTS = f"""
INSERT INTO events (id, source, type, status, payload, user_id, session_id, instance_id,
    schema_name, entity, entity_id, operation, created_at, metadata, retry_count,
    next_attempt_at, ordering_key)
SELECT {_PG_EVENT_ID}, 'database', e.doc->>'type', 'pending', e.doc->'payload',
    %(user_id)s, %(session_id)s, %(instance_id)s, e.doc->>'schema_name', e.doc->>'entity',
    e.doc->>'entity_id', e.doc->>'operation', %(now)s, e.doc->'metadata', 0, %(now)s,
    e.doc->>'ordering_key'
FROM jsonb_array_elements(%(rows)s::jsonb) WITH ORDINALITY AS e(doc, n)
ORDER BY e.n
"""  # noqa: S608 (fixed SQL fragments, every value a bound parameter)
