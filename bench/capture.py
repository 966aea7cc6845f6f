"""What capture costs: the same ORM workload with and without ``outbox.capture`` (PostgreSQL).

Workloads (one new Session per transaction, like a web request):

  (a) 2,000 transactions inserting 1 row          target ratio <= 1.25
  (b)   200 transactions inserting 100 rows       target ratio <= 1.15
  (c) 2,000 transactions updating 1 loaded row    target ratio <= 1.25
  (d) 2,000 transactions updating 1 loaded row whose new value the database converts (a
      datetime in a Date column): capture reads the stored value back, one more SELECT per
      flush — the cost of the read-back (no target; compare with (c))

The floor, in raw psycopg (no ORM, no Python per row; ``--only r``): the business statements of
(a), (b) and (c) as one statement each, plain (then ``COMMIT``) against the event rows sent with
capture's statement as a statement of their own (a round trip of their own) and pipelined with
the ``COMMIT`` (psycopg 3 pipeline mode: the event ``INSERT``, ``COMMIT`` and ``Sync`` leave in
one network flush and the client waits once). ``--only t``: the wake-up trigger's cost, the
pipelined transaction with the trigger and without it (``session_replication_role = replica``
skips it).

Runs alternate in one process: each workload is cut into chunks that run baseline, capture,
capture, baseline, ... so that a burst of load from elsewhere hits both sides alike. Capture is
registered only for its own chunks (``Capture.remove()`` in between): the baseline pays for no
listener at all. "ratio" is total capture time / total baseline time; "best" compares the fastest
chunk of each side (robust on a shared machine). The events table is emptied before each
workload of each round (untimed).

    .venv/bin/python bench/capture.py                      # temp database on 127.0.0.1:5432
    .venv/bin/python bench/capture.py --rounds 5 --scale 0.5
    .venv/bin/python bench/capture.py --url postgresql+psycopg://user@host/db   # existing db
    .venv/bin/python bench/capture.py --driver psycopg2    # the same on psycopg2
    .venv/bin/python bench/capture.py --only rt --rounds 5 # the raw floor, the trigger's cost

Every table also gives the median over rounds of each round's ratio ("median"), the figure the
targets are judged by.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import signal
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import psycopg
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import outbox
from outbox._sql.capture import PG_INSERT_EVENTS

TARGETS = {"a": 1.25, "b": 1.15, "c": 1.25, "d": None}


class Base(DeclarativeBase):
    pass


class Order(Base):
    __tablename__ = "bench_orders"

    id: Mapped[int] = mapped_column(primary_key=True)
    customer: Mapped[str] = mapped_column(sa.String(50))
    amount: Mapped[int]
    note: Mapped[str | None] = mapped_column(sa.String(200))


class Visit(Base):
    __tablename__ = "bench_visits"

    id: Mapped[int] = mapped_column(primary_key=True)
    day: Mapped[dt.date | None] = mapped_column(sa.Date())


def insert_one(factory: sessionmaker[Session], n: int) -> None:
    for i in range(n):
        with factory() as s:
            s.add(Order(customer=f"c{i % 97}", amount=i, note="hello"))
            s.commit()


def insert_many(factory: sessionmaker[Session], n: int) -> None:
    for _ in range(n):
        with factory() as s:
            s.add_all([Order(customer=f"c{j}", amount=j, note=None) for j in range(100)])
            s.commit()


def make_update_one(ids: list[int]) -> Callable[[sessionmaker[Session], int], None]:
    def update_one(factory: sessionmaker[Session], n: int) -> None:
        for i in range(n):
            with factory() as s:
                order = s.get(Order, ids[i % len(ids)])
                assert order is not None
                order.amount += 1
                s.commit()

    return update_one


def make_update_converted(ids: list[int]) -> Callable[[sessionmaker[Session], int], None]:
    start = dt.datetime(2026, 1, 1, 12, 30)

    def update_converted(factory: sessionmaker[Session], n: int) -> None:
        for i in range(n):
            with factory() as s:
                visit = s.get(Visit, ids[i % len(ids)])
                assert visit is not None
                visit.day = start + dt.timedelta(days=i)  # type: ignore[assignment]
                s.commit()

    return update_converted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="PostgreSQL URL (default: a temporary database)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--chunks", type=int, default=10, help="alternations per round")
    parser.add_argument("--no-notify", action="store_true",
                        help="ALTER DATABASE ... SET outbox.notify = off (no NOTIFY at commit)")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply transaction counts")
    parser.add_argument("--driver", choices=("psycopg", "psycopg2"), default="psycopg",
                        help="the driver of the temporary database's URL")
    parser.add_argument("--only", default="abcd",
                        help="workloads to run: a-d, r (raw floor), t (trigger); default abcd")
    args = parser.parse_args()

    admin = None
    url = args.url
    if url is None:
        name = f"outbox_bench_{uuid.uuid4().hex[:8]}"
        admin = sa.create_engine("postgresql+psycopg://postgres@127.0.0.1:5432/postgres",
                                 isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
        url = f"postgresql+{args.driver}://postgres@127.0.0.1:5432/{name}"
    if args.no_notify:
        setup = sa.create_engine(url, isolation_level="AUTOCOMMIT")
        with setup.connect() as conn:
            database = conn.exec_driver_sql("SELECT current_database()").scalar()
            conn.exec_driver_sql(f'ALTER DATABASE "{database}" SET outbox.notify = off')
        setup.dispose()
    engine = sa.create_engine(url)
    # SIGTERM -> SystemExit, so the temporary database is dropped on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        run(engine, args.rounds, args.scale, args.chunks, not args.no_notify, args.only)
    finally:
        engine.dispose()
        if admin is not None:
            with admin.connect() as conn:
                conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            admin.dispose()


def run(engine: sa.Engine, rounds: int, scale: float, chunks: int, notify: bool,
        only: str = "abcd") -> None:
    outbox.create_schema(engine)
    Base.metadata.create_all(engine)
    factory = sessionmaker(engine)
    with factory() as s:
        seed = [Order(customer="seed", amount=0) for _ in range(500)]
        s.add_all(seed)
        visits = [Visit() for _ in range(500)]
        s.add_all(visits)
        s.commit()
        ids = [o.id for o in seed]
        visit_ids = [v.id for v in visits]
    n1 = max(chunks, int(2000 * scale))
    n2 = max(chunks, int(200 * scale))
    workloads = {
        "a": (f"{n1} tx x 1 insert", insert_one, n1),
        "b": (f"{n2} tx x 100 inserts", insert_many, n2),
        "c": (f"{n1} tx x 1 update", make_update_one(ids), n1),
        "d": (f"{n1} tx x 1 read-back", make_update_converted(visit_ids), n1),
    }
    workloads = {k: v for k, v in workloads.items() if k in only}

    def clear_events() -> None:
        with engine.begin() as conn:
            conn.exec_driver_sql("TRUNCATE events")

    def timed(fn: Callable[[sessionmaker[Session], int], None], n: int, capture: bool) -> float:
        handle = outbox.capture(factory, models=[Order, Visit]) if capture else None
        try:
            start = time.perf_counter()
            fn(factory, n)
            return time.perf_counter() - start
        finally:
            if handle is not None:
                handle.remove()

    # Warm up both paths (connections, prepared statements, caches) before measuring.
    for _, fn, n in workloads.values():
        timed(fn, max(1, n // 20), False)
        timed(fn, max(1, n // 20), True)

    results: dict[str, tuple[list[float], list[float]]] = {k: ([], []) for k in workloads}
    for r in range(rounds):
        for key, (_, fn, n) in workloads.items():
            clear_events()
            for c in range(chunks):
                order = (False, True) if (r + c) % 2 == 0 else (True, False)
                for capture in order:
                    results[key][1 if capture else 0].append(timed(fn, n // chunks, capture))

    with engine.connect() as conn:
        version = conn.exec_driver_sql("SHOW server_version").scalar()
    print(f"capture benchmark: PostgreSQL {version} ({engine.dialect.driver}), "
          f"SQLAlchemy {sa.__version__}, "
          f"{rounds} rounds x {chunks} alternating chunks, NOTIFY {'on' if notify else 'off'}")
    if workloads:
        print(f"{'workload':<27}{'baseline s':>11}{'capture s':>11}{'+ms/tx':>8}{'ratio':>7}"
              f"{'best':>7}{'median':>8}{'target':>8}")
    for key, (label, _, n) in workloads.items():
        base, cap = results[key]
        ratio = sum(cap) / sum(base)
        best = min(cap) / min(base)
        median = _median_ratio(base, cap, rounds)
        per_tx = (sum(cap) - sum(base)) / (rounds * chunks * (n // chunks)) * 1000
        target = TARGETS[key]
        verdict = "" if target is None else "ok" if median <= target else "MISS"
        limit = "-" if target is None else f"<={target}"
        print(f"({key}) {label:<23}{sum(base) / rounds:>11.3f}{sum(cap) / rounds:>11.3f}"
              f"{per_tx:>8.3f}{ratio:>7.3f}{best:>7.3f}{median:>8.3f}{limit:>8} {verdict}")
    url = engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
    if "r" in only:
        raw_floor(url, rounds, scale, chunks, ids)
    if "t" in only:
        trigger_cost(url, rounds, scale, chunks)


def _median_ratio(base: list[float], other: list[float], rounds: int) -> float:
    """The median over rounds of each round's total ``other`` / total ``base``."""
    per = len(base) // rounds
    return statistics.median(
        sum(other[i * per:(i + 1) * per]) / sum(base[i * per:(i + 1) * per])
        for i in range(rounds))


# -- the floor: raw psycopg, no ORM ------------------------------------------------------------

_RAW_INSERT = ("INSERT INTO bench_orders (customer, amount, note) "
               "SELECT c, a, n FROM unnest(%(c)s::text[], %(a)s::int[], %(n)s::text[]) "
               "AS x(c, a, n) RETURNING id")
_RAW_SELECT = "SELECT id, customer, amount, note FROM bench_orders WHERE id = %(id)s"
_RAW_UPDATE = "UPDATE bench_orders SET amount = %(amount)s WHERE id = %(id)s"


def _event_rows(op: str, rows: list[dict[str, object]],
                changes: dict[str, object] | None = None) -> str:
    meta = {"changes": changes} if changes else {}
    return json.dumps([{
        "type": f"public.bench_orders.{op}", "schema_name": "public", "entity": "bench_orders",
        "entity_id": str(r["id"]), "operation": op, "metadata": meta, "payload": r,
        "ordering_key": f"public.bench_orders:{r['id']}"} for r in rows], separators=(",", ":"))


def _raw_tx(conn: psycopg.Connection[tuple[object, ...]], shape: str, i: int, ids: list[int],
            how: str) -> None:
    """One business transaction of ``shape`` ("a", "b", "c"); ``how``: "plain" (no event),
    "statement" (the event rows as a statement of their own), "pipeline" (sent with COMMIT)."""
    if shape == "c":
        ident = ids[i % len(ids)]
        row = conn.execute(_RAW_SELECT, {"id": ident}).fetchone()
        assert row is not None
        conn.execute(_RAW_UPDATE, {"id": ident, "amount": row[2] + 1})
        payload: list[dict[str, object]] = [
            {"id": row[0], "customer": row[1], "amount": row[2] + 1, "note": row[3]}]
        doc = _event_rows("update", payload, {"amount": {"old": row[2], "new": row[2] + 1}})
    else:
        k = 1 if shape == "a" else 100
        cs, amounts, notes = [f"c{j % 97}" for j in range(k)], list(range(k)), ["hello"] * k
        new = [r[0] for r in conn.execute(_RAW_INSERT, {"c": cs, "a": amounts, "n": notes})]
        doc = _event_rows("create", [
            {"id": new[j], "customer": cs[j], "amount": amounts[j], "note": notes[j]}
            for j in range(k)])
    if how == "plain":
        conn.commit()
        return
    params = {"rows": doc, "user_id": None, "session_id": None, "instance_id": "bench",
              "now": dt.datetime.now(dt.UTC)}
    if how == "statement":
        conn.execute(PG_INSERT_EVENTS, params)
        conn.commit()
        return
    with conn.pipeline(), conn.cursor() as cur:
        cur.execute(PG_INSERT_EVENTS, params)
        cur.execute("COMMIT", prepare=False)


def _raw_chunks(url: str, rounds: int, chunks: int, shapes: dict[str, tuple[str, int]],
                variants: tuple[str, ...], ids: list[int],
                setup: Callable[[psycopg.Connection[tuple[object, ...]], str], None] | None,
                ) -> dict[str, dict[str, list[float]]]:
    """Time each variant of each shape in alternating chunks, rotating the order per chunk."""
    times: dict[str, dict[str, list[float]]] = {s: {v: [] for v in variants} for s in shapes}
    with psycopg.connect(url) as conn:
        for shape, (_, n) in shapes.items():  # warm up: prepared statements, caches
            for v in variants:
                if setup:
                    setup(conn, v)
                for i in range(max(5, n // 20)):
                    _raw_tx(conn, shape, i, ids, v)
        for r in range(rounds):
            for shape, (_, n) in shapes.items():
                with conn.transaction():
                    conn.execute("TRUNCATE events")
                for c in range(chunks):
                    k = (r + c) % len(variants)
                    for v in variants[k:] + variants[:k]:
                        if setup:
                            setup(conn, v)
                        start = time.perf_counter()
                        for i in range(n // chunks):
                            _raw_tx(conn, shape, c * n + i, ids, v)
                        times[shape][v].append(time.perf_counter() - start)
    return times


def raw_floor(url: str, rounds: int, scale: float, chunks: int, ids: list[int]) -> None:
    n1 = max(chunks, int(2000 * scale))
    n2 = max(chunks, int(200 * scale))
    shapes = {"a": ("1 insert", n1), "b": ("100 inserts", n2), "c": ("1 update", n1)}
    variants = ("plain", "statement", "pipeline")
    times = _raw_chunks(url, rounds, chunks, shapes, variants, ids, None)
    print(f"(r) the floor, raw psycopg {psycopg.__version__}: business transaction + its event "
          f"rows / alone, {rounds} rounds (median of each round's ratio)")
    print(f"{'shape':<16}{'plain ms/tx':>12}{'statement':>11}{'pipelined':>11}"
          f"{'+ms stmt':>10}{'+ms pipe':>10}")
    for shape, (label, n) in shapes.items():
        t = times[shape]
        per = 1000 / (rounds * chunks * (n // chunks))
        plain = sum(t["plain"]) * per
        print(f"({shape}) {label:<12}{plain:>12.3f}"
              f"{_median_ratio(t['plain'], t['statement'], rounds):>11.3f}"
              f"{_median_ratio(t['plain'], t['pipeline'], rounds):>11.3f}"
              f"{sum(t['statement']) * per - plain:>10.3f}"
              f"{sum(t['pipeline']) * per - plain:>10.3f}")


def trigger_cost(url: str, rounds: int, scale: float, chunks: int) -> None:
    """The wake-up trigger: the pipelined 1-row and 100-row transactions with it and without
    it (``session_replication_role = replica`` skips non-ALWAYS triggers), and the plain
    transaction as the reference."""
    n1 = max(chunks, int(2000 * scale))
    n2 = max(chunks, int(200 * scale))
    shapes = {"a": ("1 insert", n1), "b": ("100 inserts", n2)}

    def setup(conn: psycopg.Connection[tuple[object, ...]], variant: str) -> None:
        role = "replica" if variant == "pipeline-off" else "origin"
        conn.execute(f"SET session_replication_role = {role}")  # two fixed values
        conn.commit()

    variants = ("plain", "pipeline", "pipeline-off")
    with psycopg.connect(url) as conn:
        ids = [r[0] for r in conn.execute("SELECT id FROM bench_orders LIMIT 500")]

    times = _raw_chunks(url, rounds, chunks, shapes, variants, ids, setup)
    print(f"(t) the wake-up trigger (NOTIFY on, no listener), pipelined, {rounds} rounds")
    print(f"{'shape':<16}{'with / plain':>14}{'without / plain':>17}{'with / without':>16}"
          f"{'+ms trigger':>13}")
    for shape, (label, n) in shapes.items():
        t = times[shape]
        per = 1000 / (rounds * chunks * (n // chunks))
        print(f"({shape}) {label:<12}{_median_ratio(t['plain'], t['pipeline'], rounds):>14.3f}"
              f"{_median_ratio(t['plain'], t['pipeline-off'], rounds):>17.3f}"
              f"{_median_ratio(t['pipeline-off'], t['pipeline'], rounds):>16.3f}"
              f"{(sum(t['pipeline']) - sum(t['pipeline-off'])) * per:>13.4f}")

if __name__ == "__main__":
    main()
