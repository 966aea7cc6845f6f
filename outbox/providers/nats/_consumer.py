"""JetStream consumer groups: one member of a group, and its deliveries.

One durable pull consumer per group (durable name = group), ``filter_subject`` mapped from the
pattern (``public.*.create`` → ``{prefix}.*.public.*.create``, ``*`` → ``{prefix}.>``), explicit
ack after the handler succeeded, ``ack_wait`` = ``claim_idle`` (a consumer that dies mid-handler
loses its messages to the rest of the group after that; a live one reports progress with
``in_progress()`` so slow handlers keep theirs). ``nack(delay)`` is a JetStream ``nak`` with delay.
JetStream's ``max_deliver`` is ``max_deliveries + 1``: the extra delivery is never handed to a
handler but moved to the dead-letter stream, so a message that crashed its consumers
``max_deliveries`` times ends in ``failed`` instead of silently stopping.

Dead letters ("failed"): ``park()``, exhausted deliveries and malformed messages are published to
the stream ``{stream_name}_DEAD`` on ``{subject_prefix}_dead.{group}.…`` (headers
``Outbox-Error``, ``Outbox-Group``, ``Outbox-Deliveries``; the original document unchanged) and
then terminated with ``term()``. They never block the consumer.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import nats.js.errors as js_errors
from nats.aio.msg import Msg
from nats.js import api as js_api

from outbox import wire
from outbox._patterns import Pattern
from outbox.events import Event, utcnow
from outbox.exceptions import MalformedMessage, ProviderError, ProviderUnavailable
from outbox.providers._bus import BusDelivery, GroupReader, exhausted
from outbox.providers.base import StartPosition
from outbox.providers.nats._connection import (
    ERRORS,
    MSG_ID_HEADER,
    Connection,
    unavailable,
)
from outbox.providers.nats._subjects import filter_subject

if TYPE_CHECKING:
    from outbox.providers.nats._provider import NATSProvider

__all__ = ["NATSDelivery", "NATSGroupReader", "PartitionedGroupReader", "dead_letter",
           "ensure_consumer", "partition_durable"]

log = logging.getLogger("outbox.providers.nats")


async def ensure_consumer(p: NATSProvider, group: str, pattern: Pattern,
                          start: StartPosition | dt.datetime, *,
                          partition: int | None = None) -> None:
    """Create the durable of ``group`` (``partition``: the group's durable of that partition,
    one message in flight) at ``start``, or bring its ``ack_wait``/``max_deliver`` up to the
    configuration; a durable that filters another pattern is refused."""
    js = p._conn.js
    wanted_filter = filter_subject(p.subject_prefix, pattern.text, partitions=p.partitions,
                                   partition=partition)
    max_ack_pending = p.max_ack_pending
    if partition is not None:
        group, max_ack_pending = partition_durable(group, partition), 1
    try:
        info = await js.consumer_info(p.stream_name, group)
    except js_errors.NotFoundError:
        info = None
    if info is not None:
        have = info.config.filter_subject or f"{p.subject_prefix}.>"
        if have != wanted_filter:
            raise ProviderError(
                f"JetStream durable {group!r} on {p.stream_name!r} filters {have!r}, not "
                f"{wanted_filter!r} (pattern {pattern.text!r}): use the pattern it was "
                "created with, another group, or delete the durable"
            )
        if (info.config.max_deliver == p.max_deliveries + 1
                and abs((info.config.ack_wait or 0) - p.claim_idle) < 0.001):
            return
    config = js_api.ConsumerConfig(
        durable_name=group,
        name=group,
        ack_policy=js_api.AckPolicy.EXPLICIT,
        ack_wait=p.claim_idle,
        max_deliver=p.max_deliveries + 1,
        filter_subject=wanted_filter,
        max_ack_pending=max_ack_pending,
        replay_policy=js_api.ReplayPolicy.INSTANT,
    )
    if info is not None:  # update ack_wait / max_deliver, keep where it was
        config.deliver_policy = info.config.deliver_policy
        config.opt_start_time = info.config.opt_start_time
    elif isinstance(start, dt.datetime):
        if start.tzinfo is None:
            raise ValueError("start must be an aware datetime")
        config.deliver_policy = js_api.DeliverPolicy.BY_START_TIME
        config.opt_start_time = start
    elif StartPosition(start) is StartPosition.BEGINNING:
        config.deliver_policy = js_api.DeliverPolicy.ALL
    else:
        config.deliver_policy = js_api.DeliverPolicy.NEW
    try:
        await js.add_consumer(p.stream_name, config)
    except js_errors.APIError as exc:
        if info is None:
            raise
        log.warning("could not update durable %r (ack_wait/max_deliver): %s", group,
                    exc.description)
    else:
        log.info("%s JetStream durable %r filtering %s", "updated" if info else "created",
                 group, wanted_filter)


def partition_durable(group: str, partition: int) -> str:
    """The durable of ``group`` for one partition (``nats.partitions`` > 1)."""
    return f"{group}_p{partition}"


async def dead_letter(conn: Connection, *, group: str, data: bytes, error: str, deliveries: int,
                      event_id: str | None, subject: str | None) -> None:
    """Publish to ``{stream}_DEAD`` and wait for the ack (the caller then terms)."""
    await conn.ensure_dead_stream()
    tail = subject[len(conn.subject_prefix) + 1:] if subject else "unknown"
    headers = {
        "Outbox-Error": error.replace("\r", " ").replace("\n", " ")[:4000],
        "Outbox-Group": group,
        "Outbox-Deliveries": str(deliveries),
        "Outbox-Dead-At": utcnow().isoformat(),
    }
    if event_id:
        headers[MSG_ID_HEADER] = f"{group}:{event_id}"
    await conn.js.publish(f"{conn.dead_prefix}.{group}.{tail}", data, headers=headers,
                          timeout=conn.request_timeout)


class NATSDelivery(BusDelivery):
    """One JetStream message handed to a consumer; settle it with ack, nack or park once."""

    _reader: NATSGroupReader

    def __init__(self, event: Event, attempt: int, msg: Msg, reader: NATSGroupReader) -> None:
        super().__init__(event, attempt, reader)
        self.msg = msg

    def __repr__(self) -> str:
        return f"<NATSDelivery {self.msg.subject} attempt={self.attempt} id={self.event.id}>"

    async def ack(self) -> None:
        """The handler succeeded: acknowledge, and wait until the server confirmed the ack
        (raises ProviderUnavailable otherwise; the delivery stays unsettled, retry the call)."""
        self._check("ack")
        try:
            await self.msg.ack_sync(timeout=self._reader.p.request_timeout)
        except ERRORS as exc:
            raise unavailable(exc, "ack") from exc
        self._settled = "ack"
        self._reader.settled(self)

    async def nack(self, error: str, *, delay: float = 0.0) -> None:
        """The handler failed: JetStream redelivers after ``delay`` seconds."""
        self._check("nack")
        try:
            await self.msg.nak(delay=delay if delay > 0 else None)
        except ERRORS as exc:
            raise unavailable(exc, "nak") from exc
        self._settled = "nack"
        self._reader.settled(self, error)

    async def park(self, error: str) -> None:
        """Give up: publish to the dead-letter stream, then ``term()``."""
        self._check("park")
        await self._reader.park(self.msg, error, self.attempt, str(self.event.id))
        self._settled = "park"
        self._reader.settled(self)


class NATSGroupReader(GroupReader[NATSDelivery]):
    """A member of one group: fetches from the group's durable and keeps slow handlers alive.

    The async iterator :meth:`NATSProvider.consume` returns; ``aclose()`` (or ``async with``)
    stops it.
    """

    client_errors = (*ERRORS, ProviderUnavailable)
    p: NATSProvider

    def __init__(self, provider: NATSProvider, pattern: Pattern, group: str, consumer: str,
                 start: StartPosition | dt.datetime) -> None:
        super().__init__(provider, pattern, group, consumer, start, stream=provider.stream_name,
                         what=f"nats {provider._display}", logger=log)
        #: Handed out and not settled, in hand-out order (given back in that order).
        self.in_flight: dict[NATSDelivery, None] = {}
        #: Last error per event id, for the dead letter of a message that ran out of deliveries.
        self.errors: OrderedDict[str, str] = OrderedDict()
        self.sub: Any = None

    # -- GroupReader hooks ---------------------------------------------------------------------

    async def _join(self) -> None:
        _nc, js = await self.p._conn.get()
        await ensure_consumer(self.p, self.group, self.pattern, self.start_position)
        self.sub = await js.pull_subscribe_bind(durable=self.group, stream=self.p.stream_name)

    def _joined(self) -> bool:
        return self.sub is not None

    def _recovered(self, exc: BaseException) -> bool:
        if not isinstance(exc, js_errors.NotFoundError):
            return False
        # The stream or the durable vanished (deleted by an operator, server lost its storage):
        # create them again.
        log.warning("JetStream durable %r or its stream is gone (%s); recreating", self.group,
                    exc.description)
        self.p._conn.stream_ready = False
        self.sub = None
        return True

    def _refusal(self, exc: BaseException) -> ProviderError | None:
        if isinstance(exc, js_errors.APIError) and (exc.code or 0) < 500:
            return ProviderError(f"JetStream refused the consumer of group {self.group!r}: "
                                 f"{exc}")
        return None

    def _handing_out(self, delivery: NATSDelivery) -> None:
        self.in_flight[delivery] = None

    async def _give_back(self) -> None:
        # Nak what this member holds, so the group gets it at once (in the order it came).
        for delivery in [*self.in_flight, *self.buffer]:
            if not delivery.settled:
                with contextlib.suppress(Exception):
                    await delivery.msg.nak()
        self.buffer.clear()
        self.in_flight.clear()
        if self.sub is not None:
            with contextlib.suppress(Exception):
                await self.sub.unsubscribe()

    async def _keep_alive(self) -> None:
        """``in_progress()`` for the messages held (every third of ack_wait)."""
        for delivery in list(self.in_flight) + list(self.buffer):
            if not delivery.settled:
                with contextlib.suppress(Exception):
                    await delivery.msg.in_progress()

    # -- fetching --------------------------------------------------------------------------------

    async def _fill(self) -> None:
        if self.sub is None:
            await self._join()
        try:
            batch = await self.sub.fetch(self.p.prefetch, timeout=self.p.block)
        except TimeoutError:  # nats-py raises its own or asyncio's
            if not self.p._conn.nc.is_connected:
                raise unavailable("client is reconnecting", "fetch") from None
            return  # nothing new
        for msg in batch:
            await self._accept(msg)

    async def _accept(self, msg: Msg) -> None:
        attempt = msg.metadata.num_delivered
        msg_id = (msg.headers or {}).get(MSG_ID_HEADER)
        last = self.errors.get(msg_id) if msg_id else None
        error = exhausted(attempt, self.p.max_deliveries, last)
        if error is not None:
            if msg_id:
                self.errors.pop(msg_id, None)
            await self.park(msg, error, attempt - 1, msg_id)
            return
        try:
            event = wire.decode(msg.data)
        except MalformedMessage as exc:
            log.warning("parking malformed message %s (stream seq %d, group %r): %s",
                        msg.subject, msg.metadata.sequence.stream, self.group, exc)
            await self.park(msg, f"malformed: {exc}", attempt, msg_id)
            return
        if not self.pattern.matches(event.type):  # the subject filter matched, the type not
            await msg.ack()
            return
        delivery = NATSDelivery(event, attempt, msg, self)
        delivery.last_error = self.errors.get(str(event.id))
        self.buffer.append(delivery)

    async def park(self, msg: Msg, error: str, deliveries: int, event_id: str | None) -> None:
        try:
            await dead_letter(self.p._conn, group=self.group, data=msg.data, error=error,
                              deliveries=deliveries, event_id=event_id, subject=msg.subject)
            self.p._dead_lettered += 1
            await msg.term()
        except ERRORS as exc:
            raise unavailable(exc, "park") from exc

    def settled(self, delivery: NATSDelivery, error: str | None = None) -> None:
        self.in_flight.pop(delivery, None)
        key = str(delivery.event.id)
        if error is None:
            self.errors.pop(key, None)
            if delivery._settled == "ack":
                self.p._consumed += 1
        else:
            self.errors[key] = error
            while len(self.errors) > 10000:
                self.errors.popitem(last=False)


class PartitionedGroupReader(NATSGroupReader):
    """A member of a group over ``nats.partitions`` partitions: per-key order across the group.

    The relay puts an event on ``{prefix}.{partition}.{source}.{type}``, the partition a hash of
    its ordering key. The group has one durable per partition (``{group}_p{i}``) with
    ``max_ack_pending`` 1: JetStream hands a partition's next message to any member only once
    the previous one was acknowledged or terminated (or its ``ack_wait`` ran out: the member
    died), so the group as a whole handles a key's events one at a time, in stream order. Each
    member keeps a pull request open on every partition (one task each) and handles what comes.
    A nacked message holds its partition back until it was handled again or parked.
    """

    def __init__(self, provider: NATSProvider, pattern: Pattern, group: str, consumer: str,
                 start: StartPosition | dt.datetime) -> None:
        super().__init__(provider, pattern, group, consumer, start)
        self.arrived: asyncio.Queue[Msg] = asyncio.Queue()
        self.pullers: list[asyncio.Task[None]] = []
        self.subs: list[Any] = []

    async def _join(self) -> None:
        await self._stop_pulling()
        _nc, js = await self.p._conn.get()
        for i in range(self.p.partitions):  # all first: none misses messages meanwhile
            await ensure_consumer(self.p, self.group, self.pattern, self.start_position,
                                  partition=i)
        for i in range(self.p.partitions):
            self.subs.append(await js.pull_subscribe_bind(
                durable=partition_durable(self.group, i), stream=self.p.stream_name))
        loop = asyncio.get_running_loop()
        self.pullers = [loop.create_task(self._pull(sub)) for sub in self.subs]
        self.sub = self.subs[0]

    async def _pull(self, sub: Any) -> None:
        """Keep one pull request open on a partition; what arrives goes to ``arrived``."""
        while True:
            try:
                batch = await sub.fetch(1, timeout=self.p.block)
            except TimeoutError:  # nats-py raises its own or asyncio's
                continue
            except js_errors.NotFoundError:  # the durable or stream vanished: join again
                self.sub = None
                return
            except ERRORS as exc:  # an outage: _fill notices the connection and waits
                log.debug("pull of group %r failed: %s", self.group, exc)
                await asyncio.sleep(self.p._conn.reconnect_wait)
                continue
            for msg in batch:
                self.arrived.put_nowait(msg)

    async def _fill(self) -> None:
        if self.sub is None:
            await self._join()
        try:
            msg = await asyncio.wait_for(self.arrived.get(), timeout=self.p.block)
        except TimeoutError:
            if not self.p._conn.nc.is_connected:
                raise unavailable("client is reconnecting", "fetch") from None
            return
        await self._accept(msg)
        while not self.arrived.empty():
            await self._accept(self.arrived.get_nowait())

    async def _stop_pulling(self) -> None:
        for task in self.pullers:
            task.cancel()
        for task in self.pullers:
            with contextlib.suppress(BaseException):
                await task
        self.pullers = []
        for sub in self.subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        self.subs = []

    async def _give_back(self) -> None:
        await self._stop_pulling()
        while not self.arrived.empty():  # fetched, never buffered: back to the group
            with contextlib.suppress(Exception):
                await self.arrived.get_nowait().nak()
        self.sub = None
        await super()._give_back()
