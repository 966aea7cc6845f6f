"""The relay as real sidecar processes on PostgreSQL: kill -9, several relays, SIGTERM under load.

Every relay runs ``python -m outbox.relay --app tests.integration.relay_app``, whose handler
records each event it handles (id, key, seq, and a global serial) in a ``handled`` table, committed
before the handler returns. The checks read the events table and that record.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

import outbox
from outbox.events import Event, get_instance_id, utcnow
from tests.helpers import eventually_sync

pytestmark = pytest.mark.slow

# The table relay_app's handler records into (one row per handler call, in call order).
TABLE_DDL = """
CREATE TABLE IF NOT EXISTS handled (
    n bigserial PRIMARY KEY,
    event_id uuid NOT NULL,
    ordering_key text,
    seq bigint NOT NULL,
    pid int NOT NULL
)
"""

ROOT = Path(__file__).resolve().parents[2]
N = 20_000
BATCH = 200


def _libpq(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


@pytest.fixture
def db(pg_url: str) -> Iterator[sa.Engine]:
    engine = sa.create_engine(pg_url)
    outbox.create_schema(engine)
    with engine.begin() as c:
        c.exec_driver_sql(TABLE_DDL)
    yield engine
    engine.dispose()


def seed(engine: sa.Engine, n: int, keys: int = 400) -> None:
    """``n`` pending events: 80% spread over ``keys`` ordering keys, 20% without a key."""
    now = utcnow()
    instance = get_instance_id()
    rows = [
        {
            "id": uuid.uuid4(), "source": "system", "type": "test.torture.create",
            "status": "pending", "payload": {"i": i}, "instance_id": instance,
            "created_at": now, "meta": {}, "retry_count": 0, "next_attempt_at": now,
            "ordering_key": None if i % 5 == 0 else f"key-{i % keys}",
        }
        for i in range(n)
    ]
    with engine.begin() as c:
        for start in range(0, n, 5000):
            c.execute(sa.insert(Event), rows[start:start + 5000])


def relay(url: str, *extra: str, sleep: float = 0.0) -> subprocess.Popen[bytes]:
    env = {**os.environ, "RELAY_TEST_RECORD_URL": _libpq(url)}
    if sleep:
        env["RELAY_TEST_SLEEP"] = str(sleep)
    env.pop("OUTBOX_CONFIG", None)
    return subprocess.Popen(
        [sys.executable, "-m", "outbox.relay", "--database-url", url,
         "--app", "tests.integration.relay_app", "--batch-size", str(BATCH),
         "--poll-interval", "0.2", "--log-level", "WARNING", *extra],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )


def status_counts(engine: sa.Engine) -> dict[str, int]:
    with engine.connect() as c:
        return dict(c.execute(sa.text("SELECT status, count(*) FROM events GROUP BY status"))
                    .all())  # type: ignore[arg-type]


def wait_completed(engine: sa.Engine, n: int, limit: float = 120.0) -> None:
    eventually_sync(lambda: status_counts(engine) == {"completed": n}, within=limit, every=0.2,
                    what=lambda: f"all {n} completed: {status_counts(engine)}")


def handled(engine: sa.Engine) -> tuple[int, int]:
    """(rows recorded, distinct events recorded)."""
    with engine.connect() as c:
        total, distinct = c.execute(sa.text(
            "SELECT count(*), count(DISTINCT event_id) FROM handled")).one()
    return int(total), int(distinct)


def assert_key_order(engine: sa.Engine) -> None:
    """Per key, handlers ran in seq order (``n`` is the order in which handlers recorded)."""
    with engine.connect() as c:
        bad = c.execute(sa.text("""
            SELECT count(*) FROM (
                SELECT seq, lag(seq) OVER (PARTITION BY ordering_key ORDER BY n) AS prev
                FROM handled WHERE ordering_key IS NOT NULL
            ) x WHERE prev IS NOT NULL AND prev >= seq
        """)).scalar_one()
    assert bad == 0, f"{bad} events handled before an earlier event of their key"


def stop(proc: subprocess.Popen[bytes], limit: float = 30.0) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(limit)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_kill_minus_nine_repeatedly_loses_nothing(db: sa.Engine, pg_url: str) -> None:
    seed(db, N)
    rng = random.Random(4)
    kills = 0
    proc = relay(pg_url, "--lease", "1.5", sleep=0.0005)
    try:
        while kills < 10:
            # kill it in the middle of its work: once it has handled something, after a
            # random extra moment
            before = handled(db)[0]

            def working(proc: subprocess.Popen[bytes] = proc, before: int = before) -> bool:
                assert proc.poll() is None, "the relay exited on its own"
                return (handled(db)[0] != before
                        or status_counts(db).get("completed", 0) >= N)

            eventually_sync(working, what="the relay to handle something")
            time.sleep(rng.uniform(0.0, 0.4))  # a random moment into its work: under test
            if status_counts(db).get("completed", 0) == N:
                break
            proc.kill()
            proc.wait(10)
            kills += 1
            proc = relay(pg_url, "--lease", "1.5", sleep=0.0005)
        wait_completed(db, N)
        assert stop(proc) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert kills >= 10, "the relays finished before ten kills: make the handler slower"
    total, distinct = handled(db)
    assert distinct == N  # every event handled at least once
    assert total - distinct <= kills * BATCH  # duplicates: at most one batch per kill
    assert status_counts(db) == {"completed": N}  # nothing stuck in processing


@pytest.mark.parametrize("relays", [2, 4])
def test_several_relays_share_the_work_once_each_in_key_order(
    db: sa.Engine, pg_url: str, relays: int
) -> None:
    seed(db, N)
    procs = [relay(pg_url) for _ in range(relays)]
    try:
        wait_completed(db, N)
    finally:
        codes = [stop(p) for p in procs]
    assert codes == [0] * relays, [p.stderr.read().decode()[-2000:] for p in procs if p.stderr]
    total, distinct = handled(db)
    assert (total, distinct) == (N, N)  # no event handled twice
    with db.connect() as c:
        pids = c.execute(sa.text("SELECT count(DISTINCT pid) FROM handled")).scalar_one()
    assert pids == relays  # every relay did part of the work
    assert_key_order(db)


def test_sigterm_under_load_exits_zero_and_loses_nothing(db: sa.Engine, pg_url: str) -> None:
    n = 5000
    seed(db, n)
    proc = relay(pg_url, sleep=0.002)
    try:
        def under_load() -> bool:
            assert proc.poll() is None, "the relay exited on its own"
            return handled(db)[0] >= 300

        eventually_sync(under_load, within=60, every=0.05, what="300 events handled")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    counts = status_counts(db)
    assert "processing" not in counts and "failed" not in counts
    assert 0 < counts.get("completed", 0) < n
    with db.connect() as c:
        leased = c.execute(sa.text(
            "SELECT count(*) FROM events WHERE lease_token IS NOT NULL")).scalar_one()
        unrecorded = c.execute(sa.text(
            "SELECT count(*) FROM events e WHERE status = 'completed' "
            "AND NOT EXISTS (SELECT 1 FROM handled h WHERE h.event_id = e.id)")).scalar_one()
    assert leased == 0 and unrecorded == 0
    # a second run finishes the rest; a clean stop handed back only unstarted events
    again = relay(pg_url, "--once")
    assert again.wait(120) == 0
    assert status_counts(db) == {"completed": n}
    assert handled(db) == (n, n)
    assert_key_order(db)
