"""Sharded consumer groups (``redis.shards`` > 1): per-key order across the members of a group.

The relay appends each event to the stream of its shard (a hash of its ordering key, see
:func:`~outbox.providers._bus.shard_of`), so a key's events are in order in one stream. Each shard
is read by one member of a group at a time:

- members announce themselves in the sorted set ``{stream}:members:{group}`` (expiry = Redis time
  + ``claim_idle``, renewed on every balance); every member computes the same assignment from it
  (:func:`~outbox.providers._bus.assigned_shards`);
- a member reads a shard only while it holds the shard's lease, the key
  ``{shard stream}:lease:{group}`` (``SET NX PX claim_idle``, renewed every balance);
- a shard assigned to another member is *drained*: no new reads, and its lease is released only
  once every delivery handed out from it was settled (retries not yet handed out go with it); a
  member that dies keeps its leases until they expire (``claim_idle``);
- the member that takes a lease first claims every entry still pending in the shard (the previous
  owner's, in stream order, as redeliveries), then reads new entries.

Members joining or leaving therefore move shards without two members ever reading one shard,
so the group as a whole hands out a key's events in stream order. Balancing runs at least every
second and in the heartbeat.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from redis import exceptions as redis_errors

from outbox._patterns import Pattern
from outbox.exceptions import ProviderError
from outbox.providers._bus import GroupReader, assigned_shards
from outbox.providers.base import StartPosition
from outbox.providers.redis._connection import ERRORS, text
from outbox.providers.redis._consumer import RedisDelivery, RedisGroupReader, ensure_group

if TYPE_CHECKING:
    from outbox.providers.redis._provider import RedisProvider

__all__ = ["ShardOf", "ShardScripts", "ShardedGroupReader"]

log = logging.getLogger("outbox.providers.redis")

# KEYS[1] the members set; ARGV[1] member, ARGV[2] ttl ms, ARGV[3] 'beat' or 'leave'.
# Drops expired members (by the server's clock); 'beat' (re)announces ARGV[1] and returns the
# live members, 'leave' removes it.
_MEMBERS_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if ARGV[3] == 'leave' then
  redis.call('ZREM', KEYS[1], ARGV[1])
  return {}
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]) * 2)
return redis.call('ZRANGE', KEYS[1], 0, -1)
"""

# KEYS lease keys; ARGV[1] member, ARGV[2] ttl ms, ARGV[2 + i] the action on KEYS[i]: 'take'
# (acquire when free, renew when ours), 'keep' (renew when ours), 'drop' (delete when ours).
# Returns 1 per key this member holds afterwards, else 0.
_LEASES_LUA = """
local me, ttl = ARGV[1], ARGV[2]
local out = {}
for i = 1, #KEYS do
  local action = ARGV[i + 2]
  local owner = redis.call('GET', KEYS[i])
  local held = 0
  if owner == me then
    if action == 'drop' then
      redis.call('DEL', KEYS[i])
    else
      redis.call('PEXPIRE', KEYS[i], ttl)
      held = 1
    end
  elseif not owner and action == 'take' then
    redis.call('SET', KEYS[i], me, 'PX', ttl)
    held = 1
  end
  out[i] = held
end
return out
"""


class ShardScripts:
    """The Lua scripts of sharded groups, registered on one client."""

    def __init__(self, client: Any) -> None:
        self.members = client.register_script(_MEMBERS_LUA)
        self.leases = client.register_script(_LEASES_LUA)


@dataclass
class ShardOf:
    """What a shard's reader needs from the member it belongs to."""

    stream: str
    buffer: deque[RedisDelivery]


class ShardedGroupReader(GroupReader[RedisDelivery]):
    """One member of a group over ``redis.shards`` streams (see the module docstring).

    Deliveries, settling and dead letters are those of :class:`RedisGroupReader`, one per shard
    (they fill this member's buffer); this class decides which shards it reads.
    """

    client_errors = ERRORS
    p: RedisProvider

    def __init__(
        self,
        provider: RedisProvider,
        pattern: Pattern,
        group: str,
        consumer: str,
        start: StartPosition | dt.datetime,
    ) -> None:
        super().__init__(
            provider,
            pattern,
            group,
            consumer,
            start,
            stream=provider.stream_name,
            what=f"redis {provider._display}",
            logger=log,
        )
        self.client = provider._client
        self.parts = [
            RedisGroupReader(
                provider, pattern, group, consumer, start, shard=ShardOf(stream, self.buffer)
            )
            for stream in provider.streams
        ]
        self.by_stream = {part.stream: part for part in self.parts}
        self.members_key = f"{provider.stream_name}:members:{group}"
        self.lease_keys = [f"{part.stream}:lease:{group}" for part in self.parts]
        #: Shards whose lease this member holds, and those of them it is draining.
        self.held: set[int] = set()
        self.draining: set[int] = set()
        self.groups_ready = False
        self.next_balance = 0.0
        self.interval = min(1.0, provider.claim_idle / 3)
        self._lock: asyncio.Lock | None = None

    # -- GroupReader hooks ---------------------------------------------------------------------

    async def _join(self) -> None:
        if not self.groups_ready:  # on every shard now, so none misses entries added meanwhile
            for part in self.parts:
                await ensure_group(self.client, part.stream, self.group, self.start_position)
                part.group_ready = True
            self.groups_ready = True

    def _joined(self) -> bool:
        return self.groups_ready

    def _recovered(self, exc: BaseException) -> bool:
        if isinstance(exc, redis_errors.ResponseError) and "NOGROUP" in str(exc):
            log.warning(
                "consumer group %r vanished from a shard of %r; creating it again",
                self.group,
                self.p.stream_name,
            )
            self.groups_ready = False
            return True
        return False

    def _refusal(self, exc: BaseException) -> ProviderError | None:
        return self.parts[0]._refusal(exc)

    async def _keep_alive(self) -> None:
        # Leases, not idle times, guard a shard's entries: renewing them is the heartbeat.
        try:
            await self._balance()
        except ERRORS as exc:
            log.debug("balancing group %r failed: %s", self.group, exc)

    async def _give_back(self) -> None:
        for i in sorted(self.held):
            await self.parts[i]._give_back()
        with contextlib.suppress(Exception):
            held = sorted(self.held)
            if held:
                await self.p._shard_scripts.leases(
                    keys=[self.lease_keys[i] for i in held],
                    args=[self.consumer, self._ttl_ms(), *["drop"] * len(held)],
                )
            await self.p._shard_scripts.members(
                keys=[self.members_key], args=[self.consumer, self._ttl_ms(), "leave"]
            )
        self.held.clear()

    # -- fetching --------------------------------------------------------------------------------

    async def _fill(self) -> None:
        await self._join()
        now = time.monotonic()
        if now >= self.next_balance:
            await self._balance()
        for i in sorted(self.held):
            if await self.parts[i].prepare():
                return
        reading = [
            self.parts[i] for i in sorted(self.held - self.draining) if not self.parts[i].claim_all
        ]
        now = time.monotonic()
        block = min(
            [
                self.p.block,
                max(0.001, self.next_balance - now),
                *(part.wait_time(now) for part in self.parts if part.delayed),
            ]
        )
        if not reading:
            await asyncio.sleep(block)
            return
        reply = await self.client.xreadgroup(
            self.group,
            self.consumer,
            {part.stream: ">" for part in reading},
            count=self.p.prefetch,
            block=max(1, int(block * 1000)),
        )
        for stream, entries in reply or ():
            part = self.by_stream.get(text(stream))
            if part is not None:
                await part.take([(stream, entries)])

    # -- shards ----------------------------------------------------------------------------------

    def _ttl_ms(self) -> str:
        return str(int(self.p.claim_idle * 1000))

    def _in_flight(self, i: int) -> bool:
        """Deliveries of shard ``i`` buffered or handed out and not settled (retries waiting
        for their delay do not count: the next owner claims them)."""
        part = self.parts[i]
        waiting = {d.entry_id for d in part.delayed}
        return bool(part.owned - waiting) or bool(part.to_ack)

    async def _balance(self) -> None:
        """Announce this member, then take the shards assigned to it that are free, renew the
        leases it holds, and release drained shards (see the module docstring)."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self.closed:
                return
            ttl = self._ttl_ms()
            members = await self.p._shard_scripts.members(
                keys=[self.members_key], args=[self.consumer, ttl, "beat"]
            )
            wanted = assigned_shards([text(m) for m in members], self.consumer, len(self.parts))
            actions: dict[int, str] = {i: "take" for i in wanted}
            for i in self.held - wanted:
                actions[i] = "keep" if self._in_flight(i) else "drop"
            shards = sorted(actions)
            reply = await self.p._shard_scripts.leases(
                keys=[self.lease_keys[i] for i in shards],
                args=[self.consumer, ttl, *(actions[i] for i in shards)],
            )
            self.next_balance = time.monotonic() + self.interval
            for i, held in zip(shards, reply, strict=True):
                part = self.parts[i]
                if int(held) and i not in self.held:
                    self.held.add(i)
                    part.take_over()
                    log.info(
                        "group %r: member %r took shard %s", self.group, self.consumer, part.stream
                    )
                elif not int(held) and i in self.held:
                    self.held.discard(i)
                    if actions[i] != "drop":
                        log.warning(
                            "group %r: member %r lost the lease of shard %s (it did "
                            "not renew it within claim_idle); another member reads it",
                            self.group,
                            self.consumer,
                            part.stream,
                        )
                    part.forget()
                    self._unbuffer(part)
            self.draining = self.held - wanted

    def _unbuffer(self, part: RedisGroupReader) -> None:
        """Drop buffered deliveries of ``part`` (not handed out yet; its new owner has them)."""
        kept = [d for d in self.buffer if d._reader is not part]
        if len(kept) != len(self.buffer):
            self.buffer.clear()
            self.buffer.extend(kept)
