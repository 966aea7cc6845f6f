"""The database bus: consumer groups over ``events`` (batches, claims, parking, rebase).

Every function takes a :class:`~sqlalchemy.engine.Connection` inside a transaction the caller
manages, runs a few statements with bound parameters and returns plain values. The database
provider runs them in worker threads; ``docs/database-provider.md`` explains the design they
implement. Storing and filtering events is :mod:`outbox._sql.events`.

On PostgreSQL a reader (a group, or a stream) reads *batches between snapshots*: it keeps the
``pg_current_snapshot()`` it last read up to (``snapshot``); the next batch is the rows whose
transaction (``events.txid``) is visible in a new snapshot (``batch``) and was not in the old one,
read in ``seq`` order. A transaction running at the old snapshot is not visible in it, so its rows
come in the batch where it became visible: nothing is skipped, and a long transaction holds back
nothing but its own rows. SQLite has one writer at a time: ``seq`` order is commit order there,
and a reader keeps a ``seq`` alone.
"""

from __future__ import annotations

import datetime as dt
import functools
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Connection

from outbox._sql.common import insert_missing
from outbox._sql.events import (
    _COLUMNS,
    _xid8_as_bigint,
    c,
    events,
    has_xids,
    row_to_event,
    type_clause,
)
from outbox.events import Event, UTCDateTime, utcnow
from outbox.exceptions import ClusterChanged
from outbox.providers.base import StartPosition
from outbox.schema import (
    consumer_claims_table,
    consumers_table,
    dead_letters_table,
    inbox_table,
)

__all__ = [
    "MAX_SEQ",
    "REBASE_HINT",
    "ClaimRow",
    "ClusterChanged",
    "Cursor",
    "GroupInfo",
    "Peek",
    "Position",
]

#: What to run when a group's positions belong to another cluster.
REBASE_HINT = (
    "Stop its consumers and run `python -m outbox.providers.database rebase --group NAME "
    "--from TIME` (events created since TIME are delivered again; or `--keep-positions` after "
    "pg_upgrade, which keeps transaction ids): see docs/database-provider.md, 'Restore'."
)


#: ``(txid, seq)``; txid 0 where the dialect has no transaction ids.
Position = tuple[int, int]
#: The largest ``seq``: ``(t, MAX_SEQ)`` is "after every row of transaction t".
MAX_SEQ = 2**63 - 1
BEGINNING: Position = (0, 0)

groups = consumers_table
claims = consumer_claims_table
dead = dead_letters_table
inbox = inbox_table

class _PgType(sa.types.UserDefinedType[Any]):
    """A PostgreSQL type by name, for casts (``xid8``, ``pg_snapshot``)."""

    cache_ok = True

    def __init__(self, name: str) -> None:
        self.name = name

    def get_col_spec(self, **kw: Any) -> str:
        return self.name


#: Oldest transaction id still running (every id below it has committed or aborted). Both calls of
#: ``pg_current_snapshot()`` in one statement see the statement's own snapshot. (The bus does not
#: read below it any more; benchmarks compare with a read that does.)
WATERMARK = _xid8_as_bigint(sa.func.pg_snapshot_xmin(sa.func.pg_current_snapshot()))
#: First transaction id not yet assigned.
NEXT_XID = _xid8_as_bigint(sa.func.pg_snapshot_xmax(sa.func.pg_current_snapshot()))
#: The statement's snapshot as text (``xmin:xmax:xip,...``).
SNAPSHOT = sa.cast(sa.func.pg_current_snapshot(), sa.Text)


def snapshot_xmax(snapshot: str) -> int:
    """``xmax`` of a snapshot in its text form ``xmin:xmax:xip,...``."""
    return int(snapshot.split(":")[1])


def snapshot_xip(snapshot: str) -> list[int]:
    """The transaction ids in progress of a snapshot in its text form."""
    xip = snapshot.split(":")[2]
    return [int(x) for x in xip.split(",")] if xip else []


def _bp(name: str, type_: Any = None) -> sa.BindParameter[Any]:
    return sa.bindparam(name, type_=type_ if type_ is not None else sa.BigInteger())


def _xid8(expr: sa.ColumnElement[Any]) -> sa.ColumnElement[Any]:
    return sa.cast(sa.cast(expr, sa.Text), _PgType("xid8"))


def _visible(txid: sa.ColumnElement[Any], snapshot: str) -> sa.ColumnElement[bool]:
    """``pg_visible_in_snapshot(txid, :snapshot)``: the transaction had ended (committed or rolled
    back) when the snapshot was taken."""
    return sa.func.pg_visible_in_snapshot(
        _xid8(txid), sa.cast(_bp(snapshot, sa.Text()), _PgType("pg_snapshot")),
        type_=sa.Boolean())


def _pos(prefix: str, pos: Position) -> dict[str, int]:
    return {f"{prefix}_t": pos[0], f"{prefix}_s": pos[1]}


def _now_expr(dialect: str) -> sa.ColumnElement[dt.datetime]:
    """The time leases are measured in: the server's clock on PostgreSQL (one clock for every
    consumer host), this process's clock on SQLite (``:now``; a local file: one host)."""
    if dialect == "postgresql":
        return sa.func.now()
    return _bp("now", UTCDateTime())


def _later_expr(dialect: str) -> sa.ColumnElement[dt.datetime]:
    """Lease expiry: ``now() + :lease seconds`` on PostgreSQL, ``:until`` on SQLite."""
    if dialect == "postgresql":
        return sa.func.now() + sa.func.make_interval(0, 0, 0, 0, 0, 0, _bp("lease", sa.Float()))
    return _bp("until", UTCDateTime())


def _time_params(conn: Connection, lease: float | None = None) -> dict[str, Any]:
    if conn.dialect.name == "postgresql":
        return {} if lease is None else {"lease": float(lease)}
    now = utcnow()
    params: dict[str, Any] = {"now": now}
    if lease is not None:
        params["until"] = now + dt.timedelta(seconds=lease)
    return params


# --------------------------------------------------------------------------------------------
# cursors: where a reader is


@dataclass(frozen=True, slots=True)
class Cursor:
    """Where a reader of the bus is.

    PostgreSQL: every transaction visible in ``snapshot`` is behind the reader (``None``: none
    yet). ``batch``, when set, is the open batch: the rows visible in it and not in ``snapshot``,
    read in ``seq`` order up to ``seq`` so far; ``end`` is its highest ``seq`` (``None``: empty).
    ``since`` (a group started at a time) keeps only rows created since then in the open batch.
    SQLite: ``seq`` alone (everything up to it is behind the reader).
    """

    snapshot: str | None = None
    batch: str | None = None
    seq: int = 0
    end: int | None = None
    since: dt.datetime | None = None

    @property
    def frontier_xid(self) -> int:
        """The highest transaction id the cursor depends on (0: none): it must be below the
        cluster's next id, or the database was restored into another cluster."""
        snap = self.batch or self.snapshot
        return snapshot_xmax(snap) - 1 if snap else 0

    @property
    def position(self) -> Position:
        """Approximately where the reader is, as ``(txid, seq)``: every transaction below
        ``txid`` is behind it (for lag figures)."""
        if self.snapshot is None:
            return (0, self.seq)
        return (int(self.snapshot.split(":")[0]) - 1, MAX_SEQ)


BEGINNING_CURSOR = Cursor()


def unread(cur: Cursor, xids: bool) -> tuple[list[sa.ColumnElement[bool]],
                                              list[sa.ColumnElement[Any]]]:
    """Where clauses and order of the rows a reader at ``cur`` has not read yet (for lag
    figures; index-served): rows of transactions not visible in its snapshot — which counts the
    part of an open batch already claimed too — or, without a snapshot, after its ``seq``."""
    if not xids:
        return [c.seq > cur.seq], [c.seq]
    if cur.snapshot is None:
        return [c.txid.is_not(None), c.seq > cur.seq], [c.seq]
    newer = c.txid >= sa.literal(snapshot_xmax(cur.snapshot), sa.BigInteger())
    xip = snapshot_xip(cur.snapshot)
    if xip:  # transactions in progress at the snapshot: not read yet either
        newer = sa.or_(newer, c.txid.in_([sa.literal(x, sa.BigInteger()) for x in xip]))
    return [newer], [c.txid, c.seq]

_SNAPSHOT_NOW = sa.select(SNAPSHOT)
_MAX_SEQ = sa.select(sa.func.max(c.seq))
_BUS_MAX_SEQ = sa.select(SNAPSHOT, sa.select(sa.func.max(c.seq)).where(c.txid.is_not(None))
                         .scalar_subquery())


def _since_seq(when: dt.datetime) -> sa.Select[Any]:
    return sa.select(sa.func.min(c.seq)).where(c.created_at >= sa.literal(when, UTCDateTime()))


def start_cursor(conn: Connection, start: StartPosition | dt.datetime) -> Cursor:
    """Where a new group (or stream) starts.

    ``NOW``: at the current snapshot: exactly the events that commit after this call.
    ``BEGINNING``: before every event. A datetime T: the events visible now that were created at
    or after T (one first batch), then every event that commits after this call. On SQLite a
    datetime start is the first event created at or after it in ``seq`` order.
    """
    xids = has_xids(conn)
    if isinstance(start, dt.datetime):
        when = start if start.tzinfo is not None else start.replace(tzinfo=dt.UTC)
        if xids:
            snap, last = conn.execute(_BUS_MAX_SEQ).one()
            first = conn.execute(_since_seq(when).where(c.txid.is_not(None))).scalar()
            if first is None:
                return Cursor(snapshot=str(snap))
            return Cursor(batch=str(snap), seq=int(first) - 1, end=int(last), since=when)
        first = conn.execute(_since_seq(when)).scalar()
        if first is None:
            return start_cursor(conn, StartPosition.NOW)
        return Cursor(seq=int(first) - 1)
    if StartPosition(start) is StartPosition.BEGINNING:
        return BEGINNING_CURSOR
    if xids:
        return Cursor(snapshot=str(conn.execute(_SNAPSHOT_NOW).scalar_one()))
    return Cursor(seq=int(conn.execute(_MAX_SEQ).scalar() or 0))


def cursor_at_seq(conn: Connection, seq: int) -> Cursor:
    """PostgreSQL: the rows visible now after ``seq``, then everything committed later (what
    ``rebase`` sets a group to once every existing row has ``txid`` 0)."""
    snap, last = conn.execute(_BUS_MAX_SEQ).one()
    if last is None or int(last) <= seq:
        return Cursor(snapshot=str(snap))
    return Cursor(batch=str(snap), seq=seq, end=int(last))


# --------------------------------------------------------------------------------------------
# consumer groups


@dataclass(frozen=True, slots=True)
class GroupInfo:
    """One row of ``outbox_consumers`` plus its claims (for stats and the CLI)."""

    name: str
    cursor: Cursor
    cluster_id: str | None
    claims: int
    updated_at: dt.datetime

    @property
    def position(self) -> Position:
        return self.cursor.position


def cluster_id(conn: Connection) -> str | None:
    """PostgreSQL's system identifier (``None`` elsewhere or when not allowed to read it)."""
    if not has_xids(conn):
        return None
    try:
        with conn.begin_nested():
            value = conn.execute(
                sa.text("SELECT system_identifier::text FROM pg_control_system()")
            ).scalar()
    except sa.exc.DBAPIError:
        return None
    return None if value is None else str(value)


def _cursor_values(cur: Cursor) -> dict[str, Any]:
    return {"snapshot": cur.snapshot, "batch": cur.batch, "claimed": cur.seq,
            "batch_end": cur.end, "start_time": cur.since}


def ensure_group(conn: Connection, group: str, start: StartPosition | dt.datetime,
                 cluster: str | None) -> bool:
    """Create ``group`` at ``start`` unless it exists; True when it was created here."""
    exists = conn.execute(sa.select(groups.c.group_name).where(groups.c.group_name == group))
    if exists.first() is not None:
        return False
    now = utcnow()
    values = {"group_name": group, **_cursor_values(start_cursor(conn, start)),
              "cluster_id": cluster, "created_at": now, "updated_at": now}
    stmt = insert_missing(groups, values, conn.dialect.name)
    return bool(conn.execute(stmt.execution_options(preserve_rowcount=True)).rowcount)


def group_cluster(conn: Connection, group: str) -> tuple[bool, str | None]:
    """(exists, cluster_id) of ``group``."""
    row = conn.execute(
        sa.select(groups.c.cluster_id).where(groups.c.group_name == group)
    ).first()
    return (False, None) if row is None else (True, row[0])


_CURSOR_COLUMNS = (groups.c.snapshot, groups.c.batch, groups.c.claimed, groups.c.batch_end,
                   groups.c.start_time)


def _cursor(row: Any) -> Cursor:
    return Cursor(row[0], row[1], int(row[2]), None if row[3] is None else int(row[3]), row[4])


def list_groups(conn: Connection) -> list[GroupInfo]:
    counts = (
        sa.select(claims.c.group_name, sa.func.count().label("n"))
        .group_by(claims.c.group_name)
        .subquery("n")
    )
    rows = conn.execute(
        sa.select(*_CURSOR_COLUMNS, groups.c.group_name, groups.c.cluster_id,
                  groups.c.updated_at, sa.func.coalesce(counts.c.n, 0))
        .select_from(groups.outerjoin(counts, counts.c.group_name == groups.c.group_name))
        .order_by(groups.c.group_name)
    )
    return [GroupInfo(name=r[5], cursor=_cursor(r), cluster_id=r[6], claims=int(r[8]),
                      updated_at=r[7]) for r in rows]


def delete_group(conn: Connection, group: str) -> bool:
    conn.execute(sa.delete(claims).where(claims.c.group_name == group))
    return bool(conn.execute(sa.delete(groups).where(groups.c.group_name == group)).rowcount)


def check_xids(group: str, frontier_xid: int, next_xid: int | None) -> None:
    """Refuse a position "in the future": the transaction-id counter went backwards, which
    happens when the database was restored into another cluster (dump/restore)."""
    if next_xid is not None and frontier_xid >= next_xid:
        raise ClusterChanged(
            f"consumer group {group!r} is positioned at transaction id {frontier_xid}, but this "
            f"PostgreSQL cluster has only reached {next_xid}: the database was restored into "
            f"another cluster, so the group cannot tell which events it already had. "
            f"{REBASE_HINT}"
        )


def check_cluster(group: str, stored: str | None, current: str | None) -> None:
    """Refuse a group whose positions were written in another cluster (system identifier)."""
    if stored is not None and current is not None and stored != current:
        raise ClusterChanged(
            f"consumer group {group!r} was positioned in PostgreSQL cluster {stored}, this "
            f"database is in cluster {current} (restored from a dump, or pg_upgrade?): "
            f"transaction ids of the two clusters cannot be compared. {REBASE_HINT}"
        )


# --------------------------------------------------------------------------------------------
# reading the bus


@dataclass(frozen=True, slots=True)
class Peek:
    """What a group has to do, read without locking anything."""

    exists: bool
    cluster_id: str | None = None
    frontier_xid: int = 0
    ready: bool = False  # events to claim: an open batch, or rows committed since its snapshot
    expired: bool = False  # a claim whose lease ran out
    next_xid: int | None = None


def peek(conn: Connection, group: str) -> Peek:
    row = conn.execute(peek_statement(conn.dialect.name),
                       {"grp": group, **_time_params(conn)}).first()
    if row is None:
        return Peek(exists=False)
    m = row._mapping
    if not has_xids(conn):
        return Peek(exists=True, cluster_id=m["cluster_id"], ready=bool(m["ready"]),
                    expired=bool(m["expired"]))
    cur = Cursor(m["snapshot"], m["batch"])
    return Peek(exists=True, cluster_id=m["cluster_id"], frontier_xid=cur.frontier_xid,
                ready=bool(m["ready"]), expired=bool(m["expired"]),
                next_xid=int(m["next_xid"]))


def _first(e: sa.FromClause, *where: sa.ColumnElement[bool],
           order: tuple[str, ...] = ("txid", "seq")) -> sa.ColumnElement[bool]:
    """True when a row of ``e`` (an alias of ``events``) satisfies ``where``: the first one in
    index order.

    Not ``EXISTS``: its selectivity guess for a comparison against outer columns is a third of
    the table, so PostgreSQL would "find a row quickly" with a sequential scan. Ordering by the
    index makes the index scan the cheap plan whatever the estimate.
    """
    first = (
        sa.select(sa.literal(1)).select_from(e).where(*where)
        .order_by(*(e.c[name] for name in order)).limit(1).scalar_subquery()
    )
    return first.is_not(None)


@functools.cache
def peek_statement(dialect: str) -> sa.Select[Any]:
    """What group ``:grp`` has to do, in one read-only statement (index probes only).

    PostgreSQL: ready when a batch is open, or when a row is visible now whose transaction was
    not visible in the group's snapshot — a transaction id at or above its ``xmax``, or one of
    its in-progress ids: index probes of ``ix_events_txid_seq``, whatever the history and
    whatever runs elsewhere on the server.
    """
    g = groups.c
    e1, e2 = events.alias("e1"), events.alias("e2")
    expired = sa.exists().where(claims.c.group_name == g.group_name,
                                claims.c.lease_expires_at < _now_expr(dialect))
    if dialect != "postgresql":
        ready = _first(e1, e1.c.seq > g.claimed, order=("seq",))
        return sa.select(g.cluster_id, ready.label("ready"), expired.label("expired")).where(
            g.group_name == _bp("grp", sa.String()))
    snap = sa.cast(g.snapshot, _PgType("pg_snapshot"))
    xmax = _xid8_as_bigint(sa.func.pg_snapshot_xmax(snap))
    x = sa.func.pg_snapshot_xip(snap).column_valued("x")
    xip = sa.func.array(sa.select(_xid8_as_bigint(x)).scalar_subquery())
    ready = sa.case(
        (g.batch.is_not(None), sa.true()),
        (g.snapshot.is_(None), _first(e1, e1.c.txid.is_not(None))),
        else_=sa.or_(_first(e1, e1.c.txid >= xmax),
                     _first(e2, e2.c.txid == sa.func.any(xip))),
    )
    return sa.select(g.cluster_id, g.snapshot, g.batch, ready.label("ready"),
                     expired.label("expired"), NEXT_XID.label("next_xid")).where(
        g.group_name == _bp("grp", sa.String()))


@functools.cache
def _open_statement(after: bool) -> sa.Select[Any]:
    """PostgreSQL: the statement's snapshot (the new batch's end) and the lowest and highest
    ``seq`` of the rows visible to it whose transaction was not visible in ``:lo`` (``after``;
    else of every row on the bus). The rows of a transaction not visible in a snapshot are those
    of an id at or above its ``xmax`` or in its in-progress list: two index ranges of
    ``ix_events_txid_seq``, bounded by what committed since — not by the history, nor by how
    long an old transaction runs."""
    if not after:
        agg = sa.select(sa.func.min(c.seq).label("lo"), sa.func.max(c.seq).label("hi")).where(
            c.txid.is_not(None)).subquery("agg")
        return sa.select(SNAPSHOT, agg.c.lo, agg.c.hi)
    newer = sa.select(c.seq).where(c.txid >= _bp("lo_xmax"))
    listed = sa.select(c.seq).where(
        c.txid == sa.func.any(sa.bindparam("lo_xip", type_=postgresql.ARRAY(sa.BigInteger()))))
    u = sa.union_all(newer, listed).subquery("u")
    agg = sa.select(sa.func.min(u.c.seq).label("lo"),
                    sa.func.max(u.c.seq).label("hi")).subquery("agg")
    return sa.select(SNAPSHOT, agg.c.lo, agg.c.hi)


def _open_batch(conn: Connection, cur: Cursor) -> Cursor:
    """Open the next batch after ``cur.snapshot``, up to the current snapshot."""
    if cur.snapshot is None:
        snap, lo, hi = conn.execute(_open_statement(False)).one()
    else:
        snap, lo, hi = conn.execute(_open_statement(True), {
            "lo_xmax": snapshot_xmax(cur.snapshot), "lo_xip": snapshot_xip(cur.snapshot)}).one()
    if lo is None:
        return Cursor(snapshot=cur.snapshot, batch=str(snap))
    return Cursor(snapshot=cur.snapshot, batch=str(snap), seq=int(lo) - 1, end=int(hi))


@functools.lru_cache(maxsize=512)
def batch_statement(pattern: str, after: bool, since: bool) -> sa.Select[Any]:
    """PostgreSQL: up to ``:lim`` rows of the open batch after ``:cur`` (``seq`` order, to
    ``:end``): visible in ``:hi``, not visible in ``:lo`` (``after``), created since ``:since``.
    Read along the ``seq`` indexes (``ix_events_live_seq``, ``ix_events_bus_seq``)."""
    stmt = sa.select(*_COLUMNS).where(
        c.seq > _bp("cur"), c.seq <= _bp("end"), c.txid.is_not(None), _visible(c.txid, "hi"))
    if after:
        stmt = stmt.where(~_visible(c.txid, "lo"))
    if since:
        stmt = stmt.where(c.created_at >= _bp("since", UTCDateTime()))
    clause = type_clause("postgresql", pattern)
    if clause is not None:
        stmt = stmt.where(clause)
    return stmt.order_by(c.seq).limit(_bp("lim", sa.Integer()))


def _read_batch(conn: Connection, cur: Cursor, pattern: str,
                limit: int) -> list[tuple[Position, Event]]:
    if cur.end is None or cur.seq >= cur.end:
        return []
    params: dict[str, Any] = {"cur": cur.seq, "end": cur.end, "hi": cur.batch, "lim": limit}
    if cur.snapshot is not None:
        params["lo"] = cur.snapshot
    if cur.since is not None:
        params["since"] = cur.since
    stmt = batch_statement(pattern, cur.snapshot is not None, cur.since is not None)
    return [((int(r.txid), int(r.seq)), row_to_event(r)) for r in conn.execute(stmt, params)]


def read_next(conn: Connection, cur: Cursor, limit: int,
              pattern: str) -> tuple[list[tuple[Position, Event]], Cursor]:
    """Up to ``limit`` events matching ``pattern`` after ``cur``, in bus order, and the cursor
    after them (past the rows that do not match, too).

    PostgreSQL: the rest of the open batch, then (when it ran out) one new batch up to the
    current snapshot. A finished batch's snapshot becomes the cursor's ``snapshot``. The events
    returned all belong to one batch.
    """
    if not has_xids(conn):
        return _read_next_seq(conn, cur, limit, pattern)
    found: list[tuple[Position, Event]] = []
    opened = False
    while True:
        if cur.batch is None:
            if opened:
                break
            cur = _open_batch(conn, cur)
            opened = True
        want = limit - len(found)
        rows = _read_batch(conn, cur, pattern, want)
        found += rows
        if len(rows) >= want:
            return found, replace(cur, seq=rows[-1][0][1])
        cur = Cursor(snapshot=cur.batch)  # the batch is read to its end
        if found:  # a claim holds the events of one batch: their seq order is bus order
            break
    return found, cur


def _read_next_seq(conn: Connection, cur: Cursor, limit: int,
                   pattern: str) -> tuple[list[tuple[Position, Event]], Cursor]:
    rows = conn.execute(_read_statement_seq(conn.dialect.name, pattern),
                        {"a_s": cur.seq, "lim": limit}).all()
    found = [((0, int(r.seq)), row_to_event(r)) for r in rows]
    if len(found) >= limit:
        return found, Cursor(seq=found[-1][0][1])
    last = conn.execute(_MAX_SEQ).scalar()
    return found, Cursor(seq=max(cur.seq, int(last or 0)))


@functools.lru_cache(maxsize=512)
def _read_statement_seq(dialect: str, pattern: str) -> sa.Select[Any]:
    """Without transaction ids (SQLite): rows after ``:a_s`` in ``seq`` order."""
    stmt = sa.select(*_COLUMNS).where(c.seq > _bp("a_s"))
    clause = type_clause(dialect, pattern)
    if clause is not None:
        stmt = stmt.where(clause)
    return stmt.order_by(c.seq).limit(_bp("lim", sa.Integer()))


def read_claimed(conn: Connection, group: str, ids: list[uuid.UUID], after_seq: int,
                 pattern: str) -> list[tuple[Position, Event]]:
    """The events of a claim (``ids``) after its progress ``after_seq`` that ``group`` has not
    handled or parked (a taken-over claim: ids in the inbox or the dead letters are skipped)."""
    if not ids:
        return []
    xids = has_xids(conn)
    rows = conn.execute(_claimed_statement(conn.dialect.name, pattern),
                        {"ids": ids, "a_s": after_seq, "grp": group}).all()
    return [((int(r.txid) if xids else 0, int(r.seq)), row_to_event(r)) for r in rows]


@functools.lru_cache(maxsize=512)
def _claimed_statement(dialect: str, pattern: str) -> sa.Select[Any]:
    grp = _bp("grp", sa.String())
    stmt = sa.select(*_COLUMNS).where(
        c.id.in_(sa.bindparam("ids", expanding=True)), c.seq > _bp("a_s"),
        ~sa.exists().where(inbox.c.group_name == grp, inbox.c.event_id == c.id),
        ~sa.exists().where(dead.c.group_name == grp, dead.c.event_id == c.id),
    )
    clause = type_clause(dialect, pattern)
    if clause is not None:
        stmt = stmt.where(clause)
    return stmt.order_by(c.seq)


# --------------------------------------------------------------------------------------------
# claims


@dataclass(frozen=True, slots=True)
class ClaimRow:
    """Events a member of a group holds under a lease: ``hi`` is the last one's position, ``lo``
    the last one of the acknowledged prefix (or the claim's start)."""

    lo: Position
    hi: Position
    token: uuid.UUID
    attempt: int


@functools.cache
def _lock_statement(dialect: str) -> Any:
    g = groups.c
    where = g.group_name == _bp("grp", sa.String())
    if dialect == "sqlite":  # a write takes SQLite's single write lock first
        return (sa.update(groups).where(where).values(updated_at=_bp("now", UTCDateTime()))
                .returning(*_CURSOR_COLUMNS))
    return sa.select(*_CURSOR_COLUMNS).where(where).with_for_update()


def lock_group(conn: Connection, group: str) -> Cursor | None:
    """Lock the group row until commit (claimers of one group take turns); its cursor."""
    row = conn.execute(_lock_statement(conn.dialect.name), {"grp": group, "now": utcnow()}).first()
    return None if row is None else _cursor(row)


_SET_GROUP = sa.update(groups).where(groups.c.group_name == _bp("grp", sa.String())).values(
    snapshot=_bp("snapshot", sa.Text()), batch=_bp("batch", sa.Text()), claimed=_bp("claimed"),
    batch_end=_bp("batch_end"), start_time=_bp("start_time", UTCDateTime()),
    updated_at=_bp("upd", UTCDateTime()))


def _set_group(conn: Connection, group: str, cur: Cursor) -> None:
    conn.execute(_SET_GROUP, {"grp": group, "upd": utcnow(), **_cursor_values(cur)})


@functools.cache
def _claim_insert(dialect: str) -> sa.Insert:
    return sa.insert(claims).values(lease_expires_at=_later_expr(dialect),
                                    claimed_at=_now_expr(dialect))


def _ids_text(found: list[tuple[Position, Event]]) -> str:
    return ",".join(str(event.id) for _pos, event in found)


def claim_next(conn: Connection, group: str, consumer: str, pattern: str, limit: int,
               lease: float) -> tuple[ClaimRow | None, list[tuple[Position, Event]] | None]:
    """Claim the next events of ``group`` (locks the group row).

    Returns the claim and its events, ``(None, [])`` when nothing matched (the cursor still
    moves past rows that do not match), or ``(None, None)`` when the group row is gone.
    """
    cur = lock_group(conn, group)
    if cur is None:
        return None, None
    found, after = read_next(conn, cur, limit, pattern)
    if after != cur:
        _set_group(conn, group, after)
    if not found:
        return None, found
    token = uuid.uuid4()
    lo = (found[0][0][0], found[0][0][1] - 1)
    hi = found[-1][0]
    conn.execute(_claim_insert(conn.dialect.name), {
        "group_name": group, "hi_txid": hi[0], "hi_seq": hi[1], "lo_txid": lo[0],
        "lo_seq": lo[1], "event_ids": _ids_text(found), "consumer": consumer, "token": token,
        "attempt": 1, **_time_params(conn, lease),
    })
    return ClaimRow(lo, hi, token, 1), found


@functools.cache
def _take_statement(dialect: str) -> sa.Update:
    k = claims.c
    pick = (
        sa.select(k.group_name, k.hi_txid, k.hi_seq)
        .where(k.group_name == _bp("grp", sa.String()), k.lease_expires_at < _now_expr(dialect))
        .order_by(k.claimed_at)
        .limit(1)
        .with_for_update(skip_locked=True)
    )
    return (
        sa.update(claims)
        .where(sa.tuple_(k.group_name, k.hi_txid, k.hi_seq).in_(pick))
        .values(consumer=_bp("me", sa.String()), token=_bp("new_tok", sa.Uuid()),
                attempt=k.attempt + 1, lease_expires_at=_later_expr(dialect))
        .returning(k.lo_txid, k.lo_seq, k.hi_txid, k.hi_seq, k.attempt, k.event_ids)
    )


def take_expired(conn: Connection, group: str, consumer: str, pattern: str,
                 lease: float) -> tuple[ClaimRow, list[tuple[Position, Event]]] | None:
    """Take over the oldest claim of ``group`` whose lease ran out (a member died).

    Its events are handed out again with a new token (the old holder is fenced) and ``attempt``
    + 1. A claim with nothing left to deliver is finished on the spot.
    """
    token = uuid.uuid4()
    row = conn.execute(_take_statement(conn.dialect.name), {
        "grp": group, "me": consumer, "new_tok": token, **_time_params(conn, lease)}).first()
    if row is None:
        return None
    claim = ClaimRow((int(row[0]), int(row[1])), (int(row[2]), int(row[3])), token, int(row[4]))
    ids = [uuid.UUID(i) for i in row[5].split(",")] if row[5] else []
    found = read_claimed(conn, group, ids, claim.lo[1], pattern)
    if not found:
        finish(conn, group, claim.hi, token)
    return claim, found


def _claim_where() -> list[sa.ColumnElement[bool]]:
    k = claims.c
    return [k.group_name == _bp("grp", sa.String()), k.hi_txid == _bp("h_t"),
            k.hi_seq == _bp("h_s"), k.token == _bp("tok", sa.Uuid())]


def _claim_params(group: str, hi: Position, token: uuid.UUID) -> dict[str, Any]:
    return {"grp": group, **_pos("h", hi), "tok": token}


_FINISH = sa.delete(claims).where(*_claim_where())


def finish(conn: Connection, group: str, hi: Position, token: uuid.UUID) -> bool:
    """Drop a settled claim; False when fenced (another member holds it now)."""
    return bool(conn.execute(_FINISH, _claim_params(group, hi, token)).rowcount)


def _lo_values() -> dict[str, Any]:
    """``lo := max(lo, :l)`` (by ``seq``, the order of a claim's events): progress only moves
    forward.

    ``attempt`` counts the takes of the claim since its progress last moved, so it is how often
    the first unsettled event was delivered (what ``max_deliveries`` limits): progress resets it
    to 1, the take in hand.
    """
    k = claims.c
    t, s = _bp("l_t"), _bp("l_s")
    behind = k.lo_seq < s
    return {
        "lo_txid": sa.case((behind, t), else_=k.lo_txid),
        "lo_seq": sa.case((behind, s), else_=k.lo_seq),
        "attempt": sa.case((behind, 1), else_=k.attempt),
    }


_ADVANCE = sa.update(claims).where(*_claim_where()).values(_lo_values())


def advance(conn: Connection, group: str, hi: Position, token: uuid.UUID, lo: Position) -> bool:
    """Move a claim's lower bound up to ``lo`` (never down); False when the claim is not ours."""
    result = conn.execute(_ADVANCE, {**_claim_params(group, hi, token), **_pos("l", lo)})
    return bool(result.rowcount)


_RENEW_LOCK = sa.select(claims.c.token).where(*_claim_where()).with_for_update(skip_locked=True)
_CLAIM_EXISTS = sa.select(claims.c.token).where(*_claim_where())


@functools.cache
def _renew_statement(dialect: str) -> sa.Update:
    values = _lo_values()
    values["lease_expires_at"] = _later_expr(dialect)
    return sa.update(claims).where(*_claim_where()).values(values)


def renew(conn: Connection, group: str, hi: Position, token: uuid.UUID, lo: Position,
          lease: float) -> str:
    """Extend a lease (and record progress): ``"ok"``, ``"busy"`` (a handler's transaction holds
    the row right now; try again next time) or ``"lost"`` (taken over by another member)."""
    key = _claim_params(group, hi, token)
    if conn.dialect.name == "postgresql" and conn.execute(_RENEW_LOCK, key).first() is None:
        return "busy" if conn.execute(_CLAIM_EXISTS, key).first() is not None else "lost"
    result = conn.execute(_renew_statement(conn.dialect.name),
                          {**key, **_pos("l", lo), **_time_params(conn, lease)})
    return "ok" if result.rowcount else "lost"


_RELEASE = sa.update(claims).where(*_claim_where()).values(
    {**_lo_values(), "lease_expires_at": _bp("expired", UTCDateTime())})
# A claim none of whose events reached a handler: this take did not count.
_RELEASE_UNTOUCHED = sa.update(claims).where(*_claim_where()).values(
    attempt=sa.case((claims.c.attempt > 0, claims.c.attempt - 1), else_=0),
    lease_expires_at=_bp("expired", UTCDateTime()))


def release(conn: Connection, group: str, hi: Position, token: uuid.UUID, lo: Position,
            *, handed: bool = True) -> None:
    """Give a claim back: recorded progress kept, lease expired so any member takes it now.
    ``handed=False``: none of its events was handed to a handler (the take is not counted)."""
    params = {**_claim_params(group, hi, token), **_pos("l", lo),
              "expired": dt.datetime(2000, 1, 1, tzinfo=dt.UTC)}
    conn.execute(_RELEASE if handed else _RELEASE_UNTOUCHED, params)


def park(conn: Connection, group: str, event_id: uuid.UUID, error: str, attempt: int) -> None:
    values = {"group_name": group, "event_id": event_id, "error": error[:8000],
              "attempt": attempt, "parked_at": utcnow()}
    conn.execute(insert_missing(dead, values, conn.dialect.name))


def dead_letters(conn: Connection, group: str | None, limit: int) -> list[dict[str, Any]]:
    stmt = sa.select(dead).order_by(dead.c.parked_at).limit(limit)
    if group is not None:
        stmt = stmt.where(dead.c.group_name == group)
    return [dict(r._mapping) for r in conn.execute(stmt)]


# --------------------------------------------------------------------------------------------
# after a restore into another cluster


def restamp_batch(conn: Connection, below_seq: int, batch: int) -> int:
    """Set ``txid = 0`` on up to ``batch`` rows with ``seq <= below_seq`` that still carry a
    transaction id; returns how many (see :mod:`outbox.providers.database.rebase`). Waits for
    rows other transactions hold (no SKIP LOCKED: every row must be restamped)."""
    pick = (
        sa.select(c.id)
        .where(c.txid > 0, c.seq <= below_seq)
        .limit(batch)
        .scalar_subquery()
    )
    return int(conn.execute(sa.update(events).where(c.id.in_(pick)).values(txid=0)).rowcount)


def rebase_group(conn: Connection, group: str, position: Position, cluster: str | None) -> None:
    """Set ``group`` to just after ``position`` (every row has ``txid`` 0 by now: ``seq``
    alone orders them), then everything committed later."""
    conn.execute(sa.delete(claims).where(claims.c.group_name == group))
    conn.execute(sa.update(groups).where(groups.c.group_name == group).values(
        **_cursor_values(cursor_at_seq(conn, position[1])), cluster_id=cluster,
        updated_at=utcnow(),
    ))


def stamp_cluster(conn: Connection, names: Iterable[str], cluster: str | None) -> None:
    conn.execute(sa.update(groups).where(groups.c.group_name.in_(list(names))).values(
        cluster_id=cluster, updated_at=utcnow()))


def first_seq_since(conn: Connection, when: dt.datetime) -> int | None:
    value = conn.execute(
        sa.select(sa.func.min(c.seq)).where(c.created_at >= sa.literal(when, UTCDateTime()))
    ).scalar()
    return None if value is None else int(value)


def max_position_txid(conn: Connection) -> int:
    """The highest transaction id any group's cursor depends on."""
    return max((g.cursor.frontier_xid for g in list_groups(conn)), default=0)


def next_xid(conn: Connection) -> int:
    return int(conn.execute(sa.select(NEXT_XID)).scalar_one())
