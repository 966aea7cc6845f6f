"""Pieces shared by the consumer-group providers (Redis Streams, NATS JetStream, the database).

Kept out of ``redis/`` and ``nats/`` so they behave the same: group-name rules, the one-pattern-
per-group rule inside a process, reconnect backoff, outage logging, URL redaction, the life cycle
of a group member (:class:`GroupReader`), the dead-letter rule for exhausted deliveries, and the
rules of sharded groups (:func:`shard_of`, :func:`assigned_shards`).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import random
import re
import time
import zlib
from collections import deque
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, TypeVar

from outbox import wire
from outbox._patterns import Pattern, compile_pattern
from outbox._redact import redact as redact_url
from outbox.events import Event
from outbox.exceptions import MalformedMessage, ProviderError

__all__ = [
    "Backoff",
    "BusDelivery",
    "GroupReader",
    "GroupRegistry",
    "OutageLog",
    "SettleOnce",
    "assigned_shards",
    "config_options",
    "config_section",
    "decode_or_none",
    "exhausted",
    "redact_url",
    "shard_of",
    "validate_group",
]

log = logging.getLogger("outbox.providers")

_GROUP = re.compile(r"[A-Za-z0-9_-]{1,200}")


def validate_group(group: str) -> str:
    """A consumer group name: 1-200 of ``[A-Za-z0-9_-]`` (valid as a JetStream durable name too)."""
    if not isinstance(group, str) or not _GROUP.fullmatch(group):
        raise ValueError(
            f"invalid consumer group {group!r}: use 1-200 letters, digits, '_' or '-' "
            "(it is the Redis consumer-group name and the JetStream durable name)"
        )
    return group


@dataclass
class Backoff:
    """Exponential reconnect backoff with jitter: ``initial`` doubling up to ``maximum``."""

    initial: float = 0.1
    maximum: float = 5.0
    _current: float = field(default=0.0, init=False)

    def next(self) -> float:
        self._current = self.initial if not self._current else min(self.maximum,
                                                                   self._current * 2)
        return self._current * random.uniform(0.8, 1.2)

    def reset(self) -> None:
        self._current = 0.0


class OutageLog:
    """Logs the transitions available → unavailable → available once each, not every retry."""

    def __init__(self, logger: logging.Logger, what: str) -> None:
        self._logger = logger
        self._what = what
        self._down_since: float | None = None

    def down(self, error: BaseException) -> None:
        if self._down_since is None:
            self._down_since = time.monotonic()
            self._logger.warning("%s unavailable, retrying with backoff: %s", self._what,
                                 _describe(error))

    def up(self) -> None:
        if self._down_since is not None:
            self._logger.warning("%s reachable again after %.1f s", self._what,
                                 time.monotonic() - self._down_since)
            self._down_since = None


def _describe(error: BaseException) -> str:
    text = str(error) or type(error).__name__
    return f"{type(error).__name__}: {text}" if text != type(error).__name__ else text


class GroupRegistry:
    """Which pattern each consumer group is consumed with inside this process.

    A group is one queue: a consumer that filters by pattern must settle (ack) what it does not
    want, or those entries would be redelivered forever. Two iterators of one group with
    *different* patterns in one process would therefore ack away each other's events; that is
    refused. Consume the union once and dispatch by pattern (``outbox.Consumer`` does that).
    """

    def __init__(self) -> None:
        self._patterns: dict[str, tuple[str, int]] = {}

    def acquire(self, group: str, pattern: str) -> None:
        """Register one iterator of ``group`` (any key naming the group uniquely)."""
        compile_pattern(pattern)
        current = self._patterns.get(group)
        if current is not None and current[0] != pattern:
            name = group.rsplit("/", 1)[-1]
            raise ProviderError(
                f"consumer group {name!r} is already consumed with pattern {current[0]!r} in "
                f"this process; consuming it with {pattern!r} as well would acknowledge events "
                "the other pattern needs. Consume one covering pattern per group (outbox."
                "Consumer dispatches by pattern) or use another group."
            )
        self._patterns[group] = (pattern, (current[1] if current else 0) + 1)

    def release(self, group: str) -> None:
        current = self._patterns.get(group)
        if current is None:
            return
        if current[1] <= 1:
            del self._patterns[group]
        else:
            self._patterns[group] = (current[0], current[1] - 1)


class SettleOnce:
    """Delivery mixin: ack / nack / park exactly once.

    Subclasses call :meth:`_check` before settling and set ``_settled`` only after the broker
    accepted the settlement, so a call that failed (broker down) can be retried.
    """

    _settled: str | None = None

    def _check(self, how: str) -> None:
        if self._settled is not None:
            raise ProviderError(f"delivery of event {getattr(self, 'event', None)!r} already "
                                f"settled ({self._settled}); cannot {how} it")

    @property
    def settled(self) -> bool:
        return self._settled is not None


class BusDelivery(SettleOnce):
    """What the Redis and NATS deliveries share: the event, the attempt, the last error."""

    def __init__(self, event: Event, attempt: int, reader: Any) -> None:
        self.event = event
        self.group: str = reader.group
        self.attempt = attempt
        self.last_error: str | None = None
        self._reader = reader


def exhausted(attempt: int, max_deliveries: int, last_error: str | None) -> str | None:
    """The dead-letter reason of delivery number ``attempt``, or ``None`` while it may still be
    handed to a handler (at most ``max_deliveries`` times)."""
    if attempt <= max_deliveries:
        return None
    error = f"delivered {attempt - 1} times without success (max_deliveries={max_deliveries})"
    return f"{error}; last error: {last_error}" if last_error else error


def shard_of(event: Event, shards: int) -> int:
    """The shard (0 .. ``shards`` - 1) of ``event``: a hash (CRC-32) of its ``ordering_key``, so
    every event of a key goes to one shard; events without a key are spread by their id."""
    if shards <= 1:
        return 0
    key = event.ordering_key if event.ordering_key is not None else str(event.id)
    return zlib.crc32(key.encode()) % shards


def assigned_shards(members: Collection[str], me: str, shards: int) -> set[int]:
    """The shards ``me`` should read when ``members`` (``me`` among them) share ``shards``:
    shard ``i`` goes to the ``i % len(members)``-th member by name, so every member computes the
    same assignment from the same member list."""
    ordered = sorted(set(members) | {me})
    return {i for i in range(shards) if ordered[i % len(ordered)] == me}


D = TypeVar("D", bound=BusDelivery)

#: Patterns of the groups consumed in this process, by server/stream/group (see GroupRegistry).
GROUPS = GroupRegistry()


class GroupReader(Generic[D]):
    """One member of one consumer group: the life cycle the Redis and NATS readers share.

    The async iterator ``consume()`` returns; ``aclose()`` (or ``async with``) stops it. The first
    iteration (or :meth:`open`) registers it (one pattern per group and process, see
    :class:`GroupRegistry`) and starts a heartbeat that keeps what it holds alive
    (:meth:`_keep_alive` every third of ``claim_idle``). :meth:`next` repeats :meth:`_fill` until
    a delivery is buffered, riding out outages with backoff; subclasses say which errors are
    outages (:meth:`_refusal`) and which they repair on the spot (:meth:`_recovered`).
    """

    #: Exceptions of the client library :meth:`_run` handles (anything else propagates).
    client_errors: ClassVar[tuple[type[BaseException], ...]] = ()

    def __init__(self, provider: Any, pattern: Pattern, group: str, consumer: str,
                 start: Any, *, stream: str, what: str, logger: logging.Logger) -> None:
        self.p = provider
        self.pattern = pattern
        self.group = group
        self.consumer = consumer
        self.start_position = start
        self.buffer: deque[D] = deque()
        self.backoff = Backoff()
        self.outage = OutageLog(logger, f"{what} (group {group!r})")
        self.heartbeat: asyncio.Task[None] | None = None
        self.registry_key = f"{provider._display}/{stream}/{group}"
        self.started = False
        self.closed = False

    # -- what a subclass provides ---------------------------------------------------------------

    async def _join(self) -> None:
        """Create the group (durable) if needed and bind to it."""
        raise NotImplementedError

    def _joined(self) -> bool:
        raise NotImplementedError

    async def _fill(self) -> None:
        """Fetch: append deliveries to ``buffer`` (or return with none when nothing came)."""
        raise NotImplementedError

    async def _keep_alive(self) -> None:
        """Heartbeat: keep the deliveries this member holds from being handed to others."""

    async def _give_back(self) -> None:
        """On close: make what this member holds and has not settled available to the group."""

    def _recovered(self, exc: BaseException) -> bool:
        """True when ``exc`` was repaired here (e.g. the group vanished): try again at once."""
        return False

    def _refusal(self, exc: BaseException) -> ProviderError | None:
        """The error to raise when ``exc`` is not an outage (``None``: back off and retry)."""
        return None

    def _handing_out(self, delivery: D) -> None:
        """``delivery`` leaves the buffer for a handler."""

    # -- life cycle ------------------------------------------------------------------------------

    def __aiter__(self) -> GroupReader[D]:
        return self

    async def __anext__(self) -> D:
        if self.closed:
            raise StopAsyncIteration
        if not self.started:
            self._start()
        return await self.next()

    async def __aenter__(self) -> GroupReader[D]:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def _start(self) -> None:
        self.p._check_open()
        GROUPS.acquire(self.registry_key, self.pattern.text)  # raises for a second pattern
        self.started = True
        self.p._readers.add(self)
        self.heartbeat = asyncio.get_running_loop().create_task(self._heartbeat())

    async def open(self) -> None:
        """Create the group now (it starts at the end of the stream *now*, not at the first
        pull); waits with backoff while the server is unreachable."""
        if self.closed:
            return
        if not self.started:
            self._start()
        with contextlib.suppress(StopAsyncIteration):  # closed meanwhile
            await self._run(self._join, until=self._joined)

    async def aclose(self) -> None:
        """Stop: what this member holds and has not settled (buffered, waiting for a retry,
        handed out) becomes available to the rest of the group at once. Close only when no
        handler still works on a delivery (``outbox.Consumer`` waits for them)."""
        if self.closed:
            return
        self.closed = True
        if not self.started:
            return
        self.p._readers.discard(self)
        GROUPS.release(self.registry_key)
        if self.heartbeat is not None:
            self.heartbeat.cancel()
            with contextlib.suppress(BaseException):
                await self.heartbeat
        await self._give_back()

    # -- fetching --------------------------------------------------------------------------------

    async def next(self) -> D:
        """The next delivery; waits for one, riding out outages."""
        await self._run(self._fill, until=lambda: bool(self.buffer))
        delivery = self.buffer.popleft()
        self._handing_out(delivery)
        return delivery

    async def _run(self, step: Callable[[], Awaitable[None]], until: Callable[[], bool]) -> None:
        """Repeat ``step`` until ``until()``; outages are logged once and waited out."""
        while True:
            if self.closed:
                raise StopAsyncIteration
            if until():
                return
            try:
                await step()
            except self.client_errors as exc:
                if self._recovered(exc):
                    continue
                refusal = self._refusal(exc)
                if refusal is not None:
                    raise refusal from exc
                self.outage.down(exc)
                await asyncio.sleep(self.backoff.next())
                continue
            self.outage.up()
            self.backoff.reset()

    async def _heartbeat(self) -> None:
        interval = max(self.p.claim_idle / 3, 0.05)
        while True:
            await asyncio.sleep(interval)
            await self._keep_alive()


# ------------------------------------------------------------------------------------------------
# values


def config_section(config: Any, name: str) -> dict[str, Any]:
    """The ``name`` section of an outbox Config (attribute or mapping) as a plain dict."""
    section = getattr(config, name, None)
    if section is None and isinstance(config, Mapping):
        section = config.get(name)
    if section is None:
        return {}
    if isinstance(section, Mapping):
        return dict(section)
    if hasattr(section, "__dataclass_fields__"):
        return {f: getattr(section, f) for f in section.__dataclass_fields__}
    return dict(vars(section))


def config_options(config: Any, name: str, known: Collection[str]) -> dict[str, Any]:
    """The options of section ``name`` a provider takes (``known``) that are set, durations as
    seconds: the keyword arguments of its ``from_config``."""
    options = {k: v for k, v in config_section(config, name).items()
               if k in known and v is not None}
    for key, value in options.items():
        if isinstance(value, dt.timedelta):
            options[key] = value.total_seconds()
    return options


def decode_or_none(raw: bytes | None, where: str | None = None) -> Event | None:
    """The event of a wire document; ``None`` for a missing or malformed one (logged with
    ``where`` when given)."""
    if raw is None:
        return None
    try:
        return wire.decode(raw)
    except MalformedMessage as exc:
        if where is not None:
            log.warning("skipping malformed %s: %s", where, exc)
        return None
