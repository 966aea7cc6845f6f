"""RedisProvider on a real Redis: idempotent publish, consumer groups, reclaim, dead letters."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import textwrap
import uuid
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest
import redis.asyncio as aioredis
from anyio.streams.buffered import BufferedByteReceiveStream

from outbox import MalformedMessage, ProviderError, ProviderUnavailable, new_event, wire
from outbox.events import Event
from outbox.providers.base import Delivery, EventFilter, EventNotFound, SupportsConsume
from outbox.providers.redis import RedisProvider
from tests import servers

pytestmark = pytest.mark.anyio


def _events(n: int, type_: str = "public.users.create") -> list[Event]:
    return [new_event(source="database", type=type_, payload={"i": i}) for i in range(n)]


@pytest.fixture
async def provider(redis_url: str, redis_prefix: str) -> AsyncIterator[RedisProvider]:
    p = RedisProvider(redis_url, stream_name=f"{redis_prefix}:events", claim_idle=1.0,
                      block=0.2)
    yield p
    await p.close()


@pytest.fixture
async def raw(redis_url: str) -> AsyncIterator[Any]:
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


async def _take(it: AsyncIterator[Delivery], n: int, *, ack: bool = True,
                within: float = 10.0) -> list[Delivery]:
    got: list[Delivery] = []
    with anyio.fail_after(within):
        while len(got) < n:
            delivery = await it.__anext__()
            if ack:
                await delivery.ack()
            got.append(delivery)
    return got


async def _nothing_more(it: AsyncIterator[Delivery], wait: float = 0.6) -> None:
    with anyio.move_on_after(wait):
        extra = await it.__anext__()
        pytest.fail(f"unexpected delivery {extra!r}")


def _ids(deliveries: list[Delivery]) -> list[uuid.UUID]:
    return [d.event.id for d in deliveries]


# -- publishing -----------------------------------------------------------------------------------


async def test_publish_writes_spec_fields_and_is_idempotent(provider: RedisProvider,
                                                            raw: Any) -> None:
    assert isinstance(provider, SupportsConsume)
    events = _events(3)
    assert await provider.publish_many(events) == [None, None, None]
    await provider.publish(events[0])  # a relay retry after a timeout
    assert await provider.publish_many(events) == [None, None, None]
    assert await raw.xlen(provider.stream_name) == 3
    entries = await raw.xrange(provider.stream_name)
    fields = entries[0][1]
    assert set(fields) == {b"id", b"type", b"source", b"event"}
    assert fields[b"id"] == str(events[0].id).encode()
    assert fields[b"type"] == b"public.users.create" and fields[b"source"] == b"database"
    assert wire.decode(fields[b"event"]).id == events[0].id
    stats = await provider.stats()
    assert stats.events_published == 3 and stats.extra["duplicates_dropped"] == 4


async def test_unencodable_event_fails_alone(provider: RedisProvider, raw: Any) -> None:
    good = _events(2)
    bad = Event(source="database", type="x")  # no id: never flushed
    results = await provider.publish_many([good[0], bad, good[1]])
    assert results[0] is None and results[2] is None
    assert isinstance(results[1], MalformedMessage)
    assert await raw.xlen(provider.stream_name) == 2


async def test_max_len_trims_approximately(redis_url: str, redis_prefix: str, raw: Any) -> None:
    p = RedisProvider(redis_url, stream_name=f"{redis_prefix}:trim", max_len=100)
    try:
        for _ in range(10):
            await p.publish_many(_events(100))
        length = await raw.xlen(p.stream_name)
        assert 100 <= length < 1000
    finally:
        await p.close()


# -- consumer groups ---------------------------------------------------------------------------


async def test_every_group_gets_every_event_once(provider: RedisProvider) -> None:
    events = _events(20)
    a = provider.consume(group="billing", start="beginning")
    b = provider.consume(group="search", start="beginning")
    async with contextlib.aclosing(a), contextlib.aclosing(b):
        await provider.publish_many(events)
        got_a = await _take(a, 20)
        got_b = await _take(b, 20)
        await _nothing_more(a)
        await _nothing_more(b)
    assert sorted(_ids(got_a)) == sorted(e.id for e in events) == sorted(_ids(got_b))
    assert all(d.attempt == 1 for d in got_a + got_b)


async def test_consumers_of_one_group_share_the_work(redis_url: str, redis_prefix: str) -> None:
    stream = f"{redis_prefix}:share"
    p1 = RedisProvider(redis_url, stream_name=stream, prefetch=5, block=0.2)
    p2 = RedisProvider(redis_url, stream_name=stream, prefetch=5, block=0.2)
    events = _events(60)
    seen: dict[str, list[uuid.UUID]] = {"one": [], "two": []}
    all_seen = anyio.Event()

    async def run(p: RedisProvider, name: str) -> None:
        async with contextlib.aclosing(p.consume(group="workers", consumer=name,
                                                 start="beginning")) as it:
            async for d in it:
                seen[name].append(d.event.id)
                await anyio.sleep(0.005)  # a handler that takes a moment
                await d.ack()
                if len(seen["one"]) + len(seen["two"]) >= len(events):
                    all_seen.set()

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(run, p1, "one")
            tg.start_soon(run, p2, "two")
            await anyio.sleep(0.3)
            await p1.publish_many(events)
            with anyio.fail_after(15):
                await all_seen.wait()
            await anyio.sleep(0.3)  # room for a (wrong) duplicate to show up
            tg.cancel_scope.cancel()
    finally:
        await p1.close()
        await p2.close()
    assert seen["one"] and seen["two"], "both consumers got a share"
    assert sorted(seen["one"] + seen["two"]) == sorted(e.id for e in events)


async def test_new_group_starts_at_the_end_unless_told(provider: RedisProvider) -> None:
    old = _events(3)
    await provider.publish_many(old)
    late = provider.consume(group="late")
    early = provider.consume(group="early", start="beginning")
    async with contextlib.aclosing(late), contextlib.aclosing(early):
        with anyio.move_on_after(0.5):
            await late.__anext__()  # creates the group at "$"
            pytest.fail("a new group saw old entries")
        fresh = _events(2)
        await provider.publish_many(fresh)
        assert sorted(_ids(await _take(late, 2))) == sorted(e.id for e in fresh)
        assert len(await _take(early, 5)) == 5


async def test_pattern_filter_acks_what_the_group_does_not_want(provider: RedisProvider,
                                                                raw: Any) -> None:
    users = _events(3, "public.users.create")
    orders = _events(3, "public.orders.create")
    it = provider.consume("public.users.*", group="users-only", start="beginning")
    async with contextlib.aclosing(it):
        await provider.publish_many([x for pair in zip(users, orders, strict=True) for x in pair])
        got = await _take(it, 3)
        await _nothing_more(it)
        # The other pattern in this process may not share the group: it would lose events.
        other = provider.consume("public.orders.*", group="users-only")
        with pytest.raises(ProviderError, match="already consumed with pattern"):
            await other.__anext__()
    assert sorted(_ids(got)) == sorted(e.id for e in users)
    pending = await raw.xpending(provider.stream_name, "users-only")
    assert pending["pending"] == 0


async def test_nack_redelivers_after_delay_then_max_deliveries_dead_letters(
        redis_url: str, redis_prefix: str, raw: Any) -> None:
    p = RedisProvider(redis_url, stream_name=f"{redis_prefix}:retry", max_deliveries=3,
                      block=0.1, claim_idle=5)
    event = _events(1)[0]
    try:
        it = p.consume(group="g", start="beginning")
        async with contextlib.aclosing(it):
            await p.publish(event)
            attempts = []
            for _ in range(3):
                (d,) = await _take(it, 1, ack=False)
                assert d.event.id == event.id
                attempts.append(d.attempt)
                await d.nack(f"boom {d.attempt}", delay=0.05)
            assert attempts == [1, 2, 3]
            await _nothing_more(it, 1.0)
        dead = await p.dead_letters()
        assert len(dead) == 1
        assert dead[0]["id"] == str(event.id)
        assert "max_deliveries=3" in dead[0]["error"] and "boom 3" in dead[0]["error"]
        assert dead[0]["group"] == "g"
        assert (await raw.xpending(p.stream_name, "g"))["pending"] == 0
    finally:
        await p.close()


async def test_park_moves_to_dead_letter_stream(provider: RedisProvider, raw: Any) -> None:
    events = _events(2)
    it = provider.consume(group="g", start="beginning")
    async with contextlib.aclosing(it):
        await provider.publish_many(events)
        first, second = await _take(it, 2, ack=False)
        await first.park("handler gave up: ValueError: nope")
        await second.ack()
        with pytest.raises(ProviderError, match="already settled"):
            await first.ack()
    dead = await provider.dead_letters()
    assert [r["id"] for r in dead] == [str(first.event.id)]
    assert dead[0]["error"] == "handler gave up: ValueError: nope"
    assert wire.decode(dead[0]["event"]).id == first.event.id
    assert (await raw.xpending(provider.stream_name, "g"))["pending"] == 0


async def test_malformed_entries_are_parked_and_the_consumer_continues(
        provider: RedisProvider, raw: Any) -> None:
    it = provider.consume(group="g", start="beginning")
    good = _events(1)[0]
    async with contextlib.aclosing(it):
        await raw.xadd(provider.stream_name, {"id": "x", "type": "t", "event": b"\xff not json"})
        await raw.xadd(provider.stream_name, {"type": "t", "source": "s"})  # no event field
        await raw.xadd(provider.stream_name, {"event": json.dumps({"specversion": "0.3"})})
        await provider.publish(good)
        (d,) = await _take(it, 1)
        assert d.event.id == good.id
    dead = await provider.dead_letters()
    assert len(dead) == 3
    assert "not JSON" in dead[0]["error"]
    assert "no 'event' field" in dead[1]["error"]
    assert "specversion" in dead[2]["error"]
    assert all(r["error"].startswith("malformed:") for r in dead)
    assert (await raw.xpending(provider.stream_name, "g"))["pending"] == 0


_KILLED_CONSUMER = textwrap.dedent("""
    import asyncio, sys
    from outbox.providers.redis import RedisProvider

    async def main():
        p = RedisProvider(sys.argv[1], stream_name=sys.argv[2], claim_idle=1.0, block=0.2)
        async for d in p.consume(group="g", consumer="doomed", start="beginning"):
            print(d.event.id, flush=True)   # then hang in the "handler" until killed
            await asyncio.sleep(3600)

    asyncio.run(main())
""")


async def test_entries_of_a_killed_consumer_are_reclaimed(provider: RedisProvider,
                                                          redis_url: str) -> None:
    events = _events(3)
    await provider.publish_many(events)
    proc = await anyio.open_process(
        [sys.executable, "-c", _KILLED_CONSUMER, redis_url, provider.stream_name],
        env={**os.environ, "PYTHONPATH": os.getcwd()}, stderr=None)
    try:
        assert proc.stdout is not None
        with anyio.fail_after(20):
            line = await BufferedByteReceiveStream(proc.stdout).receive_until(b"\n", 100)
        taken = uuid.UUID(line.decode().strip())
    finally:
        proc.kill()
        await proc.wait()
    it = provider.consume(group="g", consumer="survivor")
    async with contextlib.aclosing(it):
        got = await _take(it, 3, within=20)
    by_id = {d.event.id: d for d in got}
    assert sorted(by_id) == sorted(e.id for e in events)
    # The one the dead consumer was handling comes back as a second delivery.
    assert by_id[taken].attempt == 2


async def test_slow_handler_keeps_its_entry(redis_url: str, redis_prefix: str) -> None:
    """A handler that runs longer than claim_idle is not mistaken for a dead consumer."""
    stream = f"{redis_prefix}:slow"
    slow = RedisProvider(redis_url, stream_name=stream, claim_idle=1.0, block=0.1)
    other = RedisProvider(redis_url, stream_name=stream, claim_idle=1.0, block=0.1)
    event = _events(1)[0]
    try:
        a = slow.consume(group="g", consumer="slow", start="beginning")
        b = other.consume(group="g", consumer="other", start="beginning")
        async with contextlib.aclosing(a), contextlib.aclosing(b):
            await slow.publish(event)
            (d,) = await _take(a, 1, ack=False)
            await _nothing_more(b, 3.0)  # three claim_idle periods
            await d.ack()
    finally:
        await slow.close()
        await other.close()


async def test_closing_releases_unhandled_entries_at_once(redis_url: str,
                                                          redis_prefix: str) -> None:
    stream = f"{redis_prefix}:release"
    first = RedisProvider(redis_url, stream_name=stream, claim_idle=30, prefetch=10, block=0.1)
    second = RedisProvider(redis_url, stream_name=stream, claim_idle=30, prefetch=10, block=0.1)
    events = _events(5)
    try:
        a = first.consume(group="g", consumer="a", start="beginning")
        await first.publish_many(events)
        (d,) = await _take(a, 1)  # the other four sit in a's buffer, delivered to it
        await a.aclose()
        b = second.consume(group="g", consumer="b")
        async with contextlib.aclosing(b):
            rest = await _take(b, 4, within=10)  # without waiting 30 s of claim_idle
    finally:
        await first.close()
        await second.close()
    assert sorted([d.event.id, *_ids(rest)]) == sorted(e.id for e in events)


# -- storage API -----------------------------------------------------------------------------------


async def test_store_get_list_update_delete(provider: RedisProvider) -> None:
    stored = new_event(source="system", type="job.done", payload={"n": 1}, user_id="u1")
    published = new_event(source="database", type="public.users.create", payload={"n": 2})
    await provider.store(stored)
    await provider.publish(published)
    assert (await provider.get(stored.id)).payload == {"n": 1}  # type: ignore[union-attr]
    assert (await provider.get(published.id)).payload == {"n": 2}  # type: ignore[union-attr]
    assert await provider.get(uuid.uuid4()) is None
    assert [e.id for e in await provider.list(EventFilter(user_id="u1"))] == [stored.id]
    assert len(await provider.list()) == 2
    await provider.update_status(published.id, "completed")
    got = await provider.get(published.id)
    assert got is not None and got.status == "completed" and got.completed_at is not None
    await provider.delete(stored.id)
    assert await provider.get(stored.id) is None
    with pytest.raises(EventNotFound):
        await provider.delete(stored.id)
    with pytest.raises(EventNotFound):
        await provider.update_status(uuid.uuid4(), "failed")


async def test_stream_tails_new_events(provider: RedisProvider) -> None:
    it = provider.stream("public.users.*")
    events = _events(2) + _events(1, "public.orders.create")

    async def publish_soon() -> None:
        await anyio.sleep(0.3)
        await provider.publish_many(events)

    async with anyio.create_task_group() as tg:
        tg.start_soon(publish_soon)
        with anyio.fail_after(10):
            got = [await it.__anext__(), await it.__anext__()]
    assert [e.id for e in got] == [e.id for e in events[:2]]


# -- connection settings and outages ----------------------------------------------------------


async def test_outage_raises_provider_unavailable_quickly_then_recovers() -> None:
    server = servers.PrivateRedis()
    server.start()
    p = RedisProvider(server.url, stream_name="outage", connect_timeout=1, socket_timeout=2)
    try:
        await p.publish_many(_events(2))
        server.stop()
        with anyio.fail_after(8):  # bounded retries: the relay notices within seconds
            with pytest.raises(ProviderUnavailable):
                await p.publish_many(_events(2))
            with pytest.raises(ProviderUnavailable):
                await p.ping()
        server.start()
        assert await p.publish_many(_events(2)) == [None, None]
    finally:
        await p.close()
        server.close()


async def test_consumer_survives_a_restart() -> None:
    server = servers.PrivateRedis(args=("--appendonly", "yes", "--appendfsync", "always"))
    server.start()
    p = RedisProvider(server.url, stream_name="restart", block=0.2, connect_timeout=1,
                      socket_timeout=2)
    try:
        it = p.consume(group="g", start="beginning")
        async with contextlib.aclosing(it):
            await p.publish_many(_events(2))
            await _take(it, 2)
            server.stop()
            await anyio.sleep(0.5)
            server.start()
            later = _events(2)
            await p.publish_many(later)
            got = await _take(it, 2, within=20)
        assert sorted(_ids(got)) == sorted(e.id for e in later)
    finally:
        await p.close()
        server.close()


async def test_password_is_used_and_never_shown() -> None:
    secret = "s3cr3t-" + uuid.uuid4().hex[:8]
    server = servers.PrivateRedis(args=("--requirepass", secret))
    server.start()
    try:
        good = RedisProvider(f"redis://:{secret}@127.0.0.1:{server.port}/0", stream_name="auth")
        assert secret not in repr(good)
        await good.publish(_events(1)[0])
        await good.close()
        by_kw = RedisProvider(f"redis://127.0.0.1:{server.port}/0", password=secret,
                              stream_name="auth")
        await by_kw.ping()
        await by_kw.close()
        wrong = RedisProvider(f"redis://:nope-{secret}@127.0.0.1:{server.port}/0",
                              stream_name="auth")
        with pytest.raises(ProviderUnavailable) as info:
            await wrong.publish(_events(1)[0])
        assert secret not in str(info.value)
        await wrong.close()
    finally:
        server.close()


def test_from_config_reads_the_redis_section() -> None:
    p = RedisProvider.from_config({"redis": {
        "host": "127.0.0.1", "port": 6390, "db": 2, "password": "pw", "stream_name": "s",
        "consumer_group": "grp", "max_len": 50, "claim_idle": 7, "max_deliveries": 4,
        "duplicate_window": 60,
    }})
    assert (p.stream_name, p.consumer_group, p.max_len, p.claim_idle, p.max_deliveries,
            p.duplicate_window) == ("s", "grp", 50, 7.0, 4, 60.0)
    assert "pw" not in repr(p)
    with pytest.raises(ValueError, match="claim_idle"):
        RedisProvider(claim_idle=0)
    with pytest.raises(ValueError, match="consumer group"):
        RedisProvider(consumer_group="bad name")
