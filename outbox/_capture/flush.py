"""The flush side of capture: record what the unit of work runs, write the events after it.

- ``begin_batch`` (``before_flush``) opens a batch for the session and reads, in one locked
  ``SELECT`` per model, the stored values the ORM does not hold in memory (expired attributes,
  values mutated in place) of objects about to be updated or deleted, so old values are exact.
- The mapper listeners record each INSERT / UPDATE / DELETE the unit of work really executes
  (cascades and orphan deletes included), in execution order.
- ``end_batch`` (``after_flush``: primary keys known, attribute history still present) turns the
  batch into rows and writes them with one statement on the flush's own connection.
- A session whose transaction ran a change without its events (see ``poison``) refuses to commit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from sqlalchemy.engine import Connection
from sqlalchemy.orm import Mapper, Session
from sqlalchemy.orm.attributes import instance_state
from sqlalchemy.orm.base import NO_VALUE
from sqlalchemy.orm.state import InstanceState

from outbox._capture.plan import MapperPlan
from outbox._capture.rows import RowFactory, changes_of, redacted_changes
from outbox._capture.scope import Scope
from outbox.events import Operation
from outbox.exceptions import CaptureError

__all__ = [
    "MAPPER_LISTENERS",
    "SESSION_LISTENERS",
    "begin_batch",
    "end_batch",
    "poison",
]

_BATCH = "_outbox_batch"
_POISON = "_outbox_poison"
# Values the ORM may mutate in place: when the old value *is* the new object, the old value is
# unknown in memory and is read from the database instead.
_MUTABLE = (dict, list, set, bytearray)


def begin_batch(scope: Scope, session: Session) -> None:
    """``before_flush``: a new batch for this flush, with the old values it will need."""
    batch = _Batch(scope)
    session.__dict__[_BATCH] = batch
    if scope.update or scope.delete:
        _prefetch_old_values(scope, session, batch)


def end_batch(session: Session) -> None:
    """``after_flush``: write the events of the flush."""
    batch: _Batch | None = session.__dict__.pop(_BATCH, None)
    if batch is not None and batch.items:
        _write_batch(batch)


class _Batch:
    """Changes recorded during one flush of one session."""

    __slots__ = ("items", "old", "scope")

    def __init__(self, scope: Scope) -> None:
        self.scope = scope
        # (plan, state, operation, connection), in the order the unit of work ran them
        self.items: list[tuple[MapperPlan, InstanceState[Any], Operation, Connection]] = []
        # state -> {attribute key: stored value} read from the database before the flush
        self.old: dict[InstanceState[Any], dict[str, Any]] = {}


def _needs_db(plan: MapperPlan, state: InstanceState[Any], deleting: bool) -> list[str]:
    """Captured keys whose stored (pre-flush) value is not in memory."""
    committed = state.committed_state
    dict_ = state.dict
    need = []
    for key, old in committed.items():
        if key in plan.keyset and (
            old is NO_VALUE or (old is dict_.get(key) and isinstance(old, _MUTABLE))
        ):
            need.append(key)
    if deleting:
        need.extend(k for k in plan.keyset if k not in dict_ and k not in committed)
    else:
        need.extend(k for k in plan.onupdate_keys if k not in dict_ and k not in committed)
    return need


def _prefetch_old_values(scope: Scope, session: Session, batch: _Batch) -> None:
    """One locked SELECT per model for stored values of dirty/deleted objects not in memory."""
    wanted: dict[MapperPlan, list[tuple[InstanceState[Any], list[str]]]] = {}
    groups: list[tuple[Iterable[Any], bool]] = []
    if scope.update:
        groups.append((session.dirty, False))
    if scope.delete:
        groups.append((session.deleted, True))
    for objects, deleting in groups:
        for obj in objects:
            state = instance_state(obj)
            if state.key is None:
                continue
            plan = scope.plan(state.mapper)
            if plan is None:
                continue
            dict_ = state.dict
            snapshot = {k: dict_[k] for k in plan.onupdate_keys if k in dict_}
            if snapshot:
                batch.old[state] = snapshot
            need = _needs_db(plan, state, deleting)
            if need:
                wanted.setdefault(plan, []).append((state, need))
    for plan, entries in wanted.items():
        conn = session.connection(bind_arguments={"mapper": plan.mapper})
        keys = {k for _, need in entries for k in need}
        found = plan.fetch(conn, [s.key[1] for s, _ in entries if s.key], keys, lock=True)
        for state, need in entries:
            assert state.key is not None
            row = found.get(tuple(state.key[1]))
            if row is not None:
                batch.old.setdefault(state, {}).update({k: row[k] for k in need})


def _read_missing_old_values(
    batch: _Batch, plan: MapperPlan, state: InstanceState[Any], connection: Connection,
    deleting: bool,
) -> None:
    """Read, before its UPDATE/DELETE runs, what the object's old image still misses.

    Objects that became dirty during the flush (foreign keys synchronised from relationships)
    and orphans deleted by cascade were not in ``session.dirty``/``session.deleted`` when
    :func:`_prefetch_old_values` ran.
    """
    if state.key is None:
        return
    old = batch.old.get(state)
    need = [k for k in _needs_db(plan, state, deleting) if old is None or k not in old]
    snap: dict[str, Any] = {}
    if not deleting:
        dict_ = state.dict
        snap = {k: dict_[k] for k in plan.onupdate_keys
                if k in dict_ and (old is None or k not in old)}
    if need:
        row = plan.fetch(connection, [state.key[1]], need, lock=True).get(tuple(state.key[1]))
        if row is not None:
            snap.update(row)
    if snap:
        batch.old.setdefault(state, {}).update(snap)


def _mapper_listener(
    op: Operation, *, read_old: bool = False, record: bool = False
) -> Callable[[Mapper[Any], Connection, Any], None]:
    """A ``Mapper`` listener for ``op``: reads the old values the object misses before its
    UPDATE/DELETE runs (``read_old``), and/or records the change in the flush's batch."""

    def listener(mapper: Mapper[Any], connection: Connection, target: Any) -> None:
        state = instance_state(target)
        session = state.session
        batch: _Batch | None = None if session is None else session.__dict__.get(_BATCH)
        if batch is None or op not in batch.scope.operations:
            return
        plan = batch.scope.plan(mapper)
        if plan is None:
            return
        if read_old:
            _read_missing_old_values(batch, plan, state, connection, op is Operation.DELETE)
        if record:
            batch.items.append((plan, state, op, connection))

    return listener


def _stored_values(
    plan: MapperPlan, state: InstanceState[Any], old: Mapping[str, Any]
) -> dict[str, Any]:
    """The row as stored before this flush changed it."""
    committed = state.committed_state
    dict_ = state.dict
    values = {}
    for key in plan.keyset:
        if key in old:
            values[key] = old[key]
        elif key in committed:
            values[key] = committed[key]
        else:
            values[key] = dict_.get(key)
    return values


def _write_batch(batch: _Batch) -> None:
    items = batch.items
    old_values = batch.old
    # Values the flush left unloaded (server defaults, onupdate columns): one SELECT per model.
    fetched: dict[tuple[MapperPlan, Connection], dict[tuple[Any, ...], dict[str, Any]]] = {}
    missing: dict[tuple[MapperPlan, Connection], tuple[list[tuple[Any, ...]], set[str]]] = {}
    for plan, state, op, conn in items:
        if op is Operation.DELETE:
            continue
        dict_ = state.dict
        if op is Operation.CREATE:
            # After an INSERT only expired attributes (server defaults not fetched) are unknown;
            # others the object never had were inserted as NULL.
            expired = state.expired_attributes
            need = [k for k in plan.keyset if k not in dict_ and k in expired] if expired else ()
        else:
            need = [k for k in plan.keyset if k not in dict_]
        if need:
            idents, keys = missing.setdefault((plan, conn), ([], set()))
            idents.append(_identity(plan, dict_))
            keys.update(need)
    for (plan, conn), (idents, keys) in missing.items():
        fetched[(plan, conn)] = plan.fetch(conn, idents, keys)

    factory = RowFactory()
    by_conn: dict[Connection, list[dict[str, Any]]] = {}
    for plan, state, op, conn in items:
        dict_ = state.dict
        if op is Operation.DELETE:
            values: Mapping[str, Any] = _stored_values(plan, state, old_values.get(state, {}))
        elif (plan, conn) in fetched:
            extra = fetched[(plan, conn)].get(_identity(plan, dict_), {})
            values = {**dict_, **extra} if extra else dict_
        else:
            values = dict_
        changes = None
        if op is Operation.UPDATE:
            changes = _update_changes(plan, state, values, old_values.get(state))
            if changes is None:
                continue  # nothing really changed: no event
        entity_id = plan.entity_id([values.get(k) for k in plan.pk_keys])
        row = factory.row(plan, conn.dialect.default_schema_name, op, entity_id,
                          plan.payload(values), changes)
        rows = by_conn.get(conn)
        if rows is None:
            rows = by_conn[conn] = []
        rows.append(row)
    for conn, rows in by_conn.items():
        factory.write(conn, rows)


def _identity(plan: MapperPlan, values: Mapping[str, Any]) -> tuple[Any, ...]:
    return tuple(values.get(k) for k in plan.pk_keys)


def _update_changes(
    plan: MapperPlan,
    state: InstanceState[Any],
    new: Mapping[str, Any],
    old_db: Mapping[str, Any] | None,
) -> dict[str, Any] | None:
    """``metadata.changes`` of an update, or ``None`` when no column really changed."""
    committed = state.committed_state
    old: dict[str, Any] = {}
    keys = []
    redacted = []
    for key, value in committed.items():
        if key in plan.keyset:
            keys.append(key)
            old[key] = old_db[key] if old_db is not None and key in old_db else value
        elif key in plan.excluded_keys and (
            value is NO_VALUE or not plan.compare[key](value, new.get(key))
        ):
            redacted.append(key)
    changes = changes_of(plan, old, new, keys)
    if not changes and not redacted:
        return None
    changes.update(redacted_changes(plan, redacted))
    if old_db:
        # Columns the UPDATE itself set (onupdate / server_onupdate / version counter).
        extra = [k for k in plan.onupdate_keys if k in old_db and k not in old]
        if extra:
            changes.update(changes_of(plan, old_db, new, extra))
    return changes


# --------------------------------------------------------------------------------------------
# session-wide listeners shared by every registration


def _after_soft_rollback(session: Session, previous_transaction: Any) -> None:
    session.__dict__.pop(_BATCH, None)


def _before_commit(session: Session) -> None:
    reason = session.__dict__.get(_POISON)
    if reason:
        raise CaptureError(f"refusing to commit: {reason}; roll back this transaction")


def _after_transaction_end(session: Session, transaction: Any) -> None:
    if transaction.parent is None:
        session.__dict__.pop(_POISON, None)


def poison(session: Session, reason: str) -> None:
    """Make the session's transaction uncommittable (a change ran without its events)."""
    session.__dict__[_POISON] = reason


#: (event name, listener) pairs installed on ``Mapper`` while a registration is active.
MAPPER_LISTENERS: tuple[tuple[str, Any], ...] = (
    ("after_insert", _mapper_listener(Operation.CREATE, record=True)),
    ("before_update", _mapper_listener(Operation.UPDATE, read_old=True)),
    ("after_update", _mapper_listener(Operation.UPDATE, record=True)),
    ("before_delete", _mapper_listener(Operation.DELETE, read_old=True, record=True)),
)
#: Session listeners every registration adds next to its own before/after_flush.
SESSION_LISTENERS: tuple[tuple[str, Any], ...] = (
    ("after_soft_rollback", _after_soft_rollback),
    ("before_commit", _before_commit),
    ("after_transaction_end", _after_transaction_end),
)
