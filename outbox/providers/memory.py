"""In-process provider: the embedded default and the provider for tests.

Bounded: at most ``max_events`` events are kept. When a new event needs room, the finished
(``completed``/``failed``) event changed least recently is evicted, then the ``processing`` one
changed least recently; ``pending`` events are never evicted — when only pending events remain,
``store``/``publish`` raise :class:`~outbox.ProviderFull`. Finished events older than ``max_age``
seconds are removed every ``cleanup_interval`` seconds (checked on writes, no background task; call
:meth:`MemoryProvider.cleanup` to run it now).

``stream(pattern)`` delivers published events to each iterating task through a buffer of
``stream_buffer`` events; a full buffer makes ``publish`` wait (backpressure), it never drops.
``publish`` is idempotent by id: an event already delivered to the streams is not delivered again.

Simulating an outage (for relay tests): set :attr:`MemoryProvider.fail_with` to an exception (for
example ``ProviderUnavailable("down")``) and every ``store``/``publish``/``ping`` raises it until
it is set back to ``None``; set :attr:`MemoryProvider.fail_when` to a callable
``event -> exception | None`` to fail only some events.

Single event loop, like every provider; not persistent, not shared between processes.
"""

from __future__ import annotations

import contextlib
import copy as _copy
import datetime as dt
import time
import uuid
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any, ClassVar

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from outbox.events import _ATTR_TO_COLUMN, _MANAGER, Event, EventStatus, utcnow
from outbox.exceptions import ProviderError, ProviderFull, ProviderUnavailable
from outbox.patterns import SubscriptionIndex, compile_pattern
from outbox.providers.base import (
    Capabilities,
    EventFilter,
    EventNotFound,
    ProviderStats,
    apply_status,
    as_event_id,
)

__all__ = ["MemoryProvider", "MemoryStream", "copy_event"]

_ATTRS: tuple[str, ...] = tuple(_ATTR_TO_COLUMN)
_SCALARS: frozenset[type] = frozenset({str, int, float, bool, type(None)})
_TIMESTAMPS = ("created_at", "processed_at", "completed_at", "next_attempt_at")


def _json_copy(value: Any) -> Any:
    cls = type(value)
    if cls in _SCALARS:
        return value
    if cls is dict:
        return {k: _json_copy(v) for k, v in value.items()}
    if cls is list:
        return [_json_copy(v) for v in value]
    return _copy.deepcopy(value)


def copy_event(event: Event) -> Event:
    """A deep, transient copy of ``event``.

    Same result as :meth:`Event.copy`, several times faster: only ``payload`` and ``metadata``
    can hold mutable values, and they are JSON-shaped (dicts, lists, scalars), so they are copied
    with a JSON-aware walk instead of :func:`copy.deepcopy`, and the other attributes are shared
    (they are immutable: str, int, UUID, datetime).
    """
    source = event.__dict__
    copy = _new_instance()
    state = copy.__dict__
    own = state[_STATE_ATTR]
    state.update(_DEFAULTS)
    state.update(source)
    state[_STATE_ATTR] = own
    state["payload"] = _json_copy(source.get("payload", {}))
    state["meta"] = _json_copy(source.get("meta", {}))
    return copy


_new_instance = _MANAGER.new_instance
_STATE_ATTR = "_sa_instance_state"
#: What ``Event._from_values`` fills in for attributes an event does not have yet.
_DEFAULTS: dict[str, Any] = {a: None for a in _ATTRS} | {"status": "pending", "retry_count": 0}


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
    """Events in a dict, streams over in-memory channels. See the module docstring."""

    name: ClassVar[str] = "memory"
    capabilities: ClassVar[Capabilities] = Capabilities(
        persistent=False, cross_instance=False, consumer_groups=False, full_query=True
    )

    def __init__(
        self,
        max_events: int = 10000,
        cleanup_interval: float = 300.0,
        max_age: float = 86400.0,
        *,
        stream_buffer: int = 100,
    ) -> None:
        if not isinstance(max_events, int) or max_events < 1:
            raise ValueError("MemoryProvider.max_events must be an integer >= 1")
        if cleanup_interval < 0:
            raise ValueError("MemoryProvider.cleanup_interval must be >= 0 (0 disables cleanup)")
        if max_age <= 0:
            raise ValueError("MemoryProvider.max_age must be > 0")
        if not isinstance(stream_buffer, int) or stream_buffer < 1:
            raise ValueError("MemoryProvider.stream_buffer must be an integer >= 1")
        self.max_events = max_events
        self.cleanup_interval = float(cleanup_interval)
        self.max_age = float(max_age)
        self.stream_buffer = stream_buffer
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
        self._delivered: set[int] = set()  # keys already handed to the streams
        self._streams: SubscriptionIndex[int, MemoryObjectSendStream[Event]] = SubscriptionIndex()
        self._stream_ids = 0
        self._published = 0
        self._consumed = 0
        self._evicted = 0
        self._cleaned = 0
        self._last_cleanup = time.monotonic()
        self._closed = False

    def __repr__(self) -> str:
        return f"<MemoryProvider events={len(self._events)}/{self.max_events}>"

    # -- Provider protocol ---------------------------------------------------------------------

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

    async def publish(self, event: Event) -> None:
        """Store ``event`` and deliver a copy to every matching stream, waiting for buffer room.

        Idempotent by id: an event already delivered is not delivered again.
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
        key = self._store(event)
        if key in self._delivered:
            return
        self._published += 1
        if self._streams:
            for send in self._streams.match(event.__dict__.get("type") or event.type):
                # A stream closed meanwhile just does not get it.
                with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
                    await send.send(copy_event(event))
        if key in self._events:
            self._delivered.add(key)

    async def ping(self) -> None:
        """Answers at once, unless :attr:`fail_with` simulates an outage (then raises it)."""
        self._check_open()
        if self.fail_with is not None:
            raise self.fail_with

    async def close(self) -> None:
        """End every stream; later calls raise :class:`ProviderError`. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for key in list(self._streams):
            self._close_stream(key)

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
            active_subscribers=len(self._streams),
            extra={
                "max_events": self.max_events,
                "evicted": self._evicted,
                "cleaned_up": self._cleaned,
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

    def _store(self, event: Event) -> int:
        event_id = as_event_id(event.__dict__.get("id") or event.id)
        key = event_id.int
        if key in self._events:
            return key
        status = _status_text(event.__dict__.get("status") or "pending")
        while len(self._events) >= self.max_events:
            self._evict_one()
        stored = copy_event(event)
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
        self._delivered.discard(key)

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


def _finalize_stream(
    provider_ref: weakref.ReferenceType[MemoryProvider],
    key: int,
    receive: MemoryObjectReceiveStream[Event],
) -> None:
    receive.close()
    provider = provider_ref()
    if provider is not None:
        provider._close_stream(key)


class MemoryStream:
    """Async iterator over one subscription of :meth:`MemoryProvider.stream`."""

    def __init__(
        self, provider: MemoryProvider, key: int, receive: MemoryObjectReceiveStream[Event]
    ) -> None:
        self._provider = weakref.ref(provider)
        self._key = key
        self._receive = receive
        self._finalizer = weakref.finalize(
            self, _finalize_stream, weakref.ref(provider), key, receive
        )

    def __aiter__(self) -> MemoryStream:
        return self

    async def __anext__(self) -> Event:
        try:
            event = await self._receive.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            self._finalizer()
            raise StopAsyncIteration from None
        provider = self._provider()
        if provider is not None:
            provider._count_consumed()
        return event

    async def aclose(self) -> None:
        """Stop receiving; publishers no longer wait for this stream."""
        self._finalizer()

    async def __aenter__(self) -> MemoryStream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
