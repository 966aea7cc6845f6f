"""Event ids are version-7 UUIDs (time-ordered), however the event was written."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy.orm import Session

import outbox
from outbox.events import new_event_id
from tests.integration.capture_models import Db, User, any_url, make_db  # noqa: F401 - fixture


def _ms(event_id: uuid.UUID) -> int:
    return event_id.int >> 80


def _at_ms(t: dt.datetime) -> int:
    return int(t.timestamp() * 1000)


def test_new_event_id_layout() -> None:
    before = _at_ms(dt.datetime.now(dt.UTC))
    ids = [new_event_id() for _ in range(2000)]
    after = _at_ms(dt.datetime.now(dt.UTC))
    assert len(set(ids)) == len(ids)
    assert {i.version for i in ids} == {7}
    assert {i.variant for i in ids} == {uuid.RFC_4122}
    assert all(before <= _ms(i) <= after for i in ids)
    # the 74 random bits do vary (not a counter, not constant)
    assert len({i.int & ((1 << 62) - 1) for i in ids}) == len(ids)


def test_new_event_and_orm_default_use_it() -> None:
    assert outbox.new_event("system", "a.b").id.version == 7
    e = outbox.Event(source="system", type="a.b")
    assert e.id is None  # the column default applies at flush


@pytest.fixture
def db(any_url: str) -> Iterator[Db]:  # noqa: F811
    yield from make_db(any_url)


def test_captured_rows_get_v7_ids_at_their_created_at(db: Db) -> None:
    with db.Session() as s:
        s.add_all([User(name=f"u{i}") for i in range(50)])
        s.commit()
    with db.Session() as s:
        s.add(outbox.Event(source="system", type="app.x"))  # the ORM default (no id given)
        s.commit()
    events = db.events()
    assert len(events) == 51
    assert len({e.id for e in events}) == 51
    for e in events:
        assert e.id.version == 7, e.id
        assert abs(_ms(e.id) - _at_ms(e.created_at)) <= 1000, (e.id, e.created_at)
    captured = [e for e in events if e.type != "app.x"]
    if db.engine.dialect.name == "postgresql":
        # the server builds them from the flush's time: one millisecond prefix for the flush
        assert len({_ms(e.id) for e in captured}) == 1
    with Session(db.engine) as s:
        assert s.get(outbox.Event, captured[0].id) is not None
