"""Sharded Redis consumer groups (``redis.shards`` > 1): per-key order across the members of a
group while members crash (without settling), join and leave; the wire stays the same."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
from typing import Any

import pytest
import redis.asyncio as aioredis

from outbox import new_event, wire
from outbox.providers._bus import GROUPS, assigned_shards, shard_of
from outbox.providers.redis import RedisProvider
from outbox.providers.redis._shards import ShardedGroupReader

pytestmark = pytest.mark.anyio

SHARDS = 4


def _provider(url: str, stream: str, **options: Any) -> RedisProvider:
    return RedisProvider(
        url, stream_name=stream, shards=SHARDS, claim_idle=1.0, block=0.2, **options
    )


def test_shard_rules() -> None:
    events = [
        new_event(source="s", type="t", payload={}, ordering_key=f"k{i % 7}") for i in range(50)
    ]
    for event in events:  # one key, one shard
        assert shard_of(event, SHARDS) == shard_of(events[int(event.ordering_key[1:])], SHARDS)
    assert {shard_of(e, 1) for e in events} == {0}
    members = ["b", "a", "c"]
    shares = [assigned_shards(members, m, 8) for m in members]
    assert set().union(*shares) == set(range(8)) and sum(map(len, shares)) == 8
    assert assigned_shards(["a"], "a", 8) == set(range(8))


async def test_events_go_to_the_shard_of_their_key_unchanged(
    redis_url: str, redis_prefix: str
) -> None:
    p = _provider(redis_url, f"{redis_prefix}:events")
    raw = aioredis.Redis.from_url(redis_url)
    try:
        events = [
            new_event(source="s", type="t", payload={"i": i}, ordering_key=f"k{i % 5}")
            for i in range(30)
        ]
        assert await p.publish_many(events) == [None] * 30
        assert await p.publish_many(events[:10]) == [None] * 10  # a relay's retry: deduped
        for i, stream in enumerate(p.streams):
            assert stream == f"{redis_prefix}:events:{{{i}}}"
            entries = await raw.xrange(stream)
            want = [e for e in events if shard_of(e, SHARDS) == i]
            assert [wire.decode(f[b"event"]).id for _, f in entries] == [e.id for e in want]
        assert (await p.stats()).total_events == 30
    finally:
        await raw.aclose()
        await p.close()


def _crash(provider: RedisProvider, reader: ShardedGroupReader, task: asyncio.Task[None]) -> None:
    """What kill -9 leaves: nothing settled, nothing given back, leases and pending entries
    stay in Redis until they expire."""
    task.cancel()
    if reader.heartbeat is not None:
        reader.heartbeat.cancel()
    reader.closed = True
    provider._readers.discard(reader)
    GROUPS.release(reader.registry_key)
    provider._closed = True


async def test_per_key_order_across_members_that_crash(redis_url: str, redis_prefix: str) -> None:
    stream = f"{redis_prefix}:events"
    keys = [f"k{i}" for i in range(6)]
    numbers = dict.fromkeys(keys, 0)
    published: list[Any] = []
    handled: list[tuple[str, int, int, str]] = []  # key, n, attempt, member
    acked: set[str] = set()
    rng = random.Random(22)

    async def member_loop(reader: ShardedGroupReader, name: str) -> None:
        async for delivery in reader:
            event = delivery.event
            handled.append((event.ordering_key, event.payload["n"], delivery.attempt, name))
            await asyncio.sleep(rng.random() * 0.01)  # a handler's work
            await delivery.ack()
            acked.add(str(event.id))

    members: list[tuple[RedisProvider, ShardedGroupReader, asyncio.Task[None]]] = []
    crashed: list[RedisProvider] = []
    count = 0

    async def start_member() -> None:
        nonlocal count
        count += 1
        provider = _provider(redis_url, stream)
        reader = provider.consume(group="g", consumer=f"m{count}")
        assert isinstance(reader, ShardedGroupReader)
        await reader.open()
        members.append((provider, reader, asyncio.create_task(member_loop(reader, f"m{count}"))))

    relay = _provider(redis_url, stream)
    await start_member()
    await start_member()
    crashes = 0
    try:
        for step in range(40):
            batch = []
            for _ in range(30):
                key = rng.choice(keys)
                batch.append(
                    new_event(source="s", type="t", payload={"n": numbers[key]}, ordering_key=key)
                )
                numbers[key] += 1
            published.extend(batch)
            assert await relay.publish_many(batch) == [None] * len(batch)
            await asyncio.sleep(0.1)
            if step % 8 == 4:  # kill one member (no settling), start a new one
                provider, reader, task = members.pop(rng.randrange(len(members)))
                _crash(provider, reader, task)
                crashed.append(provider)
                crashes += 1
                await start_member()
            elif step == 30:  # one leaves cleanly
                provider, reader, task = members.pop(0)
                task.cancel()
                await provider.close()
                await start_member()
        want = {str(e.id) for e in published}
        for _ in range(200):
            if want <= acked:
                break
            await asyncio.sleep(0.1)
    finally:
        for provider, _reader, task in members:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
            await provider.close()
        for provider in crashed:
            await provider._client.aclose()
        await relay.close()

    assert crashes == 5
    lost = want - acked
    assert not lost, f"{len(lost)} events never handled"
    assert acked <= want  # nothing phantom
    first: dict[str, list[int]] = {}
    first_any: dict[str, list[int]] = {}
    seen: set[tuple[str, int]] = set()
    for key, n, attempt, _member in handled:
        if attempt == 1:
            first.setdefault(key, []).append(n)
        if (key, n) not in seen:
            seen.add((key, n))
            first_any.setdefault(key, []).append(n)
    late = sum(1 for ns in first.values() for a, b in itertools.pairwise(ns) if b < a)
    assert late == 0, f"{late} first deliveries of a key before an earlier one: {first}"
    assert all(ns == sorted(ns) for ns in first_any.values()), first_any
    assert len({m for *_, m in handled}) >= 4  # the work moved between members
