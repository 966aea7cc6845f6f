"""outbox.Consumer on Redis, NATS and the memory provider: ack after success, retries, parking,
order, graceful stop."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import pytest

from outbox import Broker, MemoryProvider, RetryPolicy, new_event
from outbox.consume import Consumer
from outbox.events import Event
from outbox.providers.nats import NATSProvider
from outbox.providers.redis import RedisProvider
from tests.conftest import NatsNames
from tests.helpers import eventually

pytestmark = pytest.mark.anyio

FAST = RetryPolicy(max_retries=2, initial_delay=0.05, max_delay=0.2, jitter=0)


@pytest.fixture(params=["redis", "nats", "memory"])
async def bus(request: pytest.FixtureRequest) -> AsyncIterator[Callable[..., Any]]:
    """A factory of providers on one stream of the test's own (several may share it; the memory
    provider is one process's bus, so its factory hands out the same one)."""
    made: list[Any] = []
    if request.param == "memory":
        memory = MemoryProvider()

        def make(**kw: Any) -> Any:
            if not made:
                made.append(memory)
            return memory
    elif request.param == "redis":
        url = request.getfixturevalue("redis_url")
        prefix = request.getfixturevalue("redis_prefix")

        def make(**kw: Any) -> Any:
            options = {"claim_idle": 2.0, "block": 0.1, **kw}
            made.append(RedisProvider(url, stream_name=f"{prefix}:events", **options))
            return made[-1]
    else:
        url = request.getfixturevalue("nats_url")
        names: NatsNames = request.getfixturevalue("nats_names")

        def make(**kw: Any) -> Any:
            options = {"claim_idle": 2.0, "block": 0.1, **kw}
            made.append(NATSProvider(url, stream_name=names.stream,
                                     subject_prefix=names.subject_prefix, **options))
            return made[-1]

    yield make
    for provider in made:
        await provider.close()


def _broker() -> Broker:
    return Broker(MemoryProvider(), sync_handlers="inline", retry_policy=FAST)


@contextlib.asynccontextmanager
async def running(consumer: Consumer) -> AsyncIterator[Consumer]:
    async with anyio.create_task_group() as tg:
        tg.start_soon(consumer.run)
        with anyio.fail_after(10):
            await consumer.wait_started()
        try:
            yield consumer
        finally:
            consumer.stop()


def _events(n: int, type_: str = "public.users.create", **kw: Any) -> list[Event]:
    return [new_event(source="database", type=type_, payload={"i": i}, **kw) for i in range(n)]


async def _pending(provider: Any, group: str) -> int:
    stats = await provider.stats()
    g = stats.extra["groups"][group]
    if isinstance(provider, MemoryProvider):
        return int(g["waiting"] + g["delayed"] + g["held"])
    return int(g.get("pending", 0)) + int(g.get("ack_pending", 0)) if isinstance(
        provider, NATSProvider) else int(g["pending"])


async def test_handlers_run_and_events_are_acked(bus: Callable[..., Any]) -> None:
    provider = bus()
    broker = _broker()
    seen: list[Any] = []
    broker.subscribe("public.users.*", lambda e: seen.append(e.id))
    consumer = Consumer(provider, group="app", broker=broker, start="beginning")
    events = _events(10) + _events(2, "public.orders.create")
    async with running(consumer):
        await provider.publish_many(events)
        await eventually(lambda: consumer.stats.handled + consumer.stats.unhandled == 12)
    assert sorted(seen) == sorted(e.id for e in events[:10])
    assert consumer.stats.handled == 10 and consumer.stats.unhandled == 2
    assert await _pending(provider, "app") == 0


async def test_failing_handler_is_retried_by_policy_then_succeeds(bus: Callable[..., Any]) -> None:
    provider = bus()
    broker = _broker()
    calls: list[int] = []
    good_calls: list[int] = []

    def flaky(event: Event) -> None:
        calls.append(1)
        if len(calls) < 3:
            raise RuntimeError(f"transient {len(calls)}")

    broker.subscribe("public.users.create", flaky, name="flaky")
    broker.subscribe("public.users.create", lambda e: good_calls.append(1), name="good")
    consumer = Consumer(provider, group="app", broker=broker, start="beginning")
    async with running(consumer):
        await provider.publish(_events(1)[0])
        await eventually(lambda: consumer.stats.handled == 1)
    assert len(calls) == 3 and consumer.stats.retried == 2
    assert len(good_calls) == 1, "a handler that succeeded is not run again on retries"
    assert await _pending(provider, "app") == 0


async def test_exhausted_retries_park_the_event_with_the_error(bus: Callable[..., Any]) -> None:
    provider = bus()
    broker = _broker()

    def broken(event: Event) -> None:
        raise ValueError("bad row")

    broker.subscribe("public.users.create", broken, name="broken")
    consumer = Consumer(provider, group="app", broker=broker, start="beginning")
    event = _events(1)[0]
    async with running(consumer):
        await provider.publish(event)
        await eventually(lambda: consumer.stats.parked == 1)
    assert consumer.stats.retried == FAST.max_retries
    dead = await provider.dead_letters()
    assert len(dead) == 1
    error = dead[0].get("error") or dead[0].get("Outbox-Error")
    assert error == "broken: ValueError: bad row"
    assert await _pending(provider, "app") == 0


async def test_patterns_restrict_what_the_group_takes(bus: Callable[..., Any]) -> None:
    provider = bus()
    broker = _broker()
    seen: list[str] = []
    broker.subscribe("public.>", lambda e: seen.append(e.type))
    consumer = Consumer(provider, group="users", patterns=["public.users.*", "public.roles.*"],
                        broker=broker, start="beginning")
    async with running(consumer):
        await provider.publish_many(_events(2, "public.users.create")
                                    + _events(2, "public.orders.create")
                                    + _events(1, "public.roles.delete"))
        await eventually(lambda: consumer.stats.handled + consumer.stats.unhandled == 5)
    assert sorted(seen) == ["public.roles.delete", "public.users.create", "public.users.create"]


async def test_events_of_one_key_are_handled_in_order(bus: Callable[..., Any]) -> None:
    provider = bus()
    broker = _broker()
    log: list[tuple[str, int]] = []
    active: dict[str, int] = {}

    async def handler(event: Event) -> None:
        key = event.ordering_key or ""
        active[key] = active.get(key, 0) + 1
        assert active[key] == 1, "two events of one key at once"
        await anyio.sleep(0.01)
        log.append((key, event.payload["i"]))
        active[key] -= 1

    broker.subscribe("*", handler)
    consumer = Consumer(provider, group="app", broker=broker, concurrency=8, start="beginning")
    a = _events(10, ordering_key="users:1")
    b = _events(10, ordering_key="users:2")
    async with running(consumer):
        await provider.publish_many([x for pair in zip(a, b, strict=True) for x in pair])
        await eventually(lambda: consumer.stats.handled == 20)
    for key in ("users:1", "users:2"):
        assert [i for k, i in log if k == key] == list(range(10))


async def test_stop_lets_the_handler_in_flight_finish(bus: Callable[..., Any]) -> None:
    provider = bus()
    broker = _broker()
    started = anyio.Event()
    finished: list[Any] = []

    async def slow(event: Event) -> None:
        started.set()
        await anyio.sleep(0.5)
        finished.append(event.id)

    broker.subscribe("*", slow)
    consumer = Consumer(provider, group="app", broker=broker, start="beginning")
    event = _events(1)[0]
    async with anyio.create_task_group() as tg:
        tg.start_soon(consumer.run)
        await consumer.wait_started()
        await provider.publish(event)
        with anyio.fail_after(10):
            await started.wait()
        consumer.stop()  # what SIGTERM does
    assert finished == [event.id] and consumer.stats.handled == 1
    assert await _pending(provider, "app") == 0


async def test_shutdown_timeout_leaves_the_delivery_for_the_group(
        bus: Callable[..., Any]) -> None:
    provider = bus(claim_idle=1.0)
    broker = _broker()
    started = anyio.Event()
    calls: list[int] = []

    async def slow(event: Event) -> None:
        calls.append(1)
        if len(calls) == 1:
            started.set()
            await anyio.sleep(30)

    broker.subscribe("*", slow)
    first = Consumer(provider, group="app", broker=broker, start="beginning",
                     shutdown_timeout=0.2)
    async with anyio.create_task_group() as tg:
        tg.start_soon(first.run)
        await first.wait_started()
        await provider.publish(_events(1)[0])
        with anyio.fail_after(10):
            await started.wait()
        first.stop()
    assert first.stats.handled == 0
    # Another member of the group gets it again and handles it.
    second = Consumer(bus(claim_idle=1.0), group="app", broker=broker)
    async with running(second):
        await eventually(lambda: second.stats.handled == 1, within=20)
    assert len(calls) == 2


async def test_a_repeated_delivery_is_skipped_by_event_id(redis_url: str,
                                                          redis_prefix: str) -> None:
    import redis.asyncio as aioredis

    from outbox import wire

    provider = RedisProvider(redis_url, stream_name=f"{redis_prefix}:dups", block=0.1)
    broker = _broker()
    calls: list[Any] = []
    broker.subscribe("*", lambda e: calls.append(e.id))
    consumer = Consumer(provider, group="app", broker=broker, start="beginning")
    event = _events(1)[0]
    raw = aioredis.Redis.from_url(redis_url)
    try:
        async with running(consumer):
            await provider.publish(event)
            # Past the publish dedupe (e.g. a relay retrying after duplicate_window): a second
            # entry with the same event id.
            await raw.xadd(provider.stream_name, {"id": str(event.id), "type": event.type,
                                                  "source": event.source,
                                                  "event": wire.encode(event)})
            await eventually(lambda: consumer.stats.duplicates == 1)
    finally:
        await raw.aclose()
        await provider.close()
    assert calls == [event.id] and consumer.stats.handled == 1
