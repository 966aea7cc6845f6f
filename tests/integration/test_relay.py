"""The relay in-process, on real PostgreSQL and SQLite (and MariaDB where noted).

Handlers are real ``Broker`` subscriptions, the provider a real ``MemoryProvider``. Retry delays
are made small through the retry policy; nothing asserts on elapsed time.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any

import anyio
import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

import outbox
from outbox import Broker, Event, RetryPolicy
from outbox.exceptions import ProviderUnavailable
from outbox.providers.memory import MemoryProvider
from outbox.relay import Relay, RelayStore
from tests.helpers import eventually

FAST = RetryPolicy(max_retries=3, initial_delay=0.05, max_delay=0.2, jitter=0.0)


def add_events(
    engine: sa.Engine, n: int, *, key: str | Callable[[int], str | None] | None = None,
    type: str = "test.item.create",
) -> list[uuid.UUID]:
    """Commit ``n`` events in one transaction; returns their ids in insertion order."""
    ids = []
    with Session(engine) as s:
        for i in range(n):
            k = key(i) if callable(key) else key
            e = outbox.new_event("system", type, {"i": i}, ordering_key=k)
            s.add(e)
            ids.append(e.id)
        s.commit()
    return ids


def rows(engine: sa.Engine) -> list[Event]:
    with Session(engine) as s:
        return list(s.scalars(sa.select(Event).order_by(Event.seq)))


def counts(engine: sa.Engine) -> dict[str, int]:
    with engine.connect() as c:
        return dict(c.execute(sa.text("SELECT status, count(*) FROM events GROUP BY status"))
                    .all())  # type: ignore[arg-type]


class Recorder:
    """Handlers that record what they saw; ``fail`` decides per event whether to raise."""

    def __init__(self) -> None:
        self.seen: list[Event] = []
        self.fail: Callable[[Event], bool] = lambda e: False

    async def __call__(self, event: Event) -> None:
        self.seen.append(event)
        if self.fail(event):
            raise RuntimeError(f"boom {event.payload.get('i')}")


def make(engine: sa.Engine, *, policy: RetryPolicy = FAST, **kw: Any) -> tuple[Relay, Recorder,
                                                                                 MemoryProvider]:
    provider = MemoryProvider(max_events=100_000)
    broker = Broker(provider, retry_policy=policy)
    rec = Recorder()
    broker.subscribe("test.>", rec, name="recorder")
    kw.setdefault("poll_interval", 0.05)
    relay = Relay(engine, broker=broker, retry_policy=policy, **kw)
    return relay, rec, provider


async def run_until(relay: Relay, done: Callable[[], bool | Awaitable[bool]],
                    limit: float = 30.0) -> None:
    """Run ``relay`` until ``done()`` holds, then stop it gracefully and wait for it."""
    async with anyio.create_task_group() as tg:
        tg.start_soon(relay.run)
        await eventually(done, within=limit, what=lambda: f"the relay to be done: {relay.stats}")
        relay.stop()


def idle(relay: Relay) -> bool:
    """The relay found nothing to do and waits for a notification, holding the wake-up lock."""
    return relay._idle is not None and relay._idle.held


@pytest.fixture
def mariadb_engine(mariadb_url: str) -> Iterator[sa.Engine]:
    eng = sa.create_engine(mariadb_url)
    outbox.create_schema(eng)
    yield eng
    eng.dispose()


# -- happy path ---------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_happy_path_handlers_then_provider_then_completed(engine: sa.Engine) -> None:
    ids = add_events(engine, 250, key=lambda i: f"k{i % 7}" if i % 3 else None)
    relay, rec, provider = make(engine, batch_size=40)
    await relay.drain()

    assert counts(engine) == {"completed": 250}
    assert sorted(e.id for e in rec.seen) == sorted(ids)
    assert {e.id for e in await provider.list()} == set(ids)
    for e in rows(engine):
        assert e.completed_at is not None and e.processed_at is not None
        assert e.lease_token is None and e.lease_expires_at is None
        assert e.retry_count == 0
    assert relay.stats.completed == 250 and relay.stats.failed == 0


@pytest.mark.anyio
async def test_events_without_handler_are_forwarded_and_completed(engine: sa.Engine) -> None:
    ids = add_events(engine, 5, type="other.thing.happened")
    relay, rec, provider = make(engine)
    await relay.drain()
    assert rec.seen == []
    assert counts(engine) == {"completed": 5}
    assert {e.id for e in await provider.list()} == set(ids)


@pytest.mark.anyio
async def test_mariadb_happy_path_and_key_order(mariadb_engine: sa.Engine) -> None:
    ids = add_events(mariadb_engine, 120, key=lambda i: f"k{i % 5}")
    relay, rec, _ = make(mariadb_engine, batch_size=16)
    await relay.drain()
    assert counts(mariadb_engine) == {"completed": 120}
    assert sorted(e.id for e in rec.seen) == sorted(ids)
    assert_key_order([(e.ordering_key, e.seq) for e in rec.seen])


@pytest.mark.anyio
@pytest.mark.parametrize("dialect", ["postgresql", "mariadb"])
async def test_two_relays_share_hot_keys_once_each_in_order(
    dialect: str, request: pytest.FixtureRequest
) -> None:
    engine: sa.Engine = request.getfixturevalue(
        "pg_engine" if dialect == "postgresql" else "mariadb_engine")
    ids = add_events(engine, 400, key=lambda i: None if i % 10 == 0 else f"hot{i % 3}")
    one, rec1, _ = make(engine, batch_size=25)
    two, rec2, _ = make(engine, batch_size=25)
    order: list[tuple[str | None, int]] = []

    async def note(event: Event) -> None:
        order.append((event.ordering_key, event.seq))
        await anyio.sleep(0.001)  # let the other relay interleave

    one._broker.subscribe("test.>", note, name="note")
    two._broker.subscribe("test.>", note, name="note")
    async with anyio.create_task_group() as tg:
        tg.start_soon(one.run)
        tg.start_soon(two.run)
        await eventually(lambda: counts(engine) == {"completed": 400})
        one.stop()
        two.stop()
    handled = [e.id for e in rec1.seen + rec2.seen]
    assert sorted(handled) == sorted(ids)  # each exactly once
    assert rec1.seen and rec2.seen  # both did part of the work
    assert_key_order(order)
    assert one.stats.followers_claimed + two.stats.followers_claimed > 0


def assert_key_order(pairs: list[tuple[str | None, int]]) -> None:
    last: dict[str, int] = {}
    for key, seq in pairs:
        if key is None:
            continue
        assert last.get(key, -1) < seq, f"key {key}: seq {seq} handled after {last[key]}"
        last[key] = seq


# -- retries, failure, replay -------------------------------------------------------------------


@pytest.mark.anyio
async def test_retry_with_backoff_then_success(engine: sa.Engine) -> None:
    (event_id,) = add_events(engine, 1)
    policy = RetryPolicy(max_retries=3, initial_delay=0.2, max_delay=1.0, backoff_factor=2.0,
                         jitter=0.0)
    relay, rec, _ = make(engine, policy=policy)
    attempts: list[int] = []
    rec.fail = lambda e: (attempts.append(1) or len(attempts)) <= 2

    await relay.drain()  # first attempt fails; the retry is not due yet
    (row,) = rows(engine)
    assert row.status == "pending" and row.retry_count == 1
    assert "boom" in (row.error or "") and "recorder" in (row.error or "")
    assert row.processed_at is not None
    first_wait = row.next_attempt_at - row.processed_at
    assert dt.timedelta(seconds=0.15) <= first_wait <= dt.timedelta(seconds=0.5)

    async def retried_twice() -> bool:
        return rows(engine)[0].retry_count == 2

    relay2, rec2, _ = make(engine, policy=policy)
    rec2.fail = rec.fail
    await run_until(relay2, retried_twice)
    (row,) = rows(engine)
    second_wait = row.next_attempt_at - row.processed_at  # backoff doubled
    assert second_wait >= dt.timedelta(seconds=0.35)

    relay3, rec3, _ = make(engine, policy=policy)
    rec3.fail = rec.fail
    await run_until(relay3, lambda: counts(engine) == {"completed": 1})
    (row,) = rows(engine)
    assert row.id == event_id and row.retry_count == 2 and len(attempts) == 3


@pytest.mark.anyio
async def test_failed_after_max_retries_and_replay(engine: sa.Engine) -> None:
    (event_id,) = add_events(engine, 1)
    policy = RetryPolicy(max_retries=2, initial_delay=0.0, max_delay=0.0, jitter=0.0)
    relay, rec, provider = make(engine, policy=policy)
    # A second handler that succeeds: it must not run again on retries or after replay.
    ok_calls: list[uuid.UUID] = []

    async def ok(event: Event) -> None:
        ok_calls.append(event.id)

    relay_broker = relay._broker
    relay_broker.subscribe("test.>", ok, name="ok-handler")
    rec.fail = lambda e: True
    await relay.drain()

    (row,) = rows(engine)
    assert row.status == "failed" and row.retry_count == 3  # first attempt + 2 retries
    assert row.completed_at is not None and "boom" in (row.error or "")
    assert len(rec.seen) == 3 and ok_calls == [event_id]
    assert await provider.get(event_id) is None  # never forwarded
    assert relay.stats.failed == 1 and relay.stats.retried == 2

    from outbox.ops import replay

    replay(engine, ids=[event_id])
    relay2, rec2, provider2 = make(engine, policy=policy)
    relay2._broker.subscribe("test.>", ok, name="ok-handler")
    await relay2.drain()
    (row,) = rows(engine)
    assert row.status == "completed" and [e.id for e in rec2.seen] == [event_id]
    assert ok_calls == [event_id]  # partial success kept across retries and replay
    assert await provider2.get(event_id) is not None


@pytest.mark.anyio
async def test_failing_head_holds_back_only_its_key(engine: sa.Engine) -> None:
    add_events(engine, 30, key=lambda i: "blocked" if i % 3 == 0 else f"free{i % 2}")
    policy = RetryPolicy(max_retries=0, initial_delay=0.0, max_delay=0.0, jitter=0.0)
    relay, rec, _ = make(engine, policy=policy, batch_size=7)
    rec.fail = lambda e: e.ordering_key == "blocked" and e.payload["i"] == 0
    await relay.drain()

    by_status: dict[str, list[Event]] = {}
    for e in rows(engine):
        by_status.setdefault(e.status, []).append(e)
    assert [e.payload["i"] for e in by_status["failed"]] == [0]
    assert {e.ordering_key for e in by_status["pending"]} == {"blocked"}
    assert len(by_status["pending"]) == 9  # the rest of the blocked key waits
    assert all(e.ordering_key != "blocked" for e in by_status["completed"])
    assert len(by_status["completed"]) == 20
    assert [k for k, *_ in relay.store.blocked_keys()] == ["blocked"]
    assert_key_order([(e.ordering_key, e.seq) for e in rec.seen])


@pytest.mark.anyio
async def test_retry_waiting_head_holds_back_its_key_and_order_survives(
    engine: sa.Engine,
) -> None:
    add_events(engine, 12, key="k")
    relay, rec, _ = make(engine, policy=FAST, batch_size=5)
    failed_once: set[int] = set()

    def flaky(e: Event) -> bool:
        i = e.payload["i"]
        if i in (2, 7) and i not in failed_once:
            failed_once.add(i)
            return True
        return False

    rec.fail = flaky
    await run_until(relay, lambda: counts(engine) == {"completed": 12})
    order = [e.payload["i"] for e in rec.seen]
    # each failed event is retried before anything after it
    assert order == [0, 1, 2, 2, 3, 4, 5, 6, 7, 7, 8, 9, 10, 11]


# -- provider: outage and per-event errors ------------------------------------------------------


@pytest.mark.anyio
async def test_provider_outage_holds_events_without_using_retries(engine: sa.Engine) -> None:
    relay, rec, provider = make(engine, batch_size=10)
    provider.fail_with = ProviderUnavailable("memory provider down (test)")
    ids = add_events(engine, 25, key=lambda i: f"k{i % 4}")

    async def scenario() -> None:
        with anyio.fail_after(30):
            await eventually(lambda: relay.stats.outages >= 1)
            assert not relay.stats.ready
            # Several backoff rounds (0.25 s, doubling) in which the provider stayed down.
            await eventually(lambda: relay._outage_backoff >= 1.0)
            c = counts(engine)
            assert c.get("completed", 0) == 0 and c.get("failed", 0) == 0
            assert all(e.retry_count == 0 for e in rows(engine))
            provider.fail_with = None
            await eventually(lambda: counts(engine) == {"completed": 25})
        relay.stop()

    async with anyio.create_task_group() as tg:
        tg.start_soon(relay.run)
        tg.start_soon(scenario)
    assert {e.id for e in await provider.list()} == set(ids)
    assert all(e.retry_count == 0 for e in rows(engine))
    assert relay.stats.failed == 0 and relay.stats.retried == 0
    # handlers ran once per event despite the repeated forwarding attempts
    assert sorted(e.id for e in rec.seen) == sorted(ids)


class PingCounter(MemoryProvider):
    """A memory provider that counts the relay's pings (they fail while ``fail_with`` is set)."""

    pings = 0

    async def ping(self) -> None:
        self.pings += 1
        await super().ping()


@pytest.mark.anyio
async def test_provider_back_is_noticed_by_ping_not_at_the_end_of_the_backoff(
        engine: sa.Engine) -> None:
    provider = PingCounter(max_events=1000)
    broker = Broker(provider, retry_policy=FAST)
    rec = Recorder()
    broker.subscribe("test.>", rec, name="recorder")
    relay = Relay(engine, broker=broker, retry_policy=FAST, poll_interval=0.05, batch_size=10)
    provider.fail_with = ProviderUnavailable("memory provider down (test)")
    ids = add_events(engine, 25, key=lambda i: f"k{i % 4}")

    async def scenario() -> None:
        await eventually(lambda: relay.stats.outages >= 1)
        relay._outage_backoff = 30.0  # as after a long outage: the next wait is the longest
        await eventually(lambda: relay._outage_backoff == 30.0)
        seen = provider.pings
        await eventually(lambda: provider.pings >= seen + 2)  # asking, in vain, while it waits
        assert not relay.stats.ready
        assert all(e.retry_count == 0 and e.status == "pending" for e in rows(engine))
        provider.fail_with = None
        # Well within the 30 s backoff: the next ping ends the wait, a probe batch goes out.
        await eventually(lambda: counts(engine) == {"completed": 25}, within=15)
        assert relay.stats.ready
        relay.stop()

    async with anyio.create_task_group() as tg:
        tg.start_soon(relay.run)
        tg.start_soon(scenario)
    assert relay.stats.outages == 1 and relay.stats.retried == 0 and relay.stats.failed == 0
    assert all(e.retry_count == 0 for e in rows(engine))
    assert sorted(e.id for e in rec.seen) == sorted(ids)  # handlers ran once per event


@pytest.mark.anyio
async def test_once_reports_an_outage_instead_of_waiting(engine: sa.Engine) -> None:
    add_events(engine, 5)
    relay, rec, provider = make(engine)
    provider.fail_with = ProviderUnavailable("down (test)")
    with pytest.raises(ProviderUnavailable, match="down"):
        await relay.drain()
    assert counts(engine) == {"pending": 5}
    assert all(e.retry_count == 0 and e.lease_token is None for e in rows(engine))
    provider.fail_with = None
    relay2, rec2, _ = make(engine)
    await relay2.drain()
    assert counts(engine) == {"completed": 5}
    assert len(rec.seen) == 5 and rec2.seen == []  # handlers were recorded as done


@pytest.mark.anyio
async def test_provider_error_about_one_event_is_a_retry_and_keeps_key_order(
    engine: sa.Engine,
) -> None:
    ids = add_events(engine, 6, key="k")
    relay, rec, provider = make(engine, batch_size=10)
    refused: set[uuid.UUID] = set()

    def once_for_third(event: Event) -> BaseException | None:
        if event.id == ids[2] and event.id not in refused:
            refused.add(event.id)
            return outbox.exceptions.ProviderError("too large (test)")
        return None

    provider.fail_when = once_for_third
    order: list[uuid.UUID] = []
    real_publish = provider.publish_many

    async def spy(events: Sequence[Event]) -> list[BaseException | None]:
        results = await real_publish(events)
        order.extend(e.id for e, r in zip(events, results, strict=True) if r is None)
        return results

    provider.publish_many = spy  # type: ignore[method-assign]
    await run_until(relay, lambda: counts(engine) == {"completed": 6})
    assert order == ids  # the refused event went out before the later ones of its key
    handled = [e.id for e in rec.seen]
    assert handled == ids  # handlers ran once each: the retry only re-forwarded
    row = next(e for e in rows(engine) if e.id == ids[2])
    assert row.retry_count == 1 and "too large" in (row.error or "")


# -- leases -------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_provider_that_cannot_publish_is_refused_at_start(sqlite_url: str) -> None:
    """A provider without ``publish_many`` would fail every event it was given; the relay says
    so at start instead."""

    class StoreOnly:
        async def store(self, event: Event) -> None: ...

    store_only: Any = StoreOnly()
    relay = Relay(sqlite_url, broker=Broker(MemoryProvider()), provider=store_only)
    with pytest.raises(TypeError, match=r"forwards to a Publisher.*StoreOnly"):
        await relay.start()


@pytest.mark.anyio
async def test_expired_lease_of_dead_relay_is_recovered_and_fenced(engine: sa.Engine) -> None:
    ids = add_events(engine, 8)
    dead = RelayStore(engine, owner="dead-relay")
    claim = dead.claim(5, lease=0.2)
    assert len(claim.events) == 5
    relay, rec, _ = make(engine, lease=0.6)
    await run_until(relay, lambda: counts(engine) == {"completed": 8})
    assert sorted(e.id for e in rec.seen) == sorted(ids)
    assert relay.stats.recovered == 5
    # the dead relay comes back late: its outcomes are fenced out by the lease token
    from outbox._sql.relay import Outcome

    res = dead.finish(claim.token, [Outcome(e, "failed", error="late") for e in claim.events])
    assert res.settled == 0
    assert counts(engine) == {"completed": 8}


async def _second_relay_joins(engine: sa.Engine, relay: Relay, other: Relay, n: int) -> None:
    """Run ``relay``; once it claimed, ``other`` too; stop both when ``n`` events completed."""
    async with anyio.create_task_group() as tg:
        tg.start_soon(relay.run)
        await eventually(lambda: relay.stats.claimed)
        tg.start_soon(other.run)
        await eventually(lambda: counts(engine) == {"completed": n})
        relay.stop()
        other.stop()


@pytest.mark.anyio
async def test_lease_renewed_while_a_slow_batch_runs(pg_engine: sa.Engine) -> None:
    ids = add_events(pg_engine, 3)
    relay, rec, _ = make(pg_engine, lease=0.3)
    other, other_rec, _ = make(pg_engine, lease=0.3)

    async def slow(event: Event) -> None:
        await anyio.sleep(1.2)  # four leases long

    relay._broker.subscribe("test.>", slow, name="slow")
    other._broker.subscribe("test.>", slow, name="slow")
    await _second_relay_joins(pg_engine, relay, other, 3)
    assert sorted(e.id for e in rec.seen + other_rec.seen) == sorted(ids)  # none twice
    assert relay.stats.lease_lost == 0 and other.stats.recovered == 0


@pytest.mark.anyio
async def test_a_blocking_sync_handler_keeps_its_batch_mates_leases(pg_engine: sa.Engine) -> None:
    """The README's handler style (a plain def, run in worker threads) blocking for twice the
    lease on one event: the event loop renews the batch's leases meanwhile, another relay takes
    over nothing, and no event is handled twice."""
    import threading
    import time

    ids = add_events(pg_engine, 6, key=lambda i: f"k{i % 3}")
    seen: list[uuid.UUID] = []
    lock = threading.Lock()

    def blocking(event: Event) -> None:
        with lock:
            seen.append(event.id)
        if event.id == ids[0]:
            time.sleep(0.8)  # the lease is 0.4 s

    def relay_with_blocking_handler() -> Relay:
        broker = Broker(MemoryProvider(), retry_policy=FAST)
        broker.subscribe("test.>", blocking, name="blocking")  # its only handler: batch threads
        return Relay(pg_engine, broker=broker, retry_policy=FAST, lease=0.4, poll_interval=0.05)

    relay, other = relay_with_blocking_handler(), relay_with_blocking_handler()
    await _second_relay_joins(pg_engine, relay, other, 6)
    assert sorted(seen) == sorted(ids)  # none twice
    assert relay.stats.lease_lost == 0 and other.stats.recovered == 0


# -- concurrency --------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_late_committing_writer_is_not_skipped(pg_url: str) -> None:
    engine = sa.create_engine(pg_url)
    outbox.create_schema(engine)
    relay, rec, _ = make(engine, batch_size=10)
    relay.rescan_interval = 0.2
    async with anyio.create_task_group() as tg:
        tg.start_soon(relay.run)
        # T1 takes a seq first and commits last
        slow = Session(engine)
        early = outbox.new_event("system", "test.slow.create", {"i": -1}, ordering_key=None)
        slow.add(early)
        slow.flush()
        early_id = early.id
        later = add_events(engine, 30)
        await eventually(lambda: counts(engine).get("completed", 0) >= 30)
        with engine.connect() as c:
            early_seq = c.execute(sa.text("SELECT seq FROM events WHERE id = :i"),
                                  {"i": early_id}).scalar_one_or_none()
        assert early_seq is None  # not visible yet
        slow.commit()
        slow.close()
        await eventually(lambda: counts(engine) == {"completed": 31})
        relay.stop()
    seen = [e.id for e in rec.seen]
    assert sorted(seen) == sorted([*later, early_id])
    engine.dispose()


@pytest.mark.anyio
async def test_notify_wakes_relay_without_polling(pg_engine: sa.Engine) -> None:
    relay, _rec, _ = make(pg_engine, poll_interval=3600)
    relay.rescan_interval = 3600

    async with anyio.create_task_group() as tg:
        tg.start_soon(relay.run)
        with anyio.fail_after(30):
            await eventually(lambda: relay.stats.listener_connected)
            await eventually(lambda: idle(relay), what="the relay to wait for a notification")
            add_events(pg_engine, 3)
            await eventually(lambda: counts(pg_engine) == {"completed": 3})
        relay.stop()
    assert relay.stats.notifications >= 1


@pytest.mark.anyio
async def test_notify_can_be_switched_off_for_writers(pg_engine: sa.Engine) -> None:
    """``SET outbox.notify = off`` silences the trigger; the relay still finds events by polling."""
    relay, _rec, _ = make(pg_engine, poll_interval=0.2)
    async with anyio.create_task_group() as tg:
        tg.start_soon(relay.run)
        with anyio.fail_after(30):
            await eventually(lambda: relay.stats.listener_connected)
            await eventually(lambda: idle(relay), what="the relay to wait for a notification")
            before = relay.stats.notifications
            with Session(pg_engine) as s:
                s.execute(sa.text("SET LOCAL outbox.notify = off"))
                s.add(outbox.new_event("system", "test.quiet.create", {}))
                s.commit()
            await eventually(lambda: counts(pg_engine) == {"completed": 1})
        relay.stop()
    assert relay.stats.notifications == before


@pytest.mark.anyio
async def test_graceful_stop_hands_back_unstarted_events(engine: sa.Engine) -> None:
    add_events(engine, 200)
    relay, rec, _ = make(engine, batch_size=20, concurrency=1)
    started = anyio.Event()

    async def slow(event: Event) -> None:
        started.set()
        await anyio.sleep(0.01)

    relay._broker.subscribe("test.>", slow, name="slow")
    async with anyio.create_task_group() as tg:
        tg.start_soon(relay.run)
        await started.wait()
        relay.stop()
    c = counts(engine)
    assert "processing" not in c
    assert c["completed"] >= 20 and c["completed"] + c["pending"] == 200
    assert relay.stats.completed == c["completed"]
    with engine.connect() as conn:
        leftover = conn.execute(sa.text(
            "SELECT count(*) FROM events WHERE lease_token IS NOT NULL")).scalar_one()
    assert leftover == 0
    relay2, rec2, _ = make(engine)
    await relay2.drain()
    assert counts(engine) == {"completed": 200}
    assert len(rec.seen) + len(rec2.seen) == 200  # nothing handled twice after a clean stop
