"""How long ``alembic upgrade head`` locks ``events`` when it partitions it (revision outbox_0002).

A scratch PostgreSQL database at revision ``outbox_0001`` is filled with N events shaped like
capture's (a small JSON row, a user on most, 30 days of history; ``--unfinished`` of them pending
or failed, the rest completed), vacuumed and analysed, then upgraded with Alembic's own API. The
upgrade takes an exclusive lock on ``events`` first and holds it to its commit, so its duration is
how long writers and relays wait. Then the downgrade back to ``outbox_0001``, timed the same way.

    .venv/bin/python bench/migration.py                          # 1,000,000 and 3,000,000 rows
    .venv/bin/python bench/migration.py --rows 500000 --unfinished 10000
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import sqlalchemy as sa
from _scratch import scratch_database
from alembic import command
from alembic.config import Config

ROOT = Path(__file__).resolve().parents[1]

# Bench-only SQL: constants and bound numbers.
FILL = """
INSERT INTO events (id, source, type, status, payload, user_id, instance_id, schema_name, entity,
    entity_id, operation, created_at, processed_at, completed_at, metadata, retry_count,
    next_attempt_at, ordering_key, lease_owner)
SELECT gen_random_uuid(), 'database', 'public.t' || mod(i, 20) || '.update',
    CASE WHEN i <= %(unfinished)s THEN (CASE WHEN mod(i, 2) = 0 THEN 'failed' ELSE 'pending' END)
         ELSE 'completed' END,
    jsonb_build_object('id', i, 'name', 'user ' || i, 'email', 'user' || i || '@example.com'),
    CASE WHEN mod(i, 5) = 0 THEN NULL ELSE 'u' || mod(i, 5000) END, 'bench', 'public',
    't' || mod(i, 20), i::text, 'update', now() - interval '30 days' + i * interval '1 ms',
    now(), CASE WHEN i > %(unfinished)s OR mod(i, 2) = 0 THEN now() END,
    '{"changes": {"name": {"old": "a", "new": "b"}}}'::jsonb, 0, now(),
    'public.t' || mod(i, 20) || ':' || i, 'relay'
FROM generate_series(%(lo)s::bigint, %(hi)s::bigint) AS i
"""


def config(url: str) -> Config:
    cfg = Config(str(ROOT / "alembic.ini"))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    cfg.attributes["configure_logger"] = False
    return cfg


def one(rows: int, unfinished: int) -> tuple[float, float, float]:
    """(seconds to upgrade, seconds to downgrade, table size in MB)."""
    with scratch_database("outbox_migration") as url:
        cfg = config(url)
        command.upgrade(cfg, "outbox_0001")
        engine = sa.create_engine(url, poolclass=sa.NullPool)
        with engine.begin() as conn:
            for lo in range(1, rows + 1, 500_000):
                conn.exec_driver_sql(FILL, {"lo": lo, "hi": min(rows, lo + 499_999),
                                            "unfinished": unfinished})
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql("VACUUM ANALYZE events")
            conn.exec_driver_sql("CHECKPOINT")
            size = conn.exec_driver_sql(
                "SELECT pg_total_relation_size('events') / 1e6").scalar_one()
        engine.dispose()
        started = time.perf_counter()
        command.upgrade(cfg, "head")
        up = time.perf_counter() - started
        started = time.perf_counter()
        command.downgrade(cfg, "outbox_0001")
        down = time.perf_counter() - started
    return up, down, float(size)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, action="append",
                   help="events in the table (repeatable; default 1,000,000 and 3,000,000)")
    p.add_argument("--unfinished", type=int, default=2000,
                   help="of them pending or failed (the rest completed)")
    args = p.parse_args()
    for rows in args.rows or [1_000_000, 3_000_000]:
        up, down, size = one(rows, args.unfinished)
        print(f"{rows:,} events ({args.unfinished:,} unfinished, {size:,.0f} MB with indexes): "
              f"upgrade {up:.2f} s ({up / rows * 1e6:.2f} s per million), "
              f"downgrade {down:.2f} s ({down / rows * 1e6:.2f} s per million)", flush=True)


if __name__ == "__main__":
    sys.exit(main())
