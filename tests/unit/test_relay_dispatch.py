"""The relay's batch processing without a database: lanes, forwarding rounds, partial success."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import anyio
import pytest

import outbox
from outbox import Broker, Event, RetryPolicy
from outbox.events import utcnow
from outbox.exceptions import ProviderError, ProviderUnavailable
from outbox.providers.memory import MemoryProvider
from outbox.relay.dispatch import BatchResult, Dispatcher, handled_names, lanes

POLICY = RetryPolicy(max_retries=2, initial_delay=1.0, jitter=0.0)


def batch(keys: list[str | None]) -> list[Event]:
    out = []
    for seq, key in enumerate(keys, start=1):
        e = outbox.new_event("system", "test.x.create", {"seq": seq}, ordering_key=key)
        e.seq = seq
        e.status = "processing"
        out.append(e)
    return out


def test_lanes_group_by_key_in_seq_order_and_keyless_alone() -> None:
    events = batch(["a", None, "b", "a", None, "b", "a"])
    got = [[e.seq for e in lane] for lane in lanes(events)]
    assert got == [[1, 4, 7], [2], [3, 6], [5]]


async def run(events: list[Event], broker: Broker | None, provider: object) -> BatchResult:
    d = Dispatcher(broker, provider, retry_policy=POLICY, now=utcnow, concurrency=4)
    result = BatchResult()
    await d.run(events, result)
    result.release_rest(events)
    return result


@pytest.mark.anyio
@pytest.mark.parametrize("style", ["async", "sync"])  # sync: the batch's worker threads
async def test_failing_event_holds_back_rest_of_its_lane_only(style: str) -> None:
    events = batch(["a", "b", "a", "b", "a"])
    broker = Broker(MemoryProvider())
    seen: list[int] = []

    def handler(e: Event) -> None:
        seen.append(e.seq)
        if e.seq == 3:
            raise RuntimeError("no")

    async def async_handler(e: Event) -> None:
        handler(e)

    broker.subscribe("test.>", async_handler if style == "async" else handler, name="h")
    res = await run(events, broker, broker.provider)
    status = {o.event.seq: (o.status, o.retry_count) for o in res.outcomes.values()}
    assert status == {1: ("completed", None), 2: ("completed", None), 3: ("pending", 1),
                      4: ("completed", None), 5: ("pending", None)}
    assert 5 not in seen  # never started
    retry = res.outcomes[events[2].id]
    assert retry.next_attempt_at is not None and retry.next_attempt_at > utcnow()
    assert "h: RuntimeError: no" in (retry.error or "")


@pytest.mark.anyio
async def test_exhausted_retries_fail_the_event() -> None:
    (event,) = batch(["k"])
    event.retry_count = 2  # max_retries=2: this was the last attempt
    broker = Broker(MemoryProvider())

    async def boom(e: Event) -> None:
        raise ValueError("bad")

    broker.subscribe("test.>", boom, name="boom")
    res = await run([event], broker, None)
    (o,) = res.outcomes.values()
    assert (o.status, o.retry_count) == ("failed", 3)


@pytest.mark.anyio
async def test_partial_success_is_recorded_and_skipped_next_time() -> None:
    (event,) = batch(["k"])
    broker = Broker(MemoryProvider())
    calls: list[str] = []
    fail = {"flaky": True}

    async def steady(e: Event) -> None:
        calls.append("steady")

    async def flaky(e: Event) -> None:
        calls.append("flaky")
        if fail["flaky"]:
            raise RuntimeError("once")

    broker.subscribe("test.>", steady, name="steady")
    broker.subscribe("test.>", flaky, name="flaky")
    res = await run([event], broker, None)
    (o,) = res.outcomes.values()
    assert o.status == "pending" and o.meta is not None
    event.meta = o.meta
    assert handled_names(event) == ("steady",)
    fail["flaky"] = False
    res = await run([event], broker, None)
    assert [x.status for x in res.outcomes.values()] == ["completed"]
    assert calls == ["steady", "flaky", "flaky"]


@pytest.mark.anyio
async def test_forward_rounds_keep_key_order_when_the_provider_refuses_one() -> None:
    events = batch(["a", "b", "a", "a"])
    provider = MemoryProvider()
    published: list[int] = []
    real = provider.publish_many

    async def spy(events: Sequence[Event]) -> list[BaseException | None]:
        results = await real(events)
        published.extend(e.payload["seq"] for e, r in zip(events, results, strict=True)
                         if r is None)
        return results

    provider.publish_many = spy  # type: ignore[method-assign]
    provider.fail_when = lambda e: ProviderError("too big") if e.payload["seq"] == 1 else None
    res = await run(events, None, provider)
    status = {o.event.seq: o.status for o in res.outcomes.values()}
    assert status == {1: "pending", 2: "completed", 3: "pending", 4: "pending"}
    assert published == [2]  # nothing of key a got past its refused head
    assert res.outcomes[events[0].id].retry_count == 1
    assert res.outcomes[events[2].id].retry_count is None  # handed back, not a retry


@pytest.mark.anyio
async def test_outage_hands_back_unforwarded_events_without_a_retry() -> None:
    events = batch([None, None, None])
    broker = Broker(MemoryProvider())
    broker.subscribe("test.>", lambda e: None, name="noop")
    provider = MemoryProvider()
    provider.fail_with = ProviderUnavailable("down")
    res = await run(events, broker, provider)
    assert isinstance(res.outage, ProviderUnavailable)
    for o in res.outcomes.values():
        assert o.status == "pending" and o.retry_count is None
        assert o.meta is not None and o.meta["outbox"]["handled"] == ["noop"]


@pytest.mark.anyio
async def test_lanes_run_concurrently() -> None:
    events = batch([f"k{i}" for i in range(4)])
    broker = Broker(MemoryProvider())
    running = 0
    peak = 0

    async def slow(e: Event) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await anyio.sleep(0.01)
        running -= 1

    broker.subscribe("test.>", slow, name="slow")
    res = await run(events, broker, None)
    assert peak == 4 and all(o.status == "completed" for o in res.outcomes.values())
    assert len({uuid.UUID(str(k)) for k in res.outcomes}) == 4


# -- sync handlers: a few worker threads per batch, not a thread per event -------------------


@pytest.mark.anyio
async def test_sync_handlers_run_in_a_few_threads_in_key_order_off_the_loop() -> None:
    import threading

    keys: list[str | None] = [f"k{i % 5}" if i % 3 else None for i in range(200)]
    events = batch(keys)
    broker = Broker(MemoryProvider())
    seen: list[tuple[str | None, int]] = []
    threads: set[int] = set()

    def handler(e: Event) -> None:  # the README's style
        threads.add(threading.get_ident())
        seen.append((e.ordering_key, e.seq))

    broker.subscribe("test.>", handler, name="h")
    res = await run(events, broker, None)
    assert all(o.status == "completed" for o in res.outcomes.values())
    assert len(seen) == 200
    assert threading.get_ident() not in threads  # never on the event loop
    assert 1 <= len(threads) <= 4  # concurrency=4 workers for the whole batch
    for key in {k for k in keys if k is not None}:
        order = [seq for k, seq in seen if k == key]
        assert order == sorted(order)
    stats = await broker.stats()
    assert stats.total_dispatched == 200  # counted (and observed) as dispatch() would


@pytest.mark.anyio
async def test_mixed_async_and_sync_handlers_keep_per_event_semantics() -> None:
    events = batch(["a", "b", "a", None])
    for e in events[1:3]:
        e.type = "test.mixed.create"
    broker = Broker(MemoryProvider())
    calls: list[tuple[str, int]] = []

    def sync(e: Event) -> None:
        calls.append(("sync", e.seq))

    async def asynchronous(e: Event) -> None:
        calls.append(("async", e.seq))

    broker.subscribe("test.>", sync, name="s")
    broker.subscribe("test.mixed.>", asynchronous, name="a")
    res = await run(events, broker, None)
    assert all(o.status == "completed" for o in res.outcomes.values())
    assert sorted(calls) == sorted([("sync", 1), ("sync", 2), ("sync", 3), ("sync", 4),
                                    ("async", 2), ("async", 3)])


@pytest.mark.anyio
async def test_a_blocking_sync_handler_does_not_stall_the_loop_and_cancel_records_nothing_more(
) -> None:
    import threading

    events = batch(["a", "a", "a"])
    broker = Broker(MemoryProvider())
    release = threading.Event()
    started: list[int] = []

    def slow(e: Event) -> None:
        started.append(e.seq)
        release.wait(5)

    broker.subscribe("test.>", slow, name="slow")
    d = Dispatcher(broker, None, retry_policy=POLICY, now=utcnow, concurrency=4)
    result = BatchResult()
    ticks = 0
    async with anyio.create_task_group() as tg:

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await anyio.sleep(0.01)
                ticks += 1

        tg.start_soon(ticker)
        with anyio.move_on_after(0.3):
            await d.run(events, result)
        tg.cancel_scope.cancel()
    assert ticks >= 5  # the loop kept running while the handler blocked
    release.set()
    await anyio.sleep(0.1)  # the abandoned thread finishes its handler, takes nothing more
    assert started == [1]
    assert result.outcomes == {}  # nothing recorded after the cancellation


@pytest.mark.anyio
async def test_blocking_sync_handlers_get_more_threads_up_to_concurrency() -> None:
    import threading
    import time

    events = batch(["a", "b", "c", "d", "a", "b", "c", "d"])
    broker = Broker(MemoryProvider())
    threads: set[int] = set()

    def slow(e: Event) -> None:  # blocks, as a handler doing I/O does
        threads.add(threading.get_ident())
        time.sleep(0.2)

    broker.subscribe("test.>", slow, name="slow")
    started = time.perf_counter()
    res = await run(events, broker, None)  # concurrency=4
    elapsed = time.perf_counter() - started
    assert all(o.status == "completed" for o in res.outcomes.values())
    assert len(threads) == 4
    assert elapsed < 1.2  # 4 lanes of 2 x 0.2 s side by side, not 8 x 0.2 s one after another
