"""`python -m outbox.relay --metrics-port`: what an operator scrapes; replay, then relay."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator

import pytest
import sqlalchemy as sa

from tests import servers
from tests.helpers import eventually_sync
from tests.integration.ops_seed import add, event, statuses
from tests.integration.test_health import promtool  # noqa: F401 - the fixture

ENV = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")}


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError:
        return 0, b""


def wait_for(predicate: Callable[[], object], what: str) -> None:
    eventually_sync(predicate, within=60, every=0.1, what=what)


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not exposed")


@pytest.fixture
def relay_process(pg_engine: sa.Engine) -> Iterator[tuple[subprocess.Popen[str], str]]:
    url = pg_engine.url.render_as_string(hide_password=False)
    port = servers.free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "outbox.relay", "--database-url", url, "--metrics-port",
         str(port), "--poll-interval", "0.1", "--log-format", "json"],
        env=ENV, stderr=subprocess.PIPE, text=True,
    )
    try:
        yield proc, f"http://127.0.0.1:{port}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_sidecar_endpoints(pg_engine: sa.Engine, promtool: str,  # noqa: F811
                           relay_process: tuple[subprocess.Popen[str], str]) -> None:
    proc, base = relay_process
    add(pg_engine, [event("public.users.create") for _ in range(25)])
    wait_for(lambda: get(base + "/readyz")[0] == 200, "/readyz 200")
    wait_for(lambda: set(statuses(pg_engine).values()) == {"completed"}, "events drained")

    def drained() -> bool:
        text = get(base + "/metrics")[1].decode()
        return (metric(text, "eventbroker_relay_events_claimed_total") == 25
                and metric(text, 'eventbroker_relay_backlog_events{status="pending"}') == 0
                and metric(text, 'eventbroker_relay_backlog_events{status="processing"}') == 0)

    wait_for(drained, "metrics of the drained events")  # the backlog is sampled every 5 s
    status, body = get(base + "/metrics")
    text = body.decode()
    assert status == 200
    assert metric(text, "eventbroker_relay_oldest_pending_age_seconds") == 0
    assert 'eventbroker_events_processed_total{source="database",status="completed",' \
        'type="public.users.create"} 25.0' in text
    check = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True,
                           timeout=60)
    assert check.returncode == 0, (check.stdout + check.stderr).decode()
    status, body = get(base + "/healthz")
    assert status == 200 and json.loads(body)["status"] == "ok"

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    assert proc.stderr is not None
    lines = [json.loads(line) for line in proc.stderr.read().splitlines() if line.strip()]
    assert any("metrics on http://127.0.0.1:" in line["message"] for line in lines)
    assert get(base + "/healthz")[0] == 0  # the listener is gone with the process


def test_replay_then_relay_completes(pg_engine: sa.Engine) -> None:
    url = pg_engine.url.render_as_string(hide_password=False)
    env = {**ENV, "OUTBOX_DATABASE_URL": url}
    failed = add(pg_engine, [event("public.orders.create", status="failed") for _ in range(5)])
    replay = subprocess.run([sys.executable, "-m", "outbox", "replay", "--status", "failed"],
                            env=env, capture_output=True, text=True, timeout=120)
    assert (replay.returncode, replay.stdout) == (0, "replayed 5 event(s)\n"), replay.stderr
    relay = subprocess.run([sys.executable, "-m", "outbox.relay", "--once"], env=env,
                           capture_output=True, text=True, timeout=120)
    assert relay.returncode == 0, relay.stderr
    st = statuses(pg_engine)
    assert [st[e.id] for e in failed] == ["completed"] * 5
    stats = subprocess.run([sys.executable, "-m", "outbox", "stats", "--json"], env=env,
                           capture_output=True, text=True, timeout=120)
    doc = json.loads(stats.stdout)
    assert doc["by_status"] == {"completed": 5} and doc["lag_seconds"] == 0
