"""`python -m outbox` as an operator runs it: real subprocesses, PostgreSQL and SQLite."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

import outbox
from tests.integration.ops_seed import add, event, statuses

COMMANDS = [[], ["events"], ["events", "list"], ["events", "show"], ["replay"], ["stats"],
            ["cleanup"]]


def outbox_cli(*args: str, env: dict[str, str] | None = None,
               cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "outbox", *args], capture_output=True,
                          text=True, env=full_env, cwd=cwd, timeout=120)


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "top")
def test_help_on_every_command(command: list[str]) -> None:
    result = outbox_cli(*command, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: python -m outbox")
    assert "--database-url" in result.stdout


def test_operator_session(engine: sa.Engine, tmp_path: Path) -> None:
    url = engine.url.render_as_string(hide_password=False)
    env = {"OUTBOX_DATABASE_URL": url}
    failed = add(engine, [event("public.users.update", status="failed") for _ in range(3)])
    add(engine, [event("public.users.create", status="completed", age=dt.timedelta(days=40))
                 for _ in range(5)])

    listed = outbox_cli("events", "list", "--status", "failed", "--json", env=env)
    assert listed.returncode == 0, listed.stderr
    assert sorted(d["id"] for d in json.loads(listed.stdout)) == sorted(str(e.id)
                                                                        for e in failed)

    shown = outbox_cli("events", "show", str(failed[0].id), env=env)
    assert shown.returncode == 0 and json.loads(shown.stdout)["status"] == "failed"

    stats: dict[str, Any] = json.loads(outbox_cli("stats", "--json", env=env).stdout)
    assert stats["by_status"] == {"failed": 3, "completed": 5}

    replay = outbox_cli("replay", "--status", "failed", "--type", "public.users.*", env=env)
    assert (replay.returncode, replay.stdout) == (0, "replayed 3 event(s)\n")
    assert set(statuses(engine).values()) == {"pending", "completed"}

    cleanup = outbox_cli("cleanup", "--older-than", "30d", "--batch", "2", "--json", env=env)
    assert cleanup.returncode == 0, cleanup.stderr
    assert json.loads(cleanup.stdout)["deleted"] == 5
    assert set(statuses(engine).values()) == {"pending"}

    # --database-url wins over the environment
    other = outbox_cli("--database-url", f"sqlite:///{tmp_path}/none.db", "stats", env=env)
    assert other.returncode == 1 and "alembic upgrade head" in other.stderr


def test_exit_codes_without_database(tmp_path: Path) -> None:
    nothing = outbox_cli("stats", cwd=tmp_path)
    assert nothing.returncode == 1
    assert "no database" in nothing.stderr and "Traceback" not in nothing.stderr
    usage = outbox_cli("cleanup", "--older-than", "30 days please", cwd=tmp_path)
    assert usage.returncode == 2 and "invalid duration" in usage.stderr
    unknown = outbox_cli("events", "show", "nope", cwd=tmp_path)
    assert unknown.returncode == 2 and "expected a UUID" in unknown.stderr


BAD_CONFIG = ("event_broker:\n  worker_count: 0\n  redis:\n    prot: 1\n  database:\n"
              "    poll_interval: -1\n")


@pytest.mark.parametrize("command", [["outbox", "stats"], ["outbox.relay", "--once"],
                                     ["outbox.consume", "--provider", "redis", "--group", "g"]],
                         ids=lambda c: c[0])
def test_config_mistakes_are_all_named_exit_2_and_typos_flagged(command: list[str],
                                                                tmp_path: Path) -> None:
    """Every command: each bad key on a line of its own (not only the first), exit 2 (bad
    usage), and an ``OUTBOX_*`` variable that is no setting named with what it resembles."""
    (tmp_path / "bad.yaml").write_text(BAD_CONFIG)
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")}
    env["OUTBOX_DATABSE_URL"] = "sqlite:///typo.db"
    done = subprocess.run([sys.executable, "-m", *command, "--config", "bad.yaml"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert ("warning: environment variable OUTBOX_DATABSE_URL is not an outbox setting and is "
            "ignored (did you mean OUTBOX_DATABASE_URL?)") in lines
    errors = [line for line in lines if "error:" in line]
    assert len(errors) == 3, done.stderr
    for key in ("event_broker.worker_count", "event_broker.redis.prot",
                "event_broker.database.poll_interval"):
        assert sum(key in line for line in errors) == 1, (key, errors)


def test_postgres_scheme_urls_work(pg_url: str) -> None:
    """``postgres://`` (what platforms hand out; SQLAlchemy alone refuses it) and a driverless
    ``postgresql://`` reach the database through psycopg."""
    engine = sa.create_engine(pg_url)
    outbox.create_schema(engine)
    engine.dispose()
    bare = pg_url.replace("postgresql+psycopg://", "postgres://")
    for url in (bare, bare.replace("postgres://", "postgresql://")):
        done = outbox_cli("stats", "--json", env={"OUTBOX_DATABASE_URL": url})
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["total"] == 0


def test_relay_start_line_says_where_events_go(redis_prefix: str, tmp_path: Path) -> None:
    """``--provider redis`` with no address set forwards to a local server: the start line says
    so, instead of a bare "provider redis" that reads like the configured one."""
    from tests import servers

    if (servers.REDIS_HOST, servers.REDIS_PORT) != ("127.0.0.1", 6379):
        pytest.skip("needs the Redis server at the default address")
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")}
    env["OUTBOX_REDIS_STREAM_NAME"] = f"{redis_prefix}:events"
    done = subprocess.run([sys.executable, "-m", "outbox.relay", "--once", "--provider", "redis"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert ("provider redis redis://127.0.0.1:6379/0 (the default address: no redis.url or host "
            "is configured)") in done.stderr
    assert "once: drain and exit" in done.stderr  # --once does not LISTEN
    assert "relay stopped: 0 completed, 0 retried, 0 failed, 0 hand-back(s)" in done.stderr
