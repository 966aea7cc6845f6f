"""The relay loop: claim → handlers → provider → settle, with leases, wake-ups and shutdown.

One batch is in hand at a time; the next one is claimed while the current one is dispatched
(when the relay is busy), but it is dispatched only after the current batch's outcomes are
committed — so a relay killed at any instant has run the handlers of at most one unsettled batch.
All SQL is in :class:`~outbox._sql.relay.RelayStore`, run in worker threads; the loop never holds
a database transaction open while handlers or the provider run.
"""

from __future__ import annotations

import functools
import logging
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
import sqlalchemy as sa
from sqlalchemy.engine import URL, Engine

from outbox._engines import create_engine, engine_args
from outbox._redact import url_text
from outbox._retry import RetryPolicy
from outbox._sql.ddl import storage_outdated
from outbox._sql.relay import COMPLETED, FAILED, Claim, Outcome, RelayStore
from outbox._wakeup import Idle, IdleLock
from outbox.events import get_instance_id
from outbox.exceptions import (
    DatabaseUnavailable,
    ProviderUnavailable,
    SchemaMissing,
)
from outbox.providers.base import Publisher
from outbox.relay._gc import DEFAULT_GC_THRESHOLD, young_gc_threshold
from outbox.relay.dispatch import BatchResult, Dispatcher
from outbox.relay.listener import PgListener, conninfo_from_url
from outbox.relay.stats import RelayHooks, RelayStats
from outbox.schema import MIGRATE_HINT, check_schema, create_schema

if TYPE_CHECKING:
    from outbox.broker import Broker

__all__ = ["DEFAULT_DATABASE_URL", "DatabaseUnavailable", "Relay"]

log = logging.getLogger("outbox.relay")

#: The embedded default: a SQLite file in the working directory.
DEFAULT_DATABASE_URL = "sqlite:///outbox.db"

_T = TypeVar("_T")
_UNSET: Any = object()
#: How often the relay pings a provider that is down (see ``Relay._await_provider``).
_PING_EVERY = 0.5
#: The window over which the arrival rate is measured, seconds.
_RATE_WINDOW = 0.1


class Relay:
    """Delivers committed events from the ``events`` table to handlers and a provider.

    ``database`` is a URL or an :class:`~sqlalchemy.engine.Engine` (default: SQLite ``outbox.db``
    in the working directory, whose schema is created if missing). ``broker`` runs the local
    handlers (default: the module-level default broker, see ``outbox.subscribe``); ``provider``
    receives every event after its handlers succeeded (default: the broker's provider; ``None``
    forwards nowhere).

    Use ``await relay.run()`` until ``relay.stop()``, or ``await relay.run(once=True)`` to process
    what is due and return.

    ``pgbouncer=True``: the URL points at PgBouncer in transaction pooling (no prepared
    statements, settings per transaction, no LISTEN through it: polling, or LISTEN on
    ``listen_url``, a direct connection; see :mod:`outbox._engines`).

    ``synchronous_commit=False`` (default, PostgreSQL): the relay's own status updates do not wait
    for the WAL flush; a database *server* crash can then only cause repeats of recently settled
    events, never a loss. ``create_schema`` defaults to True for SQLite only.
    """

    def __init__(
        self,
        database: str | URL | Engine | None = None,
        *,
        broker: Broker | None = None,
        provider: Publisher | None = _UNSET,
        batch_size: int = 100,
        poll_interval: float = 1.0,
        lease: float = 30.0,
        notify: bool = True,
        retry_policy: RetryPolicy | None = None,
        owner: str | None = None,
        concurrency: int = 8,
        shutdown_timeout: float | None = None,
        rescan_interval: float | None = None,
        create_schema: bool | None = None,
        synchronous_commit: bool = False,
        hooks: Iterable[RelayHooks] = (),
        pgbouncer: bool = False,
        listen_url: str | URL | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if poll_interval <= 0:
            raise ValueError("poll_interval must be > 0")
        if lease <= 0:
            raise ValueError("lease must be > 0")
        self._own_engine = not isinstance(database, Engine)
        self.engine = (database if isinstance(database, Engine)
                       else _make_engine(database, pgbouncer=pgbouncer))
        self.url = self.engine.url
        self.pgbouncer = pgbouncer
        self.owner = owner or f"{get_instance_id()}-{uuid.uuid4().hex[:6]}"
        # Settings once per connection only where a connection is ours for its lifetime: behind
        # PgBouncer each transaction may run on another server connection (SET LOCAL instead).
        self.store = RelayStore(self.engine, owner=self.owner,
                                own_engine=self._own_engine and not pgbouncer,
                                synchronous_commit=synchronous_commit)
        self.batch_size = batch_size
        self.poll_interval = poll_interval
        self.lease = lease
        # LISTEN needs a session of its own: never through PgBouncer, only on a direct URL.
        self.listen_url = (engine_args(listen_url)[0] if listen_url is not None
                           else None if pgbouncer else self.url)
        self.notify = notify and self.store.dialect == "postgresql" and self.listen_url is not None
        self.concurrency = concurrency
        self.shutdown_timeout = (
            shutdown_timeout if shutdown_timeout is not None else max(5.0, min(30.0, lease / 2))
        )
        # How often a claim scans from the start of the pending rows instead of from the floor
        # (picks up retries that became due, events handed back, and late-committing rows).
        self.rescan_interval = rescan_interval if rescan_interval is not None else max(
            1.0, poll_interval
        )
        self.create_schema = (
            create_schema if create_schema is not None else self.store.dialect == "sqlite"
        )
        self.hooks = list(hooks)
        #: events per second (claimed over the last 0.1 s) above which the relay, out of work,
        #: looks again after 1 ms rather than waiting for a NOTIFY: writers then send none
        #: (docs/relay.md, "Wake-up"); ``0`` always waits, ``inf`` never lingers
        self.linger_rate = 1000.0
        #: ... and how long it waits before it looks again (seconds)
        self.linger = 0.001
        self._arrivals: deque[tuple[float, int]] = deque()
        #: claim the next batch while the current one is dispatched and settled
        self.prefetch = True
        #: the garbage collector's first threshold while ``run`` runs (``None``: leave it);
        #: process-wide, see ``outbox/relay/_gc.py`` for why and what it costs
        self.gc_threshold: int | None = DEFAULT_GC_THRESHOLD
        self.stats = RelayStats(owner=self.owner)
        self._broker = broker
        self._provider = provider
        self._retry_policy = retry_policy
        self.dispatcher: Dispatcher | None = None
        self._started = False
        self._stopping = False
        self._wake = anyio.Event()
        self._process_scope: anyio.CancelScope | None = None
        self._processing = False
        self._settled_batches = 0
        self._probe: uuid.UUID | None = None
        self._batch_done = anyio.Event()
        self._held: dict[uuid.UUID, tuple[Claim, set[uuid.UUID]]] = {}
        self._floor = 0
        self._force_full = True
        self._next_full = 0.0
        self._outage_backoff = 0.0
        self._idle: IdleLock | None = None  # PostgreSQL with NOTIFY: see outbox/_wakeup.py
        self._pinged = False  # the provider answered a ping since the last probe batch
        self._ping_misled = False  # ... and the probe batch failed anyway: sleep, do not ping

    # -- life cycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Check the database and the schema (one-line errors), resolve broker and provider."""
        if self._started:
            return
        await anyio.to_thread.run_sync(self._check_database)
        broker = self._broker
        if broker is None:
            from outbox.broker import get_default_broker

            broker = get_default_broker()
        provider = self._provider
        if provider is _UNSET:
            provider = getattr(broker, "provider", None)
        if provider is not None and not isinstance(provider, Publisher):
            raise TypeError(f"the relay forwards to a Publisher (publish_many, publish, ping, "
                            f"stats, close), not {type(provider).__qualname__}")
        policy = self._retry_policy or getattr(broker, "retry_policy", None) or RetryPolicy()
        self.broker, self.provider, self.retry_policy = broker, provider, policy
        self.dispatcher = Dispatcher(broker, provider, retry_policy=policy, now=self.store.now,
                                     concurrency=self.concurrency)
        _log_handlers(broker)
        self._started = True
        self._set_ready(True)

    def _check_database(self) -> None:
        redacted = url_text(self.url)
        try:
            with self.engine.connect() as conn:
                if self.create_schema:
                    create_schema(conn)
                    conn.commit()
                check_schema(conn)
                _warn_if_behind(conn)
        except SchemaMissing:
            raise SchemaMissing(f"table events not found in {redacted}: {MIGRATE_HINT}") from None
        except sa.exc.DBAPIError as exc:
            reason = str(exc.orig).strip().splitlines()[0] if exc.orig else type(exc).__name__
            raise DatabaseUnavailable(f"cannot connect to {redacted}: {reason}") from None
        self.store.sync_clock()

    def stop(self, *, now: bool = False) -> None:
        """Stop claiming; finish the batch in hand, hand back the rest, return from ``run``.

        The batch in hand gets ``shutdown_timeout`` seconds (``now=True``: none); events still
        unfinished then are handed back as well. Safe to call more than once.
        """
        self._stopping = True
        self._wake.set()
        scope = self._process_scope
        if scope is not None:
            deadline = anyio.current_time() + (0 if now else self.shutdown_timeout)
            scope.deadline = min(scope.deadline, deadline)

    @property
    def stopping(self) -> bool:
        return self._stopping

    def wake(self) -> None:
        """Look for new events now (called on NOTIFY; harmless at any time)."""
        self._wake.set()

    async def run(self, *, once: bool = False) -> None:
        """Relay until :meth:`stop` (or, with ``once``, until nothing is due)."""
        await self.start()
        try:
            with young_gc_threshold(self.gc_threshold):
                await self._run(once)
        finally:
            self.stats.healthy = False
            self._set_ready(False)
            if self._own_engine:
                self.engine.dispose()

    async def _run(self, once: bool) -> None:
        async with anyio.create_task_group() as tg:
            if self.notify and not once:
                assert self.listen_url is not None
                listener = PgListener(self.listen_url, self._on_notify,
                                      on_state=self._on_listener)
                tg.start_soon(listener.run)
                self._idle = IdleLock(conninfo_from_url(self.listen_url),
                                      channel=listener.channel)
            tg.start_soon(self._maintenance)
            try:
                await self._loop(once)
            finally:
                tg.cancel_scope.cancel()
                if self._idle is not None:
                    await self._idle.close()
                    self._idle = None
        if once and self._outage_backoff:
            raise ProviderUnavailable(
                f"{self.stats.last_error}; the events it could not take wait in the table"
            )

    async def drain(self) -> None:
        """Process every event that is due now, then return (``run(once=True)``)."""
        await self.run(once=True)

    # -- the loop ---------------------------------------------------------------------------

    async def _loop(self, once: bool) -> None:
        """Hand claimed batches to :meth:`_process` one at a time.

        A claimer task claims the next batch while the current one is dispatched and settled
        (claim and settle then run on two database connections at once) and waits, holding it,
        until the loop takes it. A batch is dispatched only after the previous batch's outcomes
        are committed, so a killed relay has run the handlers of at most one unsettled batch.
        """
        send, receive = anyio.create_memory_object_stream[Claim](0)
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._claimer, send, once)
            async with receive:
                async for claim in receive:
                    self._processing = True
                    try:
                        if self._stopping or (self._outage_backoff
                                              and claim.token != self._probe):
                            await self._release(claim)  # claimed before the outage showed
                        else:
                            await self._process(claim)
                    finally:
                        self._processing = False
                        self._settled_batches += 1
                        done, self._batch_done = self._batch_done, anyio.Event()
                        done.set()

    async def _claimer(self, send: Any, once: bool) -> None:
        async with send:
            while not self._stopping:
                probe = bool(self._outage_backoff)
                if probe and once:
                    return  # --once does not wait for the provider: run() reports the outage
                if probe:  # provider down: wait, then try one batch to see if it is back
                    await self._await_provider(self._outage_backoff)
                    if self._stopping:
                        break
                if not self.prefetch and self._processing:
                    await self._batch_done.wait()
                full = self._full_due()
                self._wake = anyio.Event()
                # A batch settled while we claim may hand back or unblock events our snapshot
                # did not see: --once may only stop after an empty claim with none in hand.
                quiet_before = not self._processing
                settled_before = self._settled_batches
                claim = await self._claim(full)
                if claim is None:  # database error: logged, wait and retry
                    if once:
                        raise DatabaseUnavailable(self.stats.last_error or "database error")
                    await self._sleep(self.poll_interval)
                    continue
                if not claim.events and claim.undeliverable:
                    continue  # only rows it could not read (marked failed): there may be more
                if not claim.events:
                    if not full and not self._lingering():
                        self._force_full = True  # reached the end from the floor: look behind
                        continue
                    if once:
                        if (quiet_before and not self._processing
                                and self._settled_batches == settled_before):
                            return  # nothing due and nothing in hand: drained
                        # the batch in hand may put events back that are due at once
                        if self._processing:
                            await self._batch_done.wait()
                        self._force_full = True
                        continue
                    await self._idle_wait()
                    continue
                if self._idle is not None and self._idle.held:
                    await self._idle.leave()  # busy: writers need not wake us
                if probe:
                    self._probe = claim.token
                try:
                    await send.send(claim)
                except BaseException:
                    await self._release(claim)
                    raise
                self._processing = True  # handed over: in hand until the loop settles it

    def _full_due(self) -> bool:
        return self._force_full or time.monotonic() >= self._next_full

    async def _claim(self, full: bool) -> Claim | None:
        floor = 0 if full else self._floor
        try:
            claim = await _in_thread(self.store.claim, self.batch_size, lease=self.lease,
                                     floor=floor)
        except sa.exc.DBAPIError as exc:
            self._db_error("claim", exc)
            return None
        if full:
            self._force_full = False
            self._next_full = time.monotonic() + self.rescan_interval
        if claim.events:
            self._arrivals.append((time.monotonic(), len(claim.events)))
            self._floor = max(self._floor if not full else 0, _next_floor(claim))
            self._held[claim.token] = (claim, {e.id for e in claim.events})
        for bad in claim.undeliverable:
            log.error("event seq=%d cannot be delivered and is marked failed: %s",
                      bad.seq, bad.error)
        s = self.stats
        s.failed += len(claim.undeliverable)
        s.claims += 1
        s.claimed += len(claim.events)
        s.followers_claimed += claim.followers
        s.claim_seconds_total += claim.seconds
        s.last_claim_seconds = claim.seconds
        if not s.ready and not self._outage_backoff:
            self._set_ready(True)
        self._call_hooks("on_claim", claim)
        return claim

    async def _process(self, claim: Claim) -> None:
        assert self.dispatcher is not None
        result = BatchResult()
        self.stats.batches += 1
        with anyio.CancelScope() as scope:
            self._process_scope = scope
            if self._stopping:  # stop() came while claiming: bound the batch in hand
                scope.deadline = anyio.current_time() + self.shutdown_timeout
            try:
                await self.dispatcher.run(claim.events, result)
            finally:
                self._process_scope = None
        if scope.cancelled_caught:
            log.warning("shutdown timeout: handing back %d unfinished events",
                        len(claim.events) - len(result.outcomes))
        result.release_rest(claim.events)
        s = self.stats
        s.handled += result.handled
        s.forwarded += result.forwarded
        s.handler_errors += result.handler_errors
        s.forward_errors += result.forward_errors
        if result.forward_errors and result.first_forward_error is not None:
            self._call_hooks("on_forward_error", result.first_forward_error,
                             result.forward_errors)
        if result.outage is not None:
            self._enter_outage(result.outage)
        elif self._outage_backoff and (result.forwarded or self.provider is None):
            self._leave_outage()
        with anyio.CancelScope(shield=True):
            await self._settle(claim, [result.outcomes[e.id] for e in claim.events])

    async def _settle(self, claim: Claim, outcomes: Sequence[Outcome]) -> None:
        delay = 0.2
        deadline = time.monotonic() + self.lease
        while True:
            try:
                res = await _in_thread(self.store.finish, claim.token, outcomes)
                break
            except sa.exc.DBAPIError as exc:
                self._db_error("settle", exc)
                if time.monotonic() > deadline:
                    log.error("could not settle a batch of %d events; their lease will expire "
                              "and another relay will deliver them again", len(outcomes))
                    self._held.pop(claim.token, None)
                    return
                await anyio.sleep(delay)
                delay = min(2.0, delay * 2)
        self._held.pop(claim.token, None)
        s = self.stats
        lost = set(res.lost)
        for event_id, error in res.unsettleable.items():
            log.error("event %s is marked failed: %s", event_id, error)
        for o in outcomes:
            if o.event.id in lost:
                continue
            if o.event.id in res.unsettleable:
                s.failed += 1
            elif o.status == COMPLETED:
                s.completed += 1
            elif o.status == FAILED:
                s.failed += 1
            elif o.retry_count is not None:
                s.retried += 1
            else:
                s.released += 1
                self._force_full = True  # handed back below our floor: rescan
        if lost:
            s.lease_lost += len(lost)
            log.warning("lease lost for %d events: another relay took them over", len(lost))
        self._call_hooks("on_settled", outcomes, len(lost))

    async def _release(self, claim: Claim) -> None:
        """Hand back a claimed batch that was never started."""
        with anyio.CancelScope(shield=True):
            await self._settle(claim, [Outcome(e, "pending") for e in claim.events])

    # -- waiting and waking -----------------------------------------------------------------

    async def _wait(self, seconds: float) -> None:
        with anyio.move_on_after(seconds):
            await self._wake.wait()

    async def _idle_wait(self) -> None:
        """Nothing is due: sleep until notified (or ``poll_interval``), holding the wake-up lock
        that makes writers notify (outbox/_wakeup.py); without NOTIFY, just poll."""
        idle = self._idle
        if idle is None:
            await self._wait(self.poll_interval)
            return
        if self._lingering():
            await self._wait(self.linger)  # busy times: poll, so that writers need not notify
            return
        found = await idle.enter()
        if found is Idle.TAKEN:
            self._force_full = True  # look once more: a writer may have committed just before
        elif found is Idle.WRITERS:
            await self._wait(idle.writers_backoff())  # they commit soon, without notifying
            self._force_full = True
        else:
            await self._wait(self.poll_interval)

    async def _await_provider(self, seconds: float) -> None:
        """The outage backoff: wait ``seconds``, but end it as soon as the provider answers its
        ``ping()`` (asked every ``_PING_EVERY`` seconds), so forwarding resumes within about a
        second of the provider's return, not at the end of a 30 s backoff. The probe batch that
        follows decides, as before, whether the outage is over (readiness, no retry counted).
        A ping that answered before a probe batch failed anyway is not trusted for one backoff."""
        ping = getattr(self.provider, "ping", None)
        if ping is None or self._ping_misled:
            self._ping_misled = False
            await self._sleep(seconds)
            return
        deadline = anyio.current_time() + seconds
        while not self._stopping:
            left = deadline - anyio.current_time()
            if left <= 0:
                return
            await self._sleep(min(_PING_EVERY, left))
            with anyio.move_on_after(max(0.0, deadline - anyio.current_time())):
                try:
                    await ping()
                except Exception:  # still down (or no answer): keep waiting
                    continue
                self._pinged = True  # a probe batch that fails now discredits the ping
                return

    async def _sleep(self, seconds: float) -> None:
        """Sleep, but return early on stop()."""
        with anyio.move_on_after(seconds):
            while not self._stopping:
                self._wake = anyio.Event()
                await self._wake.wait()

    def _lingering(self) -> bool:
        """True while events arrive faster than ``linger_rate`` (claimed over the last
        ``_RATE_WINDOW`` seconds) and NOTIFY is on: then the relay, out of work, polls every
        millisecond from its floor instead of waiting for a notification, so that writers
        (who notify only while a relay waits) send none while it is busy."""
        if self._idle is None:
            return False
        arrivals = self._arrivals
        horizon = time.monotonic() - _RATE_WINDOW
        while arrivals and arrivals[0][0] < horizon:
            arrivals.popleft()
        return sum(n for _, n in arrivals) >= self.linger_rate * _RATE_WINDOW

    def _on_notify(self) -> None:
        self.stats.notifications += 1
        self._wake.set()

    def _on_listener(self, connected: bool) -> None:
        self.stats.listener_connected = connected

    # -- maintenance: lease renewal, recovery of dead relays' leases, clock -----------------

    async def _maintenance(self) -> None:
        renew_every = max(0.05, self.lease / 3)
        recover_every = max(0.1, min(self.lease / 2, 10.0))
        clock_every = 60.0
        next_recover = next_clock = time.monotonic()
        while True:
            await anyio.sleep(min(renew_every, recover_every))
            now = time.monotonic()
            try:
                for token, (_claim, ids) in list(self._held.items()):
                    await _in_thread(self.store.renew, token, list(ids), lease=self.lease)
                if now >= next_recover:
                    next_recover = now + recover_every
                    seqs = await _in_thread(self.store.recover_expired)
                    if seqs:
                        self.stats.recovered += len(seqs)
                        log.info("re-queued %d events whose relay's lease expired", len(seqs))
                        self._force_full = True
                        self._wake.set()
                if now >= next_clock:
                    next_clock = now + clock_every
                    await _in_thread(self.store.sync_clock)
            except sa.exc.DBAPIError as exc:
                self._db_error("maintenance", exc)

    # -- state ------------------------------------------------------------------------------

    def _enter_outage(self, exc: BaseException) -> None:
        self._ping_misled, self._pinged = self._pinged, False
        first = not self._outage_backoff
        self._outage_backoff = min(30.0, max(0.25, self._outage_backoff * 2))
        if first:
            self.stats.outages += 1
            log.warning("provider unavailable (%s); holding events and retrying", exc)
            self._call_hooks("on_outage", exc)
        self.stats.last_error = f"provider unavailable: {exc}"
        self._set_ready(False)

    def _leave_outage(self) -> None:
        self._outage_backoff = 0.0
        self._ping_misled = self._pinged = False
        log.info("provider reachable again")
        self._call_hooks("on_outage", None)
        self._set_ready(True)

    def _db_error(self, what: str, exc: sa.exc.DBAPIError) -> None:
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig else type(exc).__name__
        self.stats.last_error = f"database error during {what}: {reason}"
        log.warning("database error during %s: %s", what, reason)
        self._set_ready(False)

    def _set_ready(self, ready: bool) -> None:
        if self.stats.ready != ready:
            self.stats.ready = ready
            self._call_hooks("on_ready", ready)

    def _call_hooks(self, name: str, *args: Any) -> None:
        for hook in self.hooks:
            try:
                getattr(hook, name)(*args)
            except Exception:  # a metrics bug must not stop the relay
                log.exception("relay hook %s failed", name)

    # -- inspection -------------------------------------------------------------------------

    async def backlog(self) -> tuple[int, Any]:
        """(pending events, created_at of the oldest pending one) — for metrics."""
        return await _in_thread(self.store.backlog)

    async def blocked_keys(self, limit: int = 100) -> list[tuple[str, int, int]]:
        """Ordering keys held back by a failed event: (key, seq, failed events)."""
        return await _in_thread(self.store.blocked_keys, limit)


def _log_handlers(broker: Any) -> None:
    """Say which handlers run (pattern → name): a typo'd pattern shows here, not as events that
    complete without the handler one meant."""
    subs = broker.subscriptions() if hasattr(broker, "subscriptions") else []
    if not subs:
        log.info("no handlers subscribed: events go to the provider only")
        return
    log.info("handlers: %s", ", ".join(
        f"{sub.pattern.text} -> {sub.name}{' (thread)' if sub.threaded else ''}"
        for sub in subs))


def _next_floor(claim: Claim) -> int:
    """Where the next bounded claim starts: after the run of consecutive ``seq`` values this
    claim took from its first event, i.e. at the first ``seq`` it left (a row of another relay,
    a key's later event, a transaction not committed yet) or right after its last event. The
    claimed rows themselves are in flight: walking them again would only cost the scan time.
    What is skipped below the floor is found by the next full scan."""
    seqs = [e.seq for e in claim.events]  # in seq order
    floor = seqs[0]
    for seq in seqs:
        if seq != floor:
            break
        floor += 1
    return floor


async def _in_thread(fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
    return await anyio.to_thread.run_sync(functools.partial(fn, *args, **kwargs))


def _warn_if_behind(conn: sa.Connection) -> None:
    from outbox.migrations import mismatch

    problem = mismatch(conn)
    if problem:
        log.warning("%s", problem)
    elif storage_outdated(conn):  # e.g. a schema made before revisions were recorded
        log.warning("events is a single table (revision outbox_0001): run `alembic upgrade "
                    "head` for the partitioned layout this relay is built for (docs/relay.md, "
                    "'Storage')")


def _make_engine(database: str | URL | None, *, pgbouncer: bool = False) -> Engine:
    url = sa.make_url(database or DEFAULT_DATABASE_URL)
    backend = url.get_backend_name()
    kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if backend == "sqlite":
        kwargs = {"connect_args": {"timeout": 30}}
    elif backend in ("mysql", "mariadb"):
        # No gap locks: a claim must not block writers inserting new events.
        kwargs["isolation_level"] = "READ COMMITTED"
    else:
        kwargs.update(pool_size=4, max_overflow=4)
    return create_engine(url, pgbouncer=pgbouncer, **kwargs)
