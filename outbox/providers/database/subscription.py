"""The async iterators ``consume()`` and ``stream()`` return.

Plain classes rather than async generators: cancelling one ``__anext__`` (a timeout around it)
must not end the iteration, and a fetch that was under way when the caller was cancelled must
not lose what it claimed. Close them (``aclose()`` or ``async with``) to give back what they hold
at once; one that is dropped without closing is forgotten by the provider and its claims are
taken over by other members when their leases run out.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import AsyncIterator
from types import TracebackType
from typing import TYPE_CHECKING, Self, TypeVar

from outbox.events import Event
from outbox.exceptions import ProviderUnavailable
from outbox.providers.database.consumer import DatabaseDelivery, _GroupReader, _Tail

if TYPE_CHECKING:
    from outbox.providers.database.provider import DatabaseProvider

__all__ = ["Deliveries", "GroupStream", "TailStream"]

T = TypeVar("T")


def _forget(provider_ref: weakref.ReferenceType[DatabaseProvider],
            reader: _GroupReader | _Tail) -> None:
    provider = provider_ref()
    if provider is not None:
        provider._forget(reader)


class _Base(AsyncIterator[T]):
    def __init__(self, provider: DatabaseProvider, reader: _GroupReader | _Tail) -> None:
        self._provider = provider
        self._reader = reader
        self._closed = False
        self._finalizer = weakref.finalize(self, _forget, weakref.ref(provider), reader)

    def __aiter__(self) -> Self:
        return self

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Give back what this iterator holds; later ``__anext__`` calls end the iteration."""
        if self._closed:
            return
        self._closed = True
        self._finalizer.detach()
        await self._reader.close()
        self._provider._forget(self._reader)

    def _ready(self) -> None:
        if self._closed or self._reader.closed:
            raise StopAsyncIteration
        self._provider._ensure_keeper()


class Deliveries(_Base[DatabaseDelivery]):
    """``consume()``: deliveries of one member of a consumer group."""

    _reader: _GroupReader

    async def __anext__(self) -> DatabaseDelivery:
        self._ready()
        return await self._reader.next()

    async def open(self) -> None:
        """Join the group now: ``consume()`` created it already, unless the database was
        unreachable then (the first iteration creates it)."""
        if self._closed or self._reader.group_ready:
            return
        with contextlib.suppress(ProviderUnavailable):
            await self._reader._open()

    @property
    def group(self) -> str:
        return self._reader.group


class GroupStream(_Base[Event]):
    """``stream(group=...)``: events of a group, each acknowledged when the next is asked for."""

    _reader: _GroupReader

    def __init__(self, provider: DatabaseProvider, reader: _GroupReader) -> None:
        super().__init__(provider, reader)
        self._pending: DatabaseDelivery | None = None

    async def __anext__(self) -> Event:
        self._ready()
        if self._pending is not None:
            pending, self._pending = self._pending, None
            await pending.ack()
        delivery = await self._reader.next()
        self._pending = delivery
        return delivery.event


class TailStream(_Base[Event]):
    """``stream()`` without a group: events committed from its creation on."""

    _reader: _Tail

    async def __anext__(self) -> Event:
        self._ready()
        return await self._reader.next()
