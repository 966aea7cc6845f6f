"""``outbox.Consumer``: runs subscribed handlers for events that arrive from the bus.

For each delivery of the provider's consumer group (:meth:`Subscriber.consume`):

1. handlers matching the event type run through the broker (``broker.dispatch``, one attempt);
2. all succeeded → ``ack``; none matched → ``ack`` (this group has nothing to do with it);
   A repeated delivery of an event this process handled recently (the last 10,000 ids) is acked
   without running anything; across processes and restarts the inbox (4.) does that;
3. a handler failed → ``nack`` with the retry policy's delay (the provider redelivers, other events
   keep flowing meanwhile) until ``delivery.attempt`` exhausts the policy → ``park`` (dead letter,
   with the error); handlers that already succeeded are not run again on retries inside this
   process (without an inbox; with one the whole event's transaction is retried);
4. with an :class:`~outbox.inbox.Inbox`, handlers run inside one database transaction that also
   inserts the ``outbox_inbox`` row: a redelivered event that was handled already is acked
   without running anything (exactly-once effect for database handlers).

Deliveries are handled concurrently (``concurrency``), except that events sharing an
``ordering_key`` (the CloudEvents ``partitionkey``) are handled one at a time in arrival order
(``ordered=True``); a retried event does not hold back later events of its key.

``stop()`` (SIGTERM in ``python -m outbox.consume``) stops pulling, lets the handlers in flight
finish within ``shutdown_timeout`` and settles them; what is cut off stays unsettled and is
redelivered to the group (at-least-once).
"""

from __future__ import annotations

import datetime as dt
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio

from outbox._logs import event_context
from outbox._patterns import compile_pattern
from outbox._retry import RetryPolicy
from outbox._tracing import continue_trace
from outbox.events import Event
from outbox.exceptions import ProviderUnavailable
from outbox.inbox import Inbox
from outbox.providers._bus import Backoff, validate_group
from outbox.providers.base import Delivery, GroupMember, StartPosition, Subscriber

if TYPE_CHECKING:
    from outbox.broker import Broker

__all__ = ["Consumer", "ConsumerStats"]

log = logging.getLogger("outbox.consume")

_DONE_MEMORY = 10_000  # events whose partial progress (handlers done) is remembered
_HANDLED_MEMORY = 10_000  # ids of events this process handled, to skip repeated deliveries


@dataclass
class ConsumerStats:
    """Counters of one :class:`Consumer` (this process)."""

    group: str
    received: int = 0
    handled: int = 0  # acked after every matching handler succeeded
    unhandled: int = 0  # acked: no handler of this process matches the type
    duplicates: int = 0  # acked without running handlers: handled before (memory or inbox)
    retried: int = 0  # nacked for a later attempt
    parked: int = 0  # dead-lettered after the retry policy was exhausted
    in_flight: int = 0


class Consumer:
    """Consume one group of ``provider`` and run the broker's handlers (module docstring).

    ``patterns``: the event types this group takes (default every type); events of other types
    are acknowledged unhandled, so every consumer of one group must use the same patterns. One
    pattern is handed to the provider (server-side filter on NATS); several are filtered here.
    ``broker`` defaults to the default broker, whose handlers come from ``@outbox.subscribe``.
    ``retry_policy`` defaults to the broker's.
    """

    def __init__(
        self,
        provider: Subscriber,
        *,
        group: str | None = None,
        patterns: str | Sequence[str] = ("*",),
        broker: Broker | None = None,
        consumer: str | None = None,
        start: StartPosition | dt.datetime | str = StartPosition.NOW,
        retry_policy: RetryPolicy | None = None,
        concurrency: int = 10,
        inbox: Inbox | None = None,
        ordered: bool = True,
        shutdown_timeout: float = 30.0,
        metrics: Any = None,
    ) -> None:
        if not isinstance(provider, Subscriber):
            raise TypeError(f"{type(provider).__qualname__} cannot consume (no consume())")
        group = group or getattr(provider, "consumer_group", None)
        if not group:
            raise ValueError("Consumer needs a group (or a provider with a consumer_group)")
        validate_group(group)
        if concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        if isinstance(patterns, str):
            patterns = (patterns,)
        if not patterns:
            raise ValueError("patterns must not be empty")
        self.patterns = tuple(compile_pattern(p) for p in patterns)
        self.provider = provider
        self.group: str = group
        self.consumer = consumer
        self.start_position: StartPosition | dt.datetime = (
            StartPosition(start) if isinstance(start, str) else start)
        if broker is None:
            from outbox.broker import get_default_broker

            broker = get_default_broker()
        self.broker = broker
        self.retry_policy: RetryPolicy = retry_policy or broker.retry_policy
        self.concurrency = concurrency
        self.inbox = inbox
        self.ordered = ordered
        self.shutdown_timeout = shutdown_timeout
        #: An ``outbox.metrics.Metrics``: outcomes counted as completed / retry / failed.
        self.metrics = metrics
        self.stats = ConsumerStats(group=group)
        self._done: OrderedDict[Any, set[str]] = OrderedDict()
        self._handled: OrderedDict[Any, None] = OrderedDict()
        self._keys: dict[str, tuple[anyio.Lock, int]] = {}
        self._stopping = False
        self._ack_in_transaction = False
        self._pull_scope: anyio.CancelScope | None = None
        self._running = anyio.Event()

    def __repr__(self) -> str:
        patterns = ",".join(p.text for p in self.patterns)
        return f"<Consumer group={self.group!r} patterns={patterns} provider={self.provider!r}>"

    @property
    def provider_pattern(self) -> str:
        """What the provider is asked for: the single pattern, or every type."""
        return self.patterns[0].text if len(self.patterns) == 1 else "*"

    def wants(self, event_type: str) -> bool:
        return any(p.matches(event_type) for p in self.patterns)

    # -- running -----------------------------------------------------------------------------

    async def wait_started(self) -> None:
        """Returns once :meth:`run` pulls from the provider."""
        await self._running.wait()

    def stop(self) -> None:
        """Stop pulling; handlers in flight finish (within ``shutdown_timeout``). Idempotent."""
        self._stopping = True
        if self._pull_scope is not None:
            self._pull_scope.cancel()

    async def run(self) -> None:
        """Consume until :meth:`stop` (or the provider's iterator ends)."""
        if self.inbox is not None:
            await self.inbox.check()
            # The database provider on the inbox's own database records the inbox row and moves
            # the group's cursor in the handler's transaction (DatabaseDelivery.ack_in).
            self._ack_in_transaction = self.inbox.same_database(
                getattr(self.provider, "engine", None))
        iterator: GroupMember = self.provider.consume(
            self.provider_pattern, group=self.group, consumer=self.consumer,
            start=self.start_position,
        )
        slots = anyio.Semaphore(self.concurrency)
        try:
            async with anyio.create_task_group() as tg:
                with anyio.CancelScope() as pull_scope:
                    self._pull_scope = pull_scope
                    if self._stopping:
                        pull_scope.cancel()
                    await iterator.open()  # create the group now: "start at the end" = now
                    self._running.set()
                    log.info("consuming group %r (%s) from %r", self.group,
                             ", ".join(p.text for p in self.patterns), self.provider)
                    while not self._stopping:
                        await slots.acquire()
                        try:
                            delivery = await iterator.__anext__()
                        except StopAsyncIteration:
                            slots.release()
                            break
                        except BaseException:
                            slots.release()
                            raise
                        tg.start_soon(self._handle, delivery, slots)
                # Stopping: let the deliveries in hand finish, within the timeout.
                if self.stats.in_flight:
                    log.info("stopping: waiting up to %.0f s for %d handler(s)",
                             self.shutdown_timeout, self.stats.in_flight)
                tg.cancel_scope.deadline = anyio.current_time() + self.shutdown_timeout
            if tg.cancel_scope.cancelled_caught:
                log.warning("shutdown timeout: %d delivery(ies) left unsettled; the group gets "
                            "them again", self.stats.in_flight)
        finally:
            with anyio.CancelScope(shield=True):
                await iterator.aclose()
            log.info("consumer of group %r stopped: %s", self.group, self.stats)

    # -- one delivery --------------------------------------------------------------------------

    async def _handle(self, delivery: Delivery, slots: anyio.Semaphore) -> None:
        self.stats.received += 1
        self.stats.in_flight += 1
        event = delivery.event
        try:
            async with self._key_turn(event):
                with event_context(event), continue_trace(event):
                    await self._process(delivery)
        except Exception:
            log.exception("consumer of group %r failed on event %s (%s); it stays unsettled "
                          "and comes back", self.group, event.id, event.type)
        finally:
            self.stats.in_flight -= 1
            slots.release()

    async def _process(self, delivery: Delivery) -> None:
        event = delivery.event
        if event.id in self._handled:  # a repeat of an event this process handled already
            await self._settle(delivery.ack)
            self.stats.duplicates += 1
            return
        if not self.wants(event.type) or not self.broker.matching(event.type):
            log.debug("no handler for %s in group %r: acknowledged", event.type, self.group)
            await self._settle(delivery.ack)
            self.stats.unhandled += 1
            return
        if self.inbox is not None:
            try:
                outcome = await self._dispatch_in_inbox(delivery)
            except Exception as exc:  # the inbox database, not a handler: retry later
                log.warning("inbox transaction for event %s failed: %s: %s", event.id,
                            type(exc).__name__, exc)
                delay = self.retry_policy.delay(max(1, delivery.attempt))
                reason = f"inbox: {type(exc).__name__}: {exc}"
                await self._settle(lambda: delivery.nack(reason, delay=delay))
                self.stats.retried += 1
                return
            if outcome is None:
                await self._settle(delivery.ack)
                self.stats.duplicates += 1
                return
            result = outcome
        else:
            done = self._done.get(event.id, ())
            result = await self.broker.dispatch(event, done=done, attempts=1)
        if result.ok:
            self._remember_handled(event.id)
            await self._settle(delivery.ack)
            self._done.pop(event.id, None)
            self.stats.handled += 1
            self._count(event, "completed")
            return
        if self.inbox is None:  # remember who succeeded, so a retry here skips them
            progress = self._done.setdefault(event.id, set())
            progress.update(result.succeeded)
            self._done.move_to_end(event.id)
            while len(self._done) > _DONE_MEMORY:
                self._done.popitem(last=False)
        from outbox.broker import joined_error

        error = joined_error(result.failed)
        if self.retry_policy.exhausted(delivery.attempt):
            log.error("event %s (%s) failed %d time(s) in group %r, parking it: %s", event.id,
                      event.type, delivery.attempt, self.group, error)
            await self._settle(lambda: delivery.park(error))
            self._done.pop(event.id, None)
            self.stats.parked += 1
            self._count(event, "failed")
        else:
            delay = self.retry_policy.delay(delivery.attempt)
            await self._settle(lambda: delivery.nack(error, delay=delay))
            self.stats.retried += 1
            self._count(event, "retry")

    def _count(self, event: Event, status: str) -> None:
        if self.metrics is not None:
            self.metrics.observe_processed(event, status)

    def _remember_handled(self, event_id: Any) -> None:
        self._handled[event_id] = None
        if len(self._handled) > _HANDLED_MEMORY:
            self._handled.popitem(last=False)

    async def _dispatch_in_inbox(self, delivery: Delivery) -> Any:
        """The dispatch result, or ``None`` when the inbox says the group handled it before."""
        assert self.inbox is not None
        event = delivery.event
        via = delivery if self._ack_in_transaction and hasattr(delivery, "ack_in") else None
        async with self.inbox.transaction(self.group, event.id, delivery=via) as tx:
            if tx.duplicate:
                return None
            result = await self.broker.dispatch(event, attempts=1)
            if not result.ok:
                tx.rollback()
            return result

    async def _settle(self, action: Callable[[], Awaitable[None]]) -> None:
        """Ack/nack/park, retrying while the provider is unreachable (until stopping)."""
        backoff = Backoff(initial=0.2, maximum=5.0)
        while True:
            try:
                await action()
                return
            except ProviderUnavailable as exc:
                if self._stopping:
                    log.warning("could not settle a delivery while stopping (%s); it comes "
                                "back to the group", exc)
                    return
                log.warning("settling a delivery failed (%s); retrying", exc)
                await anyio.sleep(backoff.next())

    def _key_turn(self, event: Event) -> _KeyTurn:
        key = event.ordering_key if self.ordered else None
        return _KeyTurn(self._keys, key)


class _KeyTurn:
    """Async context: one event of an ordering key at a time (FIFO, asyncio locks are fair)."""

    def __init__(self, keys: dict[str, tuple[anyio.Lock, int]], key: str | None) -> None:
        self._keys = keys
        self._key = key

    async def __aenter__(self) -> None:
        if self._key is None:
            return
        lock, users = self._keys.get(self._key, (None, 0))
        if lock is None:
            lock = anyio.Lock()
        self._keys[self._key] = (lock, users + 1)
        try:
            await lock.acquire()
        except BaseException:
            self._release_user()
            raise

    async def __aexit__(self, *exc: object) -> None:
        if self._key is None:
            return
        self._keys[self._key][0].release()
        self._release_user()

    def _release_user(self) -> None:
        assert self._key is not None
        lock, users = self._keys[self._key]
        if users <= 1:
            del self._keys[self._key]
        else:
            self._keys[self._key] = (lock, users - 1)
