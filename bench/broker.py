"""Broker benchmark, not a test. In-process only: no database, no server.

(a) Pattern matching with ``--subs`` subscriptions (default 10,000; mixed literal, ``*`` and ``>``
    patterns over ``schema.entity.operation`` types): lookups per second of the subscription trie
    (``SubscriptionIndex.match_uncached``; and ``match`` with its per-type cache, over 1,000 hot
    types) next to a naive linear scan (``Pattern.matches`` on every subscription) in the same
    run, after checking they return the same subscriptions. Target: trie ≥ 20x the scan.
(b) Async publish → no-op async handler, 10 workers, buffer 1000, memory provider: events/s from
    the first ``publish_async`` to the last handler call (``Broker.join``), as wall-clock rate and
    as rate per CPU-second of this process (the "one core" figure, robust to a busy machine).
    Baseline in the same run: the same producer → 10 worker tasks → no-op handler over a bare
    anyio memory object stream (no statuses, no provider). Target: ≥ 50,000 events/s per core.
    The pre-built input events are moved out of the garbage collector's view (``gc.freeze``) so
    the collector scans what a running app would have, not 200,000 waiting inputs.
(c) Handler call cost per event through ``Broker.dispatch`` (what the relay calls): async
    handler, sync handler inline, sync handler in a worker thread (the default for sync handlers).

    python bench/broker.py                       # everything
    python bench/broker.py --only patterns --subs 10000
    python bench/broker.py --only publish --events 200000
"""

from __future__ import annotations

import argparse
import gc
import random
import sys
import time
from pathlib import Path
from typing import Any

import anyio

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from outbox import Event, new_event  # noqa: E402
from outbox._patterns import SubscriptionIndex, compile_pattern  # noqa: E402
from outbox.broker import Broker  # noqa: E402
from outbox.providers.memory import MemoryProvider  # noqa: E402

SCHEMAS = [f"s{i}" for i in range(20)]
ENTITIES = [f"table{i}" for i in range(500)]
OPERATIONS = ["create", "update", "delete", "read"]


def random_type(rng: random.Random) -> str:
    return f"{rng.choice(SCHEMAS)}.{rng.choice(ENTITIES)}.{rng.choice(OPERATIONS)}"


def random_pattern(rng: random.Random) -> str:
    s, e, o = rng.choice(SCHEMAS), rng.choice(ENTITIES), rng.choice(OPERATIONS)
    roll = rng.random()
    if roll < 0.60:
        return f"{s}.{e}.{o}"  # literal
    if roll < 0.75:
        return f"{s}.{e}.*"
    if roll < 0.85:
        return f"{s}.*.{o}"
    if roll < 0.93:
        return f"{s}.{e}.>"
    if roll < 0.98:
        return f"{s}.>"
    if roll < 0.999:
        return f"*.*.{o}"
    return "*"


def bench_patterns(subs: int, lookups: int) -> dict[str, float]:
    rng = random.Random(42)
    patterns = [compile_pattern(random_pattern(rng)) for _ in range(subs)]
    index: SubscriptionIndex[int, int] = SubscriptionIndex()
    for i, p in enumerate(patterns):
        index.add(i, p, i)
    types = [random_type(rng) for _ in range(lookups)]

    # Same answers first (a fast wrong index would be worthless).
    for t in types[:200]:
        scan = tuple(i for i, p in enumerate(patterns) if p.matches(t))
        assert index.match_uncached(t) == scan, t

    scan_n = max(50, lookups // 50)  # the scan is slow: fewer lookups, same per-lookup rate
    start = time.perf_counter()
    matched = 0
    for t in types[:scan_n]:
        matched += sum(1 for p in patterns if p.matches(t))
    scan_rate = scan_n / (time.perf_counter() - start)

    start = time.perf_counter()
    for t in types:
        matched += len(index.match_uncached(t))
    trie_rate = lookups / (time.perf_counter() - start)

    # The per-type cache pays off when a working set of types repeats (most apps): 1,000 hot
    # types; 40,000 distinct ones would just churn the 4,096 entries.
    hot = (types[:1000] * (lookups // 1000 + 1))[:lookups]
    for t in hot[:1000]:
        index.match(t)
    start = time.perf_counter()
    for t in hot:
        matched += len(index.match(t))
    cached_rate = lookups / (time.perf_counter() - start)
    return {"scan": scan_rate, "trie": trie_rate, "cached": cached_rate,
            "avg_matches": sum(len(index.match(t)) for t in types[:1000]) / 1000}


async def _noop(event: Event) -> None:
    pass


async def bench_publish(events: list[Event], workers: int, buffer: int) -> dict[str, float]:
    broker = Broker(MemoryProvider(), worker_count=workers, buffer_size=buffer)
    broker.subscribe("bench.>", _noop)
    await broker.start()
    wall, cpu = time.perf_counter(), time.process_time()
    for event in events:
        await broker.publish_async(event, timeout=60)
    await broker.join()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    stats = await broker.stats()
    await broker.stop()
    assert stats.total_processed == len(events), stats
    return {"wall": len(events) / wall, "cpu": len(events) / cpu}


async def bench_bare(events: list[Event], workers: int, buffer: int) -> dict[str, float]:
    send, receive = anyio.create_memory_object_stream[Event](buffer)
    done = 0

    async def worker() -> None:
        nonlocal done
        async for event in receive:
            await _noop(event)
            done += 1

    wall, cpu = time.perf_counter(), time.process_time()
    async with anyio.create_task_group() as tg:
        for _ in range(workers):
            tg.start_soon(worker)
        async with send:
            for event in events:
                await send.send(event)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    assert done == len(events)
    return {"wall": len(events) / wall, "cpu": len(events) / cpu}


async def bench_dispatch(n: int) -> dict[str, float]:
    out: dict[str, float] = {}
    event = new_event("system", "bench.dispatch", {"n": 1})

    def sync_noop(e: Event) -> None:
        pass

    cases: list[tuple[str, Any, bool | None]] = [
        ("async handler", _noop, None),
        ("sync handler, inline", sync_noop, False),
        ("sync handler, thread", sync_noop, True),
    ]
    for label, handler, threaded in cases:
        broker = Broker()
        broker.subscribe("bench.*", handler, threaded=threaded)
        count = n if threaded is not True else max(1000, n // 20)
        start = time.perf_counter()
        for _ in range(count):
            await broker.dispatch(event)
        out[label] = (time.perf_counter() - start) / count * 1e6
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["patterns", "publish", "dispatch"])
    parser.add_argument("--subs", type=int, default=10_000)
    parser.add_argument("--lookups", type=int, default=20_000)
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--workers", type=int, default=10)
    parser.add_argument("--buffer", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3, help="publish rounds; best is reported")
    args = parser.parse_args()

    if args.only in (None, "patterns"):
        r = bench_patterns(args.subs, args.lookups)
        print(f"(a) pattern matching, {args.subs:,} subscriptions "
              f"({r['avg_matches']:.1f} matches per type on average)")
        print(f"    linear scan     {r['scan']:>12,.0f} lookups/s")
        print(f"    trie            {r['trie']:>12,.0f} lookups/s   {r['trie'] / r['scan']:,.0f}x "
              "the scan (target >= 20x)")
        print(f"    trie, cached    {r['cached']:>12,.0f} lookups/s   "
              f"{r['cached'] / r['scan']:,.0f}x the scan (1,000 hot types)")

    if args.only in (None, "publish"):
        events = [new_event("system", f"bench.event.{i % 10}", {"i": i, "note": "x" * 40})
                  for i in range(args.events)]
        gc.collect()
        gc.freeze()
        best: dict[str, float] = {"wall": 0.0, "cpu": 0.0}
        bare: dict[str, float] = {"wall": 0.0, "cpu": 0.0}
        for _ in range(args.rounds):
            r = anyio.run(bench_publish, events, args.workers, args.buffer)
            b = anyio.run(bench_bare, events, args.workers, args.buffer)
            best = {k: max(best[k], r[k]) for k in best}
            bare = {k: max(bare[k], b[k]) for k in bare}
            for e in events:  # back to pending for the next round
                e.status = "pending"
        print(f"(b) publish_async -> no-op async handler, {args.events:,} events, "
              f"{args.workers} workers, buffer {args.buffer} (best of {args.rounds})")
        print(f"    broker          {best['wall']:>10,.0f} events/s wall   "
              f"{best['cpu']:>10,.0f} events per CPU-second (target >= 50,000)")
        print(f"    bare anyio      {bare['wall']:>10,.0f} events/s wall   "
              f"{bare['cpu']:>10,.0f} events per CPU-second (queue + workers, nothing else)")
        print(f"    broker / bare   {best['cpu'] / bare['cpu']:.0%} (per CPU-second)")
        gc.unfreeze()

    if args.only in (None, "dispatch"):
        r = anyio.run(bench_dispatch, 50_000)
        print("(c) Broker.dispatch, one matching handler, per event")
        for label, us in r.items():
            print(f"    {label:<22} {us:8.1f} µs")


if __name__ == "__main__":
    main()
