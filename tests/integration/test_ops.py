"""outbox.ops on PostgreSQL and SQLite: replay, cleanup, stats and the backlog query."""

from __future__ import annotations

import datetime as dt
import uuid

import pytest
import sqlalchemy as sa

from outbox import ops
from outbox._sql.relay import RelayStore
from outbox.events import Event, EventFilter, utcnow
from tests.integration.ops_seed import add, count, event, statuses

DAY = dt.timedelta(days=1)


def test_replay_by_ids_resets_failed_events_only(engine: sa.Engine) -> None:
    failed, done, pending = add(engine, [
        event("t.x", status="failed", age=DAY), event("t.x", status="completed", age=DAY),
        event("t.x"),
    ])
    missing = uuid.uuid4()
    result = ops.replay(engine, ids=[failed.id, str(done.id), pending.id, missing])
    assert result.replayed == 1
    assert result.missing == [missing]
    assert result.skipped == {done.id: "completed", pending.id: "pending"}
    with engine.connect() as conn:
        ev = ops.get_event(conn, failed.id)
    assert ev is not None
    assert (ev.status, ev.retry_count, ev.error, ev.completed_at, ev.processed_at) == (
        "pending", 0, None, None, None)
    assert ev.next_attempt_at >= failed.created_at
    assert statuses(engine)[done.id] == "completed"


def test_replay_dry_run_changes_nothing(engine: sa.Engine) -> None:
    evs = add(engine, [event("t.x", status="failed") for _ in range(3)])
    assert ops.replay(engine, ids=[e.id for e in evs], dry_run=True).replayed == 3
    assert ops.replay(engine, filter=EventFilter(), dry_run=True).replayed == 3
    assert set(statuses(engine).values()) == {"failed"}


def test_replay_by_filter_in_batches(engine: sa.Engine) -> None:
    users = add(engine, [event("public.users.update", status="failed", age=DAY)
                         for _ in range(7)])
    recent = add(engine, [event("public.users.update", status="failed")])
    orders = add(engine, [event("public.orders.update", status="failed")])
    add(engine, [event("public.users.update", status="completed")])
    result = ops.replay(engine, filter=EventFilter(type="public.users.*"), batch_size=3)
    assert result.replayed == 8
    st = statuses(engine)
    assert all(st[e.id] == "pending" for e in users + recent)
    assert st[orders[0].id] == "failed"
    # --since: only the recent failures
    add(engine, [event("public.users.update", status="failed", age=DAY)])
    again = ops.replay(engine, filter=EventFilter(start_time=utcnow() - dt.timedelta(hours=1)))
    assert again.replayed == 1  # the orders event; the old users one stays failed
    assert st[orders[0].id] == "failed" and statuses(engine)[orders[0].id] == "pending"


def test_replay_by_pattern_is_exact(engine: sa.Engine) -> None:
    # '*' is one segment: '*.users.>' must not reach 'x.y.users.create'
    hit, miss = add(engine, [event("x.users.create", status="failed"),
                             event("x.y.users.create", status="failed")])
    assert ops.replay(engine, filter=EventFilter(type="*.users.>"), dry_run=True).replayed == 1
    assert ops.replay(engine, filter=EventFilter(type="*.users.>")).replayed == 1
    st = statuses(engine)
    assert (st[hit.id], st[miss.id]) == ("pending", "failed")


def test_replay_refuses_ambiguous_requests(engine: sa.Engine) -> None:
    with pytest.raises(ValueError):
        ops.replay(engine)
    with pytest.raises(ValueError):
        ops.replay(engine, ids=[], filter=EventFilter())
    with pytest.raises(ValueError, match="failed"):
        ops.replay(engine, filter=EventFilter(status="completed"))


def test_cleanup_deletes_only_old_finished_events(engine: sa.Engine) -> None:
    old_done = add(engine, [event("t.x", status="completed", age=40 * DAY) for _ in range(12)])
    old_failed = add(engine, [event("t.x", status="failed", age=40 * DAY) for _ in range(5)])
    old_open = add(engine, [event("t.x", status=s, age=40 * DAY) for s in ("pending",
                                                                          "processing")])
    young = add(engine, [event("t.x", status="completed", age=DAY)])
    dry = ops.cleanup(engine, older_than=30 * DAY, dry_run=True)
    assert (dry.deleted, dry.by_status) == (17, {"completed": 12, "failed": 5})
    assert count(engine) == 20
    seen: list[int] = []
    result = ops.cleanup(engine, older_than=30 * DAY, batch_size=5,
                         progress=lambda r: seen.append(r.deleted))
    assert result.deleted == 17 and result.by_status == {"completed": 12, "failed": 5}
    assert result.batches == 5  # 5+5+2 completed, 5+0 failed
    assert seen == sorted(seen) and seen[-1] == 17
    left = set(statuses(engine))
    assert left == {e.id for e in old_open + young}
    assert not left & {e.id for e in old_done + old_failed}


def test_cleanup_by_status_and_refusals(engine: sa.Engine) -> None:
    add(engine, [event("t.x", status="completed", age=40 * DAY),
                 event("t.x", status="failed", age=40 * DAY)])
    assert ops.cleanup(engine, older_than=30 * DAY, statuses=["failed"]).deleted == 1
    assert set(statuses(engine).values()) == {"completed"}
    for bad in (["pending"], ["processing"], [], ["completed", "nope"]):
        with pytest.raises(ValueError):
            ops.cleanup(engine, older_than=DAY, statuses=bad)
    with pytest.raises(ValueError):
        ops.cleanup(engine)
    with pytest.raises(ValueError):
        ops.cleanup(engine, older_than=-DAY)
    with pytest.raises(ValueError):
        ops.cleanup(engine, older_than=DAY, pause=-1)


def test_backlog_counts_and_lag(engine: sa.Engine) -> None:
    with engine.connect() as conn:
        empty = ops.backlog(conn)
    assert empty == ops.Backlog() and empty.lag_seconds() == 0.0
    oldest = event("t.x", age=dt.timedelta(minutes=10))
    add(engine, [oldest, event("t.x", age=dt.timedelta(minutes=1)),
                 event("t.x", status="processing", age=dt.timedelta(minutes=5)),
                 event("t.x", status="failed", ordering_key="users:1"),
                 event("t.x", status="failed", ordering_key="users:1"),
                 event("t.x", status="failed", ordering_key="users:2"),
                 event("t.x", status="failed"),
                 event("t.x", status="completed", age=dt.timedelta(hours=1))])
    with engine.connect() as conn:
        b = ops.backlog(conn)
        keys = ops.blocked_keys(conn)
        assert ops.blocked_keys(conn, limit=1) == keys[:1]
    assert (b.pending, b.processing, b.failed, b.blocked_keys) == (2, 1, 4, 2)
    assert b.oldest_created_at == b.oldest_pending_at == oldest.created_at
    assert 9 * 60 < b.lag_seconds() < 3600
    assert [(k, n) for k, _seq, n in keys] == [("users:1", 2), ("users:2", 1)]
    assert keys[0][1] < keys[1][1]  # oldest failed head first
    # The relay's inspection methods are these queries (one implementation).
    store = RelayStore(engine, owner="test")
    assert store.blocked_keys() == keys
    assert store.backlog() == (2, oldest.created_at)
    # a processing event older than every pending one is the lag
    add(engine, [event("t.x", status="processing", age=dt.timedelta(minutes=20))])
    with engine.connect() as conn:
        assert ops.backlog(conn).lag_seconds() > 19 * 60
        conn.execute(sa.update(Event).where(Event.status.in_(["pending", "processing"]))
                     .values(status="completed"))
        conn.commit()
        assert ops.backlog(conn).lag_seconds() == 0.0


def test_stats_by_status_and_type(engine: sa.Engine) -> None:
    add(engine, [event("a.b.create"), event("a.b.create", status="completed"),
                 event("a.c.update", status="failed", age=DAY)])
    with engine.connect() as conn:
        s = ops.stats(conn)
        recent = ops.stats(conn, since=utcnow() - dt.timedelta(hours=1))
    assert s.by_status == {"pending": 1, "completed": 1, "failed": 1} and s.total == 3
    assert s.by_type == {"a.b.create": {"pending": 1, "completed": 1}, "a.c.update": {"failed": 1}}
    assert recent.total == 2 and "a.c.update" not in recent.by_type
    assert s.backlog.pending == 1
