"""cleanup on 100,000 finished rows while writers insert and a relay runs (PostgreSQL)."""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import sys
import threading
import time
import uuid

import sqlalchemy as sa

from outbox import ops
from outbox.events import Event, utcnow
from tests.integration.ops_seed import add, event

OLD = 100_000


def _seed_old_finished(engine: sa.Engine) -> None:
    # generate_series keeps seeding to about a second; the constants are not user input.
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO events (id, source, type, status, payload, instance_id, created_at, "
            "processed_at, completed_at, metadata, retry_count, next_attempt_at, error) "
            "SELECT gen_random_uuid(), 'database', 'public.t' || mod(i, 7) || '.update', "
            "CASE WHEN mod(i, 10) = 0 THEN 'failed' ELSE 'completed' END, '{}'::jsonb, 'seed', "
            "now() - interval '40 days' - i * interval '1 second', now() - interval '40 days', "
            "now() - interval '40 days', '{}'::jsonb, 0, now() - interval '40 days', NULL "
            "FROM generate_series(1, %(n)s) AS i", {"n": OLD}
        )


def test_cleanup_100k_while_writing_and_claiming(pg_engine: sa.Engine) -> None:
    engine = pg_engine
    _seed_old_finished(engine)
    # Old unfinished events the cleanup must keep; not due / leased elsewhere, so the relay
    # leaves them alone too.
    later = utcnow() + dt.timedelta(days=1)
    old_open = [event("t.keep", status=s, age=dt.timedelta(days=40))
                for s in ("pending", "processing") for _ in range(50)]
    for ev in old_open:
        ev.next_attempt_at = later
        if ev.status == "processing":
            ev.lease_owner, ev.lease_token, ev.lease_expires_at = "elsewhere", uuid.uuid4(), later
    add(engine, old_open)
    young = add(engine, [event("t.keep", status="completed", age=dt.timedelta(days=1))
                         for _ in range(200)])

    stop = threading.Event()
    written: list[uuid.UUID] = []
    claimed = [0]
    errors: list[BaseException] = []
    progress = threading.Condition()

    def writer() -> None:
        try:
            while not stop.is_set():
                batch = [event("public.live.create") for _ in range(20)]
                add(engine, batch)
                with progress:
                    written.extend(e.id for e in batch)
                    progress.notify_all()
        except BaseException as exc:  # reported by the test below
            errors.append(exc)

    def completed_live() -> int:
        with engine.connect() as conn:
            return int(conn.execute(
                sa.select(sa.func.count()).select_from(Event)
                .where(Event.type == "public.live.create", Event.status == "completed")
            ).scalar_one())

    def watch_relay() -> None:
        # the relay runs in its own process; report its progress to the waiting test
        try:
            while not stop.is_set():
                n = completed_live()
                with progress:
                    claimed[0] = n
                    progress.notify_all()
                time.sleep(0.02)
        except BaseException as exc:
            errors.append(exc)

    def interleave(_: ops.CleanupResult) -> None:
        # After each of the first batches, let the writer and the relay make progress: they
        # must not be held up by the cleanup between (or during) its transactions.
        if _.batches > 5:
            return
        with progress:
            w, c = len(written), claimed[0]
            moved = progress.wait_for(
                lambda: (len(written) > w and claimed[0] > c) or bool(errors), timeout=60)
            assert moved, "writer/relay made no progress"

    url = engine.url.render_as_string(hide_password=False)
    relay = subprocess.Popen(
        [sys.executable, "-m", "outbox.relay", "--database-url", url, "--poll-interval", "0.05",
         "--log-level", "WARNING"],
        env={k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")},
    )
    threads = [threading.Thread(target=writer), threading.Thread(target=watch_relay)]
    for th in threads:
        th.start()
    try:
        with progress:
            assert progress.wait_for(lambda: claimed[0] > 0 or bool(errors), timeout=60)
        result = ops.cleanup(engine, older_than=dt.timedelta(days=30), batch_size=5000,
                             progress=interleave)
    finally:
        stop.set()
        for th in threads:
            th.join(60)
        relay.send_signal(signal.SIGTERM)
        relay_exit = relay.wait(60)
    assert not errors, errors
    assert relay_exit == 0
    assert result.deleted == OLD
    assert result.by_status == {"completed": 90_000, "failed": 10_000}
    assert result.batches >= OLD // 5000
    with engine.connect() as conn:
        left = dict(conn.execute(sa.select(Event.id, Event.status)).all())
    assert len(left) == len(old_open) + len(young) + len(written)
    assert all(left[e.id] == e.status for e in old_open + young)
    assert all(i in left for i in written)
    assert claimed[0] > 0
