"""MemoryProvider specifics: eviction, cleanup, stream and group backpressure, outage simulation.

The behaviour shared with every provider is in ``tests/conformance``.
"""

from __future__ import annotations

import datetime as dt
import gc

import anyio
import pytest

from outbox import Event, EventStatus, MemoryProvider, new_event
from outbox.exceptions import ProviderError, ProviderFull, ProviderUnavailable
from outbox.providers.memory import copy_event

pytestmark = pytest.mark.anyio


def ev(type_: str = "test.event", **kwargs: object) -> Event:
    return new_event("system", type_, {"k": "v"}, **kwargs)  # type: ignore[arg-type]


async def ids(p: MemoryProvider) -> set[object]:
    return {e.id for e in await p.list()}


# -- eviction ------------------------------------------------------------------------------------


async def test_eviction_takes_finished_then_processing_never_pending() -> None:
    p = MemoryProvider(max_events=3)
    a, b, c = ev(), ev(), ev()
    for e in (a, b, c):
        await p.store(e)
    await p.update_status(a.id, EventStatus.COMPLETED)
    await p.update_status(b.id, EventStatus.PROCESSING)
    d = ev()
    await p.store(d)
    assert await ids(p) == {b.id, c.id, d.id}  # the finished one went first
    e = ev()
    await p.store(e)
    assert await ids(p) == {c.id, d.id, e.id}  # then the processing one
    with pytest.raises(ProviderFull, match="pending"):
        await p.store(ev())
    with pytest.raises(ProviderFull):
        await p.publish(ev())
    assert await ids(p) == {c.id, d.id, e.id}  # nothing pending was dropped
    assert (await p.stats()).extra["evicted"] == 2


async def test_finished_events_are_evicted_least_recently_finished_first() -> None:
    p = MemoryProvider(max_events=3)
    a, b, c = ev(), ev(), ev()
    for e in (a, b, c):
        await p.store(e)
    await p.update_status(b.id, EventStatus.FAILED, "x")
    await p.update_status(a.id, EventStatus.COMPLETED)
    await p.store(ev())
    assert b.id not in await ids(p) and a.id in await ids(p)


async def test_storing_a_known_id_never_evicts() -> None:
    p = MemoryProvider(max_events=1)
    a = ev()
    await p.store(a)
    await p.store(a)  # idempotent, even when full
    assert await ids(p) == {a.id}


# -- cleanup -------------------------------------------------------------------------------------


async def test_cleanup_removes_only_old_finished_events() -> None:
    p = MemoryProvider(max_age=3600, cleanup_interval=0)
    old = dt.datetime.now(dt.UTC) - dt.timedelta(days=2)
    old_done = ev(created_at=old, status=EventStatus.COMPLETED)
    old_done.completed_at = old
    old_failed = ev(created_at=old, status=EventStatus.FAILED)  # no completed_at: created_at
    old_pending = ev(created_at=old)
    recent_done = ev(status=EventStatus.COMPLETED)
    recent_done.completed_at = dt.datetime.now(dt.UTC)
    for e in (old_done, old_failed, old_pending, recent_done):
        await p.store(e)
    assert p.cleanup() == 2
    assert await ids(p) == {old_pending.id, recent_done.id}
    assert (await p.stats()).extra["cleaned_up"] == 2


async def test_cleanup_runs_periodically_on_writes() -> None:
    p = MemoryProvider(max_age=60, cleanup_interval=0.01)
    old = ev(created_at=dt.datetime.now(dt.UTC) - dt.timedelta(hours=1),
             status=EventStatus.COMPLETED)
    await p.store(old)
    await anyio.sleep(0.05)  # longer than cleanup_interval
    await p.store(ev())
    assert old.id not in await ids(p)


async def test_cleanup_interval_zero_disables_periodic_cleanup() -> None:
    p = MemoryProvider(max_age=60, cleanup_interval=0)
    old = ev(created_at=dt.datetime.now(dt.UTC) - dt.timedelta(hours=1),
             status=EventStatus.COMPLETED)
    await p.store(old)
    await p.store(ev())
    assert old.id in await ids(p)


# -- streams -------------------------------------------------------------------------------------


async def test_slow_stream_consumer_gets_backpressure_not_drops() -> None:
    p = MemoryProvider(stream_buffer=2)
    stream = p.stream("test.*")
    events = [ev() for _ in range(6)]
    published: list[int] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(_publish_noting, p, events, published)
        await anyio.wait_all_tasks_blocked()
        # Two events fill the buffer, the third publish waits for room.
        assert published == [0, 1]
        assert (await p.stats()).total_events == 3
        received = []
        async for e in stream:
            received.append(e.id)
            if len(received) == len(events):
                break
    assert received == [e.id for e in events]
    assert published == list(range(6))
    await stream.aclose()


async def test_publish_waits_for_the_slowest_matching_stream_only() -> None:
    p = MemoryProvider(stream_buffer=1)
    slow = p.stream("test.*")
    other = p.stream("other.*")  # never read, but nothing matches it
    fast = p.stream("*")
    fast_got: list[object] = []

    async def read_fast() -> None:
        async for e in fast:
            fast_got.append(e.id)

    events = [ev() for _ in range(3)]
    async with anyio.create_task_group() as tg:
        tg.start_soon(read_fast)
        tg.start_soon(lambda: _publish_all(p, events))
        await anyio.wait_all_tasks_blocked()
        assert fast_got == [events[0].id]  # the second publish waits for the slow stream
        slow_got = [(await slow.__anext__()).id for _ in range(3)]
        await anyio.wait_all_tasks_blocked()
        tg.cancel_scope.cancel()
    assert slow_got == [e.id for e in events]
    assert fast_got == [e.id for e in events]
    await other.aclose()


async def _publish_all(p: MemoryProvider, events: list[Event]) -> None:
    for e in events:
        await p.publish(e)


async def _publish_noting(p: MemoryProvider, events: list[Event], published: list[int]) -> None:
    """Publish ``events`` one by one, noting the index of each one ``publish`` returned for."""
    for i, e in enumerate(events):
        await p.publish(e)
        published.append(i)


# -- consumer groups -----------------------------------------------------------------------------


async def test_a_full_group_holds_publishing_up_until_it_has_room_or_is_deleted() -> None:
    p = MemoryProvider(max_events=3)
    member = p.consume(group="slow")
    published: list[int] = []
    events = [ev(status="completed") for _ in range(5)]  # the store may evict them, the group not
    async with anyio.create_task_group() as tg:
        tg.start_soon(_publish_noting, p, events, published)
        await anyio.wait_all_tasks_blocked()
        assert published == [0, 1, 2]  # three wait for the group: the fourth publish waits
        delivery = await member.__anext__()
        await delivery.ack()
        await anyio.wait_all_tasks_blocked()
        assert published == [0, 1, 2, 3]  # room for one
        assert p.delete_group("slow")  # nobody will consume it: stop holding publishers up
        await anyio.wait_all_tasks_blocked()
        assert published == [0, 1, 2, 3, 4]
    with anyio.fail_after(1):
        with pytest.raises(StopAsyncIteration):
            await member.__anext__()  # the group is gone
    assert not p.delete_group("slow")
    assert "slow" not in (await p.stats()).extra["groups"]


async def test_a_group_starts_at_a_time_of_creation() -> None:
    p = MemoryProvider()
    now = dt.datetime.now(dt.UTC)
    old = ev(created_at=now - dt.timedelta(hours=2))
    recent = ev(created_at=now - dt.timedelta(minutes=1))
    await p.publish(old)
    await p.publish(recent)
    stored_only = ev()
    await p.store(stored_only)  # stored, never published: no group gets it
    async with p.consume(group="g", start=now - dt.timedelta(hours=1)) as member:
        delivery = await member.__anext__()
        assert delivery.event.id == recent.id
        await delivery.ack()
        with anyio.move_on_after(0.1):
            pytest.fail(f"unexpected {await member.__anext__()!r}")


async def test_close_ends_the_members_and_dead_letters_keep_a_copy() -> None:
    p = MemoryProvider(max_deliveries=1)
    member = p.consume(group="g")
    e = ev()
    await p.publish(e)
    delivery = await member.__anext__()
    await delivery.nack("boom")
    await p.publish(ev())  # the nacked one is parked on its way out again (max_deliveries=1)
    second = await member.__anext__()
    (letter,) = await p.dead_letters("g")
    assert (letter["event_id"], letter["group_name"], letter["attempt"]) == (e.id, "g", 1)
    assert "max_deliveries=1" in letter["error"] and "boom" in letter["error"]
    letter["event"].payload["k"] = "changed"
    assert (await p.dead_letters())[0]["event"].payload == {"k": "v"}
    assert await p.dead_letters("other") == []
    await p.close()
    with pytest.raises(StopAsyncIteration):
        await member.__anext__()
    assert second.event.type == "test.event"
    with pytest.raises(ProviderError, match="closed"):
        p.consume(group="g")


async def test_closing_a_stream_releases_a_blocked_publisher() -> None:
    p = MemoryProvider(stream_buffer=1)
    stream = p.stream()
    await p.publish(ev())
    async with anyio.create_task_group() as tg:
        tg.start_soon(p.publish, ev())
        await anyio.wait_all_tasks_blocked()
        await stream.aclose()
    assert (await p.stats()).active_subscribers == 0


async def test_a_forgotten_stream_is_unregistered() -> None:
    p = MemoryProvider(stream_buffer=1)
    p.stream()  # never iterated, never closed
    gc.collect()
    assert (await p.stats()).active_subscribers == 0
    await p.publish(ev())
    await p.publish(ev())  # would block forever if the stream still counted


async def test_stream_registers_when_created_not_when_first_read() -> None:
    p = MemoryProvider()
    async with p.stream("test.*") as stream:
        e = ev()
        await p.publish(e)
        assert (await stream.__anext__()).id == e.id
    assert (await p.stats()).events_consumed == 1


async def test_close_ends_the_streams_and_refuses_work() -> None:
    p = MemoryProvider()
    stream = p.stream()
    await p.close()
    async for _ in stream:
        raise AssertionError("a closed provider delivers nothing")
    with pytest.raises(ProviderError, match="closed"):
        await p.store(ev())
    with pytest.raises(ProviderError, match="closed"):
        p.stream()
    await p.close()


# -- outage simulation (for relay tests) ---------------------------------------------------------


async def test_fail_with_and_fail_when() -> None:
    p = MemoryProvider()
    p.fail_with = ProviderUnavailable("down")
    with pytest.raises(ProviderUnavailable):
        await p.publish(ev())
    with pytest.raises(ProviderUnavailable):
        await p.store(ev())
    p.fail_with = None
    bad = ev("poison.pill")
    p.fail_when = lambda e: ProviderError("refused") if e.type == "poison.pill" else None
    with pytest.raises(ProviderError, match="refused"):
        await p.publish(bad)
    good = ev()
    await p.publish(good)
    assert await ids(p) == {good.id}


# -- input ---------------------------------------------------------------------------------------


async def test_naive_datetimes_are_stored_as_utc() -> None:
    p = MemoryProvider()
    e = ev(created_at=dt.datetime(2030, 1, 1, 12, 0))  # naive
    await p.store(e)
    got = await p.get(e.id)
    assert got is not None and got.created_at == dt.datetime(2030, 1, 1, 12, 0, tzinfo=dt.UTC)


async def test_bad_input_is_refused_clearly() -> None:
    p = MemoryProvider()
    with pytest.raises(ValueError, match="not a valid event id"):
        await p.get("not-a-uuid")
    with pytest.raises(TypeError, match=r"outbox\.Event"):
        await p.store({"type": "x"})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no id"):
        await p.store(Event(type="x", source="system"))
    with pytest.raises(ValueError, match="max_events"):
        MemoryProvider(max_events=0)


def test_copy_event_is_a_deep_copy_equal_to_event_copy() -> None:
    e = ev(metadata={"changes": {"a": {"old": [1], "new": [2]}}})
    c = copy_event(e)
    assert c.to_dict() == e.to_dict() == e.copy().to_dict()
    c.meta["changes"]["a"]["old"].append(9)
    assert e.meta["changes"]["a"]["old"] == [1]


async def test_publish_keeps_the_event_itself_store_keeps_a_copy() -> None:
    # publish_many is the relay's hot path: a published event is the provider's (the Publisher
    # contract), so it is kept without a copy; what the provider hands out is still a copy.
    p = MemoryProvider()
    published, stored = ev(), ev()
    assert await p.publish_many([published]) == [None]
    await p.store(stored)
    assert p._events[published.id.int] is published
    assert p._events[stored.id.int] is not stored
    got = await p.get(published.id)
    assert got is not None and got is not published and got.to_dict() == published.to_dict()
    got.payload["k"] = "changed"
    again = await p.get(published.id)
    assert again is not None and again.payload == {"k": "v"}
