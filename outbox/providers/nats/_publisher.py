"""Publishing to JetStream: a whole batch in flight, every ack awaited.

Subject ``{subject_prefix}.{source}.{type}``, header ``Nats-Msg-Id`` = event id, so JetStream
drops a republished event inside ``duplicate_window``. ``publish_many`` keeps a batch in flight
with ``publish_async`` and awaits every ack (bounded by ``request_timeout``) before it returns:
an event counts as forwarded only once JetStream stored it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from outbox import wire
from outbox.events import Event
from outbox.exceptions import ProviderError
from outbox.providers.nats._connection import (
    ERRORS,
    MSG_ID_HEADER,
    Connection,
    is_outage,
    unavailable,
)
from outbox.providers.nats._subjects import subject_of

__all__ = ["JetStreamPublisher"]


class JetStreamPublisher:
    """Publishes events on one :class:`Connection` (see the module docstring)."""

    def __init__(self, connection: Connection) -> None:
        self.conn = connection
        self.published = 0
        self.duplicates = 0

    async def publish_many(self, events: Sequence[Event]) -> list[BaseException | None]:
        """Per-event errors (a type that is no valid subject, a document over the server's
        max_payload, an encoding error) land in that event's slot; a disconnected client, a
        missing ack within ``request_timeout`` or a JetStream error raise
        :class:`~outbox.exceptions.ProviderUnavailable` for the whole call."""
        conn = self.conn
        nc, js = await conn.get_or_unavailable("publish")
        if not nc.is_connected:
            raise unavailable("client is reconnecting", "publish")
        results: list[BaseException | None] = [None] * len(events)
        futures: list[tuple[int, asyncio.Future[Any]]] = []
        try:
            for index, event in enumerate(events):
                try:
                    subject = subject_of(conn.subject_prefix, event, conn.partitions)
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
                full = js.publish_async_pending() >= conn.publish_window
                future = await js.publish_async(subject, document,
                                                headers={MSG_ID_HEADER: str(event.id)},
                                                wait_stall=conn.request_timeout if full else None)
                futures.append((index, future))
            if futures:
                _done, pending = await asyncio.wait([f for _, f in futures],
                                                    timeout=conn.request_timeout)
                if pending:
                    raise unavailable(f"{len(pending)} of {len(futures)} publishes not "
                                      f"acknowledged within {conn.request_timeout} s", "publish")
        except ERRORS as exc:
            raise unavailable(exc, "publish") from exc
        finally:
            for _, future in futures:
                if not future.done():
                    future.cancel()
        # Every future's outcome is read before an outage is raised: an exception left unread
        # is logged by asyncio as "never retrieved" (one per message when a server went away).
        errors = [future.exception() for _, future in futures]
        for (index, future), error in zip(futures, errors, strict=True):
            if error is None:
                if future.result().duplicate:
                    self.duplicates += 1
                else:
                    self.published += 1
            elif is_outage(error):
                raise unavailable(error, "publish")
            else:
                results[index] = ProviderError(f"JetStream refused event "
                                               f"{events[index].id}: {error}")
        return results
