"""The provider contract every transport implements, and its value types.

A provider stores events and carries them between processes. The relay calls
:meth:`Provider.publish` to forward an event; consumers in other processes read them back with
``consume`` (:class:`SupportsConsume`: deliveries acknowledged after the handler succeeded) or the
simpler :meth:`Provider.stream`.

Contract shared by all providers (checked by ``tests/conformance``):

- every method is a coroutine except ``stream``/``consume``, which return async iterators;
- ``store``/``publish`` are idempotent by event id: storing or publishing the same id twice keeps
  one event (providers with a bounded dedupe window say so in their docstring);
- ``get`` returns ``None`` for an unknown id; ``update_status``/``delete`` raise
  :class:`EventNotFound` for an unknown id;
- events handed out are copies: mutating them never changes what the provider holds;
- an unreachable backend raises :class:`outbox.ProviderUnavailable` (a reason to back off and
  retry, never a reason to fail an event); every other refusal raises :class:`outbox.ProviderError`;
- providers are safe to use from several tasks of one event loop at once; they are not shared
  between event loops or threads.
"""

from __future__ import annotations

import datetime as dt
import enum
import uuid
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

from outbox.events import Event, EventSource, EventStatus
from outbox.exceptions import EventNotFound, ProviderUnavailable
from outbox.patterns import compile_pattern

__all__ = [
    "Capabilities",
    "Delivery",
    "EventFilter",
    "EventNotFound",
    "Provider",
    "ProviderStats",
    "StartPosition",
    "SupportsConsume",
    "SupportsPing",
    "apply_status",
    "as_event_id",
    "order_key",
    "parse_start",
    "publish_each",
    "publish_many",
]


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a provider can do; the conformance suite skips what a provider does not claim."""

    persistent: bool = False  # survives a process restart
    cross_instance: bool = False  # other processes can consume what this one publishes
    consumer_groups: bool = False  # consume(group=...) splits work inside a group
    full_query: bool = True  # list() honours every EventFilter field
    #: Stores into the relay's own ``events`` table: a ``pending`` event it stores is one a relay
    #: claims. A broker therefore stores its events ``processing`` (see ``outbox.Broker``).
    relay_table: bool = False


@dataclass(frozen=True, slots=True)
class EventFilter:
    """Which events ``list`` returns. ``None`` fields do not filter.

    ``type`` is a pattern (:mod:`outbox.patterns`). ``start_time`` is inclusive and
    ``end_time`` exclusive, on ``created_at``. Results are ordered by ``created_at``, then
    ``seq``, then ``id``, so ``limit``/``offset`` pages are stable.
    """

    source: EventSource | str | None = None
    type: str | None = None
    status: EventStatus | str | None = None
    user_id: str | None = None
    session_id: str | None = None
    instance_id: str | None = None
    schema_name: str | None = None
    entity: str | None = None
    entity_id: str | None = None
    operation: str | None = None
    start_time: dt.datetime | None = None
    end_time: dt.datetime | None = None
    limit: int | None = None
    offset: int = 0

    def __post_init__(self) -> None:
        if self.type is not None:
            compile_pattern(self.type)  # ValueError for a bad pattern, now
        if self.limit is not None and self.limit < 0:
            raise ValueError("EventFilter.limit must be >= 0")
        if self.offset < 0:
            raise ValueError("EventFilter.offset must be >= 0")
        for name in ("start_time", "end_time"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, dt.datetime):
                raise ValueError(f"EventFilter.{name} must be a datetime")

    #: Fields compared for equality with the event attribute of the same name.
    EQUALITY_FIELDS: ClassVar[tuple[str, ...]] = (
        "source", "status", "user_id", "session_id", "instance_id", "schema_name", "entity",
        "entity_id", "operation",
    )

    def equality_items(self) -> list[tuple[str, str]]:
        """(field, value-as-text) for every equality field that is set."""
        out = []
        for name in self.EQUALITY_FIELDS:
            value = getattr(self, name)
            if value is not None:
                out.append((name, value.value if isinstance(value, enum.Enum) else str(value)))
        return out

    def matches(self, event: Event) -> bool:
        """True when ``event`` passes every condition (ignores limit/offset)."""
        for name, value in self.equality_items():
            if getattr(event, name) != value:
                return False
        if self.type is not None and not compile_pattern(self.type).matches(event.type):
            return False
        created = event.created_at
        if self.start_time is not None and created < _aware(self.start_time):
            return False
        return not (self.end_time is not None and created >= _aware(self.end_time))

    def select(self, events: Iterable[Event]) -> list[Event]:
        """The events that match, in the stable order, paged by ``offset``/``limit`` (what
        ``list`` returns for providers that filter in Python)."""
        rows = sorted((e for e in events if self.matches(e)), key=order_key)
        end = None if self.limit is None else self.offset + self.limit
        return rows[self.offset:end]


def _aware(value: dt.datetime) -> dt.datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)


def order_key(event: Event) -> tuple[dt.datetime, bool, int, str]:
    """``created_at``, then ``seq`` (events without one after those with one), then ``id``."""
    seq = event.__dict__.get("seq")
    return (event.created_at, seq is None, seq or 0, str(event.id))


def as_event_id(event_id: uuid.UUID | str) -> uuid.UUID:
    """``event_id`` as a UUID (``ValueError`` naming the bad value otherwise)."""
    if isinstance(event_id, uuid.UUID):
        return event_id
    try:
        return uuid.UUID(str(event_id))
    except ValueError:
        raise ValueError(f"not a valid event id: {event_id!r}") from None


_PROCESSING = EventStatus.PROCESSING.value
_FINISHED = frozenset({EventStatus.COMPLETED.value, EventStatus.FAILED.value})


def apply_status(state: dict[str, Any], status: str, error: str | None,
                 now: dt.datetime) -> None:
    """Set ``status`` (its text), ``error`` and the timestamps the status implies in ``state``
    (an event's ``__dict__``, or a row's values): the ``update_status`` contract.

    ``processing`` stamps ``processed_at`` and clears ``completed_at``; ``completed``/``failed``
    stamp ``completed_at`` and keep ``processed_at`` (``now`` when it was never set);
    ``pending`` clears ``completed_at``.
    """
    state["status"] = status
    state["error"] = error
    if status == _PROCESSING:
        state["processed_at"] = now
        state["completed_at"] = None
    elif status in _FINISHED:
        if state.get("processed_at") is None:
            state["processed_at"] = now
        state["completed_at"] = now
    else:
        state["completed_at"] = None


@dataclass(slots=True)
class ProviderStats:
    """Counters and gauges a provider reports (``extra`` holds provider-specific values)."""

    provider: str
    total_events: int = 0
    pending_events: int = 0
    processing_events: int = 0
    completed_events: int = 0
    failed_events: int = 0
    events_published: int = 0
    events_consumed: int = 0
    active_subscribers: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


class StartPosition(enum.StrEnum):
    """Where a new consumer group starts reading (an aware datetime is also accepted)."""

    BEGINNING = "beginning"
    NOW = "now"


def parse_start(text: str | StartPosition | dt.datetime) -> StartPosition | dt.datetime:
    """A ``--from`` value: ``beginning``, ``now`` or an ISO 8601 time (naive means UTC)."""
    if isinstance(text, dt.datetime):
        return text if text.tzinfo else text.replace(tzinfo=dt.UTC)
    if isinstance(text, StartPosition):
        return text
    value = text.strip()
    try:
        return StartPosition(value.lower())
    except ValueError:
        pass
    try:
        when = dt.datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(
            f"invalid start position {text!r}: use 'beginning', 'now' or an ISO 8601 time such "
            "as 2026-01-01T00:00Z"
        ) from None
    return when if when.tzinfo else when.replace(tzinfo=dt.UTC)


@runtime_checkable
class Delivery(Protocol):
    """One event handed to a consumer; settle it exactly once with ack, nack or park.

    ``attempt`` is 1 for the first delivery of this event to this group. A delivery that is never
    settled (crash, lost connection) is redelivered after the provider's claim timeout.
    """

    event: Event
    attempt: int

    async def ack(self) -> None:
        """The handler succeeded: never deliver this event to this group again."""

    async def nack(self, error: str, *, delay: float = 0.0) -> None:
        """The handler failed: deliver again after ``delay`` seconds (at-least-once)."""

    async def park(self, error: str) -> None:
        """Give up: move the event to the dead-letter place, never deliver it again."""


@runtime_checkable
class Provider(Protocol):
    """Storage plus transport for events. See the module docstring for the shared contract."""

    name: ClassVar[str]
    capabilities: ClassVar[Capabilities]

    async def store(self, event: Event) -> None:
        """Store ``event`` without delivering it to subscribers (idempotent by id)."""

    async def get(self, event_id: uuid.UUID | str) -> Event | None:
        """The stored event with that id, or ``None``."""

    async def list(self, filter: EventFilter | None = None) -> list[Event]:
        """Stored events matching ``filter``, in the stable order ``EventFilter`` documents."""

    async def update_status(
        self, event_id: uuid.UUID | str, status: EventStatus | str, error: str | None = None
    ) -> None:
        """Set status (and error, ``processed_at``/``completed_at`` as the status implies)."""

    async def delete(self, event_id: uuid.UUID | str) -> None:
        """Remove a stored event."""

    def stream(self, pattern: str = "*") -> AsyncIterator[Event]:
        """Events published from now on whose type matches ``pattern``, as they arrive.

        Delivery to an iterating task is acknowledged when the task asks for the next event, so
        an exception in the loop body leaves the event unacknowledged (redelivered where the
        provider persists deliveries).
        """

    async def publish(self, event: Event) -> None:
        """Store ``event`` and deliver it to subscribers; returns once the backend accepted it."""

    async def close(self) -> None:
        """Release connections and stop background tasks. Idempotent."""

    async def stats(self) -> ProviderStats:
        """Current counters."""


@runtime_checkable
class SupportsPing(Protocol):
    """Providers that can tell cheaply whether their backend answers (relay outage probe,
    ``/readyz``)."""

    async def ping(self) -> None:
        """Return when the backend answers; raise :class:`outbox.ProviderUnavailable` if not."""


@runtime_checkable
class SupportsConsume(Protocol):
    """Providers that carry events to other processes through consumer groups."""

    def consume(
        self,
        pattern: str = "*",
        *,
        group: str,
        consumer: str | None = None,
        start: StartPosition | dt.datetime = StartPosition.NOW,
    ) -> AsyncIterator[Delivery]:
        """Deliveries for ``group``: consumers of one group share the work, each group gets every
        event. ``consumer`` names this member (default: the instance id). ``start`` applies only
        when the group does not exist yet. Malformed messages are parked by the provider and never
        yielded."""


async def publish_many(provider: Provider, events: Sequence[Event]) -> list[BaseException | None]:
    """Publish ``events`` in order; one result per event (``None`` = accepted by the backend).

    Providers may define an ``async publish_many(events)`` with the same contract to keep many
    publishes in flight (pipelined XADD, JetStream publish_async). Contract: results are in input
    order; an outage of the backend raises :class:`ProviderUnavailable` for the whole call (the
    caller cannot know which events arrived, so it retries them all and relies on dedupe by id);
    an error specific to one event is returned in that event's slot.
    """
    own = getattr(provider, "publish_many", None)
    if own is not None:
        results: list[BaseException | None] = await own(events)
        return results
    return await publish_each(provider, events)


async def publish_each(provider: Provider,
                       events: Sequence[Event]) -> list[BaseException | None]:
    """:func:`publish_many` one ``provider.publish`` at a time (also what a provider's own
    ``publish_many`` falls back to, to find the event a failed batch stumbled on)."""
    out: list[BaseException | None] = []
    for event in events:
        try:
            await provider.publish(event)
        except ProviderUnavailable:
            raise
        except Exception as exc:  # an error about this event only
            out.append(exc)
        else:
            out.append(None)
    return out
