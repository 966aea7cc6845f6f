"""Redis consumer groups: one member of a group, and its deliveries.

Consumer groups: the consumers of one group share the work, every group gets every entry. An
entry is acknowledged (``XACK``) only when the handler succeeded. ``nack(delay)`` keeps the entry
owned by this consumer and hands it out again after the delay (the redelivery is an ``XCLAIM``,
which counts it as a delivery). Entries idle for more than ``claim_idle`` seconds in the pending
list of another (dead) consumer are taken over with ``XAUTOCLAIM``; while a handler runs, the
consumer refreshes the idle time of the entries it owns so a slow handler is not mistaken for a
dead one. An entry delivered more than ``max_deliveries`` times, an entry a handler gave up on
(``park``) and a malformed entry are copied to ``{stream}:dead`` with the error and acknowledged,
in one ``MULTI``: they never block the group.

Pattern filtering happens here, on the consumer side: entries whose ``type`` does not match are
acknowledged without being handed out. One process consumes a group with one pattern
(:class:`~outbox.providers._bus.GroupRegistry`), so this never acknowledges an event another
pattern of the same process needs.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import heapq
import itertools
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from redis import exceptions as redis_errors

from outbox import wire
from outbox._patterns import Pattern
from outbox.events import Event, utcnow
from outbox.exceptions import MalformedMessage, ProviderError
from outbox.providers._bus import BusDelivery, GroupReader, exhausted
from outbox.providers.base import StartPosition
from outbox.providers.redis._connection import (
    ERRORS,
    chunks,
    is_outage,
    pairs,
    text,
    unavailable,
)

if TYPE_CHECKING:
    from outbox.providers.redis._provider import RedisProvider
    from outbox.providers.redis._shards import ShardOf

__all__ = ["GroupScripts", "RedisDelivery", "RedisGroupReader", "dead_letter", "ensure_group"]

log = logging.getLogger("outbox.providers.redis")

# Entries this consumer still owns. KEYS[1] stream; ARGV[1] group, ARGV[2] consumer, ARGV[3]
# mode, ARGV[4..] entry ids. mode 'touch': reset the idle time (JUSTID, delivery count unchanged),
# return the ids still owned. mode 'claim': claim again as a new delivery (count + 1), return
# {id, fields, count} per entry still owned and still in the stream. mode 'release': set the idle
# time past claim_idle (ARGV[5] = idle ms, ids from ARGV[6]) so others reclaim them at once.
# The owner check makes a consumer that stalled never steal back what another one reclaimed.
_OWNED_LUA = """
local stream, group, me, mode = KEYS[1], ARGV[1], ARGV[2], ARGV[3]
local first = 4
local idle = nil
if mode == 'release' then idle = ARGV[4]; first = 5 end
local out = {}
for i = first, #ARGV do
  local id = ARGV[i]
  local p = redis.call('XPENDING', stream, group, id, id, 1)
  if p[1] and p[1][2] == me then
    if mode == 'touch' then
      redis.call('XCLAIM', stream, group, me, 0, id, 'JUSTID')
      out[#out + 1] = id
    elseif mode == 'release' then
      redis.call('XCLAIM', stream, group, me, 0, id, 'IDLE', idle, 'JUSTID')
      out[#out + 1] = id
    else
      local e = redis.call('XCLAIM', stream, group, me, 0, id)
      if e[1] then out[#out + 1] = {e[1][1], e[1][2], p[1][4] + 1} end
    end
  end
end
return out
"""

# XAUTOCLAIM plus the delivery count of each claimed entry (XAUTOCLAIM does not return it).
# KEYS[1] stream; ARGV group, consumer, min idle ms, cursor, count. Returns
# {next cursor, {{id, fields, count}, ...}, {deleted ids}}.
_AUTOCLAIM_LUA = """
local stream, group, me = KEYS[1], ARGV[1], ARGV[2]
local r = redis.call('XAUTOCLAIM', stream, group, me, ARGV[3], ARGV[4], 'COUNT', ARGV[5])
local claimed = {}
for _, e in ipairs(r[2]) do
  local p = redis.call('XPENDING', stream, group, e[1], e[1], 1)
  local count = 1
  if p[1] then count = p[1][4] end
  claimed[#claimed + 1] = {e[1], e[2], count}
end
return {r[1], claimed, r[3] or {}}
"""


class GroupScripts:
    """The Lua scripts of the group members, registered on one client."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.owned = client.register_script(_OWNED_LUA)
        self.autoclaim = client.register_script(_AUTOCLAIM_LUA)

    async def load(self) -> None:
        """Load them again (the server restarted and lost its script cache)."""
        try:
            for script in (self.owned, self.autoclaim):
                script.sha = await self.client.script_load(script.script)
        except ERRORS as exc:
            raise unavailable(exc, "script load") from exc


async def ensure_group(client: Any, stream: str, group: str,
                       start: StartPosition | dt.datetime) -> None:
    """Create ``group`` on ``stream`` (and the stream) at ``start`` unless it exists."""
    if isinstance(start, dt.datetime):
        if start.tzinfo is None:
            raise ValueError("start must be an aware datetime")
        first = f"{int(start.timestamp() * 1000)}-0"
    elif StartPosition(start) is StartPosition.BEGINNING:
        first = "0"
    else:
        first = "$"
    try:
        await client.xgroup_create(stream, group, id=first, mkstream=True)
        log.info("created consumer group %r on stream %r at %s", group, stream, first)
    except redis_errors.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


async def dead_letter(client: Any, stream: str, dead_stream: str, entry_id: str,
                      fields: Mapping[bytes, bytes], *, group: str, error: str,
                      deliveries: int) -> None:
    """Copy the entry to ``dead_stream`` with the error and ack it, atomically."""
    # Field names as text, so ours replace an entry's own "error"/"group" fields.
    record: dict[str, Any] = {text(k): v for k, v in fields.items()}
    record.update({
        "error": error[:4000], "group": group, "entry": entry_id,
        "deliveries": str(deliveries), "dead_at": utcnow().isoformat(),
    })
    async with client.pipeline(transaction=True) as pipe:
        pipe.xadd(dead_stream, record)
        pipe.xack(stream, group, entry_id)
        await pipe.execute()


class RedisDelivery(BusDelivery):
    """One stream entry handed to a consumer; settle it with ack, nack or park exactly once."""

    _reader: RedisGroupReader

    def __init__(self, event: Event, attempt: int, entry_id: str, reader: RedisGroupReader) -> None:
        super().__init__(event, attempt, reader)
        self.entry_id = entry_id

    def __repr__(self) -> str:
        return f"<RedisDelivery {self.entry_id} attempt={self.attempt} {self.event.type}>"

    async def ack(self) -> None:
        """The handler succeeded: ``XACK`` (raises ProviderUnavailable when Redis is down; the
        delivery stays unsettled, so the call can be retried)."""
        self._check("ack")
        await self._reader.ack(self)
        self._settled = "ack"

    async def nack(self, error: str, *, delay: float = 0.0) -> None:
        """The handler failed: hand the entry out again after ``delay`` seconds."""
        self._check("nack")
        self._reader.nack(self, error, delay)
        self._settled = "nack"

    async def park(self, error: str) -> None:
        """Give up: copy to ``{stream}:dead`` with ``error`` and ack, atomically."""
        self._check("park")
        await self._reader.park(self, error)
        self._settled = "park"


@dataclass(order=True)
class _Due:
    due: float
    order: int
    entry_id: str
    error: str


class RedisGroupReader(GroupReader[RedisDelivery]):
    """One consumer of one group: fetches, reclaims, redelivers and keeps its entries alive.

    The async iterator :meth:`RedisProvider.consume` returns; ``aclose()`` (or ``async with``)
    releases it.
    """

    client_errors = ERRORS
    p: RedisProvider
    _order = itertools.count()

    def __init__(self, provider: RedisProvider, pattern: Pattern, group: str, consumer: str,
                 start: StartPosition | dt.datetime, *, shard: ShardOf | None = None) -> None:
        super().__init__(provider, pattern, group, consumer, start, stream=provider.stream_name,
                         what=f"redis {provider._display}", logger=log)
        self.client = provider._client
        self.stream = provider.stream_name if shard is None else shard.stream
        #: The shard this reads for a sharded member (whose buffer it fills), else ``None``.
        self.shard = shard
        if shard is not None:
            self.buffer = shard.buffer
        #: Entry ids this consumer holds (buffered, handed out, or waiting for redelivery).
        self.owned: set[str] = set()
        self.delayed: list[_Due] = []
        self.to_ack: list[str] = []
        self.group_ready = False
        self.own_pending_done = False
        self.own_pending_from = "-"
        self.autoclaim_cursor = "0-0"
        self.next_autoclaim = 0.0
        #: Claim every pending entry of the group, idle or not (a shard just taken over).
        self.claim_all = False
        if shard is not None:
            # The shard's lease says who reads it: no idle reclaim, and pending entries are
            # taken over (in stream order) by :meth:`take_over` only.
            self.own_pending_done = True
            self.next_autoclaim = float("inf")

    def take_over(self) -> None:
        """This member now holds the shard's lease: claim everything pending in it first (the
        previous owner settled or lost it), in stream order, before reading new entries."""
        self.claim_all = True
        self.autoclaim_cursor = "0-0"
        self.next_autoclaim = 0.0

    def forget(self) -> None:
        """The shard went to another member: drop what is held (its owner claims it)."""
        self.owned.clear()
        self.delayed.clear()
        self.claim_all = False
        self.next_autoclaim = float("inf")

    # -- GroupReader hooks ---------------------------------------------------------------------

    async def _join(self) -> None:
        if not self.group_ready:
            await ensure_group(self.client, self.stream, self.group, self.start_position)
            self.group_ready = True

    def _joined(self) -> bool:
        return self.group_ready

    def _recovered(self, exc: BaseException) -> bool:
        if isinstance(exc, redis_errors.ResponseError) and "NOGROUP" in str(exc):
            log.warning("consumer group %r vanished from %r; creating it again", self.group,
                        self.stream)
            self.group_ready = False
            return True
        return False

    def _refusal(self, exc: BaseException) -> ProviderError | None:
        if is_outage(exc):
            return None
        return ProviderError(f"redis consumer for group {self.group!r} failed: {exc}")

    async def _give_back(self) -> None:
        # Whatever this member still holds (buffered, waiting for a retry, or handed out and
        # never settled) becomes reclaimable by the rest of the group at once.
        ids = list(self.owned)
        with contextlib.suppress(Exception):
            if self.to_ack:
                await self.client.xack(self.stream, self.group, *self.to_ack)
            if ids:
                idle = str(int(self.p.claim_idle * 1000) + 1000)
                for chunk in chunks(ids, 500):
                    await self.p._scripts.owned(keys=[self.stream],
                                               args=[self.group, self.consumer, "release", idle,
                                                     *chunk])

    # -- the fetch loop ----------------------------------------------------------------------

    async def _fill(self) -> None:
        if await self.prepare():
            return
        block = self.wait_time(time.monotonic())
        reply = await self.client.xreadgroup(self.group, self.consumer, {self.stream: ">"},
                                             count=self.p.prefetch, block=max(1, int(block * 1000)))
        await self.take(reply)

    async def prepare(self) -> bool:
        """Everything but reading new entries: acks owed, due retries, own pending entries,
        reclaims. True when deliveries were buffered."""
        await self._join()
        if self.to_ack:
            await self.client.xack(self.stream, self.group, *self.to_ack)
            self.to_ack.clear()
        now = time.monotonic()
        if self.delayed and self.delayed[0].due <= now:
            await self._redeliver_due(now)
            if self.buffer:
                return True
        if not self.own_pending_done:
            await self._take_own_pending()
            if self.buffer:
                return True
        if now >= self.next_autoclaim:
            await self._autoclaim()
            if self.buffer:
                return True
        return False

    def wait_time(self, now: float) -> float:
        """How long a read of new entries may block (until the next retry or reclaim is due)."""
        block = self.p.block
        if self.delayed:
            block = min(block, max(0.001, self.delayed[0].due - now))
        return min(block, max(0.001, self.next_autoclaim - now))

    async def take(self, reply: Any) -> None:
        """Accept the entries of an ``XREADGROUP … >`` reply (first deliveries)."""
        for _stream, entries in reply or ():
            for entry_id, fields in entries:
                await self._accept(text(entry_id), fields, 1, None)

    async def _take_own_pending(self) -> None:
        """Entries this consumer name was given before a restart: take them back now."""
        rows = await self.client.xpending_range(self.stream, self.group, self.own_pending_from,
                                                "+", self.p.prefetch, consumername=self.consumer)
        if not rows:
            self.own_pending_done = True
            return
        self.own_pending_from = "(" + text(rows[-1]["message_id"])
        ids = [text(r["message_id"]) for r in rows if text(r["message_id"]) not in self.owned]
        if ids:
            await self._claim_again(ids, {})

    async def _redeliver_due(self, now: float) -> None:
        due: dict[str, str] = {}
        while self.delayed and self.delayed[0].due <= now and len(due) < self.p.prefetch:
            item = heapq.heappop(self.delayed)
            due[item.entry_id] = item.error
        await self._claim_again(list(due), due)

    async def _claim_again(self, ids: list[str], errors: Mapping[str, str]) -> None:
        reply = await self.p._scripts.owned(keys=[self.stream],
                                           args=[self.group, self.consumer, "claim", *ids])
        got = set()
        for entry_id, flat, count in reply:
            entry = text(entry_id)
            got.add(entry)
            self.owned.discard(entry)
            await self._accept(entry, pairs(flat), int(count), errors.get(entry))
        for entry in ids:
            if entry not in got:  # acked by another consumer, or trimmed from the stream
                self.owned.discard(entry)

    async def _autoclaim(self) -> None:
        idle_ms = "0" if self.claim_all else str(int(self.p.claim_idle * 1000))
        cursor, claimed, deleted = await self.p._scripts.autoclaim(
            keys=[self.stream],
            args=[self.group, self.consumer, idle_ms, self.autoclaim_cursor, self.p.prefetch],
        )
        self.autoclaim_cursor = text(cursor)
        if self.autoclaim_cursor == "0-0":
            self.next_autoclaim = time.monotonic() + min(self.p.claim_idle / 2, 5.0)
            if self.shard is not None:  # taken over: from now on only new entries
                self.claim_all = False
                self.next_autoclaim = float("inf")
        if deleted:
            log.error("%d entries pending in group %r were trimmed from %r (MAXLEN %d) before "
                      "they were acknowledged: raise redis.max_len", len(deleted), self.group,
                      self.stream, self.p.max_len)
        for entry_id, flat, count in claimed:
            entry = text(entry_id)
            if entry in self.owned:  # ours already (its heartbeat was late): keep the one we hold
                continue
            if self.shard is None:
                log.info("reclaimed entry %s of group %r (idle > %.1f s, delivery %d)", entry,
                         self.group, self.p.claim_idle, int(count))
            await self._accept(entry, pairs(flat), int(count), None)

    async def _accept(self, entry_id: str, fields: Mapping[bytes, bytes], attempt: int,
                      last_error: str | None) -> None:
        type_field = fields.get(b"type")
        if (type_field is not None and not self.pattern.match_all
                and not self.pattern.matches(text(type_field))):
            self.to_ack.append(entry_id)  # not for this group's pattern
            return
        error = exhausted(attempt, self.p.max_deliveries, last_error)
        if error is not None:
            await self._park_entry(entry_id, fields, error, attempt - 1)
            return
        raw = fields.get(b"event")
        try:
            if raw is None:
                raise MalformedMessage("stream entry has no 'event' field")
            event = wire.decode(raw)
        except MalformedMessage as exc:
            log.warning("parking malformed entry %s of %r (group %r): %s", entry_id,
                        self.stream, self.group, exc)
            await self._park_entry(entry_id, fields, f"malformed: {exc}", attempt)
            return
        if type_field is None and not self.pattern.matches(event.type):
            self.to_ack.append(entry_id)
            return
        delivery = RedisDelivery(event, attempt, entry_id, self)
        delivery.last_error = last_error
        self.owned.add(entry_id)
        self.buffer.append(delivery)

    async def _park_entry(self, entry_id: str, fields: Mapping[bytes, bytes], error: str,
                          deliveries: int) -> None:
        await dead_letter(self.client, self.stream, self.p.dead_stream, entry_id, fields,
                          group=self.group, error=error, deliveries=deliveries)
        self.p._dead_lettered += 1
        self.owned.discard(entry_id)

    # -- settling ----------------------------------------------------------------------------

    async def ack(self, delivery: RedisDelivery) -> None:
        try:
            await self.client.xack(self.stream, self.group, delivery.entry_id)
        except ERRORS as exc:
            raise unavailable(exc, "xack") from exc
        self.owned.discard(delivery.entry_id)
        self.p._consumed += 1

    def nack(self, delivery: RedisDelivery, error: str, delay: float) -> None:
        if delivery.entry_id not in self.owned:
            return  # another consumer reclaimed it meanwhile: it is theirs now
        heapq.heappush(self.delayed, _Due(time.monotonic() + max(0.0, delay), next(self._order),
                                          delivery.entry_id, error))

    async def park(self, delivery: RedisDelivery, error: str) -> None:
        try:
            raw = await self.client.xrange(self.stream, min=delivery.entry_id,
                                           max=delivery.entry_id)
            fields = raw[0][1] if raw else {
                b"id": str(delivery.event.id).encode(), b"type": delivery.event.type.encode(),
                b"source": delivery.event.source.encode(), b"event": wire.encode(delivery.event),
            }
            await self._park_entry(delivery.entry_id, fields, error, delivery.attempt)
        except ERRORS as exc:
            raise unavailable(exc, "park") from exc

    # -- keeping owned entries alive ----------------------------------------------------------

    async def _keep_alive(self) -> None:
        ids = list(self.owned)
        if not ids:
            return
        try:
            still: set[str] = set()
            for chunk in chunks(ids, 500):
                reply = await self.p._scripts.owned(
                    keys=[self.stream], args=[self.group, self.consumer, "touch", *chunk])
                still.update(text(r) for r in reply)
        except redis_errors.NoScriptError:
            with contextlib.suppress(Exception):
                await self.p._scripts.load()
            return
        except ERRORS as exc:
            log.debug("heartbeat of group %r failed: %s", self.group, exc)
            return
        lost = [i for i in ids if i not in still and i in self.owned]
        if lost:
            log.warning("%d entries of group %r were reclaimed by another consumer or "
                        "trimmed while this one held them", len(lost), self.group)
            for entry in lost:
                self.owned.discard(entry)
            self.delayed = [d for d in self.delayed if d.entry_id in self.owned]
            heapq.heapify(self.delayed)
