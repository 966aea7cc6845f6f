"""Behind a real PgBouncer (Debian's package) in transaction pooling: PgBouncer mode.

Consecutive transactions of one client connection may run on different server connections, so
psycopg's automatic prepared statements fail ("prepared statement "_pg3_0" does not exist" /
"… already exists"), session ``SET``\\s leak or vanish, and ``LISTEN`` never hears anything.
PgBouncer mode (``pgbouncer=True`` / ``--pgbouncer``) avoids all three. The figures over 20,000
events, with the same load without the mode for contrast: ``bench/pgbouncer.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import anyio
import pytest
import sqlalchemy as sa

import outbox
from outbox import cli
from outbox.providers.memory import MemoryProvider
from outbox.relay import Relay
from tests.helpers import eventually
from tests.pgbouncer_load import run_load
from tests.servers import PrivatePgBouncer

ROOT = Path(__file__).resolve().parents[2]


def through(pgbouncer: PrivatePgBouncer, pg_url: str) -> str:
    return pgbouncer.url(sa.make_url(pg_url).database or "")


def quiet_broker() -> outbox.Broker:
    """A broker of the test's own (the relay would otherwise create the default one)."""
    return outbox.Broker(MemoryProvider())


def test_a_relay_and_four_writers_through_pgbouncer_complete_every_event_without_errors(
    private_pgbouncer: PrivatePgBouncer, pg_url: str
) -> None:
    result = run_load(through(private_pgbouncer, pg_url), events=20_000, writers=4)
    assert result.writer_errors == []
    assert result.relay_db_errors == []
    assert (result.events, result.completed, result.handled) == (20_000, 20_000, 20_000)


def test_the_relay_polls_through_pgbouncer_and_listens_on_a_direct_url(
    private_pgbouncer: PrivatePgBouncer, pg_url: str
) -> None:
    url = through(private_pgbouncer, pg_url)
    polling = Relay(url, pgbouncer=True, broker=quiet_broker())
    assert polling.notify is False  # LISTEN through the pooler would never hear anything
    listening = Relay(url, pgbouncer=True, listen_url=pg_url, poll_interval=30,
                      broker=quiet_broker())
    assert listening.notify is True and str(listening.listen_url) == pg_url
    engine = sa.create_engine(url, connect_args={"prepare_threshold": None})
    outbox.create_schema(engine)

    async def main() -> int:
        async with anyio.create_task_group() as tg:
            tg.start_soon(listening.run)
            await eventually(lambda: listening.stats.listener_connected, within=20)
            with sa.orm.Session(engine) as s:  # written through PgBouncer
                s.add(outbox.new_event("system", "t.woken"))
                s.commit()
            # poll_interval is 30 s: only the notification can wake the relay this soon
            await eventually(lambda: listening.stats.completed >= 1, within=20)
            listening.stop()
        return int(listening.stats.notifications)

    try:
        assert anyio.run(main) >= 1
    finally:
        engine.dispose()
        polling.engine.dispose()


def test_the_relay_sets_nothing_per_session_in_pgbouncer_mode(
    private_pgbouncer: PrivatePgBouncer, pg_url: str
) -> None:
    """A session SET would stay on the server connection for whichever client gets it next."""
    engine = sa.create_engine(pg_url)
    outbox.create_schema(engine)
    engine.dispose()
    for pgbouncer, expected in ((False, "off"), (True, "on")):
        relay = Relay(through(private_pgbouncer, pg_url) if pgbouncer else pg_url,
                      pgbouncer=pgbouncer, broker=quiet_broker())
        try:
            anyio.run(relay.drain)  # a claim: its settings are SET LOCAL in pgbouncer mode
            with relay.engine.connect() as conn:
                assert conn.exec_driver_sql("SHOW synchronous_commit").scalar() == expected
                prepare = conn.connection.driver_connection.prepare_threshold
                assert prepare == (None if pgbouncer else 5)
        finally:
            relay.engine.dispose()


def test_the_cli_runs_through_pgbouncer(
    private_pgbouncer: PrivatePgBouncer, pg_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    engine = sa.create_engine(pg_url)
    outbox.create_schema(engine)
    with sa.orm.Session(engine) as s:
        s.add_all([outbox.new_event("system", f"t.{i}") for i in range(3)])
        s.commit()
    engine.dispose()
    url = through(private_pgbouncer, pg_url)
    for _ in range(8):  # past psycopg's default prepare threshold (5) on one connection
        assert cli.main(["--database-url", url, "--pgbouncer", "stats", "--json"]) == 0
    assert '"pending": 3' in capsys.readouterr().out


@pytest.mark.parametrize(("query", "message"), [
    ("prepare_threshold=abc", "prepare_threshold='abc': expected a whole number"),
    ("prepare_threshold=0", "prepare_threshold=0 prepares every statement"),
    ("autocommit=true", "option 'autocommit' is not supported"),
])
def test_driver_options_in_the_url_are_converted_or_refused_in_one_line(
    pg_url: str, query: str, message: str
) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "outbox.relay", "--once", "--database-url", f"{pg_url}?{query}"],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
        env={**os.environ, "OUTBOX_CONFIG": ""})
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and message in done.stderr, done.stderr


def test_prepare_threshold_in_the_url_is_a_number_or_none(pg_url: str) -> None:
    from outbox._engines import create_engine, engine_args

    url, args = engine_args(f"{pg_url}?prepare_threshold=none&connect_timeout=5")
    assert args == {"prepare_threshold": None}
    assert dict(url.query) == {"connect_timeout": "5"}  # libpq options stay in the URL
    assert engine_args(f"{pg_url}?prepare_threshold=12")[1] == {"prepare_threshold": 12}
    assert engine_args(pg_url, pgbouncer=True)[1] == {"prepare_threshold": None}
    # PgBouncer >= 1.21 with max_prepared_statements: the URL may ask for them anyway
    assert engine_args(f"{pg_url}?prepare_threshold=5", pgbouncer=True)[1] == {
        "prepare_threshold": 5}
    with pytest.raises(outbox.exceptions.ConfigError, match="PgBouncer mode is for PostgreSQL"):
        engine_args("sqlite:///x.db", pgbouncer=True)
    engine = create_engine(f"{pg_url}?prepare_threshold=none")
    try:
        with engine.connect() as conn:
            assert conn.connection.driver_connection.prepare_threshold is None
    finally:
        engine.dispose()
