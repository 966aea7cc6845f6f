"""The events table on real databases: seq numbering, UTC datetimes, schema checks."""

from __future__ import annotations

import datetime as dt
import uuid

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

import outbox
from outbox.events import Event, utcnow
from outbox.schema import check_schema


def _rows(n: int) -> list[dict[str, object]]:
    now = utcnow()
    return [
        dict(id=uuid.uuid4(), source="system", type="t.x", status="pending", payload={"i": i},
             instance_id="i", created_at=now, next_attempt_at=now, meta={}, retry_count=0)
        for i in range(n)
    ]


def test_seq_is_assigned_in_insert_order(engine: sa.Engine) -> None:
    with Session(engine) as s:
        first = outbox.new_event("system", "t.a")
        s.add(first)
        s.commit()
        assert first.seq == 1
        s.execute(sa.insert(Event), _rows(5))
        s.commit()
        seqs = s.scalars(sa.select(Event.seq).order_by(Event.seq)).all()
    assert seqs == [1, 2, 3, 4, 5, 6]


def test_datetimes_come_back_aware_utc(engine: sa.Engine) -> None:
    naive = dt.datetime(2026, 1, 1, 12, 0, 0, 123456)
    ev = outbox.new_event("system", "t.a", created_at=naive.replace(tzinfo=dt.UTC))
    with Session(engine) as s:
        s.add(ev)
        s.commit()
        s.expire_all()
        loaded = s.get(Event, ev.id)
        assert loaded is not None
        assert loaded.created_at == naive.replace(tzinfo=dt.UTC)
        assert loaded.created_at.tzinfo is not None


def test_mariadb_schema(mariadb_url: str) -> None:
    eng = sa.create_engine(mariadb_url)
    try:
        outbox.create_schema(eng)
        with Session(eng) as s:
            s.execute(sa.insert(Event), _rows(3))
            s.commit()
            assert s.scalars(sa.select(Event.seq).order_by(Event.seq)).all() == [1, 2, 3]
    finally:
        eng.dispose()


def test_check_schema_names_the_fix(db_url: str) -> None:
    eng = sa.create_engine(db_url)
    try:
        with pytest.raises(outbox.exceptions.SchemaMissing, match="alembic upgrade head"):
            check_schema(eng)
        outbox.create_schema(eng)
        check_schema(eng)
    finally:
        eng.dispose()
