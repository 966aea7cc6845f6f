"""A ``Broker`` on the ``DatabaseProvider`` next to a real relay on the same PostgreSQL table.

The broker's events land in the ``events`` table the relay claims from; the relay must never run
them a second time while the broker has them, and must finish what the broker gave up on.
"""

from __future__ import annotations

import uuid

import anyio
import pytest
import sqlalchemy as sa

import outbox
from outbox import Broker, Event
from outbox.providers.database import DatabaseProvider
from outbox.providers.memory import MemoryProvider
from outbox.relay import Relay
from tests.helpers import eventually

pytestmark = pytest.mark.anyio


def _rows(engine: sa.Engine) -> dict[uuid.UUID, tuple[str, str | None]]:
    with engine.connect() as conn:
        return {r[0]: (r[1], r[2]) for r in conn.execute(
            sa.select(Event.id, Event.status, Event.lease_owner))}


def _relay(engine: sa.Engine) -> tuple[Relay, list[uuid.UUID]]:
    """A relay with a handler on the broker's pattern, forwarding to a memory provider."""
    seen: list[uuid.UUID] = []
    broker = Broker(MemoryProvider())
    broker.subscribe("chat.>", lambda event: seen.append(event.id), threaded=False)
    return Relay(engine, broker=broker, poll_interval=0.05), seen


async def test_relay_never_claims_what_the_broker_handles(pg_engine: sa.Engine) -> None:
    provider = DatabaseProvider(pg_engine)
    broker = Broker(provider, worker_count=1, instance_id="api-1")
    gate = anyio.Event()
    handled: list[uuid.UUID] = []

    @broker.subscribe("chat.>")
    async def slow(event: Event) -> None:
        handled.append(event.id)
        await gate.wait()

    background, background_seen = _relay(pg_engine)
    events = [outbox.new_event("websocket", "chat.message", {"i": i}) for i in range(3)]
    async with anyio.create_task_group() as tg:
        tg.start_soon(background.run)  # a relay polling the table all along
        async with broker:
            for event in events:
                await broker.publish_async(event)
            # one event in its handler, two queued: in the table, all three are the broker's
            await eventually(lambda: handled, what="the worker to take the first event")
            rows = _rows(pg_engine)
            assert {rows[e.id] for e in events} == {("processing", "broker:api-1")}
            drained, drained_seen = _relay(pg_engine)
            await drained.drain()  # a full pass of another relay meanwhile takes nothing
            assert drained.stats.claimed == 0 and drained_seen == []
            gate.set()
            await broker.join()
        # Several polls of the background relay after the broker is done.
        polls = background.stats.claims
        await eventually(lambda: background.stats.claims >= polls + 3)
        background.stop()
    assert handled == [e.id for e in events]  # each once, by the broker
    assert {_rows(pg_engine)[e.id][0] for e in events} == {"completed"}
    assert background.stats.claimed == 0 and background_seen == []
    await provider.close()


async def test_what_the_broker_gives_up_on_the_relay_finishes(pg_engine: sa.Engine) -> None:
    provider = DatabaseProvider(pg_engine)
    broker = Broker(provider, worker_count=1)
    started = anyio.Event()

    @broker.subscribe("chat.>")
    async def stuck(event: Event) -> None:
        started.set()
        await anyio.sleep_forever()

    events = [outbox.new_event("websocket", "chat.message", {"i": i}) for i in range(3)]
    await broker.start()
    for event in events:
        await broker.publish_async(event)
    await started.wait()
    report = await broker.stop(timeout=0.2)  # one interrupted, two never started
    assert {e.id for e in report.unfinished} == {e.id for e in events}
    assert {_rows(pg_engine)[e.id][0] for e in events} == {"pending"}
    relay, seen = _relay(pg_engine)
    await relay.drain()
    assert sorted(seen) == sorted(e.id for e in events)
    assert {_rows(pg_engine)[e.id][0] for e in events} == {"completed"}
    await provider.close()


async def test_other_providers_keep_pending_until_handled() -> None:
    """Only the relay's own table gets the processing-from-the-start treatment."""
    provider = MemoryProvider()
    broker = Broker(provider, worker_count=1)
    started, gate = anyio.Event(), anyio.Event()

    @broker.subscribe("chat.>")
    async def wait(event: Event) -> None:
        started.set()
        await gate.wait()

    first, second = (outbox.new_event("websocket", "chat.message", {}) for _ in range(2))
    async with broker:
        await broker.publish_async(first)
        await broker.publish_async(second)
        with anyio.fail_after(20):
            await started.wait()
        running = await provider.get(first.id)
        assert running is not None and running.status == "processing"
        stored = await provider.get(second.id)
        assert stored is not None and stored.status == "pending" and stored.lease_owner is None
        gate.set()
