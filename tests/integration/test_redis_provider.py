"""RedisProvider on a real Redis: what is Redis-specific (the entry fields, dedupe keys, MAXLEN,
outages, credentials, configuration). Consumer groups: ``tests/conformance``."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest
import redis.asyncio as aioredis

import outbox
from outbox import new_event, wire
from outbox.events import Event
from outbox.exceptions import MalformedMessage, ProviderUnavailable
from outbox.providers.base import Delivery
from outbox.providers.redis import RedisProvider
from tests import servers
from tests.helpers import take

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


def _ids(deliveries: list[Delivery]) -> list[uuid.UUID]:
    return [d.event.id for d in deliveries]


# -- publishing -----------------------------------------------------------------------------------


async def test_publish_writes_spec_fields_and_is_idempotent(provider: RedisProvider,
                                                            raw: Any) -> None:
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


# -- as a broker's provider -------------------------------------------------------------------


async def test_a_broker_on_redis_keeps_statuses_on_the_events_only(provider: RedisProvider,
                                                                   raw: Any) -> None:
    """Redis keeps no queryable events (no EventStore): a broker on it runs the handlers and sets
    the statuses on the event objects, and writes nothing to Redis."""
    broker = outbox.Broker(provider, mode="sync", sync_handlers="inline",
                           retry_policy=outbox.RetryPolicy(max_retries=1, initial_delay=0.01))
    seen: list[uuid.UUID] = []

    def handler(event: Event) -> None:
        seen.append(event.id)
        if event.payload.get("fail"):
            raise ValueError("nope")

    broker.subscribe("public.>", handler, name="handler")
    done = new_event(source="database", type="public.users.create", payload={})
    failed = new_event(source="database", type="public.users.create", payload={"fail": True})
    unhandled = new_event(source="system", type="nobody.listens", payload={})
    async with broker:
        await broker.publish_sync(done)
        with pytest.raises(outbox.exceptions.HandlerError):
            await broker.publish_sync(failed)
        await broker.publish_sync(unhandled)
    assert (done.status, failed.status, unhandled.status) == ("completed", "failed", "completed")
    assert "ValueError: nope" in (failed.error or "") and seen[0] == done.id
    assert [k async for k in raw.scan_iter(match=f"{provider.stream_name}*")] == []
    stats = await broker.stats()
    assert (stats.total_processed, stats.total_failed) == (2, 1)
    assert stats.provider_stats.provider == "redis"


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
            await take(it, 2)
            server.stop()
            await anyio.sleep(0.5)
            server.start()
            later = _events(2)
            await p.publish_many(later)
            got = await take(it, 2, within=20)
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
