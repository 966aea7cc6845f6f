"""``outbox.capture(...)``: an event row for every captured change, in the change's transaction.

How it works (SPEC §3):

- ``capture(target)`` (this module) validates the arguments, resolves the target to a sync
  ``Session`` class or instance (``sessionmaker``, ``scoped_session``, ``async_sessionmaker`` and
  ``AsyncSession`` through their sync session class), puts session listeners on it and, once per
  process, listeners on every ``Mapper``.
- Flush: :mod:`outbox._capture_flush` records each INSERT / UPDATE / DELETE the unit of work runs
  and, in ``after_flush``, writes their events with **one** statement on the flush's own
  connection. Commit writes the changes and their events together; a rollback, also to a
  savepoint, removes both.
- ORM bulk ``insert()/update()/delete()`` run through the session: :mod:`outbox._capture_bulk`.
- Per-model column lists, JSON conversion: :mod:`outbox._capture_plan`; event rows and the
  statement that writes them: :mod:`outbox._capture_rows`.
- Read events (``"read"`` in ``operations``, not transactional): :mod:`outbox._capture_read`.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import weakref
from collections.abc import Collection, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy import event as sa_event
from sqlalchemy.orm import Mapper, Session, scoped_session, sessionmaker

from outbox._capture_flush import MAPPER_LISTENERS, SESSION_LISTENERS, begin_batch, end_batch
from outbox._capture_plan import MapperPlan, build_plan, column_names, is_outbox_table
from outbox._capture_read import on_load
from outbox.events import Operation
from outbox.exceptions import CaptureError

if TYPE_CHECKING:
    from sqlalchemy.orm import ORMExecuteState, UOWTransaction

__all__ = ["BULK_OPT_OUT", "Capture", "capture", "captures", "registration_for"]

#: Execution option that exempts one statement from bulk capture:
#: ``session.execute(stmt, execution_options={"outbox_capture": False})``.
BULK_OPT_OUT = "outbox_capture"

log = logging.getLogger("outbox.capture")

_ALL_OPS = frozenset(op.value for op in Operation)
_DEFAULT_OPS = ("create", "update", "delete")


# --------------------------------------------------------------------------------------------
# which models


class _Models:
    """The ``models=`` argument, normalised: every model, one registry, or given mappers."""

    def __init__(self, models: Any) -> None:
        self.registry: sa.orm.registry | None = None
        self.mappers: frozenset[Mapper[Any]] | None = None
        if models is None:
            self.description = "every mapped class"
            return
        reg = models if isinstance(models, sa.orm.registry) else None
        if reg is None and isinstance(models, type) and sa.inspect(models, False) is None:
            reg = getattr(models, "registry", None)
            if not isinstance(reg, sa.orm.registry):
                raise CaptureError(
                    f"capture(models=...): {models.__qualname__} is neither a mapped class nor "
                    "a declarative base"
                )
        if reg is not None:
            self.registry = reg
            self.description = f"the models of {getattr(models, '__qualname__', reg)!r}"
            return
        items = [models] if isinstance(models, type) else list(_iterable(models, "models"))
        if not items:
            raise CaptureError("capture(models=...) is empty: nothing would be captured")
        mappers = set()
        for cls in items:
            mapper = _mapper_of(cls, "models")
            if is_outbox_table(mapper.local_table):
                raise CaptureError(
                    f"capture(models=...): {cls.__qualname__} is an outbox table; capturing it "
                    "would write an event for every event"
                )
            mappers.add(mapper)
        self.mappers = frozenset(mappers)
        self.description = ", ".join(sorted(m.class_.__qualname__ for m in mappers))

    def includes(self, mapper: Mapper[Any]) -> bool:
        if is_outbox_table(mapper.local_table):
            return False
        if self.mappers is not None:
            return any(mapper.isa(m) for m in self.mappers)
        if self.registry is not None:
            return mapper.registry is self.registry
        return True

    def known(self) -> list[Mapper[Any]]:
        """The mappers that exist now (validated at ``capture()``)."""
        if self.mappers is not None:
            return sorted(self.mappers, key=lambda m: m.class_.__qualname__)
        if self.registry is not None:
            return [m for m in self.registry.mappers if self.includes(m)]
        return []

    def key(self) -> object:
        return self.mappers if self.mappers is not None else self.registry


def _all_mappers() -> Iterable[Mapper[Any]]:
    try:
        from sqlalchemy.orm.mapper import _all_registries
    except ImportError:  # pragma: no cover - SQLAlchemy internals moved
        return []
    return [m for reg in list(_all_registries()) for m in reg.mappers]


def _iterable(value: Any, what: str) -> Iterable[Any]:
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        raise CaptureError(f"capture({what}=...) must be a collection, got {value!r}")
    return value


def _mapper_of(cls: Any, what: str) -> Mapper[Any]:
    mapper = sa.inspect(cls, False) if isinstance(cls, type) else None
    if not isinstance(mapper, Mapper):
        name = getattr(cls, "__qualname__", repr(cls))
        raise CaptureError(f"capture({what}=...): {name} is not a mapped class")
    return mapper


def _normalise_columns(
    given: Mapping[Any, Collection[str]] | None, models: _Models, what: str
) -> dict[type, frozenset[str]]:
    """``exclude=`` / ``include=``: ``{Model: {"column", ...}}``, checked against the mapping."""
    if not given:
        return {}
    if not isinstance(given, Mapping):
        raise CaptureError(f"capture({what}=...) must map a model to column names")
    out: dict[type, frozenset[str]] = {}
    for cls, names in given.items():
        mapper = _mapper_of(cls, what)
        if not models.includes(mapper):
            raise CaptureError(
                f"capture({what}=...): {cls.__qualname__} is not captured "
                f"(models: {models.description})"
            )
        columns = column_names(mapper)
        known = set(columns) | set(columns.values())
        name_set = frozenset(_iterable(names, f"{what}[{cls.__qualname__}]"))
        for name in sorted(name_set):
            if not isinstance(name, str) or name not in known:
                raise CaptureError(
                    f"capture({what}=...): {cls.__qualname__} has no column {name!r} "
                    f"(columns: {', '.join(sorted(columns.values()))})"
                )
        out[mapper.class_] = name_set
    return out


def _check_overlap(
    exclude: dict[type, frozenset[str]], include: dict[type, frozenset[str]]
) -> None:
    for cls, names in include.items():
        both = sorted(names & exclude.get(cls, frozenset()))
        if both:
            raise CaptureError(
                f"capture(): {cls.__qualname__}.{both[0]} is in both exclude= and include="
            )


def _normalise_operations(operations: Iterable[str | Operation]) -> frozenset[str]:
    ops = set()
    for op in _iterable(operations, "operations"):
        value = op.value if isinstance(op, Operation) else op
        if value not in _ALL_OPS:
            raise CaptureError(
                f"capture(operations=...): unknown operation {op!r} "
                f"(use {', '.join(sorted(_ALL_OPS))})"
            )
        ops.add(value)
    if not ops:
        raise CaptureError("capture(operations=...) is empty: nothing would be captured")
    return frozenset(ops)


# --------------------------------------------------------------------------------------------
# targets


# async_sessionmaker -> the Session subclass capture gave it (so that capturing one async
# sessionmaker never captures every plain Session in the process).
_async_sync_classes: weakref.WeakKeyDictionary[Any, type[Session]] = weakref.WeakKeyDictionary()


def _resolve_target(target: Any) -> type[Session] | Session:
    """The sync ``Session`` class or instance whose events stand for ``target``."""
    if isinstance(target, scoped_session):
        factory = target.session_factory
        if not isinstance(factory, sessionmaker):
            raise CaptureError(
                "capture(): this scoped_session is built on "
                f"{type(factory).__name__}, not a sessionmaker; pass the sessionmaker"
            )
        target = factory
    if isinstance(target, sessionmaker):
        cls: type[Session] = target.class_
        return cls
    if isinstance(target, type) and issubclass(target, Session):
        return target
    if isinstance(target, Session):
        return target
    resolved = _resolve_async_target(target)
    if resolved is not None:
        return resolved
    raise CaptureError(
        "capture() needs a Session class, sessionmaker, scoped_session, Session, "
        f"async_sessionmaker or AsyncSession; got {target!r}"
    )


def _resolve_async_target(target: Any) -> type[Session] | Session | None:
    try:
        from sqlalchemy.ext.asyncio import (
            AsyncSession,
            async_scoped_session,
            async_sessionmaker,
        )
    except ImportError:  # pragma: no cover - greenlet missing: no async sessions exist either
        return None
    if isinstance(target, async_scoped_session):
        target = target.session_factory
    if isinstance(target, async_sessionmaker):
        existing = _async_sync_classes.get(target)
        if existing is not None:
            return existing
        base: type[Session] = (
            target.kw.get("sync_session_class") or target.class_.sync_session_class
        )
        sub = type(base.__name__, (base,), {"__module__": base.__module__})
        target.configure(sync_session_class=sub)
        _async_sync_classes[target] = sub
        return sub
    if isinstance(target, type) and issubclass(target, AsyncSession):
        sync_cls: type[Session] = target.sync_session_class
        return sync_cls
    if isinstance(target, AsyncSession):
        return target.sync_session
    return None


def _overlaps(a: object, b: object) -> bool:
    if isinstance(a, type) and isinstance(b, type):
        return issubclass(a, b) or issubclass(b, a)
    if isinstance(a, type):
        return isinstance(b, a)
    if isinstance(b, type):
        return isinstance(a, b)
    return a is b


# --------------------------------------------------------------------------------------------
# the registration


class Capture:
    """One ``capture()`` registration. :meth:`remove` detaches it (tests, benchmarks)."""

    def __init__(
        self,
        target: Any,
        key: type[Session] | Session,
        models: _Models,
        operations: frozenset[str],
        exclude: dict[type, frozenset[str]],
        include: dict[type, frozenset[str]] | None = None,
    ) -> None:
        self.target = target
        self._key_ref: Any = key if isinstance(key, type) else weakref.ref(key)
        self.models = models
        self.operations = operations
        self.exclude = exclude
        self.include = include or {}
        self.create = "create" in operations
        self.update = "update" in operations
        self.delete = "delete" in operations
        self.read = "read" in operations
        self._plans: dict[Mapper[Any], MapperPlan | None] = {}
        self._table_mappers: dict[Any, Mapper[Any] | None] = {}
        self._listeners: list[tuple[str, Any]] = []
        self.active = False

    def __repr__(self) -> str:
        state = "active" if self.active else "removed"
        return (
            f"<outbox.Capture {self.target!r} models={self.models.description} "
            f"operations={sorted(self.operations)} {state}>"
        )

    @property
    def key(self) -> type[Session] | Session | None:
        """The sync Session class or instance the listeners are on (None once it is gone)."""
        key = self._key_ref
        if isinstance(key, type):
            return key
        resolved: Session | None = key()
        return resolved

    def _signature(self) -> tuple[object, ...]:
        return (self.models.key(), self.operations, self.exclude, self.include)

    def plan(self, mapper: Mapper[Any]) -> MapperPlan | None:
        """The capture plan of ``mapper``, or ``None`` when it is not captured."""
        try:
            return self._plans[mapper]
        except KeyError:
            pass
        plan = (build_plan(mapper, self.exclude, self.include)
                if self.models.includes(mapper) else None)
        self._plans[mapper] = plan
        if plan is not None and plan.secret_names:
            log.info(
                "capture: leaving %s out of events (the names look like secrets); "
                "capture(..., include={%s: {%s}}) records them", ", ".join(
                    f"{plan.model}.{name}" for name in plan.secret_names), plan.model,
                ", ".join(repr(n) for n in plan.secret_names))
        return plan

    def mapper_for_table(self, table: Any) -> Mapper[Any] | None:
        """The captured mapper whose own table is ``table`` (Core DML run through a session)."""
        try:
            return self._table_mappers[table]
        except (KeyError, TypeError):
            pass
        found = None
        for mapper in _all_mappers():
            if mapper.local_table is table and (
                mapper.inherits is None or mapper.inherits.local_table is not table
            ):
                found = mapper if self.models.includes(mapper) else None
                break
        self._table_mappers[table] = found
        return found

    # -- lifecycle ---------------------------------------------------------------------------

    def _attach(self) -> None:
        key = self.key
        assert key is not None
        listeners: list[tuple[str, Any]] = [
            ("before_flush", self._before_flush),
            ("after_flush", self._after_flush),
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

    def _before_flush(self, session: Session, flush_context: UOWTransaction, _: Any) -> None:
        begin_batch(self, session)

    def _after_flush(self, session: Session, flush_context: UOWTransaction) -> None:
        end_batch(session)

    def _do_orm_execute(self, orm_state: ORMExecuteState) -> Any:
        if not (orm_state.is_insert or orm_state.is_update or orm_state.is_delete):
            return None
        from outbox._capture_bulk import capture_bulk

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
    operations: Iterable[str | Operation] = _DEFAULT_OPS,
    exclude: Mapping[Any, Collection[str]] | None = None,
    include: Mapping[Any, Collection[str]] | None = None,
) -> Capture:
    """Write an event for every change flushed by sessions of ``target``, in the same transaction.

    ``target``: a ``Session`` class (or subclass), ``sessionmaker``, ``scoped_session``,
    ``Session``, ``async_sessionmaker`` or ``AsyncSession``. ``models``: a declarative base (its
    registry's models, also those mapped later), or mapped classes (and their subclasses);
    default: every mapped class except the outbox's own tables. ``operations``: any of
    ``"create"``, ``"update"``, ``"delete"``, ``"read"``. ``exclude``: ``{Model: {"column",
    ...}}`` columns never written to events. Columns whose names look like secrets
    (``password``, ``hashed_password``, ``api_key``, ``refresh_token``, … see
    :mod:`outbox._capture_secrets`) are left out too unless listed in ``include={Model:
    {"column", ...}}``. An update of a column left out still writes an event; its
    ``metadata.changes`` has ``{"column": {"redacted": true}}``: that it changed, not its values.

    Call once per target at configuration time. Calling again with the same arguments returns the
    existing registration; a different registration that overlaps (same target, or a Session
    class and a sessionmaker/session of it) raises :class:`outbox.CaptureError`, because both
    would write every event twice. Errors in the arguments (unmapped class, unknown column,
    unknown operation) raise :class:`outbox.CaptureError` here, not at the first flush.
    """
    key = _resolve_target(target)
    model_set = _Models(models)
    ops = _normalise_operations(operations)
    excl = _normalise_columns(exclude, model_set, "exclude")
    incl = _normalise_columns(include, model_set, "include")
    _check_overlap(excl, incl)
    new = Capture(target, key, model_set, ops, excl, incl)
    # Validate what exists now: a bad model fails here rather than at the first flush.
    for mapper in model_set.known():
        new.plan(mapper)
    with _lock:
        for other in list(_registry):
            other_key = other.key
            if not other.active or other_key is None:
                _registry.remove(other)
                continue
            if not _overlaps(key, other_key):
                continue
            if other_key is key and other._signature() == new._signature():
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
        _mapper_listeners_on = True
    elif not want and _mapper_listeners_on:
        for name, fn in MAPPER_LISTENERS:
            sa_event.remove(Mapper, name, fn)
        _mapper_listeners_on = False
    want_load = any(c.active and c.read for c in _registry)
    if want_load and not _load_listener_on:
        sa_event.listen(Mapper, "load", on_load)
        _load_listener_on = True
    elif not want_load and _load_listener_on:
        sa_event.remove(Mapper, "load", on_load)
        _load_listener_on = False



# --------------------------------------------------------------------------------------------
# which registration covers a session (read events)

_REGISTRATION = "_outbox_registration"


def registration_for(session: Session) -> Capture | None:
    """The active registration covering ``session`` (cached per session and registry state)."""
    cached = session.__dict__.get(_REGISTRATION)
    if cached is not None and cached[0] == _generation:
        found: Capture | None = cached[1]
        return found
    found = None
    for reg in list(_registry):
        key = reg.key
        if reg.active and key is not None and (
            key is session or (isinstance(key, type) and isinstance(session, key))
        ):
            found = reg
            break
    session.__dict__[_REGISTRATION] = (_generation, found)
    return found
