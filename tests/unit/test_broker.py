"""Broker: subscriptions, sync and async publishing, retries, statuses, stats."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from outbox import Event, MemoryProvider, RetryPolicy, new_event
from outbox.broker import NOTE_KEY, Broker, BrokerObserver, DispatchResult
from outbox.exceptions import (
    BrokerClosed,
    BrokerNotStarted,
    HandlerError,
    ProviderUnavailable,
    QueueFull,
)

pytestmark = pytest.mark.anyio

FAST = RetryPolicy(max_retries=3, initial_delay=0.0, max_delay=0.0, jitter=0.0)


@pytest.fixture
async def broker() -> AsyncIterator[Broker]:
    b = Broker(retry_policy=FAST, worker_count=5)
    await b.start()
    yield b
    await b.stop(5)


def ev(type_: str = "test.event", **payload: Any) -> Event:
    return new_event("system", type_, payload)


# -- subscriptions -------------------------------------------------------------------------------


async def test_star_prefix_and_exact_all_receive(broker: Broker) -> None:
    got: list[str] = []
    for pattern in ("*", "test.*", "test.event"):
        broker.subscribe(pattern, lambda e, p=pattern: got.append(p), threaded=False)
    broker.subscribe("other.*", lambda e: got.append("other"), threaded=False)
    await broker.publish_sync(ev())
    assert got == ["*", "test.*", "test.event"]


async def test_unsubscribe_stops_delivery_by_id_and_by_name(broker: Broker) -> None:
    got: list[str] = []

    def first(e: Event) -> None:
        got.append("first")

    async def second(e: Event) -> None:
        got.append("second")

    sub_id = broker.subscribe("test.*", first)
    broker.subscribe("test.*", second, name="second-handler")
    await broker.publish_sync(ev())
    broker.unsubscribe(sub_id)
    await broker.publish_sync(ev())
    broker.unsubscribe("second-handler")
    await broker.publish_sync(ev())
    assert got == ["first", "second", "second"]
    with pytest.raises(KeyError):
        broker.unsubscribe(sub_id)


async def test_decorator_form_returns_the_function(broker: Broker) -> None:
    got: list[Event] = []

    @broker.subscribe("public.users.create")
    async def on_user(e: Event) -> None:
        got.append(e)

    assert callable(on_user) and on_user.__name__ == "on_user"
    e = ev("public.users.create", email="a@b")
    await broker.publish_sync(e)
    assert [g.id for g in got] == [e.id]


async def test_an_event_built_without_an_id_gets_a_time_ordered_one(broker: Broker) -> None:
    broker.subscribe("test.*", lambda e: None, threaded=False)
    sync, queued = Event(source="system", type="test.event"), Event(source="system", type="test.x")
    assert sync.id is None and queued.id is None
    await broker.publish_sync(sync)
    await broker.publish_async(queued)
    await broker.join()
    assert sync.id.version == 7 and queued.id.version == 7  # like new_event's (events.new_event_id)
    assert (await broker.provider.get(queued.id)).status == "completed"


async def test_invalid_pattern_fails_at_subscribe(broker: Broker) -> None:
    with pytest.raises(ValueError, match="invalid pattern"):
        broker.subscribe("a..b", lambda e: None)
    with pytest.raises(ValueError, match="invalid pattern"):
        broker.subscribe("a.>.b")  # decorator form fails at once too
    assert broker.subscriptions() == []


def on_created(e: Event) -> None:
    """A module-level handler: its default name is module.qualname."""


async def test_names_are_stable_and_unique() -> None:
    names = []
    for _ in range(2):  # two brokers, as in two processes: same names in the same order
        b = Broker()
        b.subscribe("a", on_created)
        b.subscribe("b", on_created)
        b.subscribe("c", on_created, name="explicit")
        names.append([s.name for s in b.subscriptions()])
        with pytest.raises(ValueError, match="already exists"):
            b.subscribe("d", on_created, name="explicit")
    expected = f"{__name__}.on_created"
    assert names[0] == names[1] == [expected, f"{expected}#2", "explicit"]


async def test_handler_must_be_callable(broker: Broker) -> None:
    with pytest.raises(TypeError, match="callable"):
        broker.subscribe("a", "not a function")  # type: ignore[call-overload]


# -- publish_sync ---------------------------------------------------------------------------------


async def test_max_retries_two_means_three_calls_then_failed() -> None:
    calls: list[int] = []

    async def always_fails(e: Event) -> None:
        calls.append(1)
        raise RuntimeError("boom")

    policy = RetryPolicy(max_retries=2, initial_delay=0.0, max_delay=0.0, jitter=0.0)
    async with Broker(retry_policy=policy) as b:
        b.subscribe("test.*", always_fails)
        e = ev()
        with pytest.raises(HandlerError) as info:
            await b.publish_sync(e)
        assert len(calls) == 3
        assert e.status == "failed" and "RuntimeError: boom" in (e.error or "")
        stored = await b.provider.get(e.id)
        assert stored is not None and stored.status == "failed"
        assert stored.completed_at is not None
        assert isinstance(info.value.errors[next(iter(info.value.errors))], RuntimeError)


async def test_one_failing_handler_does_not_stop_the_others(broker: Broker) -> None:
    ran: list[str] = []

    def bad(e: Event) -> None:
        ran.append("bad")
        raise ValueError("nope")

    async def good(e: Event) -> None:
        ran.append("good")

    broker.subscribe("test.*", bad, name="bad")
    broker.subscribe("test.*", good, name="good")
    e = ev()
    with pytest.raises(HandlerError) as info:
        await broker.publish_sync(e)
    assert ran.count("good") == 1 and ran.count("bad") == 4  # 1 + max_retries 3
    assert set(info.value.errors) == {"bad"}
    assert e.error == "bad: ValueError: nope"


async def test_retry_then_success_completes(broker: Broker) -> None:
    attempts: list[int] = []

    def flaky(e: Event) -> None:
        attempts.append(1)
        if len(attempts) < 3:
            raise ConnectionError("try again")

    broker.subscribe("test.*", flaky)
    e = ev()
    await broker.publish_sync(e)
    assert len(attempts) == 3
    assert e.status == "completed" and e.error is None
    stored = await broker.provider.get(e.id)
    assert stored is not None and stored.status == "completed" and stored.processed_at


async def test_retry_sleeps_follow_the_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    slept: list[float] = []

    async def fake_sleep(delay: float) -> None:
        slept.append(delay)

    monkeypatch.setattr("outbox.broker.dispatch.anyio.sleep", fake_sleep)
    policy = RetryPolicy(max_retries=4, initial_delay=1.0, max_delay=5.0, backoff_factor=3.0,
                         jitter=0.0)
    async with Broker(retry_policy=policy) as b:
        b.subscribe("test.*", lambda e: 1 / 0, threaded=False)
        with pytest.raises(HandlerError):
            await b.publish_sync(ev())
    assert slept == [1.0, 3.0, 5.0, 5.0]


async def test_no_handler_completes_with_a_note(broker: Broker) -> None:
    e = ev("nobody.listens")
    await broker.publish_sync(e)
    stored = await broker.provider.get(e.id)
    assert stored is not None and stored.status == "completed"
    assert NOTE_KEY in stored.meta and NOTE_KEY in e.meta
    e2 = ev("nobody.listens")
    await broker.publish_async(e2)  # async mode too: never left pending
    stored2 = await broker.provider.get(e2.id)
    assert stored2 is not None and stored2.status == "completed" and NOTE_KEY in stored2.meta


async def test_sync_handlers_run_in_a_thread_unless_inline() -> None:
    loop_thread = threading.get_ident()
    seen: dict[str, int] = {}
    async with Broker() as b:
        b.subscribe("t", lambda e: seen.__setitem__("threaded", threading.get_ident()))
        b.subscribe("t", lambda e: seen.__setitem__("inline", threading.get_ident()),
                    threaded=False)
        await b.publish_sync(ev("t"))
    assert seen["threaded"] != loop_thread
    assert seen["inline"] == loop_thread
    async with Broker(sync_handlers="inline") as b:
        b.subscribe("t", lambda e: seen.__setitem__("default", threading.get_ident()))
        await b.publish_sync(ev("t"))
    assert seen["default"] == loop_thread


async def test_sync_handler_returning_an_awaitable_is_awaited(broker: Broker) -> None:
    done: list[str] = []

    async def later() -> None:
        done.append("awaited")

    broker.subscribe("t", lambda e: later(), threaded=False)
    await broker.publish_sync(ev("t"))
    assert done == ["awaited"]


async def test_provider_refusal_surfaces_before_any_handler_runs(broker: Broker) -> None:
    ran: list[int] = []
    broker.subscribe("t", lambda e: ran.append(1), threaded=False)
    assert isinstance(broker.provider, MemoryProvider)
    broker.provider.fail_with = ProviderUnavailable("down")
    with pytest.raises(ProviderUnavailable):
        await broker.publish_sync(ev("t"))
    with pytest.raises(ProviderUnavailable):
        await broker.publish_async(ev("t"))
    broker.provider.fail_with = None
    assert ran == []
    assert broker.queue_size == 0


# -- lifecycle -----------------------------------------------------------------------------------


async def test_publish_before_start_and_after_stop_is_a_clear_error() -> None:
    b = Broker()
    b.subscribe("t", lambda e: None)
    for publish in (b.publish, b.publish_sync, b.publish_async):
        with pytest.raises(BrokerNotStarted):
            await publish(ev("t"))
    with pytest.raises(BrokerNotStarted):
        b.submit(ev("t"))
    await b.start()
    await b.start()  # idempotent
    report = await b.stop()
    assert report.clean and not report.timed_out
    for publish in (b.publish, b.publish_sync, b.publish_async):
        with pytest.raises(BrokerClosed):
            await publish(ev("t"))
    with pytest.raises(BrokerClosed):
        b.submit(ev("t"))
    with pytest.raises(BrokerClosed):
        await b.start()
    assert await b.stop() is report  # idempotent


async def test_stop_of_a_broker_never_started() -> None:
    b = Broker()
    report = await b.stop()
    assert report.clean
    with pytest.raises(BrokerClosed):
        await b.publish_async(ev())


async def test_owned_provider_is_closed_by_stop_a_given_one_is_not() -> None:
    own = Broker()
    await own.start()
    await own.stop()
    with pytest.raises(Exception, match="closed"):
        await own.provider.get(ev().id)
    given = MemoryProvider()
    b = Broker(given)
    await b.start()
    await b.stop()
    assert await given.get(ev().id) is None


# -- async mode ----------------------------------------------------------------------------------


async def test_fifty_concurrent_async_publishes_with_five_workers() -> None:
    got: list[str] = []

    async def handler(e: Event) -> None:
        await anyio.lowlevel.checkpoint()
        got.append(str(e.id))

    events = [ev(i=i) for i in range(50)]
    async with Broker(worker_count=5, retry_policy=FAST) as b:
        b.subscribe("test.*", handler)
        async with anyio.create_task_group() as tg:
            for e in events:
                tg.start_soon(b.publish_async, e)
        await b.join()
        stats = await b.stats()
    assert sorted(got) == sorted(str(e.id) for e in events)
    assert stats.total_published == 50 and stats.total_processed == 50
    assert all(e.status == "completed" for e in events)


async def test_graceful_stop_processes_every_queued_event() -> None:
    got: list[int] = []
    gate = anyio.Event()

    async def slow(e: Event) -> None:
        await gate.wait()
        got.append(e.payload["i"])

    b = Broker(worker_count=2, retry_policy=FAST)
    await b.start()
    b.subscribe("test.*", slow)
    for i in range(20):
        await b.publish_async(ev(i=i))
    async with anyio.create_task_group() as tg:
        async def stopper() -> None:
            report = await b.stop(30)
            assert report.clean and report.drained == 20

        tg.start_soon(stopper)
        await anyio.wait_all_tasks_blocked()
        with pytest.raises(BrokerClosed):  # intake closed while draining
            await b.publish_async(ev(i=99))
        gate.set()
    assert sorted(got) == list(range(20))


async def test_queue_full_is_an_error_or_a_wait() -> None:
    gate = anyio.Event()

    async def blocked(e: Event) -> None:
        await gate.wait()

    async with Broker(worker_count=1, buffer_size=2, retry_policy=FAST) as b:
        b.subscribe("t", blocked)
        await b.publish_async(ev("t"))
        await anyio.wait_all_tasks_blocked()  # the worker holds the first event
        await b.publish_async(ev("t"))
        await b.publish_async(ev("t"))
        rejected = ev("t")
        with pytest.raises(QueueFull, match="full"):
            await b.publish_async(rejected)
        with pytest.raises(QueueFull):
            b.submit(ev("t"))
        with pytest.raises(QueueFull):
            await b.publish_async(ev("t"), timeout=0.01)
        assert b.queue_size == 2
        # The rejected event was never stored: a full queue is not a silent drop.
        assert await b.provider.get(rejected.id) is None

        waited = ev("t")
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: b.publish_async(waited, timeout=30))
            await anyio.wait_all_tasks_blocked()
            gate.set()
        await b.join()
        stored = await b.provider.get(waited.id)
        assert stored is not None and stored.status == "completed"


async def test_stats_in_async_mode() -> None:
    gate = anyio.Event()

    async def blocked(e: Event) -> None:
        await gate.wait()
        if e.payload.get("fail"):
            raise RuntimeError("x")

    async with Broker(worker_count=3, retry_policy=RetryPolicy(max_retries=0)) as b:
        b.subscribe("test.*", blocked)
        for i in range(8):
            await b.publish_async(ev(i=i, fail=i == 0))
        await anyio.wait_all_tasks_blocked()
        busy = await b.stats()
        assert (busy.workers_active, busy.queue_size, busy.total_published) == (3, 5, 8)
        assert busy.active_subscribers == 1 and busy.mode == "async"
        assert busy.provider_stats.processing_events == 3
        assert busy.provider_stats.pending_events == 5
        gate.set()
        await b.join()
        done = await b.stats()
    assert (done.workers_active, done.queue_size) == (0, 0)
    assert (done.total_processed, done.total_failed) == (7, 1)
    assert done.provider_stats.completed_events == 7 and done.provider_stats.failed_events == 1


async def test_publish_by_mode() -> None:
    seen: list[str] = []
    async with Broker(mode="sync") as b:
        b.subscribe("t", lambda e: seen.append("sync"), threaded=False)
        await b.publish(ev("t"))
        assert seen == ["sync"]  # done when publish returns
    async with Broker(mode="async") as b:
        b.subscribe("t", lambda e: seen.append("async"), threaded=False)
        await b.publish(ev("t"))
        await b.join()
    assert seen == ["sync", "async"]
    with pytest.raises(ValueError, match="mode"):
        Broker(mode="later")


async def test_publish_async_racing_stop_loses_nothing() -> None:
    handled: set[str] = set()

    async def handler(e: Event) -> None:
        await anyio.lowlevel.checkpoint()
        handled.add(str(e.id))

    provider = MemoryProvider(max_events=1_000_000)
    b = Broker(provider, worker_count=4, buffer_size=10_000, retry_policy=FAST)
    await b.start()
    b.subscribe("test.*", handler)
    accepted: list[Event] = []
    refused: list[Event] = []

    async def producer(k: int) -> None:
        i = 0
        while True:  # until the broker refuses
            i += 1
            e = ev(k=k, i=i)
            try:
                await b.publish_async(e, timeout=5)
            except BrokerClosed:
                refused.append(e)
                return
            accepted.append(e)
            if i % 7 == 0:
                await anyio.lowlevel.checkpoint()

    async with anyio.create_task_group() as tg:
        for k in range(8):
            tg.start_soon(producer, k)
        for _ in range(40):
            await anyio.lowlevel.checkpoint()
        report = await b.stop(30)
    assert report.clean
    assert len(refused) == 8 and len(accepted) > 0
    # Every accepted event was handled and is completed; every refused one was never stored.
    assert handled == {str(e.id) for e in accepted}
    for e in accepted:
        stored = await provider.get(e.id)
        assert stored is not None and stored.status == "completed"
    for e in refused:
        assert str(e.id) not in handled and await provider.get(e.id) is None


async def test_stop_deadline_cancels_retry_sleeps_and_reports() -> None:
    first_attempt = anyio.Event()

    async def failing(e: Event) -> None:
        first_attempt.set()
        raise RuntimeError("down")

    policy = RetryPolicy(max_retries=5, initial_delay=3600.0, max_delay=3600.0)
    provider = MemoryProvider()
    b = Broker(provider, retry_policy=policy)
    await b.start()
    b.subscribe("test.*", failing)
    e = ev()
    await b.publish_async(e)
    await first_attempt.wait()
    report = await b.stop(timeout=0.05)  # the retry sleep would take an hour
    assert report.timed_out
    assert [u.id for u in report.unfinished] == [e.id]
    stored = await provider.get(e.id)
    assert stored is not None and stored.status == "pending"
    assert "interrupted" in (stored.error or "")


async def test_stop_deadline_cancels_a_hanging_handler_and_reports_queued_ones() -> None:
    started = anyio.Event()

    async def hangs(e: Event) -> None:
        started.set()
        await anyio.sleep_forever()

    provider = MemoryProvider()
    b = Broker(provider, worker_count=1, retry_policy=FAST)
    await b.start()
    b.subscribe("test.*", hangs)
    events = [ev(i=i) for i in range(3)]
    for e in events:
        await b.publish_async(e)
    await started.wait()
    report = await b.stop(timeout=0.05)
    assert report.timed_out
    assert {u.id for u in report.unfinished} == {e.id for e in events}
    for e in events:
        stored = await provider.get(e.id)
        assert stored is not None and stored.status == "pending"


async def test_publish_sync_retries_are_cut_short_by_stop() -> None:
    policy = RetryPolicy(max_retries=3, initial_delay=3600.0, max_delay=3600.0)
    b = Broker(retry_policy=policy)
    await b.start()
    b.subscribe("t", lambda e: 1 / 0, threaded=False)
    outcome: list[BaseException] = []

    async def publisher() -> None:
        try:
            await b.publish_sync(ev("t"))
        except BaseException as exc:
            outcome.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(publisher)
        await anyio.wait_all_tasks_blocked()
        report = await b.stop(timeout=0.05)
    assert report.timed_out and len(report.unfinished) == 1
    assert len(outcome) == 1 and isinstance(outcome[0], BrokerClosed)


# -- submit (sync, any thread) -------------------------------------------------------------------


async def test_submit_from_other_threads_and_the_loop_thread(broker: Broker) -> None:
    handled: list[str] = []
    broker.subscribe("read.*", lambda e: handled.append(e.type), threaded=False)

    def from_thread() -> None:
        for _ in range(20):
            broker.submit(ev("read.thread"))

    threads = [threading.Thread(target=from_thread) for _ in range(3)]
    for t in threads:
        t.start()
    await anyio.to_thread.run_sync(lambda: [t.join() for t in threads])
    broker.submit(ev("read.loop"))  # sync call in the loop thread
    await broker.join()
    assert handled.count("read.thread") == 60 and handled.count("read.loop") == 1
    stats = await broker.stats()
    assert stats.total_published == 61 and stats.provider_stats.completed_events == 61


async def test_submitted_event_without_handler_is_stored_completed(broker: Broker) -> None:
    e = ev("nobody.reads")
    broker.submit(e)
    await broker.join()
    stored = await broker.provider.get(e.id)
    assert stored is not None and stored.status == "completed" and NOTE_KEY in stored.meta


# -- dispatch (relay and consumers) -------------------------------------------------------------


async def test_dispatch_runs_handlers_without_touching_the_provider(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def no_sleep(delay: float) -> None:
        raise AssertionError("attempts=1 must not sleep")

    monkeypatch.setattr("outbox.broker.dispatch.anyio.sleep", no_sleep)
    b = Broker()  # not started: dispatch works in any state
    calls: list[str] = []
    b.subscribe("t.*", lambda e: calls.append("a"), name="a", threaded=False)
    b.subscribe("t.*", lambda e: calls.append("b") or 1 / 0, name="b", threaded=False)
    b.subscribe("t.x", lambda e: calls.append("c"), name="c", threaded=False)
    b.subscribe("other", lambda e: calls.append("d"), name="d", threaded=False)
    e = ev("t.x")
    result = await b.dispatch(e, done={"c"})
    assert isinstance(result, DispatchResult)
    assert (result.succeeded, result.skipped, result.matched) == (["a"], ["c"], 3)
    assert set(result.failed) == {"b"} and isinstance(result.failed["b"], ZeroDivisionError)
    assert not result.ok and calls == ["a", "b"]
    assert e.status == "pending"  # untouched
    assert (await b.provider.stats()).total_events == 0
    empty = await b.dispatch(ev("nothing"))
    assert empty.ok and empty.matched == 0


async def test_dispatch_with_attempts_retries_only_the_failing_handler() -> None:
    counts = {"ok": 0, "flaky": 0}

    def ok(e: Event) -> None:
        counts["ok"] += 1

    def flaky(e: Event) -> None:
        counts["flaky"] += 1
        if counts["flaky"] < 3:
            raise RuntimeError("not yet")

    b = Broker(retry_policy=FAST)
    b.subscribe("t", ok, name="ok", threaded=False)
    b.subscribe("t", flaky, name="flaky", threaded=False)
    result = await b.dispatch(ev("t"), attempts=3)
    assert result.ok and result.succeeded == ["ok", "flaky"]
    assert counts == {"ok": 1, "flaky": 3}
    with pytest.raises(ValueError, match="attempts"):
        await b.dispatch(ev("t"), attempts=0)


# -- observers -----------------------------------------------------------------------------------


async def test_observers_see_published_processed_and_dispatched(broker: Broker) -> None:
    seen: list[tuple[str, str]] = []

    class Recorder(BrokerObserver):
        def on_published(self, broker: Broker, event: Event) -> None:
            seen.append(("published", event.type))

        def on_processed(self, broker: Broker, event: Event, status: str, duration: float) -> None:
            assert duration >= 0
            seen.append((status, event.type))

        def on_dispatched(self, broker: Broker, event: Event, result: DispatchResult,
                          duration: float) -> None:
            seen.append(("dispatched", event.type))

    class Broken(BrokerObserver):
        def on_published(self, broker: Broker, event: Event) -> None:
            raise RuntimeError("observer bug")  # logged, never breaks publishing

    broker.add_observer(Broken())
    broker.add_observer(Recorder())
    broker.subscribe("ok", lambda e: None, threaded=False)
    broker.subscribe("bad", lambda e: 1 / 0, threaded=False)
    await broker.publish_sync(ev("ok"))
    with pytest.raises(HandlerError):
        await broker.publish_sync(ev("bad"))
    await broker.dispatch(ev("ok"))
    assert seen == [("published", "ok"), ("completed", "ok"), ("published", "bad"),
                    ("failed", "bad"), ("dispatched", "ok")]


async def test_threaded_handlers_see_the_publishers_context(broker: Broker) -> None:
    import outbox
    from outbox._context import current_context

    seen: list[str | None] = []
    broker.subscribe("t", lambda e: seen.append(current_context().user_id))
    with outbox.context(user_id=7):
        await broker.publish_sync(new_event("system", "t"))
    assert seen == ["7"]
