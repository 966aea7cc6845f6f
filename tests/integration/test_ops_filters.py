"""EventFilter → SQL (outbox.ops.filter_clauses): the same answers as the Python matcher."""

from __future__ import annotations

import datetime as dt
import uuid

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import outbox
from outbox import ops
from outbox._patterns import compile_pattern
from outbox.events import Event, EventFilter, utcnow
from tests.integration.ops_seed import INJECTIONS, add, event

TYPES = [
    "public.users.create", "public.users.update", "public.users.delete", "public.orders.create",
    "public.order_items.create", "public.orderXitems.create", "public.users.x.create",
    "main.users.create", "users.create", "a", "a.b", "a.b.c", "a.b.c.d", "a-b.c_d.e",
    "a%b.c", "a_b.c", "public.users", "public.users.create.extra", "x.users.create",
    "x.y.users.create",
]
PATTERNS = [
    "*", "public.users.create", "public.*.create", "public.>", "*.users.create", "*.*",
    "a.>", "a.*.>", "*.*.*.*", "public.order_items.*", "a_b.c", "a-b.*.e", "public.*",
    "*.>", "nothing.>", "x.*.create", "*.users.>",
]


@pytest.fixture
def typed(engine: sa.Engine) -> sa.Engine:
    add(engine, [event(t) for t in TYPES])
    return engine


def _sql_types(engine: sa.Engine, f: EventFilter) -> list[str]:
    with engine.connect() as conn:
        return sorted(e.type for e in ops.list_events(conn, f))


@pytest.mark.parametrize("pattern", PATTERNS)
def test_type_patterns_match_like_the_python_matcher(typed: sa.Engine, pattern: str) -> None:
    expected = sorted(t for t in TYPES if compile_pattern(pattern).matches(t))
    assert _sql_types(typed, EventFilter(type=pattern)) == expected


def test_every_equality_field_and_time_range(engine: sa.Engine) -> None:
    base = dict(user_id="u1", session_id="s1", instance_id="i1", schema_name="public",
                entity="users", entity_id="7", operation="update")
    hit = event("public.users.update", source="database", age=dt.timedelta(minutes=30), **base)
    others = [event("public.users.update", source="database",
                    age=dt.timedelta(minutes=30), **{**base, k: "other"}) for k in base]
    old = event("public.users.update", source="database", age=dt.timedelta(hours=3), **base)
    other_source = event("public.users.update", source="system",
                         age=dt.timedelta(minutes=30), **base)
    add(engine, [hit, *others, old, other_source])
    now = utcnow()
    f = EventFilter(source="database", type="public.users.*", status="pending",
                    start_time=now - dt.timedelta(hours=1), end_time=now, **base)
    with engine.connect() as conn:
        assert [e.id for e in ops.list_events(conn, f)] == [hit.id]
        # end_time is exclusive, start_time inclusive
        exact = EventFilter(start_time=hit.created_at, end_time=hit.created_at)
        assert ops.list_events(conn, exact) == []
        inclusive = EventFilter(start_time=hit.created_at,
                                end_time=hit.created_at + dt.timedelta(microseconds=1), **base)
        assert [e.id for e in ops.list_events(conn, inclusive)] == [hit.id]


def test_order_limit_offset_are_stable(engine: sa.Engine) -> None:
    same_time = utcnow() - dt.timedelta(minutes=1)
    evs = [event("t.x") for _ in range(7)]
    for ev in evs:
        ev.created_at = same_time
    add(engine, evs)
    with engine.connect() as conn:
        all_ids = [e.id for e in ops.list_events(conn, EventFilter())]
        pages = [ops.list_events(conn, EventFilter(limit=3, offset=o)) for o in (0, 3, 6)]
    assert [e.id for p in pages for e in p] == all_ids == [e.id for e in evs]


@pytest.mark.parametrize("value", INJECTIONS)
def test_injection_strings_are_just_values(engine: sa.Engine, value: str) -> None:
    add(engine, [event("public.users.create", user_id="u1", entity="users", entity_id="1")])
    for name in EventFilter.EQUALITY_FIELDS:
        f = EventFilter(**{name: value})
        with engine.connect() as conn:
            assert ops.list_events(conn, f) == []
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(Event)).scalar_one() == 1


def test_a_stored_injection_string_is_found_literally(engine: sa.Engine) -> None:
    value = "'; DROP TABLE events; --"
    ev = add(engine, [event("t.x", user_id=value, entity_id="%")])[0]
    add(engine, [event("t.x", user_id="someone", entity_id="1")])
    with engine.connect() as conn:
        assert [e.id for e in ops.list_events(conn, EventFilter(user_id=value))] == [ev.id]
        assert [e.id for e in ops.list_events(conn, EventFilter(entity_id="%"))] == [ev.id]


_segment = st.sampled_from(["a", "b", "a_b", "a%", "x-y", "%", "_", ""])
_sqlite = sa.create_engine("sqlite://", poolclass=sa.pool.StaticPool)
outbox.create_schema(_sqlite)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    types=st.lists(st.lists(_segment, min_size=1, max_size=5).map(".".join), min_size=1,
                   max_size=8),
    pattern=st.lists(st.sampled_from(["a", "b", "a_b", "x-y", "*"]), min_size=1, max_size=4)
    .flatmap(lambda segs: st.sampled_from([".".join(segs), ".".join([*segs, ">"])])),
)
def test_pattern_sql_equals_python_property(types: list[str], pattern: str) -> None:
    """Random types (with LIKE metacharacters, empty segments) and patterns, on SQLite."""
    types = [t for t in types if t]
    with _sqlite.begin() as conn:
        conn.execute(sa.delete(Event))
        if types:
            conn.execute(sa.insert(Event), [
                {"id": uuid.uuid4(), "source": "system", "type": t, "status": "pending",
                 "payload": {}, "instance_id": "i", "created_at": utcnow(),
                 "next_attempt_at": utcnow(), "metadata": {}, "retry_count": 0}
                for t in types])
        got = sorted(conn.execute(
            sa.select(Event.type).where(*ops.filter_clauses(EventFilter(type=pattern), "sqlite"))
        ).scalars())
    assert got == sorted(t for t in types if compile_pattern(pattern).matches(t))


def test_get_event(engine: sa.Engine) -> None:
    ev = add(engine, [event("t.x", payload={"k": [1, 2]})])[0]
    with engine.connect() as conn:
        found = ops.get_event(conn, str(ev.id))
        assert found is not None and found.payload == {"k": [1, 2]}
        assert ops.get_event(conn, uuid.uuid4()) is None
        with pytest.raises(ValueError):
            ops.get_event(conn, "not-a-uuid")
