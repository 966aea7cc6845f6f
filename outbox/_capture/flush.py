"""The flush side of capture: record what the unit of work runs, write the events after it.

- ``begin_batch`` (``before_flush``) opens a batch for the session and reads, in one locked
  ``SELECT`` per model, the stored values the ORM does not hold in memory (expired attributes,
  values mutated in place) of objects about to be updated or deleted, so old values are exact.
- The mapper listeners record each INSERT / UPDATE / DELETE the unit of work really executes
  (cascades and orphan deletes included), in execution order.
- ``end_batch`` (``after_flush``: primary keys known, attribute history still present) turns the
  batch into rows and writes them with one statement on the flush's own connection.
- :mod:`~outbox._capture.statements` watches the flush's own statements on its connection: rows
  of association tables, per-row values of batched UPDATEs, DELETEs that matched no row.
- A session whose transaction ran a change without its events (see ``poison``) refuses to commit.
- A captured session marks the connections of its transaction (``after_begin``): a flush on such
  a connection by a session that is not captured warns once (``UncapturedSessionWarning``).
"""

from __future__ import annotations

import threading
import warnings
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from sqlalchemy.engine import Connection, Dialect
from sqlalchemy.orm import Mapper, Session
from sqlalchemy.orm.attributes import instance_state
from sqlalchemy.orm.base import NO_VALUE
from sqlalchemy.orm.exc import UnmappedColumnError
from sqlalchemy.orm.state import InstanceState

from outbox._capture.plan import MapperPlan, TablePlan
from outbox._capture.rows import RowFactory, changes_of, redacted_changes
from outbox._capture.scope import Scope
from outbox.events import Operation
from outbox.exceptions import CaptureError

__all__ = [
    "MAPPER_LISTENERS",
    "SESSION_LISTENERS",
    "Batch",
    "UncapturedSessionWarning",
    "begin_batch",
    "end_batch",
    "flushing_batch",
    "mark_connection",
    "poison",
]

_BATCH = "_outbox_batch"
_POISON = "_outbox_poison"
# Values the ORM may mutate in place: when the old value *is* the new object, the old value is
# unknown in memory and is read from the database instead.
_MUTABLE = (dict, list, set, bytearray)


def begin_batch(scope: Scope, session: Session, pool: Any = None) -> None:
    """``before_flush``: a new batch for this flush, with the old values it will need.

    ``pool``: only changes on connections of this pool are captured (``capture(engine)``).
    """
    batch = Batch(scope, pool)
    session.__dict__[_BATCH] = batch
    if scope.update or scope.delete:
        _prefetch_old_values(scope, session, batch)


def end_batch(session: Session) -> None:
    """``after_flush``: write the events of the flush."""
    batch: Batch | None = session.__dict__.pop(_BATCH, None)
    if batch is not None and batch.items:
        _write_batch(batch)


#: One change recorded in a flush: (plan, the object's state — or ``None`` for a row of an
#: association table, whose values come with it —, operation, connection, values).
Item = tuple[TablePlan, "InstanceState[Any] | None", Operation, Connection, "dict[str, Any] | None"]


class Batch:
    """Changes recorded during one flush of one session."""

    __slots__ = ("executed", "items", "old", "pool", "prechecked", "scope", "unmatched")

    def __init__(self, scope: Scope, pool: Any = None) -> None:
        self.scope = scope
        self.pool = pool
        #: in the order the unit of work ran them
        self.items: list[Item] = []
        # state -> {attribute key: stored value} read from the database before the flush
        self.old: dict[InstanceState[Any], dict[str, Any]] = {}
        # (table, key) -> {column: value} as a batched UPDATE bound them, row by row
        self.executed: dict[tuple[Any, tuple[Any, ...]], dict[Any, Any]] = {}
        # (table, key) of rows a DELETE of this flush did not find (deleted elsewhere)
        self.unmatched: set[tuple[Any, tuple[Any, ...]]] = set()
        # table -> {key: stored row or None}: rows a multi-row DELETE is about to delete
        self.prechecked: dict[Any, dict[tuple[Any, ...], dict[str, Any]]] = {}

    def captures(self, connection: Connection) -> bool:
        """Whether changes on ``connection`` belong to this capture (``capture(engine)``)."""
        return self.pool is None or connection.engine.pool is self.pool


# -- which session's flush a connection serves -----------------------------------------------

_MARK = "outbox_capture_sessions"


def mark_connection(scope: Scope, session: Session, connection: Connection) -> None:
    """``after_begin`` of a captured session: its transaction runs on ``connection``."""
    trans = connection.get_transaction()
    if trans is None:
        return
    info = connection.info
    mark = info.get(_MARK)
    if mark is None or mark[0]() is not trans:
        entries: list[tuple[Any, Scope]] = []
        mark = info[_MARK] = (weakref.ref(trans), entries)
    mark[1].append((weakref.ref(session), scope))


def _marks(connection: Connection) -> list[tuple[Any, Scope]] | None:
    mark = connection.info.get(_MARK)
    if mark is None:
        return None
    trans = connection.get_transaction()
    if trans is None or mark[0]() is not trans:
        return None
    entries: list[tuple[Any, Scope]] = mark[1]
    return entries


def flushing_batch(connection: Connection) -> Batch | None:
    """The batch of the captured session flushing on ``connection`` now, if any."""
    marks = _marks(connection)
    if not marks:
        return None
    for ref, _ in reversed(marks):
        session = ref()
        if session is not None:
            batch: Batch | None = session.__dict__.get(_BATCH)
            if batch is not None:
                return batch
    return None


class UncapturedSessionWarning(RuntimeWarning):
    """A session that is not captured flushed a change of a captured model inside a captured
    transaction (for example a ``Session(bind=connection)`` opened in a mapper hook): the
    change commits without an event. Not a ``UserWarning``: test suites that turn those into
    errors keep running; filter it with ``warnings.filterwarnings("ignore",
    category=RuntimeWarning, message="outbox capture:")``."""


_warned: set[tuple[type, type]] = set()
_warned_lock = threading.Lock()


def _warn_uncaptured(mapper: Mapper[Any], connection: Connection, session: Session | None) -> None:
    marks = _marks(connection)
    if not marks:
        return
    for ref, scope in marks:
        captured = ref()
        if captured is None or captured is session or scope.plan(mapper) is None:
            continue
        key = (type(session), mapper.class_)
        with _warned_lock:
            if key in _warned:
                return
            _warned.add(key)
        warnings.warn(
            f"outbox capture: a {type(session).__name__} that is not captured flushed a change "
            f"of {mapper.class_.__qualname__} in the transaction of a captured session; it "
            "commits without an event. Capture that session too (capture(engine) covers every "
            "session on an engine), or flush the change through the captured session.",
            UncapturedSessionWarning,
            stacklevel=2,
        )
        return


def _needs_db(
    plan: MapperPlan, state: InstanceState[Any], deleting: bool, dialect: Dialect
) -> list[str]:
    """Captured keys whose stored (pre-flush) value is not in memory: unloaded, mutated in
    place, or held in a form the database converted when it stored it."""
    committed = state.committed_state
    dict_ = state.dict
    need = []
    held: dict[str, Any] = {}
    for key, old in committed.items():
        if key in plan.keyset:
            if old is NO_VALUE or (old is dict_.get(key) and isinstance(old, _MUTABLE)):
                need.append(key)
            else:
                held[key] = old
    if deleting:
        for k in plan.keyset:
            if k in committed:
                continue
            if k in dict_:
                held[k] = dict_[k]
            else:
                need.append(k)
    else:
        need.extend(k for k in plan.onupdate_keys if k not in dict_ and k not in committed)
    if held:
        need.extend(plan.inexact_keys(held, held, dialect))
    return need


def _prefetch_old_values(scope: Scope, session: Session, batch: Batch) -> None:
    """One locked SELECT per model for stored values of dirty/deleted objects not in memory."""
    wanted: dict[MapperPlan, list[tuple[InstanceState[Any], list[str]]]] = {}
    dialects: dict[MapperPlan, Dialect] = {}
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
            dialect = dialects.get(plan)
            if dialect is None:
                dialect = dialects[plan] = session.get_bind(mapper=plan.mapper).dialect
            need = _needs_db(plan, state, deleting, dialect)
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
    batch: Batch, plan: MapperPlan, state: InstanceState[Any], connection: Connection,
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
    need = [k for k in _needs_db(plan, state, deleting, connection.dialect)
            if old is None or k not in old]
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
        batch: Batch | None = None if session is None else session.__dict__.get(_BATCH)
        if batch is None:
            _warn_uncaptured(mapper, connection, session)
            return
        if op not in batch.scope.operations or not batch.captures(connection):
            return
        plan = batch.scope.plan(mapper)
        if plan is None:
            return
        if read_old:
            _read_missing_old_values(batch, plan, state, connection, op is Operation.DELETE)
        if record:
            batch.items.append((plan, state, op, connection, None))

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


def _write_batch(batch: Batch) -> None:
    items = batch.items
    old_values = batch.old
    # Values the flush left unloaded (server defaults, onupdate columns) and values the database
    # converted: one SELECT per model.
    missing: dict[tuple[MapperPlan, Connection], tuple[list[tuple[Any, ...]], set[str]]] = {}

    def read_back(plan: MapperPlan, conn: Connection, values: Mapping[str, Any],
                  keys: Iterable[str]) -> None:
        idents, wanted = missing.setdefault((plan, conn), ([], set()))
        idents.append(_identity(plan, values))
        wanted.update(keys)

    prepared: list[tuple[TablePlan, InstanceState[Any] | None, Operation, Connection,
                         Mapping[str, Any], dict[str, Any], list[str] | None]] = []
    for plan, state, op, conn, link_values in items:
        dialect = conn.dialect
        if state is None:  # a row of an association table
            assert link_values is not None
            prepared.append((plan, None, op, conn, link_values,
                             plan.payload(link_values, dialect)[0], None))  # type: ignore[attr-defined]
            continue
        assert isinstance(plan, MapperPlan)
        dict_ = state.dict
        if op is Operation.DELETE:
            values: Mapping[str, Any] = _stored_values(plan, state, old_values.get(state, {}))
            if batch.unmatched and (plan.table, _table_identity(plan, values)) in batch.unmatched:
                continue  # the DELETE found no row (another transaction deleted it): no event
            prepared.append((plan, state, op, conn, values, plan.stored(values, dialect), None))
            continue
        values = dict_
        if op is Operation.UPDATE and batch.executed:
            values = _as_executed(batch, plan, dict_)
        if op is Operation.CREATE:
            # After an INSERT only expired attributes (server defaults not fetched) are unknown;
            # others the object never had were inserted as NULL.
            expired = state.expired_attributes
            need = [k for k in plan.keyset if k not in dict_ and k in expired] if expired else []
        else:
            need = [k for k in plan.keyset if k not in dict_]
        payload, inexact = plan.payload(values, dialect)
        if inexact:
            need.extend(inexact)
        if need:
            read_back(plan, conn, values, need)
        prepared.append((plan, state, op, conn, values, payload, need or None))
    fetched = {key: key[0].fetch(key[1], idents, keys)
               for key, (idents, keys) in missing.items()}

    factory = RowFactory()
    by_conn: dict[Connection, list[dict[str, Any]]] = {}
    for plan, state, op, conn, values, payload, read in prepared:
        dialect = conn.dialect
        if read:
            assert isinstance(plan, MapperPlan)
            extra = fetched[(plan, conn)].get(_identity(plan, values), {})
            if extra:
                values = {**values, **extra}
                payload = plan.stored(values, dialect)
        changes = None
        if op is Operation.UPDATE:
            assert isinstance(plan, MapperPlan) and state is not None
            changes = _update_changes(plan, state, values, old_values.get(state), dialect)
            if changes is None:
                continue  # nothing really changed: no event
        row = factory.row(plan, dialect.default_schema_name, op, plan.entity_id(payload),
                          payload, changes)
        rows = by_conn.get(conn)
        if rows is None:
            rows = by_conn[conn] = []
        rows.append(row)
    for conn, rows in by_conn.items():
        factory.write(conn, rows)


def _identity(plan: MapperPlan, values: Mapping[str, Any]) -> tuple[Any, ...]:
    return tuple(values.get(k) for k in plan.pk_keys)


def _table_identity(plan: MapperPlan, values: Mapping[str, Any]) -> tuple[Any, ...]:
    """The key of the row in the plan's own table, in that table's primary-key order."""
    for table, keys in plan.table_keys:
        if table is plan.table:
            return tuple(values.get(k) for k in keys)
    return _identity(plan, values)


def _as_executed(batch: Batch, plan: MapperPlan, dict_: Mapping[str, Any]) -> Mapping[str, Any]:
    """``dict_`` with the values a batched UPDATE bound for this row (SQLAlchemy gives every
    object of an executemany UPDATE the first row's Python-side ``onupdate`` values)."""
    fixed: dict[str, Any] | None = None
    for table, keys in plan.table_keys:
        bound = batch.executed.get((table, tuple(dict_.get(k) for k in keys)))
        if bound:
            if fixed is None:
                fixed = dict(dict_)
            for col, value in bound.items():
                try:
                    fixed[plan.mapper.get_property_by_column(col).key] = value
                except UnmappedColumnError:
                    continue
    return dict_ if fixed is None else fixed


def _update_changes(
    plan: MapperPlan,
    state: InstanceState[Any],
    new: Mapping[str, Any],
    old_db: Mapping[str, Any] | None,
    dialect: Dialect,
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
    changes = changes_of(plan, old, new, keys, dialect)
    changes.update(redacted_changes(plan, redacted))
    if old_db:
        # Columns the UPDATE itself set (onupdate / server_onupdate / version counter): when
        # they changed, the row did, even if no column the application set did (SQLAlchemy
        # also runs an UPDATE when a value compares unequal to what it equals once stored).
        extra = [k for k in plan.onupdate_keys if k in old_db and k not in old]
        if extra:
            changes.update(changes_of(plan, old_db, new, extra, dialect))
    return changes or None


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
