"""Consumer groups over the events table: claims of event ranges, deliveries, settling.

A member of a group (one ``consume()`` iterator) works on *claims*: ranges ``(lo, hi]`` of the
bus, taken from the group's frontier under a short lock of the group row and leased in
``outbox_consumer_claims``. Members of one group never hold overlapping ranges, so in normal
operation an event reaches one member once. A member that dies stops renewing its leases; another
member takes the expired range over and delivers what was not recorded as done.

Progress inside a claim is the acknowledged prefix of its events (``lo`` moves up to the last event
before the first unsettled one). It is written with each lease renewal, when the claim finishes,
and — the exactly-once path — in the handler's own transaction by :meth:`DatabaseDelivery.ack_in`.

A member that crashes on an event (the process dies inside the handler) is detected by its lease
running out. ``attempt`` counts the takes of a range since its progress last moved. A range taken
a third time without progress (:data:`SERIAL_FROM`) is handed out one event at a time, each
settlement recorded at once, so a member that dies then died on the first unsettled event. When
that event has been taken more than ``max_deliveries`` times (and at least once alone) it is
parked in ``outbox_dead_letters`` — as Redis and NATS consumers park an entry delivered too
often — and the rest of the range is delivered as usual.
"""

from __future__ import annotations

import datetime as dt
import functools
import heapq
import itertools
import logging
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import anyio
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from outbox._sql import bus as sql
from outbox._sql.bus import Position
from outbox.events import Event
from outbox.exceptions import ProviderError, ProviderUnavailable
from outbox.providers._bus import Backoff, OutageLog, exhausted
from outbox.providers.base import StartPosition

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

    from outbox.providers.database.provider import DatabaseProvider

__all__ = ["DatabaseDelivery"]

log = logging.getLogger("outbox.providers.database")

#: From this take of a range without progress on, its events are handed out one at a time (the
#: first two takes are concurrent: a crash or restart unrelated to the events recovers at speed).
SERIAL_FROM = 3


class Signal:
    """Wakes waiting readers: a generation counter plus an event replaced on every fire."""

    def __init__(self) -> None:
        self.generation = 0
        self._event = anyio.Event()

    def fire(self) -> None:
        self.generation += 1
        self._event.set()
        self._event = anyio.Event()

    async def wait(self, seen: int, seconds: float) -> None:
        """Return at the first fire after generation ``seen``, or after ``seconds``."""
        if self.generation != seen:
            return
        event = self._event
        with anyio.move_on_after(max(0.0, seconds)):
            await event.wait()


class _Entry:
    __slots__ = ("event", "index", "pos", "settled")

    def __init__(self, pos: Position, event: Event, index: int) -> None:
        self.pos = pos
        self.event = event
        self.index = index
        self.settled = False


@dataclass(eq=False)
class _Claim:
    group: str
    lo: Position
    hi: Position
    token: uuid.UUID
    attempt: int
    entries: list[_Entry] = field(default_factory=list)
    head: int = 0  # index of the first unsettled entry
    lost: bool = False
    finishing: bool = False
    #: Hand out one entry at a time and record each settlement at once: a member died holding
    #: this range, the next crash must point at one event.
    serial: bool = False
    handed: bool = False  # an entry went to a handler

    def progress(self) -> Position:
        """Everything up to this position is settled."""
        return self.entries[self.head - 1].pos if self.head else self.lo

    def settle(self, entry: _Entry) -> None:
        entry.settled = True
        while self.head < len(self.entries) and self.entries[self.head].settled:
            self.head += 1

    def unsettle(self, entry: _Entry) -> None:
        entry.settled = False
        self.head = min(self.head, entry.index)

    @property
    def complete(self) -> bool:
        return self.head >= len(self.entries)


class DatabaseDelivery:
    """One event handed to a member of a consumer group; settle it once (ack, nack or park).

    Exactly-once effect when the handler writes to the same database: call :meth:`ack_in` (or
    :meth:`ack_with` from async code) with the handler's connection or session *before* its own
    writes; it records the event in ``outbox_inbox`` and advances the group's cursor in that
    transaction. False means the group already handled this event: skip the effect. After the
    commit, call :meth:`ack` as usual.
    """

    __slots__ = ("_claim", "_entry", "_reader", "_settled", "attempt", "event", "group",
                 "last_error")

    def __init__(self, reader: _GroupReader, claim: _Claim, entry: _Entry, attempt: int,
                 last_error: str | None = None) -> None:
        self.event: Event = entry.event
        self.attempt = attempt
        self.group = claim.group
        self.last_error = last_error
        self._reader = reader
        self._claim = claim
        self._entry = entry
        self._settled: str | None = None

    def __repr__(self) -> str:
        return (f"<DatabaseDelivery {self.event.type} id={self.event.id} group={self.group!r} "
                f"attempt={self.attempt}>")

    @property
    def settled(self) -> bool:
        return self._settled is not None

    @property
    def position(self) -> Position:
        """The event's place in the bus, ``(txid, seq)``."""
        return self._entry.pos

    async def ack(self) -> None:
        """The handler succeeded: never deliver this event to this group again.

        Raises :class:`ProviderUnavailable` when the database cannot record the end of the claim
        this event closes; the delivery then stays unsettled and the call can be repeated.
        """
        self._check("ack")
        await self._reader.ack(self)
        self._settled = "ack"

    async def nack(self, error: str, *, delay: float = 0.0) -> None:
        """The handler failed: deliver it again (to this member) after ``delay`` seconds."""
        self._check("nack")
        self._settled = "nack"
        self._reader.nack(self, error, delay)

    async def park(self, error: str) -> None:
        """Give up: record it in ``outbox_dead_letters`` for this group; never deliver it again."""
        self._check("park")
        await self._reader.park(self, error)
        self._settled = "park"

    def ack_in(self, connection: Connection | Session) -> bool:
        """Record this event as handled inside the caller's transaction (same database).

        Inserts ``(group, event id)`` into ``outbox_inbox`` and, when every earlier event of this
        member's claim is settled, moves the claim's lower bound — the group's cursor for that
        range — past this event, both in ``connection``'s transaction. Returns False when the
        inbox already had the event (handled before, e.g. by a member that died after its commit):
        the handler must then skip its effect. Does not settle the delivery: call :meth:`ack`
        after the commit (or :meth:`nack` after a rollback).
        """
        if self._settled is not None:
            raise ProviderError(f"delivery of {self.event.id} already settled ({self._settled})")
        conn = connection.connection() if isinstance(connection, Session) else connection
        return self._reader.ack_in(self, conn)

    async def ack_with(self, connection: AsyncConnection | AsyncSession) -> bool:
        """:meth:`ack_in` for an ``AsyncConnection`` or ``AsyncSession`` (same database)."""
        from sqlalchemy.ext.asyncio import AsyncSession

        if isinstance(connection, AsyncSession):
            return await connection.run_sync(lambda s: self.ack_in(s))
        return await connection.run_sync(lambda c: self.ack_in(c))

    def _check(self, how: str) -> None:
        if self._settled is not None:
            raise ProviderError(f"delivery of {self.event.id} already settled ({self._settled}); "
                                f"cannot {how} it")


@dataclass(order=True)
class _Due:
    due: float
    order: int
    delivery: DatabaseDelivery = field(compare=False)


@dataclass(frozen=True, slots=True)
class _Fetched:
    claim: sql.ClaimRow | None
    events: list[tuple[Position, Event]]
    missing: bool = False
    parked: int = 0  # events parked because they were taken more than max_deliveries times


class _GroupReader:
    """One member of one consumer group: claims, hands out, redelivers and keeps leases."""

    _order = itertools.count()

    def __init__(self, provider: DatabaseProvider, pattern: str, group: str, consumer: str,
                 start: StartPosition | dt.datetime) -> None:
        self.p = provider
        self.pattern = pattern
        self.group = group
        self.consumer = consumer
        self.start = start
        self.signal = Signal()
        self.claims: dict[uuid.UUID, _Claim] = {}
        self.ready: deque[DatabaseDelivery] = deque()
        self.delayed: list[_Due] = []
        self.group_ready = False
        self.closed = False
        self.backoff = Backoff(initial=0.05, maximum=5.0)
        self.outage = OutageLog(log, f"database bus (group {group!r})")

    # -- handing out ---------------------------------------------------------------------------

    async def next(self) -> DatabaseDelivery:
        while True:
            if self.closed:
                raise ProviderError(f"consumer of group {self.group!r} is closed")
            self._move_due()
            while self.ready:
                delivery = self.ready.popleft()
                if not delivery._claim.lost:
                    delivery._claim.handed = True
                    return delivery
            seen = self.signal.generation
            wait = self.p.poll_interval
            if len(self.claims) < self.p.max_claims:
                try:
                    # Shielded: a claim made in the worker thread must reach this member even
                    # when the caller is cancelled meanwhile (it is handed out next time).
                    with anyio.CancelScope(shield=True):
                        if not self.group_ready:
                            await self._open()
                        elif not self.p._cluster_known:  # look again after an outage
                            await self.p._cluster()
                        fetched = await self.p._call(self._fetch)
                        if fetched.claim is not None and fetched.events:
                            if self.closed:  # closed meanwhile: give it back at once
                                await self.p._tx(functools.partial(
                                    sql.release, handed=False), self.group, fetched.claim.hi,
                                    fetched.claim.token, fetched.claim.lo)
                            else:
                                self._accept(fetched.claim, fetched.events)
                except ProviderUnavailable as exc:
                    self.outage.down(exc)
                    self.p._forget_cluster()
                    await anyio.sleep(self.backoff.next())
                    continue
                self.outage.up()
                self.backoff.reset()
                if fetched.missing:
                    log.warning("consumer group %r vanished; creating it again", self.group)
                    self.group_ready = False
                    continue
                if fetched.parked:
                    self.p._parked += fetched.parked
                    if not fetched.events:
                        continue  # the range is done: look for more at once
                if fetched.claim is not None and fetched.events:
                    await self.p._busy()
                    continue
            if self.delayed:
                wait = min(wait, self.delayed[0].due - time.monotonic())
            await self.p._rest(self.signal, seen, wait)

    async def _open(self) -> None:
        cluster = await self.p._cluster()
        created = await self.p._tx(sql.ensure_group, self.group, self.start, cluster)
        if created:
            log.info("created consumer group %r (start: %s)", self.group,
                     self.start.isoformat() if isinstance(self.start, dt.datetime)
                     else StartPosition(self.start).value)
        self.group_ready = True

    def _fetch(self, conn: Connection) -> _Fetched:
        """Worker thread: look (no lock), then take over an expired claim or claim new events."""
        with conn.begin():
            peek = sql.peek(conn, self.group)
        if not peek.exists:
            return _Fetched(None, [], missing=True)
        sql.check_cluster(self.group, peek.cluster_id, self.p._cluster_cached)
        sql.check_xids(self.group, peek.frontier_xid, peek.next_xid)
        if peek.expired:
            parked = 0
            with conn.begin():
                taken = sql.take_expired(conn, self.group, self.consumer, self.pattern,
                                         self.p.lease)
                if (taken is not None and taken[1]
                        and taken[0].attempt > max(self.p.max_deliveries, SERIAL_FROM)):
                    taken = self._park_head(conn, *taken)
                    parked = 1
            if taken is not None:
                claim, found = taken
                if not parked:
                    log.info("took over events (%s, %s] of group %r from a member whose lease "
                             "expired (delivery %d)", claim.lo, claim.hi, self.group,
                             claim.attempt)
                return _Fetched(claim, found, parked=parked)
        if not peek.ready:
            return _Fetched(None, [])
        with conn.begin():
            claim_row, claimed = sql.claim_next(conn, self.group, self.consumer, self.pattern,
                                                self.p.batch_size, self.p.lease)
        if claimed is None:
            return _Fetched(None, [], missing=True)
        return _Fetched(claim_row, claimed)

    def _park_head(self, conn: Connection, claim: sql.ClaimRow,
                   found: list[tuple[Position, Event]]
                   ) -> tuple[sql.ClaimRow, list[tuple[Position, Event]]]:
        """Worker thread, in the take-over transaction: park the first unsettled event of a
        range taken more than ``max_deliveries`` times (the last of them alone, so its member
        died on it); the rest is a fresh range."""
        pos, event = found[0]
        error = exhausted(claim.attempt, self.p.max_deliveries, None) or ""
        error += " (its consumer stopped without settling it each time: crashed or killed)"
        sql.park(conn, self.group, event.id, error, claim.attempt - 1)
        sql.advance(conn, self.group, claim.hi, claim.token, pos)  # progress: attempt is 1
        log.error("parked event %s (%s) of group %r in outbox_dead_letters: %s", event.id,
                  event.type, self.group, error)
        rest = found[1:]
        if not rest:
            sql.finish(conn, self.group, claim.hi, claim.token)
        return sql.ClaimRow(pos, claim.hi, claim.token, 1), rest

    def _accept(self, row: sql.ClaimRow, found: list[tuple[Position, Event]]) -> None:
        claim = _Claim(self.group, row.lo, row.hi, row.token, row.attempt,
                       serial=row.attempt >= SERIAL_FROM)
        claim.entries = [_Entry(pos, event, i) for i, (pos, event) in enumerate(found)]
        self.claims[claim.token] = claim
        for entry in claim.entries[:1] if claim.serial else claim.entries:
            self.ready.append(DatabaseDelivery(self, claim, entry, row.attempt))

    def _move_due(self) -> None:
        now = time.monotonic()
        while self.delayed and self.delayed[0].due <= now:
            item = heapq.heappop(self.delayed)
            if not item.delivery._claim.lost:
                self.ready.append(item.delivery)

    # -- settling ------------------------------------------------------------------------------

    async def ack(self, delivery: DatabaseDelivery) -> None:
        await self._settle(delivery)
        self.p._consumed += 1

    def nack(self, delivery: DatabaseDelivery, error: str, delay: float) -> None:
        claim = delivery._claim
        if claim.lost or self.closed or claim.token not in self.claims:
            return  # another member has the range now (or it was given back on close)
        again = DatabaseDelivery(self, claim, delivery._entry, delivery.attempt + 1, error)
        heapq.heappush(self.delayed, _Due(time.monotonic() + max(0.0, delay), next(self._order),
                                          again))
        self.signal.fire()

    async def park(self, delivery: DatabaseDelivery, error: str) -> None:
        await self.p._tx(sql.park, self.group, delivery.event.id, error, delivery.attempt)
        self.p._parked += 1
        await self._settle(delivery)

    async def _settle(self, delivery: DatabaseDelivery) -> None:
        claim = delivery._claim
        entry = delivery._entry
        claim.settle(entry)
        if claim.serial and not claim.complete and not claim.lost:
            try:  # the next one only once this one is recorded
                await self.p._tx(sql.advance, self.group, claim.hi, claim.token,
                                 claim.progress())
            except BaseException:
                claim.unsettle(entry)
                raise
            claim.attempt = 1  # recorded progress: the rest counts afresh (as in the table)
            head = claim.entries[claim.head]
            self.ready.append(DatabaseDelivery(self, claim, head, claim.attempt))
            self.signal.fire()
            return
        if not claim.complete or claim.finishing:
            return
        if claim.lost or claim.token not in self.claims:
            self.claims.pop(claim.token, None)
            return
        claim.finishing = True
        try:
            await self.p._tx(sql.finish, self.group, claim.hi, claim.token)
        except BaseException:
            claim.finishing = False
            claim.unsettle(entry)
            raise
        self.claims.pop(claim.token, None)
        self.signal.fire()  # room for another claim

    def ack_in(self, delivery: DatabaseDelivery, conn: Connection) -> bool:
        from outbox.inbox import record  # the inbox module owns outbox_inbox's insert

        first = record(conn, self.group, delivery.event.id)
        claim = delivery._claim
        if not claim.lost and delivery._entry.index == claim.head:
            sql.advance(conn, self.group, claim.hi, claim.token, delivery._entry.pos)
        return first

    # -- leases --------------------------------------------------------------------------------

    def held(self) -> list[_Claim]:
        return [c for c in self.claims.values() if not c.lost]

    def lost(self, claim: _Claim) -> None:
        if claim.lost:
            return
        claim.lost = True
        self.claims.pop(claim.token, None)
        log.warning("events (%s, %s] of group %r were taken over by another member while this "
                    "one held them (lease of %.1f s not renewed in time)", claim.lo, claim.hi,
                    self.group, self.p.lease)
        self.signal.fire()

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        held = self.held()
        self.claims.clear()
        self.ready.clear()
        self.delayed.clear()
        if not held:
            return
        with anyio.CancelScope(shield=True):
            for claim in held:
                try:
                    await self.p._tx(functools.partial(sql.release, handed=claim.handed),
                                     self.group, claim.hi, claim.token, claim.progress())
                except Exception as exc:  # the lease runs out on its own
                    log.debug("could not give back claim %s of group %r: %s", claim.hi,
                              self.group, exc)


class _Tail:
    """``stream(pattern)`` without a group: a cursor in memory, starting at "now"."""

    def __init__(self, provider: DatabaseProvider, pattern: str, start: sql.Cursor) -> None:
        self.p = provider
        self.pattern = pattern
        self.cursor = start
        self.buffer: deque[Event] = deque()
        self.signal = Signal()
        self.closed = False
        self.backoff = Backoff(initial=0.05, maximum=5.0)
        self.outage = OutageLog(log, "database bus (stream)")

    async def next(self) -> Event:
        while True:
            if self.closed:
                raise ProviderError("stream is closed")
            if self.buffer:
                return self.buffer.popleft()
            seen = self.signal.generation
            try:
                with anyio.CancelScope(shield=True):  # what was read is not dropped
                    found, self.cursor = await self.p._tx(sql.read_next, self.cursor,
                                                          self.p.batch_size, self.pattern)
                    self.buffer.extend(event for _pos, event in found)
            except ProviderUnavailable as exc:
                self.outage.down(exc)
                await anyio.sleep(self.backoff.next())
                continue
            self.outage.up()
            self.backoff.reset()
            if found:
                await self.p._busy()
                continue
            await self.p._rest(self.signal, seen, self.p.poll_interval)

    async def close(self) -> None:
        self.closed = True
