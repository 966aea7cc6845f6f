"""Metrics and health of a real relay: known workload → known metric values (PostgreSQL)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import anyio
import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry

import outbox
from outbox.health import observe_relay
from outbox.providers.memory import MemoryProvider
from outbox.relay import Relay
from tests.helpers import eventually
from tests.integration.ops_seed import add, event, statuses


def sample(reg: CollectorRegistry, name: str, **labels: str) -> float:
    return reg.get_sample_value(name, labels) or 0.0


def get(url: str) -> tuple[int, dict[str, object]]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.mark.anyio
async def test_known_workload(pg_engine: sa.Engine) -> None:
    registry = CollectorRegistry()
    provider = MemoryProvider()
    broker = outbox.Broker(provider, retry_policy=outbox.RetryPolicy(max_retries=1,
                                                                      initial_delay=0.01))
    handled: list[str] = []

    @broker.subscribe("public.users.*")
    async def handler(ev: outbox.Event) -> None:
        if ev.payload.get("fail"):
            raise RuntimeError("handler refuses")
        handled.append(ev.type)

    good = add(pg_engine, [event("public.users.create") for _ in range(6)]
               + [event("public.users.update") for _ in range(3)])
    bad = add(pg_engine, [event("public.users.delete", payload={"fail": True})])[0]
    relay = Relay(pg_engine, broker=broker, provider=provider, poll_interval=0.05,
                  retry_policy=broker.retry_policy)

    async with observe_relay(relay, registry=registry, backlog_interval=0.05,
                             check_interval=0.05) as obs:
        await obs.sampler.sample()
        # the relay has not run: 10 pending, lag > 0
        assert sample(registry, "eventbroker_relay_backlog_events", status="pending") == 10
        assert sample(registry, "eventbroker_relay_oldest_pending_age_seconds") > 0
        status, doc = await anyio.to_thread.run_sync(get, obs.server.url + "/readyz")
        assert status == 503  # the relay has not started
        assert doc["checks"]["relay"]["ok"] is False  # type: ignore[index]

        async def bad_one_failed() -> bool:  # each pass retries it once its delay is up
            await relay.run(once=True)
            return statuses(pg_engine)[bad.id] == "failed"

        await eventually(bad_one_failed, within=60, every=0.05)
        await obs.sampler.sample()

        assert sample(registry, "eventbroker_relay_events_claimed_total") >= 11
        for type_, n in (("public.users.create", 6), ("public.users.update", 3)):
            labels = {"source": "database", "type": type_}
            assert sample(registry, "eventbroker_events_processed_total", **labels,
                          status="completed") == n
            assert sample(registry, "eventbroker_events_published_total", **labels) == n
            assert sample(registry, "eventbroker_event_processing_duration_seconds_count",
                          **labels) == n
        bad_labels = {"source": "database", "type": "public.users.delete"}
        assert sample(registry, "eventbroker_events_processed_total", **bad_labels,
                      status="retry") == 1
        assert sample(registry, "eventbroker_events_processed_total", **bad_labels,
                      status="failed") == 1
        assert sample(registry, "eventbroker_relay_events_retried_total") == 1
        assert sample(registry, "eventbroker_relay_events_failed_total") == 1
        assert sample(registry, "eventbroker_relay_events_forwarded_total") == 9
        assert sample(registry, "eventbroker_relay_claim_duration_seconds_count") >= 2
        # drained: no backlog, no lag; the failed event is visible
        assert sample(registry, "eventbroker_relay_backlog_events", status="pending") == 0
        assert sample(registry, "eventbroker_relay_oldest_pending_age_seconds") == 0
        assert sample(registry, "eventbroker_relay_backlog_events", status="failed") == 1
        assert sorted(handled) == sorted(e.type for e in good)

        # a running relay is ready; /healthz is alive
        async with anyio.create_task_group() as tg:
            tg.start_soon(relay.run)
            async def ready() -> bool:
                return (await anyio.to_thread.run_sync(get, obs.server.url + "/readyz"))[0] == 200

            await eventually(ready, every=0.05, what="the relay to be ready")
            status, doc = await anyio.to_thread.run_sync(get, obs.server.url + "/healthz")
            assert status == 200 and doc["status"] == "ok"
            relay.stop()
