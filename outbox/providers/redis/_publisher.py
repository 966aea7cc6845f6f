"""Publishing to a Redis stream: ``XADD`` once per event id, a batch in about one round trip.

One Lua call per chunk of events: for each event, a dedupe key ``{stream}:id:{event_id}`` (kept
``duplicate_window`` seconds) is read and, only when it is new, the entry is added with
``XADD {stream} MAXLEN ~ max_len * id … type … source … event …`` (``event`` is the CloudEvents
document, :mod:`outbox.wire`) and the key set. A relay that retries after a timeout therefore adds
no second entry. Chunks are pipelined.

With ``redis.shards`` > 1 there is one stream per shard and an event goes to the shard of its
ordering key (:func:`~outbox.providers._bus.shard_of`); its dedupe key is the shard stream's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from redis import exceptions as redis_errors

from outbox import wire
from outbox.events import Event
from outbox.exceptions import MalformedMessage
from outbox.providers._bus import shard_of
from outbox.providers.redis._connection import (
    ERRORS,
    chunks,
    is_stale_connection,
    text,
    unavailable,
)

__all__ = ["StreamPublisher"]

# KEYS[1] stream, KEYS[2..] dedupe keys; ARGV[1] maxlen ('0' = no trim), ARGV[2] ttl ms, then
# four values per event: id, type, source, document. Returns one reply per event: the new entry
# id, or '=' .. the entry id already recorded for that event id (a duplicate).
_PUBLISH_LUA = """
local maxlen = tonumber(ARGV[1])
local ttl = ARGV[2]
local out = {}
for i = 2, #KEYS do
  local base = 3 + (i - 2) * 4
  local existing = redis.call('GET', KEYS[i])
  if existing then
    out[#out + 1] = '=' .. existing
  else
    local entry
    if maxlen > 0 then
      entry = redis.call('XADD', KEYS[1], 'MAXLEN', '~', maxlen, '*', 'id', ARGV[base],
                         'type', ARGV[base + 1], 'source', ARGV[base + 2], 'event', ARGV[base + 3])
    else
      entry = redis.call('XADD', KEYS[1], '*', 'id', ARGV[base], 'type', ARGV[base + 1],
                         'source', ARGV[base + 2], 'event', ARGV[base + 3])
    end
    redis.call('SET', KEYS[i], entry, 'PX', ttl)
    out[#out + 1] = entry
  end
end
return out
"""


class StreamPublisher:
    """Appends events to ``streams`` (one per shard) once per id (see the module docstring)."""

    def __init__(self, client: Any, streams: Sequence[str], *, max_len: int,
                 duplicate_window: float, chunk: int) -> None:
        self.client = client
        self.streams = list(streams)
        self.max_len = max_len
        self.duplicate_window = duplicate_window
        self.chunk = chunk
        self.script = client.register_script(_PUBLISH_LUA)
        self.published = 0
        self.duplicates = 0

    @staticmethod
    def dedupe_key(stream: str, event_id: str) -> str:
        return f"{stream}:id:{event_id}"

    async def publish_many(self, events: Sequence[Event]) -> list[BaseException | None]:
        """Results in input order: an event that cannot be encoded gets its error in its slot;
        any Redis failure raises :class:`ProviderUnavailable` for the whole call (the
        caller retries and the dedupe keys drop what had arrived)."""
        results: list[BaseException | None] = [None] * len(events)
        shard_rows: list[list[tuple[int, str, bytes, bytes, bytes]]] = [[] for _ in self.streams]
        for index, event in enumerate(events):
            try:
                document = wire.encode(event)
            except MalformedMessage as exc:
                results[index] = exc
                continue
            state = event.__dict__
            shard_rows[shard_of(event, len(self.streams))].append(
                (index, str(state["id"]), state["type"].encode(), state["source"].encode(),
                 document))
        if not any(shard_rows):
            return results
        ttl_ms = str(int(self.duplicate_window * 1000))
        maxlen = str(self.max_len)
        batches = [(stream, batch) for stream, shard in zip(self.streams, shard_rows, strict=True)
                   for batch in chunks(shard, self.chunk)]
        stale_retry = script_retry = True
        while True:
            try:
                async with self.client.pipeline(transaction=False) as pipe:
                    for stream, batch in batches:
                        keys = [stream] + [self.dedupe_key(stream, r[1]) for r in batch]
                        args: list[Any] = [maxlen, ttl_ms]
                        for row in batch:
                            args.extend(row[1:])
                        pipe.evalsha(self.script.sha, len(keys), *keys, *args)
                    replies = await pipe.execute(raise_on_error=False)
            except ERRORS as exc:
                if stale_retry and is_stale_connection(exc):
                    stale_retry = False  # safe to repeat: the dedupe keys drop what arrived
                    continue
                raise unavailable(exc, "publish") from exc
            if script_retry and any(isinstance(r, redis_errors.NoScriptError) for r in replies):
                script_retry = False  # the server restarted and lost its script cache
                await self._load_script()
                continue
            break
        for reply in replies:
            if isinstance(reply, BaseException):
                raise unavailable(reply, "publish")
            for value in reply:
                if text(value).startswith("="):
                    self.duplicates += 1
                else:
                    self.published += 1
        return results

    async def _load_script(self) -> None:
        try:
            self.script.sha = await self.client.script_load(self.script.script)
        except ERRORS as exc:
            raise unavailable(exc, "script load") from exc
