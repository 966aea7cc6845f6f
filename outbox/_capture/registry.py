"""The registrations: ``capture()``, :class:`Capture`, and the listeners they put on SQLAlchemy.

A registration puts session listeners on its target (``before_flush``/``after_flush`` for the
flush side, ``after_begin`` to mark its transaction's connections, ``do_orm_execute`` for bulk
statements, the commit guard) and, while at least one registration is active, process-wide
listeners on every ``Mapper`` and every ``Engine`` (:mod:`~outbox._capture.statements`).
Registrations that overlap (the same sessions captured twice) are refused: every event would be
written twice.

``capture(engine)`` puts its listeners on ``Session`` itself and captures the changes a session
of any class makes on connections of that engine's pool; a session that a session-level
registration covers follows that registration instead.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Collection, Iterable, Mapping
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event as sa_event
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Mapper, ORMExecuteState, Session, UOWTransaction
from sqlalchemy.orm.attributes import instance_state

from outbox._capture.bulk import capture_bulk
from outbox._capture.flush import (
    MAPPER_LISTENERS,
    SESSION_LISTENERS,
    begin_batch,
    end_batch,
    mark_connection,
)
from outbox._capture.read import emit_read
from outbox._capture.scope import DEFAULT_OPERATIONS, Scope
from outbox._capture.statements import ENGINE_LISTENERS
from outbox._capture.targets import engine_pool, overlaps, resolve_target
from outbox.events import Operation
from outbox.exceptions import CaptureError

__all__ = ["Capture", "capture", "captures", "registration_for"]


class Capture(Scope):
    """One ``capture()`` registration. :meth:`remove` detaches it (tests, benchmarks)."""

    def __init__(
        self,
        target: Any,
        key: type[Session] | Session,
        models: Any = None,
        operations: Iterable[str | Operation] = DEFAULT_OPERATIONS,
        exclude: Mapping[Any, Collection[str]] | None = None,
        include: Mapping[Any, Collection[str]] | None = None,
        associations: bool = True,
        pool: Any = None,
    ) -> None:
        super().__init__(models, operations, exclude, include, associations)
        self.target = target
        #: ``capture(engine)``: the engine's pool (changes on its connections are captured)
        self.pool = pool
        self._key_ref: Any = key if isinstance(key, type) else weakref.ref(key)
        self._listeners: list[tuple[str, Any]] = []
        self.active = False

    def __repr__(self) -> str:
        state = "active" if self.active else "removed"
        return (
            f"<outbox.Capture {self.target!r} models={self.models.description} "
            f"operations={sorted(op.value for op in self.operations)} {state}>"
        )

    @property
    def key(self) -> type[Session] | Session | None:
        """The sync Session class or instance the listeners are on (None once it is gone)."""
        key = self._key_ref
        if isinstance(key, type):
            return key
        resolved: Session | None = key()
        return resolved

    # -- lifecycle ---------------------------------------------------------------------------

    def _attach(self) -> None:
        key = self.key
        assert key is not None
        listeners: list[tuple[str, Any]] = [
            ("before_flush", self._before_flush),
            ("after_flush", self._after_flush),
            ("after_begin", self._after_begin),
            *SESSION_LISTENERS,
            ("do_orm_execute", self._do_orm_execute),
        ]
        for name, fn in listeners:
            sa_event.listen(key, name, fn)
        self._listeners = listeners
        self.active = True

    def remove(self) -> None:
        """Detach the listeners; sessions of the target stop writing events. Idempotent."""
        with _lock:
            if not self.active:
                return
            key = self.key
            if key is not None:
                for name, fn in self._listeners:
                    with contextlib.suppress(sa.exc.InvalidRequestError):
                        sa_event.remove(key, name, fn)
            self._listeners = []
            self.active = False
            if self in _registry:
                _registry.remove(self)
            _sync_mapper_listeners()

    def __enter__(self) -> Capture:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    # -- session listeners -------------------------------------------------------------------

    def _handles(self, session: Session) -> bool:
        """An engine registration steps back for sessions a session registration covers, and
        for sessions bound to another engine."""
        if self.pool is None:
            return True
        if registration_for(session) is not None:
            return False
        bind = session.bind
        return bind is None or engine_pool(bind) is self.pool

    def _before_flush(self, session: Session, flush_context: UOWTransaction, _: Any) -> None:
        if self._handles(session):
            begin_batch(self, session, self.pool)

    def _after_flush(self, session: Session, flush_context: UOWTransaction) -> None:
        end_batch(session)

    def _after_begin(self, session: Session, transaction: Any, connection: Any) -> None:
        if self._handles(session) and (
                self.pool is None or connection.engine.pool is self.pool):
            mark_connection(self, session, connection)

    def _do_orm_execute(self, orm_state: ORMExecuteState) -> Any:
        if not (orm_state.is_insert or orm_state.is_update or orm_state.is_delete):
            return None
        if not self._handles(orm_state.session):
            return None
        if self.pool is not None:
            conn = orm_state.session.connection(bind_arguments=orm_state.bind_arguments)
            if conn.engine.pool is not self.pool:
                return None
        return capture_bulk(self, orm_state)


_lock = threading.RLock()
_registry: list[Capture] = []


def captures() -> list[Capture]:
    """The active registrations (read-only snapshot)."""
    with _lock:
        return [c for c in _registry if c.active and c.key is not None]


def capture(
    target: Any,
    *,
    models: Any = None,
    operations: Iterable[str | Operation] = DEFAULT_OPERATIONS,
    exclude: Mapping[Any, Collection[str]] | None = None,
    include: Mapping[Any, Collection[str]] | None = None,
    associations: bool = True,
) -> Capture:
    """Write an event for every change flushed by sessions of ``target``, in the same transaction.

    ``target``: a ``Session`` class (or subclass), ``sessionmaker``, ``scoped_session``,
    ``Session``, ``async_sessionmaker`` or ``AsyncSession``; or an ``Engine`` / ``AsyncEngine``:
    every session of any class, on connections of that engine. ``models``: a declarative base (its
    registry's models, also those mapped later), or mapped classes (and their subclasses);
    default: every mapped class except the outbox's own tables. ``operations``: any of
    ``"create"``, ``"update"``, ``"delete"``, ``"read"`` (or :class:`outbox.events.Operation`).
    ``exclude``: ``{Model: {"column", ...}}`` columns never written to events. Columns whose
    names look like secrets (``password``, ``hashed_password``, ``api_key``, ``refresh_token``,
    … see :mod:`outbox._secret_names`) are left out too unless listed in
    ``include={Model: {"column", ...}}``. An update of a column left out still writes an event;
    its ``metadata.changes`` has ``{"column": {"redacted": true}}``: that it changed, not its
    values.

    ``associations``: rows the unit of work inserts and deletes in the ``secondary`` table of a
    relationship of a captured model get ``schema.table.create`` / ``.delete`` events (the link
    row as payload); ``False`` leaves out those of tables no captured model maps.

    Call once per target at configuration time. Calling again with the same arguments returns the
    existing registration; a different registration that overlaps (same target, or a Session
    class and a sessionmaker/session of it) raises :class:`CaptureError`, because both
    would write every event twice. Errors in the arguments (unmapped class, unknown column,
    unknown operation) raise :class:`outbox.exceptions.CaptureError` here, not at the first flush.
    """
    pool = engine_pool(target)
    key = Session if pool is not None else resolve_target(target)
    new = Capture(target, key, models, operations, exclude, include, associations, pool)
    with _lock:
        for other in list(_registry):
            other_key = other.key
            if not other.active or other_key is None:
                _registry.remove(other)
                continue
            if (other.pool is None) != (pool is None):
                continue  # an engine and a session registration: the session's takes the flush
            if pool is not None and other.pool is not pool:
                continue
            if pool is None and not overlaps(key, other_key):
                continue
            if other_key is key and other.signature() == new.signature():
                return other
            raise CaptureError(
                f"capture(): {target!r} is already captured by {other!r}; capture each session "
                "factory once (or call .remove() on the earlier registration first)"
            )
        new._attach()
        _registry.append(new)
        _sync_mapper_listeners()
    return new


# --------------------------------------------------------------------------------------------
# mapper listeners (process-wide, installed while at least one registration is active)

_mapper_listeners_on = False
_load_listener_on = False
_generation = 0  # bumped whenever the registry changes (invalidates per-session lookups)


def _sync_mapper_listeners() -> None:
    global _mapper_listeners_on, _load_listener_on, _generation
    _generation += 1
    want = any(c.active for c in _registry)
    if want and not _mapper_listeners_on:
        for name, fn in MAPPER_LISTENERS:
            sa_event.listen(Mapper, name, fn)
        for name, fn in ENGINE_LISTENERS:
            sa_event.listen(Engine, name, fn)
        _mapper_listeners_on = True
    elif not want and _mapper_listeners_on:
        for name, fn in MAPPER_LISTENERS:
            sa_event.remove(Mapper, name, fn)
        for name, fn in ENGINE_LISTENERS:
            sa_event.remove(Engine, name, fn)
        _mapper_listeners_on = False
    want_load = any(c.active and c.read for c in _registry)
    if want_load and not _load_listener_on:
        sa_event.listen(Mapper, "load", _on_load)
        _load_listener_on = True
    elif not want_load and _load_listener_on:
        sa_event.remove(Mapper, "load", _on_load)
        _load_listener_on = False


def _on_load(target: Any, context: Any) -> None:
    """Mapper ``load`` listener: a read event when the loading session's registration asks."""
    state = instance_state(target)
    session = state.session or getattr(context, "session", None)
    if session is None:
        return
    reg = registration_for(session) or _engine_registration(session)
    if reg is not None and reg.read:
        emit_read(reg, state, session)


# --------------------------------------------------------------------------------------------
# which registration covers a session (read events)


def _engine_registration(session: Session) -> Capture | None:
    pool = engine_pool(session.bind) if session.bind is not None else None
    if pool is None:
        return None
    for reg in list(_registry):
        if reg.active and reg.pool is pool:
            return reg
    return None

_REGISTRATION = "_outbox_registration"


def registration_for(session: Session) -> Capture | None:
    """The active session-level registration covering ``session`` (cached per session and
    registry state); ``capture(engine)`` registrations are not considered."""
    cached = session.__dict__.get(_REGISTRATION)
    if cached is not None and cached[0] == _generation:
        found: Capture | None = cached[1]
        return found
    found = None
    for reg in list(_registry):
        key = reg.key
        if reg.active and key is not None and reg.pool is None and (
            key is session or (isinstance(key, type) and isinstance(session, key))
        ):
            found = reg
            break
    session.__dict__[_REGISTRATION] = (_generation, found)
    return found
