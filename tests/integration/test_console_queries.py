"""outbox._sql.console: the console's queries, on PostgreSQL and SQLite."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
import sqlalchemy as sa

import outbox
from outbox import ops
from outbox._sql import console as ops_console
from outbox._sql.console import Cursor
from outbox.events import Event, EventFilter, utcnow
from tests.integration.ops_seed import INJECTIONS, add, count, event, statuses


def failed(type: str, error: str, **kw: object) -> Event:
    ev = event(type, status="failed", **kw)  # type: ignore[arg-type]
    ev.error = error
    return ev


def _all_pages(engine: sa.Engine, f: EventFilter, limit: int) -> list[list[int]]:
    pages: list[list[int]] = []
    before = None
    with engine.connect() as conn:
        while True:
            page = ops_console.trail_page(conn, f, before=before, limit=limit)
            pages.append([r.seq for r in page.rows])
            if page.older is None:
                return pages
            before = page.older


def test_trail_pages_cover_every_event_once_newest_first(engine: sa.Engine) -> None:
    tied = utcnow() - dt.timedelta(minutes=5)
    evs = [event("t.a", age=dt.timedelta(minutes=i)) for i in range(7)]
    same = [event("t.b") for _ in range(5)]
    for ev in same:  # one flush: equal created_at, told apart by seq
        ev.created_at = tied
    add(engine, evs + same)
    expected = [e.seq for e in sorted(evs + same, key=lambda e: (e.created_at, e.seq),
                                      reverse=True)]
    pages = _all_pages(engine, EventFilter(), limit=3)
    assert [s for p in pages for s in p] == expected
    assert all(len(p) == 3 for p in pages[:-1])
    # A filter served by a (column, created_at) index pages the same way.
    for f in (EventFilter(type="t.b"), EventFilter(status="pending"),
              EventFilter(instance_id=same[0].instance_id, type="t.b")):
        wanted = [s for s in expected if f.matches(next(e for e in evs + same if e.seq == s))]
        assert [s for p in _all_pages(engine, f, limit=2) for s in p] == wanted, f
    # The newer page of the second page is the first page.
    with engine.connect() as conn:
        first = ops_console.trail_page(conn, limit=3)
        second = ops_console.trail_page(conn, before=first.older, limit=3)
        back = ops_console.trail_page(conn, after=second.newer, limit=3)
        assert first.newer is None and second.newer is not None
        assert [r.seq for r in back.rows] == [r.seq for r in first.rows]
        assert back.newer is None and back.older == first.older
        with pytest.raises(ValueError):
            ops_console.trail_page(conn, before=first.older, after=first.older)


def test_trail_filters_select_what_the_cli_selects(engine: sa.Engine) -> None:
    add(engine, [
        event("public.users.create", user_id="u1", entity="users", entity_id="1",
              schema_name="public", operation="create", session_id="s1", status="completed"),
        event("public.users.update", user_id="u2", entity="users", entity_id="1",
              schema_name="public", operation="update", age=dt.timedelta(hours=2)),
        event("public.orders.create", user_id="u1", entity="orders", entity_id="9",
              schema_name="public", operation="create", source="system"),
        failed("billing.invoice.sent", "boom"),
    ])
    now = utcnow()
    filters = [
        EventFilter(), EventFilter(type="public.users.*"), EventFilter(type="public.>"),
        EventFilter(status="failed"), EventFilter(status="completed"),
        EventFilter(user_id="u1"), EventFilter(session_id="s1"), EventFilter(source="system"),
        EventFilter(entity="users", entity_id="1"), EventFilter(operation="update"),
        EventFilter(schema_name="public", start_time=now - dt.timedelta(hours=1)),
        EventFilter(end_time=now - dt.timedelta(hours=1)),
        EventFilter(type="public.users.create"), EventFilter(instance_id="nobody"),
        EventFilter(status="pending", type="public.>"),
        EventFilter(type="billing.invoice.sent", status="failed"),
    ]
    with engine.connect() as conn:
        for f in filters:
            cli = sorted(e.seq for e in ops.list_events(conn, f))
            assert sorted(r.seq for r in ops_console.trail_page(conn, f).rows) == cli, f


@pytest.mark.parametrize("value", INJECTIONS)
def test_injection_strings_are_values_in_the_trail(engine: sa.Engine, value: str) -> None:
    add(engine, [event("public.users.create", user_id="u1", entity="users", entity_id="1")])
    with engine.connect() as conn:
        for name in EventFilter.EQUALITY_FIELDS:
            assert ops_console.trail_page(conn, EventFilter(**{name: value})).rows == []
        entries, _ = ops_console.entity_timeline(conn, value, value, schema_name=value)
        assert entries == []
        assert ops_console.failure_group_count(conn, value, value) == 0
    assert ops_console.replay_failure_group(engine, value, value).replayed == 0
    assert count(engine) == 1


def test_cursor_text_round_trip_and_bad_cursors() -> None:
    cur = Cursor(dt.datetime(2026, 1, 2, 3, 4, 5, 123456, tzinfo=dt.UTC), 42)
    assert Cursor.parse(str(cur)) == cur
    for bad in ("", "42", "x@2026-01-01", "42@yesterday", "'; DROP TABLE events; --"):
        with pytest.raises(ValueError, match="invalid page cursor"):
            Cursor.parse(bad)


def test_entity_timeline_with_changes_newest_first(engine: sa.Engine) -> None:
    row = dict(schema_name="public", entity="users", entity_id="42")
    evs = [
        event("public.users.create", operation="create", payload={"name": "a"},
              age=dt.timedelta(minutes=3), **row),
        event("public.users.update", operation="update", age=dt.timedelta(minutes=2),
              metadata={"changes": {"name": {"old": "a", "new": "b"}}}, **row),
        event("public.users.update", operation="update", age=dt.timedelta(minutes=1),
              metadata={"changes": {"name": {"old": "b", "new": "c"}}}, **row),
        event("public.users.create", operation="create", schema_name="public", entity="users",
              entity_id="43"),
        event("other.users.create", operation="create", schema_name="other", entity="users",
              entity_id="42"),
    ]
    add(engine, evs)
    with engine.connect() as conn:
        first, older = ops_console.entity_timeline(conn, "users", "42", schema_name="public",
                                                   limit=2)
        assert [e.seq for e in first] == [evs[2].seq, evs[1].seq]
        assert first[0].changes == {"name": {"old": "b", "new": "c"}}
        rest, none = ops_console.entity_timeline(conn, "users", "42", schema_name="public",
                                                 before_seq=older, limit=2)
        assert [e.seq for e in rest] == [evs[0].seq] and none is None
        assert rest[0].payload == {"name": "a"} and rest[0].changes == {}
        every, _ = ops_console.entity_timeline(conn, "users", "42")
        assert len(every) == 4  # without a schema: both schemas' users:42


def test_failure_groups_and_replaying_one_group(engine: sa.Engine) -> None:
    a = [failed("public.orders.create", "handler: KeyError: 'sku'") for _ in range(3)]
    b = [failed("public.orders.create", "handler: TimeoutError")]
    c = [failed("public.users.create", "handler: KeyError: 'sku'")]
    done = event("public.orders.create", status="completed")
    add(engine, [*a, *b, *c, done])
    with engine.connect() as conn:
        groups = ops_console.failure_groups(conn)
        assert [(g.type, g.error, g.count) for g in groups] == [
            ("public.orders.create", "handler: KeyError: 'sku'", 3),
            ("public.orders.create", "handler: TimeoutError", 1),
            ("public.users.create", "handler: KeyError: 'sku'", 1),
        ]
        assert ops_console.failure_group_count(conn, "public.orders.create",
                                               "handler: KeyError: 'sku'") == 3
    preview = ops_console.replay_failure_group(engine, "public.orders.create",
                                               "handler: KeyError: 'sku'", dry_run=True)
    assert preview.replayed == 3 and all(s == "failed" for s in statuses(engine).values()
                                         if s != "completed")
    result = ops_console.replay_failure_group(engine, "public.orders.create",
                                              "handler: KeyError: 'sku'", batch_size=2)
    assert result.replayed == 3
    now = statuses(engine)
    assert {now[e.id] for e in a} == {"pending"}
    assert now[b[0].id] == now[c[0].id] == "failed" and now[done.id] == "completed"
    with engine.connect() as conn:
        replayed = ops.get_event(conn, a[0].id)
        assert replayed is not None and replayed.retry_count == 0 and replayed.error is None


def test_blocked_keys_name_the_holder_and_count_the_waiting(engine: sa.Engine) -> None:
    holder = failed("public.orders.update", "boom", ordering_key="public.orders:1",
                    age=dt.timedelta(minutes=5))
    waiting = [event("public.orders.update", ordering_key="public.orders:1") for _ in range(3)]
    other = failed("public.orders.update", "bang", ordering_key="public.orders:2")
    add(engine, [holder, *waiting, other, event("x.y", ordering_key="public.orders:3")])
    with engine.connect() as conn:
        found = ops_console.blocked_key_details(conn)
    assert [(b.key, b.holder_id, b.holder_error, b.failed, b.waiting) for b in found] == [
        ("public.orders:1", holder.id, "boom", 1, 3),
        ("public.orders:2", other.id, "bang", 1, 0),
    ]


def test_throughput_counts_events_per_bucket(engine: sa.Engine) -> None:
    now = utcnow()
    evs = [event("t.x", age=dt.timedelta(minutes=m, seconds=30)) for m in (0, 0, 1, 5, 70)]
    evs.sort(key=lambda e: e.created_at)  # written in time order, as events are
    add(engine, evs)
    with engine.connect() as conn:
        buckets = ops_console.throughput(conn, window=dt.timedelta(minutes=10), buckets=10,
                                         now=now)
    assert [b.events for b in buckets] == [0, 0, 0, 0, 1, 0, 0, 0, 1, 2]
    assert all(b.exact for b in buckets)
    assert buckets[0].start == now - dt.timedelta(minutes=10) and buckets[-1].end == now


def test_throughput_estimates_a_busy_window_from_seq(engine: sa.Engine,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ops_console, "EXACT_THROUGHPUT", 3)
    now = utcnow()
    evs = [event("t.x", age=dt.timedelta(minutes=m, seconds=30)) for m in (3, 2, 2, 1, 0, 0)]
    add(engine, evs)
    with engine.connect() as conn:
        buckets = ops_console.throughput(conn, window=dt.timedelta(minutes=4), buckets=4,
                                         now=now)
    assert [b.events for b in buckets] == [1, 2, 1, 2]
    assert not any(b.exact for b in buckets)


def test_failures_read_a_bounded_number_of_rows(engine: sa.Engine) -> None:
    old = [failed("t.old", "e1", ordering_key=f"k{i}", age=dt.timedelta(minutes=10 - i))
           for i in range(3)]
    new = [failed("t.new", "e2", ordering_key="k9") for _ in range(2)]
    add(engine, [*old, *new])
    with engine.connect() as conn:
        assert ops_console.failed_count(conn) == 5
        groups = ops_console.failure_groups(conn, scan=2)  # the newest two only
        assert [(g.type, g.count) for g in groups] == [("t.new", 2)]
        keys = ops_console.blocked_key_details(conn, scan=2)  # the oldest two only
        assert [(b.key, b.holder_id) for b in keys] == [("k0", old[0].id), ("k1", old[1].id)]
        assert [(b.key, b.failed) for b in ops_console.blocked_key_details(conn)][-1] == (
            "k9", 2)


def test_relays_seen(engine: sa.Engine) -> None:
    done = event("t.x", status="completed", age=dt.timedelta(minutes=1))
    done.lease_owner = "relay-a"
    held = event("t.x", status="processing")
    held.lease_owner, held.processed_at = "relay-b", utcnow()
    add(engine, [done, held, event("t.y")])
    with engine.connect() as conn:
        seen = {r.owner: (r.holding, r.finished) for r in ops_console.relays_seen(conn)}
    assert seen == {"relay-a": (0, 1), "relay-b": (1, 0)}


def test_known_types_and_estimated_total(engine: sa.Engine) -> None:
    add(engine, [event(t) for t in ("b.x", "a.x", "b.x", "c.y.z")])
    add(engine, [event(t, status="completed") for t in ("d.done", "a.x")])
    add(engine, [event("e.failed", status="failed")])
    with engine.connect() as conn:
        assert ops_console.known_types(conn) == ["a.x", "b.x", "c.y.z", "d.done", "e.failed"]
        assert ops_console.known_types(conn, limit=2) == ["a.x", "b.x"]
        if conn.dialect.name == "postgresql":
            conn.exec_driver_sql("ANALYZE events")
        assert ops_console.estimated_total(conn) == 7


@pytest.mark.anyio
async def test_consumer_groups_lag_and_dead_letters(engine: sa.Engine) -> None:
    from outbox.providers.database import DatabaseProvider

    provider = DatabaseProvider(engine, poll_interval=0.05)
    try:
        await provider.publish(outbox.new_event("system", "warm.up", {}))
        async with provider.consume(group="billing", start="beginning") as deliveries:
            async for delivery in deliveries:
                await delivery.park("bad payload")
                break
        for _ in range(3):
            await provider.publish(outbox.new_event("system", "late.event", {}))
    finally:
        await provider.close()
    with engine.connect() as conn:
        lags = ops_console.consumer_lags(conn)
        letters = ops_console.dead_letters(conn)
        assert ops_console.count_dead_letters(conn) == 1
    assert [lag.group.name for lag in lags] == ["billing"]
    assert lags[0].behind == 3 and lags[0].oldest_unsettled_at is not None
    assert 0 <= lags[0].lag_seconds() < 60
    assert [(d.group, d.type, d.error) for d in letters] == [("billing", "warm.up", "bad payload")]


def test_health_figures_in_one_go(engine: sa.Engine) -> None:
    add(engine, [event("t.x", age=dt.timedelta(seconds=90)), failed("t.y", "e")])
    with engine.connect() as conn:
        figures = ops_console.health_figures(conn)
    assert figures.backlog.pending == 1 and figures.backlog.failed == 1
    assert 89 < figures.backlog.lag_seconds(figures.now) < 120
    assert sum(b.events for b in figures.throughput) == 2
    assert figures.consumers == [] and figures.dead_letters == []


def test_the_cli_reports_the_same_failures(engine: sa.Engine) -> None:
    import io
    import json

    from outbox import cli

    holder = failed("public.orders.update", "boom", ordering_key="public.orders:1")
    add(engine, [holder, failed("public.orders.update", "boom"),
                 event("public.orders.update", ordering_key="public.orders:1")])
    url = engine.url.render_as_string(hide_password=False)
    out = io.StringIO()
    assert cli.main(["--database-url", url, "failures", "--json"], out=out) == 0
    doc = json.loads(out.getvalue())
    assert [(g["type"], g["error"], g["count"]) for g in doc["groups"]] == [
        ("public.orders.update", "boom", 2)]
    assert [(b["key"], b["held_by"], b["waiting"]) for b in doc["blocked_keys"]] == [
        ("public.orders:1", str(holder.id), 1)]
    out = io.StringIO()
    assert cli.main(["--database-url", url, "failures"], out=out) == 0
    text = out.getvalue()
    assert "2 failed event(s); 1 group(s)" in text and "1 blocked ordering key(s)" in text
    assert doc["failed"] == doc["grouped"] == 2


def test_known_types_probe_the_history_and_read_the_backlog_once(pg_engine: sa.Engine) -> None:
    """PostgreSQL: the per-type probes go to the history's type index; the backlog (no type
    index) is read by one pass, not once per type."""
    add(pg_engine, [event(f"t{i}.x", status="completed") for i in range(5)])
    add(pg_engine, [event(f"t{i}.x") for i in range(3, 8)])
    with pg_engine.connect() as conn:
        assert ops_console.known_types(conn) == [f"t{i}.x" for i in range(8)]
        plans = []
        real = conn.execute

        def explain(stmt: Any, *args: Any, **kw: Any) -> Any:
            text = str(stmt.compile(conn, compile_kwargs={"literal_binds": True}))
            plans.append("\n".join(r[0] for r in real(sa.text("EXPLAIN ANALYZE " + text))))
            return real(stmt, *args, **kw)

        conn.execute = explain  # type: ignore[method-assign]
        ops_console.known_types(conn)
    probes, live = plans
    assert "events_live" not in probes and "events_done" in probes
    assert live.count("events_live") == 1 and "loops=1" in live.split("events_live")[1][:200]
