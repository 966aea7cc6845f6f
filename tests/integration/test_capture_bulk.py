"""ORM bulk insert/update/delete through a captured session: an event per row, or a refusal."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

import outbox
from tests.integration.capture_models import Db, Tag, User, make_db


@pytest.fixture
def db(db_url: str) -> Iterator[Db]:
    yield from make_db(db_url, exclude={User: {"password"}})


@pytest.fixture
def maria(mariadb_url: str) -> Iterator[Db]:
    yield from make_db(mariadb_url)


def _seed(db: Db, n: int = 4) -> list[int]:
    with db.Session() as s:
        users = [User(name=f"u{i}", email=f"{i}@x", password="pw") for i in range(n)]
        s.add_all(users)
        s.commit()
        ids = [u.id for u in users]
    with db.engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM events"))
    return ids


def test_bulk_update_emits_one_event_per_changed_row(db: Db) -> None:
    ids = _seed(db)
    with db.Session() as s:
        in_session = s.get(User, ids[0])
        assert in_session is not None
        result = s.execute(
            sa.update(User).where(User.id.in_(ids[:3])).values(name=User.name + "!")
        )
        assert result.rowcount == 3
        assert in_session.name == "u0!"  # synchronize_session still works
        s.commit()
    events = db.events()
    assert [e.entity_id for e in events] == [str(i) for i in ids[:3]]
    for i, ev in zip(ids, events, strict=False):
        assert ev.operation == "update"
        index = ids.index(i)
        assert ev.payload == {"id": i, "name": f"u{index}!", "email": f"{index}@x"}
        assert ev.meta == {"changes": {"name": {"old": f"u{index}", "new": f"u{index}!"}}}


def test_bulk_update_without_real_change_emits_nothing(db: Db) -> None:
    _seed(db)
    with db.Session() as s:
        result = s.execute(sa.update(User).values(name=User.name))
        assert result.rowcount == 4
        s.commit()
    assert db.count() == 0


def test_bulk_update_keeps_the_callers_returning(db: Db) -> None:
    ids = _seed(db)
    with db.Session() as s:
        rows = s.execute(
            sa.update(User).where(User.id == ids[1]).values(email="new").returning(User.id)
        ).all()
        assert [tuple(r) for r in rows] == [(ids[1],)]
        users = s.scalars(
            sa.update(User).where(User.id == ids[2]).values(email="n2").returning(User)
        ).all()
        assert [u.email for u in users] == ["n2"]
        s.commit()
    assert [e.meta["changes"] for e in db.events()] == [
        {"email": {"old": "1@x", "new": "new"}},
        {"email": {"old": "2@x", "new": "n2"}},
    ]


def test_bulk_update_by_primary_key(db: Db) -> None:
    ids = _seed(db)
    with db.Session() as s:
        s.execute(sa.update(User), [
            {"id": ids[0], "name": "a"},
            {"id": ids[1], "name": "u1"},  # unchanged: no event
            {"id": ids[2], "email": "e"},
        ])
        s.commit()
    events = db.events()
    assert [(e.entity_id, e.meta["changes"]) for e in events] == [
        (str(ids[0]), {"name": {"old": "u0", "new": "a"}}),
        (str(ids[2]), {"email": {"old": "2@x", "new": "e"}}),
    ]


def test_bulk_delete_captures_each_stored_row(db: Db) -> None:
    ids = _seed(db)
    with db.Session() as s:
        result = s.execute(sa.delete(User).where(User.id > ids[1]))
        assert result.rowcount == 2
        s.commit()
    events = db.events()
    assert sorted(e.entity_id for e in events) == [str(ids[2]), str(ids[3])]
    for ev in events:
        assert ev.operation == "delete"
        index = ids.index(int(ev.entity_id))
        assert ev.payload == {"id": ids[index], "name": f"u{index}", "email": f"{index}@x"}


def test_bulk_delete_with_returning_entity(db: Db) -> None:
    ids = _seed(db)
    with db.Session() as s:
        deleted = s.scalars(sa.delete(User).where(User.id == ids[0]).returning(User.id)).all()
        assert deleted == [ids[0]]
        s.commit()
    assert [e.entity_id for e in db.events()] == [str(ids[0])]


def test_bulk_insert_with_autoincrement_keys(db: Db) -> None:
    with db.Session() as s:
        s.execute(sa.insert(User), [{"name": "a"}, {"name": "b", "email": "b@x"}])
        ids = s.scalars(
            sa.insert(User).returning(User.id), [{"name": "c"}]
        ).all()
        s.commit()
    events = db.events()
    assert [e.payload["name"] for e in events] == ["a", "b", "c"]
    assert all(e.operation == "create" for e in events)
    assert events[2].entity_id == str(ids[0])
    assert events[0].payload["id"] is not None
    assert events[1].payload == {"id": events[1].payload["id"], "name": "b", "email": "b@x"}


def test_core_dml_on_a_captured_table_through_the_session(db: Db) -> None:
    ids = _seed(db)
    table = User.__table__
    with db.Session() as s:
        s.execute(sa.update(table).where(table.c.id == ids[0]).values(name="core"))
        s.execute(sa.delete(table).where(table.c.id == ids[1]))
        s.commit()
    assert [(e.operation, e.entity_id) for e in db.events()] == [
        ("update", str(ids[0])), ("delete", str(ids[1]))
    ]


def test_opt_out_runs_the_statement_without_events(db: Db) -> None:
    ids = _seed(db)
    with db.Session() as s:
        s.execute(
            sa.update(User).where(User.id == ids[0]).values(name="quiet"),
            execution_options={"outbox_capture": False},
        )
        s.commit()
    assert db.count() == 0


def test_rollback_removes_bulk_events(db: Db) -> None:
    _seed(db)
    with db.Session() as s:
        s.execute(sa.delete(User))
        s.rollback()
    assert db.count() == 0
    with db.engine.connect() as conn:
        assert conn.scalar(sa.select(sa.func.count()).select_from(User)) == 4


def test_upserts(db: Db) -> None:
    insert = postgresql.insert if db.engine.dialect.name == "postgresql" else sqlite.insert
    with db.Session() as s:
        s.add(Tag(owner_id=1, name="a"))
        s.commit()
    with db.engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM events"))
    with db.Session() as s:
        nothing = insert(Tag).values([
            {"owner_id": 1, "name": "a", "weight": 5},  # conflicts: not inserted, no event
            {"owner_id": 2, "name": "b", "weight": 5},
        ]).on_conflict_do_nothing()
        s.execute(nothing)
        update = insert(Tag).values(owner_id=1, name="a", weight=9).on_conflict_do_update(
            index_elements=["owner_id", "name"], set_={"weight": 9}
        )
        with pytest.raises(outbox.exceptions.UnsupportedOperation, match="upsert"):
            s.execute(update)
        s.commit()
    assert [e.entity_id for e in db.events()] == ['[2,"b"]']


def test_mariadb_bulk_rules(maria: Db) -> None:
    ids = _seed(maria)
    with maria.Session() as s:
        # No UPDATE ... RETURNING on MariaDB: refused before anything runs.
        with pytest.raises(outbox.exceptions.UnsupportedOperation, match=r"outbox_capture.*False"):
            s.execute(sa.update(User).where(User.id == ids[0]).values(name="x"))
        # Opting out runs it.
        s.execute(sa.update(User).where(User.id == ids[1]).values(name="y"),
                  execution_options={"outbox_capture": False})
        # By primary key and DELETE ... RETURNING are captured.
        s.execute(sa.update(User), [{"id": ids[2], "name": "z"}])
        s.execute(sa.delete(User).where(User.id == ids[3]))
        s.execute(sa.insert(User), [{"name": "new1"}, {"name": "new2"}])
        s.commit()
    with maria.engine.connect() as conn:
        names = dict(conn.execute(sa.select(User.id, User.name)).all())
    assert names[ids[0]] == "u0" and names[ids[1]] == "y"
    events = maria.events()
    assert [(e.operation, e.entity_id) for e in events[:2]] == [
        ("update", str(ids[2])), ("delete", str(ids[3]))
    ]
    assert [(e.operation, e.payload["name"]) for e in events[2:]] == [
        ("create", "new1"), ("create", "new2")
    ]
    assert all(e.payload["id"] for e in events[2:])


@pytest.fixture
def pg_db(pg_url: str) -> Iterator[Db]:
    yield from make_db(pg_url)


def test_concurrent_insert_between_old_image_and_update_blocks_commit(pg_db: Db) -> None:
    db = pg_db
    _seed(db, 2)
    intruded: list[bool] = []

    def intrude(conn, cursor, statement, params, context, executemany):  # type: ignore[no-untyped-def]
        # Right after capture read the old images, another transaction commits a row that the
        # UPDATE will match.
        if "FOR UPDATE" in statement and not intruded:
            intruded.append(True)
            with db.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as other:
                other.execute(sa.insert(User).values(name="intruder"))

    sa.event.listen(db.engine, "after_cursor_execute", intrude)
    try:
        with db.Session() as s:
            with pytest.raises(outbox.exceptions.CaptureError, match="another transaction"):
                s.execute(sa.update(User).values(email="all"))
            with pytest.raises(outbox.exceptions.CaptureError, match="refusing to commit"):
                s.commit()
            s.rollback()
            # A fresh transaction of the same session is usable again.
            s.add(User(name="after"))
            s.commit()
    finally:
        sa.event.remove(db.engine, "after_cursor_execute", intrude)
    assert intruded
    assert [e.payload["name"] for e in db.events()] == ["after"]
