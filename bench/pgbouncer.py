"""A relay and 4 writers through PgBouncer in transaction pooling, not a test.

Runs a private pgbouncer (Debian's package; transaction pooling, 10 server connections) in front
of the PostgreSQL on 127.0.0.1:5432 and, on a scratch database per round, the load of
``tests/pgbouncer_load.py``: 4 writer threads commit captured rows (5 per transaction) through
PgBouncer while a relay, also through PgBouncer and polling every 50 ms, delivers them to a
handler. Rounds alternate PgBouncer mode on (``pgbouncer=True`` for the relay,
``prepare_threshold=None`` for the writers' engines) and off (psycopg's defaults, as before the
mode existed), and report per round: events committed, completed, handled, the database errors
the relay logged, the writers' failed commits, and the wall time.

    python bench/pgbouncer.py                      # 20,000 events, 2 rounds of each
    python bench/pgbouncer.py --events 5000 --rounds 1 --only on
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import time
from pathlib import Path

import sqlalchemy as sa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.pgbouncer_load import run_load  # noqa: E402
from tests.servers import PrivatePgBouncer  # noqa: E402

ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--writers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2, help="rounds of each mode")
    parser.add_argument("--only", choices=("on", "off"), help="run one mode only")
    args = parser.parse_args()
    modes = [args.only == "on"] if args.only else [True, False]
    admin = sa.create_engine(ADMIN, isolation_level="AUTOCOMMIT", poolclass=sa.NullPool)
    bouncer = PrivatePgBouncer()
    bouncer.start()
    seconds: dict[bool, list[float]] = collections.defaultdict(list)
    print(f"{args.events} events, {args.writers} writers, pgbouncer transaction pooling")
    print(f"{'mode':4} {'committed':>9} {'completed':>9} {'handled':>8} {'relay errors':>12} "
          f"{'failed commits':>14} {'seconds':>8}")
    try:
        for _ in range(args.rounds):
            for mode in modes:
                name = f"outbox_bench_pgb_{int(time.time() * 1000)}"
                with admin.connect() as conn:
                    conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
                try:
                    r = run_load(bouncer.url(name), events=args.events, writers=args.writers,
                                 pgbouncer_mode=mode)
                finally:
                    with admin.connect() as conn:
                        conn.exec_driver_sql(f'DROP DATABASE "{name}" WITH (FORCE)')
                seconds[mode].append(r.seconds)
                print(f"{'on' if mode else 'off':4} {r.events:>9} {r.completed:>9} "
                      f"{r.handled:>8} {len(r.relay_db_errors):>12} {len(r.writer_errors):>14} "
                      f"{r.seconds:>8.1f}", flush=True)
                for message in sorted(set(r.relay_db_errors))[:3]:
                    print(f"     relay: {message}")
    finally:
        bouncer.close()
        admin.dispose()
    for mode, values in seconds.items():
        print(f"median wall time, mode {'on' if mode else 'off'}: "
              f"{statistics.median(values):.1f} s over {len(values)} round(s)")


if __name__ == "__main__":
    main()
