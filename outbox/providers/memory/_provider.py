"""In-process provider: the embedded default and the provider for tests.

Bounded: at most ``max_events`` events are kept. When a new event needs room, the finished
(``completed``/``failed``) event changed least recently is evicted, then the ``processing`` one
changed least recently; ``pending`` events are never evicted — when only pending events remain,
``store``/``publish`` raise :class:`ProviderFull`. Finished events older than ``max_age``
seconds are removed every ``cleanup_interval`` seconds (checked on writes, no background task; call
:meth:`MemoryProvider.cleanup` to run it now).

``stream(pattern)`` delivers published events to each iterating task through a buffer of
``stream_buffer`` events; a full buffer makes ``publish`` wait (backpressure), it never drops.
``publish`` is idempotent by id: an event already delivered to the streams is not delivered again.

``consume(pattern, group=...)`` runs consumer groups in this process (``_groups.py``): members of a
group share its events, every group gets every event, nacked deliveries come back after their
delay, and after ``max_deliveries`` deliveries an event is parked in :meth:`dead_letters`.

Simulating an outage (for relay tests): set :attr:`MemoryProvider.fail_with` to an exception (for
example ``ProviderUnavailable("down")``) and every ``store``/``publish``/``ping`` raises it until
it is set back to ``None``; set :attr:`MemoryProvider.fail_when` to a callable
``event -> exception | None`` to fail only some events.

Single event loop, like every provider; not persistent, not shared between processes.
"""

from __future__ import annotations

import builtins
import contextlib
import datetime as dt
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import anyio
from anyio.streams.memory import MemoryObjectSendStream

from outbox._patterns import SubscriptionIndex, compile_pattern
from outbox.events import Event, EventStatus, get_instance_id, utcnow
from outbox.exceptions import ProviderError, ProviderFull, ProviderUnavailable
from outbox.providers._bus import config_options, validate_group
from outbox.providers.base import (
    Capabilities,
    EventFilter,
    EventNotFound,
    ProviderStats,
    StartPosition,
    apply_status,
    as_event_id,
    parse_start,
)
from outbox.providers.memory._copy import copy_event
from outbox.providers.memory._groups import (
    MemoryGroup,
    MemoryGroupMember,
    check_pattern,
    start_entries,
)
from outbox.providers.memory._stream import MemoryStream

__all__ = ["MemoryProvider"]

_TIMESTAMPS = ("created_at", "processed_at", "completed_at", "next_attempt_at")


def _key(event_id: uuid.UUID | str) -> int:
    # Keyed by the id's integer: hashing a UUID object runs Python code, an int's does not.
    return as_event_id(event_id).int


#: One result per published event (``None``: accepted).
_Results = list[BaseException | None]
#: Status -> index of its bucket (pending, processing, finished).
_BUCKET = {"pending": 0, "processing": 1, "completed": 2, "failed": 2}
#: Accepted status spellings -> the stored text (enum member lookups are slow in hot paths).
_STATUS_TEXT: dict[object, str] = {s.value: s.value for s in EventStatus}
_STATUS_TEXT.update({s: s.value for s in EventStatus})


def _status_text(status: EventStatus | str) -> str:
    text = _STATUS_TEXT.get(status)
    return text if text is not None else EventStatus(status).value


class MemoryProvider:
    """Events in a dict, streams over in-memory channels, consumer groups over in-memory
    queues. See the module docstring. Implements :class:`~outbox.providers.base.Provider` and
    :class:`~outbox.providers.base.EventStore`."""

    name: ClassVar[str] = "memory"
    capabilities: ClassVar[Capabilities] = Capabilities(bounded_redelivery=True)

    def __init__(
        self,
        max_events: int = 10000,
        cleanup_interval: float = 300.0,
        max_age: float = 86400.0,
        *,
        stream_buffer: int = 100,
        max_deliveries: int = 10,
    ) -> None:
        if not isinstance(max_events, int) or max_events < 1:
            raise ValueError("MemoryProvider.max_events must be an integer >= 1")
        if cleanup_interval < 0:
            raise ValueError("MemoryProvider.cleanup_interval must be >= 0 (0 disables cleanup)")
        if max_age <= 0:
            raise ValueError("MemoryProvider.max_age must be > 0")
        if not isinstance(stream_buffer, int) or stream_buffer < 1:
            raise ValueError("MemoryProvider.stream_buffer must be an integer >= 1")
        if not isinstance(max_deliveries, int) or max_deliveries < 1:
            raise ValueError("MemoryProvider.max_deliveries must be an integer >= 1")
        self.max_events = max_events
        self.cleanup_interval = float(cleanup_interval)
        self.max_age = float(max_age)
        self.stream_buffer = stream_buffer
        #: Deliveries of one event to one group before it is parked (see :meth:`consume`).
        self.max_deliveries = max_deliveries
        #: Raised by ``store``/``publish`` while set (simulates an outage).
        self.fail_with: BaseException | None = None
        #: ``event -> exception | None``: raised by ``store``/``publish`` for the events it picks.
        self.fail_when: Callable[[Event], BaseException | None] | None = None

        self._events: dict[int, Event] = {}
        # Keys per status class (pending, processing, finished), least recently changed first:
        # the eviction order.
        self._buckets: tuple[OrderedDict[int, None], ...] = (
            OrderedDict(), OrderedDict(), OrderedDict()
        )
        self._pending, self._processing, self._finished = self._buckets
        # Keys already handed to the streams and groups, in publication order (what a group
        # that starts at the beginning gets).
        self._delivered: dict[int, None] = {}
        self._groups: dict[str, MemoryGroup] = {}
        self._dead: deque[dict[str, Any]] = deque(maxlen=max_events)
        self._streams: SubscriptionIndex[int, MemoryObjectSendStream[Event]] = SubscriptionIndex()
        self._stream_ids = 0
        self._published = 0
        self._consumed = 0
        self._evicted = 0
        self._cleaned = 0
        self._last_cleanup = time.monotonic()
        self._closed = False


    @classmethod
    def from_config(cls, config: Any) -> MemoryProvider:
        """Build from an outbox :class:`~outbox.Config` (its ``memory`` section)."""
        return cls(**config_options(config, "memory", {"max_events", "cleanup_interval",
                                                       "max_age"}))

    def __repr__(self) -> str:
        return f"<MemoryProvider events={len(self._events)}/{self.max_events}>"

    # -- EventStore ----------------------------------------------------------------------------

    async def store(self, event: Event) -> None:
        """Keep a copy of ``event``; a second store of the same id changes nothing."""
        self._check(event)
        self._store(event)

    async def get(self, event_id: uuid.UUID | str) -> Event | None:
        self._check_open()
        event = self._events.get(_key(event_id))
        return None if event is None else copy_event(event)

    async def list(self, filter: EventFilter | None = None) -> list[Event]:
        self._check_open()
        return [copy_event(e) for e in (filter or EventFilter()).select(self._events.values())]

    async def update_status(
        self, event_id: uuid.UUID | str, status: EventStatus | str, error: str | None = None
    ) -> None:
        self._check_open()
        key = _key(event_id)
        event = self._events.get(key)
        if event is None:
            raise EventNotFound(f"no event with id {event_id}")
        new = _status_text(status)
        state = event.__dict__
        del self._buckets[_BUCKET[state["status"]]][key]
        apply_status(state, new, error, utcnow())
        self._buckets[_BUCKET[new]][key] = None
        self._maybe_cleanup()

    async def delete(self, event_id: uuid.UUID | str) -> None:
        self._check_open()
        key = _key(event_id)
        if key not in self._events:
            raise EventNotFound(f"no event with id {event_id}")
        self._remove(key)

    # -- Subscriber: streams --------------------------------------------------------------------

    def stream(self, pattern: str = "*") -> MemoryStream:
        """Events published from now on whose type matches ``pattern`` (registered right away).

        Iterate it, and close it (``aclose()`` or ``async with``) when done: an open stream whose
        buffer is full makes ``publish`` wait. A stream that is garbage-collected is closed.
        """
        self._check_open()
        compiled = compile_pattern(pattern)
        send, receive = anyio.create_memory_object_stream[Event](self.stream_buffer)
        self._stream_ids += 1
        key = self._stream_ids
        self._streams.add(key, compiled, send)
        return MemoryStream(self, key, receive)

    # -- Publisher -----------------------------------------------------------------------------

    async def publish(self, event: Event) -> None:
        """Keep ``event`` and deliver a copy to every matching stream and group, waiting for
        buffer room.

        Idempotent by id: an event already delivered is not delivered again. The provider keeps
        the object it is given, without a copy (the port's contract: a published event is not
        changed afterwards); :meth:`store` keeps a copy.
        """
        self._check(event)
        await self._publish_checked(event)

    async def publish_many(self, events: Sequence[Event]) -> _Results:
        """:meth:`publish` each event in order, one result per event (``None``: accepted); an
        outage (:attr:`fail_with`) raises for the whole call. The relay's forwarding path: one
        call per round of a batch instead of one per event."""
        results: _Results = []
        for event in events:
            try:
                self._check(event)
            except ProviderUnavailable:
                raise
            except Exception as exc:  # about this event only
                results.append(exc)
                continue
            await self._publish_checked(event)
            results.append(None)
        return results

    async def _publish_checked(self, event: Event) -> None:
        # Kept as it is: a copy per event was a quarter of the relay's CPU time per event.
        key = self._store(event, copy=False)
        if key in self._delivered:
            return
        self._published += 1
        event_type = event.__dict__.get("type") or event.type
        if self._streams:
            for send in self._streams.match(event_type):
                # A stream closed meanwhile just does not get it.
                with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
                    await send.send(copy_event(event))
        if self._groups:
            stored = self._events.get(key) or copy_event(event)
            for group in list(self._groups.values()):
                if group.pattern.matches(event_type):
                    await self._offer(group, stored)
        if key in self._events:
            self._delivered[key] = None

    async def _offer(self, group: MemoryGroup, event: Event) -> None:
        """Queue ``event`` for ``group``, waiting while ``max_events`` events wait there."""
        while group.waiting() >= self.max_events and not group.deleted:
            self._check_open()
            await group.room.wait()
        if not group.deleted:
            group.add(event)

    async def ping(self) -> None:
        """Answers at once, unless :attr:`fail_with` simulates an outage (then raises it)."""
        self._check_open()
        if self.fail_with is not None:
            raise self.fail_with

    async def close(self) -> None:
        """End every stream and group member; later calls raise :class:`ProviderError`.
        Idempotent."""
        if self._closed:
            return
        self._closed = True
        for key in list(self._streams):
            self._close_stream(key)
        for group in self._groups.values():
            for member in list(group.members):
                await member.aclose()
            group.arrived.fire()
            group.room.fire()

    # -- Subscriber: consumer groups ------------------------------------------------------------

    def consume(
        self,
        pattern: str = "*",
        *,
        group: str,
        consumer: str | None = None,
        start: StartPosition | dt.datetime = StartPosition.NOW,
    ) -> MemoryGroupMember:
        """A member of consumer group ``group``, created now if it does not exist: ``start``
        ``NOW`` (only events published from now on), ``BEGINNING`` (the published events this
        provider still holds, in publication order) or an aware datetime (those created since).
        A group keeps the pattern it was created with; another pattern raises
        :class:`ProviderError`. Close the member (``aclose()``/``async with``) to give back what
        it holds."""
        self._check_open()
        validate_group(group)
        compiled = compile_pattern(pattern)
        existing = self._groups.get(group)
        if existing is None:
            published = (self._events[k] for k in self._delivered)
            existing = self._groups[group] = MemoryGroup(
                group, compiled, start_entries(published, compiled, parse_start(start)))
        else:
            check_pattern(existing, compiled)
        return MemoryGroupMember(self, existing, consumer or get_instance_id())

    def delete_group(self, group: str) -> bool:
        """Forget ``group`` and its backlog (its members stop); False when there is none."""
        found = self._groups.pop(group, None)
        if found is None:
            return False
        found.deleted = True
        found.arrived.fire()
        found.room.fire()
        return True

    async def dead_letters(self, group: str | None = None,
                           limit: int = 100) -> builtins.list[dict[str, Any]]:
        """Parked events, oldest first: ``group_name``, ``event_id``, ``error``, ``attempt``
        (deliveries before it was parked), ``parked_at`` (as the database provider's) and
        ``event`` (a copy). The provider keeps the last ``max_events`` of them."""
        rows = [r for r in self._dead if group is None or r["group_name"] == group][:limit]
        return [{**r, "event": copy_event(r["event"])} for r in rows]

    def _park(self, group: str, event: Event, error: str, attempt: int) -> None:
        self._dead.append({"group_name": group, "event_id": event.id, "error": error,
                           "attempt": attempt, "parked_at": utcnow(), "event": event})

    async def stats(self) -> ProviderStats:
        return ProviderStats(
            provider=self.name,
            total_events=len(self._events),
            pending_events=len(self._pending),
            processing_events=len(self._processing),
            completed_events=sum(
                1 for k in self._finished if self._events[k].status == EventStatus.COMPLETED
            ),
            failed_events=sum(
                1 for k in self._finished if self._events[k].status == EventStatus.FAILED
            ),
            events_published=self._published,
            events_consumed=self._consumed,
            active_subscribers=len(self._streams) + sum(
                len(g.members) for g in self._groups.values()),
            extra={
                "max_events": self.max_events,
                "evicted": self._evicted,
                "cleaned_up": self._cleaned,
                "dead_letters": len(self._dead),
                "groups": {name: g.stats() for name, g in self._groups.items()},
            },
        )

    # -- maintenance ---------------------------------------------------------------------------

    def cleanup(self, *, now: dt.datetime | None = None) -> int:
        """Remove finished events that finished more than ``max_age`` seconds before ``now``.

        Returns how many were removed. Pending and processing events are never removed.
        """
        cutoff = (now or utcnow()) - dt.timedelta(seconds=self.max_age)
        old = [
            key
            for key in self._finished
            if (self._events[key].completed_at or self._events[key].created_at) < cutoff
        ]
        for key in old:
            self._remove(key)
        self._cleaned += len(old)
        self._last_cleanup = time.monotonic()
        return len(old)

    # -- internals -----------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise ProviderError("memory provider is closed")

    def _check(self, event: Event) -> None:
        self._check_open()
        if not isinstance(event, Event):
            raise TypeError(f"expected an outbox.Event, got {type(event).__qualname__}")
        if (event.__dict__.get("id") or event.id) is None:
            raise ValueError("event has no id (build events with outbox.new_event)")
        if self.fail_with is not None:
            raise self.fail_with
        if self.fail_when is not None:
            exc = self.fail_when(event)
            if exc is not None:
                raise exc

    def _store(self, event: Event, *, copy: bool = True) -> int:
        event_id = as_event_id(event.__dict__.get("id") or event.id)
        key = event_id.int
        if key in self._events:
            return key
        status = _status_text(event.__dict__.get("status") or "pending")
        while len(self._events) >= self.max_events:
            self._evict_one()
        stored = copy_event(event) if copy else event
        state = stored.__dict__
        state["id"] = event_id
        state["status"] = status
        if state.get("created_at") is None:
            state["created_at"] = utcnow()
        for name in _TIMESTAMPS:  # naive datetimes are UTC, as in the events table
            value = state.get(name)
            if value is not None and value.tzinfo is None:
                state[name] = value.replace(tzinfo=dt.UTC)
        self._events[key] = stored
        self._buckets[_BUCKET[status]][key] = None
        self._maybe_cleanup()
        return key

    def _evict_one(self) -> None:
        for bucket in (self._finished, self._processing):
            if bucket:
                key, _ = bucket.popitem(last=False)
                self._remove(key)
                self._evicted += 1
                return
        raise ProviderFull(
            f"memory provider is full: all {self.max_events} stored events are pending and "
            "pending events are never evicted (raise max_events or let the events be processed)"
        )

    def _remove(self, key: int) -> None:
        event = self._events.pop(key)
        self._buckets[_BUCKET[event.__dict__["status"]]].pop(key, None)
        self._delivered.pop(key, None)

    def _maybe_cleanup(self) -> None:
        if self.cleanup_interval <= 0:
            return
        if time.monotonic() - self._last_cleanup >= self.cleanup_interval:
            if self._finished:
                self.cleanup()
            else:
                self._last_cleanup = time.monotonic()

    def _close_stream(self, key: int) -> None:
        try:
            send = self._streams.remove(key)
        except KeyError:
            return
        send.close()

    def _count_consumed(self) -> None:
        self._consumed += 1
