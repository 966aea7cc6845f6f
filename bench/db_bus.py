"""Database bus benchmark, not a test: the events table as the bus between processes.

(a) Drain. N committed events (default 100,000, seeded with one INSERT ... SELECT) are read by
    new consumer groups started at the beginning: 1 group, then 3 groups at once, each group one
    member in a process of its own (``DatabaseProvider.consume`` + ``ack`` per event). Reported:
    events/s per group, next to a ceiling measured in the same run: ``bare keyset read``, the same
    rows read in the same ``seq`` order with plain SELECTs of the same batch size (no snapshots,
    no claims, no Event objects, no acks). The three are alternated ``--rounds`` times; medians.
    Targets: one group >= 60 % of the bare read, three groups >= 40 % each.
(b) Latency. A producer process commits one event per transaction at ``--rate`` events/s; a
    consumer process (one member of a group, LISTEN/NOTIFY wake-up) receives it. Latency =
    delivery - commit returned (one machine, one clock). Baseline in the same run: a bare
    ``LISTEN`` connection, commit → notification. Targets at 200 events/s: p50 <= 5 ms,
    p99 <= 20 ms. Also measured with NOTIFY off (polling every ``--poll-interval``).
(c) Holds. As (b), while for ``--hold-seconds`` (30) an uncommitted INSERT in *another
    database* of the server and a transaction of the bus's database that has a transaction id
    and wrote no event are held open: latency of the events committed meanwhile (target p99 <=
    50 ms). Then the same with a held transaction that wrote an event: the others' latency, and
    when the held event arrived (after its commit: only it waited).

    python bench/db_bus.py                               # everything, defaults
    python bench/db_bus.py --only drain --events 100000 --batch-sizes 100 --rounds 3
    python bench/db_bus.py --only latency --rate 200 --seconds 15
    python bench/db_bus.py --only hold --rate 200 --hold-seconds 30

The bus reads batches between snapshots, so no transaction of the cluster holds back events it
did not write; the script still samples the oldest running write transaction during (b) and
reports it. ``--cluster private`` (the default when the PostgreSQL server binaries are installed)
runs everything on a throw-away cluster of its own (initdb in a temp dir, ``fsync=off`` like the
test fixture); ``--cluster shared`` uses the server at ``--admin-url`` and creates a scratch
database there.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import statistics
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

from _scratch import ADMIN, scratch_database  # noqa: E402

import outbox  # noqa: E402
from outbox._sql import events as event_sql  # noqa: E402
from outbox._sql.ddl import NOTIFY_CHANNEL, WAKE_LOCK_CLASS, WAKE_LOCK_KEY_SQL  # noqa: E402
from outbox.providers.base import StartPosition  # noqa: E402
from outbox.providers.database import DatabaseProvider  # noqa: E402

# Bench-only SQL with constants: N committed row changes in 1,000-row transactions (so the bus
# sees many transaction ids, as in production), payload about 150 bytes of JSON.
SEED = (
    "INSERT INTO events (id, source, type, status, payload, instance_id, schema_name, entity, "
    "entity_id, operation, created_at, metadata, retry_count, next_attempt_at) "
    "SELECT gen_random_uuid(), 'database', 'public.orders.update', 'completed', "
    "jsonb_build_object('id', i, 'customer', 'c' || mod(i, 977), 'total', i * 1.5, "
    "'status', 'paid', 'note', repeat('x', 60)), 'bench', 'public', 'orders', i::text, 'update', "
    "now(), '{}'::jsonb, 0, now() FROM generate_series(%(lo)s::int, %(hi)s::int) AS i"
)


def seed(url: str, n: int) -> None:
    engine = sa.create_engine(url)
    for lo in range(1, n + 1, 1000):
        with engine.begin() as conn:
            conn.exec_driver_sql(SEED, {"lo": lo, "hi": min(n, lo + 999)})
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql("VACUUM ANALYZE events")
    engine.dispose()


# -- (a) drain -----------------------------------------------------------------------------------


def bare_keyset_read(url: str, n: int, batch: int) -> float:
    """Seconds to read ``n`` rows in bus order with plain keyset SELECTs of ``batch`` rows."""
    engine = sa.create_engine(url)
    c = event_sql.c
    last = 0
    got = 0
    started = time.perf_counter()
    with engine.connect() as conn:
        while got < n:
            with conn.begin():
                rows = conn.execute(
                    sa.select(*event_sql._COLUMNS)
                    .where(c.txid.is_not(None), c.seq > last)
                    .order_by(c.seq).limit(batch)
                ).all()
            if not rows:
                raise RuntimeError("bare read found fewer rows than seeded")
            got += len(rows)
            last = rows[-1].seq
    elapsed = time.perf_counter() - started
    engine.dispose()
    return elapsed


def drain_member(url: str, group: str, n: int, batch: int, out: Any) -> None:
    """Child process: one member of ``group`` from the beginning until ``n`` events."""

    async def run() -> float:
        provider = DatabaseProvider(url, batch_size=batch, poll_interval=0.2)
        got = 0
        started = 0.0
        async with provider.consume(group=group, start=StartPosition.BEGINNING) as deliveries:
            async for delivery in deliveries:
                if got == 0:
                    started = time.perf_counter()
                got += 1
                await delivery.ack()
                if got >= n:
                    break
        elapsed = time.perf_counter() - started
        await provider.close()
        return elapsed

    out.put((group, anyio.run(run)))


def drain(url: str, n: int, groups: int, batch: int) -> list[float]:
    """events/s of each of ``groups`` groups draining ``n`` events at once (one process each)."""
    ctx = mp.get_context("spawn")
    out: Any = ctx.Queue()
    tag = uuid.uuid4().hex[:6]
    procs = [ctx.Process(target=drain_member, args=(url, f"drain-{tag}-{i}", n, batch, out))
             for i in range(groups)]
    for p in procs:
        p.start()
    results = [out.get(timeout=600) for _ in procs]
    for p in procs:
        p.join(30)
    return [n / elapsed for _group, elapsed in results]


# -- (b) latency ---------------------------------------------------------------------------------


def producer(url: str, rate: float, seconds: float, out: Any, go: Any) -> None:
    """Child process: one event per transaction at ``rate``/s; sends (id, commit time)."""
    engine = sa.create_engine(url)
    go.wait()
    interval = 1.0 / rate
    next_at = time.perf_counter()
    end = next_at + seconds
    with engine.connect() as conn:
        while time.perf_counter() < end:
            event = outbox.new_event("system", "bench.latency", {"t": time.time()})
            with conn.begin():
                event_sql.insert_events(conn, [event], True)
            out.put((str(event.id), time.time()))
            next_at += interval
            delay = next_at - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
    out.put(None)
    engine.dispose()


def _percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    if not ordered:
        return {"p50": float("nan"), "p99": float("nan"), "max": float("nan"), "n": 0}
    q = statistics.quantiles(ordered, n=100, method="inclusive")
    return {"p50": q[49] * 1e3, "p99": q[98] * 1e3, "max": ordered[-1] * 1e3, "n": len(ordered)}


def _run_producer(url: str, rate: float, seconds: float) -> tuple[Any, Any, Any]:
    ctx = mp.get_context("spawn")
    out: Any = ctx.Queue()
    go: Any = ctx.Event()
    proc = ctx.Process(target=producer, args=(url, rate, seconds, out, go))
    proc.start()
    return proc, out, go


def latency_bare_notify(url: str, rate: float, seconds: float) -> dict[str, float]:
    """Commit → notification on a bare LISTEN connection (the floor of any wake-up)."""
    import psycopg

    engine = sa.create_engine(url)
    kwargs = dict(engine.dialect.create_connect_args(engine.url)[1])
    kwargs.pop("context", None)
    engine.dispose()
    arrivals: list[float] = []

    async def listen(ready: anyio.Event, done: anyio.Event) -> None:
        conn = await psycopg.AsyncConnection.connect(**kwargs, autocommit=True)
        await conn.execute("LISTEN outbox_events")
        # writers notify only while a listener holds the wake-up lock (outbox/_wakeup.py)
        await conn.execute(f"SELECT pg_advisory_lock({WAKE_LOCK_CLASS}, "
                           f"{WAKE_LOCK_KEY_SQL.format(channel=repr(NOTIFY_CHANNEL))})")
        ready.set()
        while not done.is_set():
            async for _note in conn.notifies(timeout=0.2):
                arrivals.append(time.time())
        await conn.close()

    commits: list[float] = []

    async def main() -> None:
        ready, done = anyio.Event(), anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(listen, ready, done)
            await ready.wait()
            proc, out, go = _run_producer(url, rate, seconds)
            go.set()
            while True:
                item = await anyio.to_thread.run_sync(out.get)
                if item is None:
                    break
                commits.append(item[1])
            await anyio.sleep(0.5)
            done.set()
            proc.join(10)

    anyio.run(main)
    n = min(len(commits), len(arrivals))
    return _percentiles([arrivals[i] - commits[i] for i in range(n)])


class WriteTransactionSampler:
    """Samples, every 20 ms, how long the oldest write transaction of the *cluster* has been
    running (other databases included): what holds the bus's watermark back."""

    def __init__(self, url: str) -> None:
        self.engine = sa.create_engine(url, poolclass=sa.NullPool)
        self.samples: list[float] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with self.engine.connect() as conn:
            while not self.stop.wait(0.02):
                age = conn.exec_driver_sql(
                    "SELECT coalesce(extract(epoch FROM max(clock_timestamp() - xact_start)), 0)"
                    " FROM pg_stat_activity WHERE backend_xid IS NOT NULL"
                ).scalar()
                conn.rollback()
                self.samples.append(float(age or 0.0))
        self.engine.dispose()

    def __enter__(self) -> WriteTransactionSampler:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(5)


class Holds:
    """From ``after`` seconds on, holds transactions open for ``seconds``. ``writes=False``: an
    uncommitted INSERT in another database of the server (``other_url``) and a transaction of
    the bus's database with an id and no event (both rolled back). ``writes=True``: one that
    wrote an event (committed at the end)."""

    def __init__(self, url: str, other_url: str, after: float, seconds: float,
                 writes: bool) -> None:
        self.url, self.other_url = url, other_url
        self.after, self.seconds, self.writes = after, seconds, writes
        self.held = outbox.new_event("system", "bench.held", {}) if writes else None
        self.window = (float("inf"), float("inf"))
        self.held_commit = float("inf")
        self.thread = threading.Thread(target=self._run, daemon=True)
        with sa.create_engine(other_url, poolclass=sa.NullPool).begin() as conn:
            conn.exec_driver_sql("CREATE TABLE IF NOT EXISTS hold_t (x int)")

    def _run(self) -> None:
        time.sleep(self.after)
        bus = sa.create_engine(self.url, poolclass=sa.NullPool)
        other = sa.create_engine(self.other_url, poolclass=sa.NullPool)
        with other.connect() as elsewhere, bus.connect() as idle, bus.connect() as writer:
            if self.held is None:
                elsewhere.begin()
                elsewhere.exec_driver_sql("INSERT INTO hold_t VALUES (1)")
                idle.begin()
                idle.execute(sa.select(event_sql.CURRENT_XID))
            else:
                writer.begin()
                event_sql.insert_events(writer, [self.held], True)
            start = time.time()
            time.sleep(self.seconds)
            end = time.time()
            if self.held is None:
                elsewhere.rollback()
                idle.rollback()
            else:
                writer.commit()
                self.held_commit = time.time()
            self.window = (start, end)
        bus.dispose()
        other.dispose()


def latency_provider(url: str, rate: float, seconds: float, notify: bool,
                     poll_interval: float, holds: Holds | None = None,
                     ) -> dict[str, Any]:
    received: dict[str, float] = {}
    commits: dict[str, float] = {}

    async def main() -> None:
        provider = DatabaseProvider(url, notify=notify, poll_interval=poll_interval)
        deliveries = provider.consume(group=f"lat-{uuid.uuid4().hex[:6]}")

        async def consume() -> None:
            async for delivery in deliveries:
                received[str(delivery.event.id)] = time.time()
                await delivery.ack()

        async with anyio.create_task_group() as tg:
            tg.start_soon(consume)
            await anyio.sleep(0.5)  # the listener is up
            proc, out, go = _run_producer(url, rate, seconds)
            go.set()
            if holds is not None:
                holds.thread.start()
            while True:
                item = await anyio.to_thread.run_sync(out.get)
                if item is None:
                    break
                commits[item[0]] = item[1]
            if holds is not None:
                await anyio.to_thread.run_sync(holds.thread.join)
                if holds.held is not None:
                    commits[str(holds.held.id)] = holds.held_commit
            with anyio.move_on_after(5 + 2 * poll_interval):
                while len(received) < len(commits):  # noqa: ASYNC110
                    await anyio.sleep(0.05)
            tg.cancel_scope.cancel()
            proc.join(10)
        await deliveries.aclose()
        await provider.close()

    anyio.run(main)
    lost = set(commits) - set(received)
    if lost:
        raise RuntimeError(f"{len(lost)} events committed but not delivered")
    if holds is None:
        return _percentiles([received[i] - commits[i] for i in commits])
    held = str(holds.held.id) if holds.held is not None else ""
    lo, hi = holds.window
    during = [received[i] - t for i, t in commits.items() if i != held and lo <= t <= hi]
    out: dict[str, Any] = {"during_holds": _percentiles(during)}
    if held:
        out["held_event_after_its_commit_ms"] = (received[held] - holds.held_commit) * 1e3
        out["held_event_commit_to_hold_start_s"] = holds.held_commit - lo
        out["held_event_first"] = min(received, key=received.__getitem__) == held
    return out


# -- main ----------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--admin-url", default=ADMIN)
    parser.add_argument("--cluster", choices=("private", "shared"), default=None,
                        help="private: a throw-away PostgreSQL cluster (default when initdb is "
                        "installed); shared: the server at --admin-url")
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--batch-sizes", default="100,500")
    parser.add_argument("--rounds", type=int, default=3,
                        help="drain: bare read, 1 group, 3 groups alternated this many times")
    parser.add_argument("--hold-seconds", type=float, default=30.0)
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--poll-interval", type=float, default=1.0)
    parser.add_argument("--only", choices=("drain", "latency", "hold"))
    parser.add_argument("--json", action="store_true", help="print the results as JSON too")
    args = parser.parse_args()
    results: dict[str, Any] = {"events": args.events}
    with contextlib.ExitStack() as stack:
        admin_url = args.admin_url
        cluster = args.cluster or ("private" if _have_initdb() else "shared")
        if cluster == "private":
            from tests.servers import PrivatePostgres

            server = PrivatePostgres()
            server.start()
            stack.callback(server.close)
            admin_url = server.url
        results["cluster"] = cluster
        print(f"cluster: {cluster}", flush=True)
        url = stack.enter_context(scratch_database("outbox_bench_bus", admin_url=admin_url))
        other = stack.enter_context(scratch_database("outbox_bench_other", admin_url=admin_url))
        _run(args, url, other, results)
    if args.json:
        print(json.dumps(results, indent=2))


def _have_initdb() -> bool:
    return any(Path("/usr/lib/postgresql").glob("*/bin/initdb"))


def _median(values: list[float]) -> float:
    return statistics.median(values)


def _drain_rounds(args: argparse.Namespace, url: str, results: dict[str, Any]) -> None:
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        bare: list[float] = []
        one: list[float] = []
        three: list[list[float]] = []
        for _round in range(args.rounds):  # alternated: the machine's load hits all alike
            bare.append(args.events / bare_keyset_read(url, args.events, batch))
            one.append(drain(url, args.events, 1, batch)[0])
            three.append(drain(url, args.events, 3, batch))
        one_ratio = _median([o / b for o, b in zip(one, bare, strict=True)])
        three_ratio = _median([min(t) / b for t, b in zip(three, bare, strict=True)])
        row = {"rounds": args.rounds, "bare_keyset_read": bare, "one_group": one,
               "three_groups": three, "one_group_ratio_median": one_ratio,
               "three_groups_min_ratio_median": three_ratio}
        results[f"drain_batch_{batch}"] = row
        print(f"drain, batch {batch}, {args.rounds} rounds (medians): bare keyset read "
              f"{_median(bare):,.0f} ev/s | 1 group {_median(one):,.0f} ev/s ({one_ratio:.0%} "
              f"of bare; target 60 %) | 3 groups, slowest {_median([min(t) for t in three]):,.0f}"
              f" ev/s ({three_ratio:.0%} of bare; target 40 %)", flush=True)


def _show(name: str, rate: float, r: dict[str, float]) -> None:
    print(f"latency at {rate:.0f} ev/s, {name}: p50 {r['p50']:.2f} ms, "
          f"p99 {r['p99']:.2f} ms, max {r['max']:.1f} ms (n={r['n']})", flush=True)


def _run(args: argparse.Namespace, url: str, other: str, results: dict[str, Any]) -> None:
    engine = sa.create_engine(url)
    outbox.create_schema(engine)
    engine.dispose()
    if args.only in (None, "drain"):
        print(f"seeding {args.events} events ...", flush=True)
        seed(url, args.events)
        _drain_rounds(args, url, results)
    if args.only in (None, "latency"):
        bare = latency_bare_notify(url, args.rate, args.seconds)
        with WriteTransactionSampler(url) as sampler:
            with_notify = latency_provider(url, args.rate, args.seconds, True,
                                           args.poll_interval)
        held = _percentiles(sampler.samples)
        polling = latency_provider(url, args.rate, min(args.seconds, 10.0), False,
                                   args.poll_interval)
        results["latency"] = {"bare_notify": bare, "provider_notify": with_notify,
                              "provider_polling": polling,
                              "oldest_write_transaction_in_cluster": held}
        for name, r in (("bare LISTEN", bare), ("provider + NOTIFY", with_notify),
                        (f"provider, polling {args.poll_interval}s", polling)):
            _show(name, args.rate, r)
        print(f"meanwhile, the oldest write transaction in the cluster had run: p50 "
              f"{held['p50']:.1f} ms, p99 {held['p99']:.1f} ms, max {held['max']:.1f} ms",
              flush=True)
        print("targets for provider + NOTIFY: p50 <= 5 ms, p99 <= 20 ms", flush=True)
    if args.only in (None, "hold"):
        for writes, what in ((False, "an INSERT in another database + an id without events"),
                             (True, "a transaction that wrote an event")):
            holds = Holds(url, other, 2.0, args.hold_seconds, writes)
            res = latency_provider(url, args.rate, args.hold_seconds + 4.0, True,
                                 args.poll_interval, holds)
            results["hold_writes" if writes else "hold"] = res
            during = res["during_holds"]
            _show(f"during a {args.hold_seconds:.0f} s hold of {what}", args.rate, during)
            if writes:
                print(f"  the held event: committed {res['held_event_commit_to_hold_start_s']:.1f}"
                      f" s after the hold began, delivered "
                      f"{res['held_event_after_its_commit_ms']:.1f} ms after its commit",
                      flush=True)
        print("target during the first hold: p99 <= 50 ms", flush=True)


if __name__ == "__main__":
    main()
