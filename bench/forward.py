"""Forwarding benchmark, not a test: PostgreSQL → relay → Redis Streams / NATS JetStream.

(a) Throughput. Drains N pending events (default 100,000) from a scratch PostgreSQL database with
    the relay into each provider, next to ceilings measured in the same run:
    - ``redis bare``: redis-py pipelined ``XADD MAXLEN ~`` of the same (pre-encoded) documents in
      batches of ``--batch``, no relay, no database;
    - ``nats bare``: nats-py ``publish_async`` with ``Nats-Msg-Id`` in batches of ``--batch``,
      awaiting every ack per batch (the same batching the provider uses);
    - ``relay → memory``: the relay with the memory provider (database claim/settle cost only).
    Targets: relay → broker ≥ 40 % of the bare ceiling and ≥ 70 % of relay → memory.
(b) Latency. Commit → handler in another process: a producer commits one event at a time at
    ``--rate`` events/s; a relay (LISTEN/NOTIFY wake-up) forwards it; a consumer process
    (``outbox.Consumer``) runs the handler. Latency = handler start - commit returned (one
    machine, one clock). Targets at 200 events/s: p50 ≤ 10 ms, p99 ≤ 50 ms.

    python bench/forward.py                          # everything, defaults
    python bench/forward.py --events 20000 --only throughput
    python bench/forward.py --only latency --rate 200 --seconds 15

Needs PostgreSQL, Redis and NATS on 127.0.0.1 (override with --database-url/--redis-url/
--nats-url); creates a scratch database (dropped at the end) and streams of its own (deleted).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import anyio
import sqlalchemy as sa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _scratch import scratch_database  # noqa: E402

import outbox  # noqa: E402
from outbox import wire  # noqa: E402
from outbox.providers.memory import MemoryProvider  # noqa: E402
from outbox.providers.nats import NATSProvider  # noqa: E402
from outbox.providers.redis import RedisProvider  # noqa: E402
from outbox.relay import Relay  # noqa: E402

REDIS = "redis://127.0.0.1:6379/0"
NATS = "nats://127.0.0.1:4222"

# Bench-only SQL with constants (no user input): fast seeding with generate_series. The payload
# is a realistic small row (about 150 bytes of JSON).
SEED_PENDING = (
    "INSERT INTO events (id, source, type, status, payload, instance_id, schema_name, entity, "
    "entity_id, operation, created_at, metadata, retry_count, next_attempt_at) "
    "SELECT gen_random_uuid(), 'database', 'public.t' || mod(i, 10) || '.create', 'pending', "
    "jsonb_build_object('id', i, 'name', 'user ' || i, 'email', 'user' || i || '@example.com', "
    "'active', true, 'created', now()), 'bench', 'public', 't' || mod(i, 10), i::text, "
    "'create', now(), '{}'::jsonb, 0, now() FROM generate_series(1, %(n)s) AS i"
)


def reseed(engine: sa.Engine, n: int) -> None:
    with engine.begin() as conn:
        conn.exec_driver_sql("TRUNCATE events")
        conn.exec_driver_sql(SEED_PENDING, {"n": n})
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql("VACUUM ANALYZE events")


def count(engine: sa.Engine, status: str) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.text("SELECT count(*) FROM events WHERE status = :s"),
                                {"s": status}).scalar_one())


def sample_documents(engine: sa.Engine) -> list[tuple[str, str, str, bytes]]:
    """(id, type, source, CloudEvents document) of the seeded rows, for the bare loops."""
    with engine.connect() as conn:
        rows = conn.execute(sa.select(outbox.Event.__table__)).mappings().all()
    out = []
    for row in rows:
        event = outbox.Event.from_dict(dict(row))
        out.append((str(event.id), event.type, event.source, wire.encode(event)))
    return out


# --------------------------------------------------------------------------------------------
# ceilings


async def redis_bare(url: str, stream: str, docs: list[tuple[str, str, str, bytes]],
                     batch: int, max_len: int) -> float:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(url)
    try:
        started = time.perf_counter()
        for i in range(0, len(docs), batch):
            async with client.pipeline(transaction=False) as pipe:
                for event_id, type_, source, doc in docs[i:i + batch]:
                    pipe.xadd(stream, {"id": event_id, "type": type_, "source": source,
                                       "event": doc}, maxlen=max_len, approximate=True)
                await pipe.execute()
        elapsed = time.perf_counter() - started
        await client.delete(stream)
    finally:
        await client.aclose()
    return len(docs) / elapsed


async def nats_bare(url: str, stream: str, prefix: str,
                    docs: list[tuple[str, str, str, bytes]], batch: int) -> float:
    import nats
    from nats.js import api

    nc = await nats.connect(url)
    js = nc.jetstream()
    await js.add_stream(name=stream, subjects=[f"{prefix}.>"], storage=api.StorageType.FILE,
                        max_age=86400, duplicate_window=120)
    try:
        started = time.perf_counter()
        for i in range(0, len(docs), batch):
            futures = [
                await js.publish_async(f"{prefix}.{source}.{type_}", doc,
                                       headers={"Nats-Msg-Id": event_id})
                for event_id, type_, source, doc in docs[i:i + batch]
            ]
            await asyncio.gather(*futures)
        elapsed = time.perf_counter() - started
    finally:
        await js.delete_stream(stream)
        await nc.close()
    return len(docs) / elapsed


# --------------------------------------------------------------------------------------------
# relay drains


async def relay_drain(engine: sa.Engine, provider: Any, batch: int) -> float:
    n = count(engine, "pending")
    broker = outbox.Broker(MemoryProvider(max_events=10), sync_handlers="inline")
    relay = Relay(engine, broker=broker, provider=provider, batch_size=batch, notify=False,
                  poll_interval=0.05)
    started = time.perf_counter()
    await relay.run(once=True)
    elapsed = time.perf_counter() - started
    done = count(engine, "completed")
    if done != n:
        raise SystemExit(f"relay completed {done} of {n} events")
    return n / elapsed


async def throughput(args: argparse.Namespace, engine: sa.Engine) -> list[dict[str, Any]]:
    token = uuid.uuid4().hex[:8]
    rows: list[dict[str, Any]] = []
    reseed(engine, args.events)
    docs = sample_documents(engine)

    def add(name: str, rate: float, note: str = "") -> None:
        rows.append({"run": name, "events_per_s": round(rate), "note": note})
        print(f"  {name:<24} {rate:>10,.0f} events/s  {note}", flush=True)

    print(f"throughput, {args.events:,} events, batch {args.batch}:", flush=True)
    add("redis bare (pipelined)", await redis_bare(args.redis_url, f"bench:{token}:bare",
                                                   docs, args.batch, args.max_len))
    add("nats bare (publish_async)", await nats_bare(args.nats_url, f"BENCH_BARE_{token}",
                                                      f"benchbare{token}", docs, args.batch))
    del docs
    memory = MemoryProvider(max_events=args.events * 2, cleanup_interval=0)
    add("relay → memory", await relay_drain(engine, memory, args.batch))

    reseed(engine, args.events)
    redis_provider = RedisProvider(args.redis_url, stream_name=f"bench:{token}:events",
                                   max_len=args.max_len)
    try:
        add("relay → redis", await relay_drain(engine, redis_provider, args.batch))
    finally:
        with contextlib.suppress(Exception):
            await redis_provider._client.delete(redis_provider.stream_name)
            keys = [k async for k in redis_provider._client.scan_iter(
                match=f"bench:{token}:*", count=5000)]
            for i in range(0, len(keys), 5000):
                await redis_provider._client.delete(*keys[i:i + 5000])
        await redis_provider.close()

    reseed(engine, args.events)
    nats_provider = NATSProvider(args.nats_url, stream_name=f"BENCH_{token}",
                                 subject_prefix=f"bench{token}")
    try:
        add("relay → nats", await relay_drain(engine, nats_provider, args.batch))
    finally:
        with contextlib.suppress(Exception):
            await nats_provider._js.delete_stream(nats_provider.stream_name)
        await nats_provider.close()

    by = {r["run"]: r["events_per_s"] for r in rows}
    for broker_name, bare in (("redis", "redis bare (pipelined)"),
                              ("nats", "nats bare (publish_async)")):
        relay_rate = by[f"relay → {broker_name}"]
        print(f"  relay → {broker_name}: {relay_rate / by[bare]:.0%} of bare (target ≥ 40 %), "
              f"{relay_rate / by['relay → memory']:.0%} of relay → memory (target ≥ 70 %)")
    return rows


# --------------------------------------------------------------------------------------------
# latency


def _consumer_child(provider_name: str, url: str, stream: str, prefix: str, group: str) -> None:
    """Runs in the consumer process: print "<event id> <receive time>" per handled event."""
    from outbox.consume import Consumer

    async def main() -> None:
        if provider_name == "redis":
            provider: Any = RedisProvider(url, stream_name=stream, block=0.5)
        else:
            provider = NATSProvider(url, stream_name=stream, subject_prefix=prefix, block=0.5)
        broker = outbox.Broker(MemoryProvider(max_events=10), sync_handlers="inline")

        @broker.subscribe("*")
        def record(event: outbox.Event) -> None:
            print(f"{event.id} {time.time():.6f}", flush=True)

        consumer = Consumer(provider, group=group, broker=broker)
        async with anyio.create_task_group() as tg:
            tg.start_soon(consumer.run)
            await consumer.wait_started()
            await anyio.sleep(0.5)  # the group exists before the producer starts
            print("ready", flush=True)
            await anyio.to_thread.run_sync(sys.stdin.read)  # parent closes stdin: stop
            consumer.stop()
        await provider.close()

    anyio.run(main)


async def latency(args: argparse.Namespace, engine: sa.Engine, url: str,
                  provider_name: str) -> dict[str, Any]:
    token = uuid.uuid4().hex[:8]
    with engine.begin() as conn:
        conn.exec_driver_sql("TRUNCATE events")
    if provider_name == "redis":
        bus_url, stream, prefix = args.redis_url, f"bench:{token}:lat", ""
        provider: Any = RedisProvider(bus_url, stream_name=stream)
    else:
        bus_url, stream, prefix = args.nats_url, f"BENCH_LAT_{token}", f"benchlat{token}"
        provider = NATSProvider(bus_url, stream_name=stream, subject_prefix=prefix)
    await provider.ping()  # creates the stream (NATS) before the consumer binds its durable
    forwarded: dict[str, float] = {}
    publish_many = provider.publish_many

    async def timed_publish_many(events: Any) -> Any:  # when the broker acknowledged each
        results = await publish_many(events)
        now = time.time()
        for event in events:
            forwarded.setdefault(str(event.id), now)
        return results

    provider.publish_many = timed_publish_many
    child = subprocess.Popen(  # noqa: ASYNC220 - started once, before the measurement
        [sys.executable, __file__, "--child", provider_name, bus_url, stream, prefix, "lat"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert child.stdout is not None and child.stdin is not None
    if child.stdout.readline().strip() != "ready":
        raise SystemExit("consumer process did not start")
    broker = outbox.Broker(MemoryProvider(max_events=10), sync_handlers="inline")
    relay = Relay(url, broker=broker, provider=provider, batch_size=100, notify=True,
                  poll_interval=1.0)
    committed: dict[str, float] = {}
    session_factory = sa.orm.sessionmaker(engine)

    def produce() -> None:
        interval = 1.0 / args.rate
        deadline = time.perf_counter()
        for _ in range(int(args.rate * args.seconds)):
            deadline += interval
            with session_factory() as session:
                event = outbox.new_event(source="database", type="public.users.update",
                                         payload={"id": 1, "name": "x"})
                session.add(event)
                session.commit()
                committed[str(event.id)] = time.time()
            pause = deadline - time.perf_counter()
            if pause > 0:
                time.sleep(pause)

    received: dict[str, float] = {}

    def read_child() -> None:  # the consumer's "<id> <time>" lines, as they come
        assert child.stdout is not None
        for line in child.stdout:
            parts = line.split()
            if len(parts) == 2:
                received.setdefault(parts[0], float(parts[1]))

    reader = threading.Thread(target=read_child, daemon=True)
    reader.start()
    async with anyio.create_task_group() as tg:
        tg.start_soon(relay.run)
        await anyio.sleep(1.0)  # LISTEN established
        await anyio.to_thread.run_sync(produce)
        with anyio.move_on_after(args.drain_timeout):
            while len(received) < len(committed):  # noqa: ASYNC110 - another thread fills it
                await anyio.sleep(0.1)
        relay.stop()
    child.stdin.close()
    child.wait(30)
    reader.join(10)
    await provider.close()
    ms = sorted((received[i] - t) * 1000 for i, t in committed.items() if i in received)
    relay_ms = sorted((forwarded[i] - t) * 1000 for i, t in committed.items() if i in forwarded)
    bus_ms = sorted((received[i] - forwarded[i]) * 1000 for i in received if i in forwarded)
    missing = len(committed) - len(ms)
    result = {
        "provider": provider_name, "rate": args.rate, "events": len(committed),
        "missing": missing, "p50_ms": _pct(ms, 0.5), "p99_ms": _pct(ms, 0.99),
        "max_ms": _pct(ms, 1.0),
        "commit_to_forwarded_p50_ms": _pct(relay_ms, 0.5),
        "commit_to_forwarded_p99_ms": _pct(relay_ms, 0.99),
        "forwarded_to_handler_p50_ms": _pct(bus_ms, 0.5),
        "forwarded_to_handler_p99_ms": _pct(bus_ms, 0.99),
    }
    print(f"  latency commit → handler via {provider_name} at {args.rate}/s: "
          f"p50 {result['p50_ms']} ms, p99 {result['p99_ms']} ms, max {result['max_ms']} ms "
          f"({len(ms)} events, {missing} not arrived within --drain-timeout; targets p50 ≤ 10, "
          f"p99 ≤ 50)\n"
          f"    of which commit → broker ack (relay): p50 "
          f"{result['commit_to_forwarded_p50_ms']} ms, p99 {result['commit_to_forwarded_p99_ms']}"
          f" ms; broker ack → handler (bus + consumer): p50 "
          f"{result['forwarded_to_handler_p50_ms']} ms, p99 "
          f"{result['forwarded_to_handler_p99_ms']} ms", flush=True)
    return result


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return round(values[min(len(values) - 1, int(len(values) * q))], 2)


# --------------------------------------------------------------------------------------------


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _consumer_child(*sys.argv[2:7])
        return
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=500, help="relay batch / bare batch size")
    parser.add_argument("--max-len", type=int, default=200_000,
                        help="redis MAXLEN for the bare loop and the provider")
    parser.add_argument("--rate", type=float, default=200.0, help="latency: events/s")
    parser.add_argument("--seconds", type=float, default=15.0, help="latency: duration")
    parser.add_argument("--drain-timeout", type=float, default=60.0,
                        help="latency: how long to wait for the last events to arrive")
    parser.add_argument("--only", choices=["throughput", "latency"])
    parser.add_argument("--database-url")
    parser.add_argument("--redis-url", default=REDIS)
    parser.add_argument("--nats-url", default=NATS)
    parser.add_argument("--json", action="store_true", help="print the results as JSON too")
    args = parser.parse_args()
    results: dict[str, Any] = {}
    with scratch_database(url=args.database_url) as url:
        engine = sa.create_engine(url)
        outbox.create_schema(engine)
        try:
            if args.only in (None, "throughput"):
                results["throughput"] = anyio.run(throughput, args, engine)
            if args.only in (None, "latency"):
                print("latency:", flush=True)
                results["latency"] = [anyio.run(latency, args, engine, url, name)
                                      for name in ("redis", "nats")]
        finally:
            engine.dispose()
    if args.json:
        print(json.dumps(results, indent=2))


if __name__ == "__main__":
    os.environ.setdefault("OUTBOX_INSTANCE_ID", "bench")
    main()
