"""Sharded Redis consumer groups (``redis.shards`` > 1): per-key order across the members of a
group while members crash (without settling), join and leave; the wire stays the same."""

from __future__ import annotations

from typing import Any

import pytest
import redis.asyncio as aioredis

from outbox import new_event, wire
from outbox.providers._bus import assigned_shards, shard_of
from outbox.providers.redis import RedisProvider
from tests import order_scenario

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


async def test_per_key_order_across_members_that_crash(redis_url: str, redis_prefix: str) -> None:
    stream = f"{redis_prefix}:events"

    async def kill(provider: RedisProvider) -> None:
        await provider._client.aclose()

    await order_scenario.check(lambda: _provider(redis_url, stream), kill)
