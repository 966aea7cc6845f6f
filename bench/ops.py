"""Operations benchmarks, not tests. PostgreSQL on 127.0.0.1 by default.

(a) relay throughput with metrics on vs off, same process, alternating rounds:
    the relay drains N pending events (no-op handler, memory provider) with and without
    ``observe_relay`` (RelayMetrics hooks + broker observer + backlog sampler + HTTP server).
    Target: cost <= 5 %.
(b) cleanup on a large history while a relay drains new events: ``python -m outbox cleanup`` runs
    as its own process (as from cron) over H finished rows while the relay drains N pending ones;
    reports cleanup rows/s and the relay's throughput during the cleanup against a baseline drain
    of the same size without it. Target: relay drop <= 20 %.

    python bench/ops.py                                  # both, defaults (H = 1,000,000)
    python bench/ops.py --only metrics --events 50000 --rounds 3
    python bench/ops.py --only cleanup --history 1000000 --events 50000

Creates a scratch database (dropped at the end) unless --database-url is given.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import sqlalchemy as sa
from prometheus_client import CollectorRegistry

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _scratch import scratch_database  # noqa: E402

import outbox  # noqa: E402
from outbox.health import observe_relay  # noqa: E402
from outbox.providers.memory import MemoryProvider  # noqa: E402
from outbox.relay import Relay  # noqa: E402

# Bench-only SQL with constants (no user input): fast seeding with generate_series.
SEED_PENDING = (
    "INSERT INTO events (id, source, type, status, payload, instance_id, created_at, metadata, "
    "retry_count, next_attempt_at) "
    "SELECT gen_random_uuid(), 'database', 'public.t' || mod(i, 10) || '.create', 'pending', "
    "jsonb_build_object('i', i), 'bench', now(), '{}'::jsonb, 0, now() "
    "FROM generate_series(1, %(n)s) AS i"
)
SEED_HISTORY = (
    "INSERT INTO events (id, source, type, status, payload, instance_id, created_at, "
    "processed_at, completed_at, metadata, retry_count, next_attempt_at) "
    "SELECT gen_random_uuid(), 'database', 'public.t' || mod(i, 10) || '.update', "
    "CASE WHEN mod(i, 50) = 0 THEN 'failed' ELSE 'completed' END, "
    "jsonb_build_object('i', i, 'pad', repeat('x', 200)), 'bench', "
    "now() - interval '60 days', now() - interval '60 days', now() - interval '60 days', "
    "'{}'::jsonb, 0, now() - interval '60 days' FROM generate_series(1, %(n)s) AS i"
)


def seed(engine: sa.Engine, sql: str, n: int) -> None:
    with engine.begin() as conn:
        conn.exec_driver_sql(sql, {"n": n})
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql("VACUUM ANALYZE events")


def pending(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        return int(conn.exec_driver_sql(
            "SELECT count(*) FROM events WHERE status = 'pending'").scalar_one())


def make_relay(engine: sa.Engine, batch: int) -> Relay:
    provider = MemoryProvider(max_events=10_000_000, cleanup_interval=0)
    broker = outbox.Broker(provider, sync_handlers="inline")

    @broker.subscribe("public.>")
    def noop(event: outbox.Event) -> None:
        return None

    return Relay(engine, broker=broker, provider=provider, batch_size=batch, notify=False,
                 poll_interval=0.05)


async def drain(engine: sa.Engine, batch: int, *, metrics: bool) -> float:
    """Drain everything pending; events/s."""
    n = pending(engine)
    relay = make_relay(engine, batch)
    # Timed around the drain only: closing observe_relay waits up to 0.5 s for the HTTP
    # server's poll loop (socketserver's shutdown), a one-off at sidecar exit, not a per-event
    # cost; with 20,000-event rounds it alone read as a 20 % "cost".
    if metrics:
        async with observe_relay(relay, registry=CollectorRegistry(), backlog_interval=5.0):
            started = time.perf_counter()
            await relay.run(once=True)
            elapsed = time.perf_counter() - started
    else:
        started = time.perf_counter()
        await relay.run(once=True)
        elapsed = time.perf_counter() - started
    assert pending(engine) == 0, "relay left events pending"
    return n / elapsed


def bench_metrics(url: str, events: int, rounds: int, batch: int) -> None:
    engine = sa.create_engine(url, pool_size=8)
    outbox.create_schema(engine)
    off: list[float] = []
    on: list[float] = []
    for r in range(rounds):
        for label, flag, out in (("off", False, off), ("on", True, on)):
            seed(engine, SEED_PENDING, events)
            rate = anyio.run(functools.partial(drain, engine, batch, metrics=flag))
            out.append(rate)
            print(f"  round {r + 1} metrics {label:3}: {rate:9.0f} events/s", flush=True)
            with engine.begin() as conn:
                conn.exec_driver_sql("TRUNCATE events")
    best_off, best_on = max(off), max(on)
    med_off, med_on = statistics.median(off), statistics.median(on)
    print(f"(a) metrics off: best {best_off:.0f}/s median {med_off:.0f}/s; "
          f"on: best {best_on:.0f}/s median {med_on:.0f}/s; "
          f"cost {100 * (1 - best_on / best_off):.1f}% (best) "
          f"{100 * (1 - med_on / med_off):.1f}% (median)  [target <= 5%]")
    engine.dispose()


async def relay_during_cleanup(
    engine: sa.Engine, url: str, batch: int, window: float, cleanup_args: list[str]
) -> tuple[float, float, float, dict[str, Any]]:
    """(relay events/s before, during, after the cleanup process; cleanup's JSON report)."""
    relay = make_relay(engine, batch)
    env = {**os.environ, "OUTBOX_DATABASE_URL": url, "PYTHONPATH": str(ROOT)}

    async def rate_over(seconds: float) -> float:
        n0, t0 = relay.stats.completed, time.perf_counter()
        await anyio.sleep(seconds)
        return (relay.stats.completed - n0) / (time.perf_counter() - t0)

    async with anyio.create_task_group() as tg:
        tg.start_soon(relay.run)
        await anyio.sleep(2.0)  # warm up
        before = await rate_over(window)
        async with await anyio.open_process(
            [sys.executable, "-m", "outbox", "--log-level", "INFO", "cleanup", "--older-than",
             "30d", "--json", *cleanup_args], env=env,
        ) as proc:
            assert proc.stderr is not None and proc.stdout is not None
            stderr = proc.stderr
            await stderr.receive()  # the first batch was deleted: the cleanup is running
            n0, t0 = relay.stats.completed, time.perf_counter()

            async def drain_stderr() -> None:
                async for _ in stderr:
                    pass

            tg.start_soon(drain_stderr)
            out = b""
            async for chunk in proc.stdout:
                out += chunk
            await proc.wait()
            during = (relay.stats.completed - n0) / (time.perf_counter() - t0)
        after = await rate_over(window)
        left = pending(engine)
        relay.stop()
    if left == 0:
        print("  warning: the relay ran out of pending events; use more --events")
    return before, during, after, json.loads(out)


def bench_cleanup(url: str, history: int, events: int, batch: int,
                  cleanup_args: list[str]) -> None:
    engine = sa.create_engine(url, pool_size=8)
    outbox.create_schema(engine)
    t0 = time.perf_counter()
    seed(engine, SEED_HISTORY, history)
    seed(engine, SEED_PENDING, events)
    print(f"  seeded {history} finished + {events} pending rows in "
          f"{time.perf_counter() - t0:.1f} s", flush=True)
    before, during, after, report = anyio.run(
        functools.partial(relay_during_cleanup, engine, url, batch, 5.0, cleanup_args))
    baseline = (before + after) / 2
    print(f"  relay before cleanup: {before:9.0f} events/s")
    print(f"  relay during cleanup: {during:9.0f} events/s")
    print(f"  relay after cleanup:  {after:9.0f} events/s")
    print(f"(b) cleanup: {report['deleted']} rows in {report['seconds']:.1f} s = "
          f"{report['rows_per_second']:.0f} rows/s; relay during cleanup {during / baseline:.2f}x "
          f"of before/after (drop {100 * (1 - during / baseline):.1f}%) [target drop <= 20%]")
    engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database-url", help="PostgreSQL URL (default: a scratch database)")
    parser.add_argument("--only", choices=["metrics", "cleanup"])
    parser.add_argument("--events", type=int, default=50_000,
                        help="pending events (cleanup: enough to keep the relay busy throughout)")
    parser.add_argument("--history", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cleanup-args", default="",
                        help="extra cleanup options, e.g. '--batch 2000 --pause 0.05'")
    parser.add_argument("--batch", type=int, default=500)
    args = parser.parse_args()
    if args.only in (None, "metrics"):
        print(f"(a) relay throughput, metrics on vs off: {args.events} events x {args.rounds} "
              f"rounds, batch {args.batch}", flush=True)
        with scratch_database(url=args.database_url) as url:
            bench_metrics(url, args.events, args.rounds, args.batch)
    if args.only in (None, "cleanup"):
        print(f"(b) cleanup {args.cleanup_args} of {args.history} finished rows while the "
              f"relay drains {args.events}", flush=True)
        with scratch_database(url=args.database_url) as url:
            bench_cleanup(url, args.history, args.events, args.batch,
                          args.cleanup_args.split())


if __name__ == "__main__":
    main()
