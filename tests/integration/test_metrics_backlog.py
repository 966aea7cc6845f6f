"""BacklogSampler: the backlog and lag gauges follow the table (PostgreSQL and SQLite)."""

from __future__ import annotations

import datetime as dt

import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry

from outbox.events import Event
from outbox.metrics import BacklogSampler, Metrics
from tests.integration.ops_seed import add, event


def gauge(reg: CollectorRegistry, name: str, **labels: str) -> float | None:
    return reg.get_sample_value(name, labels)


@pytest.mark.anyio
async def test_sampler_tracks_backlog_and_lag(engine: sa.Engine) -> None:
    registry = CollectorRegistry()
    results: list[bool] = []
    sampler = BacklogSampler(engine, Metrics(registry),
                             on_result=lambda ok, exc: results.append(ok))
    add(engine, [event("t.x", age=dt.timedelta(minutes=5)), event("t.x"),
                 event("t.x", status="failed", ordering_key="k:1")])
    await sampler.sample()
    assert gauge(registry, "eventbroker_relay_backlog_events", status="pending") == 2
    assert gauge(registry, "eventbroker_relay_backlog_events", status="failed") == 1
    assert gauge(registry, "eventbroker_relay_blocked_keys") == 1
    lag = gauge(registry, "eventbroker_relay_oldest_pending_age_seconds")
    assert lag is not None and lag >= 5 * 60
    with engine.begin() as conn:  # what a relay draining the table does
        conn.execute(sa.update(Event).where(Event.status == "pending")
                     .values(status="completed"))
    await sampler.sample()
    assert gauge(registry, "eventbroker_relay_backlog_events", status="pending") == 0
    assert gauge(registry, "eventbroker_relay_oldest_pending_age_seconds") == 0
    assert results == [True, True] and sampler.last is not None and sampler.last_ok is not None


@pytest.mark.anyio
async def test_sampler_counts_errors_and_keeps_going(tmp_path: object) -> None:
    registry = CollectorRegistry()
    engine = sa.create_engine(f"sqlite:///{tmp_path}/missing-schema.db")
    sampler = BacklogSampler(engine, Metrics(registry))
    with pytest.raises(sa.exc.OperationalError):
        await sampler.sample()
    assert gauge(registry, "eventbroker_relay_backlog_errors_total") == 1
    engine.dispose()


@pytest.mark.anyio
async def test_sampler_with_async_engine(pg_engine: sa.Engine) -> None:
    pytest.importorskip("greenlet", reason="SQLAlchemy's asyncio engines need greenlet")
    from sqlalchemy.ext.asyncio import create_async_engine

    add(pg_engine, [event("t.x")])
    registry = CollectorRegistry()
    url = pg_engine.url.render_as_string(hide_password=False)
    aengine = create_async_engine(url)
    try:
        value = await BacklogSampler(aengine, Metrics(registry)).sample()
    finally:
        await aengine.dispose()
    assert value.pending == 1
    assert gauge(registry, "eventbroker_relay_backlog_events", status="pending") == 1
