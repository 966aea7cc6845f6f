"""/metrics, /healthz and /readyz over HTTP; readiness follows a real PostgreSQL going away."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

import anyio
import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry

from outbox.events import utcnow
from outbox.health import (
    HealthMonitor,
    HealthServer,
    HealthState,
    database_check,
    provider_check,
)
from outbox.metrics import Metrics
from outbox.ops import Backlog
from tests import servers
from tests.helpers import eventually


def get(url: str, *, accept: str | None = None) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def status(url: str) -> int:
    return get(url)[0]


@pytest.fixture(scope="session")
def promtool() -> str:
    """The promtool binary; installed from Debian's `prometheus` package when missing."""
    found = shutil.which("promtool")
    if found:
        return found
    if shutil.which("apt-get") and os.geteuid() == 0:
        subprocess.run(["apt-get", "install", "-y", "-q", "prometheus"], check=False,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=600)
        found = shutil.which("promtool")
        if found:
            return found
    message = "promtool is not installed (apt-get install prometheus)"
    if servers.IN_CI:
        pytest.fail(message)
    pytest.skip(message)


def workload(metrics: Metrics) -> None:
    for i in range(3):
        metrics.event_published("database", f"public.t{i}.create")
        metrics.event_processed("database", f"public.t{i}.create", "completed", 0.003 * (i + 1))
    metrics.event_processed("database", "public.t0.create", "failed", 1.5)
    metrics.set_queue(4, 2)
    metrics.events_claimed(3, 0.0007)
    metrics.events_forwarded(3)
    metrics.forward_error("event")
    metrics.events_retried(1)
    metrics.events_dead(1)
    metrics.set_provider_up(True)
    metrics.set_backlog(Backlog(pending=2, processing=1, failed=1, blocked_keys=1,
                                oldest_created_at=utcnow()))


def test_endpoints(tmp_path: Any) -> None:
    registry = CollectorRegistry()
    workload(Metrics(registry))
    state = HealthState(expected=["database"])
    with HealthServer(state, registry=registry) as server:
        assert server.host == "127.0.0.1"
        assert server.url.startswith("http://127.0.0.1:")
        code, headers, body = get(server.url + "/metrics")
        assert code == 200 and headers["Content-Type"].startswith("text/plain")
        assert b"eventbroker_events_published_total{" in body
        code, headers, body = get(server.url + "/metrics",
                                  accept="application/openmetrics-text; version=1.0.0")
        assert code == 200 and "openmetrics" in headers["Content-Type"]
        assert body.rstrip().endswith(b"# EOF")
        # no heartbeat yet: neither alive nor ready
        code, _, body = get(server.url + "/healthz")
        assert code == 503 and json.loads(body)["status"] == "fail"
        state.beat()
        assert status(server.url + "/healthz") == 200
        code, _, body = get(server.url + "/readyz")
        assert code == 503 and json.loads(body)["checks"]["database"]["ok"] is False
        state.set("database", True)
        code, _, body = get(server.url + "/readyz?verbose")
        assert code == 200 and json.loads(body)["status"] == "ok"
        assert status(server.url + "/nope") == 404
        head = urllib.request.Request(server.url + "/healthz", method="HEAD")
        with urllib.request.urlopen(head, timeout=5) as response:
            assert response.status == 200 and response.read() == b""
        url = server.url
    with pytest.raises(OSError):  # closed: the port is released
        urllib.request.urlopen(url + "/healthz", timeout=2)


def test_exposition_passes_promtool(promtool: str) -> None:
    registry = CollectorRegistry()
    workload(Metrics(registry))
    state = HealthState()
    with HealthServer(state, registry=registry) as server:
        _, _, body = get(server.url + "/metrics")
    result = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True,
                            timeout=60)
    assert result.returncode == 0, (result.stdout + result.stderr).decode()
    # and promtool does find problems when there are some (the check can fail)
    bad = b"# TYPE foo counter\nfoo 1\nfoo 2\n"
    assert subprocess.run([promtool, "check", "metrics"], input=bad, capture_output=True,
                          timeout=60).returncode != 0


async def wait_until(predicate: Callable[[], bool], what: str) -> None:
    """Poll ``predicate`` (in a thread: it does blocking HTTP) for up to a minute."""
    await eventually(lambda: anyio.to_thread.run_sync(predicate), within=60, every=0.1,
                     what=what)


@pytest.mark.anyio
async def test_unhealthy_while_database_is_down(
    private_postgres: servers.PrivatePostgres,
) -> None:
    engine = sa.create_engine(private_postgres.url, pool_pre_ping=True,
                              connect_args={"connect_timeout": 2})

    class Provider:
        async def stats(self) -> None:
            return None

    state = HealthState(unhealthy_after=0.5, expected=["database", "provider"])
    monitor = HealthMonitor(
        state, {"database": database_check(engine), "provider": provider_check(Provider())},
        interval=0.1, timeout=3, beat_interval=0.1,
    )
    try:
        with HealthServer(state, registry=CollectorRegistry()) as server:
            healthz, readyz = server.url + "/healthz", server.url + "/readyz"
            async with anyio.create_task_group() as tg:
                tg.start_soon(monitor.run)
                await wait_until(lambda: status(readyz) == 200, "ready")
                assert status(healthz) == 200

                await anyio.to_thread.run_sync(private_postgres.stop)
                await wait_until(lambda: status(readyz) == 503, "not ready")
                await wait_until(lambda: status(healthz) == 503, "not alive")
                doc = json.loads(get(readyz)[2])
                assert doc["checks"]["database"]["ok"] is False
                assert doc["checks"]["provider"]["ok"] is True

                await anyio.to_thread.run_sync(private_postgres.start)
                await wait_until(lambda: status(readyz) == 200, "ready again")
                assert status(healthz) == 200
                tg.cancel_scope.cancel()
    finally:
        engine.dispose()


@pytest.mark.anyio
async def test_relay_endpoints_follow_a_database_outage(
    private_postgres: servers.PrivatePostgres,
) -> None:
    import outbox
    from outbox.health import observe_relay
    from outbox.relay import Relay
    from tests.integration.ops_seed import add, event, statuses

    engine = sa.create_engine(private_postgres.url, pool_pre_ping=True,
                              connect_args={"connect_timeout": 2})
    outbox.create_schema(engine)
    broker = outbox.Broker()
    relay = Relay(engine, broker=broker, provider=broker.provider, poll_interval=0.1,
                  notify=False)
    try:
        async with observe_relay(relay, registry=CollectorRegistry(), check_interval=0.1,
                                 backlog_interval=0.2, unhealthy_after=0.5) as obs:
            healthz, readyz = obs.server.url + "/healthz", obs.server.url + "/readyz"
            async with anyio.create_task_group() as tg:
                tg.start_soon(relay.run)
                await wait_until(lambda: status(readyz) == 200, "ready")

                await anyio.to_thread.run_sync(private_postgres.stop)
                await wait_until(lambda: status(readyz) == 503, "not ready")
                await wait_until(lambda: status(healthz) == 503, "not alive")

                await anyio.to_thread.run_sync(private_postgres.start)
                await wait_until(lambda: status(readyz) == 200, "ready again")
                assert status(healthz) == 200
                # and it relays again
                ev = (await anyio.to_thread.run_sync(add, engine, [event("t.after")]))[0]
                await wait_until(lambda: statuses(engine)[ev.id] == "completed", "relayed")
                relay.stop()
    finally:
        engine.dispose()
