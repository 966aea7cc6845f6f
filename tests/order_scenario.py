"""Per-key order across the members of a group while members crash, join and leave: the
scenario the sharded Redis and partitioned NATS tests share."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from outbox import new_event
from outbox.providers._bus import GROUPS


@dataclass
class Outcome:
    published: set[str] = field(default_factory=set)
    acked: set[str] = field(default_factory=set)  # handled to the end
    handled: list[tuple[str, int, int, str]] = field(default_factory=list)  # key, n, attempt, who
    crashes: int = 0

    def check(self) -> None:
        """0 lost, 0 phantom, 0 first deliveries of a key before an earlier one of that key."""
        lost = self.published - self.acked
        assert not lost, f"{len(lost)} events never handled"
        assert self.acked <= self.published  # nothing phantom
        first: dict[str, list[int]] = {}
        first_any: dict[str, list[int]] = {}
        seen: set[tuple[str, int]] = set()
        for key, n, attempt, _member in self.handled:
            if attempt == 1:
                first.setdefault(key, []).append(n)
            if (key, n) not in seen:
                seen.add((key, n))
                first_any.setdefault(key, []).append(n)
        late = sum(1 for ns in first.values() for a, b in itertools.pairwise(ns) if b < a)
        assert late == 0, f"{late} first deliveries of a key before an earlier one: {first}"
        assert all(ns == sorted(ns) for ns in first_any.values()), first_any
        assert len({m for *_, m in self.handled}) >= 4  # the work moved between members


def crash(provider: Any, reader: Any, task: asyncio.Task[None]) -> None:
    """What kill -9 leaves: nothing settled, nothing given back (leases, pending entries and
    unacknowledged messages stay with the server until they expire)."""
    task.cancel()
    if reader.heartbeat is not None:
        reader.heartbeat.cancel()
    reader.closed = True
    provider._readers.discard(reader)
    GROUPS.release(reader.registry_key)
    provider._closed = True


async def run(
    make_provider: Callable[[], Any],
    relay: Any,
    kill: Callable[[Any], Awaitable[None]],
    *,
    steps: int = 40,
) -> Outcome:
    """Two members of group ``g``; every 8th step one is killed (``crash`` then ``kill``, which
    drops its connection) and a new one starts; one leaves cleanly. 30 events of 6 keys per
    step, a handler of 0-10 ms."""
    out = Outcome()
    keys = [f"k{i}" for i in range(6)]
    numbers = dict.fromkeys(keys, 0)
    rng = random.Random(22)
    members: list[tuple[Any, Any, asyncio.Task[None]]] = []
    crashed: list[Any] = []
    count = itertools.count(1)

    async def member_loop(reader: Any, name: str) -> None:
        async for delivery in reader:
            event = delivery.event
            out.handled.append((event.ordering_key, event.payload["n"], delivery.attempt, name))
            await asyncio.sleep(rng.random() * 0.01)  # a handler's work
            out.acked.add(str(event.id))  # done (a kill during the ack may leave it acked)
            await delivery.ack()

    async def start_member() -> None:
        name = f"m{next(count)}"
        provider = make_provider()
        reader = provider.consume(group="g", consumer=name)
        await reader.open()
        members.append((provider, reader, asyncio.create_task(member_loop(reader, name))))

    await start_member()
    await start_member()
    try:
        for step in range(steps):
            batch = []
            for _ in range(30):
                key = rng.choice(keys)
                batch.append(
                    new_event(source="s", type="t", payload={"n": numbers[key]}, ordering_key=key)
                )
                numbers[key] += 1
            out.published.update(str(e.id) for e in batch)
            assert await relay.publish_many(batch) == [None] * len(batch)
            await asyncio.sleep(0.1)
            if step % 8 == 4:  # kill one member (no settling), start a new one
                provider, reader, task = members.pop(rng.randrange(len(members)))
                crash(provider, reader, task)
                await kill(provider)
                crashed.append(provider)
                out.crashes += 1
                await start_member()
            elif step == 30:  # one leaves cleanly
                provider, _reader, task = members.pop(0)
                task.cancel()
                await provider.close()
                await start_member()
        for _ in range(300):
            if out.published <= out.acked:
                break
            await asyncio.sleep(0.1)
    finally:
        for provider, _reader, task in members:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
            await provider.close()
    return out


async def check(make_provider: Callable[[], Any], kill: Callable[[Any], Awaitable[None]]) -> None:
    """:func:`run` with a relay of its own, then :meth:`Outcome.check`."""
    relay = make_provider()
    try:
        outcome = await run(make_provider, relay, kill)
    finally:
        await relay.close()
    assert outcome.crashes == 5
    outcome.check()
