"""Capture for statements that bypass the unit of work: ORM bulk ``insert()``, ``update()``,
``delete()`` (and Core DML on a captured table) executed through a captured session.

Each affected row gets its event, written right after the statement on the same connection:

- INSERT / DELETE: ``RETURNING`` every column of the table gives the new / the deleted rows.
- UPDATE with a WHERE clause: the rows' old values are read first (``SELECT ... FOR UPDATE``; on
  SQLite after taking the write lock, so nothing can change in between), the statement runs with
  ``RETURNING``; a row returned without an old image (a concurrent insert slipped between the two
  statements) makes the transaction uncommittable instead of losing the event.
- UPDATE by primary key (a list of parameter dicts): old and new images by primary key.

What cannot be captured is refused with :class:`UnsupportedOperation` (no RETURNING on the
dialect, upserts, joined-table inheritance, ...) — never silently run. Pass
``execution_options={"outbox_capture": False}`` to run such a statement without events.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql.dml import OnConflictDoNothing as PgDoNothing
from sqlalchemy.dialects.sqlite.dml import OnConflictDoNothing as SqliteDoNothing
from sqlalchemy.engine import Connection, Result
from sqlalchemy.orm import Mapper, ORMExecuteState

from outbox._capture.flush import poison
from outbox._capture.plan import MapperPlan
from outbox._capture.rows import RowFactory, changes_of, redacted_changes
from outbox._capture.scope import Scope
from outbox._capture.sqlalchemy_internals import (
    cursor_result,
    returns_defaults,
    set_rowcount,
    upsert_clause,
)
from outbox._sql.capture import SQLITE_TAKE_WRITE_LOCK
from outbox.events import Operation
from outbox.exceptions import CaptureError, UnsupportedOperation

__all__ = ["OPT_OUT", "capture_bulk"]

#: Execution option that exempts one statement from bulk capture:
#: ``session.execute(stmt, execution_options={"outbox_capture": False})``.
OPT_OUT = "outbox_capture"

_VERBS = {Operation.CREATE: "INSERT", Operation.UPDATE: "UPDATE", Operation.DELETE: "DELETE"}


def capture_bulk(scope: Scope, orm_state: ORMExecuteState) -> Result[Any] | None:
    """``do_orm_execute`` hook: run a captured DML statement with its events, or refuse it."""
    if orm_state.execution_options.get(OPT_OUT, True) is False:
        return None
    op = (Operation.CREATE if orm_state.is_insert
          else Operation.UPDATE if orm_state.is_update else Operation.DELETE)
    if op not in scope.operations:
        return None
    stmt: Any = orm_state.statement
    mapper = _target_mapper(scope, stmt)
    if mapper is None:
        return None
    plan = scope.plan(mapper)
    if plan is None:
        return None
    session = orm_state.session
    conn = session.connection(bind_arguments=orm_state.bind_arguments)
    verb = _VERBS[op]
    dialect = conn.dialect

    def refuse(why: str) -> UnsupportedOperation:
        return UnsupportedOperation(
            f"bulk {verb} on {plan.model} cannot be captured: {why}. Change the rows through "
            "the session (session.add / attribute changes / session.delete), or run the "
            "statement without events: execution_options={'outbox_capture': False}"
        )

    if not plan.bulk_ok:
        raise refuse("its columns span several tables (joined-table inheritance)")
    if returns_defaults(stmt):
        raise refuse("return_defaults() cannot be combined with capture's RETURNING")
    if session.autoflush:
        session.flush()  # the old images below must see this session's pending changes

    if op is Operation.CREATE:
        post = upsert_clause(stmt)
        if post is not None and not isinstance(post, PgDoNothing | SqliteDoNothing):
            raise refuse("an upsert cannot tell inserted rows from updated ones")
        if not dialect.insert_returning or (
            orm_state.is_executemany and not dialect.insert_executemany_returning
        ):
            raise refuse(f"{dialect.name} has no INSERT ... RETURNING")
        rows, result = _run_returning(orm_state, stmt, plan)
        _emit(conn, plan, [(Operation.CREATE, row, None) for row in rows])
        return result

    if op is Operation.DELETE:
        if orm_state.is_executemany:
            raise refuse("a DELETE with several parameter sets")
        if not dialect.delete_returning:
            raise refuse(f"{dialect.name} has no DELETE ... RETURNING")
        rows, result = _run_returning(orm_state, stmt, plan)
        _emit(conn, plan, [(Operation.DELETE, row, None) for row in rows])
        return result

    # UPDATE
    keys = [k for k, _ in plan.bulk_columns]
    if orm_state.is_executemany:
        return _update_by_primary_key(orm_state, conn, plan, refuse)
    if not dialect.update_returning:
        raise refuse(f"{dialect.name} has no UPDATE ... RETURNING")
    _take_write_lock(conn)
    old = _old_images(conn, plan, stmt, orm_state.parameters)
    rows, result = _run_returning(orm_state, stmt, plan)
    items = []
    for row in rows:
        before = old.get(_ident(plan, row))
        if before is None:
            reason = (
                f"bulk UPDATE on {plan.model} changed a row (primary key "
                f"{list(_ident(plan, row))!r}) that another transaction committed "
                "after outbox read the old values; its event cannot be written exactly"
            )
            poison(session, reason)
            raise CaptureError(reason + "; roll back and retry")
        items.append((Operation.UPDATE, row, before))
    _emit(conn, plan, items, keys)
    return result


def _target_mapper(scope: Scope, stmt: Any) -> Mapper[Any] | None:
    """The mapper of ``insert(Model)`` & co., else the captured mapper of a Core DML's table."""
    entity = stmt.entity_description.get("entity")
    if entity is not None:
        mapper: Mapper[Any] = sa.inspect(entity).mapper
        return mapper
    return scope.mapper_for_table(stmt.table)


def _take_write_lock(conn: Connection) -> None:
    """SQLite: start the write transaction now, so the old images stay true until the UPDATE.

    (The pysqlite driver only begins a transaction at the first DML statement; a write that
    matches no row takes SQLite's single write lock without changing anything.)
    """
    if conn.dialect.name == "sqlite":
        conn.execute(SQLITE_TAKE_WRITE_LOCK)


def _old_images(
    conn: Connection, plan: MapperPlan, stmt: Any, params: Any
) -> dict[tuple[Any, ...], dict[str, Any]]:
    keys = [k for k, _ in plan.bulk_columns]
    select = sa.select(*[c for _, c in plan.bulk_columns])
    if stmt.whereclause is not None:
        select = select.where(stmt.whereclause)
    if conn.dialect.name != "sqlite":
        select = select.with_for_update()
    found: dict[tuple[Any, ...], dict[str, Any]] = {}
    bind = params if isinstance(params, Mapping) else None
    for row in conn.execute(select, bind):
        values = dict(zip(keys, row, strict=True))
        found[_ident(plan, values)] = values
    return found


def _run_returning(
    orm_state: ORMExecuteState, stmt: Any, plan: MapperPlan
) -> tuple[list[dict[str, Any]], Result[Any]]:
    """Run ``stmt`` with RETURNING of the table's columns; give the caller its own result back."""
    keys = [k for k, _ in plan.bulk_columns]
    result = orm_state.invoke_statement(
        statement=stmt.returning(*[c for _, c in plan.bulk_columns])
    )
    # The caller's own RETURNING (columns, or an entity: one element per row) comes first.
    n_user = len(result.keys()) - len(keys)
    if n_user == 0:
        rows = [dict(zip(keys, tuple(r), strict=True)) for r in result.all()]
        # The caller expects the statement's CursorResult (rowcount); ORM wraps it when the
        # statement has RETURNING.
        raw = cursor_result(result)
        if raw is None:
            return rows, result
        if not orm_state.is_insert and raw.rowcount != len(rows):
            set_rowcount(raw, len(rows))
        return rows, raw
    frozen = result.freeze()
    rows = [dict(zip(keys, tuple(r)[n_user:], strict=True)) for r in frozen().all()]
    return rows, frozen().columns(*range(n_user))


def _update_by_primary_key(
    orm_state: ORMExecuteState, conn: Connection, plan: MapperPlan, refuse: Any
) -> Result[Any]:
    """``session.execute(update(Model), [{"id": 1, ...}, ...])``: images by primary key."""
    stmt: Any = orm_state.statement
    params = orm_state.parameters
    if stmt.whereclause is not None or not isinstance(params, Sequence):
        raise refuse("an UPDATE with both a WHERE clause and several parameter sets")
    try:
        idents = [tuple(p[k] for k in plan.pk_keys) for p in params]
    except KeyError:
        raise refuse("a parameter set lacks the primary key") from None
    keys = [k for k, _ in plan.bulk_columns]
    _take_write_lock(conn)
    old = plan.fetch(conn, idents, keys, lock=True)
    result = orm_state.invoke_statement()
    new = plan.fetch(conn, idents, keys)
    items = []
    seen = set()
    for ident in idents:
        if ident in seen or ident not in new or ident not in old:
            continue
        seen.add(ident)
        items.append((Operation.UPDATE, new[ident], old[ident]))
    _emit(conn, plan, items, keys)
    return result


def _ident(plan: MapperPlan, values: Mapping[str, Any]) -> tuple[Any, ...]:
    return tuple(values.get(k) for k in plan.pk_keys)


def _emit(
    conn: Connection,
    plan: MapperPlan,
    items: Sequence[tuple[Operation, dict[str, Any], dict[str, Any] | None]],
    keys: Sequence[str] = (),
) -> None:
    factory = RowFactory()
    dialect = conn.dialect
    default_schema = dialect.default_schema_name
    captured = [k for k in keys if k in plan.keyset]
    excluded = [k for k in keys if k in plan.excluded_keys]
    rows = []
    for op, values, before in items:
        changes = None
        if op is Operation.UPDATE:
            assert before is not None
            changes = changes_of(plan, before, values, captured, dialect)
            redacted = [k for k in excluded
                        if not plan.compare[k](before.get(k), values.get(k))]
            if not changes and not redacted:
                continue  # SET x = x: nothing changed, no event
            changes.update(redacted_changes(plan, redacted))
        payload = plan.stored(values, dialect)  # RETURNING / SELECT: the stored values
        rows.append(factory.row(plan, default_schema, op, plan.entity_id(payload), payload,
                                changes))
    factory.write(conn, rows)
