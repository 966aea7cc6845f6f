"""``python -m outbox.consume`` as a real process: consume, SIGTERM, inbox, startup errors."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
import sqlalchemy as sa

from outbox import new_event, wire
from outbox.events import Event
from outbox.providers.nats import NATSProvider
from outbox.providers.redis import RedisProvider
from tests.bus_helpers import (
    ROOT,
    handled,
    start_consumer,
    write_app,
    write_config,
)
from tests.conftest import NatsNames
from tests.helpers import eventually_sync


def _events(n: int, **payload: Any) -> list[Event]:
    return [new_event(source="database", type="public.users.create", payload={"i": i, **payload})
            for i in range(n)]


@pytest.fixture(params=["redis", "nats"])
def bus(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, Any]:
    """Config file + a provider factory for one stream of the test's own."""
    write_app(tmp_path)
    if request.param == "redis":
        url = request.getfixturevalue("redis_url")
        stream = f"{request.getfixturevalue('redis_prefix')}:events"
        config = write_config(tmp_path, provider="redis", redis_url=url, stream=stream)

        def make() -> Any:
            return RedisProvider(url, stream_name=stream)
    else:
        url = request.getfixturevalue("nats_url")
        names: NatsNames = request.getfixturevalue("nats_names")
        config = write_config(tmp_path, provider="nats", nats_url=url, stream=names.stream,
                              subject_prefix=names.subject_prefix)

        def make() -> Any:
            return NATSProvider(url, stream_name=names.stream,
                                subject_prefix=names.subject_prefix)
    return {"name": request.param, "config": config, "make": make, "dir": tmp_path}


def _publish(make: Callable[[], Any], events: list[Event]) -> None:
    async def run() -> None:
        provider = make()
        try:
            assert await provider.publish_many(events) == [None] * len(events)
        finally:
            await provider.close()

    anyio.run(run)


def _group_backlog(make: Callable[[], Any], group: str) -> int:
    async def run() -> int:
        provider = make()
        try:
            stats = await provider.stats()
        finally:
            await provider.close()
        g = stats.extra["groups"][group]
        return int(g["pending"]) + int(g.get("ack_pending", 0))

    return anyio.run(run)


def _status(url: str) -> int:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return 0


def test_the_config_metrics_section_serves_health_without_the_flag(
    bus: dict[str, Any]
) -> None:
    from tests.servers import free_port

    directory: Path = bus["dir"]
    port = free_port()
    consumer = start_consumer(directory, bus["config"], "ops", provider=bus["name"],
                              env={"OUTBOX_METRICS_PORT": str(port)})
    try:
        consumer.wait_ready()
        eventually_sync(lambda: _status(f"http://127.0.0.1:{port}/readyz") == 200, what="/readyz")
        assert _status(f"http://127.0.0.1:{port}/metrics") == 200
        code = consumer.terminate()
    finally:
        consumer.kill()
    assert code == 0, consumer.log.read_text()
    assert f"metrics on http://127.0.0.1:{port}/metrics" in consumer.log.read_text()


def test_consumes_and_stops_gracefully_on_sigterm(bus: dict[str, Any]) -> None:
    from tests.servers import free_port

    directory: Path = bus["dir"]
    port = free_port()
    consumer = start_consumer(directory, bus["config"], "billing", provider=bus["name"],
                              extra=["--metrics-port", str(port)])
    try:
        consumer.wait_ready()
        eventually_sync(lambda: _status(f"http://127.0.0.1:{port}/readyz") == 200, what="/readyz")
        assert _status(f"http://127.0.0.1:{port}/healthz") == 200
        fast = _events(5)
        slow = _events(1, sleep=1.5)
        _publish(bus["make"], fast + slow)
        eventually_sync(lambda: (directory / f"started-{slow[0].id}").exists(), what="slow handler")
        import urllib.request

        def completed_counted() -> bool:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                exposition = r.read().decode()
            return ('eventbroker_events_processed_total{source="database",'
                    'status="completed",type="public.users.create"} 5.0') in exposition

        eventually_sync(completed_counted, what="the consumer's metrics")
        code = consumer.terminate()  # while the slow handler runs
    finally:
        consumer.kill()
    assert code == 0, consumer.log.read_text()
    done = [i for ids in handled(directory, "billing").values() for i in ids]
    assert sorted(done) == sorted(str(e.id) for e in fast + slow)
    assert _group_backlog(bus["make"], "billing") == 0  # the slow one was acked before exit
    assert "SIGTERM" in consumer.log.read_text()


def test_failing_handler_is_parked_after_the_retry_policy(bus: dict[str, Any]) -> None:
    directory: Path = bus["dir"]
    consumer = start_consumer(directory, bus["config"], "g", provider=bus["name"])
    try:
        consumer.wait_ready()
        bad = _events(1, fail=True)[0]
        good = _events(1)[0]
        _publish(bus["make"], [bad, good])
        eventually_sync(lambda: "parking it" in consumer.log.read_text(), what="parking")
        eventually_sync(lambda: any(handled(directory, "g").values()), what="the good event")
        assert consumer.terminate() == 0
    finally:
        consumer.kill()

    async def dead() -> list[dict[str, Any]]:
        provider = bus["make"]()
        try:
            rows: list[dict[str, Any]] = await provider.dead_letters()
            return rows
        finally:
            await provider.close()

    rows = anyio.run(dead)
    assert len(rows) == 1
    error = rows[0].get("error") or rows[0].get("Outbox-Error")
    assert "RuntimeError: asked to fail" in error
    assert wire.decode(rows[0]["event"]).id == bad.id


def test_inbox_flag_skips_a_redelivered_event(tmp_path: Path, redis_url: str, redis_prefix: str,
                                              pg_url: str, pg_engine: sa.Engine) -> None:
    with pg_engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE test_effects (event_id uuid NOT NULL, note text)")
    write_app(tmp_path)
    stream = f"{redis_prefix}:events"
    config = write_config(tmp_path, provider="redis", redis_url=redis_url, stream=stream)
    event = _events(1)[0]

    def settled() -> bool:
        return _group_backlog(lambda: RedisProvider(redis_url, stream_name=stream),
                              "stock") == 0

    async def publish(again: bool) -> None:
        import redis.asyncio as aioredis

        provider = RedisProvider(redis_url, stream_name=stream)
        raw = aioredis.Redis.from_url(redis_url)
        try:
            if not again:
                await provider.publish(event)
            else:  # a second entry of the same event: a redelivery the inbox must absorb
                await raw.xadd(stream, {"id": str(event.id), "type": event.type,
                                        "source": event.source, "event": wire.encode(event)})
        finally:
            await raw.aclose()
            await provider.close()

    for again in (False, True):  # two processes: the second has nothing in memory
        consumer = start_consumer(tmp_path, config, "stock", provider="redis",
                                  extra=["--inbox-database-url", pg_url], env={"INBOX": "1"})
        try:
            consumer.wait_ready()
            anyio.run(publish, again)
            eventually_sync(lambda: settled() and bool(handled(tmp_path, "stock")),
                     what="the entry settled")
            assert consumer.terminate() == 0
        finally:
            consumer.kill()
    with pg_engine.connect() as conn:
        effects = conn.exec_driver_sql("SELECT count(*) FROM test_effects").scalar_one()
        inbox = conn.exec_driver_sql("SELECT count(*) FROM outbox_inbox WHERE group_name = "
                                     "'stock'").scalar_one()
    assert (effects, inbox) == (1, 1)
    assert [len(v) for v in handled(tmp_path, "stock").values()] == [1]


def _run_cli(args: list[str], cwd: Path, env: dict[str, str] | None = None
             ) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "OUT_DIR": str(cwd), **(env or {})}
    full_env.pop("OUTBOX_CONFIG", None)
    return subprocess.run([sys.executable, "-m", "outbox.consume", *args], cwd=cwd,
                          env=full_env, capture_output=True, text=True, timeout=60)


def test_startup_errors_are_one_line(tmp_path: Path, redis_url: str, pg_url: str) -> None:
    write_app(tmp_path)
    cases = [
        (["--provider", "redis", "--group", "g"], "no handlers are subscribed"),
        (["--provider", "redis", "--group", "g", "--app", "no_such_module"],
         "--app no_such_module: cannot import"),
        (["--group", "g", "--app", "consume_app"], "no bus to consume from"),
        (["--provider", "redis", "--group", "g", "--app", "consume_app", "--from", "yesterday"],
         "--from 'yesterday'"),
        (["--provider", "redis", "--group", "bad group", "--app", "consume_app"],
         "invalid consumer group"),
        (["--provider", "database", "--group", "g", "--app", "consume_app"],
         "needs --database-url"),
        (["--provider", "redis", "--group", "g", "--app", "consume_app",
          "--inbox-database-url", pg_url], "alembic upgrade head"),
    ]
    for args, message in cases:
        result = _run_cli(args, tmp_path, {"OUTBOX_REDIS_URL": redis_url})
        assert result.returncode == 2, (args, result.stderr)
        lines = [line for line in result.stderr.splitlines() if "error" in line]
        assert len(lines) == 1 and message in lines[0], (args, result.stderr)
        assert "Traceback" not in result.stderr


def test_startup_reads_the_config_like_the_relay(tmp_path: Path, redis_url: str) -> None:
    """The config's ``apps`` are imported and its ``log_level`` applies (as for the relay); a
    ``--from`` time without an offset is UTC (as for every other outbox command)."""
    (tmp_path / "config_app.py").write_text(textwrap.dedent("""
        import logging
        import outbox
        logging.getLogger("config_app").debug("config_app imported")
        outbox.subscribe("*", lambda event: None)
    """))
    config = tmp_path / "outbox.yaml"
    config.write_text("event_broker:\n  provider: redis\n  apps: [config_app]\n"
                      "  log_level: DEBUG\n")
    # The group name is refused after the handlers were found and the start time was parsed.
    result = _run_cli(["--config", str(config), "--group", "bad group",
                       "--from", "2026-01-01T00:00"], tmp_path, {"OUTBOX_REDIS_URL": redis_url})
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "invalid consumer group" in errors[0], result.stderr
    assert "config_app imported" in result.stderr  # the config's level, no --log-level


def test_secrets_are_not_printed(tmp_path: Path) -> None:
    write_app(tmp_path)
    secret = "pw-" + uuid.uuid4().hex[:8]
    result = _run_cli(["--provider", "database", "--group", "g", "--app", "consume_app",
                       "--inbox-database-url",
                       f"postgresql+psycopg://u:{secret}@127.0.0.1:1/x",
                       "--database-url", f"postgresql+psycopg://u:{secret}@127.0.0.1:1/x"],
                      tmp_path)
    assert result.returncode != 0
    assert secret not in result.stderr + result.stdout


def test_relay_cli_forwards_to_the_consumer_cli(bus: dict[str, Any], pg_url: str,
                                                pg_engine: sa.Engine) -> None:
    """python -m outbox.relay --provider redis|nats → python -m outbox.consume, both real."""
    from tests.bus_helpers import commit_events, statuses

    directory: Path = bus["dir"]
    consumer = start_consumer(directory, bus["config"], "search", provider=bus["name"])
    try:
        consumer.wait_ready()
        events = commit_events(pg_engine, 50)
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        env.pop("OUTBOX_CONFIG", None)
        relay = subprocess.run(
            [sys.executable, "-m", "outbox.relay", "--provider", bus["name"], "--config",
             str(bus["config"]), "--database-url", pg_url, "--once"],
            cwd=directory, env=env, capture_output=True, text=True, timeout=120)
        assert relay.returncode == 0, relay.stderr
        assert statuses(pg_engine) == {"completed": 50}
        eventually_sync(lambda: sum(len(v) for v in handled(directory, "search").values()) >= 50,
                 what="the consumer handled what the relay forwarded")
        assert consumer.terminate() == 0
    finally:
        consumer.kill()
    done = [i for ids in handled(directory, "search").values() for i in ids]
    assert sorted(done) == sorted(str(e.id) for e in events)
