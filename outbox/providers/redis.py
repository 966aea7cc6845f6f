"""Redis Streams provider, on redis-py's asyncio client.

Publishing
    One Lua call per chunk of events: for each event, ``SET NX`` of a dedupe key
    ``{stream}:id:{event_id}`` (kept ``duplicate_window`` seconds) and, only when the key was new,
    ``XADD {stream} MAXLEN ~ max_len * id … type … source … event …`` where ``event`` is the
    CloudEvents document (:mod:`outbox.wire`). A relay that retries after a timeout therefore
    adds no second entry. Chunks are pipelined, so a batch costs about one round trip.

Consuming (:meth:`RedisProvider.consume`)
    Consumer groups: the consumers of one group share the work, every group gets every entry. An
    entry is acknowledged (``XACK``) only when the handler succeeded. ``nack(delay)`` keeps the
    entry owned by this consumer and hands it out again after the delay (the redelivery is an
    ``XCLAIM``, which counts it as a delivery). Entries idle for more than ``claim_idle`` seconds
    in the pending list of another (dead) consumer are taken over with ``XAUTOCLAIM``; while a
    handler runs, the consumer refreshes the idle time of the entries it owns so a slow handler is
    not mistaken for a dead one. An entry delivered more than ``max_deliveries`` times, an entry
    a handler gave up on (``park``) and a malformed entry are copied to ``{stream}:dead`` with the
    error and acknowledged, in one ``MULTI``: they never block the group.

    Pattern filtering happens here, on the consumer side: entries whose ``type`` does not match
    are acknowledged without being handed out. One process consumes a group with one pattern
    (:class:`~outbox.providers._bus.GroupRegistry`), so this never acknowledges an event another
    pattern of the same process needs.

Outages
    redis-py retries a failing command once, quickly (a pooled connection may be stale after a
    server restart); after that the error surfaces as :class:`~outbox.ProviderUnavailable` within
    ``connect_timeout``/``socket_timeout``. Consumers reconnect with exponential backoff on their
    own and log the outage once. Redis errors that are not about one event (``OOM``, ``LOADING``,
    ``READONLY``, ``WRONGTYPE`` on the stream key, ACL refusals) are outages too: no event is
    failed because of the broker.

Limits
    ``max_len`` trims the stream approximately: an entry that a group has not read before it is
    trimmed is lost to that group (logged when ``XAUTOCLAIM`` notices). Size ``max_len`` for the
    backlog your slowest group may build up. Standalone Redis only (no Cluster).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import heapq
import itertools
import logging
import ssl
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from outbox import wire
from outbox.events import Event, EventStatus, get_instance_id, utcnow
from outbox.exceptions import (
    MalformedMessage,
    MissingDependency,
    ProviderError,
    ProviderUnavailable,
)
from outbox.patterns import Pattern, compile_pattern
from outbox.providers._bus import (
    Backoff,
    BusDelivery,
    GroupReader,
    OutageLog,
    config_section,
    decode_or_none,
    exhausted,
    from_record,
    redact_url,
    to_record,
    validate_group,
)
from outbox.providers.base import (
    Capabilities,
    EventFilter,
    EventNotFound,
    ProviderStats,
    StartPosition,
    apply_status,
    as_event_id,
)

try:
    import redis.asyncio as aioredis
    from redis import exceptions as redis_errors
    from redis.asyncio.retry import Retry
    from redis.backoff import ExponentialBackoff
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise MissingDependency("RedisProvider", "redis", "redis") from exc

__all__ = ["RedisDelivery", "RedisGroupReader", "RedisProvider"]

log = logging.getLogger(__name__)

DEFAULT_URL = "redis://127.0.0.1:6379/0"

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

# Error replies that say "the server cannot take this now", not "this event is wrong".
_OUTAGE_REPLIES = frozenset({
    "OOM", "LOADING", "BUSY", "READONLY", "MASTERDOWN", "CLUSTERDOWN", "TRYAGAIN",
    "NOREPLICAS", "NOAUTH", "WRONGPASS", "NOPERM", "WRONGTYPE", "NOSCRIPT", "UNBLOCKED",
    "MISCONF",
})


def _is_outage(exc: BaseException) -> bool:
    if isinstance(exc, redis_errors.ConnectionError | redis_errors.TimeoutError | OSError
                  | asyncio.TimeoutError):
        return True
    if isinstance(exc, redis_errors.ResponseError):
        return str(exc).split(" ", 1)[0] in _OUTAGE_REPLIES
    return False


def _is_stale_connection(exc: BaseException) -> bool:
    """A pooled connection that died with a server restart. redis-py raises this once, from
    checking the connection out of the pool, outside its own retry loop."""
    permanent = redis_errors.AuthenticationError | redis_errors.BusyLoadingError
    return (isinstance(exc, redis_errors.ConnectionError) and not isinstance(exc, permanent)
            and "closed by server" in str(exc).lower())


def _unavailable(exc: BaseException, what: str) -> ProviderUnavailable:
    # redis-py messages name host:port, never the password.
    return ProviderUnavailable(f"redis unavailable ({what}): {type(exc).__name__}: {exc}")


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes | bytearray) else str(value)


def _chunks(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [items[i:i + size] for i in range(0, len(items), size)]


class RedisProvider:
    """Redis Streams transport (see the module docstring for the guarantees).

    ``url`` (``redis://``/``rediss://``/``unix://``) or ``host``/``port``/``db``; ``password``/
    ``username`` override the URL's. TLS: a ``rediss://`` URL or ``tls=True``, with ``ca_file``
    and a client certificate (``cert_file``/``key_file``). All durations are in seconds.
    """

    name: ClassVar[str] = "redis"
    capabilities: ClassVar[Capabilities] = Capabilities(
        persistent=True, cross_instance=True, consumer_groups=True, full_query=True
    )

    def __init__(
        self,
        url: str | None = None,
        *,
        host: str | None = None,
        port: int | None = None,
        db: int | None = None,
        username: str | None = None,
        password: str | None = None,
        stream_name: str = "outbox:events",
        consumer_group: str = "outbox-workers",
        max_len: int | None = 10000,
        tls: bool | None = None,
        ca_file: str | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
        socket_timeout: float = 5.0,
        connect_timeout: float = 5.0,
        claim_idle: float = 30.0,
        max_deliveries: int = 10,
        duplicate_window: float = 120.0,
        block: float = 1.0,
        prefetch: int = 32,
        publish_chunk: int = 200,
        client: Any = None,
    ) -> None:
        if not stream_name:
            raise ValueError("redis.stream_name must not be empty")
        if max_len is not None and max_len < 0:
            raise ValueError("redis.max_len must be >= 0 (0 or None: no trimming)")
        if claim_idle <= 0:
            raise ValueError("redis.claim_idle must be > 0 seconds")
        if max_deliveries < 1:
            raise ValueError("redis.max_deliveries must be >= 1")
        if duplicate_window <= 0:
            raise ValueError("redis.duplicate_window must be > 0 seconds")
        if socket_timeout <= block:
            raise ValueError("redis.socket_timeout must be longer than the consumer's block "
                             f"time ({block} s)")
        validate_group(consumer_group)
        self.stream_name = stream_name
        self.dead_stream = f"{stream_name}:dead"
        self._stored_key = f"{stream_name}:stored"
        self.consumer_group = consumer_group
        self.max_len = max_len or 0
        self.claim_idle = float(claim_idle)
        self.max_deliveries = int(max_deliveries)
        self.duplicate_window = float(duplicate_window)
        self.block = float(block)
        self.prefetch = int(prefetch)
        self.publish_chunk = int(publish_chunk)
        self._url = url or (None if host else DEFAULT_URL)
        self._owns_client = client is None
        if client is None:
            client = self._make_client(url=self._url, host=host, port=port, db=db,
                                       username=username, password=password, tls=tls,
                                       ca_file=ca_file, cert_file=cert_file, key_file=key_file,
                                       socket_timeout=socket_timeout,
                                       connect_timeout=connect_timeout)
        self._client: Any = client
        self._display = redact_url(self._url) if self._url else f"redis://{host}:{port or 6379}"
        self._publish_script = self._client.register_script(_PUBLISH_LUA)
        self._owned_script = self._client.register_script(_OWNED_LUA)
        self._autoclaim_script = self._client.register_script(_AUTOCLAIM_LUA)
        self._closed = False
        self._published = 0
        self._duplicates = 0
        self._consumed = 0
        self._dead_lettered = 0
        self._readers: set[RedisGroupReader] = set()

    @staticmethod
    def _make_client(*, url: str | None, host: str | None, port: int | None, db: int | None,
                     username: str | None, password: str | None, tls: bool | None,
                     ca_file: str | None, cert_file: str | None, key_file: str | None,
                     socket_timeout: float, connect_timeout: float) -> Any:
        # One quick retry: a pooled connection can be stale after a server restart. More retries
        # (redis-py's default backs off for seconds) would hide an outage from the relay.
        options: dict[str, Any] = {
            "socket_timeout": socket_timeout,
            "socket_connect_timeout": connect_timeout,
            "retry": Retry(ExponentialBackoff(cap=0.2, base=0.05), 1),
            "health_check_interval": 15,
        }
        if username is not None:
            options["username"] = username
        if password is not None:
            options["password"] = password
        use_tls = bool(tls) or (url or "").startswith("rediss://")
        if use_tls:
            options["ssl_cert_reqs"] = ssl.CERT_REQUIRED
            if ca_file:
                options["ssl_ca_certs"] = ca_file
            if cert_file:
                options["ssl_certfile"] = cert_file
            if key_file:
                options["ssl_keyfile"] = key_file
        if url:
            if tls and url.startswith("redis://"):
                url = "rediss://" + url[len("redis://"):]
            return aioredis.Redis.from_url(url, **options)
        if use_tls:
            options["ssl"] = True
        return aioredis.Redis(host=host or "127.0.0.1", port=port or 6379, db=db or 0, **options)

    @classmethod
    def from_config(cls, config: Any) -> RedisProvider:
        """Build from an outbox :class:`~outbox.Config` (its ``redis`` section)."""
        section = config_section(config, "redis")
        known = {
            "url", "host", "port", "db", "username", "password", "stream_name", "consumer_group",
            "max_len", "tls", "ca_file", "cert_file", "key_file", "socket_timeout",
            "connect_timeout", "claim_idle", "max_deliveries", "duplicate_window", "block",
            "prefetch", "publish_chunk",
        }
        options = {k: v for k, v in section.items() if k in known and v is not None}
        url = options.pop("url", None)
        return cls(url, **options)

    def __repr__(self) -> str:
        return f"<RedisProvider {self._display} stream={self.stream_name!r}>"

    # -- keys --------------------------------------------------------------------------------

    def _dedupe_key(self, event_id: str) -> str:
        return f"{self.stream_name}:id:{event_id}"

    # -- health ------------------------------------------------------------------------------

    async def ping(self) -> None:
        """Raise :class:`~outbox.ProviderUnavailable` unless Redis answers."""
        for retry in (True, False):
            try:
                await self._client.ping()
                return
            except (redis_errors.RedisError, OSError) as exc:
                if retry and _is_stale_connection(exc):
                    continue
                raise _unavailable(exc, "ping") from exc

    # -- publishing --------------------------------------------------------------------------

    async def publish(self, event: Event) -> None:
        """Append ``event`` to the stream once (a repeat within ``duplicate_window`` is a no-op)."""
        result = (await self.publish_many([event]))[0]
        if result is not None:
            raise result

    async def publish_many(self, events: Sequence[Event]) -> list[BaseException | None]:
        """Publish ``events`` with pipelined Lua calls (contract: ``base.publish_many``).

        Results are in input order. An event that cannot be encoded gets its error in its slot;
        any Redis failure raises :class:`~outbox.ProviderUnavailable` for the whole call (the
        caller retries and the dedupe keys drop what had arrived).
        """
        self._check_open()
        results: list[BaseException | None] = [None] * len(events)
        rows: list[tuple[int, str, bytes, bytes, bytes]] = []
        for index, event in enumerate(events):
            try:
                document = wire.encode(event)
            except MalformedMessage as exc:
                results[index] = exc
                continue
            state = event.__dict__
            rows.append((index, str(state["id"]), state["type"].encode(),
                         state["source"].encode(), document))
        if not rows:
            return results
        ttl_ms = str(int(self.duplicate_window * 1000))
        maxlen = str(self.max_len)
        chunks = _chunks(rows, self.publish_chunk)
        stale_retry = script_retry = True
        while True:
            try:
                async with self._client.pipeline(transaction=False) as pipe:
                    for chunk in chunks:
                        keys = [self.stream_name] + [self._dedupe_key(r[1]) for r in chunk]
                        args: list[Any] = [maxlen, ttl_ms]
                        for row in chunk:
                            args.extend(row[1:])
                        pipe.evalsha(self._publish_script.sha, len(keys), *keys, *args)
                    replies = await pipe.execute(raise_on_error=False)
            except (redis_errors.RedisError, OSError) as exc:
                if stale_retry and _is_stale_connection(exc):
                    stale_retry = False  # safe to repeat: the dedupe keys drop what arrived
                    continue
                raise _unavailable(exc, "publish") from exc
            if script_retry and any(isinstance(r, redis_errors.NoScriptError) for r in replies):
                script_retry = False  # the server restarted and lost its script cache
                await self._load_scripts()
                continue
            break
        for reply in replies:
            if isinstance(reply, BaseException):
                raise _unavailable(reply, "publish")
            for value in reply:
                if _text(value).startswith("="):
                    self._duplicates += 1
                else:
                    self._published += 1
        return results

    async def _load_scripts(self) -> None:
        try:
            for script in (self._publish_script, self._owned_script, self._autoclaim_script):
                script.sha = await self._client.script_load(script.script)
        except (redis_errors.RedisError, OSError) as exc:
            raise _unavailable(exc, "script load") from exc

    # -- consuming ---------------------------------------------------------------------------

    def consume(
        self,
        pattern: str = "*",
        *,
        group: str,
        consumer: str | None = None,
        start: StartPosition | dt.datetime = StartPosition.NOW,
    ) -> RedisGroupReader:
        """Deliveries for consumer group ``group`` (see the module docstring).

        ``consumer`` names this member of the group (default: the instance id). A stable name
        lets a restarted consumer take its own unfinished entries back at once; otherwise they
        are reclaimed after ``claim_idle``. ``start`` applies when the group is created: ``NOW``
        (only new entries), ``BEGINNING`` or an aware datetime. Close the iterator
        (``aclose()``/``contextlib.aclosing``) to release what it holds.
        """
        self._check_open()
        validate_group(group)
        compiled = compile_pattern(pattern)
        return RedisGroupReader(self, compiled, group, consumer or get_instance_id(), start)

    async def _ensure_group(self, group: str, start: StartPosition | dt.datetime) -> None:
        if isinstance(start, dt.datetime):
            if start.tzinfo is None:
                raise ValueError("start must be an aware datetime")
            first = f"{int(start.timestamp() * 1000)}-0"
        elif StartPosition(start) is StartPosition.BEGINNING:
            first = "0"
        else:
            first = "$"
        try:
            await self._client.xgroup_create(self.stream_name, group, id=first, mkstream=True)
            log.info("created consumer group %r on stream %r at %s", group, self.stream_name,
                     first)
        except redis_errors.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def _dead_letter(self, entry_id: str, fields: Mapping[bytes, bytes], *, group: str,
                           error: str, deliveries: int) -> None:
        """Copy the entry to ``{stream}:dead`` with the error and ack it, atomically."""
        # Field names as text, so ours replace an entry's own "error"/"group" fields.
        record: dict[str, Any] = {_text(k): v for k, v in fields.items()}
        record.update({
            "error": error[:4000], "group": group, "entry": entry_id,
            "deliveries": str(deliveries), "dead_at": utcnow().isoformat(),
        })
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.xadd(self.dead_stream, record)
            pipe.xack(self.stream_name, group, entry_id)
            await pipe.execute()
        self._dead_lettered += 1

    async def dead_letters(self, count: int = 100) -> list[dict[str, str]]:
        """The oldest ``count`` entries of ``{stream}:dead`` (fields decoded, ``event`` as text)."""
        try:
            entries = await self._client.xrange(self.dead_stream, count=count)
        except (redis_errors.RedisError, OSError) as exc:
            raise _unavailable(exc, "xrange dead") from exc
        out = []
        for entry_id, fields in entries:
            row = {_text(k): v.decode(errors="replace") for k, v in fields.items()}
            row["dead_entry"] = _text(entry_id)
            out.append(row)
        return out

    # -- storage API (Provider protocol) -----------------------------------------------------
    #
    # The stream holds what was published (bounded by max_len); ``store`` and ``update_status``
    # keep full records in the hash ``{stream}:stored`` (a stored record wins over the stream's
    # copy of the same id, which carries no status: see outbox.wire).

    async def store(self, event: Event) -> None:
        """Keep ``event`` (all fields) without delivering it; storing an id again replaces it."""
        self._check_open()
        await self._hset(event)

    async def _hset(self, event: Event) -> None:
        try:
            await self._client.hset(self._stored_key, str(event.id), to_record(event))
        except (redis_errors.RedisError, OSError) as exc:
            raise _unavailable(exc, "store") from exc

    async def get(self, event_id: uuid.UUID | str) -> Event | None:
        self._check_open()
        key = as_event_id(event_id)
        try:
            record = await self._client.hget(self._stored_key, str(key))
            if record is not None:
                return from_record(record)
            entry = await self._find_entry(key)
        except (redis_errors.RedisError, OSError) as exc:
            raise _unavailable(exc, "get") from exc
        return None if entry is None else entry[1]

    async def _find_entry(self, key: uuid.UUID) -> tuple[str, Event] | None:
        """(entry id, event) of a published event: via its dedupe key, else a stream scan."""
        entry_id = await self._client.get(self._dedupe_key(str(key)))
        if entry_id is not None:
            found = await self._client.xrange(self.stream_name, min=entry_id, max=entry_id)
            if found:
                event = decode_or_none(found[0][1].get(b"event"))
                if event is not None and event.id == key:
                    return _text(found[0][0]), event
        wanted = str(key).encode()
        async for entry_id, fields in self._scan_stream():
            if fields.get(b"id") == wanted:
                event = decode_or_none(fields.get(b"event"))
                if event is not None:
                    return entry_id, event
        return None

    async def _scan_stream(self) -> AsyncIterator[tuple[str, Mapping[bytes, bytes]]]:
        start = "-"
        while True:
            batch = await self._client.xrange(self.stream_name, min=start, count=1000)
            if not batch:
                return
            for entry_id, fields in batch:
                yield _text(entry_id), fields
            last = _text(batch[-1][0])
            ms, seq = last.split("-")
            start = f"{ms}-{int(seq) + 1}"

    async def list(self, filter: EventFilter | None = None) -> list[Event]:
        """Stored and published events matching ``filter``: a full scan (the stream is bounded
        by ``max_len``); meant for inspection, not for hot paths."""
        self._check_open()
        flt = filter or EventFilter()
        found: dict[uuid.UUID, Event] = {}
        try:
            async for _entry_id, fields in self._scan_stream():
                event = decode_or_none(fields.get(b"event"))
                if event is not None:
                    found.setdefault(event.id, event)
            records = await self._client.hgetall(self._stored_key)
        except (redis_errors.RedisError, OSError) as exc:
            raise _unavailable(exc, "list") from exc
        for record in records.values():
            event = from_record(record)
            found[event.id] = event
        return flt.select(found.values())

    async def update_status(self, event_id: uuid.UUID | str, status: EventStatus | str,
                            error: str | None = None) -> None:
        self._check_open()
        event = await self.get(event_id)
        if event is None:
            raise EventNotFound(f"no event {event_id} in redis stream {self.stream_name!r}")
        apply_status(event.__dict__, EventStatus(status).value, error, utcnow())
        await self._hset(event)

    async def delete(self, event_id: uuid.UUID | str) -> None:
        self._check_open()
        key = as_event_id(event_id)
        try:
            removed = await self._client.hdel(self._stored_key, str(key))
            entry = await self._find_entry(key)
            if entry is not None:
                removed += await self._client.xdel(self.stream_name, entry[0])
            await self._client.delete(self._dedupe_key(str(key)))
        except (redis_errors.RedisError, OSError) as exc:
            raise _unavailable(exc, "delete") from exc
        if not removed:
            raise EventNotFound(f"no event {event_id} in redis stream {self.stream_name!r}")

    def stream(self, pattern: str = "*") -> AsyncIterator[Event]:
        """Events appended from now on whose type matches ``pattern`` (``XREAD``, no group).

        Nothing is acknowledged and nothing is redelivered: use :meth:`consume` for that.
        Malformed entries are logged and skipped. Outages are retried with backoff.
        """
        self._check_open()
        return self._tail(compile_pattern(pattern))

    async def _tail(self, pattern: Pattern) -> AsyncIterator[Event]:
        last = "$"
        backoff = Backoff()
        outage = OutageLog(log, f"redis {self._display}")
        while not self._closed:
            try:
                reply = await self._client.xread({self.stream_name: last},
                                                 block=int(self.block * 1000), count=100)
            except (redis_errors.RedisError, OSError) as exc:
                if not _is_outage(exc):
                    raise ProviderError(f"redis xread failed: {exc}") from exc
                outage.down(exc)
                await asyncio.sleep(backoff.next())
                continue
            outage.up()
            backoff.reset()
            for _stream, entries in reply or ():
                for entry_id, fields in entries:
                    last = _text(entry_id)
                    event = decode_or_none(fields.get(b"event"), f"entry {last}")
                    if event is not None and pattern.matches(event.type):
                        yield event

    # -- lifecycle ---------------------------------------------------------------------------

    async def stats(self) -> ProviderStats:
        self._check_open()
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                pipe.xlen(self.stream_name)
                pipe.xlen(self.dead_stream)
                pipe.hlen(self._stored_key)
                length, dead, stored = await pipe.execute()
            try:
                groups = await self._client.xinfo_groups(self.stream_name)
            except redis_errors.ResponseError:  # no stream yet
                groups = []
        except (redis_errors.RedisError, OSError) as exc:
            raise _unavailable(exc, "stats") from exc
        group_info = {
            _text(g["name"]): {"pending": int(g.get("pending") or 0),
                               "lag": g.get("lag"),
                               "consumers": int(g.get("consumers") or 0)}
            for g in groups
        }
        return ProviderStats(
            provider=self.name,
            total_events=int(length) + int(stored),
            pending_events=sum(g["pending"] for g in group_info.values()),
            failed_events=int(dead),
            events_published=self._published,
            events_consumed=self._consumed,
            active_subscribers=len(self._readers),
            extra={
                "stream": self.stream_name, "stream_length": int(length),
                "dead_letters": int(dead), "stored": int(stored), "groups": group_info,
                "duplicates_dropped": self._duplicates,
                "dead_lettered_here": self._dead_lettered,
            },
        )

    async def close(self) -> None:
        """Stop consumers of this provider (releasing what they hold) and close the client."""
        if self._closed:
            return
        self._closed = True
        for reader in list(self._readers):
            await reader.aclose()
        if self._owns_client:
            with contextlib.suppress(Exception):
                await self._client.aclose()

    def _check_open(self) -> None:
        if self._closed:
            raise ProviderError("RedisProvider is closed")


# ------------------------------------------------------------------------------------------------
# consumer side


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

    client_errors = (redis_errors.RedisError, OSError)
    p: RedisProvider
    _order = itertools.count()

    def __init__(self, provider: RedisProvider, pattern: Pattern, group: str, consumer: str,
                 start: StartPosition | dt.datetime) -> None:
        super().__init__(provider, pattern, group, consumer, start, stream=provider.stream_name,
                         what=f"redis {provider._display}", logger=log)
        self.client = provider._client
        self.stream = provider.stream_name
        #: Entry ids this consumer holds (buffered, handed out, or waiting for redelivery).
        self.owned: set[str] = set()
        self.delayed: list[_Due] = []
        self.to_ack: list[str] = []
        self.group_ready = False
        self.own_pending_done = False
        self.own_pending_from = "-"
        self.autoclaim_cursor = "0-0"
        self.next_autoclaim = 0.0

    # -- GroupReader hooks ---------------------------------------------------------------------

    async def _join(self) -> None:
        if not self.group_ready:
            await self.p._ensure_group(self.group, self.start_position)
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
        if _is_outage(exc):
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
                for chunk in _chunks(ids, 500):
                    await self.p._owned_script(keys=[self.stream],
                                               args=[self.group, self.consumer, "release", idle,
                                                     *chunk])

    # -- the fetch loop ----------------------------------------------------------------------

    async def _fill(self) -> None:
        await self._join()
        if self.to_ack:
            await self.client.xack(self.stream, self.group, *self.to_ack)
            self.to_ack.clear()
        now = time.monotonic()
        if self.delayed and self.delayed[0].due <= now:
            await self._redeliver_due(now)
            if self.buffer:
                return
        if not self.own_pending_done:
            await self._take_own_pending()
            if self.buffer:
                return
        if now >= self.next_autoclaim:
            await self._autoclaim()
            if self.buffer:
                return
        block = self.p.block
        if self.delayed:
            block = min(block, max(0.001, self.delayed[0].due - now))
        block = min(block, max(0.001, self.next_autoclaim - now))
        reply = await self.client.xreadgroup(self.group, self.consumer, {self.stream: ">"},
                                             count=self.p.prefetch, block=max(1, int(block * 1000)))
        for _stream, entries in reply or ():
            for entry_id, fields in entries:
                await self._accept(_text(entry_id), fields, 1, None)

    async def _take_own_pending(self) -> None:
        """Entries this consumer name was given before a restart: take them back now."""
        rows = await self.client.xpending_range(self.stream, self.group, self.own_pending_from,
                                                "+", self.p.prefetch, consumername=self.consumer)
        if not rows:
            self.own_pending_done = True
            return
        self.own_pending_from = "(" + _text(rows[-1]["message_id"])
        ids = [_text(r["message_id"]) for r in rows if _text(r["message_id"]) not in self.owned]
        if ids:
            await self._claim_again(ids, {})

    async def _redeliver_due(self, now: float) -> None:
        due: dict[str, str] = {}
        while self.delayed and self.delayed[0].due <= now and len(due) < self.p.prefetch:
            item = heapq.heappop(self.delayed)
            due[item.entry_id] = item.error
        await self._claim_again(list(due), due)

    async def _claim_again(self, ids: list[str], errors: Mapping[str, str]) -> None:
        reply = await self.p._owned_script(keys=[self.stream],
                                           args=[self.group, self.consumer, "claim", *ids])
        got = set()
        for entry_id, flat, count in reply:
            entry = _text(entry_id)
            got.add(entry)
            self.owned.discard(entry)
            await self._accept(entry, _pairs(flat), int(count), errors.get(entry))
        for entry in ids:
            if entry not in got:  # acked by another consumer, or trimmed from the stream
                self.owned.discard(entry)

    async def _autoclaim(self) -> None:
        idle_ms = str(int(self.p.claim_idle * 1000))
        cursor, claimed, deleted = await self.p._autoclaim_script(
            keys=[self.stream],
            args=[self.group, self.consumer, idle_ms, self.autoclaim_cursor, self.p.prefetch],
        )
        self.autoclaim_cursor = _text(cursor)
        if self.autoclaim_cursor == "0-0":
            self.next_autoclaim = time.monotonic() + min(self.p.claim_idle / 2, 5.0)
        if deleted:
            log.error("%d entries pending in group %r were trimmed from %r (MAXLEN %d) before "
                      "they were acknowledged: raise redis.max_len", len(deleted), self.group,
                      self.stream, self.p.max_len)
        for entry_id, flat, count in claimed:
            entry = _text(entry_id)
            if entry in self.owned:  # ours already (its heartbeat was late): keep the one we hold
                continue
            log.info("reclaimed entry %s of group %r (idle > %.1f s, delivery %d)", entry,
                     self.group, self.p.claim_idle, int(count))
            await self._accept(entry, _pairs(flat), int(count), None)

    async def _accept(self, entry_id: str, fields: Mapping[bytes, bytes], attempt: int,
                      last_error: str | None) -> None:
        type_field = fields.get(b"type")
        if (type_field is not None and not self.pattern.match_all
                and not self.pattern.matches(_text(type_field))):
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
        await self.p._dead_letter(entry_id, fields, group=self.group, error=error,
                                  deliveries=deliveries)
        self.owned.discard(entry_id)

    # -- settling ----------------------------------------------------------------------------

    async def ack(self, delivery: RedisDelivery) -> None:
        try:
            await self.client.xack(self.stream, self.group, delivery.entry_id)
        except (redis_errors.RedisError, OSError) as exc:
            raise _unavailable(exc, "xack") from exc
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
        except (redis_errors.RedisError, OSError) as exc:
            raise _unavailable(exc, "park") from exc

    # -- keeping owned entries alive ----------------------------------------------------------

    async def _keep_alive(self) -> None:
        ids = list(self.owned)
        if not ids:
            return
        try:
            still: set[str] = set()
            for chunk in _chunks(ids, 500):
                reply = await self.p._owned_script(
                    keys=[self.stream], args=[self.group, self.consumer, "touch", *chunk])
                still.update(_text(r) for r in reply)
        except redis_errors.NoScriptError:
            with contextlib.suppress(Exception):
                await self.p._load_scripts()
            return
        except (redis_errors.RedisError, OSError) as exc:
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


# ------------------------------------------------------------------------------------------------
# helpers


def _pairs(flat: Sequence[Any]) -> dict[bytes, bytes]:
    """Lua returns entry fields as a flat [k1, v1, k2, v2, …] list."""
    it = iter(flat)
    return {bytes(k): bytes(v) for k, v in zip(it, it, strict=False)}
