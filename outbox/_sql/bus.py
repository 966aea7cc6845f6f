"""The database bus: consumer groups over ``events`` (positions, reads, claims, parking, rebase).

Every function takes a :class:`~sqlalchemy.engine.Connection` inside a transaction the caller
manages, runs a few statements with bound parameters and returns plain values. The database
provider runs them in worker threads; ``docs/database-provider.md`` explains the design they
implement. Storing and filtering events is :mod:`outbox._sql.events`.

Positions in the bus are ``(txid, seq)`` pairs compared lexicographically. On PostgreSQL ``txid``
is the inserting transaction's id (``events.txid``, a column default); only rows with
``txid < pg_snapshot_xmin(pg_current_snapshot())`` — rows of transactions that have all finished —
are ever read, so no row can later appear below a position already passed. SQLite has one writer at
a time: ``seq`` order is commit order there, and ``txid`` is always 0 in positions.
"""

from __future__ import annotations

import datetime as dt
import functools
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
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
    "Batch",
    "ClaimRow",
    "ClusterChanged",
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
#: ``pg_current_snapshot()`` in one statement see the statement's own snapshot.
WATERMARK = _xid8_as_bigint(sa.func.pg_snapshot_xmin(sa.func.pg_current_snapshot()))
#: First transaction id not yet assigned.
NEXT_XID = _xid8_as_bigint(sa.func.pg_snapshot_xmax(sa.func.pg_current_snapshot()))
#: The statement's snapshot as text (``xmin:xmax:xip,...``).
SNAPSHOT = sa.cast(sa.func.pg_current_snapshot(), sa.Text)


def snapshot_xmax(snapshot: str) -> int:
    """``xmax`` of a snapshot in its text form ``xmin:xmax:xip,...``."""
    return int(snapshot.split(":")[1])


def _bp(name: str, type_: Any = None) -> sa.BindParameter[Any]:
    return sa.bindparam(name, type_=type_ if type_ is not None else sa.BigInteger())


def _skip_clause(since: bool) -> sa.ColumnElement[bool]:
    """Rows a group must skip because they were committed before it started.

    A group created at ``NOW`` is positioned at the watermark of its creation snapshot
    (``:snap``); rows between that watermark and the snapshot's ``xmax`` (``:snap_xmax``) belong
    either to transactions still running then (deliver them: they commit after the group started)
    or to transactions that had already committed (skip them): ``pg_visible_in_snapshot`` tells
    the two apart. A group created at a time (``:since``) also delivers the rows committed before
    it started whose ``created_at`` is at or after that time.
    """
    keep = [
        c.txid >= _bp("snap_xmax"),
        ~sa.func.pg_visible_in_snapshot(
            sa.cast(sa.cast(c.txid, sa.Text), _PgType("xid8")),
            sa.cast(_bp("snap", sa.Text()), _PgType("pg_snapshot")),
        ),
    ]
    if since:
        keep.append(c.created_at >= _bp("since", UTCDateTime()))
    return sa.or_(*keep)


def _skip_params(start: Start | None, after: Position) -> tuple[bool, bool, dict[str, Any]]:
    """(skip?, since?, parameters) of :func:`_skip_clause` for a reader at ``after``."""
    if start is None or start.snapshot is None:
        return False, False, {}
    xmax = snapshot_xmax(start.snapshot)
    if after[0] >= xmax:  # past every row the start snapshot could have seen
        return False, False, {}
    params: dict[str, Any] = {"snap": start.snapshot, "snap_xmax": xmax}
    if start.since is not None:
        params["since"] = start.since
    return True, start.since is not None, params


def _after(txid: sa.ColumnElement[Any], seq: sa.ColumnElement[Any], xids: bool,
           prefix: str = "a") -> sa.ColumnElement[bool]:
    """``(txid, seq) > (:a_t, :a_s)`` (``seq > :a_s`` without transaction ids)."""
    if xids:
        return sa.tuple_(txid, seq) > sa.tuple_(_bp(f"{prefix}_t"), _bp(f"{prefix}_s"))
    return seq > _bp(f"{prefix}_s")


def _upto(txid: sa.ColumnElement[Any], seq: sa.ColumnElement[Any], xids: bool,
          prefix: str = "h") -> sa.ColumnElement[bool]:
    if xids:
        return sa.tuple_(txid, seq) <= sa.tuple_(_bp(f"{prefix}_t"), _bp(f"{prefix}_s"))
    return seq <= _bp(f"{prefix}_s")


def _pos(prefix: str, pos: Position) -> dict[str, int]:
    return {f"{prefix}_t": pos[0], f"{prefix}_s": pos[1]}


def _bus_order(xids: bool) -> list[sa.ColumnElement[Any]]:
    return [c.txid, c.seq] if xids else [c.seq]


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
# consumer groups


@dataclass(frozen=True, slots=True)
class GroupInfo:
    """One row of ``outbox_consumers`` plus its claims (for stats and the CLI)."""

    name: str
    position: Position
    claimed: Position
    cluster_id: str | None
    claims: int
    updated_at: dt.datetime


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


@dataclass(frozen=True, slots=True)
class Start:
    """Where a reader starts: an exclusive lower bound, plus (PostgreSQL, "now") the snapshot
    whose committed rows it skips."""

    position: Position
    snapshot: str | None = None
    since: dt.datetime | None = None


def start_position(conn: Connection, start: StartPosition | dt.datetime) -> Start:
    """Where a new group (or stream) starts.

    ``NOW``: at the watermark, skipping rows already committed then (see :func:`_skip_clause`):
    exactly the events that commit after this call. ``BEGINNING``: before every event. A
    datetime: events created at or after it, and every event that commits after this call. On
    SQLite (no snapshots) a datetime start is the first event created at or after it in ``seq``
    order, and later events are all delivered.
    """
    xids = has_xids(conn)
    if isinstance(start, dt.datetime):
        when = start if start.tzinfo is not None else start.replace(tzinfo=dt.UTC)
        if xids:
            # The watermark first: every row invisible to the later statement belongs to a
            # transaction at or above it, so min(first row, watermark) skips nothing.
            wm, snapshot = conn.execute(sa.select(WATERMARK, SNAPSHOT)).one()
            row = conn.execute(
                sa.select(c.txid, c.seq)
                .where(c.created_at >= sa.literal(when, UTCDateTime()), c.txid.is_not(None))
                .order_by(c.txid, c.seq)
                .limit(1)
            ).first()
            now_pos = (int(wm) - 1, MAX_SEQ)
            if row is not None:
                now_pos = min((int(row[0]), int(row[1]) - 1), now_pos)
            return Start(now_pos, str(snapshot), when)
        first_seq = conn.execute(
            sa.select(sa.func.min(c.seq)).where(c.created_at >= sa.literal(when, UTCDateTime()))
        ).scalar()
        if first_seq is None:
            return start_position(conn, StartPosition.NOW)
        return Start((0, int(first_seq) - 1))
    if StartPosition(start) is StartPosition.BEGINNING:
        return Start(BEGINNING)
    if xids:
        wm, snapshot = conn.execute(sa.select(WATERMARK, SNAPSHOT)).one()
        return Start((int(wm) - 1, MAX_SEQ), str(snapshot))
    last = conn.execute(sa.select(sa.func.max(c.seq))).scalar()
    return Start((0, int(last or 0)))


def ensure_group(conn: Connection, group: str, start: StartPosition | dt.datetime,
                 cluster: str | None) -> bool:
    """Create ``group`` at ``start`` unless it exists; True when it was created here."""
    exists = conn.execute(sa.select(groups.c.group_name).where(groups.c.group_name == group))
    if exists.first() is not None:
        return False
    begin = start_position(conn, start)
    pos = begin.position
    now = utcnow()
    values = {
        "group_name": group, "position": pos[1], "position_txid": pos[0], "claimed": pos[1],
        "claimed_txid": pos[0], "start_snapshot": begin.snapshot, "start_time": begin.since,
        "cluster_id": cluster,
        "created_at": now, "updated_at": now,
    }
    stmt = insert_missing(groups, values, conn.dialect.name)
    return bool(conn.execute(stmt.execution_options(preserve_rowcount=True)).rowcount)


def group_cluster(conn: Connection, group: str) -> tuple[bool, str | None]:
    """(exists, cluster_id) of ``group``."""
    row = conn.execute(
        sa.select(groups.c.cluster_id).where(groups.c.group_name == group)
    ).first()
    return (False, None) if row is None else (True, row[0])


def list_groups(conn: Connection) -> list[GroupInfo]:
    counts = (
        sa.select(claims.c.group_name, sa.func.count().label("n"))
        .group_by(claims.c.group_name)
        .subquery("n")
    )
    rows = conn.execute(
        sa.select(groups, sa.func.coalesce(counts.c.n, 0))
        .select_from(groups.outerjoin(counts, counts.c.group_name == groups.c.group_name))
        .order_by(groups.c.group_name)
    )
    out = []
    for r in rows:
        m = r._mapping
        out.append(GroupInfo(
            name=m["group_name"], position=(int(m["position_txid"]), int(m["position"])),
            claimed=(int(m["claimed_txid"]), int(m["claimed"])), cluster_id=m["cluster_id"],
            claims=int(r[-1]), updated_at=m["updated_at"],
        ))
    return out


def delete_group(conn: Connection, group: str) -> bool:
    conn.execute(sa.delete(claims).where(claims.c.group_name == group))
    return bool(conn.execute(sa.delete(groups).where(groups.c.group_name == group)).rowcount)


def check_xids(group: str, frontier: Position, next_xid: int | None) -> None:
    """Refuse a position "in the future": the transaction-id counter went backwards, which
    happens when the database was restored into another cluster (dump/restore)."""
    if next_xid is not None and frontier[0] >= next_xid:
        raise ClusterChanged(
            f"consumer group {group!r} is positioned at transaction id {frontier[0]}, but this "
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
    claimed: Position = BEGINNING
    ready: bool = False  # unclaimed events below the watermark
    blocked: bool = False  # committed events above the watermark: an older transaction runs
    expired: bool = False  # a claim whose lease ran out
    next_xid: int | None = None


def peek(conn: Connection, group: str) -> Peek:
    xids = has_xids(conn)
    row = conn.execute(peek_statement(conn.dialect.name),
                       {"grp": group, **_time_params(conn)}).first()
    if row is None:
        return Peek(exists=False)
    m = row._mapping
    return Peek(
        exists=True, cluster_id=m["cluster_id"], claimed=(int(m["claimed_txid"]),
                                                          int(m["claimed"])),
        ready=bool(m["ready"]), expired=bool(m["expired"]),
        blocked=bool(m["blocked"]) if xids else False,
        next_xid=int(m["next_xid"]) if xids else None,
    )


def _any_row(table: sa.FromClause, xids: bool,
             *where: sa.ColumnElement[bool]) -> sa.ColumnElement[bool]:
    """True when a row of ``table`` satisfies ``where``: the first one in bus order.

    Not ``EXISTS``: its selectivity guess for a row comparison against outer columns or
    parameters is a third of the table, so PostgreSQL would "find a row quickly" with a sequential
    scan — a full scan when the group is at the end. Ordering by the index makes the index scan
    the cheap plan whatever the estimate.
    """
    order = [table.c.txid, table.c.seq] if xids else [table.c.seq]
    first = (
        sa.select(sa.literal(1)).select_from(table).where(*where).order_by(*order).limit(1)
        .scalar_subquery()
    )
    return first.is_not(None)


@functools.cache
def peek_statement(dialect: str) -> sa.Select[Any]:
    """What group ``:grp`` has to do, in one read-only statement (index probes only)."""
    xids = dialect == "postgresql"
    g = groups.c
    e2 = events.alias("e2")
    ready = _any_row(
        e2, xids,
        *([e2.c.txid.is_not(None), e2.c.txid < WATERMARK] if xids else []),
        _after_group(e2, xids),
    )
    expired = sa.exists().where(claims.c.group_name == g.group_name,
                                claims.c.lease_expires_at < _now_expr(dialect))
    cols: list[Any] = [g.cluster_id, g.claimed_txid, g.claimed, ready.label("ready"),
                       expired.label("expired")]
    if xids:
        e3 = events.alias("e3")
        cols += [_any_row(e3, xids, e3.c.txid >= WATERMARK).label("blocked"),
                 NEXT_XID.label("next_xid")]
    return sa.select(*cols).where(g.group_name == _bp("grp", sa.String()))


def _after_group(table: sa.FromClause, xids: bool) -> sa.ColumnElement[bool]:
    g = groups.c
    if xids:
        return sa.tuple_(table.c.txid, table.c.seq) > sa.tuple_(g.claimed_txid, g.claimed)
    return table.c.seq > g.claimed


@dataclass(slots=True)
class Batch:
    """Events read after a position, in bus order."""

    events: list[tuple[Position, Event]]
    #: The position every event of the batch is at or before, and up to which the reader has seen
    #: everything that matches: the last event's position for a full batch, else the end of what
    #: is readable now.
    end: Position
    #: True when committed events wait above the watermark (read again soon).
    blocked: bool = False
    #: Any row at all (matching or not) after the start position below the watermark.
    scanned: bool = False
    next_xid: int | None = None


def read_after(conn: Connection, after: Position, limit: int, pattern: str,
               start: Start | None = None) -> Batch:
    """Up to ``limit`` events matching ``pattern`` after ``after``, readable now, in bus order
    (skipping what the reader's ``start`` excludes, see :func:`_skip_clause`)."""
    params: dict[str, Any] = {**_pos("a", after), "lim": limit}
    if has_xids(conn):
        skip, since, extra = _skip_params(start, after)
        rows = conn.execute(bus_read_statement(pattern, skip, since), {**params, **extra}).all()
        head = rows[0]
        wm, nx, blocked, scanned = int(head[0]), int(head[1]), bool(head[2]), bool(head[3])
        found = [((int(r.txid), int(r.seq)), row_to_event(r[4:]))
                 for r in rows if r.id is not None]
        end = found[-1][0] if len(found) >= limit else max(after, (wm - 1, MAX_SEQ))
        return Batch(found, end, blocked=blocked, scanned=scanned, next_xid=nx)
    rows = conn.execute(_read_statement_seq(conn.dialect.name, pattern), params).all()
    found = [((0, int(r.seq)), row_to_event(r)) for r in rows]
    if len(found) >= limit:
        return Batch(found, found[-1][0], scanned=True)
    last = conn.execute(_MAX_SEQ).scalar()
    end = max(after, (0, int(last or 0)))
    return Batch(found, end, scanned=end > after)


_MAX_SEQ = sa.select(sa.func.max(c.seq))


@functools.lru_cache(maxsize=512)
def _read_statement_seq(dialect: str, pattern: str) -> sa.Select[Any]:
    """Without transaction ids (SQLite): rows after ``:a_s`` in ``seq`` order."""
    stmt = sa.select(*_COLUMNS).where(_after(c.txid, c.seq, False))
    clause = type_clause(dialect, pattern)
    if clause is not None:
        stmt = stmt.where(clause)
    return stmt.order_by(c.seq).limit(_bp("lim", sa.Integer()))


@functools.lru_cache(maxsize=512)
def bus_read_statement(pattern: str = "*", skip: bool = False,
                       since: bool = False) -> sa.Select[Any]:
    """PostgreSQL: one statement reads the watermark and, below it, up to ``:lim`` rows after
    ``(:a_t, :a_s)`` in ``(txid, seq)`` order (``ix_events_txid_seq``). Also says whether
    committed rows wait above the watermark (``blocked``) and whether any row at all follows the
    position below it (``scanned``). The watermark and the rows come from the same statement
    snapshot. Built once per pattern: positions are parameters."""
    x = sa.select(WATERMARK.label("wm"), NEXT_XID.label("nx")).subquery("x")
    e2 = events.alias("e2")
    e3 = events.alias("e3")
    w = sa.select(
        x.c.wm,
        x.c.nx,
        _any_row(e2, True, e2.c.txid >= x.c.wm).label("blocked"),
        _any_row(e3, True, e3.c.txid.is_not(None), e3.c.txid < x.c.wm,
                 _after(e3.c.txid, e3.c.seq, True)).label("scanned"),
    ).cte("w")
    inner = sa.select(*_COLUMNS).where(
        c.txid.is_not(None), c.txid < w.c.wm, _after(c.txid, c.seq, True)
    )
    clause = type_clause("postgresql", pattern)
    if clause is not None:
        inner = inner.where(clause)
    if skip:
        inner = inner.where(_skip_clause(since))
    e = inner.order_by(c.txid, c.seq).limit(_bp("lim", sa.Integer())).lateral("e")
    return sa.select(w.c.wm, w.c.nx, w.c.blocked, w.c.scanned, *e.c).select_from(
        w.outerjoin(e, sa.true())
    )


def read_range(conn: Connection, group: str, lo: Position, hi: Position, pattern: str,
               start: Start | None = None) -> list[tuple[Position, Event]]:
    """Events in ``(lo, hi]`` matching ``pattern`` that ``group`` has not handled or parked
    (a taken-over claim: ids in the inbox or the dead letters are skipped)."""
    xids = has_xids(conn)
    skip, since, extra = _skip_params(start, lo) if xids else (False, False, {})
    stmt = _range_statement(conn.dialect.name, pattern, skip, since)
    rows = conn.execute(stmt, {**_pos("a", lo), **_pos("h", hi), "grp": group, **extra}).all()
    return [((int(r.txid) if xids else 0, int(r.seq)), row_to_event(r)) for r in rows]


@functools.lru_cache(maxsize=512)
def _range_statement(dialect: str, pattern: str, skip: bool, since: bool) -> sa.Select[Any]:
    xids = dialect == "postgresql"
    grp = _bp("grp", sa.String())
    stmt = sa.select(*_COLUMNS).where(
        _after(c.txid, c.seq, xids), _upto(c.txid, c.seq, xids),
        ~sa.exists().where(inbox.c.group_name == grp, inbox.c.event_id == c.id),
        ~sa.exists().where(dead.c.group_name == grp, dead.c.event_id == c.id),
    )
    if xids:
        stmt = stmt.where(c.txid.is_not(None))
        if skip:
            stmt = stmt.where(_skip_clause(since))
    clause = type_clause(dialect, pattern)
    if clause is not None:
        stmt = stmt.where(clause)
    return stmt.order_by(*_bus_order(xids))


# --------------------------------------------------------------------------------------------
# claims


@dataclass(frozen=True, slots=True)
class ClaimRow:
    """A range ``(lo, hi]`` a member of a group holds under a lease."""

    lo: Position
    hi: Position
    token: uuid.UUID
    attempt: int


_GROUP_START = (groups.c.claimed_txid, groups.c.claimed, groups.c.start_snapshot,
                groups.c.start_time)


@functools.cache
def _lock_statement(dialect: str) -> Any:
    g = groups.c
    where = g.group_name == _bp("grp", sa.String())
    if dialect == "sqlite":  # a write takes SQLite's single write lock first
        return (sa.update(groups).where(where).values(updated_at=_bp("now", UTCDateTime()))
                .returning(*_GROUP_START))
    return sa.select(*_GROUP_START).where(where).with_for_update()


def lock_group(conn: Connection, group: str) -> tuple[Position, Start] | None:
    """Lock the group row until commit (claimers of one group take turns); its claim frontier
    and how it started."""
    row = conn.execute(_lock_statement(conn.dialect.name), {"grp": group, "now": utcnow()}).first()
    if row is None:
        return None
    frontier = (int(row[0]), int(row[1]))
    return frontier, Start(frontier, row[2], row[3])


_GROUP_START_SELECT = sa.select(*_GROUP_START).where(
    groups.c.group_name == _bp("grp", sa.String()))


def group_start(conn: Connection, group: str) -> Start | None:
    row = conn.execute(_GROUP_START_SELECT, {"grp": group}).first()
    return None if row is None else Start((int(row[0]), int(row[1])), row[2], row[3])


_LOW_WATER = (
    sa.select(claims.c.lo_txid, claims.c.lo_seq)
    .where(claims.c.group_name == _bp("grp", sa.String()))
    .order_by(claims.c.lo_txid, claims.c.lo_seq)
    .limit(1)
)


def _low_water(conn: Connection, group: str, claimed: Position) -> Position:
    row = conn.execute(_LOW_WATER, {"grp": group}).first()
    return claimed if row is None else (int(row[0]), int(row[1]))


@functools.cache
def _set_group_statement(claimed: bool, position: bool) -> sa.Update:
    values: dict[str, Any] = {"updated_at": _bp("upd", UTCDateTime())}
    if claimed:
        values.update(claimed_txid=_bp("c_t"), claimed=_bp("c_s"))
    if position:
        values.update(position_txid=_bp("p_t"), position=_bp("p_s"))
    return sa.update(groups).where(groups.c.group_name == _bp("grp", sa.String())).values(values)


def _set_group(conn: Connection, group: str, *, claimed: Position | None = None,
               position: Position | None = None) -> None:
    params: dict[str, Any] = {"grp": group, "upd": utcnow()}
    if claimed is not None:
        params.update(_pos("c", claimed))
    if position is not None:
        params.update(_pos("p", position))
    conn.execute(_set_group_statement(claimed is not None, position is not None), params)


@functools.cache
def _claim_insert(dialect: str) -> sa.Insert:
    return sa.insert(claims).values(lease_expires_at=_later_expr(dialect),
                                    claimed_at=_now_expr(dialect))


def claim_next(conn: Connection, group: str, consumer: str, pattern: str, limit: int,
               lease: float) -> tuple[ClaimRow | None, Batch | None]:
    """Claim the next events of ``group`` after its frontier (locks the group row).

    Returns the claim and its batch, ``(None, batch)`` when nothing matched (the frontier still
    moves past rows that do not match), or ``(None, None)`` when the group row is gone.
    """
    locked = lock_group(conn, group)
    if locked is None:
        return None, None
    frontier, start = locked
    batch = read_after(conn, frontier, limit, pattern, start)
    check_xids(group, frontier, batch.next_xid)
    if not batch.events:
        if batch.scanned and batch.end > frontier:
            position = _low_water(conn, group, batch.end)
            _set_group(conn, group, claimed=batch.end, position=position)
        return None, batch
    token = uuid.uuid4()
    conn.execute(_claim_insert(conn.dialect.name), {
        "group_name": group, "hi_txid": batch.end[0], "hi_seq": batch.end[1],
        "lo_txid": frontier[0], "lo_seq": frontier[1], "consumer": consumer, "token": token,
        "attempt": 1, **_time_params(conn, lease),
    })
    _set_group(conn, group, claimed=batch.end)
    return ClaimRow(frontier, batch.end, token, 1), batch


@functools.cache
def _take_statement(dialect: str) -> sa.Update:
    k = claims.c
    pick = (
        sa.select(k.group_name, k.hi_txid, k.hi_seq)
        .where(k.group_name == _bp("grp", sa.String()), k.lease_expires_at < _now_expr(dialect))
        .order_by(k.lo_txid, k.lo_seq)
        .limit(1)
        .with_for_update(skip_locked=True)
    )
    return (
        sa.update(claims)
        .where(sa.tuple_(k.group_name, k.hi_txid, k.hi_seq).in_(pick))
        .values(consumer=_bp("me", sa.String()), token=_bp("new_tok", sa.Uuid()),
                attempt=k.attempt + 1, lease_expires_at=_later_expr(dialect))
        .returning(k.lo_txid, k.lo_seq, k.hi_txid, k.hi_seq, k.attempt)
    )


def take_expired(conn: Connection, group: str, consumer: str, pattern: str,
                 lease: float) -> tuple[ClaimRow, list[tuple[Position, Event]]] | None:
    """Take over the oldest claim of ``group`` whose lease ran out (a member died).

    The range is handed out again with a new token (the old holder is fenced) and ``attempt``
    + 1. A range with nothing left to deliver is finished on the spot.
    """
    token = uuid.uuid4()
    row = conn.execute(_take_statement(conn.dialect.name), {
        "grp": group, "me": consumer, "new_tok": token, **_time_params(conn, lease)}).first()
    if row is None:
        return None
    claim = ClaimRow((int(row[0]), int(row[1])), (int(row[2]), int(row[3])), token, int(row[4]))
    found = read_range(conn, group, claim.lo, claim.hi, pattern, group_start(conn, group))
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
    """Drop a settled claim and move the group's low-water mark; False when fenced (lost)."""
    if not conn.execute(_FINISH, _claim_params(group, hi, token)).rowcount:
        return False
    locked = lock_group(conn, group)
    if locked is not None:
        _set_group(conn, group, position=_low_water(conn, group, locked[0]))
    return True


def _lo_values() -> dict[str, Any]:
    """``lo := max(lo, (:l_t, :l_s))``: progress only moves forward.

    ``attempt`` counts the takes of the range since its progress last moved, so it is how often
    the first unsettled event was delivered (what ``max_deliveries`` limits): progress resets it
    to 1, the take in hand.
    """
    k = claims.c
    t, s = _bp("l_t"), _bp("l_s")
    behind = sa.tuple_(k.lo_txid, k.lo_seq) < sa.tuple_(t, s)
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
    conn.execute(sa.delete(claims).where(claims.c.group_name == group))
    conn.execute(sa.update(groups).where(groups.c.group_name == group).values(
        position_txid=position[0], position=position[1], claimed_txid=position[0],
        claimed=position[1], start_snapshot=None, start_time=None, cluster_id=cluster,
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
    g = groups.c
    value = conn.execute(
        sa.select(sa.func.max(sa.func.greatest(g.claimed_txid, g.position_txid)))
    ).scalar()
    return int(value or 0)


def next_xid(conn: Connection) -> int:
    return int(conn.execute(sa.select(NEXT_XID)).scalar_one())
