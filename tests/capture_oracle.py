"""A trigger-based oracle for capture: what the database itself says every row change was.

:func:`install` puts an ``AFTER INSERT OR UPDATE OR DELETE … FOR EACH ROW`` trigger on each
given table that logs ``to_jsonb(NEW)``, ``to_jsonb(OLD)`` and the transaction id into
``capture_oracle``, and a statement trigger on ``events`` that marks where each flush's events
were written (the highest ``seq`` at that moment). :func:`check` then pairs them: every logged
row change (an UPDATE that changed nothing aside) has exactly one event of the same
transaction and flush, table, operation and key, whose payload equals the stored row; every
event has such a row change. Used by ``tests/integration/test_capture_oracle.py`` and the
FastAPI example's tests; it is also how to check an application of your own.
"""

from __future__ import annotations

import datetime as dt
import decimal
import json
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import sqlalchemy as sa

from outbox.events import Event

__all__ = ["check", "install", "uninstall"]

_FUNCTIONS = [
    """CREATE FUNCTION capture_oracle_log() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
      INSERT INTO capture_oracle (txid, tbl, op, new, old) VALUES (
        pg_current_xact_id()::text::bigint, TG_TABLE_NAME, lower(TG_OP),
        CASE WHEN TG_OP <> 'DELETE' THEN to_jsonb(NEW) END,
        CASE WHEN TG_OP <> 'INSERT' THEN to_jsonb(OLD) END);
      RETURN NULL;
    END $$""",
    """CREATE FUNCTION capture_oracle_flush() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
      INSERT INTO capture_oracle (txid, tbl, op, max_seq)
      VALUES (pg_current_xact_id()::text::bigint, 'events', 'flush',
              (SELECT max(seq) FROM events));
      RETURN NULL;
    END $$""",
]


def install(conn: sa.Connection, tables: Sequence[str]) -> None:
    """The log table and the triggers (PostgreSQL; ``tables`` are the application's)."""
    conn.exec_driver_sql(
        "CREATE TABLE capture_oracle (n bigserial PRIMARY KEY, txid bigint, tbl text, op text, "
        "new jsonb, old jsonb, max_seq bigint)")
    for statement in _FUNCTIONS:
        conn.exec_driver_sql(statement)
    conn.exec_driver_sql(
        "CREATE TRIGGER capture_oracle_flush AFTER INSERT ON events FOR EACH STATEMENT "
        "EXECUTE FUNCTION capture_oracle_flush()")
    for table in tables:
        conn.exec_driver_sql(
            f'CREATE TRIGGER capture_oracle_log AFTER INSERT OR UPDATE OR DELETE ON "{table}" '
            "FOR EACH ROW EXECUTE FUNCTION capture_oracle_log()")
    # events written before the oracle was installed are not checked
    conn.exec_driver_sql(
        "INSERT INTO capture_oracle (op, max_seq) SELECT 'installed', coalesce(max(seq), 0) "
        "FROM events")


def uninstall(conn: sa.Connection, tables: Sequence[str]) -> None:
    for table in tables:
        conn.exec_driver_sql(f'DROP TRIGGER capture_oracle_log ON "{table}"')
    conn.exec_driver_sql("DROP TRIGGER capture_oracle_flush ON events")
    conn.exec_driver_sql("DROP TABLE capture_oracle")
    conn.exec_driver_sql("DROP FUNCTION capture_oracle_log(), capture_oracle_flush()")


def normalise(value: Any) -> Any:
    """JSON values compared by value: numbers as decimals, ISO dates and times parsed."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int | float):
        return decimal.Decimal(str(value))
    if isinstance(value, str) and len(value) >= 10 and value[4] == "-":
        for parse in (dt.datetime.fromisoformat, dt.date.fromisoformat):
            try:
                return parse(value)
            except ValueError:
                continue
    return value


def _entity_id(values: Sequence[Any]) -> str:
    if len(values) == 1:
        return values[0] if isinstance(values[0], str) else json.dumps(values[0])
    return json.dumps(list(values), separators=(",", ":"))


def check(
    conn: sa.Connection,
    keys: Mapping[str, Sequence[str]],
    *,
    logical: Callable[[str, Mapping[str, Any]], str] = lambda table, row: table,
    left_out: Mapping[str, Collection[str]] | None = None,
    partial: Collection[str] = (),
    outside: Collection[int] = (),
) -> int:
    """Pair logged row changes and events; assert they match one to one. Returns the number of
    row changes checked.

    ``keys``: per entity, its key columns in primary-key order. ``logical``: the entity a row
    of a table belongs to (a joined-inheritance subclass's rows in its base table). ``left_out``:
    per entity, columns capture leaves out (secrets). ``partial``: entities whose UPDATE may
    touch one of their tables only (joined inheritance): only the logged columns are compared.
    ``outside``: transaction ids of writes made outside capture on purpose.
    """
    rows = conn.exec_driver_sql(
        "SELECT txid, tbl, op, new, old, max_seq FROM capture_oracle ORDER BY n").all()
    events = conn.execute(sa.select(
        Event.seq, Event.txid, Event.entity, Event.operation, Event.entity_id,
        Event.payload).where(Event.source == "database").order_by(Event.seq)).all()
    left_out = left_out or {}
    markers: list[int] = []
    changes: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
    pending: dict[tuple[Any, ...], dict[str, Any]] = {}
    installed = 0
    for txid, tbl, op, new, old, max_seq in rows:
        if op == "installed":
            installed = max_seq
            continue
        if op == "flush":
            markers.append(max_seq)
            changes.extend(((*key, max_seq), values) for key, values in pending.items())
            pending = {}
            continue
        if txid in outside or (op == "update" and new == old):
            continue
        row = new if op != "delete" else old
        entity = logical(tbl, row)
        operation = {"insert": "create", "update": "update", "delete": "delete"}[op]
        key = (txid, entity, operation, _entity_id([row[c] for c in keys[entity]]))
        pending.setdefault(key, {}).update(row)
    changes.extend(((*key, None), values) for key, values in pending.items())

    unmatched: dict[tuple[Any, ...], dict[str, Any]] = {}
    for ev in events:
        if ev.seq <= installed:
            continue
        flush = next((m for m in markers if m >= ev.seq), None)
        key = (ev.txid, ev.entity, ev.operation, ev.entity_id, flush)
        assert key not in unmatched, f"two events for one row change: {key}"
        unmatched[key] = ev.payload
    for key, stored in changes:
        payload = unmatched.pop(key, None)
        assert payload is not None, f"a row change without its event: {key} {stored}"
        stored = {k: v for k, v in stored.items() if k not in left_out.get(key[1], ())}
        if key[1] not in partial or key[2] != "update":
            assert set(payload) == set(stored), (key, payload, stored)
        assert {k: normalise(payload.get(k)) for k in stored} == {
            k: normalise(v) for k, v in stored.items()}, (key, payload, stored)
    assert not unmatched, f"events without a row change: {unmatched}"
    return len(changes)
