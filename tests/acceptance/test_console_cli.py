"""``python -m outbox console`` as an operator starts it: credentials from the environment or the
config, refusals as one line, SIGTERM ends it with 0."""

from __future__ import annotations

import socket
import textwrap
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.acceptance.console_server import console, outbox_database, run_console

pytest.importorskip("starlette")

TOKEN = "cli-token-4242"


@pytest.fixture(scope="module")
def db() -> Iterator[str]:
    with outbox_database() as url:
        yield url


def get(url: str, token: str | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_refuses_to_start_without_credentials(db: str) -> None:
    res = run_console("--database-url", db, "console")
    assert res.returncode == 2
    assert res.stderr.count("\n") == 1 and "no credentials configured" in res.stderr
    res = run_console("--database-url", db, "console", "--no-auth", "--host", "0.0.0.0")
    assert res.returncode == 2 and "--no-auth serves only a loopback address" in res.stderr
    res = run_console("--database-url", db, "console", env={"OUTBOX_CONSOLE_TOKEN": "short"})
    assert res.returncode == 2 and "too short" in res.stderr and "short'" not in res.stderr
    res = run_console("--database-url", db, "console",
                      env={"OUTBOX_CONSOLE_TOKEN": TOKEN, "OUTBOX_CONSOLE_REDACT": "nope"})
    assert res.returncode == 2 and "invalid redaction path 'nope'" in res.stderr
    assert "Traceback" not in res.stderr


def test_port_in_use_and_missing_schema_are_one_line(db: str, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        res = run_console("--database-url", db, "console", "--port", port,
                          env={"OUTBOX_CONSOLE_TOKEN": TOKEN})
    assert res.returncode == 1 and f"cannot listen on 127.0.0.1:{port}" in res.stderr
    res = run_console("--database-url", f"sqlite:///{tmp_path}/empty.db", "console",
                      env={"OUTBOX_CONSOLE_TOKEN": TOKEN})
    assert res.returncode == 1 and "alembic upgrade head" in res.stderr


def test_serves_with_credentials_from_the_config(db: str, tmp_path: Path) -> None:
    config = tmp_path / "outbox.yaml"
    config.write_text(textwrap.dedent(f"""
        event_broker:
          database: {{url: "{db}"}}
          console:
            token: "${{CONSOLE_TOKEN}}"
            read_only: true
            redact: [payload.password]
    """))
    with console("console", "--config", str(config), "--port", "0",
                 env={"CONSOLE_TOKEN": TOKEN}) as c:
        assert "sign-in with token; read-only" in c.banner and TOKEN not in c.banner
        assert get(c.url + "/events")[0] == 401
        status, html = get(c.url + "/events", TOKEN)
        assert status == 200 and "read-only" in html
        assert get(c.url + "/health", TOKEN)[0] == 200


def test_no_auth_on_loopback(db: str) -> None:
    with console("--database-url", db, "console", "--port", "0", "--no-auth") as c:
        assert "no sign-in (127.0.0.1 only)" in c.banner
        status, html = get(c.url + "/failures")
        assert status == 200 and "no failed events" in html
