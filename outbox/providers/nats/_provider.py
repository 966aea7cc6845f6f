"""``NATSProvider``: NATS JetStream as the transport, on nats-py.

It publishes (``_publisher.py``: ``Nats-Msg-Id`` dedupe, batches in flight) and consumes
(``_consumer.py``: a durable pull consumer per group, explicit ack, a dead-letter stream;
``_tail.py``: ``stream()``) on one connection that rides out outages (``_connection.py``). It
keeps no queryable copy of the events: it is no :class:`~outbox.providers.base.EventStore`.

``partitions`` > 1 puts a partition (a hash of the ordering key) into the subject and gives each
group a durable per partition with one message in flight (``PartitionedGroupReader``): per-key
order across the members of a group. ``replicas`` is the stream's replica count on a cluster.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator, Sequence
from typing import Any, ClassVar

import nats.js.errors as js_errors

from outbox._patterns import compile_pattern
from outbox.events import Event, get_instance_id
from outbox.exceptions import ProviderError
from outbox.providers._bus import config_options, validate_group
from outbox.providers.base import Capabilities, ProviderStats, StartPosition, publish_one
from outbox.providers.nats._connection import (
    DEFAULT_URL,
    ERRORS,
    Connection,
    ssl_context,
    unavailable,
)
from outbox.providers.nats._consumer import NATSGroupReader, PartitionedGroupReader
from outbox.providers.nats._publisher import JetStreamPublisher
from outbox.providers.nats._subjects import TOKEN, check_subject_part, subject_of
from outbox.providers.nats._tail import tail

__all__ = ["NATSProvider"]


class NATSProvider:
    """NATS JetStream transport (see the package docstrings for the guarantees).

    ``url`` may hold several comma-separated servers and credentials (``nats://user:pass@host``
    or ``nats://token@host``); ``user``/``password``/``token`` override them. TLS: a ``tls://``
    URL or ``tls=True``, with ``ca_file`` and a client certificate (``cert_file``/``key_file``).
    Durations in seconds.
    """

    name: ClassVar[str] = "nats"
    capabilities: ClassVar[Capabilities] = Capabilities(
        persistent=True, cross_instance=True, bounded_redelivery=True
    )

    def __init__(
        self,
        url: str | None = None,
        *,
        stream_name: str = "OUTBOX_EVENTS",
        subject_prefix: str = "events",
        max_age: float = 86400.0,
        duplicate_window: float = 120.0,
        durable: str = "outbox-workers",
        user: str | None = None,
        password: str | None = None,
        token: str | None = None,
        tls: bool | None = None,
        ca_file: str | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
        connect_timeout: float = 5.0,
        request_timeout: float = 10.0,
        reconnect_wait: float = 1.0,
        claim_idle: float = 30.0,
        max_deliveries: int = 10,
        max_ack_pending: int = 1000,
        block: float = 1.0,
        prefetch: int = 32,
        publish_window: int = 2000,
        partitions: int = 1,
        replicas: int = 1,
    ) -> None:
        if not stream_name or not TOKEN.fullmatch(stream_name):
            raise ValueError(f"nats.stream_name {stream_name!r} must be one subject token "
                             "(no '.', spaces, '*' or '>')")
        try:
            check_subject_part("subject prefix", subject_prefix)
        except ProviderError as exc:
            raise ValueError(f"nats.subject_prefix: {exc}") from None
        if max_age <= 0:
            raise ValueError("nats.max_age must be > 0 seconds")
        if not 0 < duplicate_window <= max_age:
            raise ValueError("nats.duplicate_window must be > 0 and <= max_age")
        if claim_idle <= 0:
            raise ValueError("nats.claim_idle must be > 0 seconds")
        if max_deliveries < 1:
            raise ValueError("nats.max_deliveries must be >= 1")
        if not 1 <= partitions <= 1024:
            raise ValueError("nats.partitions must be between 1 and 1024")
        if not 1 <= replicas <= 5:
            raise ValueError("nats.replicas must be between 1 and 5 (JetStream's limit)")
        validate_group(durable)
        self.partitions = int(partitions)
        self.replicas = int(replicas)
        self.url = url or DEFAULT_URL
        self.stream_name = stream_name
        self.subject_prefix = subject_prefix
        self.max_age = float(max_age)
        self.duplicate_window = float(duplicate_window)
        self.consumer_group = durable
        self.connect_timeout = float(connect_timeout)
        self.request_timeout = float(request_timeout)
        self.reconnect_wait = float(reconnect_wait)
        self.claim_idle = float(claim_idle)
        self.max_deliveries = int(max_deliveries)
        self.max_ack_pending = int(max_ack_pending)
        self.block = float(block)
        self.prefetch = int(prefetch)
        self.publish_window = int(publish_window)
        self._conn = Connection(
            self.url, auth={"user": user, "password": password, "token": token},
            tls=ssl_context(self.url, tls, ca_file, cert_file, key_file),
            stream_name=stream_name, subject_prefix=subject_prefix, max_age=self.max_age,
            duplicate_window=self.duplicate_window, connect_timeout=self.connect_timeout,
            request_timeout=self.request_timeout, reconnect_wait=self.reconnect_wait,
            publish_window=self.publish_window, partitions=self.partitions,
            replicas=self.replicas,
        )
        self._display = self._conn.display
        self.dead_stream = self._conn.dead_stream
        self.dead_prefix = self._conn.dead_prefix
        self._publisher = JetStreamPublisher(self._conn)
        self._closed = False
        self._consumed = 0
        self._dead_lettered = 0
        self._readers: set[NATSGroupReader] = set()

    @classmethod
    def from_config(cls, config: Any) -> NATSProvider:
        """Build from an outbox :class:`~outbox.Config` (its ``nats`` section)."""
        options = config_options(config, "nats", {
            "url", "stream_name", "subject_prefix", "max_age", "duplicate_window", "durable",
            "user", "password", "token", "tls", "ca_file", "cert_file", "key_file",
            "connect_timeout", "request_timeout", "reconnect_wait", "claim_idle",
            "max_deliveries", "max_ack_pending", "block", "prefetch", "publish_window",
            "partitions", "replicas",
        })
        return cls(options.pop("url", None), **options)

    def __repr__(self) -> str:
        return f"<NATSProvider {self._display} stream={self.stream_name!r}>"

    @property
    def _js(self) -> Any:
        """The JetStream context (``None`` before the first connection)."""
        return self._conn.js

    def _check_open(self) -> None:
        if self._closed:
            raise ProviderError("NATSProvider is closed")

    # -- Publisher -----------------------------------------------------------------------------

    def subject(self, event: Event) -> str:
        """``{subject_prefix}.{source}.{type}`` (ProviderError when not a valid subject)."""
        return subject_of(self.subject_prefix, event, self.partitions)

    async def publish(self, event: Event) -> None:
        """Publish ``event`` and wait for JetStream's ack (a duplicate id is acked, not stored)."""
        await publish_one(self, event)

    async def publish_many(self, events: Sequence[Event]) -> list[BaseException | None]:
        """Publish with ``publish_async`` and await every ack (the contract of ``Publisher``;
        JetStream drops a repeated id within ``duplicate_window``)."""
        self._check_open()
        return await self._publisher.publish_many(events)

    async def ping(self) -> None:
        """Raise :class:`ProviderUnavailable` unless the server and JetStream answer."""
        self._check_open()
        await self._conn.ping()

    async def stats(self) -> ProviderStats:
        self._check_open()
        _nc, js = await self._conn.get_or_unavailable("stats")
        try:
            info = await js.stream_info(self.stream_name)
            consumers = await js.consumers_info(self.stream_name)
            try:
                dead = (await js.stream_info(self.dead_stream)).state.messages
            except js_errors.NotFoundError:
                dead = 0
        except ERRORS as exc:
            raise unavailable(exc, "stats") from exc
        groups = {
            c.name: {"pending": c.num_pending, "ack_pending": c.num_ack_pending,
                     "redelivered": c.num_redelivered}
            for c in consumers if c.config.durable_name
        }
        return ProviderStats(
            provider=self.name,
            total_events=info.state.messages,
            pending_events=sum(g["pending"] + g["ack_pending"] for g in groups.values()),
            failed_events=dead,
            events_published=self._publisher.published,
            events_consumed=self._consumed,
            active_subscribers=len(self._readers),
            extra={"stream": self.stream_name, "stream_messages": info.state.messages,
                   "dead_letters": dead, "groups": groups,
                   "duplicates_dropped": self._publisher.duplicates,
                   "dead_lettered_here": self._dead_lettered},
        )

    async def close(self) -> None:
        """Stop this provider's consumers, flush pending acks and close the connection."""
        if self._closed:
            return
        for reader in list(self._readers):
            await reader.aclose()
        self._closed = True
        await self._conn.close()

    # -- Subscriber ----------------------------------------------------------------------------

    def consume(
        self,
        pattern: str = "*",
        *,
        group: str,
        consumer: str | None = None,
        start: StartPosition | dt.datetime = StartPosition.NOW,
    ) -> NATSGroupReader:
        """Deliveries for ``group`` from its durable pull consumer (see ``_consumer.py``).

        Every member of a group pulls from the same durable, so they share the work; another
        group is another durable and sees every message. ``consumer`` only names this member in
        logs. ``start`` applies when the durable is created (``NOW``: new messages only,
        ``BEGINNING``, or an aware datetime). A durable keeps the filter subject it was created
        with: consuming it with another pattern is refused. With ``partitions`` > 1 the group is
        one durable per partition, each handing out one message at a time (per-key order across
        the members).
        """
        self._check_open()
        validate_group(group)
        compiled = compile_pattern(pattern)
        if self.partitions > 1:
            return PartitionedGroupReader(self, compiled, group, consumer or get_instance_id(),
                                          start)
        return NATSGroupReader(self, compiled, group, consumer or get_instance_id(), start)

    def stream(self, pattern: str = "*") -> AsyncIterator[Event]:
        """Events published from now on matching ``pattern`` (an ephemeral consumer; nothing is
        redelivered: use :meth:`consume` for that). Malformed messages are logged and skipped."""
        self._check_open()
        return tail(self, compile_pattern(pattern))

    async def dead_letters(self, count: int = 100) -> list[dict[str, Any]]:
        """The oldest ``count`` dead letters: headers, ``subject`` and ``event`` (the raw data)."""
        await self._conn.get_or_unavailable("dead letters")
        out: list[dict[str, Any]] = []
        try:
            await self._conn.ensure_dead_stream()
            async for msg in self._conn.scan(self.dead_stream, f"{self.dead_prefix}.>"):
                out.append({**(msg.headers or {}), "subject": msg.subject, "event": msg.data})
                if len(out) >= count:
                    break
        except ERRORS as exc:
            raise unavailable(exc, "dead letters") from exc
        return out
