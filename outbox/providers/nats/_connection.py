"""The NATS connection of a provider: connecting, reconnecting, the JetStream streams it needs.

The client reconnects on its own (every ``reconnect_wait`` seconds, forever). While it is
disconnected, publishing raises :class:`ProviderUnavailable` at once (nothing piles up in
the client's buffer) and consumers wait; disconnects and reconnects are logged once each. The
first connection fails fast (``connect_timeout``), as the relay's readiness check wants.

The event stream ``stream_name`` (subjects ``{subject_prefix}.>``, file storage, ``max_age``,
``duplicate_window``, ``replicas`` copies on a cluster) is created when missing and updated when
its subjects, ``max_age``, ``duplicate_window`` or replica count differ from the configuration
(the relay and consumers both do this), so several outboxes can share one server with different
prefixes. The dead-letter stream
``{stream_name}_DEAD`` is created on first use.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import AsyncIterator
from typing import Any

import nats
import nats.errors as nats_errors
import nats.js.errors as js_errors
from nats.aio.msg import Msg
from nats.js import api as js_api

from outbox.events import get_instance_id
from outbox.exceptions import ProviderError, ProviderUnavailable
from outbox.providers._bus import redact_url

__all__ = ["DEFAULT_URL", "ERRORS", "MSG_ID_HEADER", "Connection", "is_outage", "unavailable"]

log = logging.getLogger("outbox.providers.nats")

DEFAULT_URL = "nats://127.0.0.1:4222"
MSG_ID_HEADER = "Nats-Msg-Id"

#: The exceptions of a NATS call that an outbox caller handles.
ERRORS = (TimeoutError, nats_errors.Error, OSError)


def is_outage(exc: BaseException) -> bool:
    """True when ``exc`` says the server cannot take requests now (not: this request is wrong)."""
    if isinstance(exc, nats_errors.MaxPayloadError | nats_errors.BadSubjectError):
        return False
    if isinstance(exc, js_errors.APIError) and not isinstance(
            exc, js_errors.ServiceUnavailableError):
        return (exc.code or 0) >= 500
    return isinstance(exc, nats_errors.Error | OSError | asyncio.TimeoutError)


def unavailable(exc: BaseException | str, what: str) -> ProviderUnavailable:
    detail = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"
    return ProviderUnavailable(f"nats unavailable ({what}): {detail}")


def ssl_context(url: str, tls: bool | None, ca_file: str | None, cert_file: str | None,
                key_file: str | None) -> ssl.SSLContext | None:
    """The TLS context for a ``tls://`` URL, ``tls=True`` or a CA / client certificate."""
    wants = bool(tls) or any(u.strip().startswith("tls://") for u in url.split(","))
    if not (wants or ca_file or cert_file):
        return None
    context = ssl.create_default_context(cafile=ca_file)
    if cert_file:
        context.load_cert_chain(cert_file, key_file)
    return context


class Connection:
    """One client connection and JetStream context, created on first use (see the module
    docstring)."""

    def __init__(self, url: str, *, auth: dict[str, str | None], tls: ssl.SSLContext | None,
                 stream_name: str, subject_prefix: str, max_age: float,
                 duplicate_window: float, connect_timeout: float, request_timeout: float,
                 reconnect_wait: float, publish_window: int, partitions: int = 1,
                 replicas: int = 1) -> None:
        self.url = url
        self.display = ",".join(redact_url(u.strip()) for u in url.split(","))
        self.auth = auth
        self.tls = tls
        self.stream_name = stream_name
        self.subject_prefix = subject_prefix
        self.dead_stream = f"{stream_name}_DEAD"
        self.dead_prefix = f"{subject_prefix}_dead"
        self.max_age = max_age
        self.duplicate_window = duplicate_window
        self.connect_timeout = connect_timeout
        self.request_timeout = request_timeout
        self.reconnect_wait = reconnect_wait
        self.publish_window = publish_window
        self.partitions = partitions
        self.replicas = replicas
        self.nc: Any = None
        self.js: Any = None
        self.stream_ready = False
        self._dead_ready = False
        self._lock: asyncio.Lock | None = None
        self.closed = False

    async def get(self) -> tuple[Any, Any]:
        """(client, JetStream context), connecting and creating the stream on first use."""
        if self.closed:
            raise ProviderError("NATSProvider is closed")
        if self.nc is None or self.nc.is_closed:
            if self._lock is None:
                self._lock = asyncio.Lock()
            async with self._lock:
                if self.nc is None or self.nc.is_closed:
                    await self._connect()
        if not self.stream_ready:
            await self._ensure_stream()
        return self.nc, self.js

    async def get_or_unavailable(self, what: str) -> tuple[Any, Any]:
        """:meth:`get`, any client error as :class:`~outbox.exceptions.ProviderUnavailable`."""
        try:
            return await self.get()
        except ERRORS as exc:
            raise unavailable(exc, what) from exc

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
        options.update({k: v for k, v in self.auth.items() if v is not None})
        if self.tls is not None:
            options["tls"] = self.tls
        try:
            nc = await asyncio.wait_for(nats.connect(**options),
                                        timeout=self.connect_timeout * 3 + 1)
        except ERRORS as exc:
            raise unavailable(exc, f"connect to {self.display}") from exc
        nc.options["max_reconnect_attempts"] = -1  # never give up once connected
        self.nc = nc
        self.js = nc.jetstream(timeout=self.request_timeout,
                               publish_async_max_pending=self.publish_window)
        self.stream_ready = False
        log.info("connected to NATS %s", self.display)

    async def _on_error(self, exc: Exception) -> None:
        log.debug("nats client error: %s: %s", type(exc).__name__, exc)

    async def _on_disconnect(self) -> None:
        if not self.closed:
            log.warning("disconnected from NATS %s; reconnecting every %.1f s", self.display,
                        self.reconnect_wait)

    async def _on_reconnect(self) -> None:
        log.warning("reconnected to NATS %s", self.display)

    async def ping(self) -> None:
        """Raise :class:`ProviderUnavailable` unless the server and JetStream answer."""
        nc, js = await self.get_or_unavailable("ping")
        if not nc.is_connected:
            raise unavailable("client is reconnecting", "ping")
        try:
            await js.account_info()
        except ERRORS as exc:
            raise unavailable(exc, "ping") from exc

    async def _ensure_stream(self) -> None:
        js = self.js
        wanted = js_api.StreamConfig(
            name=self.stream_name,
            subjects=[f"{self.subject_prefix}.>"],
            storage=js_api.StorageType.FILE,
            retention=js_api.RetentionPolicy.LIMITS,
            max_age=self.max_age,
            duplicate_window=self.duplicate_window,
            num_replicas=self.replicas,
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
                    or abs((have.duplicate_window or 0) - self.duplicate_window) > 0.001
                    or (have.num_replicas or 1) != self.replicas):
                have.subjects = wanted.subjects
                have.max_age = self.max_age
                have.duplicate_window = self.duplicate_window
                have.num_replicas = self.replicas
                try:
                    await js.update_stream(have)
                except js_errors.APIError as exc:
                    raise ProviderError(f"cannot update JetStream stream {self.stream_name!r} "
                                        f"to the configuration: {exc.description}") from exc
                log.info("updated JetStream stream %s", self.stream_name)
        self.stream_ready = True

    async def ensure_dead_stream(self) -> None:
        if self._dead_ready:
            return
        config = js_api.StreamConfig(
            name=self.dead_stream, subjects=[f"{self.dead_prefix}.>"],
            storage=js_api.StorageType.FILE, retention=js_api.RetentionPolicy.LIMITS,
            duplicate_window=self.duplicate_window, num_replicas=self.replicas,
        )
        try:
            await self.js.stream_info(self.dead_stream)
        except js_errors.NotFoundError:
            await self.js.add_stream(config)
        self._dead_ready = True

    async def scan(self, stream: str, subject: str) -> AsyncIterator[Msg]:
        """Every message of ``stream`` in order, through an ephemeral ordered consumer."""
        info = await self.js.stream_info(stream)
        if not info.state.messages:
            return
        config = js_api.ConsumerConfig(
            ack_policy=js_api.AckPolicy.NONE, deliver_policy=js_api.DeliverPolicy.ALL,
            filter_subject=subject, inactive_threshold=30.0, mem_storage=True,
        )
        sub = await self.js.pull_subscribe(subject, stream=stream, config=config)
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
                await self.js.delete_consumer(stream, consumer)

    async def close(self) -> None:
        """Flush what is in flight and close the client. Idempotent."""
        self.closed = True
        if self.nc is not None and not self.nc.is_closed:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.nc.flush(), timeout=2)
            with contextlib.suppress(Exception):
                await self.nc.close()
