"""The async iterator :meth:`MemoryProvider.stream` returns."""

from __future__ import annotations

import weakref
from types import TracebackType
from typing import TYPE_CHECKING

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream

from outbox.events import Event

if TYPE_CHECKING:
    from outbox.providers.memory._provider import MemoryProvider

__all__ = ["MemoryStream"]


def _finalize_stream(
    provider_ref: weakref.ReferenceType[MemoryProvider],
    key: int,
    receive: MemoryObjectReceiveStream[Event],
) -> None:
    receive.close()
    provider = provider_ref()
    if provider is not None:
        provider._close_stream(key)


class MemoryStream:
    """Async iterator over one subscription of :meth:`MemoryProvider.stream`."""

    def __init__(
        self, provider: MemoryProvider, key: int, receive: MemoryObjectReceiveStream[Event]
    ) -> None:
        self._provider = weakref.ref(provider)
        self._key = key
        self._receive = receive
        self._finalizer = weakref.finalize(
            self, _finalize_stream, weakref.ref(provider), key, receive
        )

    def __aiter__(self) -> MemoryStream:
        return self

    async def __anext__(self) -> Event:
        try:
            event = await self._receive.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            self._finalizer()
            raise StopAsyncIteration from None
        provider = self._provider()
        if provider is not None:
            provider._count_consumed()
        return event

    async def aclose(self) -> None:
        """Stop receiving; publishers no longer wait for this stream."""
        self._finalizer()

    async def __aenter__(self) -> MemoryStream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
