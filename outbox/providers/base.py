"""The provider ports, after Watermill's: a publisher, a subscriber, an optional event store.

Every provider implements :class:`Provider`, that is :class:`Publisher` (the relay forwards with
``publish_many``) and :class:`Subscriber` (``stream`` follows what is published from now on;
``consume`` hands out deliveries of a consumer group, settled with ack, nack or park). Providers
that also *keep* events implement :class:`EventStore` (``store``/``get``/``list``/
``update_status``/``delete``): the memory and the database providers do; Redis Streams and NATS
JetStream carry events without keeping a queryable copy. Ask with
``isinstance(provider, EventStore)``; the :class:`outbox.Broker` keeps statuses only there.

Shared rules (checked by ``tests/conformance``):

- every method is a coroutine except ``stream``/``consume``, which return async iterators;
- a provider is safe to use from several tasks of one event loop at once; it is not shared
  between event loops or threads;
- events handed out are copies: mutating them never changes what the provider holds or sends;
- an unreachable backend raises :class:`ProviderUnavailable` (a reason to back off and
  retry, never a reason to fail an event); every other refusal raises :class:`ProviderError`.
"""

from __future__ import annotations

import datetime as dt
import enum
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, ClassVar, Protocol, runtime_checkable

from outbox.events import Event, EventFilter, EventStatus, as_event_id, order_key
from outbox.exceptions import EventNotFound, ProviderUnavailable

__all__ = [
    "Capabilities",
    "Delivery",
    "EventFilter",
    "EventNotFound",
    "EventStore",
    "GroupMember",
    "Provider",
    "ProviderStats",
    "Publisher",
    "StartPosition",
    "Subscriber",
    "apply_status",
    "as_event_id",
    "order_key",
    "parse_start",
    "publish_each",
    "publish_one",
]


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a provider guarantees beyond the ports; the conformance suite skips what a provider
    does not claim."""

    #: What was published survives a restart of the process (and of the backend's server).
    persistent: bool = False
    #: Other processes consume what this one publishes; a member that dies (its process is
    #: killed) loses what it held to the rest of its group after the claim timeout.
    cross_instance: bool = False
    #: ``nack`` counts as a delivery: an event delivered more than ``max_deliveries`` times is
    #: parked by the provider itself. (The database provider redelivers a nacked event until its
    #: consumer settles it; it bounds only the take-overs from members that died.)
    bounded_redelivery: bool = False
    #: Stores into the relay's own ``events`` table: a ``pending`` event it stores is one a relay
    #: claims. A broker therefore stores its events ``processing`` (see ``outbox.Broker``).
    relay_table: bool = False


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


# ------------------------------------------------------------------------------------------------
# the ports


@runtime_checkable
class Delivery(Protocol):
    """One event handed to a member of a consumer group; settle it exactly once.

    ``group`` is the consumer group it was delivered to. ``attempt`` is 1 for the first delivery
    of this event to this group and grows with every redelivery (a nack, or a member that stopped
    holding it); ``last_error`` is the error of the nack before, when this member knows it.
    Settling a delivery twice raises :class:`ProviderError`. A settlement the backend
    could not record (it is unreachable) raises :class:`ProviderUnavailable` and leaves the
    delivery unsettled: call again.
    """

    event: Event
    group: str
    attempt: int
    last_error: str | None

    async def ack(self) -> None:
        """The handler succeeded: never deliver this event to this group again."""

    async def nack(self, error: str, *, delay: float = 0.0) -> None:
        """The handler failed: deliver it again after ``delay`` seconds (at-least-once)."""

    async def park(self, error: str) -> None:
        """Give up: record the event with ``error`` among the group's dead letters; it is never
        delivered to this group again."""


@runtime_checkable
class GroupMember(Protocol):
    """What :meth:`Subscriber.consume` returns: one member of a consumer group, an async
    iterator of :class:`Delivery`.

    Iterating (or :meth:`open`) joins the group, creating it at the start position if it does not
    exist. The iterator rides out outages of the backend (it waits with backoff and logs the
    outage once); it ends after :meth:`aclose`. Deliveries come in publication order; a
    redelivery may come after later events. Use it with ``async with`` or close it: closing gives
    what it holds and has not settled back to the group at once (close only when no handler still
    works on one of its deliveries).
    """

    def __aiter__(self) -> GroupMember: ...

    async def __anext__(self) -> Delivery: ...

    async def open(self) -> None:
        """Join the group now, so that a new group starts *now* rather than at the first pull;
        waits while the backend is unreachable."""

    async def aclose(self) -> None:
        """Stop and give back what this member holds. Idempotent."""

    async def __aenter__(self) -> GroupMember: ...

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None: ...


@runtime_checkable
class Publisher(Protocol):
    """Carries events to subscribers: the port the relay forwards through.

    Contract:

    - ``publish_many`` returns once the backend accepted every event it reports accepted (stored
      durably where the provider is ``persistent``); one result per event, in input order:
      ``None`` for accepted, else the exception about that event alone (it could not be encoded,
      the backend refused it);
    - an outage of the backend raises :class:`ProviderUnavailable` for the whole call: the
      caller cannot know which events arrived, so it publishes them all again;
    - publishing is idempotent by event id, so that repeat is safe: an id already published is
      not delivered again (Redis and NATS remember ids for their ``duplicate_window``);
    - events of one call are appended in input order, so a consumer sees one publisher's events
      in the order it published them;
    - a published event belongs to the provider: the caller does not change it afterwards (an
      in-process provider keeps the object as it is; the relay never touches an event again
      once it has forwarded it);
    - ``close`` stops this provider's group members (they give back what they hold), flushes what
      is in flight and releases connections; it is idempotent, and any other call after it raises
      :class:`outbox.exceptions.ProviderError`.
    """

    name: ClassVar[str]
    capabilities: ClassVar[Capabilities]

    async def publish_many(self, events: Sequence[Event]) -> list[BaseException | None]:
        """Publish ``events`` (see the class docstring for the contract)."""

    async def publish(self, event: Event) -> None:
        """Publish one event: ``publish_many([event])``, raising that event's error."""

    async def ping(self) -> None:
        """Return when the backend answers (cheaply: the relay's outage probe, ``/readyz``);
        raise :class:`outbox.exceptions.ProviderUnavailable` if not."""

    async def stats(self) -> ProviderStats:
        """Current counters (``extra`` holds the provider's own: groups, dead letters…)."""

    async def close(self) -> None:
        """Stop consumers, flush, release connections. Idempotent."""


@runtime_checkable
class Subscriber(Protocol):
    """Hands out what was published: to everyone (``stream``) or to consumer groups.

    Consumer-group contract (``consume``):

    - the members of one group share its events (no event goes to two members in normal
      operation); every group gets every published event its pattern matches;
    - at-least-once: an event is delivered again until a member acks or parks it — after a nack
      (with its delay), when the member that held it closes without settling it (at once), and
      when that member died (after the provider's claim timeout); deliveries of one event carry
      the same id, so handlers dedupe by ``event.id``;
    - a group is consumed with one pattern: consuming it with another one in the same process
      (or, on NATS, ever) raises :class:`outbox.exceptions.ProviderError`;
    - ``start`` (``NOW``, ``BEGINNING`` or an aware datetime) applies only when the group is
      created; an existing group resumes where it was;
    - a message that is not a valid event (malformed) is parked by the provider, never handed out
      and never blocking the group.
    """

    def stream(self, pattern: str = "*") -> AsyncIterator[Event]:
        """Events published from now on whose type matches ``pattern``, as they arrive.

        Nothing is acknowledged and nothing is redelivered (use :meth:`consume` for that); close
        the iterator (``aclose()``) when done.
        """

    def consume(
        self,
        pattern: str = "*",
        *,
        group: str,
        consumer: str | None = None,
        start: StartPosition | dt.datetime = StartPosition.NOW,
    ) -> GroupMember:
        """A member of consumer group ``group`` (see the class docstring). ``consumer`` names
        this member (default: the instance id)."""


@runtime_checkable
class Provider(Publisher, Subscriber, Protocol):
    """What every provider implements: it publishes and it consumes."""


@runtime_checkable
class EventStore(Protocol):
    """Providers that keep events (memory, database): what the broker records statuses in.

    Contract:

    - ``store`` is idempotent by id (storing an id again keeps the first) and does not deliver;
      ``publish`` on such a provider stores as well;
    - ``get`` returns ``None`` for an unknown id; ``update_status``/``delete`` raise
      :class:`EventNotFound`;
    - ``list`` honours every :class:`EventFilter` field, in its stable order;
    - events handed out are copies.
    """

    async def store(self, event: Event) -> None:
        """Keep ``event`` without delivering it to subscribers (idempotent by id)."""

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


async def publish_one(publisher: Publisher, event: Event) -> None:
    """``publisher.publish_many([event])``, raising the event's error: ``publish`` of the
    providers whose natural unit is a batch."""
    error = (await publisher.publish_many([event]))[0]
    if error is not None:
        raise error


async def publish_each(publisher: Publisher,
                       events: Sequence[Event]) -> list[BaseException | None]:
    """``publish_many`` one ``publisher.publish`` at a time: what a provider's own
    ``publish_many`` falls back to, to find the event a failed batch stumbled on."""
    out: list[BaseException | None] = []
    for event in events:
        try:
            await publisher.publish(event)
        except ProviderUnavailable:
            raise
        except Exception as exc:  # an error about this event only
            out.append(exc)
        else:
            out.append(None)
    return out
