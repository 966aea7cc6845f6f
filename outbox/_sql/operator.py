"""The operator's jobs over the ``events`` table: replay, cleanup, stats, backlog, blocked keys.

- :func:`filter_clauses` — an :class:`~outbox.EventFilter` as SQL conditions (the
  events module's :func:`~outbox._sql.events.where_clauses`), for ``replay`` and anything
  else that filters by SQL;
- :func:`list_events` / :func:`get_event` — the CLI's read path (:mod:`outbox._sql.events`);
- :func:`replay` — ``failed`` → ``pending`` with a fresh retry budget;
- :func:`cleanup` — delete finished events older than a cutoff, in small batches, one short
  transaction per batch, so writers and relays never wait behind it;
- :func:`stats` / :func:`backlog` / :func:`blocked_keys` — counts by status and type, the
  outbox lag, the ordering keys a failed event holds back (the relay's metrics and inspection
  use these too).

Every value reaches the database as a bound parameter. The functions take an ``Engine`` when they
manage their own (short) transactions, or a ``Connection`` when they only read.
"""

from __future__ import annotations

import datetime as dt
import functools
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from outbox._patterns import compile_pattern
from outbox._sql import events as event_sql
from outbox._sql.ddl import NOTIFY_CHANNEL
from outbox._txretry import retrying
from outbox.events import Event, EventFilter, EventStatus, as_event_id, utcnow

__all__ = [
    "FINISHED",
    "Backlog",
    "CleanupResult",
    "OutboxStats",
    "ReplayResult",
    "backlog",
    "blocked_keys",
    "cleanup",
    "filter_clauses",
    "get_event",
    "list_events",
    "replay",
    "stats",
]

events: sa.Table = Event.__table__  # type: ignore[assignment]
c = events.c

#: Statuses ``cleanup`` may delete. Pending and processing rows are never deleted.
FINISHED: tuple[str, ...] = (EventStatus.COMPLETED.value, EventStatus.FAILED.value)


# --------------------------------------------------------------------------------------------
# filters


#: The conditions of an EventFilter (without limit/offset/order) on a dialect's ``events``: the
#: database provider's, so ``events list`` and ``replay`` select exactly what
#: ``DatabaseProvider.list`` returns.
filter_clauses = event_sql.where_clauses


# --------------------------------------------------------------------------------------------
# reading


def list_events(conn: Connection, f: EventFilter | None = None) -> list[Event]:
    """Events matching ``f`` in the filter's stable order (the database provider's ``list``)."""
    return event_sql.list_events(conn, f or EventFilter())


def get_event(conn: Connection, event_id: uuid.UUID | str) -> Event | None:
    """The event with that id, or ``None`` (``ValueError`` for text that is not a UUID)."""
    return event_sql.get_event(conn, as_event_id(event_id))


# --------------------------------------------------------------------------------------------
# replay


@dataclass
class ReplayResult:
    """What :func:`replay` did (or, with ``dry_run``, would do)."""

    replayed: int = 0
    dry_run: bool = False
    #: Ids given explicitly that do not exist.
    missing: list[uuid.UUID] = field(default_factory=list)
    #: Ids given explicitly whose status is not ``failed`` (left untouched), with their status.
    skipped: dict[uuid.UUID, str] = field(default_factory=dict)


def _reset_values() -> dict[str, Any]:
    """Columns of a replayed event: due now, fresh retry budget, no lease, no outcome."""
    return {
        "status": EventStatus.PENDING.value,
        "retry_count": 0,
        "next_attempt_at": utcnow(),
        "error": None,
        "processed_at": None,
        "completed_at": None,
        "lease_owner": None,
        "lease_token": None,
        "lease_expires_at": None,
    }


def _notify(conn: Connection) -> None:
    """Wake PostgreSQL relays at commit (replayed rows fire no INSERT trigger)."""
    if conn.dialect.name == "postgresql":
        conn.execute(sa.select(sa.func.pg_notify(NOTIFY_CHANNEL, "")))


def _replay_rows(conn: Connection, ids: list[uuid.UUID]) -> int:
    """Reset the rows of ``ids`` that are (still) failed; how many were."""
    if not ids:
        return 0
    res = conn.execute(
        sa.update(events)
        .where(c.id.in_(ids), c.status == EventStatus.FAILED.value)
        .values(_reset_values())
    )
    _notify(conn)
    return int(res.rowcount)


def _parse_ids(ids: Iterable[uuid.UUID | str]) -> list[uuid.UUID]:
    out: list[uuid.UUID] = []
    for value in ids:
        out.append(value if isinstance(value, uuid.UUID) else uuid.UUID(str(value)))
    return list(dict.fromkeys(out))


def replay(
    engine: Engine,
    *,
    ids: Iterable[uuid.UUID | str] | None = None,
    filter: EventFilter | None = None,
    dry_run: bool = False,
    batch_size: int = 1000,
) -> ReplayResult:
    """Put ``failed`` events back to ``pending`` with ``retry_count`` 0, due now.

    Give either ``ids`` (each must exist and be ``failed``; the others are reported in the result
    and left alone) or a ``filter`` (its ``status`` must be unset or ``failed``; limit/offset are
    ignored). Events are updated in batches of ``batch_size``, one short transaction each; only
    events that were failed when the replay started are touched, so an event that fails again
    while a long replay runs is not replayed twice.
    """
    if (ids is None) == (filter is None):
        raise ValueError("replay needs either ids or a filter")
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    result = ReplayResult(dry_run=dry_run)
    failed = EventStatus.FAILED.value
    if ids is not None:
        wanted = _parse_ids(ids)
        for start in range(0, len(wanted), batch_size):
            chunk = wanted[start:start + batch_size]

            def replay_chunk(chunk: list[uuid.UUID] = chunk) -> tuple[dict[uuid.UUID, str], int]:
                with engine.begin() as conn:
                    found = dict(
                        conn.execute(sa.select(c.id, c.status).where(c.id.in_(chunk))).all()
                    )
                    todo = [i for i in chunk if found.get(i) == failed]
                    return found, len(todo) if dry_run else _replay_rows(conn, todo)

            found, replayed = retrying(replay_chunk, what="replay")
            result.missing.extend(i for i in chunk if i not in found)
            result.skipped.update({i: s for i, s in found.items() if s != failed})
            result.replayed += replayed
        return result

    assert filter is not None
    if filter.status is not None and str(filter.status) != failed:
        raise ValueError("replay only moves failed events (filter.status must be 'failed')")
    # The SQL selects; the Python matcher has the last word on the type pattern, so a replay
    # never moves an event its pattern does not match (a belt to the SQL's braces).
    matches = compile_pattern(filter.type).matches if filter.type is not None else None
    with engine.connect() as conn:
        where = [*filter_clauses(filter, conn.dialect.name), c.status == failed]
        ceiling = conn.execute(sa.select(sa.func.max(c.seq)).where(*where)).scalar_one()
    if ceiling is None:
        return result

    def replay_batch(after: int) -> tuple[int | None, int]:
        """(seq of the batch's last row or None when there is none, events replayed)."""
        with engine.begin() as conn:
            rows = conn.execute(
                sa.select(c.id, c.seq, c.type)
                .where(*where, c.seq > after, c.seq <= ceiling)
                .order_by(c.seq)
                .limit(batch_size)
            ).all()
            if not rows:
                return None, 0
            todo = [r[0] for r in rows if matches is None or matches(r[2])]
            return rows[-1][1], len(todo) if dry_run else _replay_rows(conn, todo)

    after: int | None = 0
    while after is not None:
        after, replayed = retrying(functools.partial(replay_batch, after), what="replay")
        result.replayed += replayed
    return result


# --------------------------------------------------------------------------------------------
# cleanup


@dataclass
class CleanupResult:
    """What :func:`cleanup` deleted (or, with ``dry_run``, would delete)."""

    deleted: int = 0
    batches: int = 0
    seconds: float = 0.0
    dry_run: bool = False
    by_status: dict[str, int] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        """Rows deleted per second."""
        return self.deleted / self.seconds if self.seconds > 0 else 0.0


def _check_statuses(statuses: Sequence[str]) -> tuple[str, ...]:
    out = tuple(dict.fromkeys(str(s) for s in statuses))
    if not out:
        raise ValueError("cleanup needs at least one status")
    bad = [s for s in out if s not in FINISHED]
    if bad:
        raise ValueError(
            f"cleanup deletes finished events only ({', '.join(FINISHED)}), not: {', '.join(bad)}"
        )
    return out


def _delete_batch(conn: Connection, status: str, cutoff: dt.datetime, size: int) -> int:
    """Delete at most ``size`` rows of ``status`` created before ``cutoff``; rows deleted.

    Oldest first, along ``ix_events_created_at``. On PostgreSQL one statement deletes by primary
    key from an array of the picked ids (``id = ANY(ARRAY(SELECT … LIMIT n))``): with ``id IN
    (SELECT … LIMIT n)`` it hash-joined the subquery against a sequential scan of the whole table
    (95 ms per batch of 5,000 on 500,000 rows, growing with the history, against 16 ms). MariaDB
    refuses ``LIMIT`` inside ``IN``, so elsewhere the ids are fetched first.
    """
    where = (c.status == status, c.created_at < cutoff)
    pick = sa.select(c.id).where(*where).order_by(c.created_at).limit(size)
    dialect = conn.dialect.name
    if dialect != "sqlite":
        # Skip rows someone holds (a replay in progress); they are taken next run.
        pick = pick.with_for_update(skip_locked=True)
    if dialect == "postgresql":
        picked = sa.any_(sa.func.array(pick.scalar_subquery()))
        return conn.execute(sa.delete(events).where(c.id == picked, *where)).rowcount
    ids = conn.execute(pick).scalars().all()
    if not ids:
        return 0
    return conn.execute(sa.delete(events).where(c.id.in_(ids), *where)).rowcount


def _delete_in_transaction(engine: Engine, status: str, cutoff: dt.datetime, size: int) -> int:
    with engine.begin() as conn:
        return _delete_batch(conn, status, cutoff, size)


def cleanup(
    engine: Engine,
    *,
    older_than: dt.timedelta | None = None,
    before: dt.datetime | None = None,
    statuses: Sequence[str] = FINISHED,
    batch_size: int = 5000,
    dry_run: bool = False,
    pause: float | None = None,
    progress: Callable[[CleanupResult], None] | None = None,
) -> CleanupResult:
    """Delete finished events created before a cutoff, ``batch_size`` rows per transaction.

    The cutoff is ``before``, or now minus ``older_than``. Only ``completed``/``failed`` rows are
    ever deleted; the age is taken from ``created_at`` (oldest first, along its index). Each
    batch is its own short transaction, so the relay and writers interleave with it. Between
    batches it sleeps ``pause`` seconds; by default (``None``) as long as the last batch took, so
    the cleanup uses at most about half of a database core and leaves the rest to the relay and
    writers (``pause=0``: full speed). ``progress`` is called after every batch.
    """
    if pause is not None and pause < 0:
        raise ValueError("pause must not be negative")
    if (older_than is None) == (before is None):
        raise ValueError("cleanup needs exactly one of older_than or before")
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    chosen = _check_statuses(statuses)
    if before is None:
        assert older_than is not None
        if older_than < dt.timedelta(0):
            raise ValueError("older_than must not be negative")
        before = utcnow() - older_than
    result = CleanupResult(dry_run=dry_run)
    started = time.perf_counter()
    if dry_run:
        with engine.connect() as conn:
            for status in chosen:
                n = conn.execute(
                    sa.select(sa.func.count()).select_from(events)
                    .where(c.status == status, c.created_at < before)
                ).scalar_one()
                result.by_status[status] = n
                result.deleted += n
        result.seconds = time.perf_counter() - started
        return result
    for status in chosen:
        result.by_status[status] = 0
        while True:
            batch_started = time.perf_counter()
            n = retrying(functools.partial(_delete_in_transaction, engine, status, before,
                                           batch_size), what="cleanup")
            took = time.perf_counter() - batch_started
            result.deleted += n
            result.by_status[status] += n
            result.batches += 1
            result.seconds = time.perf_counter() - started
            if progress is not None:
                progress(result)
            if n < batch_size:
                break
            wait = took if pause is None else pause
            if wait > 0:
                time.sleep(wait)
    result.seconds = time.perf_counter() - started
    return result


# --------------------------------------------------------------------------------------------
# backlog and stats


@dataclass(frozen=True)
class Backlog:
    """The relay's work left in the table, from one cheap query (see :func:`backlog`)."""

    pending: int = 0
    processing: int = 0
    failed: int = 0
    #: Ordering keys held back by a ``failed`` event (their later events wait for a replay).
    blocked_keys: int = 0
    #: ``created_at`` of the oldest undelivered (pending or processing) event.
    oldest_created_at: dt.datetime | None = None
    #: ``created_at`` of the oldest pending event (not claimed yet).
    oldest_pending_at: dt.datetime | None = None

    def lag_seconds(self, now: dt.datetime | None = None) -> float:
        """Age of the oldest undelivered event in seconds (0 when nothing waits)."""
        if self.oldest_created_at is None:
            return 0.0
        now = now or utcnow()
        return max(0.0, (now - self.oldest_created_at).total_seconds())


def _backlog_query() -> sa.Select[Any]:
    def count(status: str) -> sa.ScalarSelect[int]:
        return (
            sa.select(sa.func.count()).select_from(events).where(c.status == status)
            .scalar_subquery()
        )

    pending, processing = EventStatus.PENDING.value, EventStatus.PROCESSING.value
    # Oldest pending by seq: the first pending entry of the claim index (`events_live`), or of the
    # partial pending index on a single table.
    oldest_pending = (
        sa.select(c.created_at).where(c.status == pending).order_by(c.seq).limit(1)
        .scalar_subquery()
    )
    # Processing rows are few (at most the relays' batches in flight).
    oldest_processing = (
        sa.select(sa.func.min(c.created_at)).where(c.status == processing).scalar_subquery()
    )
    blocked = (
        sa.select(sa.func.count(sa.distinct(c.ordering_key)))
        .where(c.status == EventStatus.FAILED.value, c.ordering_key.is_not(None))
        .scalar_subquery()
    )
    return sa.select(
        count(pending).label("pending"),
        count(processing).label("processing"),
        count(EventStatus.FAILED.value).label("failed"),
        blocked.label("blocked_keys"),
        sa.type_coerce(oldest_pending, c.created_at.type).label("oldest_pending"),
        sa.type_coerce(oldest_processing, c.created_at.type).label("oldest_processing"),
    )


_BACKLOG = _backlog_query()


def backlog(conn: Connection) -> Backlog:
    """Pending / processing / failed counts, blocked keys and the oldest undelivered event.

    One statement of subqueries that read only unfinished rows (on PostgreSQL the partition
    ``events_live``, elsewhere the partial indexes of unfinished rows): its cost grows with the
    backlog, not the history; cheap enough to run every few seconds, but not per event.
    """
    row = conn.execute(_BACKLOG).one()
    oldest = [t for t in (row.oldest_pending, row.oldest_processing) if t is not None]
    return Backlog(
        pending=row.pending,
        processing=row.processing,
        failed=row.failed,
        blocked_keys=row.blocked_keys,
        oldest_created_at=min(oldest) if oldest else None,
        oldest_pending_at=row.oldest_pending,
    )


_BLOCKED = (
    sa.select(c.ordering_key, sa.func.min(c.seq), sa.func.count())
    .where(c.status == EventStatus.FAILED.value, c.ordering_key.is_not(None))
    .group_by(c.ordering_key)
    .order_by(sa.func.min(c.seq))
    .limit(sa.bindparam("limit", type_=sa.Integer()))
)


def blocked_keys(conn: Connection, limit: int = 100) -> list[tuple[str, int, int]]:
    """Ordering keys held back by a ``failed`` event, oldest first: ``(key, seq of the oldest
    failed event, failed events)``. Their later events wait until the failed ones are replayed
    (or deleted)."""
    rows = conn.execute(_BLOCKED, {"limit": limit}).all()
    return [(str(r[0]), int(r[1]), int(r[2])) for r in rows]


@dataclass
class OutboxStats:
    """Counts by status and by type (and status), plus the backlog."""

    by_status: dict[str, int]
    by_type: dict[str, dict[str, int]]
    backlog: Backlog
    since: dt.datetime | None = None

    @property
    def total(self) -> int:
        return sum(self.by_status.values())


def stats(conn: Connection, *, since: dt.datetime | None = None) -> OutboxStats:
    """Counts of events by status and by type (created at or after ``since`` when given).

    Without ``since`` this reads the whole table: an operator's command, not a metric.
    """
    where = [] if since is None else [c.created_at >= since]
    by_status = {
        status: n
        for status, n in conn.execute(
            sa.select(c.status, sa.func.count()).where(*where).group_by(c.status)
        )
    }
    by_type: dict[str, dict[str, int]] = {}
    rows = conn.execute(
        sa.select(c.type, c.status, sa.func.count())
        .where(*where)
        .group_by(c.type, c.status)
        .order_by(c.type, c.status)
    )
    for type_, status, n in rows:
        by_type.setdefault(type_, {})[status] = n
    return OutboxStats(by_status=by_status, by_type=by_type, backlog=backlog(conn), since=since)
