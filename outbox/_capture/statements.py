"""What the flush's own statements did, row by row: ``before_execute`` / ``after_execute`` on
every connection while a capture is active, acting only on the connection of a captured flush.

The mapper events say *which* objects the unit of work inserts, updates and deletes; three
things only the statements themselves tell:

- **Association rows.** ``relationship(secondary=...)`` rows are inserted and deleted by the
  unit of work with Core statements, with no mapper event: each row of such an INSERT/DELETE on
  an association table of a captured model (:meth:`Scope.link_plan`) becomes an item of the
  flush's batch, its values those the statement bound (defaults included), read back when the
  table has columns the statement left to the database.
- **Per-row values of a batched UPDATE.** SQLAlchemy runs the UPDATEs of several objects of one
  model as one executemany and then hands every object the *first* row's Python-side
  ``onupdate`` values; the values each row was really bound with are kept here, by key.
- **DELETEs that matched nothing** (a stale session deleting a row another transaction deleted:
  SQLAlchemy only warns): a one-row DELETE says so by its rowcount; for a DELETE of several rows
  the rows are locked and listed first (``SELECT … FOR UPDATE``), since a total cannot tell
  which one was missing. Such rows get no event.

Statements of the unit of work's mapper persistence carry its compiled cache in their
execution options; association statements do not (:func:`unit_of_work_statement`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Result
from sqlalchemy.sql.dml import Delete, Insert, Update, UpdateBase

from outbox._capture.flush import Batch, flushing_batch
from outbox._capture.plan import LinkPlan, MapperPlan
from outbox._capture.sqlalchemy_internals import (
    prefetched_columns,
    unit_of_work_statement,
    update_key_param,
)
from outbox.events import Operation

__all__ = ["ENGINE_LISTENERS"]


def _before_execute(
    conn: Connection, clauseelement: Any, multiparams: Any, params: Any, options: Any
) -> None:
    if not isinstance(clauseelement, Delete):
        return
    batch = flushing_batch(conn)
    if batch is None or not batch.captures(conn):
        return
    rows = _rows(multiparams, params)
    table = clauseelement.table
    if not rows or not isinstance(table, sa.Table):
        return
    if unit_of_work_statement(options):
        if len(rows) < 2 or batch.scope.mapper_for_table(table) is None:
            return
        complete = True
    else:
        if batch.scope.link_plan(table) is None:
            return
        complete = all(c.key in rows[0] for c in table.columns)
    if len(rows) > 1 or not complete:
        # Which of these rows exist, locked until the DELETE (and, for an association row the
        # statement does not name in full, its stored values).
        keys = _key_columns(table, rows[0])
        wanted = list(table.columns) if not complete else keys
        batch.prechecked[table] = _select(conn, table, wanted, keys, rows)


def _after_execute(
    conn: Connection, clauseelement: Any, multiparams: Any, params: Any, options: Any,
    result: Result[Any],
) -> None:
    if not isinstance(clauseelement, UpdateBase):
        return
    uow = unit_of_work_statement(options)
    if uow and (isinstance(clauseelement, Insert) or (
            isinstance(clauseelement, Update)
            and not getattr(getattr(result, "context", None), "executemany", False))):
        return  # the unit of work's own INSERTs, one-row UPDATEs: nothing to learn here
    batch = flushing_batch(conn)
    if batch is None or not batch.captures(conn):
        return
    table = clauseelement.table
    if not isinstance(table, sa.Table):
        return
    if isinstance(clauseelement, Update):
        if uow:
            _keep_bound_values(batch, table, result)
        return
    rows = _rows(multiparams, params)
    if not rows:
        return
    if isinstance(clauseelement, Delete):
        rows = _deleted_rows(batch, table, rows, result)
    if uow:
        return
    link = batch.scope.link_plan(table)
    if link is None:
        return
    if isinstance(clauseelement, Insert):
        op = Operation.CREATE
        rows = _bound_rows(result, rows)
        if not all(c.key in rows[0] for c in table.columns):
            rows = _read_inserted(conn, table, rows)
    else:
        op = Operation.DELETE
    if op not in batch.scope.operations:
        return
    for row in rows:
        _record_link(batch, link, op, conn, row)


def _record_link(
    batch: Batch, link: tuple[LinkPlan | MapperPlan, dict[str, str]], op: Operation,
    conn: Connection, row: Mapping[str, Any],
) -> None:
    plan, keys = link
    values = {keys[k]: v for k, v in row.items() if k in keys}
    if isinstance(plan, MapperPlan):
        # The table is a captured model written through a relationship: its event is the
        # model's, unless the unit of work also wrote that row as an object (no second event).
        ident = tuple(values.get(k) for k in plan.pk_keys)
        for other, state, other_op, _, _ in batch.items:
            if other is plan and other_op is op and state is not None and tuple(
                    state.dict.get(k) for k in plan.pk_keys) == ident:
                return
    batch.items.append((plan, None, op, conn, values))


def _rows(multiparams: Any, params: Any) -> list[Mapping[str, Any]]:
    if multiparams:
        if isinstance(multiparams, Mapping):
            return [multiparams]
        return [p for p in multiparams if isinstance(p, Mapping)]
    return [params] if isinstance(params, Mapping) and params else []


def _key_columns(table: sa.Table, row: Mapping[str, Any]) -> list[sa.Column[Any]]:
    """The columns that identify a row the statement names: the primary key, else every column
    the statement binds."""
    keys = list(table.primary_key.columns)
    if keys and all(c.key in row for c in keys):
        return keys
    return [c for c in table.columns if c.key in row]


def _select(
    conn: Connection, table: sa.Table, columns: Sequence[sa.Column[Any]],
    keys: Sequence[sa.Column[Any]], rows: Sequence[Mapping[str, Any]],
) -> dict[tuple[Any, ...], dict[str, Any]]:
    """``{key: {column key: value}}`` of the stored rows named by ``rows``, locked."""
    found: dict[tuple[Any, ...], dict[str, Any]] = {}
    idents = [tuple(r[c.key] for c in keys) for r in rows]
    for start in range(0, len(idents), 500):
        chunk = idents[start:start + 500]
        where = (keys[0].in_([i[0] for i in chunk]) if len(keys) == 1
                 else sa.tuple_(*keys).in_(chunk))
        stmt = sa.select(*columns).where(where)
        if conn.dialect.name != "sqlite":
            stmt = stmt.with_for_update()
        for row in conn.execute(stmt):
            values = dict(zip([c.key for c in columns], row, strict=True))
            found[tuple(values[c.key] for c in keys)] = values
    return found


def _deleted_rows(
    batch: Batch, table: sa.Table, rows: list[Mapping[str, Any]], result: Result[Any]
) -> list[Mapping[str, Any]]:
    """The rows the DELETE really deleted (stored values where they were read first); the
    others are remembered in ``batch.unmatched``."""
    keys = _key_columns(table, rows[0])
    found = batch.prechecked.pop(table, None)
    if found is None:
        # One row (or a table capture does not watch): the rowcount tells when none matched.
        if getattr(result, "rowcount", -1) == 0:
            batch.unmatched.update((table, tuple(r[c.key] for c in keys)) for r in rows)
            return []
        return rows
    deleted: list[Mapping[str, Any]] = []
    for row in rows:
        ident = tuple(row[c.key] for c in keys)
        stored = found.get(ident)
        if stored is None:
            batch.unmatched.add((table, ident))
        else:
            deleted.append({**row, **stored})
    return deleted


def _bound_rows(result: Result[Any], rows: list[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The parameters each row of an INSERT was bound with, Python-side defaults included."""
    context = getattr(result, "context", None)
    compiled = getattr(context, "compiled_parameters", None)
    if compiled and len(compiled) == len(rows):
        return [{**row, **{k: v for k, v in params.items() if k not in row}}
                for row, params in zip(rows, compiled, strict=True)]
    return rows


def _read_inserted(
    conn: Connection, table: sa.Table, rows: list[Mapping[str, Any]]
) -> list[Mapping[str, Any]]:
    """Inserted association rows with the columns the database filled (server defaults)."""
    keys = _key_columns(table, rows[0])
    found = _select(conn, table, list(table.columns), keys, rows)
    return [found.get(tuple(r[c.key] for c in keys), r) for r in rows]


def _keep_bound_values(batch: Batch, table: sa.Table, result: Result[Any]) -> None:
    """Per-row values a batched UPDATE computed in Python (``onupdate``), by row key."""
    context = getattr(result, "context", None)
    if context is None or not getattr(context, "executemany", False):
        return
    prefetch = prefetched_columns(context)
    if not prefetch:
        return
    key_params = [update_key_param(c) for c in table.primary_key.columns]
    for params in context.compiled_parameters:
        try:
            ident = tuple(params[k] for k in key_params)
        except KeyError:
            return
        batch.executed[(table, ident)] = {c: params[c.key] for c in prefetch if c.key in params}


#: (event name, listener) pairs installed on ``Engine`` while a registration is active.
ENGINE_LISTENERS: tuple[tuple[str, Any], ...] = (
    ("before_execute", _before_execute),
    ("after_execute", _after_execute),
)
