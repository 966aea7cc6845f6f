"""DatabaseProvider: storage SQL, the bus (snapshots, start at a time), take-overs, leases, the
inbox. The behaviour every provider shares (groups, nack, park, closing): ``tests/conformance``.

Runs on PostgreSQL and SQLite (``engine`` fixture) where the behaviour is the same; PostgreSQL-only
behaviour (transaction ids, late commits, clusters) uses ``pg_engine``.
"""

from __future__ import annotations

import datetime as dt
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import pytest
import sqlalchemy as sa

import outbox
from outbox._patterns import compile_pattern
from outbox._sql import bus as dbsql
from outbox._sql import events as event_sql
from outbox.events import Event, EventStatus, utcnow
from outbox.providers.base import EventFilter, EventNotFound, StartPosition
from outbox.providers.database import (
    ClusterChanged,
    DatabaseDelivery,
    DatabaseProvider,
    parse_start,
)
from outbox.providers.database.rebase import rebase
from outbox.schema import consumer_claims_table, consumers_table, dead_letters_table, inbox_table
from tests.helpers import eventually

pytestmark = pytest.mark.anyio

TIMEOUT = 20.0


def ev(type: str = "app.thing.happened", **kw: Any) -> Event:
    return outbox.new_event(kw.pop("source", "system"), type, kw.pop("payload", {}), **kw)


async def take(it: AsyncIterator[DatabaseDelivery], n: int) -> list[DatabaseDelivery]:
    out = []
    with anyio.fail_after(TIMEOUT):
        for _ in range(n):
            out.append(await it.__anext__())
    return out


async def nothing_more(it: AsyncIterator[DatabaseDelivery], seconds: float = 0.4) -> bool:
    """True when ``it`` yields nothing for ``seconds`` (the provider polls several times)."""
    with anyio.move_on_after(seconds):
        await it.__anext__()
        return False
    return True


@pytest.fixture
def provider_factory(engine: sa.Engine) -> Iterator[Any]:
    made: list[DatabaseProvider] = []

    def make(**kw: Any) -> DatabaseProvider:
        kw.setdefault("poll_interval", 0.05)
        p = DatabaseProvider(engine, **kw)
        made.append(p)
        return p

    yield make


@pytest.fixture
def pg_factory(pg_engine: sa.Engine) -> Iterator[Any]:
    def make(**kw: Any) -> DatabaseProvider:
        kw.setdefault("poll_interval", 0.05)
        return DatabaseProvider(pg_engine, **kw)

    yield make


# -- storage ---------------------------------------------------------------------------------------


async def test_store_get_update_delete(provider_factory: Any) -> None:
    p = provider_factory()
    e = ev(payload={"a": [1, 2]}, user_id=7, metadata={"k": "v"})
    await p.store(e)
    await p.store(e)  # idempotent by id
    got = await p.get(e.id)
    assert got is not None and got is not e
    assert (got.id, got.type, got.payload, got.user_id, got.meta) == (
        e.id, e.type, {"a": [1, 2]}, "7", {"k": "v"})
    assert got.created_at == e.created_at and got.seq > 0
    got.payload["a"].append(3)
    assert (await p.get(str(e.id))).payload == {"a": [1, 2]}  # copies, also by text id
    assert await p.get(uuid.uuid4()) is None
    with pytest.raises(ValueError, match="not a valid event id"):
        await p.get("nope")

    await p.update_status(e.id, EventStatus.PROCESSING)
    row = await p.get(e.id)
    assert row.status == "processing" and row.processed_at is not None
    await p.update_status(e.id, "failed", "boom")
    row = await p.get(e.id)
    assert (row.status, row.error) == ("failed", "boom") and row.completed_at is not None
    await p.update_status(e.id, "pending")
    row = await p.get(e.id)
    assert row.status == "pending" and row.completed_at is None and row.error is None
    with pytest.raises(ValueError):
        await p.update_status(e.id, "weird")
    with pytest.raises(EventNotFound):
        await p.update_status(uuid.uuid4(), "completed")

    stats = await p.stats()
    assert (stats.provider, stats.total_events, stats.pending_events) == ("database", 1, 1)
    await p.delete(e.id)
    assert await p.get(e.id) is None
    with pytest.raises(EventNotFound):
        await p.delete(e.id)
    await p.close()
    with pytest.raises(outbox.exceptions.ProviderError):
        await p.get(e.id)


async def test_publish_many_and_bad_input(provider_factory: Any) -> None:
    p = provider_factory()
    events = [ev(payload={"i": i}) for i in range(5)]
    assert await p.publish_many(events + events[:2]) == [None] * 7
    assert (await p.stats()).total_events == 5
    with pytest.raises(TypeError):
        await p.publish({"type": "x"})  # type: ignore[arg-type]
    await p.close()


TYPES = ["public.users.create", "public.users.update", "public.order_items.create",
         "public.orderXitems.create", "public.users.x.create", "main.users.create", "a", "a.b",
         "a.b.c", "a%b.c", "a_b.c", "public.users", "Public.users.create", "public/x.y",
         "x.users.create", "x.y.users.create", "a.", "a..b"]
PATTERNS = ["*", "public.users.create", "public.*.create", "public.>", "*.users.create", "a.>",
            "a_b.c", "public.order_items.*", "*.*", ">", "public.users.*", "nothing.>",
            "*.users.>", "a.*.>", "*.*.>", "*.>"]


async def test_list_type_patterns_match_the_python_matcher(provider_factory: Any) -> None:
    p = provider_factory()
    for t in TYPES:
        await p.store(ev(t))
    for pattern in PATTERNS:
        found = sorted(e.type for e in await p.list(EventFilter(type=pattern)))
        assert found == sorted(t for t in TYPES if compile_pattern(pattern).matches(t)), pattern
    await p.close()


async def test_list_every_field_order_and_pages(provider_factory: Any) -> None:
    p = provider_factory()
    base = dict(user_id="u1", session_id="s1", instance_id="i1", schema_name="public",
                entity="users", entity_id="7", operation="update")
    t0 = utcnow() - dt.timedelta(hours=1)
    hit = ev("public.users.update", source="database", created_at=t0, **base)
    others = [ev("public.users.update", source="database", created_at=t0, **{**base, k: "x"})
              for k in base]
    other_source = ev("public.users.update", source="system", created_at=t0, **base)
    same_time = [ev("t.x", created_at=t0) for _ in range(5)]
    for e in [hit, *others, other_source, *same_time]:
        await p.store(e)
    full = EventFilter(source="database", type="public.*.update", status="pending",
                       start_time=t0, end_time=t0 + dt.timedelta(microseconds=1), **base)
    assert [e.id for e in await p.list(full)] == [hit.id]
    assert await p.list(EventFilter(start_time=t0, end_time=t0)) == []  # end exclusive
    everything = await p.list()
    assert len(everything) == 14
    assert [e.seq for e in everything] == sorted(e.seq for e in everything)  # same created_at
    pages = [await p.list(EventFilter(limit=5, offset=o)) for o in (0, 5, 10)]
    assert [e.id for page in pages for e in page] == [e.id for e in everything]
    for name, value in base.items():
        matching = await p.list(EventFilter(**{name: value}))
        assert {e.id for e in matching} == {e.id for e in everything
                                            if getattr(e, name) == value}
    await p.close()


# -- the bus ---------------------------------------------------------------------------------------


async def test_store_is_not_delivered_until_published(pg_factory: Any) -> None:
    p = pg_factory()
    group = p.consume(group="g")
    tail = p.stream()
    e = ev()
    await p.store(e)
    marker = ev("marker")
    await p.publish(marker)
    assert [d.event.id for d in await take(group, 1)] == [marker.id]
    assert (await tail.__anext__()).id == marker.id
    await p.publish(e)  # stored before: joins the bus now
    d = (await take(group, 1))[0]
    assert d.event.id == e.id
    with anyio.fail_after(TIMEOUT):
        assert (await tail.__anext__()).id == e.id
    await group.aclose()
    await tail.aclose()
    await p.close()


async def test_a_new_group_starts_at_a_time(provider_factory: Any) -> None:
    """A datetime start takes the events *created* since then, in the bus order (``NOW``,
    ``BEGINNING`` and resuming an existing group: tests/conformance)."""
    p = provider_factory()
    old = [ev(payload={"i": i}, created_at=utcnow() - dt.timedelta(hours=2 - i)) for i in range(3)]
    for e in old:
        await p.publish(e)
    since = old[1].created_at
    stamp = p.consume(group="g-time", start=since)
    new = ev(payload={"new": True})
    await p.publish(new)
    assert [d.event.id for d in await take(stamp, 3)] == [old[1].id, old[2].id, new.id]
    await stamp.aclose()
    await p.close()


def test_parse_start() -> None:
    assert parse_start("beginning") is StartPosition.BEGINNING
    assert parse_start(" NOW ") is StartPosition.NOW
    assert parse_start("2026-01-01T00:00Z") == dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    assert parse_start("2026-01-01T00:00") == dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    with pytest.raises(ValueError, match="beginning"):
        parse_start("yesterday")


def _expire_leases(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        conn.execute(sa.update(consumer_claims_table).values(
            lease_expires_at=dt.datetime(2001, 1, 1, tzinfo=dt.UTC)))


async def test_dead_member_is_taken_over_and_fenced(engine: sa.Engine,
                                                   provider_factory: Any) -> None:
    crashed = provider_factory(lease=0.6)
    survivor = provider_factory(lease=60)
    a = crashed.consume(group="g", consumer="crashed")
    events = [ev(payload={"i": i}) for i in range(4)]
    await crashed.publish_many(events)
    held = await take(a, 4)
    await held[0].ack()
    await held[1].ack()
    # lease renewals (every lease/3) record the acknowledged prefix of the claim
    async def prefix_recorded() -> bool:
        claims = await anyio.to_thread.run_sync(_claims, engine)
        return bool(claims[0]["lo_seq"] == held[1].position[1])

    await eventually(prefix_recorded, within=TIMEOUT, every=0.05)
    # "crash": renewals stop (as when the process dies) and the lease runs out
    assert crashed._keeper is not None
    crashed._keeper.cancel()
    await anyio.to_thread.run_sync(_expire_leases, engine)
    b = survivor.consume(group="g", consumer="survivor")
    taken = await take(b, 2)
    assert [d.event.id for d in taken] == [e.id for e in events[2:]]
    assert all(d.attempt == 2 for d in taken)
    # the old member comes back late: its acks do not finish the claim it lost
    await held[2].ack()
    await held[3].ack()
    rows = await anyio.to_thread.run_sync(_claims, engine)
    assert len(rows) == 1 and rows[0]["consumer"] == "survivor"
    for d in taken:
        await d.ack()
    assert await anyio.to_thread.run_sync(_claims, engine) == []
    assert await nothing_more(b)
    await b.aclose()
    await crashed.close()
    await survivor.close()


async def test_event_that_kills_its_members_is_parked_after_max_deliveries(
        engine: sa.Engine, provider_factory: Any) -> None:
    """A handler that crashes its process every time: the event is parked, the rest flows."""
    poison, after = ev(payload={"poison": True}), ev(payload={"ok": True})
    members: list[DatabaseProvider] = []

    async def member_dies_holding(expected: list[uuid.UUID]) -> list[DatabaseDelivery]:
        p = provider_factory(lease=60, max_deliveries=3)
        members.append(p)
        it = p.consume(group="g", consumer=f"m{len(members)}", start=StartPosition.BEGINNING)
        got = await take(it, len(expected))
        assert [d.event.id for d in got] == expected
        assert await nothing_more(it, 0.3)
        assert p._keeper is not None
        p._keeper.cancel()  # the process dies: no renewal, no settlement, no give-back
        await anyio.to_thread.run_sync(_expire_leases, engine)
        return got

    first = provider_factory()
    await first.publish_many([poison, after])
    # Takes 1 and 2 hand the range out as usual (a crash unrelated to the events recovers fast).
    assert [d.attempt for d in await member_dies_holding([poison.id, after.id])] == [1, 1]
    assert [d.attempt for d in await member_dies_holding([poison.id, after.id])] == [2, 2]
    # From take 3 the range goes one event at a time: its member dies on the first one.
    assert [d.attempt for d in await member_dies_holding([poison.id])] == [3]
    # Take 4 > max_deliveries: the poison event is parked, the rest comes as a fresh range.
    survivor = provider_factory(lease=60, max_deliveries=3)
    it = survivor.consume(group="g", consumer="survivor")
    (rest,) = await take(it, 1)
    assert (rest.event.id, rest.attempt) == (after.id, 1)
    await rest.ack()
    assert await nothing_more(it)
    letters = await survivor.dead_letters("g")
    assert [(d["event_id"], d["attempt"]) for d in letters] == [(poison.id, 3)]
    assert "max_deliveries=3" in letters[0]["error"]
    assert (await survivor.stats()).extra["dead_lettered_here"] == 1
    assert await anyio.to_thread.run_sync(_claims, engine) == []
    await it.aclose()
    for p in (first, survivor, *members):
        await p.close()


async def test_one_at_a_time_progress_resets_the_count(engine: sa.Engine,
                                                        provider_factory: Any) -> None:
    """In a range taken a third time, each settled event is recorded before the next is handed
    out, and progress makes the rest count afresh (nobody is parked for a neighbour's crash)."""
    events = [ev(payload={"i": i}) for i in range(3)]
    p = provider_factory(lease=60, max_deliveries=3)
    await p.publish_many(events)
    it0 = p.consume(group="g", start=StartPosition.BEGINNING)
    await take(it0, 3)
    assert p._keeper is not None
    p._keeper.cancel()
    with engine.begin() as conn:  # as if members that died had taken the range twice
        conn.execute(sa.update(consumer_claims_table).values(
            attempt=2, lease_expires_at=dt.datetime(2001, 1, 1, tzinfo=dt.UTC)))
    q = provider_factory(lease=60, max_deliveries=3)
    it = q.consume(group="g", consumer="q")
    (one,) = await take(it, 1)
    assert (one.event.id, one.attempt) == (events[0].id, 3)
    assert await nothing_more(it, 0.3)  # one at a time
    await one.ack()
    claim = (await anyio.to_thread.run_sync(_claims, engine))[0]
    assert ((claim["lo_txid"], claim["lo_seq"]), claim["attempt"]) == (one.position, 1)
    (two,) = await take(it, 1)
    assert (two.event.id, two.attempt) == (events[1].id, 1)
    await two.ack()
    (three,) = await take(it, 1)
    await three.ack()
    assert await nothing_more(it)
    assert await q.dead_letters("g") == []
    await it.aclose()
    await q.close()
    await p.close()


def test_max_deliveries_from_config(engine: sa.Engine) -> None:
    config = outbox.Config.from_dict({"provider": "database", "database": {
        "url": engine.url.render_as_string(hide_password=False), "max_deliveries": 4}})
    provider = DatabaseProvider.from_config(config)
    try:
        assert provider.max_deliveries == 4
    finally:
        provider.engine.dispose()
    with pytest.raises(ValueError, match="max_deliveries"):
        DatabaseProvider(engine, max_deliveries=0)
    with pytest.raises(outbox.exceptions.ConfigError, match=r"database\.max_deliveries"):
        outbox.Config.from_dict({"database": {"max_deliveries": 0}})


def _claims(engine: sa.Engine) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(sa.select(consumer_claims_table))]


async def test_exactly_once_with_ack_in(engine: sa.Engine, provider_factory: Any) -> None:
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE effects (event_id VARCHAR(36) PRIMARY KEY)")
    p = provider_factory(lease=60)
    it = p.consume(group="g", consumer="a")
    events = [ev(payload={"i": i}) for i in range(3)]
    await p.publish_many(events)
    held = await take(it, 3)

    def handle(d: DatabaseDelivery) -> bool:
        with engine.begin() as conn:
            first = d.ack_in(conn)
            if first:
                conn.execute(sa.text("INSERT INTO effects VALUES (:id)"),
                             {"id": str(d.event.id)})
            return first

    # the first two are handled (committed) but the member dies before acking them
    assert await anyio.to_thread.run_sync(handle, held[0])
    assert await anyio.to_thread.run_sync(handle, held[1])
    claim = (await anyio.to_thread.run_sync(_claims, engine))[0]
    # the first one moved the claim's cursor in its own transaction; the second could not (the
    # first was not settled yet) and is known through the inbox only
    assert (claim["lo_txid"], claim["lo_seq"]) == held[0].position
    await anyio.to_thread.run_sync(_expire_leases, engine)
    other = provider_factory(lease=60)
    b = other.consume(group="g", consumer="b")
    redelivered = await take(b, 1)
    assert redelivered[0].event.id == events[2].id  # handled ones are skipped on take-over
    assert await anyio.to_thread.run_sync(handle, redelivered[0])
    await redelivered[0].ack()
    # a duplicate that still reaches a handler is recognised by the inbox
    assert not await anyio.to_thread.run_sync(handle, held[1])
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM effects")).scalar() == 3
        assert conn.execute(sa.select(sa.func.count()).select_from(inbox_table)).scalar() == 3
    await it.aclose()
    await b.aclose()
    await p.close()
    await other.close()


async def test_ack_with_async_session(pg_url: str, pg_engine: sa.Engine) -> None:
    from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

    aengine = create_async_engine(pg_url)
    p = DatabaseProvider(aengine, poll_interval=0.05)  # an AsyncEngine is accepted
    it = p.consume(group="g")
    e = ev()
    await p.publish(e)
    d = (await take(it, 1))[0]
    async with AsyncSession(aengine) as session, session.begin():
        assert await d.ack_with(session)
    async with aengine.connect() as conn, conn.begin():
        assert not await d.ack_with(conn)
    await d.ack()
    await it.aclose()
    await p.close()
    await aengine.dispose()


async def test_stream_with_and_without_group(provider_factory: Any) -> None:
    p = provider_factory()
    tail = p.stream("x.*")
    grouped = p.stream("x.*", group="sg")
    before = ev("x.before")
    assert before  # created before: what counts is the commit
    await p.publish(ev("y.other"))
    await p.publish(before)
    with anyio.fail_after(TIMEOUT):
        assert (await tail.__anext__()).id == before.id
        assert (await grouped.__anext__()).id == before.id
    await tail.aclose()
    await grouped.aclose()  # the last one was never acknowledged: the group gets it again
    again = p.consume("x.*", group="sg")
    assert [d.event.id for d in await take(again, 1)] == [before.id]
    await again.aclose()
    with pytest.raises(ValueError):
        p.stream("bad..pattern")
    with pytest.raises(ValueError):
        p.consume(group="bad group")
    await p.close()


# -- PostgreSQL: batches between snapshots ------------------------------------------------------


def _insert_raw(conn: sa.Connection, event: Event) -> None:
    event_sql.insert_events(conn, [event], True)


async def test_a_late_commit_is_not_skipped_nor_waited_for(pg_engine: sa.Engine,
                                                          pg_factory: Any) -> None:
    p = pg_factory()
    it = p.consume(group="g")
    early, late = ev(payload={"early": 1}), ev(payload={"late": 1})
    conn = pg_engine.connect()
    tx = conn.begin()
    _insert_raw(conn, early)  # lower seq and txid, still uncommitted
    await p.publish(late)  # commits first: delivered at once, not held behind `early`
    first = await take(it, 1)
    assert [d.event.id for d in first] == [late.id]
    await first[0].ack()
    assert await nothing_more(it)
    await anyio.to_thread.run_sync(tx.commit)
    conn.close()
    got = await take(it, 1)  # the late commit comes in the next batch: not skipped
    assert [d.event.id for d in got] == [early.id]
    assert got[0].event.seq < first[0].event.seq
    await got[0].ack()
    assert await nothing_more(it)
    with pg_engine.connect() as probe, probe.begin():
        assert not dbsql.peek(probe, "g").ready
    await it.aclose()
    await p.close()


async def test_unrelated_long_transaction_delays_nothing(
        pg_engine: sa.Engine, pg_factory: Any) -> None:
    p = pg_factory(notify=False, poll_interval=0.05)
    it = p.consume(group="g")
    other = pg_engine.connect()
    tx = other.begin()
    other.execute(sa.select(event_sql.CURRENT_XID))  # holds a transaction id, writes no event
    e = ev()
    await p.publish(e)
    with anyio.fail_after(5):
        assert [d.event.id for d in await take(it, 1)] == [e.id]
    await anyio.to_thread.run_sync(tx.rollback)
    other.close()
    assert await nothing_more(it)
    await it.aclose()
    await p.close()


async def test_rolled_back_events_are_never_delivered(pg_engine: sa.Engine,
                                                      pg_factory: Any) -> None:
    p = pg_factory()
    it = p.consume(group="g")
    with pg_engine.connect() as conn:
        tx = conn.begin()
        _insert_raw(conn, ev(payload={"phantom": True}))
        tx.rollback()
    real = ev()
    await p.publish(real)
    assert [d.event.id for d in await take(it, 1)] == [real.id]
    assert await nothing_more(it)
    await it.aclose()
    await p.close()


async def test_other_cluster_is_refused_and_rebase_recovers(pg_engine: sa.Engine,
                                                            pg_factory: Any) -> None:
    p = pg_factory()
    it = p.consume(group="g", start=StartPosition.BEGINNING)
    first = ev(payload={"i": 1})
    await p.publish(first)
    d = (await take(it, 1))[0]
    await d.ack()
    await it.aclose()
    # what a restore into another cluster looks like: foreign cluster id, txids from the future
    with pg_engine.begin() as conn:
        conn.execute(sa.update(consumers_table).values(
            cluster_id="42", snapshot=f"{10**12}:{10**12}:"))
    it = p.consume(group="g")
    with pytest.raises(ClusterChanged, match="rebase"):
        await take(it, 1)
    await it.aclose()
    with pg_engine.begin() as conn:
        conn.execute(sa.update(consumers_table).values(cluster_id=None))
    it = p.consume(group="g")
    with pytest.raises(ClusterChanged, match="restored into another cluster"):
        await take(it, 1)
    await it.aclose()
    # recovery: everything created since `first` is delivered again (dedupe by id)
    second = ev(payload={"i": 2})
    await p.publish(second)
    report = await anyio.to_thread.run_sync(
        lambda: rebase(pg_engine, since=first.created_at))
    assert report.groups == ["g"] and report.restamped >= 2
    it = p.consume(group="g")
    assert [d.event.id for d in await take(it, 2)] == [first.id, second.id]
    third = ev(payload={"i": 3})
    await p.publish(third)
    assert [d.event.id for d in await take(it, 1)] == [third.id]
    await it.aclose()
    with pg_engine.connect() as conn:
        stored = conn.execute(sa.select(consumers_table.c.cluster_id)).scalar()
        assert stored == dbsql.cluster_id(conn)
    await p.close()


async def test_rebase_keep_positions_refuses_a_restarted_counter(pg_engine: sa.Engine,
                                                                 pg_factory: Any) -> None:
    p = pg_factory()
    it = p.consume(group="g")
    await it.aclose()
    with pg_engine.begin() as conn:
        conn.execute(sa.update(consumers_table).values(cluster_id="42"))
    report = await anyio.to_thread.run_sync(
        lambda: rebase(pg_engine, keep_positions=True))
    assert report.groups == ["g"] and report.restamped == 0
    with pg_engine.begin() as conn:
        conn.execute(sa.update(consumers_table).values(snapshot=f"{10**12}:{10**12}:"))
    with pytest.raises(ClusterChanged, match="--from"):
        await anyio.to_thread.run_sync(lambda: rebase(pg_engine, keep_positions=True))
    await p.close()


# -- dialects --------------------------------------------------------------------------------------


async def test_mariadb_stores_but_has_no_bus(mariadb_url: str) -> None:
    eng = sa.create_engine(mariadb_url)
    outbox.create_schema(eng)
    p = DatabaseProvider(eng)
    e = ev("public.users.create")
    await p.publish(e)
    await p.publish(e)
    assert (await p.get(e.id)).type == "public.users.create"
    assert [x.id for x in await p.list(EventFilter(type="public.*.create"))] == [e.id]
    assert await p.list(EventFilter(type="Public.users.create")) == []  # case-sensitive
    other = ev("x.y.users.create")
    await p.store(other)
    assert [x.id for x in await p.list(EventFilter(type="*.users.>"))] == [e.id]
    assert [x.id for x in await p.list(EventFilter(type="*.y.>"))] == [other.id]
    with pytest.raises(outbox.exceptions.ProviderError, match="PostgreSQL"):
        p.consume(group="g")
    await p.close()
    eng.dispose()


async def test_ping_reports_an_unreachable_database() -> None:
    provider = DatabaseProvider("postgresql+psycopg://outbox@127.0.0.1:1/nowhere")
    with pytest.raises(outbox.exceptions.ProviderUnavailable, match="database unavailable"):
        await provider.ping()
    await provider.close()
    with pytest.raises(outbox.exceptions.ProviderError, match="closed"):
        await provider.ping()


async def test_schema_missing_is_a_clear_error(pg_url: str) -> None:
    p = DatabaseProvider(pg_url)
    with pytest.raises(outbox.exceptions.SchemaMissing, match="alembic upgrade head"):
        await p.get(uuid.uuid4())
    await p.close()


async def test_from_config(sqlite_url: str) -> None:
    config = outbox.Config.from_dict({"provider": "database", "database": {
        "url": sqlite_url, "poll_interval": 0.5, "batch_size": 7, "notify": False}})
    p = outbox.config.provider_from_config(config)
    assert isinstance(p, DatabaseProvider)
    assert (p.poll_interval, p.batch_size, p.notify, p.lease) == (0.5, 7, False, 30.0)
    await p.close()
    with pytest.raises(outbox.exceptions.ConfigError, match=r"database\.url"):
        DatabaseProvider.from_config({"database": {}})
    with pytest.raises(ValueError, match="batch_size"):
        DatabaseProvider("sqlite://", batch_size=0)


def test_dead_letters_table_is_in_the_schema(engine: sa.Engine) -> None:
    assert sa.inspect(engine).has_table(dead_letters_table.name)


def test_threads_share_a_provider_engine(engine: sa.Engine) -> None:
    """The provider runs its SQL in worker threads; the engine pool is thread-safe."""
    errors: list[BaseException] = []

    def work() -> None:
        try:
            anyio.run(_publish_some, engine)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(Event.__table__)).scalar() == 30


async def _publish_some(engine: sa.Engine) -> None:
    p = DatabaseProvider(engine)
    for i in range(10):
        await p.publish(ev(payload={"i": i}))
    await p.close()
