"""``kill -9`` of a consumer process: nothing is lost, and with ``ack_in`` nothing is handled twice.

The consumer is this module run as a script (``python -m tests.integration.
test_database_provider_crash URL GROUP MODE``): it consumes the group and, for every event, writes
a row to ``handled`` in its own transaction, then acknowledges. The test kills it with SIGKILL in
the middle of the stream, publishes more, starts a second consumer and checks the ``handled``
table.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import anyio
import pytest
import sqlalchemy as sa

import outbox
from outbox.providers.base import StartPosition
from outbox.providers.database import DatabaseDelivery, DatabaseProvider
from tests.helpers import eventually_sync

ROOT = Path(__file__).resolve().parents[2]
BATCH = 20
LEASE = 1.0


def consumer_main(url: str, group: str, mode: str) -> None:
    """The consumer process (see the module docstring)."""

    async def main() -> None:
        provider = DatabaseProvider(url, poll_interval=0.1, lease=LEASE, batch_size=BATCH)
        engine = provider.engine
        async with provider.consume(group=group, consumer=f"pid-{os.getpid()}",
                                    start=StartPosition.BEGINNING) as deliveries:
            async for delivery in deliveries:

                def handle(delivery: DatabaseDelivery = delivery) -> None:
                    with engine.begin() as conn:
                        if mode == "exactly-once" and not delivery.ack_in(conn):
                            return  # handled before: no second effect
                        conn.execute(sa.text("INSERT INTO handled (event_id, pid) "
                                             "VALUES (:id, :pid)"),
                                     {"id": str(delivery.event.id), "pid": os.getpid()})
                    time.sleep(0.002)  # some work after the commit, before the ack

                await anyio.to_thread.run_sync(handle)
                await delivery.ack()

    anyio.run(main)


def _spawn(url: str, group: str, mode: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.integration.test_database_provider_crash", url, group,
         mode],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )


def _counts(engine: sa.Engine) -> tuple[int, int]:
    with engine.connect() as conn:
        total, distinct = conn.execute(
            sa.text("SELECT count(*), count(DISTINCT event_id) FROM handled")).one()
    return int(total), int(distinct)


def _wait_for(engine: sa.Engine, distinct: int, proc: subprocess.Popen[bytes],
              timeout: float = 60.0) -> None:
    def handled() -> bool:
        if proc.poll() is not None:
            err = proc.stderr.read().decode() if proc.stderr else ""
            raise AssertionError(f"consumer exited with {proc.returncode}: {err[-2000:]}")
        return _counts(engine)[1] >= distinct

    eventually_sync(handled, within=timeout, every=0.05,
                    what=lambda: f"{distinct} handled (now {_counts(engine)})")


def _publish(url: str, n: int) -> list[str]:
    async def run() -> list[str]:
        async with DatabaseProvider(url) as provider:
            events = [outbox.new_event("system", "orders.placed", {"n": i}) for i in range(n)]
            await provider.publish_many(events)
            return [str(e.id) for e in events]

    return anyio.run(run)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["at-least-once", "exactly-once"])
def test_kill_9_loses_nothing(pg_url: str, mode: str) -> None:
    engine = sa.create_engine(pg_url)
    outbox.create_schema(engine)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE handled (event_id text NOT NULL, pid int NOT NULL)")
    ids = _publish(pg_url, 300)
    first = _spawn(pg_url, "crash", mode)
    second: subprocess.Popen[bytes] | None = None
    try:
        _wait_for(engine, 80, first)
        os.kill(first.pid, signal.SIGKILL)  # mid-stream: claims held, handlers in flight
        first.wait(10)
        killed_at = _counts(engine)
        ids += _publish(pg_url, 100)  # written while no consumer runs
        second = _spawn(pg_url, "crash", mode)
        _wait_for(engine, len(ids), second)
        time.sleep(3 * LEASE)  # let a wrong redelivery show up
        total, distinct = _counts(engine)
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                proc.wait(10)
    with engine.connect() as conn:
        handled = {r[0] for r in conn.execute(sa.text("SELECT DISTINCT event_id FROM handled"))}
        pids = conn.execute(sa.text("SELECT count(DISTINCT pid) FROM handled")).scalar()
    engine.dispose()
    assert handled == set(ids)  # nothing lost
    assert pids == 2 and killed_at[1] < len(ids)
    duplicates = total - distinct
    if mode == "exactly-once":
        assert duplicates == 0
    else:  # at most what the killed member held: its claims (max_claims * batch_size)
        assert duplicates <= 2 * BATCH


if __name__ == "__main__":
    consumer_main(*sys.argv[1:4])
