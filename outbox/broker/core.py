"""The in-process broker: subscriptions, sync and async publishing, a worker pool.

Life cycle: ``await broker.start()`` (or ``async with broker:``) → publish … →
``await broker.stop(timeout)``. The workers run in a host task of their own, so a broker may
outlive the task that started it; it belongs to the event loop it was started in.

Publishing stores the event in the provider as ``pending``, runs every matching handler (with
retries per the retry policy) and marks the event ``completed`` or ``failed`` with the joined
error. An event no handler matches is stored ``completed`` with a note in its metadata
(:data:`NOTE_KEY`). The caller's event object gets the same status, timestamps and error.

The provider keeps these statuses only when it is an event store
(:class:`~outbox.providers.base.EventStore`: the memory and database providers). On a provider
that only carries events (Redis, NATS) the broker stores nothing there: the status lives on the
event object (and in the observers' metrics), and ``stop`` reports what it did not finish, as on
any provider. Nothing transactional is at stake: events of the ``events`` table are claimed,
dispatched (:meth:`Broker.dispatch`, which never touches the provider) and settled by a relay.

A provider that stores into the relay's own ``events`` table (``DatabaseProvider``:
``capabilities.relay_table``) gets the event as ``processing`` from the start instead, owned by
``lease_owner = "broker:<instance id>"`` and without a lease expiry: a relay claims only
``pending`` rows and recovers only expired leases, so it never runs such an event a second time
while the broker has it. What the broker gives up on — events interrupted or never started when
``stop`` ends — goes back to ``pending``, and a relay on that table finishes them.

``dispatch`` is the handler machinery alone (no provider, no status), used by the relay and the
consumers.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Collection
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, overload

import anyio
import anyio.lowlevel
from sqlalchemy.orm.attributes import instance_state

from outbox._patterns import SubscriptionIndex, compile_pattern
from outbox._retry import RetryPolicy
from outbox.broker.dispatch import DispatchResult, joined_error, run_blocking, run_subscriptions
from outbox.broker.subscriptions import (
    Handler,
    Subscription,
    default_name,
    is_async_handler,
)
from outbox.events import Event, EventStatus, get_instance_id, new_event_id, utcnow
from outbox.exceptions import BrokerClosed, BrokerNotStarted, HandlerError, QueueFull
from outbox.providers.base import EventStore, Provider, ProviderStats

__all__ = [
    "NOTE_KEY",
    "NO_HANDLER_NOTE",
    "Broker",
    "BrokerObserver",
    "BrokerStats",
    "StopReport",
]

log = logging.getLogger("outbox.broker")

#: Metadata key of the note left on an event that no handler matched.
NOTE_KEY = "outbox_note"
NO_HANDLER_NOTE = "no handler matched this event type"

# Status texts (enum member access is slow enough to matter at 50k events/s).
_PENDING = EventStatus.PENDING.value
_PROCESSING = EventStatus.PROCESSING.value
_COMPLETED = EventStatus.COMPLETED.value
_FAILED = EventStatus.FAILED.value

#: Workers yield to the event loop after this many events processed without waiting.
_YIELD_EVERY = 64


class _State(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"


_ENDING = (_State.STOPPING, _State.STOPPED)


@dataclass(frozen=True, slots=True)
class BrokerStats:
    """Counters of one broker plus its provider's stats.

    ``total_published``: events accepted by ``publish*``/``submit``; ``total_processed`` /
    ``total_failed``: of those, finished ``completed`` / ``failed``; ``total_dispatched`` /
    ``dispatch_failures``: :meth:`Broker.dispatch` calls and the ones with a failed handler.
    """

    instance_id: str
    mode: str
    state: str
    total_published: int
    total_processed: int
    total_failed: int
    active_subscribers: int
    queue_size: int
    workers_active: int
    worker_count: int
    buffer_size: int
    total_dispatched: int
    dispatch_failures: int
    provider_stats: ProviderStats


@dataclass(frozen=True, slots=True)
class StopReport:
    """What :meth:`Broker.stop` could not finish before its deadline.

    ``unfinished``: events never started or interrupted (interrupted ones are set back to
    ``pending`` in the provider). ``drained``: events finished while stopping.
    """

    drained: int
    unfinished: tuple[Event, ...] = ()
    timed_out: bool = False

    @property
    def clean(self) -> bool:
        return not self.unfinished


class BrokerObserver:
    """Hooks for metrics and tests; override what you need. Exceptions are logged and ignored.

    ``on_published`` runs in the publishing thread (``submit`` may be called from any thread);
    the other hooks run in the broker's event loop.
    """

    def on_published(self, broker: Broker, event: Event) -> None:
        """``event`` was accepted by ``publish*`` or ``submit``."""

    def on_processed(self, broker: Broker, event: Event, status: str, duration: float) -> None:
        """A published event finished ``completed`` or ``failed`` after ``duration`` seconds."""

    def on_dispatched(
        self, broker: Broker, event: Event, result: DispatchResult, duration: float
    ) -> None:
        """:meth:`Broker.dispatch` ran the handlers of ``event``."""


#: Observers notified by every broker (the pytest plugin's recorder uses this).
_global_observers: list[BrokerObserver] = []


class Broker:
    """In-process event broker. See the module docstring and docs/broker.md.

    ``provider`` defaults to a new :class:`~outbox.MemoryProvider` (closed by ``stop``; a provider
    passed in is left open for its owner); statuses are recorded only on a provider that is an
    :class:`~outbox.providers.base.EventStore`. On a provider that writes the relay's own table
    (``DatabaseProvider``) events are stored ``processing`` from the start, so no relay takes them
    while this broker has them; ``stop`` sets what it could not finish back to ``pending``.
    ``mode`` picks what :meth:`publish` does. In async mode ``worker_count`` workers take events
    from a queue of ``buffer_size``. ``sync_handlers``:
    ``"thread"`` runs sync handlers in a worker thread (the default: a blocking handler never
    stalls the event loop), ``"inline"`` calls them on the loop (cheaper; for handlers that do not
    block); ``subscribe(..., threaded=...)`` overrides it per handler.
    """

    def __init__(
        self,
        provider: Provider | None = None,
        *,
        mode: Literal["sync", "async"] | str = "async",
        worker_count: int = 10,
        buffer_size: int = 1000,
        retry_policy: RetryPolicy | None = None,
        instance_id: str | None = None,
        sync_handlers: Literal["thread", "inline"] = "thread",
    ) -> None:
        if mode not in ("sync", "async"):
            raise ValueError(f"mode must be 'sync' or 'async', not {mode!r}")
        if not isinstance(worker_count, int) or worker_count < 1:
            raise ValueError("worker_count must be an integer >= 1")
        if not isinstance(buffer_size, int) or buffer_size < 1:
            raise ValueError("buffer_size must be an integer >= 1")
        if sync_handlers not in ("thread", "inline"):
            raise ValueError("sync_handlers must be 'thread' or 'inline'")
        if retry_policy is not None and not isinstance(retry_policy, RetryPolicy):
            raise TypeError("retry_policy must be an outbox.RetryPolicy")
        if provider is None:
            from outbox.providers.memory import MemoryProvider

            provider = MemoryProvider()
            self._owns_provider = True
        else:
            self._owns_provider = False
        self.provider: Provider = provider
        self.mode: str = mode
        self.worker_count = worker_count
        self.buffer_size = buffer_size
        self.retry_policy: RetryPolicy = retry_policy or RetryPolicy()
        self.instance_id: str = instance_id or get_instance_id()
        self.sync_handlers = sync_handlers
        # Statuses are recorded only where the provider keeps events (see the module docstring).
        self._store: EventStore | None = provider if isinstance(provider, EventStore) else None
        # The relay's own table: store as processing (see the module docstring).
        capabilities = getattr(provider, "capabilities", None)
        self._stores_claimed = self._store is not None and bool(
            getattr(capabilities, "relay_table", False))

        self._index: SubscriptionIndex[str, Subscription] = SubscriptionIndex()
        self._names: dict[str, str] = {}  # name -> subscription id
        self._sub_lock = threading.Lock()
        self._observers: list[BrokerObserver] = []

        # Queue and state: touched from any thread (submit), so guarded by a plain lock.
        self._lock = threading.Lock()
        self._state = _State.NEW
        self._queue: deque[tuple[Event, bool]] = deque()
        self._reserved = 0  # slots taken by publish_async calls still storing their event
        self._published = 0
        self._processed = 0
        self._failed = 0
        self._dispatched = 0
        self._dispatch_failures = 0
        self._active = 0
        self._sync_inflight: dict[int, Event] = {}
        self._sync_keys = 0
        self._interrupted: list[Event] = []
        self._retry_scopes: set[anyio.CancelScope] = set()
        self._report: StopReport | None = None

        # Set by start(), in the broker's event loop.
        self._token: anyio.lowlevel.EventLoopToken | None = None
        self._loop_thread = 0
        self._wakeup: anyio.Event | None = None  # workers wait here for work
        self._idle = 0
        self._space: anyio.Event | None = None  # publish_async(timeout=...) waits here for room
        self._space_waiters = 0
        self._settled: anyio.Event | None = None  # set when sync publishes in flight reach 0
        self._host_done: anyio.Event | None = None
        self._workers_scope: anyio.CancelScope | None = None
        self._host_task: object = None
        self._stopped: anyio.Event | None = None

    def __repr__(self) -> str:
        return (
            f"<Broker {self.instance_id} mode={self.mode} state={self._state.value} "
            f"subscriptions={len(self._index)}>"
        )

    # -- subscriptions -------------------------------------------------------------------------

    @overload
    def subscribe(
        self, pattern: str, handler: None = None, *, name: str | None = None,
        threaded: bool | None = None,
    ) -> Callable[[Handler], Handler]: ...

    @overload
    def subscribe(
        self, pattern: str, handler: Handler, *, name: str | None = None,
        threaded: bool | None = None,
    ) -> str: ...

    def subscribe(
        self,
        pattern: str,
        handler: Handler | None = None,
        *,
        name: str | None = None,
        threaded: bool | None = None,
    ) -> str | Callable[[Handler], Handler]:
        """Call ``handler(event)`` for every event whose type matches ``pattern``.

        Returns the subscription id. Without ``handler``, returns a decorator that subscribes
        the decorated function and returns it unchanged. ``name`` (default
        ``module.qualname``, made unique with ``#2``…) identifies the handler across restarts; an
        explicit name already used raises ``ValueError``, as does an invalid pattern.
        ``threaded`` overrides the broker's ``sync_handlers`` for a sync handler.
        """
        if handler is None:
            def decorator(func: Handler) -> Handler:
                self.subscribe(pattern, func, name=name, threaded=threaded)
                return func

            compile_pattern(pattern)  # fail at decoration time, not later
            return decorator
        return self._add_subscription(pattern, handler, name=name, threaded=threaded).id

    def _add_subscription(
        self,
        pattern: str,
        handler: Handler,
        *,
        name: str | None = None,
        threaded: bool | None = None,
        sub_id: str | None = None,
        unique: bool = False,
    ) -> Subscription:
        if not callable(handler):
            raise TypeError(f"handler must be callable, not {type(handler).__qualname__}")
        if name is not None and (not isinstance(name, str) or not name):
            raise ValueError("subscription name must be a non-empty string")
        compiled = compile_pattern(pattern)
        is_async = is_async_handler(handler)
        run_in_thread = (self.sync_handlers == "thread") if threaded is None else bool(threaded)
        with self._sub_lock:
            if name is None or unique:
                final = self._unique_name(name or default_name(handler))
            elif name in self._names:
                raise ValueError(f"a subscription named {name!r} already exists on this broker")
            else:
                final = name
            sub = Subscription(
                id=sub_id or f"sub_{uuid.uuid4().hex}",
                pattern=compiled,
                name=final,
                handler=handler,
                is_async=is_async,
                threaded=run_in_thread and not is_async,
            )
            self._index.add(sub.id, compiled, sub)
            self._names[final] = sub.id
        return sub

    def _unique_name(self, base: str) -> str:
        if base not in self._names:
            return base
        n = 2
        while f"{base}#{n}" in self._names:
            n += 1
        return f"{base}#{n}"

    def unsubscribe(self, subscription: str) -> None:
        """Remove a subscription by id (or by name); ``KeyError`` when there is none."""
        with self._sub_lock:
            sub_id = subscription if subscription in self._index else self._names.get(subscription)
            if sub_id is None:
                raise KeyError(f"no subscription {subscription!r} on this broker")
            sub = self._index.remove(sub_id)
            del self._names[sub.name]

    def subscriptions(self) -> list[Subscription]:
        """Current subscriptions, in the order they were added."""
        return self._index.values()

    def has_subscription(self, sub_id: str) -> bool:
        return sub_id in self._index

    def matching(self, event_type: str) -> tuple[Subscription, ...]:
        """Subscriptions whose pattern matches ``event_type``, in subscription order."""
        return self._index.match(event_type)

    # -- observers -----------------------------------------------------------------------------

    def add_observer(self, observer: BrokerObserver) -> None:
        self._observers.append(observer)

    def remove_observer(self, observer: BrokerObserver) -> None:
        self._observers.remove(observer)

    def _notify(self, hook: str, *args: Any) -> None:
        observers = self._observers + _global_observers if _global_observers else self._observers
        for observer in observers:
            try:
                getattr(observer, hook)(self, *args)
            except Exception:
                log.exception("broker observer %r failed in %s", observer, hook)

    # -- life cycle ----------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._state is _State.RUNNING

    async def start(self) -> None:
        """Start the worker pool in the current event loop. Calling it again is a no-op.

        Raises :class:`BrokerClosed` for a broker that was stopped (brokers do not restart).
        """
        with self._lock:
            if self._state is _State.RUNNING:
                return
            if self._state is not _State.NEW:
                raise BrokerClosed("this broker was stopped; create a new one")
        self._token = anyio.lowlevel.current_token()
        self._loop_thread = threading.get_ident()
        self._wakeup = anyio.Event()
        self._space = anyio.Event()
        self._settled = anyio.Event()
        self._settled.set()
        self._host_done = anyio.Event()
        self._stopped = anyio.Event()
        ready = anyio.Event()
        self._host_task = _spawn(self._host, ready)
        await ready.wait()
        with self._lock:
            self._state = _State.RUNNING
        log.debug("broker %s started with %d workers", self.instance_id, self.worker_count)

    async def _host(self, ready: anyio.Event) -> None:
        assert self._host_done is not None
        try:
            async with anyio.create_task_group() as tg:
                self._workers_scope = tg.cancel_scope
                for i in range(self.worker_count):
                    tg.start_soon(self._worker, name=f"outbox-broker-worker-{i}")
                ready.set()
        except Exception:
            log.exception("broker %s: worker pool crashed", self.instance_id)
        finally:
            ready.set()
            self._host_done.set()

    async def stop(self, timeout: float | None = 30.0) -> StopReport:  # noqa: ASYNC109
        """Stop accepting events, finish queued and in-flight work, then return.

        At the deadline (``timeout`` seconds; ``None`` waits as long as it takes), retry sleeps
        and running handlers are cancelled (sync handlers in threads are abandoned, not killed);
        the report lists the events that did not finish — queued ones never started, and
        interrupted ones, which are set back to ``pending`` in the provider. Calling it again
        returns the same report. ``publish*``/``submit`` raise :class:`BrokerClosed` from the
        moment ``stop`` begins.
        """
        with self._lock:
            state = self._state
            if state is _State.NEW:
                self._state = _State.STOPPED
                self._report = StopReport(drained=0)
            elif state is _State.RUNNING:
                self._state = _State.STOPPING
        if state is _State.NEW:
            if self._owns_provider:
                await self.provider.close()
            return self._report or StopReport(drained=0)
        assert self._stopped is not None and self._host_done is not None
        if state is not _State.RUNNING:  # someone else is stopping it
            await self._stopped.wait()
            assert self._report is not None
            return self._report

        finished_before = self._processed + self._failed
        self._wake_all()
        with anyio.move_on_after(timeout) as deadline:
            await self._host_done.wait()
            assert self._settled is not None
            await self._settled.wait()
        timed_out = deadline.cancelled_caught
        if timed_out:
            log.warning("broker %s: stop timed out after %ss; cancelling", self.instance_id,
                        timeout)
            for scope in list(self._retry_scopes):
                scope.cancel()
            if self._workers_scope is not None:
                self._workers_scope.cancel()
            with anyio.CancelScope(shield=True):
                await self._host_done.wait()

        with self._lock:
            queued = list(self._queue)
            never_started = [event for event, _ in queued]
            self._queue.clear()
            self._state = _State.STOPPED
        interrupted = self._interrupted + list(self._sync_inflight.values())
        with anyio.CancelScope(shield=True):
            for event in interrupted:
                await self._set_status(event, _PENDING,
                                       "interrupted: the broker stopped before it finished")
            if self._stores_claimed:  # stored as processing: hand them to the relay
                for event, stored in queued:
                    if stored:
                        await self._set_status(event, _PENDING,
                                               "not started: the broker stopped first")
            if self._owns_provider:
                await self.provider.close()
        self._report = StopReport(
            drained=self._processed + self._failed - finished_before,
            unfinished=tuple(never_started + interrupted),
            timed_out=timed_out,
        )
        self._stopped.set()
        log.debug("broker %s stopped: %s", self.instance_id, self._report)
        return self._report

    async def __aenter__(self) -> Broker:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def join(self) -> None:
        """Wait until the queue is empty and no worker or sync publish is busy (for tests)."""
        while True:
            with self._lock:
                idle = not self._queue and not self._reserved and not self._active
            if idle and not self._sync_inflight:
                return
            await anyio.sleep(0.001)

    # -- publishing ----------------------------------------------------------------------------

    async def publish(self, event: Event) -> None:
        """``publish_sync`` in sync mode, ``publish_async`` in async mode."""
        if self.mode == "sync":
            await self.publish_sync(event)
        else:
            await self.publish_async(event)

    async def publish_sync(self, event: Event) -> None:
        """Store ``event``, run every matching handler (with retries), return when done.

        Raises :class:`HandlerError` (``errors`` per handler name) when a handler failed after
        its retries — the event is then ``failed``; the other handlers ran. Raises
        :class:`BrokerNotStarted`/:class:`BrokerClosed` outside ``start()``…``stop()``, and a
        provider error when the event could not be stored (no handler ran then).
        """
        self._check_running()
        self._prepare(event)
        subs = self._index.match(_event_type(event))
        if not subs:
            await self._finish_unhandled(event)
            return
        if self._store is not None:
            await self._store.store(event)
        self._accepted(event)
        self._sync_keys += 1
        key = self._sync_keys
        self._sync_inflight[key] = event
        assert self._settled is not None
        if self._settled.is_set():
            self._settled = anyio.Event()
        try:
            result = await self._run(event, subs)
        finally:
            del self._sync_inflight[key]
            if not self._sync_inflight:
                self._settled.set()
        if result.interrupted:
            raise BrokerClosed(f"broker stopped before the handlers of event {event.id} finished")
        if not result.ok:
            first = next(iter(result.failed.values()))
            raise HandlerError(event.id, result.failed) from first

    async def publish_async(
        self, event: Event, *, timeout: float | None = None  # noqa: ASYNC109 - the contract
    ) -> None:
        """Store ``event`` and queue it for the workers; return without waiting for handlers.

        A full queue raises :class:`QueueFull` at once, or after waiting up to ``timeout``
        seconds for room. Raises :class:`BrokerNotStarted`/:class:`BrokerClosed` outside
        ``start()``…``stop()``. Returns without yielding to the event loop when the queue has
        room, so a producer that never awaits anything else should pass a ``timeout``.
        """
        self._check_running()
        self._prepare(event)
        if not self._index.match(_event_type(event)):
            await self._finish_unhandled(event)
            return
        await self._reserve(timeout)
        try:
            if self._store is not None:
                await self._store.store(event)
        except BaseException:
            self._release()
            raise
        self._commit(event, stored=True, count=True)
        if self._observers or _global_observers:
            self._notify("on_published", event)

    def submit(self, event: Event) -> None:
        """Queue ``event`` for the workers: synchronous, non-blocking, callable from any thread.

        For code that cannot await (ORM listeners, sync frameworks). The event is stored in the
        provider by the worker that takes it. Raises :class:`QueueFull`,
        :class:`BrokerNotStarted` or :class:`BrokerClosed`; an accepted event is processed like
        one from :meth:`publish_async`.
        """
        self._prepare(event)
        self._reserve_nowait()
        self._commit(event, stored=False, count=True)
        if self._observers or _global_observers:
            self._notify("on_published", event)

    async def dispatch(
        self, event: Event, *, done: Collection[str] = (), attempts: int = 1
    ) -> DispatchResult:
        """Run the handlers matching ``event.type`` whose name is not in ``done``.

        Each runs up to ``attempts`` times (sleeping per the retry policy between attempts; no
        sleep when ``attempts == 1``). Works in any mode and state (no ``start()`` needed); it
        neither touches the provider nor changes the event's status.
        """
        if not isinstance(attempts, int) or attempts < 1:
            raise ValueError("attempts must be an integer >= 1")
        started = time.perf_counter()
        result = await run_subscriptions(
            self._index.match(_event_type(event)),
            event,
            attempts=attempts,
            policy=self.retry_policy,
            done=done,
            retry_scopes=self._retry_scopes,
        )
        self.dispatched(event, result, time.perf_counter() - started)
        return result

    def threaded_only(self, event_type: str) -> bool:
        """True when handlers match ``event_type`` and every one is a sync handler that runs in
        a worker thread: :meth:`dispatch_blocking` can then run them in a thread of the caller's
        choosing (the relay runs a batch's such events in a few threads, not one per event)."""
        subs = self._index.match(event_type)
        return bool(subs) and all(sub.threaded for sub in subs)

    def dispatch_blocking(self, event: Event, *, done: Collection[str] = ()) -> DispatchResult:
        """:meth:`dispatch` with ``attempts=1``, blocking, in the calling thread — for events
        whose handlers are :meth:`threaded_only`, called from a worker thread. The caller reports
        the result with :meth:`dispatched` from the event loop."""
        return run_blocking(self._index.match(_event_type(event)), event, done=done)

    def dispatched(self, event: Event, result: DispatchResult, seconds: float) -> None:
        """Count a dispatch and tell the observers (on the event loop)."""
        self._dispatched += 1
        if result.failed:
            self._dispatch_failures += 1
        if self._observers or _global_observers:
            self._notify("on_dispatched", event, result, seconds)

    # -- stats ---------------------------------------------------------------------------------

    @property
    def queue_size(self) -> int:
        return len(self._queue)

    @property
    def workers_active(self) -> int:
        return self._active

    async def stats(self) -> BrokerStats:
        """Counters of this broker and ``await provider.stats()``."""
        provider_stats = await self.provider.stats()
        return BrokerStats(
            instance_id=self.instance_id,
            mode=self.mode,
            state=self._state.value,
            total_published=self._published,
            total_processed=self._processed,
            total_failed=self._failed,
            active_subscribers=len(self._index),
            queue_size=len(self._queue),
            workers_active=self._active,
            worker_count=self.worker_count,
            buffer_size=self.buffer_size,
            total_dispatched=self._dispatched,
            dispatch_failures=self._dispatch_failures,
            provider_stats=provider_stats,
        )

    # -- internals: intake ---------------------------------------------------------------------

    def _check_running(self) -> None:
        state = self._state
        if state is _State.RUNNING:
            return
        if state is _State.NEW:
            raise BrokerNotStarted("the broker is not started: call `await broker.start()` first")
        raise BrokerClosed("the broker is stopping or stopped and accepts no more events")

    def _prepare(self, event: Event) -> None:
        if not isinstance(event, Event):
            raise TypeError(f"expected an outbox.Event, got {type(event).__qualname__}")
        state = event.__dict__ if _transient(event) else None
        get = state.get if state is not None else lambda name: getattr(event, name)
        event_type = get("type")
        if not isinstance(event_type, str) or not event_type:
            raise ValueError("event type must be a non-empty string")
        changes: dict[str, Any] = {}
        if get("id") is None:
            changes["id"] = new_event_id()
        if get("created_at") is None:
            changes["created_at"] = utcnow()
        if get("instance_id") is None:
            changes["instance_id"] = self.instance_id
        if get("payload") is None:
            changes["payload"] = {}
        if get("meta") is None:
            changes["meta"] = {}
        if self._stores_claimed:
            changes.update(status=_PROCESSING, processed_at=utcnow(),
                           lease_owner=f"broker:{self.instance_id}", lease_token=None,
                           lease_expires_at=None)
        elif get("status") != "pending":
            changes["status"] = "pending"
        if changes:
            _assign(event, changes, state)

    def _reserve_nowait(self) -> None:
        with self._lock:
            self._check_running()
            if len(self._queue) + self._reserved >= self.buffer_size:
                raise QueueFull(
                    f"broker queue is full ({self.buffer_size} events waiting); the event was "
                    "not accepted (raise buffer_size or worker_count, or pass a timeout to wait)"
                )
            self._reserved += 1

    async def _reserve(self, timeout: float | None) -> None:  # noqa: ASYNC109
        try:
            self._reserve_nowait()
            return
        except QueueFull:
            if timeout is None:
                raise
        deadline = anyio.current_time() + timeout
        while True:
            try:
                self._reserve_nowait()
                return
            except QueueFull:
                remaining = deadline - anyio.current_time()
                if remaining <= 0:
                    raise
            assert self._space is not None
            space = self._space
            if space.is_set():
                self._space = anyio.Event()
                continue
            self._space_waiters += 1
            try:
                with anyio.move_on_after(remaining):
                    await space.wait()
            finally:
                self._space_waiters -= 1

    def _release(self) -> None:
        with self._lock:
            self._reserved -= 1
        self._wake_workers_threadsafe()

    def _commit(self, event: Event, *, stored: bool, count: bool = False) -> None:
        with self._lock:
            self._reserved -= 1
            if self._state is _State.STOPPED:
                raise BrokerClosed("the broker stopped before the event could be queued")
            self._queue.append((event, stored))
            if count:
                self._published += 1
        self._wake_workers_threadsafe()

    def _accepted(self, event: Event) -> None:
        with self._lock:
            self._published += 1
        if self._observers or _global_observers:
            self._notify("on_published", event)

    def _wake_workers_threadsafe(self) -> None:
        if threading.get_ident() == self._loop_thread:
            self._wake_workers()
            return
        token = self._token
        if token is None:
            return
        try:
            token.backend_class.run_sync_soon(self._wake_workers, (), token.native_token)
        except Exception as exc:  # the loop is gone
            raise BrokerClosed("the broker's event loop is no longer running") from exc

    def _wake_workers(self) -> None:
        wakeup = self._wakeup
        if self._idle and wakeup is not None and not wakeup.is_set():
            wakeup.set()

    def _wake_all(self) -> None:
        if self._wakeup is not None:
            self._wakeup.set()
        if self._space is not None:
            self._space.set()

    # -- internals: workers --------------------------------------------------------------------

    async def _next_item(self) -> tuple[Event, bool] | None:
        while True:
            with self._lock:
                if self._queue:
                    item = self._queue.popleft()
                    self._active += 1
                    if self._space_waiters and self._space is not None:
                        self._space.set()
                    return item
                if self._state in _ENDING and not self._reserved:
                    return None
            wakeup = self._wakeup
            assert wakeup is not None
            if wakeup.is_set():  # consumed: the next waiter needs a fresh event
                self._wakeup = anyio.Event()
                continue
            self._idle += 1
            try:
                await wakeup.wait()
            finally:
                self._idle -= 1

    async def _worker(self) -> None:
        since_yield = 0
        while True:
            item = await self._next_item()
            if item is None:
                return
            event, stored = item
            try:
                await self._process(event, stored)
            except anyio.get_cancelled_exc_class():
                self._interrupted.append(event)
                raise
            except Exception:
                log.exception("broker %s: unexpected error processing event %s", self.instance_id,
                              event.id)
            finally:
                self._active -= 1  # only ever changed in the loop thread
            since_yield += 1
            if since_yield >= _YIELD_EVERY:
                since_yield = 0
                await anyio.lowlevel.checkpoint()

    async def _process(self, event: Event, stored: bool) -> None:
        subs = self._index.match(_event_type(event))
        if not stored:
            if not subs:
                await self._finish_unhandled(event, accepted=True)
                return
            try:
                if self._store is not None:
                    await self._store.store(event)
            except Exception as exc:
                log.warning("broker %s: could not store event %s (%s: %s); running its "
                            "handlers anyway", self.instance_id, event.id, type(exc).__name__, exc)
        elif not subs:  # unsubscribed since it was queued
            await self._finish_unhandled(event, accepted=True, stored=True)
            return
        result = await self._run(event, subs)
        if result.interrupted:
            self._interrupted.append(event)

    async def _run(self, event: Event, subs: tuple[Subscription, ...]) -> DispatchResult:
        """Handlers with retries, then the final status (shared by publish_sync and workers)."""
        observed = bool(self._observers or _global_observers)
        started = time.perf_counter() if observed else 0.0
        event_id = _event_id(event)
        state = event.__dict__ if _transient(event) else None
        _assign(event, {"status": _PROCESSING, "error": None, "processed_at": utcnow()}, state)
        if self._store is not None and not self._stores_claimed:  # else processing already
            await self._provider_update(event_id, _PROCESSING, None)
        result = await run_subscriptions(
            subs,
            event,
            attempts=self.retry_policy.max_attempts,
            policy=self.retry_policy,
            retry_scopes=self._retry_scopes,
            final_level=logging.ERROR,
        )
        if result.interrupted:
            return result
        if result.ok:
            status, error = _COMPLETED, None
            self._processed += 1
        else:
            status, error = _FAILED, joined_error(result.failed)
            self._failed += 1
        _assign(event, {"status": status, "error": error, "completed_at": utcnow()}, state)
        await self._provider_update(event_id, status, error)
        if observed:
            self._notify("on_processed", event, status, time.perf_counter() - started)
        return result

    async def _finish_unhandled(
        self, event: Event, *, accepted: bool = False, stored: bool = False
    ) -> None:
        """No handler matches: the event is ``completed`` with a note, not left pending."""
        meta = dict(event.meta or {})
        meta[NOTE_KEY] = NO_HANDLER_NOTE
        now = utcnow()
        _assign(event, {"meta": meta, "processed_at": now, "completed_at": now,
                        "status": _COMPLETED, "error": None})
        if stored:
            await self._provider_update(_event_id(event), _COMPLETED, None)
        elif self._store is not None:
            await self._store.store(event)
        if not accepted:
            self._accepted(event)
        self._processed += 1
        if self._observers or _global_observers:
            self._notify("on_processed", event, _COMPLETED, 0.0)

    async def _set_status(
        self, event: Event, status: str, error: str | None = None
    ) -> None:
        now = utcnow()
        changes: dict[str, Any] = {"status": status, "error": error}
        if status == _PROCESSING:
            changes["processed_at"] = now
        elif status != _PENDING:
            changes["completed_at"] = now
        _assign(event, changes)
        await self._provider_update(_event_id(event), status, error)

    async def _provider_update(self, event_id: uuid.UUID, status: str, error: str | None) -> None:
        # The provider is the history of in-process events; failing to record a status change
        # must not stop the handlers (the event object still carries it).
        if self._store is None:
            return
        try:
            await self._store.update_status(event_id, status, error)
        except Exception as exc:
            log.debug("broker %s: could not record status %s of event %s: %s: %s",
                      self.instance_id, status, event_id, type(exc).__name__, exc)


def _event_id(event: Event) -> uuid.UUID:
    # __dict__ first: the instrumented attribute costs ~0.4 µs; fall back for unloaded state.
    event_id: uuid.UUID = event.__dict__.get("id") or event.id
    return event_id


def _event_type(event: Event) -> str:
    event_type: str = event.__dict__.get("type") or event.type
    return event_type


def _transient(event: Event) -> bool:
    """True for an event no session has seen: its ``__dict__`` is the whole truth."""
    state = instance_state(event)
    return state.key is None and state.session_id is None


def _assign(event: Event, changes: dict[str, Any], state: dict[str, Any] | None = None) -> None:
    # Transient events (the usual case) are written directly: instrumented attribute writes
    # cost ~0.5 µs each and record history nobody needs. Events attached to a session go
    # through the attributes so the session sees the change.
    if state is None and _transient(event):
        state = event.__dict__
    if state is not None:
        state.update(changes)
    else:
        for name, value in changes.items():
            setattr(event, name, value)


def _spawn(func: Callable[[anyio.Event], Any], ready: anyio.Event) -> object:
    """Start ``func(ready)`` as a task of the running loop, outside any caller's task group."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        loop = None
    if loop is not None:
        return loop.create_task(func(ready), name="outbox-broker")
    import trio  # type: ignore[import-not-found]  # the only other backend anyio supports

    trio.lowlevel.spawn_system_task(func, ready, name="outbox-broker")
    return None
