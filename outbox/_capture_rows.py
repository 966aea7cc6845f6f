"""Building ``events`` rows for captured changes, and writing them in one statement.

Rows are plain dicts for a Core ``INSERT`` on ``Event.__table__`` (never ORM objects: a flush of
100 changes must cost one statement, not 100 unit-of-work entries). See :meth:`RowFactory.write`
for how the rows of a flush go out in one statement on each dialect.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from outbox._capture_plan import MapperPlan, jsonable
from outbox.context import current_context
from outbox.events import Event, get_instance_id, new_event_id, utcnow
from outbox.tracing import current_trace_context

__all__ = ["REDACTED", "RowFactory", "changes_of", "redacted_changes"]

_TABLE: sa.Table = Event.__table__  # type: ignore[assignment]
_INSERT = sa.insert(_TABLE)

_OPS = ("create", "update", "delete", "read")


class RowFactory:
    """Makes event rows that share one context snapshot, timestamp and instance id.

    One factory per flush (or bulk statement): the acting user/session is the one in effect where
    the flush ran (``outbox.context``). :meth:`row` returns only the columns that differ between
    the events of a flush; :meth:`write` adds the shared ones.
    """

    __slots__ = ("instance_id", "meta", "now", "session_id", "user_id")

    def __init__(self) -> None:
        ctx = current_context()
        self.user_id = ctx.user_id
        self.session_id = ctx.session_id
        self.meta: dict[str, Any] = (
            jsonable("outbox.context", "metadata", dict(ctx.metadata)) if ctx.metadata else {}
        )
        trace = current_trace_context()  # the span active at flush (OpenTelemetry), if any
        if trace:
            self.meta = {**self.meta, **trace}
        self.now = utcnow()
        self.instance_id = get_instance_id()

    def row(
        self,
        plan: MapperPlan,
        default_schema: str | None,
        op_index: int,
        entity_id: str,
        payload: dict[str, Any],
        changes: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """One row's own columns. ``op_index``: 0 create, 1 update, 2 delete, 3 read."""
        schema, types = plan.types(default_schema)
        if changes is not None:
            meta = dict(self.meta)
            meta["changes"] = changes
        else:
            meta = self.meta
        return {
            "type": types[op_index],
            "payload": payload,
            "schema_name": schema,
            "entity": plan.entity,
            "entity_id": entity_id,
            "operation": _OPS[op_index],
            "metadata": meta,
            "ordering_key": f"{schema}.{plan.entity}:{entity_id}",
        }

    def write(self, connection: Connection, rows: Sequence[dict[str, Any]]) -> None:
        """Insert ``rows`` into ``events`` on ``connection`` (its transaction), one statement."""
        if not rows:
            return
        dialect = connection.dialect
        if (dialect.name == "postgresql" and dialect.driver == "psycopg"
                and dialect.paramstyle == "pyformat"
                and not connection.get_execution_options().get("schema_translate_map")):
            connection.exec_driver_sql(_PG_INSERT, {
                "rows": json.dumps(rows, separators=(",", ":"), ensure_ascii=False,
                                   allow_nan=False),
                "user_id": self.user_id,
                "session_id": self.session_id,
                "instance_id": self.instance_id,
                "now": self.now,
            })
            return
        shared = {
            "source": "database",
            "status": "pending",
            "user_id": self.user_id,
            "session_id": self.session_id,
            "instance_id": self.instance_id,
            "created_at": self.now,
            "retry_count": 0,
            "next_attempt_at": self.now,
        }
        full = [{"id": new_event_id(), **shared, **row} for row in rows]
        # sqlite3 runs an executemany in C; PyMySQL rewrites it into one multi-row INSERT.
        connection.execute(_INSERT, full[0] if len(full) == 1 else full)


def changes_of(
    plan: MapperPlan, old: Mapping[str, Any], new: Mapping[str, Any], keys: Sequence[str]
) -> dict[str, Any]:
    """``{column: {"old", "new"}}`` for the captured ``keys`` whose value really changed."""
    out: dict[str, Any] = {}
    names = plan.names
    compare = plan.compare
    model = plan.model
    for key in keys:
        before = old.get(key)
        after = new.get(key)
        if compare[key](before, after):
            continue
        name = names[key]
        out[name] = {"old": jsonable(model, name, before), "new": jsonable(model, name, after)}
    return out


#: ``metadata.changes`` entry of a column left out of events (``exclude=`` or secret-looking)
#: that changed: consumers learn *that* it changed (a password reset), never its values.
REDACTED: dict[str, Any] = {"redacted": True}


def redacted_changes(plan: MapperPlan, keys: Sequence[str]) -> dict[str, Any]:
    """``{column: {"redacted": true}}`` for the excluded attribute ``keys`` that changed."""
    return {plan.excluded_names[k]: dict(REDACTED) for k in keys}


# PostgreSQL (psycopg): the rows of a flush travel as one JSON array and are expanded by the
# server. The statement text does not depend on the number of rows, so psycopg prepares it once
# per connection; the client does one json.dumps instead of adapting 17 values per row. Ids are
# version-7 UUIDs like new_event_id()'s (time-ordered: see there why), built by the server from
# gen_random_uuid() (PostgreSQL 13+): the flush's time in milliseconds over the first 48 bits,
# version bits 0111. WITH ORDINALITY keeps seq in the flush's order.
def pg_uuid7_sql(at: str) -> str:
    """SQL for a version-7 UUID whose time is the ``timestamptz`` SQL expression ``at``."""
    return (
        "encode(set_bit(set_bit(overlay(uuid_send(gen_random_uuid()) placing "
        f"substring(int8send(floor(extract(epoch FROM {at}) * 1000)::bigint) "
        "FROM 3) FROM 1 FOR 6), 52, 1), 53, 1), 'hex')::uuid"
    )


_PG_EVENT_ID = pg_uuid7_sql("%(now)s::timestamptz")  # the flush's time
_PG_INSERT = f"""
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
