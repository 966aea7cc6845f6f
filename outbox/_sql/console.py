"""The console's queries over the outbox tables (``python -m outbox console``), shared with the
CLI (``python -m outbox failures``): the console's package holds no SQL.

Every function takes a :class:`~sqlalchemy.engine.Connection` (or an ``Engine`` when it runs
short transactions of its own), binds every value as a parameter, and is written so that an
index answers it on a table of millions of events — no ``OFFSET``, no ``COUNT(*)`` over the
history:

- :func:`trail_page` — the audit trail newest first, every :class:`~outbox.EventFilter` field,
  keyset pagination on ``(created_at, seq)``;
- :func:`entity_timeline` — one row's events newest first, with ``metadata.changes``;
- :func:`failure_groups`, :func:`replay_failure_group` — failed events grouped by type and
  error; replaying a group calls :func:`outbox.ops.replay` with its ids;
- :func:`blocked_key_details` — ordering keys held back by a failed event, what holds each;
- :func:`throughput` — events written per interval, from the ``seq`` at each boundary (one index
  probe per boundary, whatever the rate);
- :func:`relays_seen`, :func:`consumer_lags`, :func:`dead_letters`, :func:`estimated_total`,
  :func:`known_types` — the health page's other figures.
"""

from __future__ import annotations

import bisect
import datetime as dt
import hashlib
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Connection, Engine

from outbox import _json
from outbox._patterns import compile_pattern
from outbox._sql import bus, operator
from outbox._sql import events as event_sql
from outbox._sql.events import has_xids
from outbox.events import Event, EventFilter, EventStatus, UTCDateTime, utcnow
from outbox.schema import consumers_table, dead_letters_table

__all__ = [
    "UNREADABLE",
    "BlockedKey",
    "ConsumerLag",
    "Cursor",
    "DeadLetter",
    "FailureGroup",
    "HealthFigures",
    "RelaySeen",
    "ThroughputBucket",
    "TimelineEntry",
    "TrailPage",
    "TrailRow",
    "blocked_key_details",
    "consumer_lags",
    "count_dead_letters",
    "dead_letters",
    "entity_timeline",
    "estimated_total",
    "event_without_json",
    "failed_count",
    "failed_values_by_seq",
    "failure_group_count",
    "failure_groups",
    "health_figures",
    "known_types",
    "limit_time",
    "relays_seen",
    "replay_failure_group",
    "throughput",
    "trail_page",
    "values_by_id",
]

events: sa.Table = Event.__table__  # type: ignore[assignment]
c = events.c
COMPLETED = EventStatus.COMPLETED.value
FAILED = EventStatus.FAILED.value
PENDING = EventStatus.PENDING.value
PROCESSING = EventStatus.PROCESSING.value
#: Longest error text a list shows (the event's page shows all of it).
ERROR_CLIP = 300
#: Counts that could be large are counted up to this and shown as "at least".
COUNT_CAP = 10_000


def limit_time(conn: Connection, seconds: float | None) -> None:
    """Cancel any statement of this transaction that runs longer than ``seconds`` (PostgreSQL's
    ``statement_timeout``, transaction-local; elsewhere nothing): a filter no index serves
    must not keep reading a table of millions for minutes on behalf of a web page."""
    if seconds and conn.dialect.name == "postgresql":
        conn.execute(sa.select(sa.func.set_config(
            "statement_timeout", str(max(1, int(seconds * 1000))), True)))


def _capped_count(where: Iterable[sa.ColumnElement[bool]]) -> sa.Select[Any]:
    """``count(*)`` of at most ``COUNT_CAP + 1`` matching rows (bounded work on any table)."""
    inner = sa.select(sa.literal(1).label("one")).where(*where).limit(COUNT_CAP + 1).subquery()
    return sa.select(sa.func.count()).select_from(inner)


# --------------------------------------------------------------------------------------------
# the audit trail


@dataclass(frozen=True, order=True)
class Cursor:
    """A position in the trail: the ``(created_at, seq)`` of a row, as text ``seq@isotime``."""

    created_at: dt.datetime
    seq: int

    def __str__(self) -> str:
        return f"{self.seq}@{self.created_at.astimezone(dt.UTC).isoformat()}"

    @classmethod
    def parse(cls, text: str) -> Cursor:
        """``ValueError`` for anything that is not ``seq@isotime``."""
        seq, sep, when = text.strip().partition("@")
        try:
            if not sep:
                raise ValueError
            at = dt.datetime.fromisoformat(when)
            return cls(at if at.tzinfo else at.replace(tzinfo=dt.UTC), int(seq))
        except ValueError:
            raise ValueError(f"invalid page cursor {text!r}") from None


@dataclass(frozen=True)
class TrailRow:
    """One event in a list: the columns a list shows (no payload; the error clipped)."""

    id: uuid.UUID
    seq: int
    created_at: dt.datetime
    type: str
    source: str
    status: str
    user_id: str | None
    session_id: str | None
    schema_name: str | None
    entity: str | None
    entity_id: str | None
    operation: str | None
    retry_count: int
    error: str | None

    @property
    def cursor(self) -> Cursor:
        return Cursor(self.created_at, self.seq)


_TRAIL_COLUMNS = (
    c.id, c.seq, c.created_at, c.type, c.source, c.status, c.user_id, c.session_id,
    c.schema_name, c.entity, c.entity_id, c.operation, c.retry_count,
    sa.func.substr(c.error, 1, ERROR_CLIP).label("error"),
)


@dataclass(frozen=True)
class TrailPage:
    rows: list[TrailRow]
    #: Cursor for the next newer page (``after=``), ``None`` on the newest page.
    newer: Cursor | None
    #: Cursor for the next older page (``before=``), ``None`` on the oldest page.
    older: Cursor | None


def _keyset(cursor: Cursor, older: bool) -> sa.ColumnElement[bool]:
    """Rows strictly older (or newer) than ``cursor`` in ``(created_at, seq)`` order, written
    so the ``created_at`` part is an index range on every dialect."""
    at = sa.literal(cursor.created_at, UTCDateTime())
    if older:
        return sa.and_(c.created_at <= at, sa.or_(c.created_at < at, c.seq < cursor.seq))
    return sa.and_(c.created_at >= at, sa.or_(c.created_at > at, c.seq > cursor.seq))


def _pinned_index(f: EventFilter, dialect: str) -> tuple[sa.ColumnElement[Any], str] | None:
    """The equality filter whose ``(column, created_at)`` index should serve the page.

    With ``LIMIT`` the planner assumes matching rows are spread evenly over time, and may walk
    ``ix_events_created_at`` from the newest row, filtering, where the matches are all old
    (one instance's lifetime, a type no longer written, last week's failures): measured on
    5,000,000 events, 0.7 s against 0.4 ms. Writing the equality also as a range
    (``col >= v AND col <= v``: the same rows) and ordering by ``col`` first (a constant here,
    so the same order) leaves that composite index as the only one that gives the order.
    ``completed`` rows are not in the status index: walking ``created_at`` is right for them.
    """
    if f.type is not None and compile_pattern(f.type).is_literal:
        return c.type, f.type
    if f.instance_id is not None:  # the index holds a prefix of it (event_sql.indexed)
        return (event_sql.indexed(dialect, "instance_id"),
                event_sql.indexed_value(dialect, "instance_id", f.instance_id))
    if f.status is not None and str(f.status) != EventStatus.COMPLETED.value:
        return c.status, str(f.status)
    return None


def trail_page(conn: Connection, f: EventFilter | None = None, *, before: Cursor | None = None,
               after: Cursor | None = None, limit: int = 50) -> TrailPage:
    """Events matching ``f`` newest first, ``limit`` per page, keyset-paged: ``before`` gives the
    page older than a cursor, ``after`` the page newer than it (``f``'s limit/offset are
    ignored). The filter's conditions are the CLI's (:func:`outbox.ops.filter_clauses`)."""
    if before is not None and after is not None:
        raise ValueError("give before or after, not both")
    if limit < 1:
        raise ValueError("limit must be >= 1")
    f = f or EventFilter()
    where = operator.filter_clauses(f, conn.dialect.name)
    order: list[sa.ColumnElement[Any]] = [c.created_at, c.seq]
    pin = _pinned_index(f, conn.dialect.name)
    if pin is not None:
        column, value = pin
        where += [column >= value, column <= value]
        order.insert(0, column)
    stmt = sa.select(*_TRAIL_COLUMNS).where(*where)
    if after is not None:
        stmt = stmt.where(_keyset(after, older=False)).order_by(*order)
    else:
        if before is not None:
            stmt = stmt.where(_keyset(before, older=True))
        stmt = stmt.order_by(*(o.desc() for o in order))
    rows = [TrailRow(**r._mapping) for r in conn.execute(stmt.limit(limit + 1))]
    more = len(rows) > limit
    rows = rows[:limit]
    if after is not None:
        rows.reverse()
        newer = rows[0].cursor if rows and more else None
        older = rows[-1].cursor if rows else after
        return TrailPage(rows, newer, older)
    newer = rows[0].cursor if rows and before is not None else None
    return TrailPage(rows, newer, rows[-1].cursor if rows and more else None)


# --------------------------------------------------------------------------------------------
# an entity's history


@dataclass(frozen=True)
class TimelineEntry:
    id: uuid.UUID
    seq: int
    created_at: dt.datetime
    type: str
    status: str
    operation: str | None
    user_id: str | None
    session_id: str | None
    payload: Any
    metadata: dict[str, Any]

    @property
    def changes(self) -> dict[str, Any]:
        """``metadata.changes`` of an update: ``{column: {"old": …, "new": …}}``."""
        found = self.metadata.get("changes") if isinstance(self.metadata, dict) else None
        return found if isinstance(found, dict) else {}


#: What a JSON value reads as when it cannot be decoded (nested deeper than the parser goes:
#: valid JSONB written by someone's SQL), so one such event does not fail the whole timeline.
UNREADABLE = "(JSON nested deeper than can be read: not shown)"


def _decoded(text: Any) -> Any:
    try:
        return _json.loads_column(text)
    except (RecursionError, ValueError):
        return UNREADABLE


def entity_timeline(conn: Connection, entity: str, entity_id: str, *,
                    schema_name: str | None = None, before_seq: int | None = None,
                    limit: int = 50) -> tuple[list[TimelineEntry], int | None]:
    """The events of one row newest first (index ``(entity, entity_id)``), and the ``seq`` to
    pass as ``before_seq`` for the older ones (``None`` when there are none)."""
    dialect = conn.dialect.name
    where = [event_sql.equals(dialect, "entity", entity),
             event_sql.equals(dialect, "entity_id", entity_id)]
    if schema_name is not None:
        where.append(c.schema_name == schema_name)
    if before_seq is not None:
        where.append(c.seq < before_seq)
    # The JSON columns as text, decoded row by row (see UNREADABLE).
    stmt = (
        sa.select(c.id, c.seq, c.created_at, c.type, c.status, c.operation, c.user_id,
                  c.session_id, sa.cast(c.payload, sa.Text).label("payload"),
                  sa.cast(c["metadata"], sa.Text).label("metadata"))
        .where(*where).order_by(c.seq.desc()).limit(limit + 1)
    )
    entries = [
        TimelineEntry(**{**r._mapping, "payload": _decoded(r.payload),
                         "metadata": _decoded(r.metadata)})
        for r in conn.execute(stmt)
    ]
    more = len(entries) > limit
    entries = entries[:limit]
    return entries, (entries[-1].seq if more else None)


# --------------------------------------------------------------------------------------------
# failures


@dataclass(frozen=True)
class FailureGroup:
    """Failed events with the same type and error text."""

    type: str
    error: str | None
    count: int
    first_at: dt.datetime
    last_at: dt.datetime
    #: ``seq`` of the group's newest event (whose payload masks hidden values in ``error``).
    sample_seq: int | None = None

    @property
    def key(self) -> str:
        """The group's name in forms: a digest of type and exact error. A form that carried
        the error text itself would get its line breaks turned into CRLF by the browser."""
        error = "\x00none" if self.error is None else f"\x01{self.error}"
        return hashlib.sha256(f"{self.type}\x00{error}".encode()).hexdigest()[:32]


#: The failures page reads at most this many failed events (the newest for the groups, the
#: oldest for the blocked keys): bounded work however many have failed.
FAILURE_SCAN = 10_000


def failed_count(conn: Connection) -> int:
    """How many events are failed (an index-only count of the status index)."""
    return int(conn.execute(
        sa.select(sa.func.count()).select_from(events).where(c.status == FAILED)).scalar_one())


def failure_groups(conn: Connection, limit: int = 50,
                   scan: int = FAILURE_SCAN) -> list[FailureGroup]:
    """The newest ``scan`` failed events grouped by type and error, largest groups first
    (through the status index; :func:`failure_group_count` counts one group exactly)."""
    recent = (
        sa.select(c.type, c.error, c.created_at, c.seq).where(c.status == FAILED)
        .order_by(c.created_at.desc()).limit(scan).subquery()
    )
    n = sa.func.count().label("count")
    rows = conn.execute(
        sa.select(recent.c.type, recent.c.error, n,
                  sa.func.min(recent.c.created_at).label("first_at"),
                  sa.func.max(recent.c.created_at).label("last_at"),
                  sa.func.max(recent.c.seq).label("sample_seq"))
        .group_by(recent.c.type, recent.c.error)
        .order_by(n.desc(), recent.c.type)
        .limit(limit)
    )
    return [FailureGroup(**r._mapping) for r in rows]


def _group_where(type: str, error: str | None) -> list[sa.ColumnElement[bool]]:
    return [c.status == FAILED, c.type == type,
            c.error.is_(None) if error is None else c.error == error]


def failure_group_count(conn: Connection, type: str, error: str | None) -> int:
    """How many events are failed with this type and error now (the replay preview)."""
    return int(conn.execute(
        sa.select(sa.func.count()).select_from(events).where(*_group_where(type, error))
    ).scalar_one())


def replay_failure_group(engine: Engine, type: str, error: str | None, *, dry_run: bool = False,
                         batch_size: int = 1000) -> operator.ReplayResult:
    """Replay every event failed with this type and error: their ids go to
    :func:`outbox.ops.replay` (``python -m outbox replay ID…``: failed → pending, retry budget
    reset), ``batch_size`` per transaction. Events that fail again during the replay are not
    picked up twice (only rows up to the highest ``seq`` seen at the start)."""
    where = _group_where(type, error)
    with engine.connect() as conn:
        ceiling = conn.execute(sa.select(sa.func.max(c.seq)).where(*where)).scalar_one()
    total = operator.ReplayResult(dry_run=dry_run)
    after = 0
    while ceiling is not None:
        with engine.connect() as conn:
            rows = conn.execute(
                sa.select(c.id, c.seq).where(*where, c.seq > after, c.seq <= ceiling)
                .order_by(c.seq).limit(batch_size)
            ).all()
        if not rows:
            break
        after = rows[-1][1]
        result = operator.replay(engine, ids=[r[0] for r in rows], dry_run=dry_run,
                            batch_size=batch_size)
        total.replayed += result.replayed
        total.skipped.update(result.skipped)
    return total


@dataclass(frozen=True)
class BlockedKey:
    """An ordering key held back by a failed event."""

    key: str
    #: The oldest failed event of the key: what holds the key.
    holder_id: uuid.UUID | None
    holder_type: str | None
    holder_error: str | None
    holder_created_at: dt.datetime | None
    failed: int
    #: Failed events of the key, and pending events behind the holder (up to ``COUNT_CAP + 1``).
    waiting: int
    #: ``seq`` of the holding event.
    holder_seq: int | None = None

    @property
    def waiting_capped(self) -> bool:
        return self.waiting > COUNT_CAP

    @property
    def failed_capped(self) -> bool:
        return self.failed > COUNT_CAP


def blocked_key_details(conn: Connection, limit: int = 50,
                        scan: int = FAILURE_SCAN) -> list[BlockedKey]:
    """Ordering keys held back by a failed event, oldest first (as :func:`outbox.ops.
    blocked_keys` orders them), from the oldest ``scan`` failed events: for each, the holding
    event, its failed events and the pending ones waiting behind it (the live rows' key index;
    counts capped at ``COUNT_CAP + 1``)."""
    oldest = (
        sa.select(c.ordering_key, c.seq)
        .where(c.status == FAILED, c.ordering_key.is_not(None))
        .order_by(c.created_at, c.seq).limit(scan).subquery()
    )
    heads = conn.execute(
        sa.select(oldest.c.ordering_key, sa.func.min(oldest.c.seq))
        .group_by(oldest.c.ordering_key).order_by(sa.func.min(oldest.c.seq)).limit(limit)
    ).all()
    if not heads:
        return []
    holders = {
        r.seq: r for r in conn.execute(
            sa.select(c.seq, c.id, c.type, c.created_at,
                      sa.func.substr(c.error, 1, ERROR_CLIP).label("error"))
            # the holding events are failed: their status keeps the lookup in the live rows
            # (no index on seq in the history, see docs/relay.md "Storage")
            .where(c.seq.in_([int(seq) for _, seq in heads]), c.status == FAILED)
        )
    }
    out = []
    for key, seq in heads:
        same_key = c.ordering_key == key
        failed, waiting = conn.execute(sa.select(
            _capped_count([same_key, c.status == FAILED]).scalar_subquery(),
            _capped_count([same_key, c.status == PENDING, c.seq > seq]).scalar_subquery(),
        )).one()
        h = holders.get(seq)
        out.append(BlockedKey(
            key=str(key), holder_id=h.id if h else None, holder_type=h.type if h else None,
            holder_error=h.error if h else None, holder_created_at=h.created_at if h else None,
            failed=int(failed), waiting=int(waiting), holder_seq=int(seq),
        ))
    return out


def event_without_json(conn: Connection, event_id: uuid.UUID) -> Event | None:
    """The event without its ``payload`` and ``metadata`` (left empty): for an event whose JSON
    the driver cannot decode (nested deeper than Python's parser goes — valid JSONB written by
    someone's SQL), so its page can still show everything else."""
    columns = [col for col in events.c if col.name not in ("payload", "metadata")]
    row = conn.execute(sa.select(*columns).where(c.id == event_id)).first()
    if row is None:
        return None
    values = {events.c[name].key: value for name, value in row._mapping.items()}
    return Event(**values, payload={}, meta={})


def values_by_id(conn: Connection, ids: Iterable[uuid.UUID]) -> dict[uuid.UUID, tuple[Any, Any]]:
    """``(payload, metadata)`` of these events (primary-key lookups): what the console masks
    in the errors a list shows."""
    wanted = list(dict.fromkeys(ids))
    if not wanted:
        return {}
    rows = conn.execute(sa.select(c.id, c.payload, c["metadata"].label("meta"))
                        .where(c.id.in_(wanted)))
    return {r.id: (r.payload, r.meta) for r in rows}


def failed_values_by_seq(conn: Connection, seqs: Iterable[int]) -> dict[int, tuple[Any, Any]]:
    """``(payload, metadata)`` of failed events by ``seq`` (the status keeps the lookup in the
    live rows, where ``seq`` is indexed)."""
    wanted = [int(s) for s in dict.fromkeys(seqs)]
    if not wanted:
        return {}
    rows = conn.execute(sa.select(c.seq, c.payload, c["metadata"].label("meta"))
                        .where(c.seq.in_(wanted), c.status == FAILED))
    return {int(r.seq): (r.payload, r.meta) for r in rows}


# --------------------------------------------------------------------------------------------
# health


@dataclass(frozen=True)
class ThroughputBucket:
    start: dt.datetime
    end: dt.datetime
    #: Events written in ``[start, end)``.
    events: int
    #: False when ``events`` is estimated from ``seq`` values (see :func:`throughput`).
    exact: bool = True


#: Up to this many events in the window, :func:`throughput` counts them exactly.
EXACT_THROUGHPUT = 20_000


def throughput(conn: Connection, *, window: dt.timedelta = dt.timedelta(hours=1),
               buckets: int = 60, now: dt.datetime | None = None) -> list[ThroughputBucket]:
    """Events written per interval over the last ``window``, oldest first.

    Counting the rows of a busy hour would read every one of them. So first each boundary costs
    one probe of the ``created_at`` index (the first ``seq`` at or after it), and a bucket's
    count is estimated as the difference of two such ``seq``. When that says the window holds at
    most ``EXACT_THROUGHPUT`` events, they are counted exactly (index ranges of that size);
    otherwise the estimate stands (``exact`` False): it counts ``seq`` values, so inserts that
    were rolled back count too, and it assumes ``created_at`` grows with ``seq`` (true for
    events written now; not for events back-dated on purpose).
    """
    if buckets < 1 or window <= dt.timedelta(0):
        raise ValueError("throughput needs at least one bucket and a positive window")
    end = now or utcnow()
    step = window / buckets
    bounds = [end - window + step * i for i in range(buckets)] + [end]

    def at(i: int) -> sa.ColumnElement[dt.datetime]:
        return sa.literal(bounds[i], UTCDateTime())

    # The history (completed events; PostgreSQL's events_done) is probed through its created_at
    # index once per boundary. The unfinished events of the window (the live rows, which have
    # no such index) are read once and bucketed here: probing them per boundary would scan them
    # once per bucket. Past EXACT_THROUGHPUT of them (a backlog) the probes take both.
    live: list[tuple[dt.datetime, int]] = [(r[0], r[1]) for r in conn.execute(
        sa.select(c.created_at, c.seq)
        .where(c.status != COMPLETED, c.created_at >= at(0), c.created_at < at(buckets))
        .limit(EXACT_THROUGHPUT + 1)
    )]
    backlog = len(live) > EXACT_THROUGHPUT
    history = [] if backlog else [c.status == COMPLETED]
    if backlog:
        live = []

    def first_seq(i: int) -> sa.ScalarSelect[Any]:
        return (
            sa.select(c.seq).where(*history, c.created_at >= at(i))
            .order_by(c.created_at, c.seq).limit(1).scalar_subquery()
        )

    # the newest event's seq, through the created_at index like the bounds (max(seq) would read
    # the whole history: seq is not indexed there)
    top = (sa.select(c.seq).where(*history)
           .order_by(c.created_at.desc(), c.seq.desc()).limit(1).scalar_subquery())
    row = conn.execute(sa.select(*(first_seq(i) for i in range(buckets)), top)).one()
    last = max([row[-1] or 0, *(seq for _, seq in live)]) + 1  # about the seq the next event gets
    # the smallest seq of the live rows created at or after each row's time (suffix minimum)
    live.sort()
    times = [created for created, _ in live]
    suffix = [last] * (len(live) + 1)
    for k in range(len(live) - 1, -1, -1):
        suffix[k] = min(suffix[k + 1], live[k][1])
    seqs = [min(last if row[i] is None else row[i], suffix[bisect.bisect_left(times, bounds[i])])
            for i in range(buckets)]
    seqs.append(last)
    counts = [max(0, seqs[i + 1] - seqs[i]) for i in range(buckets)]
    exact = sum(counts) <= EXACT_THROUGHPUT
    if exact:
        def count(i: int) -> sa.ScalarSelect[Any]:
            return (
                sa.select(sa.func.count()).select_from(events)
                .where(*history, c.created_at >= at(i), c.created_at < at(i + 1))
                .scalar_subquery()
            )

        counts = [int(n) for n in conn.execute(sa.select(*(count(i) for i in range(buckets))))
                  .one()]
        for created, _seq in live:
            counts[min(buckets - 1, int((created - bounds[0]) / step))] += 1
    return [ThroughputBucket(bounds[i], bounds[i + 1], counts[i], exact) for i in range(buckets)]


@dataclass(frozen=True)
class RelaySeen:
    """A relay (``lease_owner``) seen claiming or finishing events."""

    owner: str
    #: Events it holds now (``processing``).
    holding: int
    #: Events among the most recent ones that it finished.
    finished: int
    last_seen: dt.datetime | None


def relays_seen(conn: Connection, sample: int = 1000) -> list[RelaySeen]:
    """Relays that hold events now (the status index) or finished one of the newest ``sample``
    events (the ``created_at`` index), most recently seen first. Bounded work: a relay that
    finished none of the newest events and holds nothing is not listed."""
    holding = {
        r[0]: (int(r[1]), r[2]) for r in conn.execute(
            sa.select(c.lease_owner, sa.func.count(), sa.func.max(c.processed_at))
            .where(c.status == PROCESSING, c.lease_owner.is_not(None))
            .group_by(c.lease_owner)
        )
    }
    recent = (
        sa.select(c.lease_owner, c.completed_at).order_by(c.created_at.desc()).limit(sample)
        .subquery()
    )
    finished = {
        r[0]: (int(r[1]), r[2]) for r in conn.execute(
            sa.select(recent.c.lease_owner, sa.func.count(), sa.func.max(recent.c.completed_at))
            .where(recent.c.lease_owner.is_not(None), recent.c.completed_at.is_not(None))
            .group_by(recent.c.lease_owner)
        )
    }
    out = []
    for owner in set(holding) | set(finished):
        held, held_at = holding.get(owner, (0, None))
        done, done_at = finished.get(owner, (0, None))
        seen = [t for t in (held_at, done_at) if t is not None]
        out.append(RelaySeen(owner, held, done, max(seen) if seen else None))
    epoch = dt.datetime.min.replace(tzinfo=dt.UTC)
    return sorted(out, key=lambda r: (r.last_seen or epoch, r.owner), reverse=True)


@dataclass(frozen=True)
class ConsumerLag:
    """A database-bus consumer group, where it is, and how far behind."""

    group: bus.GroupInfo
    #: ``created_at`` of the first event after the group's position (not settled yet).
    oldest_unsettled_at: dt.datetime | None
    #: Events after the position, counted up to ``COUNT_CAP + 1``.
    behind: int

    @property
    def behind_capped(self) -> bool:
        return self.behind > COUNT_CAP

    def lag_seconds(self, now: dt.datetime | None = None) -> float:
        if self.oldest_unsettled_at is None:
            return 0.0
        return max(0.0, ((now or utcnow()) - self.oldest_unsettled_at).total_seconds())


def _has_table(conn: Connection, table: sa.Table) -> bool:
    return bool(sa.inspect(conn).has_table(table.name))


def consumer_lags(conn: Connection) -> list[ConsumerLag]:
    """Every consumer group of the database bus with its lag: the age of the first event after
    its position, and how many follow (``bus.unread``: index-served). Groups read every event
    on the bus, so the count includes events their pattern skips."""
    if not _has_table(conn, consumers_table):
        return []
    xids = has_xids(conn)
    out = []
    for info in bus.list_groups(conn):
        after, order = bus.unread(info.cursor, xids)
        first = conn.execute(sa.select(c.created_at).where(*after).order_by(*order).limit(1))
        behind = conn.execute(_capped_count(after)).scalar_one()
        out.append(ConsumerLag(info, first.scalar(), int(behind)))
    return out


@dataclass(frozen=True)
class DeadLetter:
    group: str
    event_id: uuid.UUID
    type: str | None
    error: str
    attempt: int
    parked_at: dt.datetime


def dead_letters(conn: Connection, limit: int = 50) -> list[DeadLetter]:
    """The database bus's parked events, newest first, with their event's type."""
    if not _has_table(conn, dead_letters_table):
        return []
    d = dead_letters_table.c
    rows = conn.execute(
        sa.select(d.group_name, d.event_id, c.type,
                  sa.func.substr(d.error, 1, ERROR_CLIP).label("error"), d.attempt, d.parked_at)
        .select_from(dead_letters_table.outerjoin(events, c.id == d.event_id))
        .order_by(d.parked_at.desc()).limit(limit)
    )
    return [DeadLetter(r[0], r[1], r[2], r[3], int(r[4]), r[5]) for r in rows]


def count_dead_letters(conn: Connection) -> int:
    if not _has_table(conn, dead_letters_table):
        return 0
    return int(conn.execute(
        sa.select(sa.func.count()).select_from(dead_letters_table)).scalar_one())


def estimated_total(conn: Connection) -> int:
    """About how many events the table holds, without counting them: PostgreSQL's statistics
    (``reltuples`` of the table, or of its partitions), elsewhere the highest ``seq``."""
    if conn.dialect.name == "postgresql":
        regclass = sa.cast(sa.literal(events.name), postgresql.REGCLASS)
        parts: sa.Select[Any] = sa.select(sa.column("relid")).select_from(
            sa.func.pg_partition_tree(regclass).table_valued("relid", "isleaf")
        ).where(sa.column("isleaf"))
        pg_class = sa.table("pg_class", sa.column("oid"), sa.column("relkind"),
                            sa.column("reltuples"))
        value = conn.execute(
            sa.select(sa.func.sum(pg_class.c.reltuples)).where(
                sa.or_(pg_class.c.oid == regclass, pg_class.c.oid.in_(parts)),
                pg_class.c.relkind == "r", pg_class.c.reltuples >= 0,
            )
        ).scalar()
        if value is not None:
            return int(value)
    return int(conn.execute(sa.select(sa.func.coalesce(sa.func.max(c.seq), 0))).scalar_one())


def known_types(conn: Connection, limit: int = 200) -> list[str]:
    """Distinct event types, in order, up to ``limit``: a skip scan of the type index (one probe
    per type, not a read of every row) — a recursive query on PostgreSQL and SQLite, MariaDB's
    loose index scan for ``DISTINCT``."""
    if conn.dialect.name in ("mysql", "mariadb"):
        stmt = sa.select(c.type).distinct().order_by(c.type).limit(limit)
        return [str(t) for t in conn.execute(stmt).scalars()]
    # On PostgreSQL only the history (events_done) has a type index; probing the parent table
    # also scanned the backlog (events_live) once per type — 11 s for 200 types behind a
    # 67,000-event backlog. So: the probes read the history, and one pass reads the backlog.
    history = [c.status == COMPLETED] if conn.dialect.name == "postgresql" else []
    seed = sa.select(sa.func.min(c.type).label("type")).where(*history).cte("types",
                                                                            recursive=True)
    step = sa.select(
        sa.select(sa.func.min(c.type)).where(c.type > seed.c.type, *history).scalar_subquery()
    ).where(seed.c.type.is_not(None))
    types = seed.union_all(step)
    stmt = sa.select(types.c.type).where(types.c.type.is_not(None)).limit(limit)
    found = {str(t) for t in conn.execute(stmt).scalars()}
    if history:
        live = sa.select(c.type).where(c.status != COMPLETED).distinct()
        found.update(str(t) for t in conn.execute(live).scalars())
    return sorted(found)[:limit]


@dataclass
class HealthFigures:
    """Everything the health page shows, read in one go (see :func:`health_figures`)."""

    backlog: operator.Backlog
    estimated_total: int
    throughput: list[ThroughputBucket]
    relays: list[RelaySeen]
    consumers: list[ConsumerLag]
    dead_letters: list[DeadLetter]
    dead_letter_count: int
    now: dt.datetime = field(default_factory=utcnow)


def health_figures(conn: Connection, *, window: dt.timedelta = dt.timedelta(hours=1),
                   buckets: int = 60) -> HealthFigures:
    now = utcnow()
    return HealthFigures(
        backlog=operator.backlog(conn),
        estimated_total=estimated_total(conn),
        throughput=throughput(conn, window=window, buckets=buckets, now=now),
        relays=relays_seen(conn),
        consumers=consumer_lags(conn),
        dead_letters=dead_letters(conn, 20),
        dead_letter_count=count_dead_letters(conn),
        now=now,
    )
