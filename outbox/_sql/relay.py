"""Every SQL statement the relay runs, for each dialect, behind one class: :class:`RelayStore`.

The relay loop never touches a driver or writes SQL; it calls ``claim``, ``finish``, ``renew``,
``recover_expired`` and friends, each of which is one short transaction.

Claiming (see docs/relay.md for the guarantees this gives):

- only ``pending`` rows that are due (``next_attempt_at <= now``), oldest ``seq`` first;
- only the *head* of an ordering key: a row is claimable when no older row with the same key is
  unfinished (``pending``, ``processing`` or ``failed``). The check runs against the statement's
  snapshot; a row that another relay is claiming at the same moment is still ``pending`` there,
  so it blocks its key too — two relays can never hold two events of one key;
- PostgreSQL and MariaDB lock the picked rows ``FOR UPDATE SKIP LOCKED`` so relays share the work
  without waiting on each other; SQLite serialises writers, its claim is one ``UPDATE``;
- the scan is bounded from below (``floor``): the relay passes the lowest ``seq`` it still has to
  look at, so the claim does not walk the dead index entries that completed rows leave at the
  start of the pending index until vacuum removes them. ``floor=0`` is a full scan;
- when the heads fill less than the batch, the *followers* of the keys just claimed (the next
  pending, due events of the same key, up to the first one that is not) are claimed in the same
  transaction, so a hot key is not limited to one event per claim. The relay hands a key's events
  to handlers one at a time in ``seq`` order.

Every update after the claim is fenced by the batch's lease token: a relay whose lease expired
and whose events were taken over cannot overwrite the new owner's result.
"""

from __future__ import annotations

import datetime as dt
import functools
import re
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from outbox import _json
from outbox._sql import operator
from outbox._txretry import retrying
from outbox.events import COLUMNS, Event, EventStatus, JSONType, UTCDateTime

__all__ = ["Claim", "Outcome", "RelayStore"]

PENDING = EventStatus.PENDING.value
PROCESSING = EventStatus.PROCESSING.value
COMPLETED = EventStatus.COMPLETED.value
FAILED = EventStatus.FAILED.value

_TABLE = "events"
_RESULT_COLUMNS = tuple(Event.__table__.c[c] for c in COLUMNS)
_JSON_COLUMNS = frozenset({"payload", "metadata"})
# Timestamps a writer sets: any value PostgreSQL accepts (``infinity``, year 20000) may be there.
_WRITER_TIMES = frozenset({"created_at", "next_attempt_at", "completed_at"})
#: Timestamps outside Python's range come back as NULL on PostgreSQL (psycopg cannot load them,
#: and would fail the whole claim); ``created_at`` and ``next_attempt_at`` are never NULL
#: otherwise, so the row is then known to be undeliverable (see ``_RowDecoder``).
_PG_TIME_RANGE = "BETWEEN '0001-01-02' AND '9999-12-30'"  # a day inside, whatever the TimeZone


def _returned(column: str, pg: bool, prefix: str = "t.") -> str:
    """How a claim returns ``column``: JSON as text, decoded per row, so that one undecodable
    value (nested deeper than any parser goes) fails its own row, not the claim."""
    if not pg:
        return f"{prefix}{column}"
    if column in _JSON_COLUMNS:
        return f"{prefix}{column}::text"
    if column in _WRITER_TIMES:
        return f"CASE WHEN {prefix}{column} {_PG_TIME_RANGE} THEN {prefix}{column} END"
    return f"{prefix}{column}"


_PG_COLS = ", ".join(_returned(c, True) for c in COLUMNS)
_COLS = ", ".join(_returned(c, False) for c in COLUMNS)
_BARE_COLS = ", ".join(COLUMNS)  # SQLite's RETURNING takes no table prefix

# The head-of-key rule, shared by every dialect: no older unfinished event of the same key.
_IS_HEAD = (
    "(e.ordering_key IS NULL OR NOT EXISTS ("
    "SELECT 1 FROM events AS o WHERE o.ordering_key = e.ordering_key "
    "AND o.seq < e.seq AND o.status <> 'completed'))"
)
_DUE = "e.status = 'pending' AND e.seq >= :floor AND e.next_attempt_at <= :now"

# The f-strings below join fixed SQL fragments; every value is a bound parameter.
_PG_CLAIM = f"""
UPDATE events AS t
SET status = 'processing', processed_at = :now, lease_owner = :owner,
    lease_token = :token, lease_expires_at = :expires
WHERE t.status = 'pending' AND t.id = ANY(ARRAY(
    SELECT e.id FROM events AS e
    WHERE {_DUE} AND {_IS_HEAD}
    ORDER BY e.seq, e.next_attempt_at
    LIMIT :limit
    FOR UPDATE OF e SKIP LOCKED
))
RETURNING {_PG_COLS}
"""  # noqa: S608

# Walk the live partition's (seq, next_attempt_at) index in order and stop at LIMIT: the claim
# orders by the index's own order and sorting is disabled, so that index is the only plan without
# a sort (otherwise, depending on statistics, PostgreSQL picks a bitmap scan + sort that tests the
# head-of-key rule on every pending row: 100x slower on a fresh table). The picked ids are handed
# to the UPDATE as an array: a join of them against ``events`` could hash the whole partition.
_PG_PLAN_SETTINGS = ("enable_sort = off", "enable_incremental_sort = off",
                     "enable_bitmapscan = off")
# Claimed rows come back as UTC datetimes without conversion.
_PG_UTC_SETTING = "TimeZone = 'UTC'"
# The relay's own status updates need not wait for the WAL flush: if the database server
# crashes, a lost claim or completion only means those events are delivered again
# (at-least-once); the events themselves were committed durably by their writers.
_PG_ASYNC_COMMIT_SETTING = "synchronous_commit = off"
_PG_PLAN = "; ".join(f"SET LOCAL {x}" for x in (*_PG_PLAN_SETTINGS, _PG_UTC_SETTING))
_PG_ASYNC_COMMIT = f"SET LOCAL {_PG_ASYNC_COMMIT_SETTING}"

_SQLITE_CLAIM = f"""
UPDATE events AS t
SET status = 'processing', processed_at = :now, lease_owner = :owner,
    lease_token = :token, lease_expires_at = :expires
WHERE t.id IN (
    SELECT e.id FROM events AS e
    WHERE {_DUE} AND {_IS_HEAD}
    ORDER BY e.seq, e.next_attempt_at
    LIMIT :limit
)
RETURNING {_BARE_COLS}
"""  # noqa: S608

_MYSQL_PICK = f"""
SELECT e.id FROM events AS e
WHERE {_DUE} AND {_IS_HEAD}
ORDER BY e.seq, e.next_attempt_at
LIMIT :limit
FOR UPDATE SKIP LOCKED
"""  # noqa: S608

# Unfinished events of the given keys, to find the runs that follow the heads just claimed.
_KEY_RUNS = """
SELECT e.id, e.ordering_key, e.seq, e.status, e.next_attempt_at, e.lease_token
FROM events AS e
WHERE e.ordering_key IN :keys AND e.status <> 'completed'
"""

_MARK_CLAIMED = """
UPDATE events
SET status = 'processing', processed_at = :now, lease_owner = :owner,
    lease_token = :token, lease_expires_at = :expires
WHERE id IN :ids AND status = 'pending'
"""

_SELECT_BY_TOKEN = (
    "SELECT {cols} FROM events AS t "
    "WHERE t.id IN :ids AND t.lease_token = :token AND t.status = 'processing'"
)

_COMPLETE = """
UPDATE events
SET status = 'completed', completed_at = :now, lease_token = NULL, lease_expires_at = NULL
WHERE id IN :ids AND lease_token = :token AND status = 'processing'
"""

# Retry, final failure or release: values differ per event (one statement per event).
_SETTLE = """
UPDATE events
SET status = :status, retry_count = :retry_count, error = :error,
    next_attempt_at = :next_attempt_at, completed_at = :completed_at, metadata = :meta,
    lease_owner = :lease_owner, lease_token = NULL, lease_expires_at = NULL
WHERE id = :id AND lease_token = :token AND status = 'processing'
"""

# A row the relay cannot turn into an event (see ``_RowDecoder``), failed at once in the claim's
# transaction, or one whose outcome cannot be written (``RelayStore._settle_apart``): by ``seq``
# (its id may be what is wrong), payload and metadata as they are, in the live rows' partition.
_FAIL_UNDECODABLE = """
UPDATE events
SET status = 'failed', error = :error, retry_count = retry_count + 1, completed_at = :now,
    lease_token = NULL, lease_expires_at = NULL
WHERE seq = :seq AND lease_token = :token AND status = 'processing'
"""

# Hand-backs (outage, shutdown, the rest of a lane after a failure): nothing but the lease
# changes, so one statement for all of them; also what gives back followers a claim cannot keep.
_RELEASE = """
UPDATE events
SET status = 'pending', lease_owner = NULL, lease_token = NULL, lease_expires_at = NULL
WHERE id IN :ids AND lease_token = :token AND status = 'processing'
"""

# PostgreSQL: every retry and failure of a batch in one statement, values per row as arrays.
_PG_SETTLE_MANY = """
UPDATE events AS t
SET status = v.status, retry_count = v.retry_count, error = v.error,
    next_attempt_at = v.next_attempt_at, completed_at = v.completed_at,
    metadata = CAST(v.meta AS jsonb), lease_owner = v.lease_owner,
    lease_token = NULL, lease_expires_at = NULL
FROM unnest(CAST(:ids AS uuid[]), CAST(:statuses AS text[]), CAST(:retry_counts AS integer[]),
            CAST(:errors AS text[]), CAST(:next_attempts AS timestamptz[]),
            CAST(:completed AS timestamptz[]), CAST(:metas AS text[]), CAST(:owners AS text[]))
     AS v(id, status, retry_count, error, next_attempt_at, completed_at, meta, lease_owner)
WHERE t.id = v.id AND t.lease_token = :token AND t.status = 'processing'
"""

_RENEW = """
UPDATE events SET lease_expires_at = :expires
WHERE id IN :ids AND lease_token = :token AND status = 'processing'
"""

_PG_RECOVER = """
UPDATE events AS t
SET status = 'pending', lease_owner = NULL, lease_token = NULL, lease_expires_at = NULL,
    error = :error
WHERE t.status = 'processing' AND t.id = ANY(ARRAY(
    SELECT id FROM events
    WHERE status = 'processing' AND lease_expires_at < :now
    ORDER BY lease_expires_at
    LIMIT :limit
    FOR UPDATE SKIP LOCKED
))
RETURNING t.seq
"""

_GENERIC_EXPIRED = """
SELECT id, seq FROM events
WHERE status = 'processing' AND lease_expires_at < :now
ORDER BY lease_expires_at
LIMIT :limit
"""

_GENERIC_RECOVER = """
UPDATE events
SET status = 'pending', lease_owner = NULL, lease_token = NULL, lease_expires_at = NULL,
    error = :error
WHERE id IN :ids AND status = 'processing' AND lease_expires_at < :now
"""

_DB_NOW = {
    "postgresql": "SELECT clock_timestamp()",
    "mysql": "SELECT UTC_TIMESTAMP(6)",
    "mariadb": "SELECT UTC_TIMESTAMP(6)",
}


def _stmt(sql: str, *, expanding: Iterable[str] = (), pg: bool = False) -> sa.TextClause:
    """A text statement with typed parameters (rows it returns come as the driver gives them).

    ``expanding`` parameters take a list: ``IN :ids`` becomes one placeholder per item, except on
    PostgreSQL (``pg``), where it becomes ``= ANY(:ids)`` with one array parameter — the same
    statement text for every batch size, so the server reuses its prepared plan.
    """
    if pg:
        sql = re.sub(r"IN :(\w+)\b", r"= ANY(:\1)", sql)
        expanding = ()
    binds: list[sa.BindParameter[Any]] = [
        sa.bindparam("now", type_=UTCDateTime()),
        sa.bindparam("expires", type_=UTCDateTime()),
        sa.bindparam("next_attempt_at", type_=UTCDateTime()),
        sa.bindparam("completed_at", type_=UTCDateTime()),
        sa.bindparam("token", type_=sa.Uuid()),
        sa.bindparam("id", type_=sa.Uuid()),
        sa.bindparam("meta", type_=JSONType),
    ]
    for name in expanding:
        item_type: sa.types.TypeEngine[Any] = sa.Uuid() if name == "ids" else sa.Text()
        binds.append(sa.bindparam(name, expanding=True, type_=item_type))
    present = [b for b in binds if re.search(rf":{b.key}\b", sql)]
    return sa.text(sql).bindparams(*present)


@dataclass(slots=True)
class Claim:
    """Events claimed in one transaction under one lease token, in ``seq`` order."""

    token: uuid.UUID
    events: list[Event]
    expires_at: dt.datetime
    #: seconds the claim transaction took (for metrics)
    seconds: float = 0.0
    #: how many of the events were followers of a key claimed in the same transaction
    followers: int = 0
    #: seconds the claim statement itself took (execution and transfer, no row conversion)
    query_seconds: float = 0.0
    #: True when the scan started at the lowest seq (``floor=0``)
    full: bool = False
    #: claimed rows that could not be read as events, marked ``failed`` in the claim
    undeliverable: list[Undeliverable] = field(default_factory=list)


@dataclass(slots=True)
class Outcome:
    """What happens to one claimed event when its batch is settled."""

    event: Event
    status: str  # completed | pending (retry or release) | failed
    error: str | None = None
    retry_count: int | None = None  # None: unchanged
    next_attempt_at: dt.datetime | None = None  # None: unchanged
    meta: dict[str, Any] | None = None  # None: unchanged


@dataclass(slots=True)
class SettleResult:
    """How many rows each kind of settle update changed; ``lost`` were fenced out (lease lost)."""

    completed: int = 0
    settled: int = 0
    lost: list[uuid.UUID] = field(default_factory=list)
    #: events marked ``failed`` instead because their row could not take the outcome: the error
    unsettleable: dict[uuid.UUID, str] = field(default_factory=dict)


class RelayStore:
    """The relay's SQL, for PostgreSQL, SQLite and MariaDB/MySQL, on a synchronous engine.

    Methods are blocking (call them from a worker thread in async code) and each runs in one short
    transaction. Times passed to the database come from :meth:`now`, the database's clock
    estimated from this process's clock, so relays on hosts with skewed clocks agree on leases.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        owner: str,
        synchronous_commit: bool = False,
        own_engine: bool = False,
    ) -> None:
        self.engine = engine
        self.owner = owner
        self.synchronous_commit = synchronous_commit
        self.dialect = engine.dialect.name
        if self.dialect not in ("postgresql", "sqlite", "mysql", "mariadb"):
            raise ValueError(f"the relay does not support the {self.dialect!r} dialect")
        self._is_pg = self.dialect == "postgresql"
        self._is_sqlite = self.dialect == "sqlite"
        # PostgreSQL settings. The planner settings only for the claim (SET LOCAL: they must not
        # leak into other queries on these connections, e.g. a metrics sampler's). TimeZone and
        # synchronous_commit: once per connection on an engine of our own; per transaction on
        # an engine we were given (its connections are shared with the application).
        self._claim_prefix: str | None = None
        self._settle_prefix: str | None = None
        if self._is_pg:
            session = [_PG_UTC_SETTING]
            if not synchronous_commit:
                session.append(_PG_ASYNC_COMMIT_SETTING)
            claim = list(_PG_PLAN_SETTINGS)
            if own_engine:
                sql = "; ".join(f"SET {x}" for x in session)
                sa.event.listen(engine, "connect", functools.partial(_run_on_connect, sql))
            else:
                claim += session
                if not synchronous_commit:
                    self._settle_prefix = f"SET LOCAL {_PG_ASYNC_COMMIT_SETTING}"
            self._claim_prefix = "; ".join(f"SET LOCAL {x}" for x in claim)
        self._offset = 0.0  # database clock minus local clock, seconds
        # PostgreSQL: psycopg already returns uuid, parsed jsonb and aware datetimes (UTC, see
        # _PG_PLAN), so the rows skip SQLAlchemy's result processing.
        # Rows come back as the driver returns them and are decoded one by one (_RowDecoder).
        self._claim = _stmt(_PG_CLAIM if self._is_pg else _SQLITE_CLAIM)
        self._decoder = _RowDecoder(engine.dialect)
        self._fail_undecodable = _stmt(_FAIL_UNDECODABLE)
        self._mysql_pick = _stmt(_MYSQL_PICK)
        self._key_runs = _stmt(_KEY_RUNS, expanding=("keys",), pg=self._is_pg).columns(
            sa.column("id", sa.Uuid()), sa.column("ordering_key", sa.Text()),
            sa.column("seq", sa.BigInteger()), sa.column("status", sa.Text()),
            sa.column("next_attempt_at", UTCDateTime()), sa.column("lease_token", sa.Uuid()),
        )
        self._mark_claimed = _stmt(_MARK_CLAIMED, expanding=("ids",), pg=self._is_pg)
        self._select_by_token = _stmt(
            _SELECT_BY_TOKEN.format(cols=_PG_COLS if self._is_pg else _COLS),
            expanding=("ids",), pg=self._is_pg,
        )
        self._complete = _stmt(_COMPLETE, expanding=("ids",), pg=self._is_pg)
        self._settle = _stmt(_SETTLE)
        self._release = _stmt(_RELEASE, expanding=("ids",), pg=self._is_pg)
        self._pg_settle_many = _stmt(_PG_SETTLE_MANY)
        self._renew = _stmt(_RENEW, expanding=("ids",), pg=self._is_pg)
        self._pg_recover = _stmt(_PG_RECOVER)
        self._expired = _stmt(_GENERIC_EXPIRED).columns(
            sa.column("id", sa.Uuid()), sa.column("seq", sa.BigInteger())
        )
        self._recover = _stmt(_GENERIC_RECOVER, expanding=("ids",), pg=self._is_pg)

    # -- clock ------------------------------------------------------------------------------

    def sync_clock(self) -> float:
        """Measure the database clock's offset from ours (seconds); SQLite shares our clock."""
        sql = _DB_NOW.get(self.dialect)
        if sql is None:
            self._offset = 0.0
            return 0.0
        with self.engine.connect() as conn:
            before = time.time()
            value = conn.exec_driver_sql(sql).scalar_one()
            after = time.time()
        if value.tzinfo is None:
            value = value.replace(tzinfo=dt.UTC)
        self._offset = value.timestamp() - (before + after) / 2
        return self._offset

    def now(self) -> dt.datetime:
        """The database's current time (UTC), estimated."""
        return dt.datetime.fromtimestamp(time.time() + self._offset, dt.UTC)

    # -- claim ------------------------------------------------------------------------------

    def claim(self, limit: int, *, lease: float, floor: int = 0) -> Claim:
        """Claim up to ``limit`` due events (heads of their keys, then followers) with one lease."""
        token = uuid.uuid4()
        started = time.perf_counter()
        now = self.now()
        expires = now + dt.timedelta(seconds=lease)
        params = {"now": now, "expires": expires, "owner": self.owner, "token": token,
                  "limit": limit, "floor": floor}

        def transaction() -> tuple[list[Event], list[Event], list[Undeliverable], float]:
            with self._begin() as conn:
                if self._claim_prefix:
                    conn.exec_driver_sql(self._claim_prefix)
                q0 = time.perf_counter()
                if self._is_pg or self._is_sqlite:
                    result = conn.execute(self._claim, params)
                    query_seconds = time.perf_counter() - q0
                    rows = result.all()
                else:
                    ids = [r[0] for r in conn.execute(self._mysql_pick, params)]
                    query_seconds = time.perf_counter() - q0
                    rows = self._mark_and_load(conn, ids, params) if ids else []
                events, bad = self._decoder.decode(rows)
                followers: list[Event] = []
                room = limit - len(events) - len(bad)
                keys = {e.ordering_key for e in events if e.ordering_key is not None}
                if room > 0 and keys:
                    followers = self._claim_followers(conn, keys, room, params, bad)
                if bad:
                    events, followers = self._fail_rows(conn, bad, events, followers, params)
            return events, followers, bad, query_seconds

        events, followers, bad, query_seconds = retrying(transaction, what="claim")
        events.extend(followers)
        events.sort(key=_seq)
        return Claim(token=token, events=events, expires_at=expires,
                     seconds=time.perf_counter() - started, followers=len(followers),
                     query_seconds=query_seconds, full=floor == 0, undeliverable=bad)

    def _fail_rows(
        self, conn: Connection, bad: list[Undeliverable], events: list[Event],
        followers: list[Event], params: dict[str, Any],
    ) -> tuple[list[Event], list[Event]]:
        """Mark the undecodable rows ``failed`` (in the claim's transaction) and give back the
        claimed events that follow one of them in its key: a failed event holds its key."""
        conn.execute(self._fail_undecodable, [
            {"seq": b.seq, "error": b.error, "token": params["token"], "now": params["now"]}
            for b in bad
        ])
        first_bad: dict[str, int] = {}
        for b in bad:
            if b.ordering_key is not None:
                first_bad[b.ordering_key] = min(b.seq, first_bad.get(b.ordering_key, b.seq))
        if not first_bad:
            return events, followers

        def held(e: Event) -> bool:
            key = e.ordering_key
            return key is not None and key in first_bad and e.seq > first_bad[key]

        back = [e.id for e in (*events, *followers) if held(e)]
        if back:
            self._unclaim(conn, back, params["token"])
        return ([e for e in events if not held(e)], [e for e in followers if not held(e)])

    def _mark_and_load(self, conn: Connection, ids: list[Any], params: dict[str, Any]) -> list[Any]:
        conn.execute(self._mark_claimed, {**params, "ids": ids})
        return list(
            conn.execute(self._select_by_token, {"ids": ids, "token": params["token"]}).all()
        )

    def _claim_followers(
        self, conn: Connection, keys: set[str], room: int, params: dict[str, Any],
        bad: list[Undeliverable],
    ) -> list[Event]:
        """Claim the pending, due events that directly follow our heads in their keys.

        A follower qualifies when every older unfinished event of its key is ours (claimed in
        this transaction) or a follower that qualifies; the run of a key stops at the first event
        that is not pending and due.
        """
        token, now = params["token"], params["now"]
        runs = sorted(conn.execute(self._key_runs, {"keys": sorted(keys)}).all(),
                      key=lambda r: r[2])  # by seq (sorted here: no sort in the claim's session)
        broken: set[str] = set()
        picked: list[tuple[int, Any]] = []
        for row_id, key, seq, status, next_at, row_token in runs:
            if key in broken:
                continue
            if row_token == token:
                continue  # our head
            due = next_at is None or next_at <= now
            if status == PENDING and due:
                picked.append((seq, row_id))
            else:
                broken.add(key)
        if not picked:
            return []
        picked.sort(key=lambda p: p[0])
        ids = [row_id for _, row_id in picked[:room]]
        if self._is_pg or self._is_sqlite:
            changed = conn.execute(self._mark_claimed, {**params, "ids": ids}).rowcount
            if changed != len(ids):
                # Something else changed one of them meanwhile: a gap could break the key's
                # order, so give the followers back (the heads stay claimed).
                self._unclaim(conn, ids, token)
                return []
            rows = conn.execute(self._select_by_token, {"ids": ids, "token": token}).all()
        else:
            rows = self._mark_and_load(conn, ids, params)
            if len(rows) != len(ids):
                self._unclaim(conn, ids, token)
                return []
        events, undecodable = self._decoder.decode(rows)
        bad.extend(undecodable)
        return events

    def _unclaim(self, conn: Connection, ids: list[Any], token: uuid.UUID) -> int:
        return int(conn.execute(self._release, {"ids": ids, "token": token}).rowcount)

    # -- settle -----------------------------------------------------------------------------

    def finish(self, token: uuid.UUID, outcomes: Sequence[Outcome]) -> SettleResult:
        """Write the outcome of every event of a claim in one transaction, fenced by ``token``.

        Completed events go in one ``UPDATE``; retries, failures and releases (values differ per
        event) in one ``UPDATE`` each, in the same transaction. Events whose lease was taken
        over are reported in ``lost``.
        """
        result = SettleResult()
        if not outcomes:
            return result
        now = self.now()
        try:
            self._settle_together(token, outcomes, now, result)
        except sa.exc.DBAPIError:
            # Not a passing conflict (``retrying`` handles those): a row's own value may be what
            # the statement cannot write (e.g. one too long for an index of the history).
            self._settle_apart(token, outcomes, now, result)
        if result.completed + result.settled + len(result.unsettleable) != len(outcomes):
            result.lost = self._lost(token, [o.event.id for o in outcomes])
        return result

    def _settle_together(
        self, token: uuid.UUID, outcomes: Sequence[Outcome], now: dt.datetime,
        result: SettleResult,
    ) -> None:
        """Every outcome in one transaction (``result`` counts are set only once it commits):
        one statement per kind — completions, hand-backs, and (PostgreSQL) retries and failures,
        whose values differ per row; elsewhere those go one statement per row."""
        done = [o.event.id for o in outcomes if o.status == COMPLETED]
        back = [o.event.id for o in outcomes if _handed_back(o)]
        params = [self._settle_params(o, token, now) for o in outcomes
                  if o.status != COMPLETED and not _handed_back(o)]

        def transaction() -> tuple[int, int]:
            with self._begin() as conn:
                if self._settle_prefix:
                    conn.exec_driver_sql(self._settle_prefix)
                completed = 0
                if done:
                    completed = conn.execute(
                        self._complete, {"ids": done, "token": token, "now": now}
                    ).rowcount
                changed = self._unclaim(conn, back, token) if back else 0
                if self._is_pg and params:
                    many = _as_arrays(params, token)
                    changed += conn.execute(self._pg_settle_many, many).rowcount
                else:
                    for p in params:  # executemany hides per-row counts on some drivers
                        changed += conn.execute(self._settle, p).rowcount
                return completed, changed

        completed, settled = retrying(transaction, what="settle")
        result.completed += completed
        result.settled += settled

    def _settle_apart(
        self, token: uuid.UUID, outcomes: Sequence[Outcome], now: dt.datetime,
        result: SettleResult,
    ) -> None:
        """The batch's settle failed: settle each event on its own, so that the one whose row
        cannot take its outcome is marked ``failed`` where it is (with the database's reason)
        and the others are settled. If even that fails the database is in trouble, not a row:
        the error propagates and the caller retries the batch (settled rows are fenced)."""
        for o in outcomes:
            try:
                self._settle_together(token, [o], now, result)
                continue
            except sa.exc.DBAPIError:
                pass
            try:  # once more: a connection that broke just now is not the row's fault
                self._settle_together(token, [o], now, result)
                continue
            except sa.exc.DBAPIError as exc:
                reason = _reason(exc)
            error = f"cannot be settled as {o.status}: {reason}"

            def transaction(o: Outcome = o, error: str = error) -> int:
                with self._begin() as conn:
                    return int(conn.execute(self._fail_undecodable, {
                        "seq": o.event.seq, "error": error, "token": token, "now": now,
                    }).rowcount)

            if retrying(transaction, what="settle"):
                result.unsettleable[o.event.id] = error

    def _settle_params(self, o: Outcome, token: uuid.UUID, now: dt.datetime) -> dict[str, Any]:
        e = o.event
        final = o.status == FAILED
        return {
            "id": e.id,
            "token": token,
            "status": o.status,
            "retry_count": e.retry_count if o.retry_count is None else o.retry_count,
            "error": o.error if o.error is not None else e.error,
            "next_attempt_at": o.next_attempt_at or e.next_attempt_at or now,
            "completed_at": now if final else None,
            "meta": e.meta if o.meta is None else o.meta,
            "lease_owner": e.lease_owner if final else None,
        }

    def _lost(self, token: uuid.UUID, ids: list[uuid.UUID]) -> list[uuid.UUID]:
        """Ids among ``ids`` that no longer carry ``token`` (or were just settled by us)."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                _stmt("SELECT id, lease_token FROM events WHERE id IN :ids",
                      expanding=("ids",), pg=self._is_pg).columns(
                    sa.column("id", sa.Uuid()), sa.column("lease_token", sa.Uuid())),
                {"ids": ids},
            ).all()
        # settled rows have their token cleared too, so only rows someone else holds count.
        return [r[0] for r in rows if r[1] is not None and r[1] != token]

    def renew(self, token: uuid.UUID, ids: Sequence[uuid.UUID], *, lease: float) -> int:
        """Push the lease expiry of our still-unsettled events; returns how many we still hold."""
        if not ids:
            return 0
        expires = self.now() + dt.timedelta(seconds=lease)
        params = {"ids": list(ids), "token": token, "expires": expires}

        def transaction() -> int:
            with self._begin() as conn:
                return int(conn.execute(self._renew, params).rowcount)

        return retrying(transaction, what="lease renewal")

    def recover_expired(self, limit: int = 1000) -> list[int]:
        """Hand events whose lease expired (their relay died) back to ``pending``; their seqs.

        Not counted as a retry: the relay failed, not the event.
        """
        now = self.now()
        error = "lease expired before its relay settled the event; re-queued"

        def transaction() -> list[int]:
            with self._begin() as conn:
                if self._is_pg:
                    rows = conn.execute(self._pg_recover,
                                        {"now": now, "limit": limit, "error": error}).all()
                    return [r[0] for r in rows]
                found = conn.execute(self._expired, {"now": now, "limit": limit}).all()
                if not found:
                    return []
                conn.execute(self._recover, {"ids": [r[0] for r in found], "now": now,
                                             "error": error})
                return [r[1] for r in found]

        return retrying(transaction, what="lease recovery")

    # -- inspection (metrics, CLI) ----------------------------------------------------------

    def backlog(self) -> tuple[int, dt.datetime | None]:
        """Pending events and the ``created_at`` of the oldest one (:func:`.operator.backlog`)."""
        with self.engine.connect() as conn:
            found = operator.backlog(conn)
        return found.pending, found.oldest_pending_at

    def blocked_keys(self, limit: int = 100) -> list[tuple[str, int, int]]:
        """Keys held back by a ``failed`` event: (key, oldest failed seq, failed count)
        (:func:`outbox._sql.operator.blocked_keys`)."""
        with self.engine.connect() as conn:
            return operator.blocked_keys(conn, limit)

    # -- plumbing ---------------------------------------------------------------------------

    def _begin(self) -> Any:
        return self.engine.begin()


def _run_on_connect(sql: str, dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(sql)
    finally:
        cursor.close()
    dbapi_connection.commit()


@dataclass(slots=True)
class Undeliverable:
    """A claimed row that is no event the relay can deliver (see :class:`_RowDecoder`)."""

    seq: int
    ordering_key: str | None
    error: str


class _RowDecoder:
    """Claimed rows → events, one row at a time, so that a row no writer of this package would
    produce (inserted by hand, another service, a bad migration) fails alone: JSON nested deeper
    than a parser goes, ``metadata`` that is no object, a timestamp outside Python's range, a
    value the dialect's type cannot read. Its batch-mates are delivered.

    PostgreSQL: psycopg returns every column typed except the JSON columns (text here, parsed
    with :func:`outbox._json.loads`, as the engine's jsonb loader would); other dialects return
    driver values that go through each column type's result processing.
    """

    def __init__(self, dialect: sa.Dialect) -> None:
        pg = dialect.name == "postgresql"
        procs: list[Any] = []
        for col in _RESULT_COLUMNS:
            if col.name in _JSON_COLUMNS:
                procs.append(_json.loads_column)
            elif pg:
                procs.append(None)
            else:
                procs.append(col.type.dialect_impl(dialect).result_processor(dialect, None))
        self._procs = tuple(procs)
        self._decoded = tuple((i, p) for i, p in enumerate(procs) if p is not None)
        self._seq = COLUMNS.index("seq")
        self._key = COLUMNS.index("ordering_key")
        self._meta = COLUMNS.index("metadata")
        self._required = tuple(COLUMNS.index(c) for c in ("created_at", "next_attempt_at"))

    def decode(self, rows: Sequence[Any]) -> tuple[list[Event], list[Undeliverable]]:
        events: list[Event] = []
        bad: list[Undeliverable] = []
        for row in rows:
            values = list(row)
            column = ""
            try:
                for i, proc in self._decoded:
                    column = COLUMNS[i]
                    values[i] = proc(values[i])
            except Exception as exc:  # whatever the value did: this row's failure, not the batch's
                problem: str | None = f"{column} cannot be read: {_describe(exc)}"
            else:
                problem = self._problem(values)
            if problem is None:
                events.append(Event._from_row(values))
                continue
            bad.append(Undeliverable(seq=int(row[self._seq]), ordering_key=row[self._key],
                                     error=f"undeliverable row: {problem}"))
        return events, bad

    def _problem(self, values: list[Any]) -> str | None:
        for i in self._required:
            if values[i] is None:  # NULL only when out of range (_PG_TIME_RANGE)
                return f"{COLUMNS[i]} is outside the years 1-9999"
        meta = values[self._meta]
        if not isinstance(meta, dict):
            return f"metadata is not a JSON object but {type(meta).__name__}"
        return None


def _handed_back(o: Outcome) -> bool:
    """Back to ``pending`` with nothing but the lease changed (no retry, error or progress)."""
    return (o.status == PENDING and o.retry_count is None and o.error is None
            and o.next_attempt_at is None and o.meta is None)


def _as_arrays(params: Sequence[dict[str, Any]], token: uuid.UUID) -> dict[str, Any]:
    """Per-row settle parameters as the arrays of ``_PG_SETTLE_MANY``."""
    return {
        "token": token,
        "ids": [p["id"] for p in params],
        "statuses": [p["status"] for p in params],
        "retry_counts": [p["retry_count"] for p in params],
        "errors": [p["error"] for p in params],
        "next_attempts": [p["next_attempt_at"] for p in params],
        "completed": [p["completed_at"] for p in params],
        "metas": [_json.dumps_safe(p["meta"]) for p in params],
        "owners": [p["lease_owner"] for p in params],
    }


def _reason(exc: sa.exc.DBAPIError) -> str:
    """The first line of the driver's message (no statement, no parameters)."""
    text = str(exc.orig).strip() if exc.orig is not None else ""
    return (text.splitlines()[0] if text else type(exc).__name__)[:500]


def _describe(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= 500 else text[:497] + "..."


def _seq(event: Event) -> int:
    return event.seq
