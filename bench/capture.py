"""What capture costs: the same ORM workload with and without ``outbox.capture`` (PostgreSQL).

Workloads (one new Session per transaction, like a web request):

  (a) 2,000 transactions inserting 1 row          target ratio <= 1.25
  (b)   200 transactions inserting 100 rows       target ratio <= 1.15
  (c) 2,000 transactions updating 1 loaded row    target ratio <= 1.25
  (d) 2,000 transactions updating 1 loaded row whose new value the database converts (a
      datetime in a Date column): capture reads the stored value back, one more SELECT per
      flush — the cost of the read-back (no target; compare with (c))

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
"""

from __future__ import annotations

import argparse
import datetime as dt
import signal
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import outbox

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
    parser.add_argument("--only", default="abcd", help="workloads to run (default: abcd)")
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
    print(f"{'workload':<27}{'baseline s':>11}{'capture s':>11}{'+ms/tx':>8}{'ratio':>7}"
          f"{'best':>7}{'target':>8}")
    for key, (label, _, n) in workloads.items():
        base, cap = results[key]
        ratio = sum(cap) / sum(base)
        best = min(cap) / min(base)
        per_tx = (sum(cap) - sum(base)) / (rounds * chunks * (n // chunks)) * 1000
        target = TARGETS[key]
        verdict = "" if target is None else "ok" if ratio <= target else "MISS"
        limit = "-" if target is None else f"<={target}"
        print(f"({key}) {label:<23}{sum(base) / rounds:>11.3f}{sum(cap) / rounds:>11.3f}"
              f"{per_tx:>8.3f}{ratio:>7.3f}{best:>7.3f}{limit:>8} {verdict}")


if __name__ == "__main__":
    main()
