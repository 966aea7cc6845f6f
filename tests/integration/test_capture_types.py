"""How column values are written into payloads, as created and as read back."""

from __future__ import annotations

import datetime as dt
import decimal
import uuid
from collections.abc import Iterator

import pytest

from tests.integration.capture_models import Color, Db, Kinds, any_url, make_db  # noqa: F401

REF = uuid.UUID("12345678-1234-5678-1234-567812345678")
PLUS2 = dt.timezone(dt.timedelta(hours=2))


@pytest.fixture
def db(any_url: str) -> Iterator[Db]:  # noqa: F811
    yield from make_db(any_url)


def _row() -> Kinds:
    return Kinds(
        naive=dt.datetime(2026, 1, 2, 3, 4, 5, 123456),
        aware=dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=PLUS2),
        day=dt.date(2026, 1, 2),
        clock=dt.time(3, 4, 5),
        amount=decimal.Decimal("12.3400"),
        ref=REF,
        color=Color.GREEN,
        blob=b"\x00\xff hi",
        doc={"nested": [1, "two", {"three": None}], "flag": True},
        ratio=0.5,
        flag=True,
        span=dt.timedelta(minutes=1, seconds=30, milliseconds=500),
    )


def test_values_as_written(db: Db) -> None:
    with db.Session() as s:
        s.add(_row())
        s.commit()
    [create] = db.events()
    dialect = db.engine.dialect.name
    assert create.payload == {
        "id": create.payload["id"],
        # naive stays naive; MariaDB's DATETIME keeps whole seconds (read back as stored)
        "naive": "2026-01-02T03:04:05" + ("" if dialect == "mysql" else ".123456"),
        # timestamptz keeps the instant (in the offset the value had); SQLite and MariaDB store
        # the wall time without an offset
        "aware": "2026-01-02T03:04:05" + ("+02:00" if dialect == "postgresql" else ""),
        "day": "2026-01-02",
        "clock": "03:04:05",
        "amount": "12.3400",
        "ref": str(REF),
        "color": "GREEN",  # what SQLAlchemy's Enum(Color) stores: the member's name
        "blob": "AP8gaGk=",  # base64
        "doc": {"nested": [1, "two", {"three": None}], "flag": True},
        "ratio": 0.5,
        "flag": True,
        "span": 90.0 if dialect == "mysql" else 90.5,  # seconds (MariaDB: whole ones)
    }


def test_values_as_read_back_from_the_database(db: Db) -> None:
    """A delete of an expired object reads the stored row: the same rules apply."""
    with db.Session() as s:
        row = _row()
        s.add(row)
        s.commit()
        s.expire(row)
        s.delete(row)
        s.commit()
    delete = db.events()[-1].payload
    # MariaDB's DATETIME keeps whole seconds; SQLite and MariaDB store no offset.
    assert delete["naive"].startswith("2026-01-02T03:04:05")
    aware = dt.datetime.fromisoformat(delete["aware"])
    if db.engine.dialect.name == "postgresql":
        assert aware == dt.datetime(2026, 1, 2, 1, 4, 5, tzinfo=dt.UTC)  # same instant
    else:
        assert aware == dt.datetime(2026, 1, 2, 3, 4, 5)
    assert delete["day"] == "2026-01-02"
    assert delete["clock"] == "03:04:05"
    assert decimal.Decimal(delete["amount"]) == decimal.Decimal("12.34")
    assert delete["ref"] == str(REF)
    assert delete["color"] == "GREEN"
    assert delete["blob"] == "AP8gaGk="
    assert delete["doc"] == {"nested": [1, "two", {"three": None}], "flag": True}
    assert delete["flag"] is True
    assert int(delete["span"]) == 90  # MariaDB: whole seconds
