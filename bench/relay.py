"""Relay benchmark, not a test. PostgreSQL, no-op handler, memory provider.

(a) Throughput draining N pending events (default 100,000), batch 500, R rounds (default 3) in
    alternating order, medians:
    - ``relay``: one ``python -m outbox.relay --once`` process (no-op handler from
      ``bench/noop_handlers.py``, memory provider, ``--batch-size 500``, ``--no-notify``), timed
      from process start to exit (the package byte-compiled first, as an installed one is);
      ``relay x2``: two such processes sharing the table;
    - ``raw loop``: one psycopg connection running the relay's own claim and complete statements
      (RelayStore's SQL text) with no Python per-event work — the SQL limit;
    - ``pgqueuer``: pgqueuer's drain of N no-op jobs, 2 worker processes x batch 500 (asyncpg),
      through its public API (``Queries.enqueue``, ``QueueManager.run(mode=drain)``), timed
      from process start to exit.
    Targets: relay ≥ 1.0x pgqueuer (goal 1.3x), relay ≥ 70 % of the raw loop.
(s) The handler styles users write, same drain (CLI, N events with a 200-byte payload field,
    batch 500), R rounds alternating, medians: ``def`` (the README's: worker threads),
    ``async def``, ``def`` with ``threaded=False``, the raw loop and pgqueuer as in (a). Targets:
    def ≥ 0.9x async, def ≥ 0.85x the raw loop, def ≥ 1.2x pgqueuer. Run it with ``--only s``.
(b) The same drain with H completed history rows in the table (default 2,000,000): ≥ 90 % of (a).
(c) Latency commit → handler at R events/s (default 200) from a writer process, p50 / p99, with
    NOTIFY on, and with NOTIFY off (poll_interval 1 s). Targets with NOTIFY: p50 ≤ 2 ms,
    p99 ≤ 10 ms.
(d) Writer throughput, 4 writer processes committing one event per transaction, wake-up on vs
    off (``outbox.notify``), ratio, and how many NOTIFYs the writers sent: with no relay running,
    and with a relay process delivering the events. Target: ratio ≥ 0.95.
(e) Relay RSS while draining M events (default 1,000,000): samples, < 150 MB and flat.
(f) Claim statement time during that drain (default autovacuum + the migration's per-table
    settings): p50 / p99 / max, bounded claims (from the floor) and full rescans separately.
    Target p99 ≤ 2 ms.

    python bench/relay.py                       # everything, the default sizes
    python bench/relay.py --only a --events 50000
    python bench/relay.py --only c,d --seconds 10

Events are seeded like capture writes them: a small JSON row as payload, ordering key
``public.tN:id`` (one key per row). Each part runs on a scratch database (dropped at the end).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import sqlalchemy as sa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import _scratch  # noqa: E402

import outbox  # noqa: E402
from outbox._sql import relay as relay_sql  # noqa: E402
from outbox._sql.capture import pg_uuid7_sql  # noqa: E402
from outbox.events import new_event_id  # noqa: E402
from outbox.providers.memory import MemoryProvider  # noqa: E402
from outbox.relay import Relay  # noqa: E402

# Bench-only SQL with constants and bound numbers (no user input). Ids are time-ordered (UUIDv7)
# like the ones capture writes, with the time of each row's generation.
_SEED_ID = pg_uuid7_sql("clock_timestamp()")
SEED = (
    "INSERT INTO events (id, source, type, status, payload, instance_id, schema_name, entity, "  # noqa: S608
    "entity_id, operation, created_at, completed_at, metadata, retry_count, next_attempt_at, "
    "ordering_key) "
    f"SELECT {_SEED_ID}, 'database', 'public.t' || mod(i, 10) || '.create', %(status)s, "
    "jsonb_build_object('id', i, 'name', 'user ' || i, 'email', 'user' || i || '@example.com', "
    "'active', true) || CASE WHEN %(pad)s > 0 THEN jsonb_build_object('bio', "
    "repeat('x', %(pad)s)) ELSE '{}' END, 'bench', 'public', 't' || mod(i, 10), i::text, "
    "'create', now(), "
    "CASE WHEN %(status)s::text = 'completed' THEN now() END, '{}'::jsonb, 0, now(), "
    "'public.t' || mod(i, 10) || ':' || i "
    "FROM generate_series(%(start)s::bigint, %(stop)s::bigint) AS i"
)


def libpq(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


@contextlib.contextmanager
def scratch_database() -> Iterator[str]:
    """A scratch database with the outbox schema."""
    with _scratch.scratch_database() as url:
        engine = sa.create_engine(url, poolclass=sa.NullPool)
        outbox.create_schema(engine)
        engine.dispose()
        yield url


def seed(url: str, n: int, *, status: str = "pending", truncate: bool = True,
         start: int = 1, pad: int = 0) -> None:
    import psycopg

    with psycopg.connect(libpq(url), autocommit=True) as conn:
        if truncate:
            conn.execute("TRUNCATE events")
        step = 200_000
        for lo in range(start, start + n, step):
            hi = min(start + n - 1, lo + step - 1)
            conn.execute(SEED, {"status": status, "start": lo, "stop": hi,  # type: ignore[arg-type]
                                "pad": pad})
        conn.execute("VACUUM ANALYZE events")
        # Start every measured run right after a checkpoint: otherwise whether (and when) one
        # falls inside a run decides how many full-page images it writes (up to ±25 %).
        with contextlib.suppress(psycopg.Error):  # CHECKPOINT needs superuser (or pg_checkpoint)
            conn.execute("CHECKPOINT")


def pending(url: str) -> int:
    import psycopg

    with psycopg.connect(libpq(url)) as conn:
        row = conn.execute("SELECT count(*) FROM events WHERE status <> 'completed'").fetchone()
        assert row is not None
        return int(row[0])


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def child(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, __file__, "--child", *args], cwd=ROOT,
                            env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, text=True)


# --------------------------------------------------------------------------------------------
# (a)/(b) drains


def _psycopg_sql(text: str) -> str:
    """RelayStore's SQL text with psycopg placeholders (same statement, no SQLAlchemy)."""
    import re

    return re.sub(r"(?<!:):(\w+)", r"%(\1)s", text)


def raw_loop(url: str, batch: int) -> float:
    """The relay's claim + complete statements in a bare loop: the SQL limit."""
    import datetime as dt

    import psycopg

    claim = _psycopg_sql(relay_sql._PG_CLAIM)
    complete = _psycopg_sql(relay_sql._COMPLETE.replace("id IN :ids", "id = ANY(:ids)"))
    n = 0
    with psycopg.connect(libpq(url)) as conn:
        # the session settings the relay uses on its own connections
        settings = [*relay_sql._PG_PLAN_SETTINGS, relay_sql._PG_ASYNC_COMMIT_SETTING]
        conn.execute("; ".join(f"SET {x}" for x in settings))
        conn.commit()
        started = time.perf_counter()
        while True:
            token = uuid.uuid4()
            now = dt.datetime.now(dt.UTC)
            with conn.transaction():
                rows = conn.execute(claim, {  # type: ignore[call-overload]
                    "now": now, "expires": now + dt.timedelta(seconds=30), "owner": "raw",
                    "token": token, "limit": batch, "floor": 0}).fetchall()
            if not rows:
                break
            with conn.transaction():
                conn.execute(complete, {"ids": [r[0] for r in rows], "token": token,  # type: ignore[call-overload]
                                        "now": dt.datetime.now(dt.UTC)})
            n += len(rows)
        elapsed = time.perf_counter() - started
    return n / elapsed


def make_relay(url: str, batch: int, **kw: Any) -> Relay:
    broker = outbox.Broker(MemoryProvider())

    async def noop(event: outbox.Event) -> None:
        return None

    broker.subscribe("*", noop, name="noop")
    kw.setdefault("notify", False)
    return Relay(url, broker=broker, batch_size=batch, **kw)


def relay_drain(url: str, batch: int) -> tuple[float, Relay]:
    relay = make_relay(url, batch)
    total = pending(url)
    started = time.perf_counter()
    anyio.run(relay.drain)
    elapsed = time.perf_counter() - started
    return total / elapsed, relay


async def _pgqueuer_setup(dsn: str, n: int) -> None:
    import asyncpg
    from pgqueuer import AsyncpgDriver, Queries

    conn = await asyncpg.connect(dsn)
    try:
        queries = Queries(AsyncpgDriver(conn))
        with contextlib.suppress(Exception):
            await queries.install()
        await conn.execute("TRUNCATE pgqueuer")
        step = 10_000
        for lo in range(0, n, step):
            k = min(step, n - lo)
            await queries.enqueue(["noop"] * k, [None] * k, [0] * k)
        await conn.execute("VACUUM ANALYZE pgqueuer")
    finally:
        await conn.close()


async def _pgqueuer_worker(dsn: str, batch: int) -> None:
    from datetime import timedelta

    import asyncpg
    from pgqueuer import AsyncpgDriver, Queries, QueueManager
    from pgqueuer.models import Job
    from pgqueuer.types import QueueExecutionMode

    conn = await asyncpg.connect(dsn)
    try:
        qm = QueueManager(Queries(AsyncpgDriver(conn)))

        @qm.entrypoint("noop")
        async def noop(job: Job) -> None:
            return None

        await qm.run(batch_size=batch, mode=QueueExecutionMode.drain,
                     dequeue_timeout=timedelta(seconds=0.2),
                     log_aggregation_interval=timedelta(0))
    finally:
        await conn.close()


def pgqueuer_drain(url: str, n: int, workers: int = 2, batch: int = 500) -> float | str:
    try:
        import pgqueuer  # noqa: F401
    except ImportError:
        return "not installed (pip install -e '.[bench]')"
    dsn = libpq(url)
    anyio.run(_pgqueuer_setup, dsn, n)
    started = time.perf_counter()
    procs = [child("pgqueuer", dsn, str(batch)) for _ in range(workers)]
    if any(p.wait() != 0 for p in procs):
        return "pgqueuer workers failed"
    elapsed = time.perf_counter() - started
    left = anyio.run(_pgqueuer_left, dsn)
    if left:
        return f"pgqueuer left {left} jobs queued"
    return n / elapsed


async def _pgqueuer_left(dsn: str) -> int:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM pgqueuer"))
    finally:
        await conn.close()


#: CPU µs per event of the relay processes of each ``relay_cli`` call (user + system, start-up
#: included), in call order
CPU_PER_EVENT: list[float] = []


def relay_cli(url: str, batch: int, count: int = 1, app: str = "noop_handlers") -> float:
    """``count`` ``python -m outbox.relay --once`` processes draining the table: events/s from
    their start to the last one's exit."""
    total = pending(url)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT / "bench"), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "outbox.relay", "--database-url", url, "--once", "--no-notify",
           "--batch-size", str(batch), "--app", app, "--log-level", "WARNING"]
    cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=env) for _ in range(count)]
    codes = [p.wait() for p in procs]
    elapsed = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    CPU_PER_EVENT.append(((after.ru_utime + after.ru_stime) - (cpu.ru_utime + cpu.ru_stime))
                         / max(1, total) * 1e6)
    if any(codes) or pending(url):
        raise SystemExit(f"relay exited with {codes}, {pending(url)} events left")
    return total / elapsed


def part_a(args: argparse.Namespace, out: dict[str, Any]) -> None:
    n, batch = args.events, 500
    runs: dict[str, list[float]] = {"relay": [], "relay_x2": [], "raw": [], "pgqueuer": []}
    with scratch_database() as url:
        def one(name: str) -> float:
            if name == "pgqueuer":
                return float(pgqueuer_drain(url, n))
            seed(url, n)
            if name == "raw":
                return raw_loop(url, batch)
            return relay_cli(url, batch, 2 if name == "relay_x2" else 1)

        try:
            import pgqueuer  # noqa: F401
        except ImportError:
            del runs["pgqueuer"]
            print("(a) pgqueuer not installed (pip install -e '.[bench]'): skipped")
        names = list(runs)
        for r in range(args.rounds):
            for name in names if r % 2 == 0 else reversed(names):
                runs[name].append(one(name))
                print(f"(a) round {r + 1} {name:9} {runs[name][-1]:9,.0f} events/s", flush=True)
    med = {name: statistics.median(v) for name, v in runs.items()}
    print(f"(a) {n:,} events, batch {batch}, median of {args.rounds}: "
          + ", ".join(f"{k} {v:,.0f}/s" for k, v in med.items()), flush=True)
    print(f"(a) relay / raw loop {med['relay'] / med['raw']:.2f} (target >= 0.70)", flush=True)
    if "pgqueuer" in med:
        print(f"(a) relay / pgqueuer {med['relay'] / med['pgqueuer']:.2f} (target >= 1.0, goal "
              f"1.3); relay x2 / pgqueuer {med['relay_x2'] / med['pgqueuer']:.2f}", flush=True)
    out["a"] = {"events": n, "batch": batch, "rounds": runs, "median": med}


#: (s) the handler styles, each a ``--app`` module in bench/
STYLES = {"def": "sync_handlers", "async": "noop_handlers", "def_inline": "inline_handlers"}


def part_s(args: argparse.Namespace, out: dict[str, Any]) -> None:
    """(s) The handler a user writes: the README's ``def`` handler (worker threads, the
    default), an ``async def`` one, a ``def`` one with ``threaded=False``; and the raw loop.
    Events carry a 200-byte payload field; alternating order, medians."""
    n, batch, pad = args.events, 500, 200
    runs: dict[str, list[float]] = {name: [] for name in (*STYLES, "raw", "pgqueuer")}
    cpu: dict[str, list[float]] = {name: [] for name in STYLES}
    try:
        import pgqueuer  # noqa: F401
    except ImportError:
        del runs["pgqueuer"]
        print("(s) pgqueuer not installed (pip install -e '.[bench]'): skipped")
    with scratch_database() as url:
        names = list(runs)
        for r in range(args.rounds):
            for name in names if r % 2 == 0 else reversed(names):
                if name == "pgqueuer":
                    runs[name].append(float(pgqueuer_drain(url, n)))
                else:
                    seed(url, n, pad=pad)
                    runs[name].append(raw_loop(url, batch) if name == "raw"
                                      else relay_cli(url, batch, app=STYLES[name]))
                    if name in cpu:
                        cpu[name].append(CPU_PER_EVENT[-1])
                print(f"(s) round {r + 1} {name:10} {runs[name][-1]:9,.0f} events/s"
                      + (f", {cpu[name][-1]:.1f} CPU µs/event" if name in cpu else ""),
                      flush=True)
    med = {name: statistics.median(v) for name, v in runs.items()}
    print(f"(s) {n:,} events (200-byte field), batch {batch}, median of {args.rounds}: "
          + ", ".join(f"{k} {v:,.0f}/s" for k, v in med.items()), flush=True)
    print(f"(s) def / async {med['def'] / med['async']:.2f} (target >= 0.9); def / raw loop "
          f"{med['def'] / med['raw']:.2f} (target >= 0.85); def / def_inline "
          f"{med['def'] / med['def_inline']:.2f}", flush=True)
    if "pgqueuer" in med:
        print(f"(s) def / pgqueuer (2 processes x batch 500) {med['def'] / med['pgqueuer']:.2f} "
              "(target >= 1.2)", flush=True)
    print("(s) relay process CPU per event (start-up included), median: " + ", ".join(
        f"{k} {statistics.median(v):.1f} µs" for k, v in cpu.items()), flush=True)
    out["s"] = {"events": n, "batch": batch, "rounds": runs, "median": med, "cpu_us": cpu}


def part_b(args: argparse.Namespace, out: dict[str, Any]) -> None:
    n, history = args.events, args.history
    batch = 500
    with scratch_database() as url:
        seed(url, n)
        base, _ = relay_drain(url, batch)
        seed(url, history, status="completed")
        seed(url, n, truncate=False, start=history + 1)
        with_history, _ = relay_drain(url, batch)
    print(f"(b) batch {batch}: empty table {base:,.0f}/s, with {history:,} completed rows "
          f"{with_history:,.0f}/s ({with_history / base:.0%})", flush=True)
    out["b"] = {"events": n, "history": history, "base": base, "with_history": with_history,
                "ratio": with_history / base}


# --------------------------------------------------------------------------------------------
# (c) latency, (d) writers


def part_c(args: argparse.Namespace, out: dict[str, Any]) -> None:
    results = {}
    for notify in (True, False):
        with scratch_database() as url, tempfile.TemporaryDirectory() as tmp:
            seen = Path(tmp) / "seen.json"
            relay = child("relay-latency", url, "1" if notify else "0", str(seen))
            assert relay.stdout is not None
            relay.stdout.readline()  # "ready"
            time.sleep(0.5)
            writer = child("writer-latency", url, str(args.rate), str(args.seconds))
            wout, _ = writer.communicate()
            committed = json.loads(wout)
            time.sleep(1.5)  # let the last ones arrive (poll interval 1 s)
            relay.terminate()
            relay.wait()
            handled = json.loads(seen.read_text())
        lat = [(handled[i] - t) * 1000 for i, t in committed.items() if i in handled]
        missing = len(committed) - len(lat)
        key = "notify_on" if notify else "notify_off"
        results[key] = {"p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99), "n": len(lat),
                        "missing": missing}
        print(f"(c) NOTIFY {'on ' if notify else 'off'} ({len(lat)} events at {args.rate}/s): "
              f"p50 {pct(lat, 50):.2f} ms, p99 {pct(lat, 99):.2f} ms, max {max(lat):.1f} ms"
              + (f", MISSING {missing}" if missing else ""), flush=True)
    out["c"] = results


def part_d(args: argparse.Namespace, out: dict[str, Any]) -> None:
    """4 writer processes at full speed, wake-up on (the NOTIFY trigger, ``outbox.notify`` on)
    vs off (``outbox.notify = off``), rounds alternating on, off, off, on (the machine's load
    drifts), sums compared; a LISTEN connection of this process counts the NOTIFYs sent.
    Twice: with no relay running (every relay busy elsewhere: the trigger's own cost), and with a
    relay process delivering the writers' events (``--no-notify`` in the off rounds), where the
    relay's own work on the same two cores is part of both figures."""
    import psycopg

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT / "bench"), os.environ.get("PYTHONPATH", "")])}
    out["d"] = {}
    for with_relay in (False, True):
        totals = {True: 0.0, False: 0.0}
        rounds: list[tuple[bool, float, int]] = []
        with scratch_database() as url:
            for notify in (True, False, False, True):
                relay = subprocess.Popen(
                    [sys.executable, "-m", "outbox.relay", "--database-url", url, "--app",
                     "noop_handlers", "--batch-size", "500", "--log-level", "WARNING",
                     *([] if notify else ["--no-notify"])], cwd=ROOT, env=env,
                ) if with_relay else None
                time.sleep(2.0 if with_relay else 0.2)  # started, listening, idle
                with psycopg.connect(libpq(url), autocommit=True) as listen:
                    listen.execute("LISTEN outbox_events")
                    procs = [child("writer-max", url, "1" if notify else "0",
                                   str(args.seconds / 2)) for _ in range(4)]
                    tx = sum(int(p.communicate()[0]) for p in procs)
                    notes = sum(1 for _ in listen.notifies(timeout=0.5))
                if relay is not None:
                    relay.terminate()
                    relay.wait(30)
                rate = tx / (args.seconds / 2)
                totals[notify] += rate / 2
                rounds.append((notify, rate, notes))
        ratio = totals[True] / totals[False]
        label = "a relay delivering" if with_relay else "no relay"
        print(f"(d) 4 writers, one event per transaction, {label}: wake-up on "
              f"{totals[True]:,.0f} tx/s, off {totals[False]:,.0f} tx/s (on/off {ratio:.2f}; "
              "rounds " + ", ".join(f"{'on' if n else 'off'} {r:,.0f} tx/s {k:,} NOTIFYs"
                                    for n, r, k in rounds) + ")", flush=True)
        out["d"][label] = {"notify_on": totals[True], "notify_off": totals[False],
                           "ratio": ratio, "rounds": rounds}


# --------------------------------------------------------------------------------------------
# (e) RSS, (f) claim time


def part_ef(args: argparse.Namespace, out: dict[str, Any]) -> None:
    with scratch_database() as url:
        seed(url, args.big)
        p = child("relay-rss", url, "100", str(args.big))
        stdout, _ = p.communicate()
    res = json.loads(stdout)
    rss = res["rss_mb"]
    print(f"(e) relay RSS over {args.big:,} events (MB, every 10%): "
          + ", ".join(f"{v:.0f}" for v in rss), flush=True)
    for kind in ("bounded", "full"):
        q = res[kind]
        if q:
            print(f"(f) claim statement, {kind} ({len(q)} claims): p50 {pct(q, 50):.2f} ms, "
                  f"p99 {pct(q, 99):.2f} ms, max {max(q):.1f} ms", flush=True)
    allq = res["bounded"] + res["full"]
    print(f"(f) all claims: p99 {pct(allq, 99):.2f} ms; drain {res['rate']:,.0f} events/s",
          flush=True)
    for name in ("from_floor", "from_start"):
        q = res[name]
        print(f"(f) claim scan alone, {name.replace('_', ' ')} ({len(q)} samples): "
              f"p50 {pct(q, 50):.2f} ms, p99 {pct(q, 99):.2f} ms, max {max(q, default=0):.1f} ms",
              flush=True)
    out["e"] = {"rss_mb": rss}
    out["f"] = {kind: {"p50_ms": pct(res[kind], 50), "p99_ms": pct(res[kind], 99),
                       "max_ms": max(res[kind], default=0.0), "n": len(res[kind])}
                for kind in ("bounded", "full")}
    out["f"]["all_p99_ms"] = pct(allq, 99)
    for name in ("from_floor", "from_start"):
        out["f"][f"scan_{name}"] = {"p50_ms": pct(res[name], 50), "p99_ms": pct(res[name], 99),
                                    "max_ms": max(res[name], default=0.0)}


# --------------------------------------------------------------------------------------------
# child processes


def _scan_sampler(url: str, floor: Any, batch: int, stop: Any, out: Any) -> None:
    """Time the claim's scan alone (no lock, no update) every 50 ms: from the relay's current
    floor (what its bounded claims walk) and from the start (a naive claim walking the dead
    index entries that completed rows leave until vacuum).

    Runs in a process of its own: a thread in the relay's process would time its own waits for
    the GIL (up to the 5 ms switch interval) along with the query."""
    import datetime as dt

    import psycopg

    scan = _psycopg_sql(
        f"SELECT e.id FROM events AS e WHERE {relay_sql._DUE} AND {relay_sql._IS_HEAD} "  # noqa: S608
        "ORDER BY e.seq, e.next_attempt_at LIMIT :limit"
    )
    scans: dict[str, list[float]] = {"from_floor": [], "from_start": []}
    with psycopg.connect(libpq(url), autocommit=True) as conn:
        conn.execute("; ".join(f"SET {x}" for x in relay_sql._PG_PLAN_SETTINGS))
        while not stop.wait(0.05):
            for name, start in (("from_floor", floor.value), ("from_start", 0)):
                now = dt.datetime.now(dt.UTC)
                t0 = time.perf_counter()
                conn.execute(scan, {"now": now, "floor": start,  # type: ignore[call-overload]
                                    "limit": batch}).fetchall()
                scans[name].append((time.perf_counter() - t0) * 1000)
    out.send(scans)


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_child(argv: list[str]) -> None:
    kind = argv[0]
    if kind == "relay-drain":
        relay_drain(argv[1], int(argv[2]))
    elif kind == "pgqueuer":
        anyio.run(_pgqueuer_worker, argv[1], int(argv[2]))
    elif kind == "relay-latency":
        url, notify, path = argv[1], argv[2] == "1", argv[3]
        seen: dict[str, float] = {}
        broker = outbox.Broker(MemoryProvider())

        async def record(event: outbox.Event) -> None:
            seen[str(event.payload["i"])] = time.time()

        broker.subscribe("*", record)
        relay = Relay(url, broker=broker, notify=notify, poll_interval=1.0)

        async def main() -> None:
            import signal

            async with anyio.create_task_group() as tg:
                async def stop_on_term() -> None:
                    with anyio.open_signal_receiver(signal.SIGTERM) as sigs:
                        async for _ in sigs:
                            relay.stop()
                            return

                tg.start_soon(stop_on_term)
                await relay.start()
                print("ready", flush=True)
                await relay.run()
                tg.cancel_scope.cancel()

        anyio.run(main)
        Path(path).write_text(json.dumps(seen))
    elif kind == "writer-latency":
        import psycopg

        url, rate, seconds = argv[1], float(argv[2]), float(argv[3])
        insert = _event_insert()
        committed: dict[str, float] = {}
        with psycopg.connect(libpq(url), autocommit=False) as conn:
            start = time.perf_counter()
            i = 0
            while time.perf_counter() - start < seconds:
                target = start + i / rate
                delay = target - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                conn.execute(insert, _event_params(i))  # type: ignore[call-overload]
                conn.commit()
                committed[str(i)] = time.time()
                i += 1
        print(json.dumps(committed))
    elif kind == "writer-max":
        import psycopg

        url, notify, seconds = argv[1], argv[2] == "1", float(argv[3])
        insert = _event_insert()
        options = "" if notify else "-c outbox.notify=off"
        n = 0
        with psycopg.connect(libpq(url), options=options) as conn:
            end = time.perf_counter() + seconds
            while time.perf_counter() < end:
                conn.execute(insert, _event_params(n))  # type: ignore[call-overload]
                conn.commit()
                n += 1
        print(n)
    elif kind == "relay-rss":
        url, batch, total = argv[1], int(argv[2]), int(argv[3])
        samples: list[float] = []
        bounded: list[float] = []
        full: list[float] = []
        relay = make_relay(url, batch)
        step = max(1, total // 10)

        class Hooks(outbox.relay.RelayHooks):
            next_mark = step

            def on_claim(self, claim: Any) -> None:
                if claim.events:
                    (full if claim.full else bounded).append(claim.query_seconds * 1000)
                if relay.stats.claimed >= self.next_mark:
                    samples.append(_rss_mb())
                    self.next_mark += step

        relay.hooks.append(Hooks())
        # The sampler process reads the relay's floor from shared memory (set at every claim).
        mp = multiprocessing.get_context("fork")  # forked before the relay starts any thread
        floor = mp.Value("q", 0, lock=False)
        stop = mp.Event()
        receive, send = mp.Pipe(duplex=False)
        sampler = mp.Process(target=_scan_sampler, args=(url, floor, batch, stop, send))
        sampler.start()

        class Floor(outbox.relay.RelayHooks):
            def on_claim(self, claim: Any) -> None:
                floor.value = relay._floor

        relay.hooks.append(Floor())
        started = time.perf_counter()
        try:
            anyio.run(relay.drain)
        finally:
            stop.set()
            scans = receive.recv()
            sampler.join()
        rate = relay.stats.completed / (time.perf_counter() - started)
        samples.append(_rss_mb())
        print(json.dumps({"rss_mb": samples, "bounded": bounded, "full": full, "rate": rate,
                          **scans}))
    else:
        raise SystemExit(f"unknown child {kind}")


def _event_insert() -> str:
    return (
        "INSERT INTO events (id, source, type, status, payload, instance_id, schema_name, "
        "entity, entity_id, operation, created_at, metadata, retry_count, next_attempt_at, "
        "ordering_key) VALUES (%(id)s, 'database', 'public.users.create', 'pending', %(payload)s, "
        "'bench', 'public', 'users', %(eid)s, 'create', now(), '{}', 0, now(), %(key)s)"
    )


def _event_params(i: int) -> dict[str, Any]:
    from psycopg.types.json import Jsonb

    eid = f"{os.getpid()}-{i}"
    return {"id": new_event_id(), "payload": Jsonb({"i": i, "name": f"user {i}"}), "eid": eid,
            "key": f"public.users:{eid}"}


def compile_package() -> None:
    """Byte-compile the package, as ``pip install`` does. Run from a source tree with
    ``PYTHONDONTWRITEBYTECODE`` set, every relay process would otherwise compile some sixty
    modules at its start (0.2 s of a 5 s drain) — a cost no installed relay pays, and pgqueuer,
    installed from a wheel, does not pay either."""
    import compileall

    compileall.compile_dir(ROOT / "outbox", quiet=1)
    for app in STYLES.values():
        compileall.compile_file(ROOT / "bench" / f"{app}.py", quiet=1)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        run_child(sys.argv[2:])
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default="a,b,c,d,ef", help="parts: a,b,c,d,ef,s")
    p.add_argument("--events", type=int, default=100_000, help="(a)/(b) events to drain")
    p.add_argument("--rounds", type=int, default=3, help="(a) rounds")
    p.add_argument("--history", type=int, default=2_000_000, help="(b) completed rows")
    p.add_argument("--big", type=int, default=1_000_000, help="(e)/(f) events to drain")
    p.add_argument("--rate", type=float, default=200.0, help="(c) writer events/s")
    p.add_argument("--seconds", type=float, default=10.0, help="(c)/(d) duration")
    p.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    args = p.parse_args()
    parts = {x.strip() for x in args.only.split(",")}
    out: dict[str, Any] = {}
    compile_package()
    for name, fn in (("a", part_a), ("b", part_b), ("c", part_c), ("d", part_d),
                     ("ef", part_ef), ("s", part_s)):
        if name in parts:
            fn(args, out)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2, default=str))


if __name__ == "__main__":
    main()
