"""Console page timings on a large events table, not a test. PostgreSQL on 127.0.0.1.

Seeds N events (default 5,000,000) into a scratch database with ``INSERT … SELECT
generate_series`` (indexes built after the load), starts ``python -m outbox console`` on it, and
times every page over HTTP (keep-alive client, ``--requests`` per page per round, pages
alternating within each round), then prints p50/p95 per page and the ``EXPLAIN (ANALYZE,
BUFFERS)`` of every statement each page runs (captured from the same query functions).

    .venv/bin/python bench/console.py                      # 5,000,000 events, 5 rounds
    .venv/bin/python bench/console.py --events 500000 --rounds 3 --no-explain
    .venv/bin/python bench/console.py --screenshot docs/console.png   # also the README picture

The scratch database ``outbox_bench_console`` is kept for the next run (seeding takes minutes);
``--reseed`` rebuilds it, ``--drop`` removes it at the end.

The data: events written over 30 days (created_at grows with seq), the last hour busier
(--hour events); 20 tables x create/update/delete; 0.5 % failed with 7 distinct errors (each
with an ordering key: a blocked key each), the newest 2,000 pending, 10 processing; 50,000
users, a session per 20 events, 1,000,000 entity ids; two database-bus consumer groups (one
5,000 events behind, one far behind) and 100 dead letters.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import statistics
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import sqlalchemy as sa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import outbox  # noqa: E402
from outbox import ops  # noqa: E402
from outbox._sql import console as ops_console  # noqa: E402
from outbox._sql.ddl import PG_SECONDARY_INDEXES  # noqa: E402
from outbox.providers.base import EventFilter  # noqa: E402
from outbox.schema import drop_schema  # noqa: E402

#: The entity of entity id 54323 (the one the entity pages ask for).
ENTITY = "invoices"
ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
NAME = "outbox_bench_console"
TOKEN = "bench-console-token"

#: Table names of the seeded events (event types public.<name>.<operation>).
ENTITIES = ["users", "orders", "order_items", "invoices", "payments", "shipments", "products",
            "carts", "customers", "addresses", "refunds", "coupons", "subscriptions",
            "accounts", "reviews", "stock", "warehouses", "returns", "notes", "tickets"]
ERRORS = [
    "billing.charge: CardDeclined: insufficient funds",
    "mailer.send_receipt: SMTPServerDisconnected: Connection unexpectedly closed",
    "search.index: ConnectionError: search:9200 unreachable",
    "crm.sync: HTTPError: 429 Too Many Requests",
    "billing.charge: KeyError: 'vat_rate'",
    "warehouse.reserve: TimeoutError",
    "analytics.track: ValueError: invalid amount -1",
]


def _array(values: list[str]) -> str:
    return "ARRAY[" + ", ".join("'" + v.replace("'", "''") + "'" for v in values) + "]"


# Bench-only SQL with constants (no user input).
SEED = """
INSERT INTO events (id, source, type, status, payload, user_id, session_id, instance_id,
    schema_name, entity, entity_id, operation, created_at, processed_at, completed_at, error,
    metadata, retry_count, next_attempt_at, ordering_key, lease_owner)
SELECT gen_random_uuid(), 'database',
    'public.' || (%(entities)s)[1 + mod(i, 20)] || '.' || op, st,
    jsonb_build_object('id', mod(i, 1000000), 'name', 'name ' || i, 'password', 'pw' || i),
    'u' || mod(i, 50000), 's' || (i / 20), 'app-' || (i / 500000),
    'public', (%(entities)s)[1 + mod(i, 20)], (mod(i, 1000000))::text, op, at,
    CASE WHEN st IN ('completed', 'failed', 'processing') THEN at + interval '20 ms' END,
    CASE WHEN st IN ('completed', 'failed') THEN at + interval '50 ms' END,
    CASE WHEN st = 'failed' THEN (%(errors)s)[1 + mod(i / 200, 7)] END,
    CASE WHEN op = 'update' THEN jsonb_build_object('changes', jsonb_build_object(
        'name', jsonb_build_object('old', 'name ' || (i - 1), 'new', 'name ' || i)))
        ELSE '{}'::jsonb END,
    CASE WHEN st = 'failed' THEN 3 ELSE 0 END, at,
    'public.' || (%(entities)s)[1 + mod(i, 20)] || ':' || mod(i, 1000000),
    CASE WHEN st IN ('completed', 'failed', 'processing') THEN 'relay-' || mod(i, 3) END
FROM (
    SELECT i,
        (ARRAY['create', 'update', 'delete'])[1 + mod(i, 3)] AS op,
        CASE WHEN i > %(n)s - 2000 THEN 'pending'
             WHEN i > %(n)s - 2010 THEN 'processing'
             WHEN mod(i, 200) = 7 THEN 'failed'
             ELSE 'completed' END AS st,
        CASE WHEN i <= %(n)s - %(hour)s
             THEN now() - interval '30 days' + (interval '30 days' - interval '1 hour')
                  * (i::float8 / (%(n)s - %(hour)s))
             ELSE now() - interval '1 hour'
                  * ((%(n)s - i)::float8 / %(hour)s) END AS at
    FROM generate_series(%(lo)s, %(hi)s) AS i
) AS g
"""
GROUPS = """
INSERT INTO outbox_consumers (group_name, batch, claimed, batch_end, created_at, updated_at)
SELECT 'billing', pg_current_snapshot()::text, max(seq) - 5000, max(seq), now(), now()
FROM events
UNION ALL
SELECT 'analytics', pg_current_snapshot()::text, 1000, max(seq), now(), now() FROM events
"""
DEAD = """
INSERT INTO outbox_dead_letters (group_name, event_id, error, attempt, parked_at)
SELECT 'billing', id, 'parse error: unexpected field', 10, created_at
FROM events WHERE seq %% 50000 = 3 LIMIT 100
"""


@contextlib.contextmanager
def database(url: str | None, reseed: bool, drop: bool) -> Iterator[tuple[str, bool]]:
    """(url, needs seeding)."""
    if url:
        yield url, reseed
        return
    admin = sa.create_engine(ADMIN, isolation_level="AUTOCOMMIT", poolclass=sa.NullPool)
    with admin.connect() as conn:
        exists = conn.exec_driver_sql(
            "SELECT 1 FROM pg_database WHERE datname = %(n)s", {"n": NAME}).first()
        if exists and reseed:
            conn.exec_driver_sql(f'DROP DATABASE "{NAME}" WITH (FORCE)')
        if not exists or reseed:
            conn.exec_driver_sql(f'CREATE DATABASE "{NAME}"')
    try:
        yield ADMIN.rsplit("/", 1)[0] + f"/{NAME}", not exists or reseed
    finally:
        if drop:
            with admin.connect() as conn:
                conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{NAME}" WITH (FORCE)')
        admin.dispose()


def seeded_count(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        if not sa.inspect(conn).has_table("events"):
            return 0
        return int(conn.exec_driver_sql("SELECT count(*) FROM events").scalar_one())


def seed(engine: sa.Engine, n: int, hour: int) -> None:
    started = time.perf_counter()
    drop_schema(engine)
    outbox.create_schema(engine)
    with engine.begin() as conn:  # load without the secondary indexes, build them after
        for name, _ddl in PG_SECONDARY_INDEXES:
            conn.exec_driver_sql(f'DROP INDEX "{name}"')
    chunk = 1_000_000
    for lo in range(1, n + 1, chunk):
        with engine.begin() as conn:
            conn.exec_driver_sql("SET LOCAL synchronous_commit = off")
            sql = SEED.replace("%(entities)s", _array(ENTITIES)).replace(
                "%(errors)s", _array(ERRORS).replace("%", "%%"))
            conn.exec_driver_sql(sql, {"n": n, "hour": hour, "lo": lo,
                                       "hi": min(n, lo + chunk - 1)})
        print(f"  seeded {min(n, lo + chunk - 1):,} rows ({time.perf_counter() - started:.0f} s)",
              flush=True)
    with engine.begin() as conn:
        conn.exec_driver_sql("SET LOCAL maintenance_work_mem = '512MB'")
        for _name, ddl in PG_SECONDARY_INDEXES:
            conn.exec_driver_sql(ddl)
        conn.exec_driver_sql(GROUPS)
        conn.exec_driver_sql(DEAD)
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql("VACUUM ANALYZE")
    print(f"  indexes built, vacuumed: {time.perf_counter() - started:.0f} s", flush=True)


def samples(engine: sa.Engine) -> dict[str, Any]:
    """Values the pages ask for: ids, a cursor deep in the history, a failure group."""
    with engine.connect() as conn:
        middle = conn.execute(sa.text(
            "SELECT id, seq, created_at FROM events WHERE seq = (SELECT max(seq) / 2 FROM events)"
        )).one()
        group = ops_console.failure_groups(conn, 1)[0]
    return {"id": str(middle.id), "cursor": str(ops_console.Cursor(middle.created_at,
                                                                    middle.seq)),
            "group": group}


def pages(s: dict[str, Any]) -> list[tuple[str, str, dict[str, str] | None]]:
    """(name, path, form for a POST or None)."""
    q = urllib.parse.urlencode
    group = s["group"]
    return [
        ("trail, newest", "/events", None),
        ("trail, page deep in history", "/events?" + q({"before": s["cursor"]}), None),
        ("trail, type pattern", "/events?type=public.orders.*", None),
        ("trail, status failed", "/events?status=failed", None),
        ("trail, user", "/events?user_id=u4242", None),
        ("trail, session", "/events?session_id=s123456", None),
        ("trail, instance", "/events?instance_id=app-3", None),
        ("trail, entity + id", f"/events?entity={ENTITY}&entity_id=54323", None),
        ("trail, operation", "/events?operation=delete", None),
        ("trail, a day two weeks ago", "/events?since=15d&until=14d", None),
        ("trail, type + status + since", "/events?type=public.orders.update"
                                         "&status=completed&since=7d", None),
        ("entity timeline", f"/entity?entity={ENTITY}&id=54323&schema=public", None),
        ("event", f"/events/{s['id']}", None),
        ("failures", "/failures", None),
        ("replay preview (group)", "/failures/replay", {"type": group.type,
                                                        "error": group.error}),
        ("replay preview (filter)", "/replay", {"status": "failed", "type": "public.orders.*",
                                                "since": "1d"}),
        ("health", "/health", None),
        ("health, live part", "/health?live=1", None),
    ]


@contextlib.contextmanager
def console_process(url: str) -> Iterator[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")}
    env["OUTBOX_CONSOLE_TOKEN"] = TOKEN
    env["OUTBOX_CONSOLE_REDACT"] = "payload.password"
    proc = subprocess.Popen([sys.executable, "-m", "outbox", "--database-url", url, "console",
                             "--port", "0"], env=env, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    try:
        yield line.split(" on ", 1)[1].split("/ ", 1)[0]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def csrf(client: httpx.Client) -> str:
    html = client.get("/failures").text
    return html.split('name="csrf" value="', 1)[1].split('"', 1)[0]


def time_pages(base: str, todo: list[tuple[str, str, dict[str, str] | None]], rounds: int,
               requests: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name, _, _ in todo}
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {TOKEN}"},
                      timeout=60) as client:
        token = csrf(client)
        for name, path, form in todo:  # warm-up: one of each, not timed
            r = (client.post(path, data={**form, "csrf": token}) if form is not None
                 else client.get(path))
            assert r.status_code == 200, (name, r.status_code, r.text[:300])
        for _ in range(rounds):
            for _ in range(requests):
                for name, path, form in todo:
                    started = time.perf_counter()
                    if form is not None:
                        r = client.post(path, data={**form, "csrf": token})
                    else:
                        r = client.get(path)
                    times[name].append(time.perf_counter() - started)
                    assert r.status_code == 200, (name, r.status_code)
    return times


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p * (len(ordered) - 1)))]


def explain_all(engine: sa.Engine, s: dict[str, Any]) -> None:
    """EXPLAIN ANALYZE every statement the pages' query functions run."""
    group = s["group"]
    now = outbox.events.utcnow()
    from datetime import timedelta

    calls: list[tuple[str, Callable[[sa.Connection], Any]]] = [
        ("trail, newest", lambda c: ops_console.trail_page(c, limit=50)),
        ("trail, deep page", lambda c: ops_console.trail_page(
            c, before=ops_console.Cursor.parse(s["cursor"]), limit=50)),
        ("trail, type pattern", lambda c: ops_console.trail_page(
            c, EventFilter(type="public.orders.*"), limit=50)),
        ("trail, status failed", lambda c: ops_console.trail_page(
            c, EventFilter(status="failed"), limit=50)),
        ("trail, user", lambda c: ops_console.trail_page(c, EventFilter(user_id="u4242"))),
        ("trail, session", lambda c: ops_console.trail_page(
            c, EventFilter(session_id="s123456"))),
        ("trail, instance", lambda c: ops_console.trail_page(
            c, EventFilter(instance_id="app-3"))),
        ("trail, entity + id", lambda c: ops_console.trail_page(
            c, EventFilter(entity=ENTITY, entity_id="54323"))),
        ("trail, operation", lambda c: ops_console.trail_page(
            c, EventFilter(operation="delete"))),
        ("trail, a day two weeks ago", lambda c: ops_console.trail_page(
            c, EventFilter(start_time=now - timedelta(days=15),
                           end_time=now - timedelta(days=14)))),
        ("trail, type + status + since", lambda c: ops_console.trail_page(
            c, EventFilter(type="public.orders.update", status="completed",
                           start_time=now - timedelta(days=7)))),
        ("entity timeline", lambda c: ops_console.entity_timeline(
            c, ENTITY, "54323", schema_name="public")),
        ("event", lambda c: ops.get_event(c, s["id"])),
        ("failures", lambda c: (ops_console.failure_groups(c),
                                ops_console.blocked_key_details(c), ops_console.failed_count(c))),
        ("replay preview (group)", lambda c: ops_console.failure_group_count(
            c, group.type, group.error)),
        ("health", ops_console.health_figures),
        ("type suggestions (cached 60 s)", ops_console.known_types),
    ]
    captured: list[tuple[str, Any]] = []

    def capture(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any,
                executemany: bool) -> None:
        if not statement.lstrip().upper().startswith(("EXPLAIN", "SELECT SET_CONFIG")):
            captured.append((statement, parameters))

    sa.event.listen(engine, "before_cursor_execute", capture)
    try:
        for name, call in calls:
            captured.clear()
            with engine.connect() as conn:
                call(conn)
            statements = list(captured)
            print(f"\n### {name}: {len(statements)} statement(s)")
            for statement, parameters in statements:
                if "pg_catalog" in statement:
                    continue  # SQLAlchemy's has_table() catalog look-ups
                with engine.connect() as conn:
                    plan = conn.exec_driver_sql(
                        "EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) " + statement, parameters
                    ).scalars().all()
                print("    " + " ".join(statement.split())[:400])
                for line in plan:
                    print("      " + line)
    finally:
        sa.event.remove(engine, "before_cursor_execute", capture)


def screenshot(base: str, path: str, page_path: str) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path="/usr/bin/chromium", headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync"])  # a fresh temporary profile: launch() makes one
        context = browser.new_context(
            viewport={"width": 1280, "height": 760}, device_scale_factor=1,
            extra_http_headers={"Authorization": f"Bearer {TOKEN}"})
        page = context.new_page()
        page.goto(base + page_path)
        page.screenshot(path=path)
        browser.close()
    print(f"screenshot of {page_path}: {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database-url", help="PostgreSQL URL (default: the scratch database)")
    parser.add_argument("--events", type=int, default=5_000_000)
    parser.add_argument("--hour", type=int, default=100_000,
                        help="of which written in the last hour (default 100,000)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=10, help="per page per round")
    parser.add_argument("--reseed", action="store_true")
    parser.add_argument("--drop", action="store_true", help="drop the scratch database after")
    parser.add_argument("--no-explain", action="store_true")
    parser.add_argument("--screenshot", metavar="PNG", help="also save a screenshot")
    parser.add_argument("--screenshot-page", default="/events?type=public.orders.*",
                        help="the page to screenshot")
    args = parser.parse_args()
    with database(args.database_url, args.reseed, args.drop) as (url, fresh):
        engine = sa.create_engine(url)
        if fresh or seeded_count(engine) != args.events:
            print(f"seeding {args.events:,} events", flush=True)
            seed(engine, args.events, args.hour)
        s = samples(engine)
        todo = pages(s)
        with console_process(url) as base:
            print(f"console at {base}; {len(todo)} pages x {args.requests} requests x "
                  f"{args.rounds} rounds", flush=True)
            times = time_pages(base, todo, args.rounds, args.requests)
            if args.rounds:
                report(todo, times, args.rounds * args.requests)
            if args.screenshot:
                screenshot(base, args.screenshot, args.screenshot_page)
        if not args.no_explain:
            explain_all(engine, s)
        engine.dispose()


def report(todo: list[tuple[str, str, dict[str, str] | None]], times: dict[str, list[float]],
           n: int) -> None:
    print(f"\n{'page':34} {'p50 ms':>8} {'p95 ms':>8} {'max ms':>8}   (n per page: {n})")
    for name, _, _ in todo:
        values = times[name]
        print(f"{name:34} {statistics.median(values) * 1000:8.1f} "
              f"{pct(values, 0.95) * 1000:8.1f} {max(values) * 1000:8.1f}", flush=True)


if __name__ == "__main__":
    main()
