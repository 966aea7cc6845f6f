"""Events in the ``events`` table: insert, get, list with an :class:`~outbox.EventFilter`, update
the status, delete, count — for every dialect (the database provider's storage, the CLI's
``events list``, the console, ``replay`` and the test recorder all use these).

Every function takes a :class:`~sqlalchemy.engine.Connection` (inside a transaction the caller
manages where it writes) and binds every value as a parameter. Type patterns become exact SQL
that the type index serves (:func:`type_clause`).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import mysql, postgresql, sqlite
from sqlalchemy.engine import Connection

from outbox._patterns import compile_pattern
from outbox._sql import ddl
from outbox.events import (
    _ATTR_TO_COLUMN,
    Event,
    EventFilter,
    EventStatus,
    UTCDateTime,
    as_event_id,
    get_instance_id,
    utcnow,
)

__all__ = [
    "count_by_status",
    "delete_event",
    "events_after",
    "get_event",
    "insert_events",
    "list_events",
    "list_statement",
    "literal_prefix",
    "max_seq",
    "type_clause",
    "update_status",
    "where_clauses",
]

events: sa.Table = Event.__table__  # type: ignore[assignment]
c = events.c

#: Columns read back into events, and the Event attribute each one fills.
_COLUMNS = [col for col in events.c]
#: Columns a provider writes on insert: the database assigns ``seq`` and (PostgreSQL) ``txid``.
_INSERT_ATTRS = [(a, n) for a, n in _ATTR_TO_COLUMN.items() if n not in ("seq", "txid")]


def _xid8_as_bigint(expr: sa.ColumnElement[Any]) -> sa.ColumnElement[int]:
    return sa.cast(sa.cast(expr, sa.Text), sa.BigInteger)


CURRENT_XID = _xid8_as_bigint(sa.func.pg_current_xact_id())


def has_xids(conn: Connection) -> bool:
    """True where positions use transaction ids (PostgreSQL)."""
    return conn.dialect.name == "postgresql"


def row_to_event(values: Sequence[Any]) -> Event:
    """An :class:`Event` from the values of ``_COLUMNS`` in order."""
    return Event._from_row(values)


# --------------------------------------------------------------------------------------------
# type patterns


def _like_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def literal_prefix(pattern: str) -> str | None:
    """The literal leading segments of ``pattern`` followed by a dot (``None`` when none)."""
    parsed = compile_pattern(pattern)
    if parsed.match_all or parsed.is_literal:
        return None
    lead: list[str] = []
    for seg in parsed.segments:
        if seg == "*":
            break
        lead.append(seg)
    return ".".join(lead) + "." if lead else None


def type_clause(conn_or_dialect: Connection | str, pattern: str) -> sa.ColumnElement[bool] | None:
    """SQL true exactly when :func:`outbox._patterns.matches` is (``None`` for ``*``).

    A literal pattern is an equality. Otherwise the literal leading segments become a range
    (``type >= 'public.' AND type < 'public/'``: the type index serves it; the column compares
    byte-wise on PostgreSQL, see ``events.TypeText``), and exactness comes from a ``LIKE`` with
    ``%`` for each ``*`` (unless the range already says it) plus a pinned number of dots: with as
    many dots in the type as literal dots in the pattern, no ``%`` can span a segment boundary.
    """
    dialect = conn_or_dialect if isinstance(conn_or_dialect, str) else conn_or_dialect.dialect.name
    parsed = compile_pattern(pattern)  # ValueError for an invalid pattern
    if parsed.match_all or (parsed.tail and not parsed.segments):
        return None
    column: sa.ColumnElement[str] = c.type
    binary = dialect in ("mysql", "mariadb")  # case-insensitive collations there
    exact_col: sa.ColumnElement[Any] = (
        sa.type_coerce(sa.cast(column, mysql.BINARY()), sa.String()) if binary else column
    )
    if parsed.is_literal:
        equal = column == parsed.text
        return sa.and_(equal, exact_col == parsed.text) if binary else equal
    parts = ["%" if seg == "*" else _like_escape(seg) for seg in parsed.segments]
    if parsed.tail:
        parts.append("%")
    like = exact_col.like(".".join(parts), escape="\\")
    dots = sa.func.length(column) - sa.func.length(sa.func.replace(column, ".", ""))
    n = len(parsed.segments)
    count = dots >= n if parsed.tail else dots == n - 1
    clauses: list[sa.ColumnElement[bool]] = []
    prefix = literal_prefix(pattern)
    if prefix is not None:
        if binary:  # an index range under the column's own collation
            clauses.append(column.like(_like_escape(prefix) + "%", escape="\\"))
        else:  # "." + 1 == "/": every text starting with prefix sorts in [prefix, upper)
            clauses.append(column >= prefix)
            clauses.append(column < prefix[:-1] + "/")
    # Only '*' after the literal leading segments ('public.orders.*', 'public.>'): the range is
    # "starts with the prefix", so the LIKE adds nothing — and leaving it out keeps the
    # planner's row estimate sane (with it, a pattern matching 5 % of a large history was
    # estimated at a few rows and sorted instead of walking the created_at index).
    redundant_like = (prefix is not None and not binary
                      and all(seg == "*" for seg in parsed.segments[prefix.count("."):]))
    clauses += [count] if redundant_like else [like, count]
    if parsed.tail and "*" in parsed.segments:
        # With a trailing '>' the number of dots is not pinned, so a '%' standing for '*' could
        # span segments ('*.users.>' would reach 'x.y.users.create'): anchor the segments before
        # the tail with a regular expression (segments are [A-Za-z0-9_-]: nothing to escape).
        lead = r"\.".join("[^.]*" if seg == "*" else seg for seg in parsed.segments)
        regex = f"^{lead}\\..*$"
        if binary:
            clauses.append(exact_col.op("REGEXP")(regex))
        elif dialect == "postgresql":
            clauses.append(column.op("~")(regex))
        else:  # SQLite: the REGEXP function SQLAlchemy's pysqlite dialect registers
            clauses.append(column.regexp_match(regex))
    return sa.and_(*clauses)


# --------------------------------------------------------------------------------------------
# storing and querying events


def _insert_values(event: Event, *, stored_only: bool, xids: bool) -> dict[str, Any]:
    state = event.__dict__
    now = utcnow()
    values: dict[str, Any] = {}
    for attr, name in _INSERT_ATTRS:
        values[name] = state.get(attr)
    if values["id"] is None:
        raise ValueError("event has no id (build events with outbox.new_event)")
    if not isinstance(values["id"], uuid.UUID):
        values["id"] = as_event_id(values["id"])
    if values["created_at"] is None:
        values["created_at"] = now
    if values["next_attempt_at"] is None:
        values["next_attempt_at"] = values["created_at"]
    values["status"] = EventStatus(values["status"] or EventStatus.PENDING).value
    if values["payload"] is None:
        values["payload"] = {}
    if values["metadata"] is None:
        values["metadata"] = {}
    if values["retry_count"] is None:
        values["retry_count"] = 0
    if values["instance_id"] is None:
        values["instance_id"] = get_instance_id()
    if values["source"] is None or values["type"] is None:
        raise ValueError("event needs a source and a type")
    if xids and stored_only:
        values["txid"] = None  # not on the bus: only rows with a txid are delivered
    return values


def _insert_statement(dialect: str, on_bus: bool) -> Any:
    """The idempotent INSERT for ``dialect``, without values: executed with a list of rows, it is
    compiled once and sent as multi-row INSERTs (SQLAlchemy's insertmanyvalues).

    PostgreSQL's ``events`` is partitioned and has no key of its own to name in ``ON CONFLICT``:
    :func:`insert_events` leaves out the ids it finds in either partition first, and the
    partition's primary key turns a concurrent insert of the same id into nothing."""
    if dialect == "postgresql":
        return postgresql.insert(events).on_conflict_do_nothing().returning(c.id)
    if dialect == "sqlite":
        return sqlite.insert(events).on_conflict_do_nothing(index_elements=[c.id]).returning(c.id)
    if dialect in ("mysql", "mariadb"):
        my = mysql.insert(events)
        return my.on_duplicate_key_update(id=my.inserted.id)
    return sa.insert(events)


_INSERTS: dict[tuple[str, bool], Any] = {}


def insert_events(conn: Connection, batch: Sequence[Event], on_bus: bool) -> int:
    """Insert ``batch`` (idempotent by id); returns how many rows were new.

    ``on_bus=False`` (``store``) inserts PostgreSQL rows with a NULL txid, which the bus never
    reads. ``on_bus=True`` (``publish``) leaves txid to its default, the inserting transaction,
    and puts an event that was only stored so far on the bus at this transaction's position.
    """
    xids = has_xids(conn)
    rows: dict[uuid.UUID, dict[str, Any]] = {}
    for event in batch:
        values = _insert_values(event, stored_only=not on_bus, xids=xids)
        rows.setdefault(values["id"], values)
    if not rows:
        return 0
    stored_only: list[uuid.UUID] = []
    if xids:
        found = conn.execute(sa.select(c.id, c.txid).where(c.id.in_(list(rows)))).all()
        stored_only = [i for i, txid in found if txid is None]
        for i, _txid in found:
            del rows[i]
    new = 0
    if rows:
        key = (conn.dialect.name, on_bus)
        stmt = _INSERTS.get(key)
        if stmt is None:
            stmt = _INSERTS[key] = _insert_statement(*key)
        result = conn.execute(stmt, list(rows.values()))
        new = len(result.all()) if result.returns_rows else len(rows)
    if on_bus and stored_only:
        conn.execute(sa.update(events).where(c.id.in_(stored_only), c.txid.is_(None))
                     .values(txid=CURRENT_XID))
    return new


def get_event(conn: Connection, event_id: uuid.UUID) -> Event | None:
    row = conn.execute(sa.select(*_COLUMNS).where(c.id == event_id)).first()
    return None if row is None else row_to_event(row)


def indexed(dialect: str, name: str) -> sa.ColumnElement[Any]:
    """What the history's index on column ``name`` holds: ``left(name, 200)`` on PostgreSQL for
    :data:`~outbox._sql.ddl.PREFIX_INDEXED` columns, else the column."""
    if dialect == "postgresql" and name in ddl.PREFIX_INDEXED:
        return sa.func.left(c[name], ddl.INDEX_PREFIX)
    return c[name]


def indexed_value(dialect: str, name: str, value: str) -> str:
    """``value`` as :func:`indexed` holds it (its first 200 characters where the index does)."""
    if dialect == "postgresql" and name in ddl.PREFIX_INDEXED:
        return value[: ddl.INDEX_PREFIX]
    return value


def equals(dialect: str, name: str, value: str) -> sa.ColumnElement[bool]:
    """``column = value``, written so that the history's index on the column serves it (the
    prefix the index holds, then the whole value)."""
    if dialect == "postgresql" and name in ddl.PREFIX_INDEXED:
        return sa.and_(indexed(dialect, name) == indexed_value(dialect, name, value),
                       c[name] == value)
    return c[name] == value


def where_clauses(f: EventFilter, dialect: str) -> list[sa.ColumnElement[bool]]:
    """The conditions of ``f`` (without limit/offset/order) on ``dialect``'s ``events``, as bound
    conditions; type patterns exact on every dialect and served by the type index
    (:func:`type_clause`); equalities served by the history's indexes (:func:`equals`).
    ``list`` and the CLI's ``events list``/``replay`` use them."""
    where: list[sa.ColumnElement[bool]] = [
        equals(dialect, name, value) for name, value in f.equality_items()]
    if f.type is not None:
        clause = type_clause(dialect, f.type)
        if clause is not None:
            where.append(clause)
    if f.start_time is not None:
        where.append(c.created_at >= f.start_time)
    if f.end_time is not None:
        where.append(c.created_at < f.end_time)
    return where


def list_statement(dialect: str, f: EventFilter) -> sa.Select[Any]:
    """The ``list`` query: every filter field as a bound condition, stable order."""
    stmt = sa.select(*_COLUMNS).where(*where_clauses(f, dialect))
    stmt = stmt.order_by(c.created_at, c.seq, c.id)
    if f.limit is not None:
        stmt = stmt.limit(f.limit)
    if f.offset:
        stmt = stmt.offset(f.offset)
    return stmt


def list_events(conn: Connection, f: EventFilter) -> list[Event]:
    return [row_to_event(r) for r in conn.execute(list_statement(conn.dialect.name, f))]


def update_status(conn: Connection, event_id: uuid.UUID, status: EventStatus,
                  error: str | None) -> bool:
    """Set status/error and the timestamps the status implies; False when there is no such id."""
    now = utcnow()
    values: dict[str, Any] = {"status": status.value, "error": error}
    if status is EventStatus.PROCESSING:
        values["processed_at"] = now
        values["completed_at"] = None
    elif status.finished:
        values["processed_at"] = sa.func.coalesce(c.processed_at, sa.literal(now, UTCDateTime()))
        values["completed_at"] = now
    else:
        values["completed_at"] = None
    result = conn.execute(sa.update(events).where(c.id == event_id).values(values))
    return bool(result.rowcount)


def delete_event(conn: Connection, event_id: uuid.UUID) -> bool:
    return bool(conn.execute(sa.delete(events).where(c.id == event_id)).rowcount)


def count_by_status(conn: Connection) -> dict[str, int]:
    rows = conn.execute(sa.select(c.status, sa.func.count()).group_by(c.status))
    return {status: int(n) for status, n in rows}


# --------------------------------------------------------------------------------------------
# what a block of code wrote (outbox.testing's recorder)


def max_seq(conn: Connection) -> int:
    """The highest ``seq`` in the table (0 when empty)."""
    return int(conn.execute(sa.select(sa.func.coalesce(sa.func.max(c.seq), 0))).scalar_one())


def events_after(conn: Connection, seq: int) -> list[Event]:
    """Every event with a ``seq`` above ``seq``, in ``seq`` order."""
    rows = conn.execute(sa.select(*_COLUMNS).where(c.seq > seq).order_by(c.seq))
    return [row_to_event(r) for r in rows]
