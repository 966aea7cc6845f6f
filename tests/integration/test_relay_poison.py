"""Rows the database accepts but no writer of this package produces ("poison rows"), written by
raw SQL between well-formed events: each fails alone (``failed`` with an error naming what is
wrong) or is delivered; its batch-mates are delivered; no run and no restart meets a crash."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

import outbox
from outbox import Broker, Event
from outbox.providers.memory import MemoryProvider
from outbox.relay import Relay

pytestmark = pytest.mark.anyio

_DEEP = "[" * 3000 + "]" * 3000


def _poison(engine: sa.Engine) -> dict[str, tuple[str, dict[str, Any]]]:
    """Raw-SQL changes that make a row odd, per dialect: name → (SET clause, parameters)."""
    pg = engine.dialect.name == "postgresql"
    json = "CAST(:v AS jsonb)" if pg else ":v"
    kinds: dict[str, tuple[str, dict[str, Any]]] = {
        "deep_payload": (f"payload = {json}", {"v": _DEEP}),
        "deep_metadata": (f"metadata = {json}", {"v": _DEEP}),
        "metadata_string": (f"metadata = {json}", {"v": '"not an object"'}),
        "metadata_array": (f"metadata = {json}", {"v": "[1, 2]"}),
        "payload_string": (f"payload = {json}", {"v": '"just text"'}),
        "payload_null": (f"payload = {json}", {"v": "null"}),
        "empty_type": ("type = :v", {"v": ""}),
        "unknown_source": ("source = :v", {"v": "martian"}),
    }
    if pg:
        kinds["created_infinity"] = ("created_at = 'infinity'", {})
        kinds["created_year_20000"] = ("created_at = '20000-01-01 00:00:00+00'", {})
        kinds["due_minus_infinity"] = ("next_attempt_at = '-infinity'", {})
        kinds["created_bc"] = ("created_at = '0100-01-01 00:00:00+00 BC'", {})
    elif engine.dialect.name == "sqlite":
        kinds["created_garbage"] = ("created_at = :v", {"v": "not a time"})
    else:  # MariaDB refuses JSON nested deeper than 32 levels, and invalid dates
        del kinds["deep_payload"], kinds["deep_metadata"]
    return kinds


# Kinds a handler can take as they are: delivered; the rest fail alone.
_DELIVERED = {"payload_string", "payload_null", "empty_type", "unknown_source"}


def _add(engine: sa.Engine, types_keys: list[tuple[str, str | None]]) -> list[uuid.UUID]:
    ids = []
    with Session(engine) as s:
        for i, (type_, key) in enumerate(types_keys):
            e = outbox.new_event("system", type_, {"i": i}, ordering_key=key)
            s.add(e)
            ids.append(e.id)
        s.commit()
    return ids


def _status(engine: sa.Engine) -> dict[uuid.UUID, tuple[str, str | None]]:
    """Read without the JSON columns (the ORM could not load the odd rows either)."""
    t = Event.__table__
    with engine.connect() as conn:
        return {r[0]: (r[1], r[2]) for r in conn.execute(sa.select(t.c.id, t.c.status, t.c.error))}


async def _drain(engine: sa.Engine, seen: list[uuid.UUID], **kw: Any) -> Relay:
    broker = Broker(MemoryProvider(max_events=10_000))

    def handler(event: Event) -> None:  # the README's style: a plain function
        seen.append(event.id)

    broker.subscribe("test.>", handler, name="h")
    relay = Relay(engine, broker=broker, poll_interval=0.05, **kw)
    await relay.run(once=True)
    return relay


@pytest.fixture(params=["postgresql", "sqlite", "mariadb"])
def any_engine(request: pytest.FixtureRequest) -> Iterator[sa.Engine]:
    """An engine with the outbox schema on each dialect the relay supports."""
    url = request.getfixturevalue(
        {"postgresql": "pg_url", "sqlite": "sqlite_url", "mariadb": "mariadb_url"}[request.param]
    )
    engine = sa.create_engine(url)
    outbox.create_schema(engine)
    yield engine
    engine.dispose()


async def test_each_poison_row_fails_alone_and_restarts_do_not_loop(
    any_engine: sa.Engine, caplog: pytest.LogCaptureFixture
) -> None:
    engine = any_engine
    kinds = _poison(engine)
    names = list(kinds)
    # good and odd rows interleaved, some odd ones heading a key with good followers
    plan: list[tuple[str, str | None]] = []
    for n in range(len(names)):
        key = f"k{n}" if n % 2 else None
        plan += [("test.good", None), ("test.odd", key), ("test.good", key)]
    ids = _add(engine, plan)
    odd = {ids[3 * n + 1]: name for n, name in enumerate(names)}
    blocked = {
        ids[3 * n + 2] for n, name in enumerate(names) if n % 2 and name not in _DELIVERED
    }  # follows a failed event of its key
    with engine.begin() as conn:
        for event_id, name in odd.items():
            clause, params = kinds[name]
            conn.execute(
                sa.text(f"UPDATE events SET {clause} WHERE id = :id"),  # noqa: S608
                {**params, "id": event_id if conn.dialect.name == "postgresql" else event_id.hex},
            )

    seen: list[uuid.UUID] = []
    with caplog.at_level(logging.ERROR, logger="outbox.relay"):
        first = await _drain(engine, seen, batch_size=7)
    status = _status(engine)
    good = [i for i in ids if i not in odd and i not in blocked]
    assert all(status[i] == ("completed", None) for i in good), status
    for event_id, name in odd.items():
        state, error = status[event_id]
        if name in _DELIVERED:
            assert state == "completed", (name, state, error)
        else:
            assert state == "failed", (name, state, error)
            assert error is not None and error.startswith("undeliverable row: "), (name, error)
    for event_id in blocked:
        assert status[event_id][0] == "pending"  # held by its key's failed head
    assert first.stats.failed == len(odd) - len(_DELIVERED)
    assert not [r for r in caplog.records if r.exc_info]  # no traceback anywhere

    # two restarts: nothing is claimed again, nothing crashes; new events still flow
    for _ in range(2):
        again = await _drain(engine, seen)
        assert again.stats.claimed == 0 and again.stats.failed == 0
    later = _add(engine, [("test.good", None), ("test.good", "fresh")])
    await _drain(engine, seen)
    status = _status(engine)
    assert all(status[i][0] == "completed" for i in later)
    assert set(seen) >= set(good) | set(later)


_HUGE = "(SELECT string_agg(md5(i::text), '') FROM generate_series(1, 32000) AS i)"  # ~1 MB


def _huge_row(engine: sa.Engine, column: str) -> tuple[list[uuid.UUID], str]:
    """Seven events, the fourth with a ~1 MB ``column`` (written by raw SQL); that value."""
    ids = _add(engine, [("test.good", None)] * 3 + [("test.odd", "k")] + [("test.good", None)] * 3)
    with engine.begin() as conn:
        conn.execute(
            sa.text(f"UPDATE events SET {column} = {_HUGE} WHERE id = :id"),  # noqa: S608
            {"id": ids[3]},
        )
        value = conn.execute(sa.text(f"SELECT {_HUGE}")).scalar_one()
    return ids, value


@pytest.mark.parametrize("column", ["user_id", "session_id", "entity", "entity_id", "instance_id"])
async def test_a_value_longer_than_an_index_entry_is_stored_and_found(
    pg_engine: sa.Engine, column: str
) -> None:
    """Any text PostgreSQL stores in these columns moves into the history (its indexes on them
    cannot overflow: hash indexes, a prefix for instance_id) and an EventFilter on the whole
    value finds it."""
    from outbox import EventFilter, ops

    ids, value = _huge_row(pg_engine, column)
    relay = await _drain(pg_engine, [], batch_size=100)
    status = _status(pg_engine)
    assert all(status[i] == ("completed", None) for i in ids), status
    assert relay.stats.completed == 7 and relay.stats.failed == 0
    with pg_engine.connect() as conn:
        found = ops.list_events(conn, EventFilter(**{column: value}))
        assert [e.id for e in found] == [ids[3]]
        assert ops.list_events(conn, EventFilter(**{column: value[:200]})) == []


async def test_a_row_that_cannot_take_its_outcome_fails_alone(pg_engine: sa.Engine) -> None:
    """A type longer than a btree entry holds (the type index keeps whole types): the row cannot
    move into the history; it ends failed with the database's reason, its batch-mates complete,
    and restarts do not meet it again."""
    ids, _ = _huge_row(pg_engine, "type")
    seen: list[uuid.UUID] = []
    relay = await _drain(pg_engine, seen, batch_size=100)
    status = _status(pg_engine)
    assert all(status[i] == ("completed", None) for i in ids if i != ids[3])
    state, error = status[ids[3]]
    assert state == "failed" and error is not None
    assert error.startswith("cannot be settled as completed: index row"), error
    assert relay.stats.failed == 1 and relay.stats.completed == 6
    for _ in range(2):
        again = await _drain(pg_engine, seen)
        assert again.stats.claimed == 0
