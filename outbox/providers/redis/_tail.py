"""``RedisProvider.stream``: follow the stream with ``XREAD`` (no group, nothing acknowledged)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from outbox._patterns import Pattern
from outbox.events import Event
from outbox.exceptions import ProviderError
from outbox.providers._bus import Backoff, OutageLog, decode_or_none
from outbox.providers.redis._connection import ERRORS, is_outage, text

if TYPE_CHECKING:
    from outbox.providers.redis._provider import RedisProvider

__all__ = ["tail"]

log = logging.getLogger("outbox.providers.redis")


async def tail(provider: RedisProvider, pattern: Pattern) -> AsyncIterator[Event]:
    """Entries appended from now on whose type matches ``pattern``; malformed entries are logged
    and skipped; outages are waited out with backoff (logged once)."""
    last = dict.fromkeys(provider.streams, "$")
    backoff = Backoff()
    outage = OutageLog(log, f"redis {provider._display}")
    while not provider._closed:
        try:
            reply = await provider._client.xread(dict(last), block=int(provider.block * 1000),
                                                 count=100)
        except ERRORS as exc:
            if not is_outage(exc):
                raise ProviderError(f"redis xread failed: {exc}") from exc
            outage.down(exc)
            await asyncio.sleep(backoff.next())
            continue
        outage.up()
        backoff.reset()
        for stream, entries in reply or ():
            for entry_id, fields in entries:
                last[text(stream)] = text(entry_id)
                event = decode_or_none(fields.get(b"event"), f"entry {text(entry_id)}")
                if event is not None and pattern.matches(event.type):
                    yield event
