"""NATS JetStream provider, on nats-py.

Stream
    ``stream_name`` (default ``OUTBOX_EVENTS``) on subjects ``{subject_prefix}.>``, file storage,
    ``max_age`` (default 24 h) and ``duplicate_window`` (default 2 min). Created when missing and
    updated when its subjects, ``max_age`` or ``duplicate_window`` differ from the configuration
    (the relay and consumers both do this), so several outboxes can share one server with
    different prefixes.

Publishing
    Subject ``{subject_prefix}.{source}.{type}``, header ``Nats-Msg-Id`` = event id, so JetStream
    drops a republished event inside ``duplicate_window``. :meth:`NATSProvider.publish_many` keeps
    a whole batch in flight with ``publish_async`` and awaits every ack (bounded by
    ``request_timeout``) before it returns: an event counts as forwarded only once JetStream
    stored it.

Consuming (:meth:`NATSProvider.consume`)
    One durable pull consumer per group (durable name = group), ``filter_subject`` mapped from the
    pattern (``public.*.create`` → ``{prefix}.*.public.*.create``, ``*`` → ``{prefix}.>``),
    explicit ack after the handler succeeded, ``ack_wait`` = ``claim_idle`` (a consumer that dies
    mid-handler loses its messages to the rest of the group after that; a live one reports
    progress with ``in_progress()`` so slow handlers keep theirs). ``nack(delay)`` is a JetStream
    ``nak`` with delay. JetStream's ``max_deliver`` is ``max_deliveries + 1``: the extra delivery
    is never handed to a handler but moved to the dead-letter stream, so a message that crashed
    its consumers ``max_deliveries`` times ends in ``failed`` instead of silently stopping.

Dead letters ("failed")
    ``park()``, exhausted deliveries and malformed messages are published to the stream
    ``{stream_name}_DEAD`` on ``{subject_prefix}_dead.{group}.…`` (headers ``Outbox-Error``,
    ``Outbox-Group``, ``Outbox-Deliveries``; the original document unchanged) and then terminated
    with ``term()``. They never block the consumer.

Outages
    The client reconnects on its own (every ``reconnect_wait`` seconds, forever). While it is
    disconnected, ``publish``/``publish_many`` raise :class:`~outbox.ProviderUnavailable` at once
    (nothing piles up in the client's buffer) and consumers wait; disconnects and reconnects are
    logged once each. The first connection fails fast (``connect_timeout``), as the relay's
    readiness check wants.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import re
import ssl
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Sequence
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
    BusDelivery,
    GroupReader,
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
    import nats
    import nats.errors as nats_errors
    import nats.js.errors as js_errors
    from nats.aio.msg import Msg
    from nats.js import api as js_api
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise MissingDependency("NATSProvider", "nats", "nats-py") from exc

__all__ = ["NATSDelivery", "NATSGroupReader", "NATSProvider", "filter_subject"]

log = logging.getLogger(__name__)

DEFAULT_URL = "nats://127.0.0.1:4222"
MSG_ID_HEADER = "Nats-Msg-Id"
_TOKEN = re.compile(r"[^\s.*>]+")


def filter_subject(subject_prefix: str, pattern: str) -> str:
    """The JetStream subject filter of ``pattern`` (which matches the event *type*).

    Subjects are ``{prefix}.{source}.{type}``: any source, then the pattern with ``*`` and ``>``
    kept (they mean the same in NATS); the match-all ``*`` becomes ``{prefix}.>``.
    """
    compiled = compile_pattern(pattern)
    if compiled.match_all:
        return f"{subject_prefix}.>"
    return f"{subject_prefix}.*.{pattern}"


def _check_subject_part(what: str, value: str) -> None:
    for token in value.split("."):
        if not _TOKEN.fullmatch(token):
            raise ProviderError(
                f"event {what} {value!r} cannot be part of a NATS subject (empty segment, "
                "whitespace, '*' or '>')"
            )


def _is_outage(exc: BaseException) -> bool:
    if isinstance(exc, nats_errors.MaxPayloadError | nats_errors.BadSubjectError):
        return False
    if isinstance(exc, js_errors.APIError) and not isinstance(
            exc, js_errors.ServiceUnavailableError):
        return (exc.code or 0) >= 500
    return isinstance(exc, nats_errors.Error | OSError | asyncio.TimeoutError)


def _unavailable(exc: BaseException | str, what: str) -> ProviderUnavailable:
    detail = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"
    return ProviderUnavailable(f"nats unavailable ({what}): {detail}")


class NATSProvider:
    """NATS JetStream transport (see the module docstring for the guarantees).

    ``url`` may hold several comma-separated servers and credentials (``nats://user:pass@host``
    or ``nats://token@host``); ``user``/``password``/``token`` override them. TLS: a ``tls://``
    URL or ``tls=True``, with ``ca_file`` and a client certificate (``cert_file``/``key_file``).
    Durations in seconds.
    """

    name: ClassVar[str] = "nats"
    capabilities: ClassVar[Capabilities] = Capabilities(
        persistent=True, cross_instance=True, consumer_groups=True, full_query=True
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
    ) -> None:
        if not stream_name or not _TOKEN.fullmatch(stream_name):
            raise ValueError(f"nats.stream_name {stream_name!r} must be one subject token "
                             "(no '.', spaces, '*' or '>')")
        try:
            _check_subject_part("subject prefix", subject_prefix)
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
        validate_group(durable)
        self.url = url or DEFAULT_URL
        self._display = ",".join(redact_url(u.strip()) for u in self.url.split(","))
        self.stream_name = stream_name
        self.subject_prefix = subject_prefix
        self.dead_stream = f"{stream_name}_DEAD"
        self.dead_prefix = f"{subject_prefix}_dead"
        self.store_bucket = f"{stream_name}_STORE"
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
        self._auth = {"user": user, "password": password, "token": token}
        self._tls = self._ssl_context(tls, ca_file, cert_file, key_file)
        self._nc: Any = None
        self._js: Any = None
        self._connect_lock: asyncio.Lock | None = None
        self._stream_ready = False
        self._dead_ready = False
        self._kv: Any = None
        self._closed = False
        self._published = 0
        self._duplicates = 0
        self._consumed = 0
        self._dead_lettered = 0
        self._readers: set[NATSGroupReader] = set()

    def _ssl_context(self, tls: bool | None, ca_file: str | None, cert_file: str | None,
                     key_file: str | None) -> ssl.SSLContext | None:
        wants = bool(tls) or any(u.strip().startswith("tls://") for u in self.url.split(","))
        if not (wants or ca_file or cert_file):
            return None
        context = ssl.create_default_context(cafile=ca_file)
        if cert_file:
            context.load_cert_chain(cert_file, key_file)
        return context

    @classmethod
    def from_config(cls, config: Any) -> NATSProvider:
        """Build from an outbox :class:`~outbox.Config` (its ``nats`` section)."""
        section = config_section(config, "nats")
        known = {
            "url", "stream_name", "subject_prefix", "max_age", "duplicate_window", "durable",
            "user", "password", "token", "tls", "ca_file", "cert_file", "key_file",
            "connect_timeout", "request_timeout", "reconnect_wait", "claim_idle",
            "max_deliveries", "max_ack_pending", "block", "prefetch", "publish_window",
        }
        options = {k: v for k, v in section.items() if k in known and v is not None}
        for name in ("max_age", "duplicate_window", "claim_idle"):
            if isinstance(options.get(name), dt.timedelta):
                options[name] = options[name].total_seconds()
        url = options.pop("url", None)
        return cls(url, **options)

    def __repr__(self) -> str:
        return f"<NATSProvider {self._display} stream={self.stream_name!r}>"

    # -- connection ----------------------------------------------------------------------------

    async def _connection(self) -> tuple[Any, Any]:
        """(client, JetStream context), connecting and creating the stream on first use."""
        self._check_open()
        if self._nc is None or self._nc.is_closed:
            if self._connect_lock is None:
                self._connect_lock = asyncio.Lock()
            async with self._connect_lock:
                if self._nc is None or self._nc.is_closed:
                    await self._connect()
        if not self._stream_ready:
            await self._ensure_stream()
        return self._nc, self._js

    async def _connect(self) -> None:
        options: dict[str, Any] = {
            "servers": [u.strip() for u in self.url.split(",")],
            "connect_timeout": self.connect_timeout,
            "reconnect_time_wait": self.reconnect_wait,
            # Fail the *first* connection fast (two tries); reconnects are unlimited (below).
            "max_reconnect_attempts": 1,
            "allow_reconnect": True,
            "error_cb": self._on_error,
            "disconnected_cb": self._on_disconnect,
            "reconnected_cb": self._on_reconnect,
            "name": f"outbox {get_instance_id()}",
        }
        options.update({k: v for k, v in self._auth.items() if v is not None})
        if self._tls is not None:
            options["tls"] = self._tls
        try:
            nc = await asyncio.wait_for(nats.connect(**options),
                                        timeout=self.connect_timeout * 3 + 1)
        except (TimeoutError, nats_errors.Error, OSError) as exc:
            raise _unavailable(exc, f"connect to {self._display}") from exc
        nc.options["max_reconnect_attempts"] = -1  # never give up once connected
        self._nc = nc
        self._js = nc.jetstream(timeout=self.request_timeout,
                                publish_async_max_pending=self.publish_window)
        self._stream_ready = False
        log.info("connected to NATS %s", self._display)

    async def _on_error(self, exc: Exception) -> None:
        log.debug("nats client error: %s: %s", type(exc).__name__, exc)

    async def _on_disconnect(self) -> None:
        if not self._closed:
            log.warning("disconnected from NATS %s; reconnecting every %.1f s", self._display,
                        self.reconnect_wait)

    async def _on_reconnect(self) -> None:
        log.warning("reconnected to NATS %s", self._display)

    async def ping(self) -> None:
        """Raise :class:`~outbox.ProviderUnavailable` unless the server and JetStream answer."""
        nc, js = await self._connection_or_unavailable("ping")
        if not nc.is_connected:
            raise _unavailable("client is reconnecting", "ping")
        try:
            await js.account_info()
        except (TimeoutError, nats_errors.Error, OSError) as exc:
            raise _unavailable(exc, "ping") from exc

    async def _connection_or_unavailable(self, what: str) -> tuple[Any, Any]:
        try:
            return await self._connection()
        except (TimeoutError, nats_errors.Error, OSError) as exc:
            raise _unavailable(exc, what) from exc

    async def _ensure_stream(self) -> None:
        js = self._js
        wanted = js_api.StreamConfig(
            name=self.stream_name,
            subjects=[f"{self.subject_prefix}.>"],
            storage=js_api.StorageType.FILE,
            retention=js_api.RetentionPolicy.LIMITS,
            max_age=self.max_age,
            duplicate_window=self.duplicate_window,
        )
        try:
            info = await js.stream_info(self.stream_name)
        except js_errors.NotFoundError:
            await js.add_stream(wanted)
            log.info("created JetStream stream %s on %s.>", self.stream_name, self.subject_prefix)
        else:
            have = info.config
            if (list(have.subjects or []) != wanted.subjects
                    or abs((have.max_age or 0) - self.max_age) > 0.001
                    or abs((have.duplicate_window or 0) - self.duplicate_window) > 0.001):
                have.subjects = wanted.subjects
                have.max_age = self.max_age
                have.duplicate_window = self.duplicate_window
                try:
                    await js.update_stream(have)
                except js_errors.APIError as exc:
                    raise ProviderError(f"cannot update JetStream stream {self.stream_name!r} "
                                        f"to the configuration: {exc.description}") from exc
                log.info("updated JetStream stream %s", self.stream_name)
        self._stream_ready = True

    async def _ensure_dead_stream(self) -> None:
        if self._dead_ready:
            return
        config = js_api.StreamConfig(
            name=self.dead_stream, subjects=[f"{self.dead_prefix}.>"],
            storage=js_api.StorageType.FILE, retention=js_api.RetentionPolicy.LIMITS,
            duplicate_window=self.duplicate_window,
        )
        try:
            await self._js.stream_info(self.dead_stream)
        except js_errors.NotFoundError:
            await self._js.add_stream(config)
        self._dead_ready = True

    # -- publishing ------------------------------------------------------------------------------

    def subject(self, event: Event) -> str:
        """``{subject_prefix}.{source}.{type}`` (ProviderError when not a valid subject)."""
        source, type_ = event.source, event.type
        _check_subject_part("source", source or "")
        _check_subject_part("type", type_ or "")
        return f"{self.subject_prefix}.{source}.{type_}"

    async def publish(self, event: Event) -> None:
        """Publish ``event`` and wait for JetStream's ack (a duplicate id is acked, not stored)."""
        result = (await self.publish_many([event]))[0]
        if result is not None:
            raise result

    async def publish_many(self, events: Sequence[Event]) -> list[BaseException | None]:
        """Publish with ``publish_async`` and await every ack (contract: ``base.publish_many``).

        Per-event errors (a type that is no valid subject, a document over the server's
        max_payload, an encoding error) land in that event's slot; a disconnected client, a
        missing ack within ``request_timeout`` or a JetStream error raise
        :class:`~outbox.ProviderUnavailable` for the whole call.
        """
        nc, js = await self._connection_or_unavailable("publish")
        if not nc.is_connected:
            raise _unavailable("client is reconnecting", "publish")
        results: list[BaseException | None] = [None] * len(events)
        futures: list[tuple[int, asyncio.Future[Any]]] = []
        try:
            for index, event in enumerate(events):
                try:
                    subject = self.subject(event)
                    document = wire.encode(event)
                    if len(document) > nc.max_payload:
                        raise ProviderError(f"event {event.id}: document of {len(document)} "
                                            f"bytes exceeds the server's max_payload "
                                            f"({nc.max_payload})")
                except ProviderError as exc:  # MalformedMessage included
                    results[index] = exc
                    continue
                # wait_stall only when the window is full: passing it always makes nats-py
                # yield to the loop per message, so every message is flushed on its own (5x
                # slower); without it a batch goes out in a few writes.
                full = js.publish_async_pending() >= self.publish_window
                future = await js.publish_async(subject, document,
                                                headers={MSG_ID_HEADER: str(event.id)},
                                                wait_stall=self.request_timeout if full else None)
                futures.append((index, future))
            if futures:
                _done, pending = await asyncio.wait([f for _, f in futures],
                                                    timeout=self.request_timeout)
                if pending:
                    raise _unavailable(f"{len(pending)} of {len(futures)} publishes not "
                                       f"acknowledged within {self.request_timeout} s", "publish")
        except (TimeoutError, nats_errors.Error, OSError) as exc:
            raise _unavailable(exc, "publish") from exc
        finally:
            for _, future in futures:
                if not future.done():
                    future.cancel()
        for index, future in futures:
            error = future.exception()
            if error is None:
                if future.result().duplicate:
                    self._duplicates += 1
                else:
                    self._published += 1
            elif _is_outage(error):
                raise _unavailable(error, "publish")
            else:
                results[index] = ProviderError(f"JetStream refused event "
                                               f"{events[index].id}: {error}")
        return results

    # -- consuming ---------------------------------------------------------------------------

    def consume(
        self,
        pattern: str = "*",
        *,
        group: str,
        consumer: str | None = None,
        start: StartPosition | dt.datetime = StartPosition.NOW,
    ) -> NATSGroupReader:
        """Deliveries for ``group`` from its durable pull consumer (see the module docstring).

        Every member of a group pulls from the same durable, so they share the work; another
        group is another durable and sees every message. ``consumer`` only names this member in
        logs. ``start`` applies when the durable is created (``NOW``: new messages only,
        ``BEGINNING``, or an aware datetime). A durable keeps the filter subject it was created
        with: consuming it with another pattern is refused.
        """
        self._check_open()
        validate_group(group)
        compiled = compile_pattern(pattern)
        return NATSGroupReader(self, compiled, group, consumer or get_instance_id(), start)

    async def _ensure_consumer(self, group: str, pattern: Pattern,
                               start: StartPosition | dt.datetime) -> None:
        js = self._js
        wanted_filter = filter_subject(self.subject_prefix, pattern.text)
        try:
            info = await js.consumer_info(self.stream_name, group)
        except js_errors.NotFoundError:
            info = None
        if info is not None:
            have = info.config.filter_subject or f"{self.subject_prefix}.>"
            if have != wanted_filter:
                raise ProviderError(
                    f"JetStream durable {group!r} on {self.stream_name!r} filters {have!r}, not "
                    f"{wanted_filter!r} (pattern {pattern.text!r}): use the pattern it was "
                    "created with, another group, or delete the durable"
                )
            if (info.config.max_deliver == self.max_deliveries + 1
                    and abs((info.config.ack_wait or 0) - self.claim_idle) < 0.001):
                return
        config = js_api.ConsumerConfig(
            durable_name=group,
            name=group,
            ack_policy=js_api.AckPolicy.EXPLICIT,
            ack_wait=self.claim_idle,
            max_deliver=self.max_deliveries + 1,
            filter_subject=wanted_filter,
            max_ack_pending=self.max_ack_pending,
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
            await js.add_consumer(self.stream_name, config)
        except js_errors.APIError as exc:
            if info is None:
                raise
            log.warning("could not update durable %r (ack_wait/max_deliver): %s", group,
                        exc.description)
        else:
            log.info("%s JetStream durable %r filtering %s", "updated" if info else "created",
                     group, wanted_filter)

    async def _dead_letter(self, *, group: str, data: bytes, error: str, deliveries: int,
                           event_id: str | None, subject: str | None) -> None:
        """Publish to ``{stream}_DEAD`` and wait for the ack (the caller then terms)."""
        await self._ensure_dead_stream()
        tail = subject[len(self.subject_prefix) + 1:] if subject else "unknown"
        headers = {
            "Outbox-Error": error.replace("\r", " ").replace("\n", " ")[:4000],
            "Outbox-Group": group,
            "Outbox-Deliveries": str(deliveries),
            "Outbox-Dead-At": utcnow().isoformat(),
        }
        if event_id:
            headers[MSG_ID_HEADER] = f"{group}:{event_id}"
        await self._js.publish(f"{self.dead_prefix}.{group}.{tail}", data, headers=headers,
                               timeout=self.request_timeout)
        self._dead_lettered += 1

    async def dead_letters(self, count: int = 100) -> list[dict[str, Any]]:
        """The oldest ``count`` dead letters: headers, ``subject`` and ``event`` (the raw data)."""
        await self._connection_or_unavailable("dead letters")
        out: list[dict[str, Any]] = []
        try:
            await self._ensure_dead_stream()
            async for msg in self._scan(self.dead_stream, f"{self.dead_prefix}.>"):
                out.append({**(msg.headers or {}), "subject": msg.subject, "event": msg.data})
                if len(out) >= count:
                    break
        except (TimeoutError, nats_errors.Error, OSError) as exc:
            raise _unavailable(exc, "dead letters") from exc
        return out

    async def _scan(self, stream: str, subject: str) -> AsyncIterator[Msg]:
        """Every message of ``stream`` in order, through an ephemeral ordered consumer."""
        info = await self._js.stream_info(stream)
        if not info.state.messages:
            return
        config = js_api.ConsumerConfig(
            ack_policy=js_api.AckPolicy.NONE, deliver_policy=js_api.DeliverPolicy.ALL,
            filter_subject=subject, inactive_threshold=30.0, mem_storage=True,
        )
        sub = await self._js.pull_subscribe(subject, stream=stream, config=config)
        try:
            while True:
                try:
                    batch = await sub.fetch(256, timeout=1.0)
                except TimeoutError:  # nats-py raises its own or asyncio's
                    return
                for msg in batch:
                    yield msg
                if batch[-1].metadata.num_pending == 0:
                    return
        finally:
            with contextlib.suppress(Exception):
                consumer = (await sub.consumer_info()).name
                await sub.unsubscribe()
                await self._js.delete_consumer(stream, consumer)

    # -- storage API (Provider protocol) -----------------------------------------------------
    #
    # The stream holds what was published (bounded by max_age); ``store``/``update_status``
    # keep full records in the key-value bucket ``{stream_name}_STORE`` (same max_age), which
    # wins over the stream's copy of an id (that carries no status: see outbox.wire).

    async def _bucket(self) -> Any:
        if self._kv is None:
            await self._connection_or_unavailable("store")
            try:
                self._kv = await self._js.key_value(self.store_bucket)
            except js_errors.BucketNotFoundError:
                self._kv = await self._js.create_key_value(
                    bucket=self.store_bucket, history=1, ttl=self.max_age,
                    storage=js_api.StorageType.FILE,
                )
        return self._kv

    async def store(self, event: Event) -> None:
        """Keep ``event`` (all fields) without publishing it; storing an id again replaces it."""
        try:
            kv = await self._bucket()
            await kv.put(str(event.id), to_record(event).encode())
        except (TimeoutError, nats_errors.Error, OSError) as exc:
            raise _unavailable(exc, "store") from exc

    async def _stored(self, key: uuid.UUID) -> Event | None:
        kv = await self._bucket()
        try:
            entry = await kv.get(str(key))
        except (js_errors.KeyNotFoundError, js_errors.KeyDeletedError):
            return None
        return None if entry.value is None else from_record(entry.value)

    async def _find_published(self, key: uuid.UUID) -> tuple[int, Event] | None:
        wanted = str(key)
        async for msg in self._scan(self.stream_name, f"{self.subject_prefix}.>"):
            if (msg.headers or {}).get(MSG_ID_HEADER) == wanted:
                event = decode_or_none(msg.data)
                if event is not None:
                    return msg.metadata.sequence.stream, event
        return None

    async def get(self, event_id: uuid.UUID | str) -> Event | None:
        """A stored record, else the published copy (a scan of the stream: for inspection)."""
        key = as_event_id(event_id)
        await self._connection_or_unavailable("get")
        try:
            stored = await self._stored(key)
            if stored is not None:
                return stored
            found = await self._find_published(key)
        except (TimeoutError, nats_errors.Error, OSError) as exc:
            raise _unavailable(exc, "get") from exc
        return None if found is None else found[1]

    async def list(self, filter: EventFilter | None = None) -> list[Event]:
        """Stored and published events matching ``filter`` (a full scan; for inspection)."""
        flt = filter or EventFilter()
        await self._connection_or_unavailable("list")
        found: dict[uuid.UUID, Event] = {}
        try:
            async for msg in self._scan(self.stream_name, f"{self.subject_prefix}.>"):
                event = decode_or_none(msg.data)
                if event is not None:
                    found.setdefault(event.id, event)
            # The bucket's own stream keeps the last value of each key (history 1): read it with
            # a pull consumer. (kv.keys() may answer "no keys" when its push consumer's messages
            # are still in flight — nats-py reads num_pending == 0 and nothing received yet.)
            await self._bucket()
            async for msg in self._scan(f"KV_{self.store_bucket}", f"$KV.{self.store_bucket}.>"):
                if msg.data and (msg.headers or {}).get("KV-Operation") not in ("DEL", "PURGE"):
                    event = from_record(msg.data)
                    found[event.id] = event
        except (TimeoutError, nats_errors.Error, OSError) as exc:
            raise _unavailable(exc, "list") from exc
        return flt.select(found.values())

    async def update_status(self, event_id: uuid.UUID | str, status: EventStatus | str,
                            error: str | None = None) -> None:
        event = await self.get(event_id)
        if event is None:
            raise EventNotFound(f"no event {event_id} in JetStream stream {self.stream_name!r}")
        apply_status(event.__dict__, EventStatus(status).value, error, utcnow())
        await self.store(event)

    async def delete(self, event_id: uuid.UUID | str) -> None:
        key = as_event_id(event_id)
        await self._connection_or_unavailable("delete")
        removed = False
        try:
            if await self._stored(key) is not None:
                kv = await self._bucket()
                await kv.purge(str(key))
                removed = True
            found = await self._find_published(key)
            if found is not None:
                removed = await self._js.delete_msg(self.stream_name, found[0]) or removed
        except (TimeoutError, nats_errors.Error, OSError) as exc:
            raise _unavailable(exc, "delete") from exc
        if not removed:
            raise EventNotFound(f"no event {event_id} in JetStream stream {self.stream_name!r}")

    def stream(self, pattern: str = "*") -> AsyncIterator[Event]:
        """Events published from now on matching ``pattern`` (an ephemeral consumer; nothing is
        redelivered: use :meth:`consume` for that). Malformed messages are logged and skipped."""
        self._check_open()
        return self._tail(compile_pattern(pattern))

    async def _tail(self, pattern: Pattern) -> AsyncIterator[Event]:
        _nc, js = await self._connection_or_unavailable("stream")
        subject = filter_subject(self.subject_prefix, pattern.text)
        config = js_api.ConsumerConfig(
            ack_policy=js_api.AckPolicy.NONE, deliver_policy=js_api.DeliverPolicy.NEW,
            filter_subject=subject, inactive_threshold=60.0, mem_storage=True,
        )
        sub = await js.pull_subscribe(subject, stream=self.stream_name, config=config)
        try:
            while not self._closed:
                try:
                    batch = await sub.fetch(64, timeout=self.block)
                except TimeoutError:  # nats-py raises its own or asyncio's
                    continue
                for msg in batch:
                    event = decode_or_none(msg.data, f"message on {msg.subject}")
                    if event is not None and pattern.matches(event.type):
                        yield event
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    # -- lifecycle ---------------------------------------------------------------------------

    async def stats(self) -> ProviderStats:
        _nc, js = await self._connection_or_unavailable("stats")
        try:
            info = await js.stream_info(self.stream_name)
            consumers = await js.consumers_info(self.stream_name)
            try:
                dead = (await js.stream_info(self.dead_stream)).state.messages
            except js_errors.NotFoundError:
                dead = 0
        except (TimeoutError, nats_errors.Error, OSError) as exc:
            raise _unavailable(exc, "stats") from exc
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
            events_published=self._published,
            events_consumed=self._consumed,
            active_subscribers=len(self._readers),
            extra={"stream": self.stream_name, "stream_messages": info.state.messages,
                   "dead_letters": dead, "groups": groups,
                   "duplicates_dropped": self._duplicates,
                   "dead_lettered_here": self._dead_lettered},
        )

    async def close(self) -> None:
        """Stop this provider's consumers, flush pending acks and close the connection."""
        if self._closed:
            return
        for reader in list(self._readers):
            await reader.aclose()
        self._closed = True
        if self._nc is not None and not self._nc.is_closed:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._nc.flush(), timeout=2)
            with contextlib.suppress(Exception):
                await self._nc.close()

    def _check_open(self) -> None:
        if self._closed:
            raise ProviderError("NATSProvider is closed")


# ------------------------------------------------------------------------------------------------
# consumer side


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
        except (TimeoutError, nats_errors.Error, OSError) as exc:
            raise _unavailable(exc, "ack") from exc
        self._settled = "ack"
        self._reader.settled(self)

    async def nack(self, error: str, *, delay: float = 0.0) -> None:
        """The handler failed: JetStream redelivers after ``delay`` seconds."""
        self._check("nack")
        try:
            await self.msg.nak(delay=delay if delay > 0 else None)
        except (nats_errors.Error, OSError) as exc:
            raise _unavailable(exc, "nak") from exc
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

    client_errors = (TimeoutError, nats_errors.Error, OSError, ProviderUnavailable)
    p: NATSProvider

    def __init__(self, provider: NATSProvider, pattern: Pattern, group: str, consumer: str,
                 start: StartPosition | dt.datetime) -> None:
        super().__init__(provider, pattern, group, consumer, start, stream=provider.stream_name,
                         what=f"nats {provider._display}", logger=log)
        self.in_flight: set[NATSDelivery] = set()
        #: Last error per event id, for the dead letter of a message that ran out of deliveries.
        self.errors: OrderedDict[str, str] = OrderedDict()
        self.sub: Any = None

    # -- GroupReader hooks ---------------------------------------------------------------------

    async def _join(self) -> None:
        _nc, js = await self.p._connection()
        await self.p._ensure_consumer(self.group, self.pattern, self.start_position)
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
        self.p._stream_ready = False
        self.sub = None
        return True

    def _refusal(self, exc: BaseException) -> ProviderError | None:
        if isinstance(exc, js_errors.APIError) and (exc.code or 0) < 500:
            return ProviderError(f"JetStream refused the consumer of group {self.group!r}: "
                                 f"{exc}")
        return None

    def _handing_out(self, delivery: NATSDelivery) -> None:
        self.in_flight.add(delivery)

    async def _give_back(self) -> None:
        # Nak what this member holds, so the group gets it at once.
        for delivery in [*self.buffer, *self.in_flight]:
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
            if not self.p._nc.is_connected:
                raise _unavailable("client is reconnecting", "fetch") from None
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
            await self.p._dead_letter(group=self.group, data=msg.data, error=error,
                                      deliveries=deliveries, event_id=event_id,
                                      subject=msg.subject)
            await msg.term()
        except (TimeoutError, nats_errors.Error, OSError) as exc:
            raise _unavailable(exc, "park") from exc

    def settled(self, delivery: NATSDelivery, error: str | None = None) -> None:
        self.in_flight.discard(delivery)
        key = str(delivery.event.id)
        if error is None:
            self.errors.pop(key, None)
            if delivery._settled == "ack":
                self.p._consumed += 1
        else:
            self.errors[key] = error
            while len(self.errors) > 10000:
                self.errors.popitem(last=False)
