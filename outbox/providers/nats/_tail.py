"""``NATSProvider.stream``: an ephemeral consumer from now on (no group, nothing acknowledged)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from nats.js import api as js_api

from outbox._patterns import Pattern
from outbox.events import Event
from outbox.providers._bus import decode_or_none
from outbox.providers.nats._subjects import filter_subject

if TYPE_CHECKING:
    from outbox.providers.nats._provider import NATSProvider

__all__ = ["tail"]


async def tail(provider: NATSProvider, pattern: Pattern) -> AsyncIterator[Event]:
    """Messages published from now on whose type matches ``pattern``; malformed messages are
    logged and skipped."""
    _nc, js = await provider._conn.get_or_unavailable("stream")
    subject = filter_subject(provider.subject_prefix, pattern.text,
                             partitions=provider.partitions)
    config = js_api.ConsumerConfig(
        ack_policy=js_api.AckPolicy.NONE, deliver_policy=js_api.DeliverPolicy.NEW,
        filter_subject=subject, inactive_threshold=60.0, mem_storage=True,
    )
    sub = await js.pull_subscribe(subject, stream=provider.stream_name, config=config)
    try:
        while not provider._closed:
            try:
                batch = await sub.fetch(64, timeout=provider.block)
            except TimeoutError:  # nats-py raises its own or asyncio's
                continue
            for msg in batch:
                event = decode_or_none(msg.data, f"message on {msg.subject}")
                if event is not None and pattern.matches(event.type):
                    yield event
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
