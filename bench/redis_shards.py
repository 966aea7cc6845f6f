"""Sharded Redis groups benchmark, not a test: what per-key order across a group costs.

Needs a Redis server (``--url``, default ``redis://127.0.0.1:6379/0``); uses keys under a
prefix of its own and deletes them. Each round, for each variant (alternated in the same run):

- publish ``--events`` events (ordering keys over 1,000 rows) with ``publish_many`` in batches
  of 200, as the relay does, nobody reading: events/s;
- then a group of ``--members`` members (each its own provider, as separate consumer processes
  would have) starts, takes that backlog and settles (shards dealt out), and the relay publishes
  ``--events`` more while the group consumes, acknowledging each delivery after a no-op
  handler: events/s from the first publish of that second half to its last ack.

Variants: ``shards=1`` (today's one stream shared by the members) and ``shards=N`` (one member
per shard by lease, per-key order across the group). Medians over ``--rounds`` rounds and the
ratio sharded / shared.

    python bench/redis_shards.py --events 20000 --rounds 3 --shards 8 --members 2
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import redis.asyncio as aioredis  # noqa: E402

from outbox import new_event  # noqa: E402
from outbox.providers.base import StartPosition  # noqa: E402
from outbox.providers.redis import RedisProvider  # noqa: E402


async def one_round(url: str, shards: int, events: int, members: int) -> tuple[float, float]:
    stream = f"bench-shards-{uuid.uuid4().hex[:8]}"
    relay = RedisProvider(url, stream_name=stream, shards=shards, max_len=0)
    group = [
        RedisProvider(url, stream_name=stream, shards=shards, block=0.1) for _ in range(members)
    ]
    readers = [
        p.consume(group="bench", consumer=f"m{i}", start=StartPosition.BEGINNING)
        for i, p in enumerate(group)
    ]
    batch = [
        new_event(
            source="bench", type="public.rows.update", payload={"i": i}, ordering_key=str(i % 1000)
        )
        for i in range(2 * events)
    ]
    tasks: list[asyncio.Task[None]] = []
    try:
        # The relay alone, into a stream nobody reads yet.
        started = time.perf_counter()
        for i in range(0, events, 200):
            assert not any(await relay.publish_many(batch[i : i + 200]))
        publish_rate = events / (time.perf_counter() - started)
        done = 0
        finished = asyncio.Event()

        async def member(reader: Any) -> None:
            nonlocal done
            async for delivery in reader:
                await delivery.ack()
                done += 1
                if done >= 2 * events:
                    finished.set()

        # A running group (shards dealt out: a group runs for long), then the relay publishes
        # the second half while it consumes.
        tasks = [asyncio.create_task(member(r)) for r in readers]
        for _ in range(100):
            if done >= events and all(not getattr(r, "draining", ()) for r in readers):
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)
        started = time.perf_counter()
        for i in range(events, 2 * events, 200):
            assert not any(await relay.publish_many(batch[i : i + 200]))
        await asyncio.wait_for(finished.wait(), timeout=600)
        consume_rate = events / (time.perf_counter() - started)
        return publish_rate, consume_rate
    finally:
        for reader in readers:  # members stop at their next fetch
            await reader.aclose()
        _done, stuck = await asyncio.wait(tasks, timeout=5) if tasks else (set(), set())
        for task in stuck:
            task.cancel()
        for p in [*group, relay]:
            await p.close()
        client = aioredis.Redis.from_url(url)
        keys = [k async for k in client.scan_iter(match=f"{stream}*", count=1000)]
        for i in range(0, len(keys), 500):
            await client.delete(*keys[i : i + 500])
        await client.aclose()


async def main(args: argparse.Namespace) -> None:
    results: dict[int, list[tuple[float, float]]] = {1: [], args.shards: []}
    for _ in range(args.rounds):
        for shards in results:
            results[shards].append(await one_round(args.url, shards, args.events, args.members))
    medians = {}
    for shards, rows in results.items():
        publish = statistics.median(r[0] for r in rows)
        consume = statistics.median(r[1] for r in rows)
        medians[shards] = (publish, consume)
        print(
            f"shards={shards:<3} publish {publish:9,.0f} ev/s   {args.members} members "
            f"consume {consume:9,.0f} ev/s   (median of {args.rounds})"
        )
    base, sharded = medians[1], medians[args.shards]
    print(
        f"ratio shards={args.shards} / shards=1: publish {sharded[0] / base[0]:.2f}, "
        f"consume {sharded[1] / base[1]:.2f}"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--events", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--members", type=int, default=2)
    asyncio.run(main(parser.parse_args()))
