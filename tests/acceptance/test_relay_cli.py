"""``python -m outbox.relay`` as a user runs it: embedded default, --once, flags/env, errors."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

import outbox
from tests import servers

APP = textwrap.dedent('''
    """A user's app module: records what its handler saw in seen.txt."""
    import outbox

    @outbox.subscribe("shop.>")
    def remember(event):
        with open("seen.txt", "a") as f:
            f.write(f"{event.type} {event.payload['n']}\\n")
''')


def relay(*args: str, cwd: Path, env: dict[str, str] | None = None,
          timeout: float = 60) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "outbox.relay", *args], cwd=cwd,
                          env=full_env, capture_output=True, text=True, timeout=timeout)


def add(url: str, n: int, type: str = "shop.order.create") -> None:
    engine = sa.create_engine(url)
    outbox.create_schema(engine)
    with Session(engine) as s:
        for i in range(n):
            s.add(outbox.new_event("system", type, {"n": i}))
        s.commit()
    engine.dispose()


def statuses(url: str) -> dict[str, int]:
    engine = sa.create_engine(url)
    with engine.connect() as c:
        out = dict(c.execute(sa.text("SELECT status, count(*) FROM events GROUP BY status")).all())
    engine.dispose()
    return out  # type: ignore[return-value]


def test_embedded_default_once_runs_app_handlers(tmp_path: Path) -> None:
    (tmp_path / "shopapp.py").write_text(APP)
    url = f"sqlite:///{tmp_path}/outbox.db"
    add(url, 3)
    add(url, 1, type="other.thing.create")
    res = relay("--once", "--app", "shopapp", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    seen = (tmp_path / "seen.txt").read_text().splitlines()
    assert sorted(seen) == ["shop.order.create 0", "shop.order.create 1", "shop.order.create 2"]
    assert statuses(url) == {"completed": 4}


def test_says_which_handlers_it_runs_and_warns_about_an_app_without_any(tmp_path: Path) -> None:
    (tmp_path / "shopapp.py").write_text(APP)
    (tmp_path / "emptyapp.py").write_text("import outbox  # subscribes nothing\n")
    res = relay("--once", "--app", "shopapp", "--log-level", "INFO", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "handlers: shop.> -> shopapp.remember (thread)" in res.stderr
    assert "subscribed no handlers" not in res.stderr
    res = relay("--once", "--app", "emptyapp", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "--app emptyapp subscribed no handlers" in res.stderr


def test_embedded_default_creates_sqlite_schema(tmp_path: Path) -> None:
    res = relay("--once", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert statuses(f"sqlite:///{tmp_path}/outbox.db") == {}


def test_settings_from_environment_and_config(tmp_path: Path) -> None:
    (tmp_path / "shopapp.py").write_text(APP)
    url = f"sqlite:///{tmp_path}/elsewhere.db"
    add(url, 2)
    (tmp_path / "outbox.yaml").write_text(textwrap.dedent("""
        event_broker:
          apps: [shopapp]
          database:
            batch_size: 1
    """))
    res = relay("--once", "--config", "outbox.yaml", cwd=tmp_path,
                env={"OUTBOX_DATABASE_URL": url})
    assert res.returncode == 0, res.stderr
    assert "batch 1" in res.stderr  # from the config file
    assert statuses(url) == {"completed": 2}
    assert len((tmp_path / "seen.txt").read_text().splitlines()) == 2
    assert not (tmp_path / "outbox.db").exists()  # the environment's URL was used


def one_line_error(res: subprocess.CompletedProcess[str]) -> str:
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, res.stderr
    return lines[0]


def test_unreachable_database_is_one_line(tmp_path: Path) -> None:
    port = servers.free_port()
    line = one_line_error(relay(
        "--database-url", f"postgresql+psycopg://postgres:s3cret@127.0.0.1:{port}/x",
        "--once", cwd=tmp_path))
    assert "cannot connect" in line and "s3cret" not in line


TOKEN_APP = textwrap.dedent('''
    """An app module that logs the bus URL it was given (a token in the user-info part)."""
    import logging
    import os

    logging.getLogger("tokenapp").warning("events go to %s", os.environ["OUTBOX_NATS_URL"])
''')


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_failed_start_never_shows_a_token_in_a_url(tmp_path: Path, log_format: str) -> None:
    """Tokens in URLs (``nats://TOKEN@host``, a lone user-info part) and passwords given as query
    parameters are hidden: in the error line of a failed start and in the log lines before it.
    A database URL's user name is not a secret and is shown."""
    (tmp_path / "tokenapp.py").write_text(TOKEN_APP)
    port = servers.free_port()
    res = relay("--database-url", f"postgresql+psycopg://app@127.0.0.1:{port}/x?password=s3cr3t",
                "--provider", "nats", "--app", "tokenapp", "--once", "--log-format", log_format,
                cwd=tmp_path, env={"OUTBOX_NATS_URL": f"nats://s3cr3t@127.0.0.1:{port}"})
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "s3cr3t" not in res.stderr
    assert f"nats://***@127.0.0.1:{port}" in res.stderr  # the app's log line, redacted
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("outbox.relay: error: cannot connect to ")
    assert f"postgresql+psycopg://app@127.0.0.1:{port}/x?password=***" in last


def test_missing_events_table_says_to_migrate(pg_url: str, tmp_path: Path) -> None:
    line = one_line_error(relay("--database-url", pg_url, "--once", cwd=tmp_path))
    assert "events" in line and "alembic upgrade head" in line


def test_unimportable_app_is_one_line(tmp_path: Path) -> None:
    line = one_line_error(relay("--app", "no_such_module_here", "--once", cwd=tmp_path))
    assert "no_such_module_here" in line and "cannot import" in line


def test_bad_flag_value_is_one_line(tmp_path: Path) -> None:
    line = one_line_error(relay("--poll-interval", "0", "--once", cwd=tmp_path))
    assert "poll_interval" in line


def test_sigterm_while_idle_exits_zero(pg_url: str, tmp_path: Path) -> None:
    add(pg_url, 0)
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")}
    proc = subprocess.Popen([sys.executable, "-m", "outbox.relay", "--database-url", pg_url,
                             "--metrics-port", "0"],
                            cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        assert proc.stderr is not None
        while "metrics on" not in proc.stderr.readline():
            assert time.monotonic() < deadline and proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.parametrize("flag", ["--batch-size", "--lease"])
def test_flags_override_environment(flag: str, tmp_path: Path) -> None:
    value = {"--batch-size": "7", "--lease": "12"}[flag]
    res = relay("--once", flag, value, cwd=tmp_path,
                env={"OUTBOX_DATABASE_BATCH_SIZE": "3", "OUTBOX_DATABASE_LEASE": "5"})
    assert res.returncode == 0, res.stderr
    shown = f"batch {value}" if flag == "--batch-size" else f"lease {value}s"
    assert shown in res.stderr


def test_readme_quickstart_shows_commit_to_handler(tmp_path: Path) -> None:
    """The README's first command: commit → events table → relay → handler, embedded default."""
    script = Path(__file__).resolve().parents[2] / "examples" / "quickstart.py"
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")}
    res = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert [line.split()[1] for line in lines if line.startswith("handler:")] == [
        "main.users.create", "main.users.update"]
    assert lines[-1] == "events now: {'completed': 2}"
    assert "s3cret" not in res.stdout
