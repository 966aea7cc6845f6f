"""``RedisProvider``: Redis Streams as the transport, on redis-py's asyncio client.

It publishes (``_publisher.py``: one ``XADD`` per event id, batches pipelined) and consumes
(``_consumer.py``: consumer groups with ack, nack, reclaim of a dead consumer's entries and a dead
letter stream; ``_tail.py``: ``stream()``), riding out outages (``_connection.py``). It keeps no
queryable copy of the events: it is no :class:`~outbox.providers.base.EventStore`.

Limits: ``max_len`` trims the stream approximately: an entry that a group has not read before it
is trimmed is lost to that group (logged when ``XAUTOCLAIM`` notices). Size ``max_len`` for the
backlog your slowest group may build up (per shard stream). Standalone Redis only (no Cluster).

``shards`` > 1 spreads events over that many streams ``{stream_name}:{i}`` by a hash of their
ordering key, and each shard is read by one member of a group at a time (``_shards.py``): a
key's events are handed out in order by the group as a whole, not only inside one process.
``shards = 1`` (the default) is one stream, ``stream_name``, shared by the members of a group.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import AsyncIterator, Sequence
from typing import Any, ClassVar

from redis import exceptions as redis_errors

from outbox._patterns import compile_pattern
from outbox.events import Event, get_instance_id
from outbox.exceptions import ProviderError
from outbox.providers._bus import config_options, redact_url, validate_group
from outbox.providers.base import Capabilities, ProviderStats, StartPosition, publish_one
from outbox.providers.redis._connection import (
    DEFAULT_URL,
    ERRORS,
    is_stale_connection,
    make_client,
    text,
    unavailable,
)
from outbox.providers.redis._consumer import GroupScripts, RedisGroupReader
from outbox.providers.redis._publisher import StreamPublisher
from outbox.providers.redis._shards import ShardedGroupReader, ShardScripts
from outbox.providers.redis._tail import tail

__all__ = ["RedisProvider"]


class RedisProvider:
    """Redis Streams transport (see the package docstrings for the guarantees).

    ``url`` (``redis://``/``rediss://``/``unix://``) or ``host``/``port``/``db``; ``password``/
    ``username`` override the URL's. TLS: a ``rediss://`` URL or ``tls=True``, with ``ca_file``
    and a client certificate (``cert_file``/``key_file``). All durations are in seconds.
    """

    name: ClassVar[str] = "redis"
    capabilities: ClassVar[Capabilities] = Capabilities(
        persistent=True, cross_instance=True, bounded_redelivery=True
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
        shards: int = 1,
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
        if not 1 <= shards <= 1024:
            raise ValueError("redis.shards must be between 1 and 1024")
        validate_group(consumer_group)
        self.stream_name = stream_name
        self.shards = int(shards)
        #: The streams events go to: ``stream_name``, or one per shard.
        self.streams = ([stream_name] if shards == 1
                        else [f"{stream_name}:{{{i}}}" for i in range(shards)])
        self.dead_stream = f"{stream_name}:dead"
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
            client = make_client(url=self._url, host=host, port=port, db=db, username=username,
                                 password=password, tls=tls, ca_file=ca_file, cert_file=cert_file,
                                 key_file=key_file, socket_timeout=socket_timeout,
                                 connect_timeout=connect_timeout)
        self._client: Any = client
        self._display = redact_url(self._url) if self._url else f"redis://{host}:{port or 6379}"
        self._publisher = StreamPublisher(client, self.streams, max_len=self.max_len,
                                          duplicate_window=self.duplicate_window,
                                          chunk=self.publish_chunk)
        self._scripts = GroupScripts(client)
        self._shard_scripts = ShardScripts(client)
        self._closed = False
        self._consumed = 0
        self._dead_lettered = 0
        self._readers: set[RedisGroupReader | ShardedGroupReader] = set()

    @classmethod
    def from_config(cls, config: Any) -> RedisProvider:
        """Build from an outbox :class:`~outbox.Config` (its ``redis`` section)."""
        options = config_options(config, "redis", {
            "url", "host", "port", "db", "username", "password", "stream_name", "consumer_group",
            "max_len", "tls", "ca_file", "cert_file", "key_file", "socket_timeout",
            "connect_timeout", "claim_idle", "max_deliveries", "duplicate_window", "block",
            "prefetch", "publish_chunk", "shards",
        })
        return cls(options.pop("url", None), **options)

    def __repr__(self) -> str:
        return f"<RedisProvider {self._display} stream={self.stream_name!r}>"

    def _check_open(self) -> None:
        if self._closed:
            raise ProviderError("RedisProvider is closed")

    # -- Publisher -----------------------------------------------------------------------------

    async def publish(self, event: Event) -> None:
        """Append ``event`` to the stream once (a repeat within ``duplicate_window`` is a no-op)."""
        await publish_one(self, event)

    async def publish_many(self, events: Sequence[Event]) -> list[BaseException | None]:
        """Append ``events`` with pipelined Lua calls (the contract of ``Publisher``; a repeat of
        an id within ``duplicate_window`` adds nothing)."""
        self._check_open()
        return await self._publisher.publish_many(events)

    async def ping(self) -> None:
        """Raise :class:`~outbox.exceptions.ProviderUnavailable` unless Redis answers."""
        for retry in (True, False):
            try:
                await self._client.ping()
                return
            except ERRORS as exc:
                if retry and is_stale_connection(exc):
                    continue
                raise unavailable(exc, "ping") from exc

    async def stats(self) -> ProviderStats:
        self._check_open()
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                for stream in self.streams:
                    pipe.xlen(stream)
                pipe.xlen(self.dead_stream)
                *lengths, dead = await pipe.execute()
            length = sum(lengths)
            groups = []
            for stream in self.streams:
                with contextlib.suppress(redis_errors.ResponseError):  # no stream yet
                    groups.extend(await self._client.xinfo_groups(stream))
        except ERRORS as exc:
            raise unavailable(exc, "stats") from exc
        group_info: dict[str, dict[str, Any]] = {}
        for g in groups:  # summed over the shards
            info = group_info.setdefault(text(g["name"]),
                                         {"pending": 0, "lag": 0, "consumers": 0})
            info["pending"] += int(g.get("pending") or 0)
            info["lag"] = None if info["lag"] is None or g.get("lag") is None \
                else info["lag"] + int(g["lag"])
            info["consumers"] = max(info["consumers"], int(g.get("consumers") or 0))
        return ProviderStats(
            provider=self.name,
            total_events=int(length),
            pending_events=sum(g["pending"] for g in group_info.values()),
            failed_events=int(dead),
            events_published=self._publisher.published,
            events_consumed=self._consumed,
            active_subscribers=len(self._readers),
            extra={
                "stream": self.stream_name, "stream_length": int(length),
                "shards": self.shards,
                "dead_letters": int(dead), "groups": group_info,
                "duplicates_dropped": self._publisher.duplicates,
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

    # -- Subscriber ----------------------------------------------------------------------------

    def consume(
        self,
        pattern: str = "*",
        *,
        group: str,
        consumer: str | None = None,
        start: StartPosition | dt.datetime = StartPosition.NOW,
    ) -> RedisGroupReader | ShardedGroupReader:
        """Deliveries for consumer group ``group`` (see ``_consumer.py``; with ``shards`` > 1,
        ``_shards.py``: this member reads the shards it holds the lease of).

        ``consumer`` names this member of the group (default: the instance id). A stable name
        lets a restarted consumer take its own unfinished entries back at once; otherwise they
        are reclaimed after ``claim_idle``. ``start`` applies when the group is created: ``NOW``
        (only new entries), ``BEGINNING`` or an aware datetime. Close the iterator
        (``aclose()``/``async with``) to release what it holds.
        """
        self._check_open()
        validate_group(group)
        compiled = compile_pattern(pattern)
        if self.shards > 1:
            return ShardedGroupReader(self, compiled, group, consumer or get_instance_id(), start)
        return RedisGroupReader(self, compiled, group, consumer or get_instance_id(), start)

    def stream(self, pattern: str = "*") -> AsyncIterator[Event]:
        """Events appended from now on whose type matches ``pattern`` (``XREAD``, no group).

        Nothing is acknowledged and nothing is redelivered: use :meth:`consume` for that.
        Malformed entries are logged and skipped. Outages are retried with backoff.
        """
        self._check_open()
        return tail(self, compile_pattern(pattern))

    async def dead_letters(self, count: int = 100) -> list[dict[str, str]]:
        """The oldest ``count`` entries of ``{stream}:dead`` (fields decoded, ``event`` as text)."""
        try:
            entries = await self._client.xrange(self.dead_stream, count=count)
        except ERRORS as exc:
            raise unavailable(exc, "xrange dead") from exc
        out = []
        for entry_id, fields in entries:
            row = {text(k): v.decode(errors="replace") for k, v in fields.items()}
            row["dead_entry"] = text(entry_id)
            out.append(row)
        return out
