"""The ``events`` table and its ORM mapping :class:`Event`, plus event constructors.

``Event`` lives on its own :class:`~sqlalchemy.MetaData` (``Event.metadata``) so that an
application can add the outbox tables to its Alembic autogenerate (``target_metadata=[Base.metadata,
outbox.Event.metadata]``) without the outbox depending on the application's declarative base.

The column called ``metadata`` in the table is the ``meta`` attribute in Python, because
``metadata`` is reserved by SQLAlchemy's declarative base for the table's ``MetaData``.
"""

from __future__ import annotations

import copy as _copy
import datetime as dt
import enum
import os
import socket
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import sqlalchemy as sa
from sqlalchemy import event as sa_event
from sqlalchemy.dialects import mysql, postgresql
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.schema import CreateColumn
from sqlalchemy.types import TypeDecorator

from outbox import _json
from outbox._patterns import compile_pattern
from outbox._sql import ddl
from outbox.exceptions import OutboxError, SerializationError

__all__ = [
    "Event",
    "EventFilter",
    "EventSource",
    "EventStatus",
    "Operation",
    "OutboxBase",
    "as_event_id",
    "event_type",
    "get_instance_id",
    "new_event",
    "new_event_id",
    "order_key",
    "set_instance_id",
    "utcnow",
]

UTC = dt.UTC


class EventSource(enum.StrEnum):
    """Where an event came from (the ``source`` column)."""

    DATABASE = "database"
    WEBSOCKET = "websocket"
    FRONTEND = "frontend"
    SYSTEM = "system"
    INTERNAL = "internal"


class EventStatus(enum.StrEnum):
    """Life cycle of an event row: pending → processing → completed | failed."""

    PENDING = "pending"
    PROCESSING = "processing"
    COMPLETED = "completed"
    FAILED = "failed"

    @property
    def finished(self) -> bool:
        return self in (EventStatus.COMPLETED, EventStatus.FAILED)


class Operation(enum.StrEnum):
    """Row operations that produce events."""

    CREATE = "create"
    UPDATE = "update"
    DELETE = "delete"
    READ = "read"


def utcnow() -> dt.datetime:
    """The current time as an aware UTC datetime (the only kind stored in the table)."""
    return dt.datetime.now(UTC)


# --------------------------------------------------------------------------------------------
# event ids


def new_event_id() -> uuid.UUID:
    """A new event id: a version-7 UUID (RFC 9562), 48 bits of Unix milliseconds then 74 random.

    Why not ``uuid4``: ids ordered by time keep the id indexes' writes together. Every event
    adds an entry to the id index of ``events_live`` when it is written and to that of
    ``events_done`` when the relay completes it (a claim that finds no room on its page adds one
    more); with random ids each entry of a batch of consecutive events lands on a leaf page of
    its own — a cache miss and, after each checkpoint, a full-page image in the WAL — with
    time-ordered ids a batch touches a few pages.
    The ids are as unique as ``uuid4`` ones for all practical purposes (74 random bits per
    millisecond) and reveal only the creation time, which the row holds anyway.
    """
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")  # 80 random bits, 74 of them used
    return uuid.UUID(int=(
        (ms & 0xFFFF_FFFF_FFFF) << 80      # unix_ts_ms
        | 0x7 << 76                        # version 7
        | (rand >> 68) << 64               # rand_a, 12 bits
        | 0b10 << 62                       # variant
        | (rand & ((1 << 62) - 1))         # rand_b, 62 bits
    ))


# --------------------------------------------------------------------------------------------
# instance id


_instance_id: str | None = None


def get_instance_id() -> str:
    """The id of this process: ``set_instance_id``/config, ``OUTBOX_INSTANCE_ID``, or hostname-pid.

    Computed lazily and per process, so a forked worker gets its own pid in the id.
    """
    if _instance_id is not None:
        return _instance_id
    env = os.environ.get("OUTBOX_INSTANCE_ID")
    if env:
        return env
    global _default_id
    pid = os.getpid()
    if _default_id is None or _default_id[0] != pid:  # gethostname is a syscall: once per pid
        _default_id = (pid, f"{socket.gethostname()}-{pid}")
    return _default_id[1]


_default_id: tuple[int, str] | None = None


def set_instance_id(value: str | None) -> None:
    """Set the id stamped on events this process creates (``None``: back to the default)."""
    global _instance_id
    if value is not None and (not isinstance(value, str) or not value.strip()):
        raise OutboxError("instance_id must be a non-empty string")
    _instance_id = value


# --------------------------------------------------------------------------------------------
# column types


class UTCDateTime(TypeDecorator[dt.datetime]):
    """``timestamptz`` that always hands back aware UTC datetimes, on every dialect.

    SQLite and MariaDB have no time zone in their datetime types: values are stored as UTC without
    an offset. Naive datetimes given as parameters are taken to be UTC.
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> sa.types.TypeEngine[Any]:
        if dialect.name in ("mysql", "mariadb"):
            return dialect.type_descriptor(mysql.DATETIME(fsp=6))
        return dialect.type_descriptor(sa.DateTime(timezone=True))

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if not isinstance(value, dt.datetime):
            raise TypeError(f"expected a datetime, got {type(value).__qualname__}")
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        if dialect.name == "postgresql":
            return value
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: Any, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if isinstance(value, str):  # raw SQLite text from a hand-written query
            value = dt.datetime.fromisoformat(value)
        result: dt.datetime = value
        if result.tzinfo is None:
            return result.replace(tzinfo=UTC)
        return result.astimezone(UTC)


#: JSON on every dialect, ``jsonb`` on PostgreSQL.
JSONType = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
#: ``text`` where the dialect can index it, ``varchar(255)`` on MariaDB/MySQL.
ShortText = sa.Text().with_variant(sa.String(255), "mysql", "mariadb")
#: Event types (and ordering keys): ``ShortText`` with the byte-order "C" collation on PostgreSQL,
#: so that a type pattern's literal leading segments become an index range (``LIKE 'public.%'``
#: and ``type >= 'public.' AND type < 'public/'``) whatever the database's default collation is,
#: and comparisons cost a ``memcmp``.
TypeText = (
    sa.Text()
    .with_variant(postgresql.TEXT(collation="C"), "postgresql")
    .with_variant(sa.String(255), "mysql", "mariadb")
)

_NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class OutboxBase(DeclarativeBase):
    """Declarative base of the outbox tables, on a MetaData of their own."""

    metadata = sa.MetaData(naming_convention=_NAMING)


_PENDING = sa.text("status = 'pending'")
_UNFINISHED_WITH_KEY = sa.text("status <> 'completed' AND ordering_key IS NOT NULL")
_NOT_COMPLETED = sa.text("status <> 'completed'")
_HAS_USER = sa.text("user_id IS NOT NULL")
_HAS_SESSION = sa.text("session_id IS NOT NULL")
_HAS_ENTITY = sa.text("entity IS NOT NULL OR entity_id IS NOT NULL")


def _single_table(
    ddl: Any, target: Any, bind: Any, tables: Any = None, state: Any = None, *,
    dialect: Dialect, compiler: Any = None, checkfirst: bool = False,
) -> bool:
    """``ddl_if`` rule: the object exists where ``events`` is one table — not on PostgreSQL,
    whose ``events`` is partitioned and keeps its keys and indexes on the partitions (see
    :mod:`outbox._sql.ddl`)."""
    return bool(dialect.name != "postgresql")


class Event(OutboxBase):
    """One event: a row of the ``events`` table (its columns: docs/audit.md).

    Create events with :func:`new_event` (or let :func:`outbox.capture` do it) and add them to a
    session to make them part of that session's transaction.
    """

    __tablename__ = "events"
    # seq is filled by the database; after an ORM insert it is loaded on first access.
    __mapper_args__ = {"eager_defaults": False}

    id: Mapped[uuid.UUID] = mapped_column(sa.Uuid(), primary_key=True, default=new_event_id)
    seq: Mapped[int] = mapped_column(
        sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
        sa.Identity(always=False),
        nullable=False,
        doc="Insertion order; assigned by the database (identity, AUTO_INCREMENT, SQLite trigger).",
    )
    source: Mapped[str] = mapped_column(ShortText, nullable=False)
    type: Mapped[str] = mapped_column(TypeText, nullable=False)
    status: Mapped[str] = mapped_column(
        ShortText, nullable=False, default=EventStatus.PENDING.value
    )
    payload: Mapped[Any] = mapped_column(JSONType, nullable=False, default=dict)
    user_id: Mapped[str | None] = mapped_column(ShortText)
    session_id: Mapped[str | None] = mapped_column(ShortText)
    instance_id: Mapped[str] = mapped_column(ShortText, nullable=False, default=get_instance_id)
    schema_name: Mapped[str | None] = mapped_column(ShortText)
    entity: Mapped[str | None] = mapped_column(ShortText)
    entity_id: Mapped[str | None] = mapped_column(ShortText)
    operation: Mapped[str | None] = mapped_column(ShortText)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), nullable=False, default=utcnow)
    processed_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    completed_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    error: Mapped[str | None] = mapped_column(sa.Text())
    meta: Mapped[dict[str, Any]] = mapped_column(
        "metadata", JSONType, nullable=False, default=dict
    )
    retry_count: Mapped[int] = mapped_column(sa.Integer(), nullable=False, default=0)
    next_attempt_at: Mapped[dt.datetime] = mapped_column(
        UTCDateTime(), nullable=False, default=utcnow
    )
    # Relay bookkeeping: columns of the relay's own, next to the documented ones.
    # Compared for equality only: byte-wise on PostgreSQL, the cheapest for its index.
    ordering_key: Mapped[str | None] = mapped_column(
        TypeText, doc="Events with the same key are delivered in seq order."
    )
    lease_owner: Mapped[str | None] = mapped_column(ShortText)
    lease_token: Mapped[uuid.UUID | None] = mapped_column(sa.Uuid())
    lease_expires_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    # PostgreSQL: pg_current_xact_id() of the inserting transaction (database provider watermark).
    # FetchedValue: the ORM leaves the column out of INSERTs so the PostgreSQL default applies.
    txid: Mapped[int | None] = mapped_column(sa.BigInteger(), server_default=sa.FetchedValue())

    # The keys and indexes below are those of the single-table layout (SQLite, MariaDB/MySQL).
    # On PostgreSQL ``events`` is partitioned by status (outbox/_sql/ddl.py; docs/relay.md,
    # "Storage"): the unfinished rows and the finished history each have their own indexes, so
    # none of these is created there (``ddl_if``). MariaDB has no partial indexes: plain ones.
    __table_args__ = (
        sa.UniqueConstraint("seq").ddl_if(callable_=_single_table),
        # Claim: due pending rows in seq order.
        sa.Index("ix_events_pending", "seq", "next_attempt_at",
                 sqlite_where=_PENDING).ddl_if(callable_=_single_table),
        # Per-key order: is there an unfinished older event with the same key?
        sa.Index("ix_events_unfinished_key", "ordering_key", "seq",
                 sqlite_where=_UNFINISHED_WITH_KEY).ddl_if(callable_=_single_table),
        # Status filters, lease recovery, blocked keys, cleanup of failed rows.
        sa.Index("ix_events_status_created_at", "status", "created_at")
        .ddl_if(callable_=_single_table),
        # Audit.
        sa.Index("ix_events_type_created_at", "type", "created_at")
        .ddl_if(callable_=_single_table),
        sa.Index("ix_events_entity_entity_id", "entity", "entity_id")
        .ddl_if(callable_=_single_table),
        sa.Index("ix_events_user_id", "user_id", sqlite_where=_HAS_USER)
        .ddl_if(callable_=_single_table),
        # EventFilter(session_id=...): selective, and no other index narrows it (seq scan).
        sa.Index("ix_events_session_id", "session_id", sqlite_where=_HAS_SESSION)
        .ddl_if(callable_=_single_table),
        # EventFilter(instance_id=...): one process's events lie in its lifetime, so scanning
        # the created_at index for them reads every older row first.
        sa.Index("ix_events_instance_id_created_at", "instance_id", "created_at")
        .ddl_if(callable_=_single_table),
        sa.Index("ix_events_created_at", "created_at").ddl_if(callable_=_single_table),
        # Database provider: rows in commit-visibility order (PostgreSQL only uses it).
        sa.Index("ix_events_txid_seq", "txid", "seq").ddl_if(callable_=_single_table),
        {"postgresql_partition_by": "LIST (status)"},
    )

    def __repr__(self) -> str:
        return (
            f"<Event {self.type} id={self.id} seq={self.__dict__.get('seq')} "
            f"status={self.status}>"
        )

    # -- conversions -------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """All columns as a plain dict keyed by column name (``metadata``, not ``meta``)."""
        state = self.__dict__
        return {name: _copy.deepcopy(state.get(attr)) for attr, name in _ATTR_TO_COLUMN.items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Event:
        """Build a transient event from :meth:`to_dict` output (unknown keys are an error)."""
        unknown = set(data) - _COLUMN_TO_ATTR.keys()
        if unknown:
            raise ValueError(f"unknown event fields: {', '.join(sorted(unknown))}")
        values = {_COLUMN_TO_ATTR[k]: _copy.deepcopy(v) for k, v in data.items()}
        return cls._from_values(values)

    @classmethod
    def _from_values(cls, values: Mapping[str, Any]) -> Event:
        """Fast construction of a transient, unmodified-looking instance from attribute values.

        Skips ``__init__`` and attribute events (providers and the wire codec build many of
        these). Missing attributes get their defaults.
        """
        obj: Event = _MANAGER.new_instance()
        state = obj.__dict__
        for attr in _ATTR_TO_COLUMN:
            if attr in values:
                state[attr] = values[attr]
            else:
                state[attr] = _default_for(attr)
        return obj

    @classmethod
    def _from_row(cls, row: Sequence[Any]) -> Event:
        """Like :meth:`_from_values`, for a row holding every column in :data:`COLUMNS` order.

        The relay and the database bus build one per row read: one dict update, no intermediate
        mapping (fewer allocations also mean fewer garbage-collector passes at thousands of events
        a second).
        """
        obj: Event = _MANAGER.new_instance()
        obj.__dict__.update(zip(_ATTRS_IN_COLUMN_ORDER, row, strict=True))
        return obj

    def copy(self) -> Event:
        """A deep, transient copy (providers hand these out so callers cannot mutate storage)."""
        state = self.__dict__
        return Event._from_values({a: _copy.deepcopy(state.get(a)) for a in _ATTR_TO_COLUMN})

    @property
    def finished(self) -> bool:
        return self.status in (EventStatus.COMPLETED, EventStatus.FAILED)


_MANAGER = sa.orm.instrumentation.manager_of_class(Event)
assert _MANAGER is not None
_ATTR_TO_COLUMN: dict[str, str] = {
    prop.key: prop.columns[0].name for prop in sa.inspect(Event).column_attrs
}
_COLUMN_TO_ATTR: dict[str, str] = {v: k for k, v in _ATTR_TO_COLUMN.items()}
#: Column names of the events table, in table order.
COLUMNS: tuple[str, ...] = tuple(c.name for c in Event.__table__.columns)
_ATTRS_IN_COLUMN_ORDER: tuple[str, ...] = tuple(_COLUMN_TO_ATTR[c] for c in COLUMNS)


def _default_for(attr: str) -> Any:
    if attr in ("payload", "meta"):
        return {}
    if attr == "retry_count":
        return 0
    if attr == "status":
        return EventStatus.PENDING.value
    return None


# --------------------------------------------------------------------------------------------
# constructors


def event_type(schema: str | None, entity: str, operation: str) -> str:
    """``schema.entity.operation`` (``entity.operation`` when there is no schema)."""
    parts = [p for p in (schema, entity, operation) if p]
    return ".".join(parts)


def new_event(
    source: EventSource | str,
    type: str,
    payload: Any = None,
    *,
    user_id: str | int | None = None,
    session_id: str | None = None,
    instance_id: str | None = None,
    schema_name: str | None = None,
    entity: str | None = None,
    entity_id: str | int | None = None,
    operation: Operation | str | None = None,
    metadata: Mapping[str, Any] | None = None,
    ordering_key: str | None = None,
    id: uuid.UUID | str | None = None,
    created_at: dt.datetime | None = None,
    status: EventStatus | str = EventStatus.PENDING,
) -> Event:
    """A new pending event: a time-ordered uuid id (:func:`new_event_id`), ``created_at`` now,
    ``instance_id`` of this process.

    ``user_id``/``session_id`` default to the ones set with :func:`outbox.context`, and the
    context's metadata is merged under ``metadata`` (so is the W3C ``traceparent``/``tracestate``
    of the active OpenTelemetry span, when there is one). ``payload`` and ``metadata`` are
    converted to JSON-safe values now, so an unserialisable value fails here and not in a
    background relay.
    Add the result to a session to commit it with the session's transaction.
    """
    from outbox._context import current_context  # local: context imports nothing from here
    from outbox._tracing import current_trace_context

    if not isinstance(type, str) or not type:
        raise ValueError("event type must be a non-empty string")
    source_value = EventSource(source).value if isinstance(source, EventSource) else str(source)
    if not source_value:
        raise ValueError("event source must be a non-empty string")
    ctx = current_context()
    if user_id is None:
        user_id = ctx.user_id
    if session_id is None:
        session_id = ctx.session_id
    meta: dict[str, Any] = dict(ctx.metadata)
    meta.update(current_trace_context())  # the active span, when OpenTelemetry is in use
    if metadata:
        meta.update(metadata)
    try:
        payload_json = _json.to_jsonable({} if payload is None else payload)
    except _json.NotSerialisable as exc:
        raise SerializationError("Event", f"payload{'.' + exc.path if exc.path else ''}",
                                 exc.value) from None
    try:
        meta_json = _json.to_jsonable(meta)
    except _json.NotSerialisable as exc:
        raise SerializationError("Event", f"metadata.{exc.path}", exc.value) from None
    now = created_at or utcnow()
    event_id = uuid.UUID(id) if isinstance(id, str) else (id or new_event_id())
    return Event(
        id=event_id,
        source=source_value,
        type=type,
        status=EventStatus(status).value,
        payload=payload_json,
        user_id=None if user_id is None else str(user_id),
        session_id=None if session_id is None else str(session_id),
        instance_id=instance_id or get_instance_id(),
        schema_name=schema_name,
        entity=entity,
        entity_id=None if entity_id is None else str(entity_id),
        operation=None if operation is None else str(operation),
        created_at=now,
        meta=meta_json,
        retry_count=0,
        next_attempt_at=now,
        ordering_key=ordering_key,
    )


# --------------------------------------------------------------------------------------------
# dialect-specific DDL (outbox/_sql/ddl.py), also issued by the Alembic revisions


@compiles(CreateColumn, "sqlite")
def _sqlite_seq_default(element: CreateColumn, compiler: Any, **kw: Any) -> str:
    text: str = compiler.visit_create_column(element, **kw)
    column = element.element
    if column.name == "seq" and column.table is Event.__table__:
        text += f" DEFAULT {ddl.SQLITE_SEQ_DEFAULT}"
    return text


@sa_event.listens_for(Event.__table__, "after_create")
def _after_create(target: sa.Table, connection: sa.Connection, **_: Any) -> None:
    for statement in ddl.after_create(connection.dialect.name):
        connection.exec_driver_sql(statement)


# The primary key of the mapping is the single-table layout's; on PostgreSQL each partition has
# its own (PG_LIVE_INDEXES, PG_DONE_INDEXES).
_EVENTS_TABLE: sa.Table = Event.__table__  # type: ignore[assignment]
_EVENTS_TABLE.primary_key.ddl_if(callable_=_single_table)


# -- selecting events ------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class EventFilter:
    """Which events ``list`` returns. ``None`` fields do not filter.

    ``type`` is a pattern (``outbox.patterns``). ``start_time`` is inclusive and ``end_time``
    exclusive, on ``created_at``. Results are ordered by ``created_at``, then ``seq``, then
    ``id``, so ``limit``/``offset`` pages are stable.
    """

    source: EventSource | str | None = None
    type: str | None = None
    status: EventStatus | str | None = None
    user_id: str | None = None
    session_id: str | None = None
    instance_id: str | None = None
    schema_name: str | None = None
    entity: str | None = None
    entity_id: str | None = None
    operation: str | None = None
    start_time: dt.datetime | None = None
    end_time: dt.datetime | None = None
    limit: int | None = None
    offset: int = 0

    def __post_init__(self) -> None:
        if self.type is not None:
            compile_pattern(self.type)  # ValueError for a bad pattern, now
        if self.limit is not None and self.limit < 0:
            raise ValueError("EventFilter.limit must be >= 0")
        if self.offset < 0:
            raise ValueError("EventFilter.offset must be >= 0")
        for name in ("start_time", "end_time"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, dt.datetime):
                raise ValueError(f"EventFilter.{name} must be a datetime")

    #: Fields compared for equality with the event attribute of the same name.
    EQUALITY_FIELDS: ClassVar[tuple[str, ...]] = (
        "source", "status", "user_id", "session_id", "instance_id", "schema_name", "entity",
        "entity_id", "operation",
    )

    def equality_items(self) -> list[tuple[str, str]]:
        """(field, value-as-text) for every equality field that is set."""
        out = []
        for name in self.EQUALITY_FIELDS:
            value = getattr(self, name)
            if value is not None:
                out.append((name, value.value if isinstance(value, enum.Enum) else str(value)))
        return out

    def matches(self, event: Event) -> bool:
        """True when ``event`` passes every condition (ignores limit/offset)."""
        for name, value in self.equality_items():
            if getattr(event, name) != value:
                return False
        if self.type is not None and not compile_pattern(self.type).matches(event.type):
            return False
        created = event.created_at
        if self.start_time is not None and created < _aware(self.start_time):
            return False
        return not (self.end_time is not None and created >= _aware(self.end_time))

    def select(self, events: Iterable[Event]) -> list[Event]:
        """The events that match, in the stable order, paged by ``offset``/``limit`` (what
        ``list`` returns for providers that filter in Python)."""
        rows = sorted((e for e in events if self.matches(e)), key=order_key)
        end = None if self.limit is None else self.offset + self.limit
        return rows[self.offset:end]


def _aware(value: dt.datetime) -> dt.datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)


def order_key(event: Event) -> tuple[dt.datetime, bool, int, str]:
    """``created_at``, then ``seq`` (events without one after those with one), then ``id``."""
    seq = event.__dict__.get("seq")
    return (event.created_at, seq is None, seq or 0, str(event.id))


def as_event_id(event_id: uuid.UUID | str) -> uuid.UUID:
    """``event_id`` as a UUID (``ValueError`` naming the bad value otherwise)."""
    if isinstance(event_id, uuid.UUID):
        return event_id
    try:
        return uuid.UUID(str(event_id))
    except ValueError:
        raise ValueError(f"not a valid event id: {event_id!r}") from None
