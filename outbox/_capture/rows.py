"""Building ``events`` rows for captured changes, and writing them in one statement.

Rows are plain dicts for a Core ``INSERT`` on ``Event.__table__`` (never ORM objects: a flush of
100 changes must cost one statement, not 100 unit-of-work entries). See :meth:`RowFactory.write`
for how the rows of a flush go out in one statement on each dialect; the statements themselves
are in :mod:`outbox._sql.capture`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy.engine import Connection, Dialect

from outbox import _json
from outbox._capture.plan import MapperPlan, TablePlan, jsonable
from outbox._context import current_context
from outbox._sql.capture import INSERT_EVENTS, PG_INSERT_EVENTS
from outbox._tracing import current_trace_context
from outbox.events import Operation, get_instance_id, new_event_id, utcnow

__all__ = ["REDACTED", "RowFactory", "changes_of", "redacted_changes"]


#: PostgreSQL drivers that get the rows of a flush as one JSON array (``PG_INSERT_EVENTS``):
#: both bind ``%(name)s`` parameters (psycopg on the server, psycopg2 in the client).
_JSON_ARRAY_DRIVERS = frozenset({"psycopg", "psycopg2"})


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
        plan: TablePlan,
        default_schema: str | None,
        op: Operation,
        entity_id: str,
        payload: dict[str, Any],
        changes: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """One row's own columns."""
        schema, types = plan.types(default_schema)
        if changes is not None:
            meta = dict(self.meta)
            meta["changes"] = changes
        else:
            meta = self.meta
        return {
            "type": types[op],
            "payload": payload,
            "schema_name": schema,
            "entity": plan.entity,
            "entity_id": entity_id,
            "operation": op.value,
            "metadata": meta,
            "ordering_key": f"{schema}.{plan.entity}:{entity_id}",
        }

    def write(self, connection: Connection, rows: Sequence[dict[str, Any]]) -> None:
        """Insert ``rows`` into ``events`` on ``connection`` (its transaction), one statement."""
        if not rows:
            return
        dialect = connection.dialect
        if (dialect.name == "postgresql" and dialect.driver in _JSON_ARRAY_DRIVERS
                and dialect.paramstyle == "pyformat"
                and not connection.get_execution_options().get("schema_translate_map")):
            connection.exec_driver_sql(PG_INSERT_EVENTS, {
                "rows": _json.dumps_safe(rows),
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
        connection.execute(INSERT_EVENTS, full[0] if len(full) == 1 else full)


def changes_of(
    plan: MapperPlan, old: Mapping[str, Any], new: Mapping[str, Any], keys: Sequence[str],
    dialect: Dialect,
) -> dict[str, Any]:
    """``{column: {"old", "new"}}`` for the captured ``keys`` whose value really changed, as
    stored (the rule of payloads)."""
    out: dict[str, Any] = {}
    names = plan.names
    compare = plan.compare
    stored = plan.stored_value
    for key in keys:
        before = old.get(key)
        after = new.get(key)
        if compare[key](before, after):
            continue
        old_json = stored(key, before, dialect)
        new_json = stored(key, after, dialect)
        if old_json == new_json and type(old_json) is type(new_json):
            continue  # different in Python, the same once stored (a TypeDecorator's rounding)
        out[names[key]] = {"old": old_json, "new": new_json}
    return out


#: ``metadata.changes`` entry of a column left out of events (``exclude=`` or secret-looking)
#: that changed: consumers learn *that* it changed (a password reset), never its values.
REDACTED: dict[str, Any] = {"redacted": True}


def redacted_changes(plan: MapperPlan, keys: Sequence[str]) -> dict[str, Any]:
    """``{column: {"redacted": true}}`` for the excluded attribute ``keys`` that changed."""
    return {plan.excluded_names[k]: dict(REDACTED) for k in keys}
