"""Subscribing with patterns.

    python examples/patterns.py

Event types are dot-separated: ``schema.entity.operation`` for captured row changes
(``public.users.create``), free dotted text for custom events. A pattern is

- ``*`` alone: every event;
- a ``*`` segment: exactly one segment (``public.*.create``);
- a final ``>``: one or more remaining segments (``public.>``);
- anything else: that literal segment.

Every matching handler runs, in the order they subscribed.
"""

from __future__ import annotations

import anyio

import outbox

PATTERNS = [
    "*",
    "public.users.create",
    "public.*.create",
    "public.>",
    "*.*.delete",
    "chat.>",
]

EVENT_TYPES = [
    "public.users.create",
    "public.orders.create",
    "public.users.update",
    "billing.invoices.delete",
    "chat.message",
    "chat.room.joined",
    "public",
]


async def main() -> None:
    broker = outbox.Broker(mode="sync")
    received: dict[str, list[str]] = {p: [] for p in PATTERNS}
    for pattern in PATTERNS:
        # name= makes the subscription's identity explicit (the relay records per-handler
        # progress under it); by default it is the handler's module.qualname.
        broker.subscribe(pattern, lambda e, p=pattern: received[p].append(e.type),
                         name=f"log {pattern}", threaded=False)

    async with broker:
        for event_type in EVENT_TYPES:
            await broker.publish(outbox.new_event("system", event_type, {}))

    width = max(map(len, PATTERNS))
    for pattern, types in received.items():
        print(f"{pattern:<{width}}  receives  {', '.join(types) or '-'}")

    for bad in ("public..users", "public.>.create", "public.us ers"):
        try:
            broker.subscribe(bad, print)
        except ValueError as exc:
            print(f"rejected: {exc}")

    # Thousands of subscriptions are fine: they are indexed in a segment trie, so matching an
    # event does not scan them all (bench/broker.py).


if __name__ == "__main__":
    anyio.run(main)
