"""Consumer groups of the memory provider: :meth:`MemoryProvider.consume`.

A group is a queue of the published events its pattern matches, created by the first
``consume`` of its name and kept (with its backlog) until :meth:`MemoryProvider.delete_group` or
``close``. Its members pull from the queue, so they share the work; every group has a queue of
its own, so every group gets every event. A delivery goes back to the queue when it is nacked
(after the delay), when its member closes without settling it (at once), and is parked among the
provider's dead letters after ``max_deliveries`` deliveries. In one process there is no member
that dies while the others live, so nothing is reclaimed on a timeout.

A group holds at most ``max_events`` events that wait for a member: beyond that ``publish`` waits
for room (backpressure, like a full stream), it never drops one. A group nobody consumes any more
therefore holds publishing up once it is full: delete it.
"""

from __future__ import annotations

import datetime as dt
import heapq
import itertools
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any

import anyio

from outbox._patterns import Pattern
from outbox.events import Event
from outbox.exceptions import ProviderError
from outbox.providers._bus import SettleOnce, exhausted
from outbox.providers.base import StartPosition
from outbox.providers.memory._copy import copy_event

if TYPE_CHECKING:
    from outbox.providers.memory._provider import MemoryProvider

__all__ = ["MemoryDelivery", "MemoryGroup", "MemoryGroupMember", "check_pattern", "start_entries"]


@dataclass(eq=False)
class _Entry:
    """One event in one group's queue."""

    event: Event  # the provider's copy; handed out as a copy of its own
    deliveries: int = 0
    last_error: str | None = None
    done: bool = False  # acked or parked (perhaps by a member that no longer held it)


class _Signal:
    """A wake-up for the tasks waiting on a condition (new entries, room in the queue)."""

    def __init__(self) -> None:
        self._event = anyio.Event()

    def fire(self) -> None:
        self._event.set()
        self._event = anyio.Event()

    async def wait(self, timeout: float | None = None) -> None:  # noqa: ASYNC109
        event = self._event
        with anyio.move_on_after(timeout):
            await event.wait()


class MemoryGroup:
    """The queue of one consumer group (see the module docstring)."""

    _order = itertools.count()

    def __init__(self, name: str, pattern: Pattern, entries: Iterable[Event]) -> None:
        self.name = name
        self.pattern = pattern
        self.queue: deque[_Entry] = deque(_Entry(e) for e in entries)
        self.delayed: list[tuple[float, int, _Entry]] = []  # nacked: (due, order, entry)
        self.members: set[MemoryGroupMember] = set()
        self.arrived = _Signal()
        self.room = _Signal()
        self.deleted = False

    def waiting(self) -> int:
        """Events that wait for a member (the backlog ``max_events`` bounds)."""
        return len(self.queue)

    def add(self, event: Event) -> None:
        self.queue.append(_Entry(event))
        self.arrived.fire()

    def give_back(self, entries: list[_Entry]) -> None:
        """Entries a member held unsettled: first in line again, in their order."""
        self.queue.extendleft(reversed([e for e in entries if not e.done]))
        self.arrived.fire()

    def retry_later(self, entry: _Entry, delay: float) -> None:
        heapq.heappush(self.delayed, (time.monotonic() + max(0.0, delay), next(self._order),
                                      entry))
        self.arrived.fire()

    def take(self) -> _Entry | None:
        """The next entry due (redeliveries that are due first), or ``None``."""
        now = time.monotonic()
        due: list[_Entry] = []
        while self.delayed and self.delayed[0][0] <= now:
            due.append(heapq.heappop(self.delayed)[2])
        if due:
            self.queue.extendleft(reversed(due))
        while self.queue:
            entry = self.queue.popleft()
            self.room.fire()
            if not entry.done:
                return entry
        return None

    def next_due(self) -> float | None:
        """Seconds until the next nacked entry is due (``None``: none waits)."""
        if not self.delayed:
            return None
        return max(0.0, self.delayed[0][0] - time.monotonic())

    def stats(self) -> dict[str, Any]:
        return {"pattern": self.pattern.text, "waiting": len(self.queue),
                "delayed": len(self.delayed), "members": len(self.members),
                "held": sum(len(m.held) for m in self.members)}


class MemoryDelivery(SettleOnce):
    """One event handed to a member of a memory consumer group; settle it once."""

    def __init__(self, member: MemoryGroupMember, entry: _Entry) -> None:
        self.event: Event = copy_event(entry.event)
        self.attempt = entry.deliveries
        self.last_error = entry.last_error
        self.group = member.group.name
        self._member = member
        self._entry = entry

    def __repr__(self) -> str:
        return (f"<MemoryDelivery {self.event.type} id={self.event.id} group={self.group!r} "
                f"attempt={self.attempt}>")

    async def ack(self) -> None:
        """The handler succeeded: never deliver this event to this group again."""
        self._check("ack")
        self._member.settle(self._entry)
        self._member.provider._count_consumed()
        self._settled = "ack"

    async def nack(self, error: str, *, delay: float = 0.0) -> None:
        """The handler failed: deliver it again after ``delay`` seconds."""
        self._check("nack")
        if self._member.release(self._entry):  # else given back on close: queued already
            self._entry.last_error = error
            self._member.group.retry_later(self._entry, delay)
        self._settled = "nack"

    async def park(self, error: str) -> None:
        """Give up: record the event among the provider's dead letters."""
        self._check("park")
        self._member.settle(self._entry)
        self._member.provider._park(self.group, self._entry.event, error, self.attempt)
        self._settled = "park"


class MemoryGroupMember:
    """One member of a memory consumer group (:meth:`MemoryProvider.consume`)."""

    def __init__(self, provider: MemoryProvider, group: MemoryGroup, consumer: str) -> None:
        self.provider = provider
        self.group = group
        self.consumer = consumer
        self.held: dict[_Entry, None] = {}  # handed out, not settled (in hand-out order)
        self.closed = False
        group.members.add(self)

    def __repr__(self) -> str:
        return f"<MemoryGroupMember {self.consumer!r} of group {self.group.name!r}>"

    def __aiter__(self) -> MemoryGroupMember:
        return self

    async def __anext__(self) -> MemoryDelivery:
        while True:
            if self.closed or self.group.deleted or self.provider._closed:
                raise StopAsyncIteration
            entry = self.group.take()
            if entry is None:
                await self.group.arrived.wait(self.group.next_due())
                continue
            entry.deliveries += 1
            error = exhausted(entry.deliveries, self.provider.max_deliveries, entry.last_error)
            if error is not None:
                entry.done = True
                self.provider._park(self.group.name, entry.event, error, entry.deliveries - 1)
                continue
            self.held[entry] = None
            return MemoryDelivery(self, entry)

    async def open(self) -> None:
        """Nothing to do: ``consume`` created the group already."""

    async def aclose(self) -> None:
        """Stop; what this member holds unsettled goes back to the group at once."""
        if self.closed:
            return
        self.closed = True
        self.group.members.discard(self)
        held, self.held = list(self.held), {}
        self.group.give_back(held)

    async def __aenter__(self) -> MemoryGroupMember:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()

    # -- settling ----------------------------------------------------------------------------

    def release(self, entry: _Entry) -> bool:
        """``entry`` leaves this member's hands; False when it no longer held it."""
        if entry in self.held:
            del self.held[entry]
            return True
        return False

    def settle(self, entry: _Entry) -> None:
        self.release(entry)
        entry.done = True  # also when it went back to the queue meanwhile: skipped there


def start_entries(events: Iterable[Event], pattern: Pattern,
                  start: StartPosition | dt.datetime) -> list[Event]:
    """The retained published ``events`` a new group starts with: none for ``NOW``, every one
    its pattern matches for ``BEGINNING``, those created at or after an aware datetime."""
    if isinstance(start, dt.datetime):
        if start.tzinfo is None:
            raise ValueError("start must be an aware datetime")
        return [e for e in events if pattern.matches(e.type) and e.created_at >= start]
    if StartPosition(start) is StartPosition.BEGINNING:
        return [e for e in events if pattern.matches(e.type)]
    return []


def check_pattern(group: MemoryGroup, pattern: Pattern) -> None:
    if group.pattern.text != pattern.text:
        raise ProviderError(
            f"consumer group {group.name!r} is already consumed with pattern "
            f"{group.pattern.text!r}; consuming it with {pattern.text!r} as well would "
            "acknowledge events the other pattern needs. Consume one covering pattern per group "
            "(outbox.Consumer dispatches by pattern), use another group or delete this one."
        )

